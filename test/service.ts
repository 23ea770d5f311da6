/**
 * Runs the real tide-vllm service (dist/src/main.js) as a child process with a generated
 * configuration, by default auto-starting the vLLM simulator. Cleans up both process groups.
 */
import { randomUUID } from 'node:crypto';
import { existsSync, mkdtempSync, readFileSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import {
  type ExitStatus,
  type HttpOptions,
  type HttpResponse,
  type ProcessHandle,
  cmdline,
  freePort,
  httpRequest,
  repoRoot,
  requirePid,
  simMain,
  spawnProcess,
  waitUntil,
} from './harness';

export const serviceMain = join(repoRoot, 'dist', 'src', 'main.js');

export interface ServiceOptions {
  /** Deep-merged over the test defaults (YAML keys). */
  config?: Record<string, unknown>;
  /** Environment of the service; the simulator inherits it (VLLM_SIM_* fault switches). */
  env?: Record<string, string>;
  /** Wait for this /health status before returning (default 'healthy'; null: do not wait). */
  waitFor?: string | null;
  /**
   * How it is started: node itself (default), `npm run start -- -c FILE` as the README does (the
   * build step skipped), or `npx tide-vllm serve -c FILE`.
   */
  launcher?: 'node' | 'npm-start' | 'npx';
}

export interface Service {
  proc: ProcessHandle;
  url: string;
  port: number;
  vllmPort: number;
  dir: string;
  configFile: string;
  request(path: string, options?: HttpOptions): Promise<HttpResponse>;
  json<T = Record<string, unknown>>(path: string, options?: HttpOptions): Promise<{ status: number; body: T; res: HttpResponse }>;
  health(): Promise<Record<string, unknown>>;
  waitForHealth(status: string, timeoutMs?: number): Promise<void>;
  /** Waits until exactly `n` requests are in flight (admitted, not yet answered), from /metrics. */
  waitInFlight(n: number, timeoutMs?: number): Promise<void>;
  /** The pid of the vLLM process group leader, from /admin/status (null when none). */
  vllmPid(): Promise<number | null>;
  /** As vllmPid(), but throws unless there is one (a positive integer): for a test that needs it. */
  requireVllmPid(): Promise<number>;
  /** SIGTERM and wait for the exit. */
  stop(timeoutMs?: number): Promise<ExitStatus>;
  /** Pids of every process of this service still alive: itself, vLLM and vLLM's children. */
  processes(): number[];
}

const running = new Set<Service>();
/** Marks every process a test service starts (vLLM inherits the service's environment). */
const MARKER = 'TIDE_E2E_SERVICE';
const markers = new Set<string>();
/** The services' mkdtemp directories, removed by stopAllServices once their processes are gone. */
const dirs = new Set<string>();

/** Pids whose environment carries one of `values` as MARKER. */
function markedPids(values: Set<string>): number[] {
  const wanted = new Set([...values].map((v) => `${MARKER}=${v}`));
  const pids: number[] = [];
  for (const entry of readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      if (readFileSync(`/proc/${entry}/environ`, 'utf8').split('\0').some((kv) => wanted.has(kv))) pids.push(Number(entry));
    } catch {
      // gone, or not ours to read
    }
  }
  return pids;
}

function merge(base: Record<string, unknown>, over: Record<string, unknown>): Record<string, unknown> {
  const out: Record<string, unknown> = { ...base };
  for (const [key, value] of Object.entries(over)) {
    const prev = out[key];
    out[key] =
      value && typeof value === 'object' && !Array.isArray(value) && prev && typeof prev === 'object' && !Array.isArray(prev)
        ? merge(prev as Record<string, unknown>, value as Record<string, unknown>)
        : value;
  }
  return out;
}

