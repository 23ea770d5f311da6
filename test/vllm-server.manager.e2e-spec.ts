/**
 * The real VLLMServerManager against the vLLM simulator as a real child process: startup,
 * failures during startup, stopping the whole process group, crash recovery, sleep and wake.
 */
import { spawnSync } from 'node:child_process';
import { chmodSync, existsSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { createServer, type Server } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Logger } from '@nestjs/common';
import { parseConfig } from '../src/config/config.loader';
import { AppError } from '../src/domain/app-error';
import { vllmBaseUrl } from '../src/infrastructure/infrastructure.module';
import { INSTANCE_ENV, OrphanRecord } from '../src/infrastructure/orphan-record';
import * as processGroup from '../src/infrastructure/process-group';
import { VLLMServerManager } from '../src/infrastructure/vllm-server.manager';
import { VLLMClient } from '../src/infrastructure/vllm.client';
import {
  cmdline,
  expectNoProcessLeft,
  freePort,
  groupPids,
  killAll,
  pidAlive,
  probeConnect,
  requirePid,
  signalGroup,
  simMain,
  sleep,
  startSim,
  waitUntil,
} from './harness';

Logger.overrideLogger(false);

const managers: VLLMServerManager[] = [];

interface Setup {
  manager: VLLMServerManager;
  client: VLLMClient;
  port: number;
}

async function setup(vllm: Record<string, unknown> = {}, env: Record<string, string> = {}): Promise<Setup> {
  const port = await freePort();
  const config = parseConfig({
    vllm: {
      command: [process.execPath, simMain, 'serve'],
      model_path: 'sim-model',
      port,
      startup_timeout: 20,
      stop_timeout: 2,
      health_interval: 0.2,
      health_timeout: 1,
      state_dir: mkdtempSync(join(tmpdir(), 'tide-state-')),
      log_file: '',
      env: { VLLM_SIM_LOAD_SECONDS: '0.2', ...env },
      ...vllm,
    },
  }).vllm;
  const client = new VLLMClient(vllmBaseUrl(config), 5_000);
  const manager = new VLLMServerManager(config, client);
  managers.push(manager);
  return { manager, client, port };
}

async function startupError(manager: VLLMServerManager): Promise<AppError> {
  try {
    await manager.start();
  } catch (err) {
    expect(err).toMatchObject({ code: 'VLLM_START_FAILED' });
    return err as AppError;
  }
  throw new Error('start() should have failed');
}

afterEach(async () => {
  jest.restoreAllMocks();
  await Promise.all(managers.splice(0).map((m) => m.stop()));
});
afterAll(killAll);

/** The owner of a record written by an earlier tide-vllm that is gone (exited, reaped). */
function goneOwner(): { pid: number; startTime: string } {
  return { pid: spawnSync('true').pid, startTime: '1' };
}

async function isSleeping(client: VLLMClient): Promise<boolean> {
  return (await client.getJson<{ is_sleeping: boolean }>('/is_sleeping')).is_sleeping;
}

