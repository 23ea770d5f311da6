import { randomBytes } from 'node:crypto';
import { type Stats, chmodSync, readdirSync, readFileSync, renameSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { Logger } from '@nestjs/common';
import { makeDirs } from './make-dirs';
import { groupAlive, statFields } from './process-group';

/** Environment variable set on every vLLM launch; its value identifies the launch. */
export const INSTANCE_ENV = 'TIDE_VLLM_INSTANCE';

/**
 * How long a claim waits for another one on the same port to finish (each holds the lock for
 * the milliseconds of one read and one write), and how old a lock without a holder's name must be
 * to count as left by a process killed while making it.
 */
const LOCK_WAIT_MS = 2_000;
/** Pause between looks at a held lock. */
const LOCK_POLL_MS = 5;

/**
 * The tide-vllm process that supervises a launch. A pid alone could be reused by another process
 * after ours died; its start time (in clock ticks since boot) tells the two apart. `claim` tells
 * apart two supervisors in one process (tests run several); absent in records of older versions.
 */
export interface Owner {
  pid: number;
  startTime: string | null;
  claim?: string;
}

interface Group {
  pgid: number;
  command: string;
  instance: string;
  startedAt: string;
}

interface Recorded {
  /** Absent in records written before owners were recorded: their groups count as orphans. */
  owner?: Owner;
  groups: Group[];
}

/** A recorded vLLM process group that still runs. */
export interface RunningGroup {
  pgid: number;
  command: string;
}

/** What a start found in the record of its port. */
export type Claim =
  /** Another live tide-vllm holds the port, with its vLLM running (`group`) or not (asleep at level 3, between restarts). */
  | { supervisor: number; group: RunningGroup | null }
  /** The port is ours now; these groups were left running by a tide-vllm that is gone. */
  | { supervisor: null; orphans: RunningGroup[] };

/**
 * The claim of a tide-vllm on its vllm.port, and the vLLM process groups it runs there, on disk
 * (vllm.state_dir). The claim lasts from the start to the stop of the service, through a level-3
 * sleep and restarts, when no vLLM runs: a second tide-vllm on the same port is refused all that
 * time. A tide-vllm killed with SIGKILL leaves its groups recorded, so the next start finds and
 * stops them; a group that survived SIGKILL stays recorded next to the ones launched after it.
 */
export class OrphanRecord {
  private readonly file: string;
  private readonly owner: Owner;
  private claimed = false;

  /** @param owner the tide-vllm recorded as the supervisor: by default this process, with a claim of its own. */
  constructor(
    private readonly dir: string,
    port: number,
    owner: Owner = { pid: process.pid, startTime: processStartTime(process.pid) },
  ) {
    this.file = join(dir, `vllm-${port}.json`);
    this.owner = { ...owner, claim: owner.claim ?? randomBytes(6).toString('hex') };
  }

  /** The ports that have a record in `dir` (none when it cannot be read). */
  static recordedPorts(dir: string): number[] {
    let names: string[];
    try {
      names = readdirSync(dir);
    } catch {
      return [];
    }
    return names.flatMap((name) => /^vllm-(\d+)\.json$/.exec(name)?.[1] ?? []).map(Number);
  }

  /**
   * Takes the port for this supervisor, unless another live one holds it. Groups left by a gone
   * supervisor stay recorded (now under this one) until `clear` is told they are stopped.
   */
  claim(): Claim {
    return this.locked(() => this.claimLocked());
  }

  private claimLocked(): Claim {
    const { owner, groups } = this.read();
    const alive = groups.filter(isOurs);
    if (owner && !sameOwner(owner, this.owner) && ownerAlive(owner)) {
      return { supervisor: owner.pid, group: alive.length ? running(alive[alive.length - 1]) : null };
    }
    this.write(alive);
    this.claimed = true;
    return { supervisor: null, orphans: alive.map(running) };
  }

  /** Records a group launched by this supervisor. */
  save(pgid: number, command: string, instance: string): void {
    this.write([...this.read().groups.filter((g) => g.pgid !== pgid), { pgid, command, instance, startedAt: new Date().toISOString() }]);
  }

  /** Forgets a group that is gone. */
  clear(pgid: number): void {
    const { groups } = this.read();
    if (groups.some((g) => g.pgid === pgid)) this.write(groups.filter((g) => g.pgid !== pgid));
  }

  /** Gives the port up (the service stops): the record goes, unless groups that outlived SIGKILL are still in it (then as orphans). */
  release(): void {
    if (!this.claimed) return;
    this.claimed = false;
    const { owner, groups } = this.read();
    if (owner && !sameOwner(owner, this.owner)) return; // taken over meanwhile (the file edited by hand)
    const alive = groups.filter(isOurs);
    if (alive.length === 0) rmSync(this.file, { force: true });
    else this.write(alive, null); // supervised by nobody now: orphans for the next start
  }

  /**
   * Runs `fn` holding the record's lock: a file made with O_EXCL that names its holder. Two
   * tide-vllms started in the same instant would otherwise both read "nobody holds the port"
   * and both take it. A lock whose holder is gone (killed while holding it) is taken over.
   */
  private locked<T>(fn: () => T): T {
    makePrivateDir(this.dir);
    const lock = `${this.file}.lock`;
    const deadline = performance.now() + LOCK_WAIT_MS;
    for (;;) {
      try {
        writeFileSync(lock, JSON.stringify(this.owner), EXCLUSIVE_PRIVATE_FILE);
        break;
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
      }
      const held = readLock(lock);
      if (held === null) continue; // released meanwhile
      if (held.stale) {
        if (!breakLock(lock, held)) sleepSync(LOCK_POLL_MS); // another claim is breaking it
        continue;
      }
      if (performance.now() > deadline) {
        const holder = held.owner ? `tide-vllm pid ${held.owner.pid}` : 'a process';
        throw new Error(`${lock} has been held by ${holder} for more than ${LOCK_WAIT_MS / 1000} s (it should take milliseconds)`);
      }
      sleepSync(LOCK_POLL_MS);
    }
    try {
      return fn();
    } finally {
      rmSync(lock, { force: true });
    }
  }

  private write(groups: Group[], owner: Owner | null = this.owner): void {
    makePrivateDir(this.dir);
    const record: Recorded = { ...(owner && { owner }), groups };
    // A name nobody can guess, made with O_EXCL: a link planted there is never followed.
    const temp = `${this.file}.${randomBytes(6).toString('hex')}.tmp`;
    try {
      writeFileSync(temp, JSON.stringify(record) + '\n', EXCLUSIVE_PRIVATE_FILE);
      renameSync(temp, this.file); // never half a record for another start to read
    } catch (err) {
      rmSync(temp, { force: true });
      throw err;
    }
  }

  private read(): Recorded {
    let parsed: Partial<Recorded> & Partial<Group>;
    try {
      if (!trusted(this.file)) return { groups: [] };
      parsed = JSON.parse(readFileSync(this.file, 'utf8')) as Partial<Recorded> & Partial<Group>;
    } catch {
      return { groups: [] };
    }
    if (typeof parsed !== 'object' || parsed === null) return { groups: [] }; // not a record of ours
    const owner = parsed.owner;
    // Older versions recorded one group at the top level.
    const groups = Array.isArray(parsed.groups) ? parsed.groups : [parsed as Group];
    return { owner, groups: groups.filter((g) => typeof g?.pgid === 'number' && typeof g.instance === 'string') };
  }
}

/** The state directory and its files are this user's alone: a record names process groups to stop. */
const PRIVATE_DIR_MODE = 0o700;
const EXCLUSIVE_PRIVATE_FILE = { flag: 'wx', mode: 0o600 } as const;
const untrustedWarned = new Set<string>();

/** What a state directory holds: records, their locks and temp files. */
const STATE_FILE = /^vllm-\d+\.json(\.lock(\.break)?|\.[0-9a-f]+\.tmp)?$/;

/**
 * Makes the state directory, or makes one that exists private too — only when it holds nothing
 * but state files (an older version's, a checkout's `state/`): a shared directory given as
 * `vllm.state_dir` (/tmp, a home) keeps its mode, with a warning.
 */
function makePrivateDir(dir: string): void {
  if (makeDirs(dir, PRIVATE_DIR_MODE) !== undefined) return; // made now, private; the mode applies only to what it makes
  const stat = statSync(dir);
  if ((stat.mode & 0o077) === 0) return;
  let problem: string;
  if (stat.uid !== process.geteuid?.() || (stat.mode & 0o1000) !== 0 || !readdirSync(dir).every((name) => STATE_FILE.test(name))) {
    problem = 'it is shared (not this user\'s, sticky, or holding other files)';
  } else {
    try {
      return chmodSync(dir, PRIVATE_DIR_MODE);
    } catch (err) {
      problem = (err as Error).message;
    }
  }
  if (!untrustedWarned.has(dir)) {
    untrustedWarned.add(dir);
    new Logger('OrphanRecord').warn(`left ${dir} as it is (${problem}): others can list its records; give vllm.state_dir a directory of its own`);
  }
}

/**
 * Whether a record may be acted on: a file of this user's that nobody else can write. One that
 * another user could have written (or planted) might name any process group: it is ignored.
 * Throws ENOENT for no record.
 */
function trusted(file: string): boolean {
  const stat = statSync(file);
  const euid = process.geteuid?.();
  if ((euid === undefined || stat.uid === euid) && (stat.mode & 0o022) === 0) return true;
  if (!untrustedWarned.has(file)) {
    untrustedWarned.add(file);
    new Logger('OrphanRecord').warn(`ignoring ${file}: it is not this user's, or others can write it (vllm.state_dir must be this user's alone)`);
  }
  return false;
}

interface HeldLock {
  text: string;
  owner: Owner | null;
  /** Its holder is gone, or it never got a holder's name (its maker was killed in between). */
  stale: boolean;
  /** Which file it is: a lock made since (by a claim that broke this one first) differs in one of them. */
  ino: number;
  mtimeMs: number;
}

/** The lock as it is now; null when it is gone. */
function readLock(lock: string): HeldLock | null {
  let text: string;
  let stats: Stats;
  try {
    stats = statSync(lock);
    text = readFileSync(lock, 'utf8');
  } catch {
    return null;
  }
  let owner: Owner | null = null;
  try {
    const parsed = JSON.parse(text) as Owner;
    if (typeof parsed?.pid === 'number') owner = parsed;
  } catch {
    // being written (made, not yet filled), or not ours
  }
  const stale = owner ? !ownerAlive(owner) : Date.now() - stats.mtimeMs > LOCK_WAIT_MS;
  return { text, owner, stale, ino: stats.ino, mtimeMs: stats.mtimeMs };
}

/**
 * Removes a stale lock, unless it is no longer the one judged stale: several claims may judge it
 * so at once, and the first to break it may have made its own since. Breaking is itself done
 * under a lock (`.break`, O_EXCL): its holder alone may remove the lock, after checking that it
 * is still the same file with the same text. A `.break` left by a claim killed while breaking is
 * removed once it is old. False when another claim is breaking it.
 */
function breakLock(lock: string, stale: HeldLock): boolean {
  const breaker = `${lock}.break`;
  try {
    writeFileSync(breaker, '', EXCLUSIVE_PRIVATE_FILE);
  } catch {
    if (readLock(breaker)?.stale) rmSync(breaker, { force: true });
    return false;
  }
  try {
    const now = readLock(lock);
    if (now !== null && now.ino === stale.ino && now.mtimeMs === stale.mtimeMs && now.text === stale.text) rmSync(lock);
    return true;
  } finally {
    rmSync(breaker, { force: true });
  }
}

/** Blocks the thread for `ms` (a claim is made once, at the start, before anything else runs). */
function sleepSync(ms: number): void {
  Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, ms);
}

function running(group: Group): RunningGroup {
  return { pgid: group.pgid, command: group.command };
}

/**
 * The group still has a process that carries its launch marker. The marker check keeps us from
 * killing an unrelated group that reuses the number after a reboot.
 */
function isOurs(group: Group): boolean {
  return groupAlive(group.pgid) && groupMembers(group.pgid).some((pid) => hasMarker(pid, group.instance));
}

function sameOwner(a: Owner, b: Owner): boolean {
  return a.pid === b.pid && a.startTime === b.startTime && a.claim === b.claim;
}

/** True while the recorded owner runs: the same pid, started at the same time, and no zombie. */
function ownerAlive(owner: Owner | undefined): owner is Owner {
  if (typeof owner?.pid !== 'number' || owner.startTime === null) return false;
  const fields = statFields(owner.pid);
  return fields !== null && fields[0] !== 'Z' && fields[19] === owner.startTime;
}

/** When `pid` started, in clock ticks since boot; null when it is gone. */
export function processStartTime(pid: number): string | null {
  return statFields(pid)?.[19] ?? null;
}

/** Pids whose process group is `pgid`, read from /proc (Linux). */
function groupMembers(pgid: number): number[] {
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
