import { mkdirSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { groupAlive } from './process-group';

/** Environment variable set on every vLLM launch; its value identifies the launch. */
export const INSTANCE_ENV = 'TIDE_VLLM_INSTANCE';

interface Recorded {
  pgid: number;
  command: string;
  instance: string;
  startedAt: string;
}

/**
 * Remembers the running vLLM process group on disk (vllm.state_dir), so that a tide-vllm killed
 * with SIGKILL does not leave an engine holding the GPU: the next start finds and stops it.
 */
export class OrphanRecord {
  private readonly file: string;

  constructor(
    private readonly dir: string,
    port: number,
  ) {
    this.file = join(dir, `vllm-${port}.json`);
  }

  save(pgid: number, command: string, instance: string): void {
    mkdirSync(this.dir, { recursive: true });
    const record: Recorded = { pgid, command, instance, startedAt: new Date().toISOString() };
    writeFileSync(this.file, JSON.stringify(record) + '\n');
  }

  clear(pgid: number): void {
    if (this.read()?.pgid === pgid) rmSync(this.file, { force: true });
  }

  /**
   * The recorded group, if it still has a process that carries our launch marker. The marker
   * check keeps us from killing an unrelated group that reuses the number after a reboot.
   */
  findAlive(): Recorded | null {
    const record = this.read();
    if (!record) return null;
    if (groupAlive(record.pgid) && groupMembers(record.pgid).some((pid) => hasMarker(pid, record.instance))) {
      return record;
    }
    rmSync(this.file, { force: true });
    return null;
  }

  private read(): Recorded | null {
    try {
      const parsed = JSON.parse(readFileSync(this.file, 'utf8')) as Partial<Recorded>;
      if (typeof parsed.pgid !== 'number' || typeof parsed.instance !== 'string') return null;
      return parsed as Recorded;
    } catch {
      return null;
    }
  }
}

/** Pids whose process group is `pgid`, read from /proc (Linux). */
export function groupMembers(pgid: number): number[] {
  const pids: number[] = [];
  for (const entry of readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      const stat = readFileSync(`/proc/${entry}/stat`, 'utf8');
      // Fields after the parenthesised command name: state ppid pgrp ...
      const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
      if (Number(fields[2]) === pgid) pids.push(Number(entry));
    } catch {
      // the process ended while we looked
    }
  }
  return pids;
}

function hasMarker(pid: number, instance: string): boolean {
  try {
    return readFileSync(`/proc/${pid}/environ`, 'utf8').split('\0').includes(`${INSTANCE_ENV}=${instance}`);
  } catch {
    return false;
  }
}
