/**
 * Shared harness for the project's integration tests: free ports, real child processes (each
 * leading its own process group), the vLLM simulator, /proc process inspection, small HTTP and
 * SSE clients over node:http, and cleanup that never leaves a process behind.
 *
 * Typical use:
 *
 *   afterAll(killAll);
 *   const sim = await startSim({ args: ['--served-model-name', 'm'] });
 *   const res = await httpRequest(`${sim.baseUrl}/health`);
 *   await sim.stop();
 */
import { ChildProcess, spawn } from 'node:child_process';
import fs from 'node:fs';
import http, { IncomingHttpHeaders } from 'node:http';
import net from 'node:net';
import path from 'node:path';

/** Absolute path of the repository root. */
export const repoRoot = path.resolve(__dirname, '..');
/** Directory holding the `vllm` wrapper script; put it first on PATH to make `vllm` the simulator. */
export const simBinDir = path.join(repoRoot, 'tools', 'vllm-sim', 'bin');
/** The compiled simulator entry point (run `npm run build` first). */
export const simMain = path.join(repoRoot, 'dist', 'tools', 'vllm-sim', 'main.js');

const DEFAULT_WAIT_MS = 10_000;
/** Default bound on one HTTP request, SSE stream or TCP probe, so none can hang a test forever. */
const DEFAULT_IO_TIMEOUT_MS = 30_000;
/** After a process exits, how long its output may still trail in the pipes. */
const PIPE_DRAIN_MS = 1_000;

/** Resolves after `ms` milliseconds. */
export function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** Ports freePort gave out in this process: concurrent tests must not get the same one. */
const givenPorts = new Set<number>();

/**
 * Ports tests listen on are taken below the kernel's ephemeral range (32768–60999 on Linux),
 * where a port found free could be taken a moment later as the local port of some outgoing
 * connection (a test's client, a relay's) and the service's listen then fail. Each jest worker
 * (a process of its own) draws from its own slice, so two workers never pick the same one.
 */
const PORT_BASE = 20_000;
const PORTS_PER_WORKER = 3_000;
const PORT_SLICES = 4;

/**
 * A TCP port on 127.0.0.1 that was free a moment ago (bound, then closed), and never one given out
 * before in this process: two concurrent tests must not start their servers on the same port.
 */
export async function freePort(): Promise<number> {
  const slice = (Number(process.env.JEST_WORKER_ID ?? 1) - 1) % PORT_SLICES;
  const first = PORT_BASE + slice * PORTS_PER_WORKER;
  for (let attempt = 0; attempt < PORTS_PER_WORKER * 2; attempt++) {
    const port = first + Math.floor(Math.random() * PORTS_PER_WORKER);
    if (givenPorts.has(port)) continue;
    const free = await new Promise<boolean>((resolve) => {
      const server = net.createServer();
      server.once('error', () => resolve(false));
      server.listen(port, '127.0.0.1', () => server.close(() => resolve(true)));
    });
    if (free) {
      givenPorts.add(port);
      return port;
    }
  }
  throw new Error(`freePort: no free port in ${first}–${first + PORTS_PER_WORKER - 1}`);
}

/**
 * Polls `fn` until it returns true; rejects with `message` after `timeoutMs`, also when a call of
 * `fn` is still pending at the deadline (each call is raced against the time left).
 */
export async function waitUntil(
  fn: () => boolean | Promise<boolean>,
  timeoutMs = DEFAULT_WAIT_MS,
  intervalMs = 25,
  message = 'condition',
): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  const expired = Symbol('expired');
  for (;;) {
    const attempt = Promise.resolve().then(fn);
    attempt.catch(() => undefined); // a check still pending at the deadline may fail later, unheard
    let timer: NodeJS.Timeout | undefined;
    const outcome = await Promise.race([
      attempt,
      new Promise<typeof expired>((resolve) => (timer = setTimeout(() => resolve(expired), Math.max(deadline - Date.now(), 0)))),
    ]).finally(() => clearTimeout(timer));
    if (outcome === expired) throw new Error(`waitUntil: ${message} not met within ${timeoutMs} ms (its check still pending)`);
    if (outcome) return;
    if (Date.now() > deadline) throw new Error(`waitUntil: ${message} not met within ${timeoutMs} ms`);
    await sleep(intervalMs);
  }
}

