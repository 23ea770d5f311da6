// Reads another process's CPU time and memory from /proc (Linux only). A process's own
// process.cpuUsage() cannot be read from outside, so the load generator samples these around
// the measured window.
import { readFileSync, readdirSync } from 'node:fs';

/** Clock ticks per second of utime/stime in /proc/<pid>/stat (sysconf(_SC_CLK_TCK); 100 on Linux). */
export const CLOCK_TICKS_PER_SECOND = 100;

export interface CpuTicks {
  user: number;
  system: number;
}

/** utime and stime of each pid summed, in clock ticks; a pid that is gone counts 0. */
export function cpuTicks(pids: readonly number[]): CpuTicks {
  const ticks = { user: 0, system: 0 };
  for (const pid of pids) {
    try {
      const stat = readFileSync(`/proc/${pid}/stat`, 'latin1');
      // Fields after "(comm)": state is field 3, utime 14 and stime 15.
      const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
      ticks.user += Number(fields[11]);
      ticks.system += Number(fields[12]);
    } catch {
      // exited
    }
  }
  return ticks;
}

/** Busy time of the whole machine (all cores, /proc/stat: everything but idle and iowait), in clock ticks. */
export function machineBusyTicks(): number {
  const line = readFileSync('/proc/stat', 'latin1').split('\n', 1)[0];
  const [user, nice, system, , , irq, softirq, steal] = line.trim().split(/\s+/).slice(1).map(Number);
  return user + nice + system + irq + softirq + (steal || 0);
}

export interface Memory {
  /** Resident set size now, kB. */
  rssKb: number;
  /** Peak resident set size since the process started (VmHWM), kB. */
  hwmKb: number;
}

/** VmRSS and VmHWM of each pid summed, in kB. */
export function memory(pids: readonly number[]): Memory {
  const out = { rssKb: 0, hwmKb: 0 };
  for (const pid of pids) {
    try {
      const status = readFileSync(`/proc/${pid}/status`, 'latin1');
      out.rssKb += Number(/^VmRSS:\s+(\d+)/m.exec(status)?.[1] ?? 0);
      out.hwmKb += Number(/^VmHWM:\s+(\d+)/m.exec(status)?.[1] ?? 0);
    } catch {
      // exited
    }
  }
  return out;
}

/** The direct children of `pid` (nginx's workers under its master). */
export function childrenOf(pid: number): number[] {
  const children: number[] = [];
  for (const entry of readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      const stat = readFileSync(`/proc/${entry}/stat`, 'latin1');
      const ppid = Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1]);
      if (ppid === pid) children.push(Number(entry));
    } catch {
      // exited while we looked
    }
  }
  return children;
}

/** The first "model name" of /proc/cpuinfo. */
export function cpuModel(): string {
  try {
    return /^model name\s*:\s*(.+)$/m.exec(readFileSync('/proc/cpuinfo', 'utf8'))?.[1]?.trim() ?? 'unknown';
  } catch {
    return 'unknown';
  }
}
