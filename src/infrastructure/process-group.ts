import { readFileSync } from 'node:fs';

/** How often the group is polled while waiting for it to die. */
const POLL_MS = 50;
/** After SIGKILL the kernel needs a moment to tear processes down; past this something is wrong. */
const KILL_WAIT_MS = 5_000;

/** True while any process (zombies included) is in process group `pgid`. */
export function groupAlive(pgid: number): boolean {
  try {
    process.kill(-pgid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/** Sends `signal` to every process of the group; false when the group is already gone. */
export function signalGroup(pgid: number, signal: NodeJS.Signals): boolean {
  try {
    process.kill(-pgid, signal);
    return true;
  } catch {
    return false;
  }
}

async function waitGroupGone(pgid: number, timeoutMs: number): Promise<boolean> {
  const deadline = Date.now() + timeoutMs;
  while (groupAlive(pgid)) {
    if (Date.now() >= deadline) return false;
    await new Promise((resolve) => setTimeout(resolve, POLL_MS));
  }
  return true;
}

interface TerminateResult {
  /** True when SIGTERM was not enough and the group had to be SIGKILLed. */
  killed: boolean;
  /** False only if processes survived even SIGKILL (e.g. stuck in uninterruptible I/O). */
  gone: boolean;
}

/**
 * Stops a whole process group: SIGTERM, up to `graceMs` for it to exit, then SIGKILL.
 * The group matters: vLLM's EngineCore outlives an API server that is killed alone
 * and keeps holding the GPU.
 */
export async function terminateGroup(pgid: number, graceMs: number): Promise<TerminateResult> {
  if (!signalGroup(pgid, 'SIGTERM')) return { killed: false, gone: true };
  if (await waitGroupGone(pgid, graceMs)) return { killed: false, gone: true };
  signalGroup(pgid, 'SIGKILL');
  return { killed: true, gone: await waitGroupGone(pgid, KILL_WAIT_MS) };
}

/**
 * The fields of /proc/<pid>/stat after the command name (Linux), which may hold spaces and
 * parentheses: [0] is field 3 (state), [1] field 4 (ppid), [2] field 5 (pgrp), [19] field 22
 * (starttime). Null when the process is gone.
 */
export function statFields(pid: number | string): string[] | null {
  return procStat(pid)?.fields ?? null;
}

/** /proc/<pid>/stat read once: the command name (field 2, between its parentheses) and statFields. */
function procStat(pid: number | string): { command: string; fields: string[] } | null {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    const close = stat.lastIndexOf(')');
    return { command: stat.slice(stat.indexOf('(') + 1, close), fields: stat.slice(close + 2).split(' ') };
  } catch {
    return null;
  }
}

/** Shells that may stand between npm and node (npx runs `sh -c '<bin>' <args>`, and that shell does not exec). */
const SHELLS = new Set(['sh', 'dash', 'bash', 'ash', 'zsh', 'ksh', 'mksh', 'busybox']);

/**
 * A test, made now, of whether the process that launched this one is still there: this one's
 * parent, or, when the parent is a shell, the shell's parent too (npm, under npx). A process
 * whose parent dies is re-parented (to init or a subreaper), so a changed parent pid says it,
 * without the pid-reuse race of polling a pid.
 */
export function launcherWatch(): () => boolean {
  const parent = process.ppid;
  const stat = procStat(parent);
  const grandparent = stat !== null && SHELLS.has(stat.command) ? stat.fields[1] : null;
  return () => process.ppid === parent && (grandparent === null || statFields(parent)?.[1] === grandparent);
}