/** `value` as a pid if it is a positive integer above 1, else throws (a null pid must not reach kill(-pid)). */
export function requirePid(value: unknown, what = 'pid'): number {
  if (typeof value !== 'number' || !Number.isInteger(value) || value <= 1) {
    throw new Error(`${what} is not a pid: ${String(value)}`);
  }
  return value;
}

/** Sends `signal` to process group `pgid`, refusing anything but a real group (kill(-0) is our own). */
export function signalGroup(pgid: number, signal: NodeJS.Signals): void {
  process.kill(-requirePid(pgid, 'process group'), signal);
}

// ---------------------------------------------------------------------------------------------
// /proc inspection

interface ProcStat {
  pid: number;
  state: string;
  ppid: number;
  pgid: number;
}

function readStat(pid: number): ProcStat | null {
  try {
    const text = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    const fields = text.slice(text.lastIndexOf(')') + 2).split(' ');
    return { pid, state: fields[0], ppid: Number(fields[1]), pgid: Number(fields[2]) };
  } catch {
    return null;
  }
}

function allStats(): ProcStat[] {
  return fs
    .readdirSync('/proc')
    .filter((name) => /^\d+$/.test(name))
    .map((name) => readStat(Number(name)))
    .filter((s): s is ProcStat => s !== null);
}

/** Live (non-zombie) processes whose process group is `pgid`. */
export function groupPids(pgid: number): number[] {
  return allStats()
    .filter((s) => s.pgid === pgid && s.state !== 'Z')
    .map((s) => s.pid);
}

/** True if `pid` exists and is not a zombie. */
export function pidAlive(pid: number): boolean {
  const stat = readStat(pid);
  return stat !== null && stat.state !== 'Z';
}

/** Live descendants of `pid` (children, grandchildren, ...) via the /proc ppid chain. */
export function descendantsOf(pid: number): number[] {
  const stats = allStats().filter((s) => s.state !== 'Z');
  const result: number[] = [];
  const queue = [pid];
  while (queue.length) {
    const parent = queue.shift() as number;
    for (const s of stats) {
      if (s.ppid === parent) {
        result.push(s.pid);
        queue.push(s.pid);
      }
    }
  }
  return result;
}

/** The process's command line as shown by ps (process.title changes show up here). */
export function cmdline(pid: number): string {
  try {
    return fs.readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0').filter(Boolean).join(' ');
  } catch {
    return '';
  }
}

// ---------------------------------------------------------------------------------------------
// Processes

export interface SpawnOptions {
  /** Added to (and overriding) the test process's environment. */
  env?: NodeJS.ProcessEnv;
  cwd?: string;
  /** Lead a new process group (default true), so kill() reaches every descendant. */
  detached?: boolean;
}

export interface ExitStatus {
  code: number | null;
  signal: NodeJS.Signals | null;
}

export interface ProcessHandle {
  child: ChildProcess;
  pid: number;
  /** stdout and stderr lines in arrival order (untagged; see stdoutLines/stderrLines). */
  output: string[];
  stdoutLines: string[];
  stderrLines: string[];
  /** True once the process itself exited (its descendants may live on). */
  exited: boolean;
  exitStatus: ExitStatus | null;
  /** Resolves with the first line (stdout or stderr) matching `re`. */
  waitForLine(re: RegExp, timeoutMs?: number): Promise<string>;
  /** Resolves when the process exits; rejects after `timeoutMs`. */
  waitForExit(timeoutMs?: number): Promise<ExitStatus>;
  /** Signals the whole process group (-pid) if detached, else the process. */
  kill(signal?: NodeJS.Signals): void;
}

