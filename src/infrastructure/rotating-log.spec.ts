import { existsSync, mkdtempSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { RotatingLog } from './rotating-log';

describe('RotatingLog', () => {
  it('appends lines and rotates by size, keeping the configured number of backups', () => {
    const file = join(mkdtempSync(join(tmpdir(), 'rotlog-')), 'sub', 'vllm.log');
    const log = new RotatingLog(file, 20, 2); // 20 bytes: two 10-byte lines per file
    for (let i = 0; i < 7; i++) log.write(`line-${i}...`); // each 10 bytes with the newline
    log.close();
    expect(readFileSync(file, 'utf8')).toBe('line-6...\n');
    expect(readFileSync(`${file}.1`, 'utf8')).toBe('line-4...\nline-5...\n');
    expect(readFileSync(`${file}.2`, 'utf8')).toBe('line-2...\nline-3...\n');
    expect(existsSync(`${file}.3`)).toBe(false); // the oldest lines were dropped
  });

  it('starts a new file in place when no backups are kept, and continues an existing file', () => {
    const file = join(mkdtempSync(join(tmpdir(), 'rotlog-')), 'vllm.log');
    const first = new RotatingLog(file, 100, 0);
    first.write('kept');
    first.close();
    const again = new RotatingLog(file, 12, 0);
    again.write('more'); // 5 + 5 bytes fit
    again.write('overflow'); // 19 bytes: over the limit, the file starts afresh
    again.close();
    expect(readFileSync(file, 'utf8')).toBe('overflow\n');
    expect(existsSync(`${file}.1`)).toBe(false);
  });

  it('drops lines written after close, even one that would rotate: the file is not reopened', () => {
    const file = join(mkdtempSync(join(tmpdir(), 'rotlog-')), 'vllm.log');
    const log = new RotatingLog(file, 20, 1);
    log.write('line-0...');
    log.close();
    log.write('line-1...'); // a late line of vLLM's output, after the stop
    log.write('line-2...'); // over the limit: a rotation would have reopened the file
    expect(readFileSync(file, 'utf8')).toBe('line-0...\n');
    expect(existsSync(`${file}.1`)).toBe(false);
  });
});