describe('VLLMServerManager with the simulator', () => {
  it('starts vLLM in its own process group and is ready once the model is listed', async () => {
    const { manager, client, port } = await setup();
    await manager.start();
    const s = manager.snapshot();
    expect(s.state).toBe('ready');
    expect(s.argv).toEqual(expect.arrayContaining(['serve', 'sim-model', '--served-model-name', 'sim-model', '--port', String(port)]));
    expect(await client.listModels()).toEqual(['sim-model']);
    const pid = s.pid as number;
    // The leader and the simulated EngineCore share the group the manager will signal.
    await waitUntil(() => groupPids(pid).length >= 2, 5_000, 25, 'engine child');
    expect(groupPids(pid).map(cmdline).some((c) => c.includes('EngineCore'))).toBe(true);
  });

  it('does not pass on a VLLM_API_KEY from its own environment, which would lock it out of vLLM', async () => {
    const saved = process.env.VLLM_API_KEY;
    process.env.VLLM_API_KEY = 'left-over';
    try {
      const { manager, client } = await setup({ startup_timeout: 5 });
      await manager.start(); // vLLM would require the key on /v1/models, the readiness probe
      expect(await client.listModels()).toEqual(['sim-model']);
    } finally {
      if (saved === undefined) delete process.env.VLLM_API_KEY;
      else process.env.VLLM_API_KEY = saved;
    }
  });

  it('warns when auto-started vLLM listens beyond loopback', async () => {
    const warnings: string[] = [];
    const spy = jest.spyOn(Logger.prototype, 'warn').mockImplementation((message: unknown) => void warnings.push(String(message)));
    try {
      const { manager } = await setup({ host: '0.0.0.0' });
      await manager.start();
      expect(warnings.some((w) => w.includes('vLLM will listen on 0.0.0.0 (vllm.host), not loopback'))).toBe(true);
      const quiet = await setup();
      warnings.length = 0;
      await quiet.manager.start();
      expect(warnings.filter((w) => w.includes('not loopback'))).toEqual([]);
    } finally {
      spy.mockRestore();
    }
  });

  it('stop leaves no process of the group, EngineCore included, and is idempotent', async () => {
    const { manager } = await setup();
    await manager.start();
    const pid = manager.snapshot().pid as number;
    await Promise.all([manager.stop(), manager.stop()]);
    expect(manager.currentState).toBe('stopped');
    await expectNoProcessLeft(pid, 1_000);
  });

  it('a crash during load fails the start with the exit code and the output tail', async () => {
    const { manager } = await setup({}, { VLLM_SIM_CRASH_ON_LOAD: '1' });
    const err = await startupError(manager);
    expect(err.message).toMatch(/exited with code 1 before serving model "sim-model"/);
    expect(err.message).toContain('Engine core initialization failed');
    expect(manager.currentState).toBe('failed');
  });

  it('a startup timeout stops the process group and says so', async () => {
    const { manager } = await setup({ startup_timeout: 1 }, { VLLM_SIM_LOAD_SECONDS: '30' });
    const started = manager.start();
    await waitUntil(() => manager.snapshot().pid !== null, 5_000);
    const pid = manager.snapshot().pid as number;
    const err = await startupError(manager);
    await expect(started).rejects.toBe(err); // concurrent callers share the one start
    expect(err.message).toMatch(/did not serve model "sim-model" within 1 s \(vllm.startup_timeout\); its process group was stopped/);
    await expectNoProcessLeft(pid, 1_000);
  });

  it("vLLM's own ready timeout (VLLM_ENGINE_READY_TIMEOUT_S in vllm.env) fails the start with its TimeoutError, and the EngineCore it leaves loading is stopped", async () => {
    const { manager } = await setup({}, { VLLM_SIM_LOAD_SECONDS: '30', VLLM_ENGINE_READY_TIMEOUT_S: '1' });
    const started = manager.start();
    await waitUntil(() => manager.snapshot().pid !== null, 5_000);
    const pid = manager.snapshot().pid as number;
    const err = await startupError(manager);
    await expect(started).rejects.toBe(err);
    expect(err.message).toMatch(/exited with code 1 before serving model "sim-model"/);
    expect(err.message).toContain('TimeoutError: Timed out waiting for engine core processes to start');
    await expectNoProcessLeft(pid, 2_000); // the group: the EngineCore that outlived its API server included
  });

  it('a launcher that is not on PATH (or a path that does not exist) gets a message saying how to fix it', async () => {
    const { manager } = await setup({ command: ['tide-no-such-vllm', 'serve'] });
    const err = await startupError(manager);
    expect(err.message).toContain('"tide-no-such-vllm" was not found on PATH');
    expect(err.message).toContain('Install vLLM');
    expect(err.message).toContain('vllm.command');
    expect(err.message).toContain('vllm.auto_start: false');
    const absolute = await setup({ command: ['/nonexistent/bin/vllm', 'serve'] });
    expect((await startupError(absolute.manager)).message).toContain('the launcher "/nonexistent/bin/vllm" does not exist.');
  });

  it('refuses to start when the port is taken, or the address is not this machine\'s, spawning nothing', async () => {
    const { manager, port } = await setup();
    const squatter: Server = createServer();
    await new Promise<void>((resolve) => squatter.listen(port, '127.0.0.1', resolve));
    try {
      const err = await startupError(manager);
      expect(err.message).toContain(`127.0.0.1:${port} (vllm.host:vllm.port) is already in use`);
      expect(manager.snapshot().pid).toBeNull();
    } finally {
      squatter.close();
    }
    // An address not on this machine (TEST-NET-1) is not "in use": it says what it is.
    const elsewhere = await setup({ host: '192.0.2.1' });
    const err = await startupError(elsewhere.manager);
    expect(err.message).toBe(`Cannot start vllm: it could not listen on 192.0.2.1:${elsewhere.port} (vllm.host:vllm.port): the address is not on this machine.`);
    expect(elsewhere.manager.snapshot().pid).toBeNull();
  });

  it('SIGKILLs the group when vLLM ignores SIGTERM for stop_timeout', async () => {
    const { manager } = await setup({ stop_timeout: 3 }, { VLLM_SIM_IGNORE_SIGTERM: '1' });
    await manager.start();
    const pid = manager.snapshot().pid as number;
    const warnings = jest.spyOn(Logger.prototype, 'warn');
    const stopped = manager.stop();
    await sleep(1_000);
    // SIGTERM held: the group lives on until stop_timeout, then SIGKILL.
    expect(groupPids(pid)).not.toEqual([]);
    await stopped;
    expect(pidAlive(pid)).toBe(false);
    expect(warnings.mock.calls.map(([message]) => String(message))).toContain(
      'vLLM did not stop within 3 s (vllm.stop_timeout) of SIGTERM; its process group was killed',
    );
    await expectNoProcessLeft(pid, 1_000);
  });

  it('a stop during startup aborts the start and leaves no process', async () => {
    const { manager } = await setup({}, { VLLM_SIM_LOAD_SECONDS: '30' });
    const outcome = manager.start().catch((err: Error) => err);
    await waitUntil(() => manager.snapshot().pid !== null, 5_000);
    const pid = manager.snapshot().pid as number;
    await manager.stop();
    expect(((await outcome) as Error).message).toContain('aborted');
    await expectNoProcessLeft(pid, 1_000);
  });

  it('a stop during a level-3 sleep waits for the group that sleep is stopping, SIGKILLs it, and only then reports stopped', async () => {
    const stateDir = mkdtempSync(join(tmpdir(), 'tide-state-'));
    const { manager, port } = await setup(
      { state_dir: stateDir, stop_timeout: 1, sleep: { idle_seconds: 300, level: 3 } },
      { VLLM_SIM_IGNORE_SIGTERM: '1' },
    );
    await manager.start();
    const pid = manager.snapshot().pid as number;
    // The sleep sends SIGTERM, which vLLM ignores: its group lives on through stop_timeout.
    const slept = manager.sleep(3).catch((err: unknown) => err);
    await waitUntil(() => manager.currentState === 'sleeping', 5_000, 25, 'falling asleep');
    await manager.stop();
    expect(manager.currentState).toBe('stopped');
    // Read at once, not waited for: "stopped" must mean that nothing of the group is left.
    expect(groupPids(pid)).toEqual([]);
    expect(existsSync(join(stateDir, `vllm-${port}.json`))).toBe(false); // the group is gone, so is its record
    expect(await slept).toMatchObject({ code: 'SHUTTING_DOWN' });
  });

  it('a stop while the orphan of an earlier run is being stopped waits for it, and spawns nothing', async () => {
    const stateDir = mkdtempSync(join(tmpdir(), 'tide-state-'));
    // An engine group left by an earlier tide-vllm, carrying its launch marker; it ignores SIGTERM.
    const orphan = await startSim({ env: { VLLM_SIM_IGNORE_SIGTERM: '1', [INSTANCE_ENV]: 'earlier-run' } });
    const { manager, port } = await setup({ state_dir: stateDir, stop_timeout: 1 });
    new OrphanRecord(stateDir, port, goneOwner()).save(orphan.pid, 'vllm', 'earlier-run');
    const outcome = manager.start().catch((err: Error) => err);
    try {
      await sleep(200); // SIGTERM sent and ignored; SIGKILL comes after stop_timeout
      expect(groupPids(orphan.pid).length).toBeGreaterThan(0);
      await manager.stop();
      expect(groupPids(orphan.pid)).toEqual([]);
      expect(((await outcome) as Error).message).toContain('aborted');
      await sleep(1_000); // a launch after the stop would have spawned and be listening by now
      expect(manager.snapshot().pid).toBeNull();
      expect(await probeConnect(port)).toBe('ECONNREFUSED');
    } finally {
      await outcome;
      const spawned = manager.snapshot().pid;
      if (spawned) process.kill(-spawned, 'SIGKILL');
    }
  });

  it('an orphan that survives SIGKILL is reported by its group and keeps its record, for the next start to find', async () => {
    const stateDir = mkdtempSync(join(tmpdir(), 'tide-state-'));
    const orphan = await startSim({ env: { [INSTANCE_ENV]: 'earlier-run' } });
    const { port } = orphan;
    const { manager } = await setup({ state_dir: stateDir, port });
    new OrphanRecord(stateDir, port, goneOwner()).save(orphan.pid, 'vllm', 'earlier-run');
    // Processes in uninterruptible I/O outlive SIGKILL; that cannot be staged, so the outcome is.
    const terminate = jest.spyOn(processGroup, 'terminateGroup').mockResolvedValue({ killed: true, gone: false });
    const errors = jest.spyOn(Logger.prototype, 'error').mockImplementation(() => undefined);
    try {
      const err = await startupError(manager);
      expect(err.message).toContain('is already in use'); // the survivor holds the port
      expect(errors).toHaveBeenCalledWith(`processes of vLLM's group ${orphan.pid} survived SIGKILL`);
      expect(existsSync(join(stateDir, `vllm-${port}.json`))).toBe(true);
    } finally {
      terminate.mockRestore();
      errors.mockRestore();
      await orphan.stop();
    }
  });

  it('stops the orphans an earlier tide-vllm left under another vllm.port of the same state_dir, and leaves a live one\'s alone', async () => {
    const stateDir = mkdtempSync(join(tmpdir(), 'tide-state-'));
    // Killed with -9, then started again with another vllm.port: its vLLM still holds a GPU.
    const orphan = await startSim({ env: { [INSTANCE_ENV]: 'earlier-run' } });
    new OrphanRecord(stateDir, orphan.port, goneOwner()).save(orphan.pid, 'vllm', 'earlier-run');
    // Another tide-vllm, alive (this process), supervising a vLLM on a third port.
    const live = await startSim({ env: { [INSTANCE_ENV]: 'live-run' } });
    const liveRecord = new OrphanRecord(stateDir, live.port);
    liveRecord.claim();
    liveRecord.save(live.pid, 'vllm', 'live-run');
    const { manager, port } = await setup({ state_dir: stateDir });
    try {
      await manager.start();
      expect(manager.snapshot().state).toBe('ready');
      expect(groupPids(orphan.pid)).toEqual([]);
      expect(existsSync(join(stateDir, `vllm-${orphan.port}.json`))).toBe(false); // nothing of it left to find
      expect(groupPids(live.pid).length).toBeGreaterThan(0);
      expect(OrphanRecord.recordedPorts(stateDir).sort()).toEqual([port, live.port].sort());
      expect(new OrphanRecord(stateDir, live.port).claim()).toEqual({ supervisor: process.pid, group: { pgid: live.pid, command: 'vllm' } });
    } finally {
      await orphan.stop();
      await live.stop();
    }
  });

  it('a second manager with the same state_dir and vllm.port refuses to start and leaves the first one\'s vLLM running', async () => {
    const stateDir = mkdtempSync(join(tmpdir(), 'tide-state-'));
    const first = await setup({ state_dir: stateDir });
    await first.manager.start();
    const pid = first.manager.snapshot().pid as number;
    const second = await setup({ state_dir: stateDir, port: first.port });
    const err = await startupError(second.manager);
    expect(err.message).toContain(`vllm.port ${first.port} is supervised by another tide-vllm (pid ${process.pid}, state_dir ${stateDir})`);
    expect(second.manager.snapshot().pid).toBeNull();
    await sleep(500); // a probe or two of the first manager
    expect(first.manager.currentState).toBe('ready');
    expect(first.manager.snapshot()).toMatchObject({ pid, restarts: 0 });
    expect(await first.client.listModels()).toEqual(['sim-model']);
  });

  it('a state_dir (or log_file) that cannot be written fails the start before anything is spawned, naming the key', async () => {
    const notADir = join(mkdtempSync(join(tmpdir(), 'tide-state-')), 'file');
    writeFileSync(notADir, 'not a directory\n');
    const { manager, port } = await setup({ state_dir: notADir });
    const err = await startupError(manager);
    expect(err.message).toContain(`Cannot record vLLM's process group in vllm.state_dir (${notADir}): `);
    expect(err.message).toMatch(/EEXIST|ENOTDIR/); // mkdir over a file
    expect(manager.snapshot().pid).toBeNull();
    expect(await probeConnect(port)).toBe('ECONNREFUSED');
    // Likewise a vllm.log_file that cannot be made (it was a stack trace from the constructor).
    const logFile = join(notADir, 'logs', 'vllm.log');
    const other = await setup({ log_file: logFile });
    const logErr = await startupError(other.manager);
    expect(logErr.message).toContain(`Cannot write vLLM's log to vllm.log_file (${logFile}): `);
    expect(logErr.message).toMatch(/EEXIST|ENOTDIR/);
    expect(other.manager.snapshot().pid).toBeNull();
    // Under /proc, where Node's own recursive mkdir spins forever at full CPU: refused at once.
    for (const config of [{ state_dir: '/proc/tide-vllm/state' }, { log_file: '/proc/tide-vllm/vllm.log' }]) {
      const proc = await setup(config);
      expect([config, (await startupError(proc.manager)).message]).toEqual([config, expect.stringContaining('ENOENT')]);
    }
  });

  it('a stop before the start claims nothing: a later manager on the same state_dir and port starts', async () => {
    const stateDir = mkdtempSync(join(tmpdir(), 'tide-state-'));
    const first = await setup({ state_dir: stateDir });
    await first.manager.stop();
    expect((await startupError(first.manager)).message).toContain('aborted');
    expect(existsSync(join(stateDir, `vllm-${first.port}.json`))).toBe(false);
    const second = await setup({ state_dir: stateDir, port: first.port });
    await second.manager.start();
    expect(second.manager.currentState).toBe('ready');
  });

  it('a launcher that exists but whose #! interpreter is missing is not reported as missing from PATH', async () => {
    const launcher = join(mkdtempSync(join(tmpdir(), 'tide-venv-')), 'vllm');
    writeFileSync(launcher, '#!/nonexistent/venv/bin/python3\nprint("never")\n');
    chmodSync(launcher, 0o755);
    const { manager } = await setup({ command: [launcher, 'serve'] });
    const err = await startupError(manager);
    expect(err.message).toContain(`the launcher "${launcher}" exists but could not be executed`);
    expect(err.message).toContain('#! line');
    expect(err.message).not.toContain('PATH');
  });

  it('a flag the engine refuses (argparse: exit status 2) points at vllm.extra_args', async () => {
    const { manager } = await setup({ extra_args: { 'enforce-eagr': true } });
    const message = (await startupError(manager)).message;
    expect(message).toContain('exited with code 2 before serving model "sim-model". Exit status 2 is usually its command line refused (argparse): look at vllm.extra_args.');
    expect(message).toContain('unrecognized arguments: --enforce-eagr');
  });

  it('a launcher that is not executable, or a directory, is named with vllm.command and what to do', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'tide-noexec-'));
    const launcher = join(dir, 'vllm');
    writeFileSync(launcher, '#!/bin/sh\necho never\n');
    chmodSync(launcher, 0o644); // no execute bit for anyone (root included)
    for (const command of [launcher, dir]) {
      const { manager } = await setup({ command: [command, 'serve'] });
      const message = (await startupError(manager)).message;
      expect(message).toContain(`the launcher "${command}" (vllm.command) cannot be executed`);
      expect(message).toContain('chmod +x');
    }
  });

  it('restarts vLLM after it exits, and serves again', async () => {
    const { manager, client } = await setup({ restart: { backoff_initial: 0.1, backoff_max: 0.1 } });
    await manager.start();
    const firstPid = manager.snapshot().pid as number;
    process.kill(firstPid, 'SIGTERM'); // vLLM exits (status 0) with nobody having asked it to
    await waitUntil(() => manager.snapshot().restarts >= 1, 10_000, 25, 'a restart');
    await waitUntil(() => manager.snapshot().pid !== firstPid && manager.currentState === 'ready', 10_000, 25, 'ready again');
    expect(manager.snapshot().lastError).toMatch(/unexpectedly/);
    expect(await client.listModels()).toEqual(['sim-model']);
    await expectNoProcessLeft(firstPid, 2_000);
  });

  it('stops what is left of a crashed vLLM\'s group (its EngineCore) at once, not after the restart backoff', async () => {
    const { manager } = await setup({ restart: { backoff_initial: 30, backoff_max: 30 } });
    await manager.start();
    const leader = manager.snapshot().pid as number;
    await waitUntil(() => groupPids(leader).length > 1, 5_000, 25, 'EngineCore running');
    process.kill(leader, 'SIGKILL'); // the API server alone, as an OOM kill would
    await waitUntil(() => manager.currentState === 'restarting', 5_000, 25, 'restarting');
    await waitUntil(() => groupPids(leader).length === 0, 5_000, 25, 'the group gone, well before the 30 s backoff');
    expect(manager.currentState).toBe('restarting');
  });

  it('doubles the restart backoff at each crash within the window, up to backoff_max', async () => {
    const { manager } = await setup({ restart: { max_restarts: 5, backoff_initial: 0.1, backoff_max: 0.2 } });
    const reasons = jest.spyOn(Logger.prototype, 'log');
    await manager.start();
    for (let crash = 1; crash <= 3; crash += 1) {
      process.kill(manager.snapshot().pid as number, 'SIGKILL');
      await waitUntil(() => manager.snapshot().restarts === crash && manager.currentState === 'ready', 10_000, 25, `ready after crash ${crash}`);
    }
    const delays = reasons.mock.calls.map(([message]) => /→ restarting: restart \d+ in ([\d.]+) s/.exec(String(message))?.[1]).filter(Boolean);
    expect(delays).toEqual(['0.1', '0.2', '0.2']);
  });

  it('gives up after max_restarts within the window and reports it as fatal', async () => {
    const { manager } = await setup({ restart: { max_restarts: 1, backoff_initial: 0.1, backoff_max: 0.1 } });
    const fatal = new Promise<string>((resolve) => manager.onFatal(resolve));
    await manager.start();
    process.kill(manager.snapshot().pid as number, 'SIGKILL');
    await waitUntil(() => manager.snapshot().restarts === 1 && manager.currentState === 'ready', 10_000, 25, 'ready after the one restart');
    process.kill(manager.snapshot().pid as number, 'SIGKILL');
    const message = await fatal;
    expect(message).toContain('1 restart within 600 s (vllm.restart) is used up');
    expect(manager.currentState).toBe('failed');
    expect(manager.snapshot().restarts).toBe(1);
  });

  it('restarts vLLM that stops answering /health (hung), after exactly health_failure_threshold failed probes', async () => {
    const { manager, client } = await setup(
      { health_failure_threshold: 3, health_timeout: 0.3, restart: { backoff_initial: 0.1, backoff_max: 0.1 } },
      { VLLM_SIM_HEALTH_DELAY_MS: '2000' },
    );
    await manager.start();
    // One sequence of what happens: each health probe, and the restart.
    const events: string[] = [];
    const status = client.status.bind(client);
    jest.spyOn(client, 'status').mockImplementation((path, options) => {
      if (path === '/health') events.push('probe');
      return status(path, options);
    });
    jest.spyOn(Logger.prototype, 'log').mockImplementation((message) => {
      if (String(message).includes('→ restarting')) events.push('restart');
    });
    await waitUntil(() => manager.snapshot().restarts >= 1, 10_000, 25, 'a restart');
    expect(events.slice(0, events.indexOf('restart') + 1)).toEqual(['probe', 'probe', 'probe', 'restart']);
    expect(manager.snapshot().lastError).toMatch(/stopped answering \/health \(3 probes in a row/);
  });
});