/** Process groups started through this harness, for killAll(). */
const spawnedGroups = new Set<number>();

/** Spawns `cmd args` without a shell, collecting its output line by line. */
export function spawnProcess(cmd: string, args: string[], options: SpawnOptions = {}): ProcessHandle {
  const detached = options.detached ?? true;
  const child = spawn(cmd, args, {
    cwd: options.cwd ?? repoRoot,
    env: { ...process.env, ...options.env },
    detached,
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  if (child.pid === undefined) throw new Error(`spawn failed: ${cmd}`);
  const pid = child.pid;
  if (detached) spawnedGroups.add(pid);

  const lineWaiters: Array<{ re: RegExp; resolve: (line: string) => void; reject: (error: Error) => void }> = [];
  const exitWaiters: Array<(status: ExitStatus) => void> = [];
  const handle: ProcessHandle = {
    child,
    pid,
    output: [],
    stdoutLines: [],
    stderrLines: [],
    exited: false,
    exitStatus: null,
    waitForLine(re, timeoutMs = DEFAULT_WAIT_MS) {
      const found = handle.output.find((l) => re.test(l));
      if (found !== undefined) return Promise.resolve(found);
      const exitedFirst = (): Error =>
        new Error(
          `process ${pid} exited (${JSON.stringify(handle.exitStatus)}) with no line matching ${re}; output:\n${handle.output.join('\n')}`,
        );
      if (handle.exited) return Promise.reject(exitedFirst());
      return new Promise((resolve, reject) => {
        const waiter = {
          re,
          resolve: (line: string) => (clearTimeout(timer), resolve(line)),
          reject: (error: Error) => (clearTimeout(timer), reject(error)),
        };
        const timer = setTimeout(() => {
          lineWaiters.splice(lineWaiters.indexOf(waiter), 1);
          reject(new Error(`no line matching ${re} within ${timeoutMs} ms; output:\n${handle.output.join('\n')}`));
        }, timeoutMs);
        lineWaiters.push(waiter);
      });
    },
    waitForExit(timeoutMs = DEFAULT_WAIT_MS) {
      if (handle.exitStatus) return Promise.resolve(handle.exitStatus);
      return new Promise((resolve, reject) => {
        const timer = setTimeout(
          () => reject(new Error(`process ${pid} did not exit within ${timeoutMs} ms`)),
          timeoutMs,
        );
        exitWaiters.push((status) => (clearTimeout(timer), resolve(status)));
      });
    },
    kill(signal = 'SIGKILL') {
      try {
        process.kill(detached ? -pid : pid, signal);
      } catch {
        // already gone
      }
    },
  };

  const collect = (stream: NodeJS.ReadableStream, lines: string[]): void => {
    let pending = '';
    stream.setEncoding('utf8');
    stream.on('data', (chunk: string) => {
      pending += chunk;
      const parts = pending.split('\n');
      pending = parts.pop() ?? '';
      for (const raw of parts) {
        const line = raw.replace(/\r$/, '');
        lines.push(line);
        handle.output.push(line);
        for (const waiter of [...lineWaiters]) {
          if (waiter.re.test(line)) {
            lineWaiters.splice(lineWaiters.indexOf(waiter), 1);
            waiter.resolve(line);
          }
        }
      }
    });
  };
  collect(child.stdout as NodeJS.ReadableStream, handle.stdoutLines);
  collect(child.stderr as NodeJS.ReadableStream, handle.stderrLines);
  // 'exit', not 'close': an orphaned grandchild may keep the pipes open after the child died.
  // 'exit' fires before the pipes are drained: the last lines would be missing from `output`.
  // Wait for both streams to end too, but not for long: an orphaned grandchild may hold them open.
  const drained = Promise.all(
    [child.stdout, child.stderr].map((stream) => new Promise<void>((resolve) => stream?.once('close', () => resolve()))),
  );
  child.on('exit', (code, signal) => {
    void Promise.race([drained, sleep(PIPE_DRAIN_MS)]).then(() => {
      handle.exited = true;
      handle.exitStatus = { code, signal };
      for (const waiter of exitWaiters.splice(0)) waiter(handle.exitStatus);
      // Every line is in by now (or the pipes are held by an orphan): no awaited line will come.
      for (const waiter of lineWaiters.splice(0)) {
        waiter.reject(
          new Error(
            `process ${pid} exited (${JSON.stringify(handle.exitStatus)}) with no line matching ${waiter.re}; output:\n${handle.output.join('\n')}`,
          ),
        );
      }
    });
  });
  return handle;
}

/**
 * SIGKILLs every process group spawned through the harness (orphaned engines included); throws,
 * failing the suite, if any of their processes survive it.
 */
export async function killAll(): Promise<void> {
  const groups = [...spawnedGroups];
  spawnedGroups.clear();
  for (const pgid of groups) {
    try {
      process.kill(-pgid, 'SIGKILL');
    } catch {
      // group already empty
    }
  }
  const survivors = (): number[] => groups.flatMap((g) => groupPids(g));
  try {
    await waitUntil(() => survivors().length === 0, 5_000, 25, 'every spawned process group gone');
  } catch {
    const left = survivors().map((pid) => `${pid}: ${cmdline(pid)}`);
    if (left.length) throw new Error(`killAll: processes survived SIGKILL:\n${left.join('\n')}`);
  }
}

/** Fails (after SIGKILLing the leftovers) if any process of group `pgid` is still alive. */
export async function expectNoProcessLeft(pgid: number, timeoutMs = 5_000): Promise<void> {
  // A null or undefined pid (`x as number`) would find no process and pass for nothing.
  if (!(Number.isInteger(pgid) && pgid > 1)) throw new Error(`expectNoProcessLeft: not a process group id: ${String(pgid)}`);
  try {
    await waitUntil(() => groupPids(pgid).length === 0, timeoutMs);
  } catch {
    const left = groupPids(pgid).map((pid) => `${pid}: ${cmdline(pid)}`);
    try {
      process.kill(-pgid, 'SIGKILL');
    } catch {
      // raced with exit
    }
    throw new Error(`processes left in group ${pgid}:\n${left.join('\n')}`);
  }
}

// ---------------------------------------------------------------------------------------------
// HTTP

export interface HttpOptions {
  method?: string;
  headers?: Record<string, string>;
  /** A string is sent as is; anything else as JSON (with content-type application/json). */
  body?: unknown;
  signal?: AbortSignal;
  /** Rejects (and drops the connection) if the whole answer is not in by then; default 30 s. */
  timeoutMs?: number;
}

export interface HttpResponse {
  status: number;
  headers: IncomingHttpHeaders;
  body: string;
}

/** Agent without keep-alive, so a test never holds a connection open after a response. */
const agent = new http.Agent({ keepAlive: false });

function encodeBody(options: HttpOptions): { headers: Record<string, string>; payload?: string | Buffer } {
  const headers = { ...options.headers };
  if (options.body === undefined) return { headers };
  if (typeof options.body === 'string' || Buffer.isBuffer(options.body)) return { headers, payload: options.body };
  if (!Object.keys(headers).some((h) => h.toLowerCase() === 'content-type')) {
    headers['content-type'] = 'application/json';
  }
  return { headers, payload: JSON.stringify(options.body) };
}

/** One HTTP request over node:http; resolves with status, headers and the body text. */
export function httpRequest(url: string, options: HttpOptions = {}): Promise<HttpResponse> {
  const { headers, payload } = encodeBody(options);
  const method = options.method ?? (payload === undefined ? 'GET' : 'POST');
  const timeoutMs = options.timeoutMs ?? DEFAULT_IO_TIMEOUT_MS;
  let timer: NodeJS.Timeout | undefined;
  return new Promise<HttpResponse>((resolve, reject) => {
    const req = http.request(url, { method, headers, agent, signal: options.signal }, (res) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (chunk: string) => (body += chunk));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, headers: res.headers, body }));
      res.on('error', reject);
    });
    timer = setTimeout(() => {
      reject(new Error(`httpRequest ${method} ${url}: timeout, no complete answer within ${timeoutMs} ms`));
      req.destroy();
    }, timeoutMs);
    req.on('error', reject);
    req.end(payload);
  }).finally(() => clearTimeout(timer));
}

