/**
 * The real VLLMServerManager against the vLLM simulator as a real child process: startup,
 * failures during startup, stopping the whole process group, crash recovery.
 */
import { mkdtempSync } from 'node:fs';
import { createServer, type Server } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Logger } from '@nestjs/common';
import { parseConfig } from '../src/config/config.loader';
import { vllmBaseUrl } from '../src/infrastructure/infrastructure.module';
import { StartupError, VLLMServerManager } from '../src/infrastructure/vllm-server.manager';
import { VLLMClient } from '../src/infrastructure/vllm.client';
import { cmdline, expectNoProcessLeft, freePort, groupPids, pidAlive, simMain, waitUntil } from './harness';

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

async function startupError(manager: VLLMServerManager): Promise<StartupError> {
  try {
    await manager.start();
  } catch (err) {
    expect(err).toBeInstanceOf(StartupError);
    return err as StartupError;
  }
  throw new Error('start() should have failed');
}

afterEach(async () => {
  await Promise.all(managers.splice(0).map((m) => m.stop()));
});

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

  it('a launcher that is not on PATH gets a message saying how to fix it', async () => {
    const { manager } = await setup({ command: ['tide-no-such-vllm', 'serve'] });
    const err = await startupError(manager);
    expect(err.message).toContain('"tide-no-such-vllm" was not found on PATH');
    expect(err.message).toContain('Install vLLM');
    expect(err.message).toContain('vllm.command');
    expect(err.message).toContain('vllm.auto_start: false');
  });

  it('refuses to start when the port is taken, spawning nothing', async () => {
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
  });

  it('SIGKILLs the group when vLLM ignores SIGTERM for stop_timeout', async () => {
    const { manager } = await setup({ stop_timeout: 1 }, { VLLM_SIM_IGNORE_SIGTERM: '1' });
    await manager.start();
    const pid = manager.snapshot().pid as number;
    const t0 = Date.now();
    await manager.stop();
    expect(Date.now() - t0).toBeGreaterThanOrEqual(1_000);
    expect(pidAlive(pid)).toBe(false);
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

  it('restarts vLLM after it exits, and serves again', async () => {
    const { manager, client } = await setup(
      { restart: { backoff_initial: 0.1, backoff_max: 0.1 } },
      { VLLM_SIM_ENGINE_EXIT_AFTER_MS: '300', VLLM_SIM_WATCHDOG_SECONDS: '0.2' },
    );
    await manager.start();
    const firstPid = manager.snapshot().pid as number;
    await waitUntil(() => manager.snapshot().restarts >= 1, 10_000, 25, 'a restart');
    await waitUntil(() => manager.snapshot().pid !== firstPid && manager.currentState === 'ready', 10_000, 25, 'ready again');
    expect(manager.snapshot().lastError).toMatch(/unexpectedly/);
    expect(await client.listModels()).toEqual(['sim-model']);
    await expectNoProcessLeft(firstPid, 2_000);
  });

  it('gives up after max_restarts within the window and reports it as fatal', async () => {
    const { manager } = await setup(
      { restart: { max_restarts: 1, backoff_initial: 0.1, backoff_max: 0.1 } },
      { VLLM_SIM_ENGINE_EXIT_AFTER_MS: '200', VLLM_SIM_WATCHDOG_SECONDS: '0.1' },
    );
    const fatal = new Promise<string>((resolve) => manager.onFatal(resolve));
    await manager.start();
    const message = await fatal;
    expect(message).toContain('1 restarts within 600 s (vllm.restart) are used up');
    expect(manager.currentState).toBe('failed');
    expect(manager.snapshot().restarts).toBe(1);
  });

  it('restarts vLLM that stops answering /health (hung), after the failure threshold', async () => {
    const { manager } = await setup(
      { health_failure_threshold: 2, health_timeout: 0.3, restart: { backoff_initial: 0.1, backoff_max: 0.1 } },
      { VLLM_SIM_HEALTH_DELAY_MS: '2000' },
    );
    await manager.start();
    await waitUntil(() => manager.snapshot().restarts >= 1, 10_000, 25, 'a restart');
    expect(manager.snapshot().lastError).toMatch(/stopped answering \/health \(2 probes in a row/);
  });
});
