import { closeSync, existsSync, openSync, renameSync, statSync, writeSync } from 'node:fs';
import { dirname } from 'node:path';
import { makeDirs } from './make-dirs';

/**
 * Appends lines to a file and rotates it by size: file → file.1 → … → file.N (oldest dropped).
 * Writes are synchronous: vLLM's output is a few lines a second, and a rotation must never race
 * a file that an asynchronous stream has not created yet. Once open, a failing disk never throws:
 * the structured log still has every line.
 */
export class RotatingLog {
  private fd: number | null;
  private size: number;
  /** After close, lines are dropped: a late one must not reopen the file (a rotation would). */
  private closed = false;

  constructor(
    readonly path: string,
    private readonly maxBytes: number,
    private readonly backups: number,
  ) {
    // A file that cannot be made or opened at the start throws (a misconfiguration to report);
    // later, a failing disk never does.
    makeDirs(dirname(path));
    this.fd = openSync(path, 'a');
    this.size = statSync(path).size;
  }

  write(line: string): void {
    if (this.closed) return;
    const data = line + '\n';
    const bytes = Buffer.byteLength(data);
    if (this.maxBytes > 0 && this.size > 0 && this.size + bytes > this.maxBytes) this.rotate();
    if (this.fd === null) return;
    try {
      writeSync(this.fd, data);
      this.size += bytes;
    } catch {
      // disk full or gone: keep serving, the structured log has the line
    }
  }

  close(): void {
    this.closed = true;
    this.closeFile();
  }

  private closeFile(): void {
    if (this.fd !== null) closeSync(this.fd);
    this.fd = null;
  }

  private open(flags: 'a' | 'w'): number | null {
    try {
      return openSync(this.path, flags);
    } catch {
      return null;
    }
  }

  private rotate(): void {
    this.closeFile();
    try {
      for (let i = this.backups - 1; i >= 1; i--) {
        if (existsSync(`${this.path}.${i}`)) renameSync(`${this.path}.${i}`, `${this.path}.${i + 1}`);
      }
      if (this.backups > 0) renameSync(this.path, `${this.path}.1`);
    } catch {
      // a backup could not be moved: the current file is restarted all the same
    }
    this.fd = this.open(this.backups > 0 ? 'a' : 'w'); // no backups: start the file afresh
    this.size = 0;
  }
}