export interface SseOptions extends HttpOptions {
  /** Disconnect (destroy the socket) after this many events have arrived. */
  stopAfterEvents?: number;
  /** Called for every event's data as it arrives. */
  onEvent?: (data: string, index: number) => void;
}

export interface SseResult {
  status: number;
  headers: IncomingHttpHeaders;
  /** The `data:` payload of each event, in order (e.g. a JSON chunk or `[DONE]`). */
  events: string[];
  /** Everything received, byte for byte. */
  raw: string;
  /** True if we disconnected because of stopAfterEvents. */
  disconnected: boolean;
}

/**
 * POSTs `body` and reads the server-sent-event stream to its end (or stopAfterEvents); rejects if
 * the stream has not ended within `timeoutMs` (default 30 s).
 */
export function readSse(url: string, body: unknown, options: SseOptions = {}): Promise<SseResult> {
  const { headers, payload } = encodeBody({ ...options, body });
  const timeoutMs = options.timeoutMs ?? DEFAULT_IO_TIMEOUT_MS;
  let timer: NodeJS.Timeout | undefined;
  return new Promise<SseResult>((resolve, reject) => {
    let events = 0;
    timer = setTimeout(() => {
      reject(new Error(`readSse ${url}: timeout, the stream did not end within ${timeoutMs} ms (${events} events in)`));
      req.destroy();
    }, timeoutMs);
    const req = http.request(
      url,
      { method: options.method ?? 'POST', headers, agent, signal: options.signal },
      (res) => {
        const result: SseResult = {
          status: res.statusCode ?? 0,
          headers: res.headers,
          events: [],
          raw: '',
          disconnected: false,
        };
        let buffer = '';
        res.setEncoding('utf8');
        res.on('data', (chunk: string) => {
          result.raw += chunk;
          buffer += chunk;
          let sep: number;
          while ((sep = buffer.indexOf('\n\n')) !== -1) {
            const event = buffer.slice(0, sep);
            buffer = buffer.slice(sep + 2);
            const data = event
              .split('\n')
              .filter((l) => l.startsWith('data: '))
              .map((l) => l.slice('data: '.length))
              .join('\n');
            result.events.push(data);
            events = result.events.length;
            options.onEvent?.(data, result.events.length - 1);
            if (options.stopAfterEvents !== undefined && result.events.length >= options.stopAfterEvents) {
              result.disconnected = true;
              req.destroy();
              resolve(result);
              return;
            }
          }
        });
        res.on('end', () => resolve(result));
        res.on('error', () => resolve(result));
        res.on('close', () => resolve(result));
      },
    );
    req.on('error', reject);
    req.end(payload);
  }).finally(() => clearTimeout(timer));
}