export async function startService(options: ServiceOptions = {}): Promise<Service> {
  const port = await freePort();
  const vllmPort = await freePort(); // never `port` again: freePort gives a port out once
  const dir = mkdtempSync(join(tmpdir(), 'tide-e2e-'));
  dirs.add(dir);
  const config = merge(
    {
      web: { bind_address: { host: '127.0.0.1', port }, drain_timeout: 5 },
      vllm: {
        command: [process.execPath, simMain, 'serve'],
        model_path: 'sim-model',
        port: vllmPort,
        max_model_len: 256,
        max_tokens: 32,
        startup_timeout: 30,
        stop_timeout: 3,
        health_interval: 0.25,
        health_timeout: 1,
        state_dir: join(dir, 'state'),
        log_file: join(dir, 'logs', 'vllm_{port}.log'),
      },
      logging: { level: 'warn' },
    },
    options.config ?? {},
  );
  const configFile = join(dir, 'tide-vllm.yaml');
  writeFileSync(configFile, JSON.stringify(config, null, 2)); // JSON is YAML
  const marker = randomUUID();
  markers.add(marker);
  const env = { VLLM_SIM_LOAD_SECONDS: '0.2', ...options.env, [MARKER]: marker };
  const proc =
    options.launcher === 'npm-start'
      ? spawnProcess('npm', ['run', 'start', '--ignore-scripts', '--silent', '--', '-c', configFile], { cwd: repoRoot, env })
      : options.launcher === 'npx'
        ? spawnProcess('npx', ['--yes', 'tide-vllm', 'serve', '-c', configFile], { cwd: repoRoot, env })
        : spawnProcess(process.execPath, [serviceMain, '-c', configFile], { env });
  const url = `http://127.0.0.1:${port}`;
  const service: Service = {
    proc,
    url,
    port,
    vllmPort,
    dir,
    configFile,
    request: (path, opts) => httpRequest(url + path, opts),
    async json<T>(path: string, opts?: HttpOptions) {
      const res = await httpRequest(url + path, opts);
      let body: T;
      try {
        body = JSON.parse(res.body) as T;
      } catch {
        throw new Error(`${path}: ${res.status} answered non-JSON: ${res.body.slice(0, 200)}`);
      }
      return { status: res.status, body, res };
    },
    async health() {
      return (await service.json('/health')).body;
    },
    async waitForHealth(status, timeoutMs = 20_000) {
      let last: unknown = 'no answer';
      await waitUntil(
        async () => {
          if (proc.exited) throw new Error(`service exited (${JSON.stringify(proc.exitStatus)}):\n${proc.output.join('\n')}`);
          try {
            last = (await service.health()).status;
          } catch {
            return false;
          }
          return last === status;
        },
        timeoutMs,
        50,
        `/health status ${status} (last: ${String(last)})`,
      );
    },
    async waitInFlight(n, timeoutMs = 5_000) {
      const re = new RegExp(`^tide_requests_in_flight ${n}$`, 'm');
      await waitUntil(async () => re.test((await service.request('/metrics')).body), timeoutMs, 20, `${n} request(s) in flight`);
    },
    async vllmPid() {
      const { body } = await service.json<{ pid: number | null }>('/admin/status');
      return body.pid;
    },
    async requireVllmPid() {
      return requirePid(await service.vllmPid(), 'the vLLM pid from /admin/status');
    },
    async stop(timeoutMs = 15_000) {
      proc.kill('SIGTERM');
      const status = await proc.waitForExit(timeoutMs);
      running.delete(service);
      return status;
    },
    processes: () => markedPids(new Set([marker])),
  };
  running.add(service);
  if (options.waitFor !== null) await service.waitForHealth(options.waitFor ?? 'healthy');
  return service;
}

/**
 * SIGKILLs every service and every process they started (vLLM, EngineCore, orphans left by a
 * killed service), found by the environment marker, so no test leaves a process behind.
 */
export async function stopAllServices(): Promise<void> {
  for (const service of running) service.proc.kill('SIGKILL');
  running.clear();
  for (const pid of markedPids(markers)) {
    try {
      process.kill(pid, 'SIGKILL');
    } catch {
      // already gone
    }
  }
  const survivors = await waitUntil(() => markedPids(markers).length === 0, 5_000, 25, 'every marked process gone').then(
    () => [],
    () => markedPids(markers),
  );
  if (survivors.length) {
    // Markers and directories kept: a later call finds these again (and the files are there to read).
    throw new Error(`stopAllServices: processes survived SIGKILL:\n${survivors.map((pid) => `${pid}: ${cmdline(pid)}`).join('\n')}`);
  }
  markers.clear();
  for (const dir of dirs) rmSync(dir, { recursive: true, force: true });
  dirs.clear();
}

/** The engine's output (vLLM's or SGLang's) as tide-vllm wrote it to vllm.log_file. */
export function vllmLog(svc: Service): string {
  const file = join(svc.dir, 'logs', `vllm_${svc.vllmPort}.log`);
  return existsSync(file) ? readFileSync(file, 'utf8') : '';
}

export function count(text: string, needle: string): number {
  return text.split(needle).length - 1;
}

/** The engine's lines reach the log file through a pipe, a moment after the answers they describe. */
export async function logged(svc: Service, needle: string, times = 1): Promise<void> {
  await waitUntil(() => count(vllmLog(svc), needle) === times, 3_000, 25, `${times}× ${needle} in the engine's log`);
}

/** The service's access line for `url` (parsed), once it is in its output: it may trail the answer it logs. */
export async function accessLine(svc: Service, url: string): Promise<Record<string, unknown>> {
  const find = () => svc.proc.output.find((line) => line.includes('"context":"access"') && line.includes(`"url":${JSON.stringify(url)}`));
  await waitUntil(() => find() !== undefined, 3_000, 20, `the access line of ${url}`);
  return JSON.parse(find()!) as Record<string, unknown>;
}

/** A request body as JSON with the given headers. */
export function post(body: unknown, headers: Record<string, string> = {}): HttpOptions {
  return { method: 'POST', body, headers };
}
