import { mkdtempSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { makeDirs } from './make-dirs';

describe('makeDirs', () => {
  let root: string;
  beforeEach(() => (root = mkdtempSync(join(tmpdir(), 'make-dirs-'))));
  afterEach(() => rmSync(root, { recursive: true, force: true }));

  it('makes the missing levels with the mode, returning the first one made, or undefined when it existed', () => {
    const deep = join(root, 'a', 'b', 'c');
    expect(makeDirs(deep, 0o700)).toBe(join(root, 'a'));
    for (const dir of [join(root, 'a'), deep]) expect(statSync(dir).mode & 0o777).toBe(0o700);
    expect(makeDirs(deep)).toBeUndefined();
  });

  it('throws for a path through a file', () => {
    writeFileSync(join(root, 'f'), '');
    expect(() => makeDirs(join(root, 'f'))).toThrow(expect.objectContaining({ code: 'EEXIST' }));
    expect(() => makeDirs(join(root, 'f', 'x', 'y'))).toThrow(expect.objectContaining({ code: 'ENOTDIR' }));
  });

  it('throws under /proc, where mkdir answers ENOENT below a parent that exists (Node 20 loops forever there)', () => {
    expect(() => makeDirs('/proc/tide-vllm-nope/x')).toThrow(expect.objectContaining({ code: 'ENOENT' }));
  });
});