/**
 * Tries a TCP connection; resolves 'connected', or the error code (e.g. 'ECONNREFUSED'); rejects
 * if neither comes within `timeoutMs` (default 30 s).
 */
export function probeConnect(port: number, host = '127.0.0.1', timeoutMs = DEFAULT_IO_TIMEOUT_MS): Promise<string> {
  return new Promise((resolve, reject) => {
    const socket = net.connect({ port, host });
    const timer = setTimeout(() => {
      reject(new Error(`probeConnect ${host}:${port}: timeout, no connection or error within ${timeoutMs} ms`));
      socket.destroy();
    }, timeoutMs);
    socket.once('close', () => clearTimeout(timer));
    socket.once('connect', () => {
      // Nothing listening, yet "connected": Linux's TCP self-connect, when the ephemeral source
      // port it picked is the port probed (free ports are taken from the same range).
      const self = socket.localPort === port;
      socket.destroy();
      resolve(self ? 'ECONNREFUSED' : 'connected');
    });
    socket.once('error', (error: NodeJS.ErrnoException) => resolve(error.code ?? 'error'));
  });
}

// ---------------------------------------------------------------------------------------------
// The vLLM simulator

export interface StartSimOptions {
  /** Model name for `serve MODEL` (default 'sim-model'). */
  model?: string;
  /** Port (default: a free one). */
  port?: number;
  /** Extra CLI flags after `serve MODEL --port P --host 127.0.0.1`. */
  args?: string[];
  /** Extra environment (VLLM_SIM_LOAD_SECONDS defaults to 0.2 here). */
  env?: NodeJS.ProcessEnv;
  /** Wait until GET /v1/models answers 200 (default true). */
  ready?: boolean;
  readyTimeoutMs?: number;
  /** Headers for the readiness probe (e.g. an Authorization header with --api-key). */
  readyHeaders?: Record<string, string>;
}

