import { createWriteStream, existsSync, mkdirSync, renameSync, statSync, type WriteStream } from 'node:fs';
import { dirname } from 'node:path';

/** Appends lines to a file and rotates it by size: file → file.1 → … → file.N (oldest dropped). */
export class RotatingLog {
  private stream: WriteStream;
  private size: number;

  constructor(
    readonly path: string,
    private readonly maxBytes: number,
    private readonly backups: number,
  ) {
    mkdirSync(dirname(path), { recursive: true });
    this.size = existsSync(path) ? statSync(path).size : 0;
    this.stream = this.open('a');
  }

  write(line: string): void {
    const data = line + '\n';
    if (this.size > 0 && this.size + Buffer.byteLength(data) > this.maxBytes) this.rotate();
    this.stream.write(data);
    this.size += Buffer.byteLength(data);
  }

  close(): void {
    this.stream.end();
  }

  private open(flags: 'a' | 'w'): WriteStream {
    const stream = createWriteStream(this.path, { flags });
    // A full disk must not take the service down; the structured log still has every line.
    stream.on('error', () => undefined);
    return stream;
  }

  private rotate(): void {
    this.stream.end();
    for (let i = this.backups - 1; i >= 1; i--) {
      if (existsSync(`${this.path}.${i}`)) renameSync(`${this.path}.${i}`, `${this.path}.${i + 1}`);
    }
    if (this.backups > 0) renameSync(this.path, `${this.path}.1`);
    this.stream = this.open(this.backups > 0 ? 'a' : 'w'); // no backups: start the file afresh
    this.size = 0;
  }
}