describe('VLLMServerManager signals a process group only while it may be its own', () => {
  it('a stop during the restart backoff signals no group the crash found gone (by then its id may name another group)', async () => {
    const { manager } = await setup({ restart: { backoff_initial: 30, backoff_max: 30 } });
    await manager.start();
    const pid = requirePid(manager.snapshot().pid);
    const terminate = jest.spyOn(processGroup, 'terminateGroup');
    signalGroup(pid, 'SIGKILL');
    await waitUntil(() => manager.currentState === 'restarting', 5_000, 25, 'the crash noticed');
    await expectNoProcessLeft(pid, 5_000);
    await manager.stop();
    expect(terminate.mock.calls.map(([group]) => group)).toEqual([pid]); // the crash's clearing only
    expect(manager.currentState).toBe('stopped');
  });
});

describe('VLLMServerManager sleep and wake with the simulator', () => {
  it('a sleep vLLM does not answer leaves the supervisor sleeping, and the next wake-up wakes vLLM', async () => {
    const { manager, client } = await setup({ timeout: 1, health_timeout: 0.5, sleep: { idle_seconds: 300, level: 1, wake_timeout: 0.5 } });
    await manager.start();
    const pid = requirePid(manager.snapshot().pid);
    signalGroup(pid, 'SIGSTOP'); // vLLM takes the requests but answers none of them, /is_sleeping included
    try {
      await expect(manager.sleep(1)).rejects.toMatchObject({ code: 'UPSTREAM_TIMEOUT' });
      expect(manager.currentState).toBe('sleeping'); // not known to be awake
    } finally {
      signalGroup(pid, 'SIGCONT');
    }
    // vLLM now handles the /sleep it was sent: it falls asleep after tide-vllm gave up on the answer.
    await waitUntil(() => isSleeping(client), 5_000, 50, 'vLLM asleep');
    await manager.wake();
    expect(manager.currentState).toBe('ready');
    expect(await isSleeping(client)).toBe(false);
  });

  it("a sleep first waits for tide-vllm's own generations in the engine (vLLM up to 0.16 sleeps at once under them, whatever `mode` says)", async () => {
    const { manager, client } = await setup({ sleep: { idle_seconds: 300, level: 1 } });
    const traffic = { activeInFlight: 1, waitIdle: () => Promise.resolve(0), cutAll: () => undefined };
    manager.trackTraffic(traffic, 1_000);
    await manager.start();
    const asked: string[] = [];
    const call = client.call.bind(client);
    jest.spyOn(client, 'call').mockImplementation((method, path, ...rest) => (asked.push(`${method} ${path}`), call(method, path, ...rest)));
    const slept = manager.sleep(1);
    await sleep(500);
    expect([manager.currentState, asked]).toEqual(['sleeping', []]); // new requests wait for the wake-up; vLLM not asked yet
    traffic.activeInFlight = 0; // the generation ended
    await slept;
    expect(asked).toEqual(['POST /sleep?level=1&mode=wait']);
    expect(await isSleeping(client)).toBe(true);
  });

  it('a vLLM that hangs while asleep is stopped after the health failure threshold and sleeps on as at level 3; a wake-up starts it', async () => {
    const { manager, client } = await setup({
      health_failure_threshold: 2,
      health_timeout: 0.3,
      stop_timeout: 1,
      sleep: { idle_seconds: 300, level: 1 },
    });
    await manager.start();
    await manager.sleep(1);
    const pid = requirePid(manager.snapshot().pid);
    signalGroup(pid, 'SIGSTOP'); // hung: /health (200 while asleep, A9) is no longer answered
    try {
      await waitUntil(() => manager.snapshot().sleepLevel === 3, 5_000, 25, 'the hang noticed');
      expect(manager.snapshot()).toMatchObject({ state: 'sleeping', restarts: 0, pid: null });
      expect(manager.snapshot().lastError).toMatch(/stopped answering \/health \(2 probes in a row/);
      // A wake-up right away waits for the hung group to be gone (SIGTERM held, SIGKILL after stop_timeout).
      await manager.wake();
    } finally {
      processGroup.signalGroup(pid, 'SIGCONT'); // gone once the stop killed it
    }
    await expectNoProcessLeft(pid, 2_000);
    expect(manager.snapshot()).toMatchObject({ state: 'ready', restarts: 0, sleepLevel: null });
    expect(manager.snapshot().pid).not.toBe(pid);
    expect(await isSleeping(client)).toBe(false);
    expect(await client.listModels()).toEqual(['sim-model']);
  });

  it('an engine hung under its sleep (/health still 200, /is_sleeping unanswered) is stopped after the failure threshold and sleeps on as at level 3; a wake-up starts it', async () => {
    const { manager, client } = await setup(
      { timeout: 1, health_failure_threshold: 2, health_timeout: 0.5, sleep: { idle_seconds: 300, level: 1, wake_timeout: 1 } },
      { VLLM_SIM_ENGINE_HANG_AFTER_TOKENS: '3' },
    );
    await manager.start();
    const pid = requirePid(manager.snapshot().pid);
    // A generation hangs the engine (its client gives up); then neither /sleep is answered.
    const chat = { model: 'sim-model', messages: [{ role: 'user', content: 'a b c d e f' }], max_tokens: 10 };
    await expect(client.postJson('/v1/chat/completions', chat, { timeoutMs: 500 })).rejects.toMatchObject({ code: 'UPSTREAM_TIMEOUT' });
    await expect(manager.sleep(1)).rejects.toMatchObject({ code: 'UPSTREAM_TIMEOUT' });
    expect(manager.snapshot()).toMatchObject({ state: 'sleeping', sleepLevel: 1 });
    expect(await client.status('/health')).toBe(200);
    await waitUntil(() => manager.snapshot().sleepLevel === 3, 5_000, 25, 'the hang noticed');
    expect(manager.snapshot().lastError).toMatch(/^vLLM's engine stopped answering \/is_sleeping while asleep \(2 probes in a row/);
    await expectNoProcessLeft(pid, 5_000);
    await manager.wake();
    expect(manager.snapshot()).toMatchObject({ state: 'ready', restarts: 0, sleepLevel: null });
    expect(manager.snapshot().pid).not.toBe(pid);
  });

  it('a request aborted before it asks for vLLM (its client gone) wakes nothing: vLLM sleeps on', async () => {
    const { manager, client } = await setup({ sleep: { idle_seconds: 300, level: 1 } });
    await manager.start();
    await manager.sleep(1);
    const gone = new AbortController();
    const reason = new AppError('CLIENT_GONE', 'client went away');
    gone.abort(reason);
    await expect(manager.ensureServing(gone.signal)).rejects.toBe(reason);
    expect([manager.currentState, manager.snapshot().wakeups, await isSleeping(client)]).toEqual(['sleeping', 0, true]);
    await manager.ensureServing(new AbortController().signal); // a live request does wake it
    expect([manager.currentState, await isSleeping(client)]).toEqual(['ready', false]);
  });

  it('a request waiting on a wake-up whose sleep a restart cut short gets the error of a restart, not a way through to vLLM', async () => {
    const { manager } = await setup({ stop_timeout: 1, sleep: { idle_seconds: 300, level: 1 } });
    await manager.start();
    const pid = requirePid(manager.snapshot().pid);
    signalGroup(pid, 'SIGSTOP'); // vLLM takes the /sleep and never answers it: the sleep stays in progress
    const slept = manager.sleep(1).catch((err: unknown) => err);
    await waitUntil(() => manager.currentState === 'sleeping', 5_000, 25, 'falling asleep');
    const served = manager.ensureServing().then(
      () => 'let through to vLLM',
      (err: unknown) => err,
    ); // waits for the sleep to end, then wakes vLLM
    // SIGTERM (held: vLLM is stopped), SIGKILL after stop_timeout: that ends the /sleep, while the state is restarting.
    const restarted = manager.restart();
    expect(await served).toMatchObject({ code: 'VLLM_NOT_READY', message: "vLLM is restarting at an operator's request" });
    expect(await slept).toMatchObject({ code: 'CONFLICT' });
    await restarted;
    expect(manager.snapshot()).toMatchObject({ state: 'ready', restarts: 1, sleepLevel: null });
  });

  it('a wake-up of a vLLM whose engine died in its sleep fails fast on the 500 and restarts it, well within wake_timeout', async () => {
    const { manager, client } = await setup({
      health_interval: 30, // no /health probe notices the dead engine first: the wake-up has to
      restart: { backoff_initial: 0.1, backoff_max: 0.1 },
      sleep: { idle_seconds: 300, level: 1, wake_timeout: 60 },
    });
    await manager.start();
    await manager.sleep(1);
    const pid = manager.snapshot().pid as number;
    const engine = groupPids(pid).find((p) => cmdline(p).includes('EngineCore'));
    expect(engine).toBeDefined();
    process.kill(engine as number, 'SIGKILL');
    await waitUntil(async () => (await client.status('/health')) === 503, 5_000, 25, 'vLLM seeing its engine dead');
    let outcome: unknown;
    manager.wake().then(
      () => (outcome = 'woken'),
      (err: unknown) => (outcome = err),
    );
    // vLLM answers /wake_up with EngineDeadError's 500 at once; one that never answered would keep it waiting for wake_timeout.
    await waitUntil(() => outcome !== undefined, 10_000, 25, 'the wake-up failing');
    expect(outcome).toMatchObject({ code: 'VLLM_NOT_READY' });
    expect(manager.snapshot()).toMatchObject({ restarts: 1, sleepLevel: null });
    expect(manager.snapshot().lastError).toMatch(/^vLLM failed to wake up: .*500/);
    await waitUntil(() => manager.currentState === 'ready', 10_000, 25, 'ready again after the restart');
    expect(manager.snapshot().pid).not.toBe(pid);
    expect(await isSleeping(client)).toBe(false);
    await expectNoProcessLeft(pid, 2_000);
  });

  it('a wake-up whose launch dies is one crash: the one restart allowed is still tried', async () => {
    const crashFlag = join(mkdtempSync(join(tmpdir(), 'tide-flag-')), 'crash-next-load');
    // The launcher makes the simulator die during load while the flag file exists.
    const command = ['/bin/sh', '-c', '[ -f "$0" ] && export VLLM_SIM_CRASH_ON_LOAD=1; exec "$@"', crashFlag, process.execPath, simMain, 'serve'];
    const { manager } = await setup({
      command,
      sleep: { idle_seconds: 300, level: 3 },
      restart: { max_restarts: 1, backoff_initial: 0.2, backoff_max: 0.2 },
    });
    let fatal: string | null = null;
    manager.onFatal((message) => (fatal = message));
    await manager.start();
    await manager.sleep(3);
    writeFileSync(crashFlag, '');
    await expect(manager.wake()).rejects.toMatchObject({ code: 'VLLM_NOT_READY' });
    expect(manager.snapshot()).toMatchObject({ state: 'restarting', restarts: 1, sleepLevel: null });
    expect(manager.snapshot().lastError).toMatch(/^vLLM failed to wake up: vllm exited with code 1 before serving/);
    rmSync(crashFlag);
    await waitUntil(() => manager.currentState === 'ready', 10_000, 25, 'ready after the one restart');
    expect(fatal).toBeNull();
    expect(manager.snapshot().restarts).toBe(1);
  });
});