export interface SimHandle extends ProcessHandle {
  port: number;
  baseUrl: string;
  /** SIGTERM the group, wait for exit (SIGKILL after `timeoutMs`), check nothing is left. */
  stop(timeoutMs?: number): Promise<ExitStatus>;
}

/** Starts the compiled simulator as `node simMain serve MODEL --port P --host 127.0.0.1 ...`. */
export async function startSim(options: StartSimOptions = {}): Promise<SimHandle> {
  const port = options.port ?? (await freePort());
  const model = options.model ?? 'sim-model';
  const handle = spawnProcess(
    process.execPath,
    [simMain, 'serve', model, '--port', String(port), '--host', '127.0.0.1', ...(options.args ?? [])],
    { env: { VLLM_SIM_LOAD_SECONDS: '0.2', ...options.env } },
  );
  const baseUrl = `http://127.0.0.1:${port}`;
  const sim: SimHandle = Object.assign(handle, {
    port,
    baseUrl,
    async stop(timeoutMs = 10_000): Promise<ExitStatus> {
      handle.kill('SIGTERM');
      let status: ExitStatus;
      try {
        status = await handle.waitForExit(timeoutMs);
      } catch {
        handle.kill('SIGKILL');
        status = await handle.waitForExit(timeoutMs);
      }
      await expectNoProcessLeft(handle.pid);
      return status;
    },
  });
  if (options.ready ?? true) {
    await waitUntil(
      async () => {
        if (handle.exited) {
          throw new Error(`simulator exited during start-up:\n${handle.output.join('\n')}`);
        }
        try {
          const res = await httpRequest(`${baseUrl}/v1/models`, { headers: options.readyHeaders });
          return res.status === 200;
        } catch {
          return false;
        }
      },
      options.readyTimeoutMs ?? 15_000,
      25,
      `simulator on port ${port} ready`,
    );
  }
  return sim;
}

/**
 * Sends `raw` (an HTTP request cut short) on a new connection and collects what comes back until
 * the server closes it, or `waitMs` passes: the head's lines, the body, and whether it closed.
 */
export async function sendPartial(port: number, raw: string, waitMs = 5_000): Promise<{ head: string[]; body: string; closed: boolean }> {
  const socket = net.connect(port, '127.0.0.1');
  socket.on('error', () => undefined);
  let received = '';
  socket.on('data', (chunk: Buffer) => (received += chunk.toString()));
  const closed = new Promise<void>((resolve) => socket.on('close', () => resolve()));
  socket.write(raw);
  await Promise.race([closed, sleep(waitMs)]);
  const isClosed = socket.destroyed;
  socket.destroy();
  const [head, body = ''] = received.split('\r\n\r\n');
  return { head: head.split('\r\n'), body, closed: isClosed };
}
