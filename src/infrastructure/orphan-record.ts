import { mkdirSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { groupAlive } from './process-group';

/** Environment variable set on every vLLM launch; its value identifies the launch. */
export const INSTANCE_ENV = 'TIDE_VLLM_INSTANCE';

/**
 * The tide-vllm process that supervises a launch. A pid alone could be reused by another process
 * after ours died; its start time (in clock ticks since boot) tells the two apart.
 */
export interface Owner {
  pid: number;
  startTime: string | null;
}

interface Recorded {
  pgid: number;
  command: string;
  instance: string;
  startedAt: string;
  /** Absent in records written before owners were recorded: those count as orphans. */
  owner?: Owner;
}

/** A recorded vLLM process group that still runs. */
export interface RunningGroup {
  pgid: number;
  command: string;
  /** Pid of the live tide-vllm that supervises it; null when that one is gone (an orphan). */
  supervisor: number | null;
}

/**
 * Remembers the running vLLM process group on disk (vllm.state_dir), so that a tide-vllm killed
 * with SIGKILL does not leave an engine holding the GPU: the next start finds and stops it.
 */
export class OrphanRecord {
  private readonly file: string;

  /** @param owner the tide-vllm recorded as the supervisor of what `save` records: this process. */
  constructor(
    private readonly dir: string,
    port: number,
    private readonly owner: Owner = { pid: process.pid, startTime: processStartTime(process.pid) },
  ) {
    this.file = join(dir, `vllm-${port}.json`);
  }

  save(pgid: number, command: string, instance: string): void {
    mkdirSync(this.dir, { recursive: true });
    const record: Recorded = { pgid, command, instance, startedAt: new Date().toISOString(), owner: this.owner };
    writeFileSync(this.file, JSON.stringify(record) + '\n');
  }

  clear(pgid: number): void {
    if (this.read()?.pgid === pgid) rmSync(this.file, { force: true });
  }

  /**
   * The recorded group, if it still has a process that carries our launch marker. The marker
   * check keeps us from killing an unrelated group that reuses the number after a reboot.
   */
  findAlive(): RunningGroup | null {
    const record = this.read();
    if (!record) return null;
    if (groupAlive(record.pgid) && groupMembers(record.pgid).some((pid) => hasMarker(pid, record.instance))) {
      return { pgid: record.pgid, command: record.command, supervisor: ownerAlive(record.owner) ? record.owner.pid : null };
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

/** True while the recorded owner runs: the same pid, started at the same time, and no zombie. */
function ownerAlive(owner: Owner | undefined): owner is Owner {
  if (typeof owner?.pid !== 'number' || owner.startTime === null) return false;
  const fields = statFields(owner.pid);
  return fields !== null && fields[0] !== 'Z' && fields[19] === owner.startTime;
}

/**
 * The fields of /proc/<pid>/stat after the command name (Linux), which may hold spaces and
 * parentheses: [0] is field 3 (state), [2] field 5 (pgrp), [19] field 22 (starttime).
 * Null when the process is gone.
 */
function statFields(pid: number | string): string[] | null {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    return stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  } catch {
    return null;
  }
}

/** When `pid` started, in clock ticks since boot; null when it is gone. */
export function processStartTime(pid: number): string | null {
  return statFields(pid)?.[19] ?? null;
}

/** Pids whose process group is `pgid`, read from /proc (Linux). */
export function groupMembers(pgid: number): number[] {
  return readdirSync('/proc')
    .filter((entry) => /^\d+$/.test(entry) && Number(statFields(entry)?.[2]) === pgid)
    .map(Number);
}

function hasMarker(pid: number, instance: string): boolean {
  try {
    return readFileSync(`/proc/${pid}/environ`, 'utf8').split('\0').includes(`${INSTANCE_ENV}=${instance}`);
  } catch {
    return false;
  }
}
