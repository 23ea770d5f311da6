import { mkdirSync, statSync } from 'node:fs';
import { dirname } from 'node:path';

/**
 * `mkdirSync(dir, { recursive: true, mode })` without its hang: Node 20's loops forever, at full
 * CPU and deaf to SIGTERM, where mkdir answers ENOENT under a parent that exists (any path under
 * /proc). Here that ENOENT is thrown. Returns the first directory made, or undefined when `dir`
 * existed, as mkdirSync does.
 */
export function makeDirs(dir: string, mode = 0o777): string | undefined {
  try {
    mkdirSync(dir, { mode });
    return dir;
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'EEXIST' && statSync(dir).isDirectory()) return undefined;
    const parent = dirname(dir);
    if (code !== 'ENOENT' || parent === dir) throw err;
    // The parent is missing, or it exists and this directory cannot be made in it.
    const made = makeDirs(parent, mode);
    if (made === undefined) throw err;
    mkdirSync(dir, { mode });
    return made;
  }
}
