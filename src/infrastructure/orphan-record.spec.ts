import { type ChildProcess, execFile, spawn, spawnSync } from 'node:child_process';
import { chmodSync, existsSync, mkdtempSync, readdirSync, statSync, utimesSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { INSTANCE_ENV, OrphanRecord, type Owner, processStartTime } from './orphan-record';

const PORT = 8000;
const groups: ChildProcess[] = [];

/** A process group standing in for a vLLM launch, carrying the launch marker `instance`. */
function launch(instance: string): number {
  const child = spawn('sleep', ['60'], { detached: true, stdio: 'ignore', env: { ...process.env, [INSTANCE_ENV]: instance } });
  groups.push(child);
  return child.pid as number;
}

afterEach(() => {
  for (const child of groups.splice(0)) {
    if (child.exitCode === null && child.signalCode === null) process.kill(-(child.pid as number), 'SIGKILL');
  }
});

function stateDir(): string {
  return mkdtempSync(join(tmpdir(), 'tide-orphans-'));
}

const file = (dir: string) => join(dir, `vllm-${PORT}.json`);
const gone = (): Owner => ({ pid: spawnSync('true').pid as number, startTime: '12345' }); // exited and reaped

describe('OrphanRecord', () => {
  it('refuses the claim of a second supervisor while the first lives, with or without a running vLLM', () => {
    const dir = stateDir();
    const first = new OrphanRecord(dir, PORT);
    expect(first.claim()).toEqual({ supervisor: null, orphans: [] });
    // Nothing runs yet (or asleep at level 3): the port is still held.
    expect(new OrphanRecord(dir, PORT).claim()).toEqual({ supervisor: process.pid, group: null });
    const pgid = launch('run-1');
    first.save(pgid, 'vllm', 'run-1');
    expect(new OrphanRecord(dir, PORT).claim()).toEqual({ supervisor: process.pid, group: { pgid, command: 'vllm' } });
    expect(first.claim()).toEqual({ supervisor: null, orphans: [{ pgid, command: 'vllm' }] }); // its own claim again
  });

  it('hands the groups of a supervisor that is gone to the next one, as orphans', () => {
    const dir = stateDir();
    const pgid = launch('run-1');
    new OrphanRecord(dir, PORT, gone()).save(pgid, 'vllm', 'run-1');
    const next = new OrphanRecord(dir, PORT);
    expect(next.claim()).toEqual({ supervisor: null, orphans: [{ pgid, command: 'vllm' }] });
    // Still recorded, now under the new supervisor, until it is told the group is stopped.
    expect(new OrphanRecord(dir, PORT).claim()).toEqual({ supervisor: process.pid, group: { pgid, command: 'vllm' } });
    next.clear(pgid);
    expect(new OrphanRecord(dir, PORT).claim()).toEqual({ supervisor: process.pid, group: null });
  });

  it('takes an owner pid now held by another process (another start time) for gone', () => {
    const dir = stateDir();
    const reused = { pid: process.pid, startTime: String(Number(processStartTime(process.pid)) + 1) };
    new OrphanRecord(dir, PORT, reused).claim();
    expect(new OrphanRecord(dir, PORT).claim().supervisor).toBeNull();
  });

  it('reads the one-group record of older versions (with or without an owner)', () => {
    const dir = stateDir();
    const pgid = launch('run-1');
    const old = { pgid, command: 'vllm', instance: 'run-1', startedAt: new Date().toISOString() };
    writeFileSync(file(dir), JSON.stringify(old));
    expect(new OrphanRecord(dir, PORT).claim()).toEqual({ supervisor: null, orphans: [{ pgid, command: 'vllm' }] });
    writeFileSync(file(dir), JSON.stringify({ ...old, owner: { pid: process.pid, startTime: processStartTime(process.pid) } }));
    expect(new OrphanRecord(dir, PORT).claim()).toEqual({ supervisor: process.pid, group: { pgid, command: 'vllm' } });
  });

  it("keeps its files this user's alone, and ignores a record that others can write (it could name anyone's group)", () => {
    const parent = stateDir();
    const dir = join(parent, 'state'); // made by the record
    const pgid = launch('run-1');
    new OrphanRecord(dir, PORT, gone()).save(pgid, 'vllm', 'run-1');
    expect(statSync(dir).mode & 0o777).toBe(0o700);
    expect(statSync(file(dir)).mode & 0o777).toBe(0o600);
    chmodSync(file(dir), 0o666); // as one planted by another user, or left open to them
    expect(new OrphanRecord(dir, PORT).claim()).toEqual({ supervisor: null, orphans: [] });
    // A directory that was there already (an older version's, a checkout's `state/`) is made private too…
    const existing = stateDir();
    chmodSync(existing, 0o755);
    new OrphanRecord(existing, PORT, gone()).save(pgid, 'vllm', 'run-1');
    expect(statSync(existing).mode & 0o777).toBe(0o700);
    // …but not a shared one (/tmp, a home): one that holds other files, or is sticky.
    const shared = stateDir();
    writeFileSync(join(shared, 'notes.txt'), 'x');
    const sticky = stateDir();
    for (const [dir, mode] of [[shared, 0o755], [sticky, 0o1777]] as const) {
      chmodSync(dir, mode);
      new OrphanRecord(dir, PORT, gone()).save(pgid, 'vllm', 'run-1');
      expect([dir, statSync(dir).mode & 0o7777]).toEqual([dir, mode]);
    }
  });

  it('takes a file that is not a record (null, a list, not JSON) for no record', () => {
    const dir = stateDir();
    for (const text of ['null', '[1]', '{"pgid":', '']) {
      writeFileSync(file(dir), text);
      expect(new OrphanRecord(dir, PORT).claim()).toEqual({ supervisor: null, orphans: [] });
    }
  });

  it('forgets groups without the launch marker (the number reused) or gone', () => {
    const dir = stateDir();
    const earlier = new OrphanRecord(dir, PORT, gone());
    earlier.save(launch('someone-else'), 'vllm', 'run-1');
    earlier.save(spawnSync('true').pid as number, 'vllm', 'run-2');
    expect(new OrphanRecord(dir, PORT).claim()).toEqual({ supervisor: null, orphans: [] });
  });

  it('keeps a group that outlived SIGKILL next to the one launched after it, and past the release', () => {
    const dir = stateDir();
    const record = new OrphanRecord(dir, PORT);
    record.claim();
    const survivor = launch('run-1');
    record.save(survivor, 'vllm', 'run-1');
    const next = launch('run-2');
    record.save(next, 'vllm', 'run-2');
    record.clear(next); // stopped; the survivor was not
    record.clear(next + 100_000); // not recorded: nothing changes
    record.release();
    expect(existsSync(file(dir))).toBe(true);
    expect(new OrphanRecord(dir, PORT).claim()).toEqual({ supervisor: null, orphans: [{ pgid: survivor, command: 'vllm' }] });
  });

  it('removes the record at release when nothing of its groups runs, and only a claimed record', async () => {
    const dir = stateDir();
    const record = new OrphanRecord(dir, PORT);
    record.claim();
    const pgid = launch('run-1');
    record.save(pgid, 'vllm', 'run-1');
    const exited = new Promise((resolve) => groups[groups.length - 1].once('exit', resolve));
    process.kill(-pgid, 'SIGKILL');
    await exited;
    record.release();
    expect(existsSync(file(dir))).toBe(false);
    // A supervisor that never claimed the port (it was refused) leaves the holder's record alone.
    const holder = new OrphanRecord(dir, PORT);
    holder.claim();
    const refused = new OrphanRecord(dir, PORT);
    expect(refused.claim().supervisor).toBe(process.pid);
    refused.release();
    expect(existsSync(file(dir))).toBe(true);
  });

  describe('the claim lock', () => {
    const lock = (dir: string) => `${file(dir)}.lock`;

    it('lets one of several tide-vllms starting in the same instant take the port', async () => {
      // Real processes (the built module), each spinning until the same instant, then claiming
      // and living on until all have: without the lock, two would read "nobody" and both take it.
      const dir = stateDir();
      const compiled = join(__dirname, '..', '..', 'dist', 'src', 'infrastructure', 'orphan-record.js');
      for (let round = 0; round < 4; round++) {
        // The last round starts from a lock left by a claim killed while holding it: all break it at once.
        if (round === 3) writeFileSync(lock(dir), JSON.stringify(gone()));
        const at = Date.now() + 700;
        const script = `const { OrphanRecord } = require(${JSON.stringify(compiled)});
          while (Date.now() < ${at});
          const claim = new OrphanRecord(${JSON.stringify(dir)}, ${PORT}).claim();
          process.stdout.write(JSON.stringify(claim));
          setTimeout(() => {}, ${at + 1000} - Date.now());`;
        const claims = await Promise.all(
          Array.from({ length: 4 }, () => new Promise<string>((resolve, reject) => execFile(process.execPath, ['-e', script], { timeout: 10_000 }, (err, out) => (err ? reject(err) : resolve(out))))),
        );
        const taken = claims.map((out) => JSON.parse(out) as { supervisor: number | null }).filter((c) => c.supervisor === null);
        expect(taken).toHaveLength(1);
        expect(readdirSync(dir)).toEqual([`vllm-${PORT}.json`]); // no lock left, nor a breaker's
      }
    });

    it('waits for a claim in progress, and fails naming the lock when it is held too long', () => {
      const dir = stateDir();
      writeFileSync(lock(dir), JSON.stringify({ pid: process.pid, startTime: processStartTime(process.pid), claim: 'another' }));
      expect(() => new OrphanRecord(dir, PORT).claim()).toThrow(`${lock(dir)} has been held by tide-vllm pid ${process.pid} for more than 2 s`);
      expect(existsSync(file(dir))).toBe(false); // nothing claimed
    });

    it('takes over a lock whose holder is gone, also one that exits during the wait', () => {
      const dir = stateDir();
      writeFileSync(lock(dir), JSON.stringify(gone()));
      expect(new OrphanRecord(dir, PORT).claim()).toEqual({ supervisor: null, orphans: [] });
      expect(existsSync(lock(dir))).toBe(false);

      const other = stateDir();
      const holder = spawn('sleep', ['0.3'], { stdio: 'ignore' });
      writeFileSync(lock(other), JSON.stringify({ pid: holder.pid, startTime: processStartTime(holder.pid as number) }));
      expect(new OrphanRecord(other, PORT).claim()).toEqual({ supervisor: null, orphans: [] });
      expect(readdirSync(other)).toEqual([`vllm-${PORT}.json`]); // no lock left, nor a moved one
    });

    it('removes the breaker of a claim killed while breaking a stale lock, once it is old, and takes the port', () => {
      const dir = stateDir();
      const old = new Date(Date.now() - 60_000);
      writeFileSync(lock(dir), JSON.stringify(gone()));
      writeFileSync(`${lock(dir)}.break`, '');
      utimesSync(`${lock(dir)}.break`, old, old);
      expect(new OrphanRecord(dir, PORT).claim()).toEqual({ supervisor: null, orphans: [] });
      expect(readdirSync(dir)).toEqual([`vllm-${PORT}.json`]);
    });

    it('takes over a nameless lock (its maker killed before writing it) once it is old', () => {
      const dir = stateDir();
      writeFileSync(lock(dir), '');
      const old = new Date(Date.now() - 60_000);
      utimesSync(lock(dir), old, old);
      expect(new OrphanRecord(dir, PORT).claim()).toEqual({ supervisor: null, orphans: [] });
      expect(existsSync(lock(dir))).toBe(false);
    });
  });
});
