// The processes under test: the bench backend, tide-vllm itself (dist/src/main.js in manual
// mode) and nginx. Each is a child process on 127.0.0.1; every child is killed when the benchmark
// exits, however it exits.
import { fork, spawn, type ChildProcess } from 'node:child_process';
import { accessSync, constants, mkdirSync, openSync, readFileSync, writeFileSync } from 'node:fs';
import { createServer, type AddressInfo } from 'node:net';
import { join } from 'node:path';
import { request } from 'undici';
import { childrenOf } from './proc-stats';

export const MODEL = 'bench-model';
const READY_TIMEOUT_MS = 30_000;
const STOP_TIMEOUT_MS = 15_000;

/** Something the load generator can aim at. */
export interface Target {
  origin: string;
  /** The processes whose CPU and memory are the target's cost (none for the backend itself). */
  pids: number[];
  stop(): Promise<void>;
}

export interface Backend extends Target {
  port: number;
  pid: number;
  setPace(ms: number): Promise<void>;
}

const children = new Set<ChildProcess>();
/** Grandchildren (nginx workers) to kill if the benchmark dies before stopping their master. */
const strayPids = new Set<number>();
process.on('exit', () => {
  for (const child of children) if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
  for (const pid of strayPids) {
    try {
      process.kill(pid, 'SIGKILL');
    } catch {
      // gone
    }
  }
});

function track(child: ChildProcess): ChildProcess {
  children.add(child);
  child.once('exit', () => children.delete(child));
  return child;
}

function exited(child: ChildProcess): Promise<void> {
  return child.exitCode !== null || child.signalCode !== null ? Promise.resolve() : new Promise((resolve) => child.once('exit', () => resolve()));
}

async function stopChild(child: ChildProcess, signal: NodeJS.Signals): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  child.kill(signal);
  const timer = setTimeout(() => child.kill('SIGKILL'), STOP_TIMEOUT_MS);
  await exited(child);
  clearTimeout(timer);
}

export const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address() as AddressInfo;
      server.close(() => resolve(port));
    });
  });
}

async function status(url: string): Promise<number> {
  try {
    const res = await request(url, { headersTimeout: 2_000, bodyTimeout: 2_000 });
    await res.body.dump();
    return res.statusCode;
  } catch {
    return 0;
  }
}

/** Polls `url` until it answers 200; fails early if `child` exits. */
async function waitFor200(url: string, child: ChildProcess, what: string, logFile?: string): Promise<void> {
  const deadline = Date.now() + READY_TIMEOUT_MS;
  while (Date.now() < deadline) {
    if (child.exitCode !== null || child.signalCode !== null) break;
    if ((await status(url)) === 200) return;
    await sleep(100);
  }
  const log = logFile ? `\n--- ${logFile} ---\n${readFileSync(logFile, 'utf8').slice(-3000)}` : '';
  throw new Error(`${what} did not answer 200 on ${url} (exit code ${child.exitCode ?? 'none'})${log}`);
}

export async function startBackend(): Promise<Backend> {
  const child = track(fork(join(__dirname, 'backend.js'), [`--model=${MODEL}`], { stdio: ['ignore', 'ignore', 'inherit', 'ipc'] }));
  const port = await new Promise<number>((resolve, reject) => {
    child.once('message', (msg: { port: number }) => resolve(msg.port));
    child.once('exit', (code) => reject(new Error(`the bench backend exited (${code}) before listening`)));
  });
  const origin = `http://127.0.0.1:${port}`;
  return {
    origin,
    port,
    pid: child.pid!,
    pids: [],
    async setPace(ms) {
      const res = await request(`${origin}/bench/config`, { method: 'POST', body: JSON.stringify({ pace_ms: ms }) });
      await res.body.dump();
    },
    stop: () => stopChild(child, 'SIGTERM'),
  };
}

/**
 * A floor reference, with tide-vllm's node flags: node:http + undici and nothing else
 * (floor-relay.ts), or `raw`, plain sockets and HTTP parsed by hand (raw-floor.ts).
 */
export async function startFloorRelay(backendPort: number, raw = false): Promise<Target> {
  const script = raw ? 'raw-floor.js' : 'floor-relay.js';
  const child = track(fork(join(__dirname, script), [`--backend-port=${backendPort}`], { execArgv: shippedNodeFlags(), stdio: ['ignore', 'ignore', 'inherit', 'ipc'] }));
  const port = await new Promise<number>((resolve, reject) => {
    child.once('message', (msg: { port: number }) => resolve(msg.port));
    child.once('exit', (code) => reject(new Error(`${script} exited (${code}) before listening`)));
  });
  return { origin: `http://127.0.0.1:${port}`, pids: [child.pid!], stop: () => stopChild(child, 'SIGTERM') };
}

export interface GatewayOptions {
  backendPort: number;
  dir: string;
  name: string;
  logLevel: 'warn' | 'info';
  /** Extra node flags, e.g. --cpu-prof. */
  nodeArgs?: string[];
}

