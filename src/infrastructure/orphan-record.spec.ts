import { type ChildProcess, spawn, spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { INSTANCE_ENV, OrphanRecord, processStartTime } from './orphan-record';

const PORT = 8000;
const groups: ChildProcess[] = [];

/** A process group standing in for a vLLM launch, carrying the launch marker `instance`. */
function launch(instance: string): number {
  const child = spawn('sleep', ['60'], { detached: true, stdio: 'ignore', env: { ...process.env, [INSTANCE_ENV]: instance } });
  groups.push(child);
  return child.pid as number;
}

afterEach(() => {
  for (const child of groups.splice(0)) process.kill(-(child.pid as number), 'SIGKILL');
});

function stateDir(): string {
  return mkdtempSync(join(tmpdir(), 'tide-orphans-'));
}

describe('OrphanRecord', () => {
  it('reports a running group recorded by this (live) process as supervised by it, not as an orphan', () => {
    const dir = stateDir();
    const pgid = launch('run-1');
    new OrphanRecord(dir, PORT).save(pgid, 'vllm', 'run-1');
    expect(new OrphanRecord(dir, PORT).findAlive()).toEqual({ pgid, command: 'vllm', supervisor: process.pid });
  });

  it('reports a running group whose tide-vllm is gone as an orphan', () => {
    const dir = stateDir();
    const pgid = launch('run-1');
    const gone = spawnSync('true').pid; // exited and reaped
    new OrphanRecord(dir, PORT, { pid: gone, startTime: '12345' }).save(pgid, 'vllm', 'run-1');
    expect(new OrphanRecord(dir, PORT).findAlive()).toEqual({ pgid, command: 'vllm', supervisor: null });
  });

  it('takes an owner pid now held by another process (another start time) for gone', () => {
    const dir = stateDir();
    const pgid = launch('run-1');
    const reused = { pid: process.pid, startTime: String(Number(processStartTime(process.pid)) + 1) };
    new OrphanRecord(dir, PORT, reused).save(pgid, 'vllm', 'run-1');
    expect(new OrphanRecord(dir, PORT).findAlive()?.supervisor).toBeNull();
  });

  it('takes a record written before owners were recorded for an orphan', () => {
    const dir = stateDir();
    const pgid = launch('run-1');
    const old = { pgid, command: 'vllm', instance: 'run-1', startedAt: new Date().toISOString() };
    writeFileSync(join(dir, `vllm-${PORT}.json`), JSON.stringify(old));
    expect(new OrphanRecord(dir, PORT).findAlive()).toEqual({ pgid, command: 'vllm', supervisor: null });
  });

  it('forgets a group without the launch marker (its number reused) or gone, whoever recorded it', () => {
    const dir = stateDir();
    const record = new OrphanRecord(dir, PORT);
    record.save(launch('someone-else'), 'vllm', 'run-1');
    expect(record.findAlive()).toBeNull();
    expect(existsSync(join(dir, `vllm-${PORT}.json`))).toBe(false);
    record.save(spawnSync('true').pid, 'vllm', 'run-1');
    expect(record.findAlive()).toBeNull();
  });

  it('clears only the record of the group it is told about', () => {
    const dir = stateDir();
    const record = new OrphanRecord(dir, PORT);
    const pgid = launch('run-1');
    record.save(pgid, 'vllm', 'run-1');
    record.clear(pgid + 1);
    expect(record.findAlive()?.pgid).toBe(pgid);
    record.clear(pgid);
    expect(record.findAlive()).toBeNull();
  });
});