/** The node flags of `npm start` (package.json), so the gateway is measured as it is shipped. */
function shippedNodeFlags(): string[] {
  const pkg = JSON.parse(readFileSync(join(__dirname, '..', '..', '..', 'package.json'), 'utf8')) as { scripts: { start: string } };
  const words = pkg.scripts.start.split(/\s+/);
  return words.slice(1, words.indexOf('dist/src/main.js')).filter((w) => w.startsWith('--'));
}

/** tide-vllm as shipped: `node dist/src/main.js -c <yaml>`, attached to the backend (auto_start: false). */
export async function startGateway(opts: GatewayOptions): Promise<Target> {
  const port = await freePort();
  const config = {
    web: { bind_address: { host: '127.0.0.1', port }, max_concurrent_requests: 100000, drain_timeout: 1 },
    vllm: {
      auto_start: false,
      host: '127.0.0.1',
      port: opts.backendPort,
      model_name: MODEL,
      timeout: 60,
      health_interval: 5,
      state_dir: join(opts.dir, `${opts.name}-state`),
      log_file: '',
    },
    logging: { level: opts.logLevel },
    auth: { api_keys: [] },
  };
  const yaml = join(opts.dir, `${opts.name}.yaml`);
  writeFileSync(yaml, JSON.stringify(config, null, 2) + '\n'); // JSON is YAML
  const logFile = join(opts.dir, `${opts.name}.log`);
  const log = openSync(logFile, 'a');
  const env = { ...process.env };
  delete env.TIDE_API_KEY;
  const main = join(__dirname, '..', '..', 'src', 'main.js');
  const child = track(spawn(process.execPath, [...shippedNodeFlags(), ...(opts.nodeArgs ?? []), main, '-c', yaml], { cwd: opts.dir, env, stdio: ['ignore', log, log] }));
  const origin = `http://127.0.0.1:${port}`;
  await waitFor200(`${origin}/ready`, child, `tide-vllm (${opts.name})`, logFile);
  return { origin, pids: [child.pid!], stop: () => stopChild(child, 'SIGTERM') };
}

const NGINX_PATHS = ['/usr/sbin/nginx', '/usr/local/sbin/nginx', '/usr/local/nginx/sbin/nginx', '/usr/bin/nginx'];

/** The nginx binary on PATH or in the usual places, or null. */
export function findNginx(): string | null {
  const dirs = (process.env.PATH ?? '').split(':').filter(Boolean).map((dir) => join(dir, 'nginx'));
  for (const candidate of [...dirs, ...NGINX_PATHS]) {
    try {
      accessSync(candidate, constants.X_OK);
      return candidate;
    } catch {
      // not here
    }
  }
  return null;
}

export interface NginxOptions {
  bin: string;
  backendPort: number;
  dir: string;
  name: string;
  workers: '1' | 'auto';
}

/** nginx as a plain keep-alive reverse proxy in front of the backend, in the foreground (daemon off). */
export async function startNginx(opts: NginxOptions): Promise<Target> {
  const port = await freePort();
  const prefix = join(opts.dir, opts.name);
  const conf = join(opts.dir, `${opts.name}.conf`);
  const errorLog = join(opts.dir, `${opts.name}-error.log`);
  mkdirSync(prefix, { recursive: true, mode: 0o755 });
  writeFileSync(
    conf,
    `daemon off;
worker_processes ${opts.workers};
worker_rlimit_nofile 16384;
pid ${join(prefix, 'nginx.pid')};
error_log ${errorLog} warn;
events { worker_connections 8192; }
http {
  access_log off;
  client_body_temp_path ${join(prefix, 'client_body')};
  proxy_temp_path ${join(prefix, 'proxy')};
  fastcgi_temp_path ${join(prefix, 'fastcgi')};
  uwsgi_temp_path ${join(prefix, 'uwsgi')};
  scgi_temp_path ${join(prefix, 'scgi')};
  keepalive_requests 1000000;
  upstream backend {
    server 127.0.0.1:${opts.backendPort};
    keepalive 256;
    keepalive_requests 1000000;
    keepalive_timeout 60s;
  }
  server {
    listen 127.0.0.1:${port};
    location / {
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
    }
  }
}
`,
  );
  const child = track(spawn(opts.bin, ['-p', prefix, '-c', conf, '-e', errorLog], { stdio: ['ignore', 'ignore', openSync(errorLog, 'a')] }));
  const origin = `http://127.0.0.1:${port}`;
  await waitFor200(`${origin}/health`, child, `nginx (${opts.name})`, errorLog);
  const workers = childrenOf(child.pid!);
  for (const pid of workers) strayPids.add(pid);
  const stop = async () => {
    await stopChild(child, 'SIGTERM'); // the master stops its workers
    for (const pid of workers) {
      strayPids.delete(pid);
      try {
        process.kill(pid, 'SIGKILL');
      } catch {
        // already gone, as it should be
      }
    }
  };
  return { origin, pids: [child.pid!, ...workers], stop };
}
