/**
 * SGLang mode: `main.js sglang serve --model-path M ...` behaves like `sglang serve`
 * (python/sglang/srt/entrypoints/http_server.py launch_server, entrypoints/engine.py,
 * managers/tokenizer_manager.py):
 *
 * 1. argparse (exit 2 on errors), `server_args=ServerArgs(...)`;
 * 2. the `sglang::scheduler` and `sglang::detokenizer` children load the model while the port is
 *    not even bound (ECONNREFUSED); they die with this process (PR_SET_PDEATHSIG);
 * 3. uvicorn starts and listens; a warm-up thread waits 1 s, asks /model_info and sends a real
 *    /generate (/encode for an --is-embedding model); only then the status is Up (`The server is fired up and ready to roll!`) and
 *    /health stops answering 503;
 * 4. SIGTERM (once the TokenizerManager's loop runs): /health → 503, the sigterm watchdog drains
 *    the requests (`Gracefully exiting... Remaining number of requests N` every 5 s), stops the
 *    children and exits 0. A child failure SIGQUITs this process, which kills the whole tree.
 */
import { ChildProcess, fork } from 'node:child_process';
import http from 'node:http';
import path from 'node:path';
import { EngineClient, EngineStartError } from '../engine-client';
import { SimSettings, engineSettings, readSimSettings } from '../faults';
import type { EngineConfig } from '../ipc';
import { ignorePipeErrors } from '../log';
import { pyOsError, pyRepr, pyTraceback } from '../python-format';
import { SimTokenizer } from '../tokenizer';
import { SglangArgs, SglangCliException, SIM_SGLANG_VERSION, parseSglangCli, serverArgsRepr } from './cli';
import type { SglContext } from './context';
import { SglangLogger } from './log';
import { SglangMetrics } from './metrics';
import { SglServer } from './server';

/** KV-cache tokens the simulated GPU holds at --mem-fraction-static 1.0. */
const KV_TOKENS_AT_FULL_MEMORY = 200_000;
/** _execute_server_warmup: tries to reach the server this many times, a second apart. */
const WARMUP_TRIES = 120;
const WARMUP_INTERVAL_MS = 1000;
/** After ShutdownReq the manager waits this long for the schedulers to exit. */
const SHUTDOWN_WAIT_S = 15;
/** How often the API server checks whether its launching parent is gone (simulator safety net). */
const ORPHAN_POLL_MS = 2000;

const ENGINE_SCRIPT = path.join(__dirname, '..', 'engine.js');
const launchParent = process.ppid;

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** The scheduler's log prefix and process-title suffix for a rank (` PP0 TP1`). */
function rankPrefix(args: SglangArgs, pp: number, tp: number): string {
  let prefix = '';
  if (args.ppSize > 1) prefix += ` PP${pp}`;
  if (args.tpSize > 1) prefix += ` TP${tp}`;
  return prefix;
}

function engineConfig(args: SglangArgs, settings: SimSettings, kvTokens: number): EngineConfig {
  const prefix = rankPrefix(args, 0, 0);
  return {
    model: args.modelPath,
    maxModelLen: args.contextLength,
    maxNumSeqs: args.maxRunningRequests,
    tensorParallelSize: args.tpSize,
    pipelineParallelSize: args.ppSize,
    shutdownTimeoutSeconds: 0,
    kvCacheTokens: kvTokens,
    ...engineSettings(settings),
    version: SIM_SGLANG_VERSION,
    flavor: 'sglang',
    processTitle: `sglang::scheduler${prefix.replace(/ /g, '_')}`,
    logPrefix: prefix,
    maxQueuedRequests: args.maxQueuedRequests,
    logLevel: args.logLevel,
  };
}

/** The address the warm-up thread connects to (server_args.url()). */
function connectHost(host: string): string {
  if (host === '0.0.0.0' || host === '') return '127.0.0.1';
  if (host === '::') return '::1';
  return host;
}

interface SimpleResponse {
  status: number;
  body: string;
}

function request(url: string, method: string, headers: Record<string, string>, body?: unknown): Promise<SimpleResponse> {
  return new Promise((resolve, reject) => {
    const payload = body === undefined ? undefined : JSON.stringify(body);
    const req = http.request(
      url,
      {
        method,
        agent: false,
        headers: payload ? { ...headers, 'content-type': 'application/json' } : headers,
        timeout: 600_000,
      },
      (res) => {
        let text = '';
        res.setEncoding('utf8');
        res.on('data', (chunk: string) => (text += chunk));
        res.on('end', () => resolve({ status: res.statusCode ?? 0, body: text }));
      },
    );
    req.on('error', reject);
    req.end(payload);
  });
}

class SglangProcess {
  private readonly log: SglangLogger;
  private readonly settings = readSimSettings();
  private readonly children: ChildProcess[] = [];
  private engine: EngineClient | null = null;
  private ctx: SglContext | null = null;
  private server: SglServer | null = null;
  private handleLoop = false;
  private shuttingDown = false;

  constructor(private readonly args: SglangArgs) {
    this.log = new SglangLogger({
      level: args.logLevel,
      httpLevel: args.logLevelHttp,
      accessLogExcludePrefixes: args.accessLogExcludePrefixes,
    });
  }

  /** kill_process_tree: SIGKILL every child (the scheduler included). */
  private killChildren(): void {
    this.engine?.kill();
    for (const child of this.children) child.kill('SIGKILL');
  }

  /** kill_process_tree(os.getpid()) including the parent: the process SIGKILLs itself. */
  private killTree(): void {
    this.killChildren();
    process.kill(process.pid, 'SIGKILL');
  }

  async run(): Promise<void> {
    const { args, settings, log } = this;
    const startedAt = Date.now();
    // A child that fails sends SIGQUIT (launch_phase_sigquit_handler / running_phase_sigquit_handler).
    process.on('SIGQUIT', () => {
      log.error('Received sigquit from a child process. It usually means the child failed.');
      this.killTree();
    });
    // During start-up no SIGTERM handler exists: the default action ends the process and the
    // children follow through their parent-death signal. VLLM_SIM_IGNORE_SIGTERM overrides it.
    if (settings.ignoreSigterm) for (const signal of ['SIGTERM', 'SIGINT'] as const) process.on(signal, () => undefined);

    log.info(`server_args=${serverArgsRepr(args)}`);
    const kvTokens = args.maxTotalTokens ?? Math.floor(KV_TOKENS_AT_FULL_MEMORY * args.memFractionStatic);
    const engine = (this.engine = new EngineClient(engineConfig(args, settings, kvTokens)));
    const started = engine.start();
    this.spawnChildren();
    log.info('Using default HuggingFace chat template with detected content format: string');
    try {
      await started;
    } catch (error) {
      if (!(error instanceof EngineStartError)) throw error;
      log.error('Rank 0 scheduler is dead. Please check if there are relevant logs.');
      log.error(`Exit code: ${error.exitCode ?? -1}`);
      this.killChildren();
      log.stderrLines(
        pyTraceback(
          [
            ['sglang/srt/entrypoints/http_server.py', 1420, 'launch_server', 'tokenizer_manager, template_manager, scheduler_info, port_args = _launch_subprocesses('],
            ['sglang/srt/entrypoints/engine.py', 1012, '_launch_subprocesses', 'data = scheduler_pipe_readers[i].recv()'],
          ],
          'EOFError',
        ),
      );
      process.exit(1);
    }
    engine.onDeath(() => {
      const info = engine.exitInfo;
      const status = info?.signal ? signalNumber(info.signal) : (info?.code ?? 0) << 8;
      log.warning(`Child process unexpectedly failed with exitcode=${status}. pid=${engine.pid}`);
    });

    const ctx = this.buildContext(kvTokens, startedAt);
    for (const lora of args.loraPaths) ctx.loras.set(lora.lora_name, lora);
    const server = (this.server = new SglServer(ctx));
    await this.serve(server);
  }

  /** The detokenizer and the scheduler ranks beyond the first: they only die with us. */
  private spawnChildren(): void {
    const { args } = this;
    const titles: string[] = [];
    for (let pp = 0; pp < args.ppSize; pp += 1) {
      for (let tp = 0; tp < args.tpSize; tp += 1) {
        if (pp === 0 && tp === 0) continue;
        titles.push(`sglang::scheduler${rankPrefix(args, pp, tp).replace(/ /g, '_')}`);
      }
    }
    titles.push('sglang::detokenizer');
    for (const title of titles) {
      const child = fork(ENGINE_SCRIPT, ['--sglang-child', title], { stdio: ['ignore', 'inherit', 'inherit', 'ipc'] });
      child.on('error', () => undefined);
      this.children.push(child);
    }
  }

  private buildContext(kvTokens: number, startedAt: number): SglContext {
    const { args, settings, log } = this;
    const ctx: SglContext = {
      args,
      settings,
      log,
      engine: this.engine as EngineClient,
      metrics: new SglangMetrics(args.servedModelName, (Date.now() - startedAt) / 1000),
      tokenizer: new SimTokenizer(),
      loras: new Map(),
      status: 'Starting',
      gracefullyExit: false,
      inflight: new Map(),
      kvTokens,
      lastReceive: 0,
      acceptedRequests: 0,
      completedRequests: 0,
      releasedTags: new Set(),
      responses: new Map(),
      ensureHandleLoop: () => this.ensureHandleLoop(),
    };
    this.ctx = ctx;
    return ctx;
  }

  /** uvicorn.run: start-up lines, bind + listen, then the warm-up thread. */
  private async serve(server: SglServer): Promise<void> {
    const { args, log } = this;
    log.uvicorn('INFO', `Started server process [${process.pid}]`);
    log.uvicorn('INFO', 'Waiting for application startup.');
    log.uvicorn('INFO', 'Application startup complete.');
    try {
      await server.listen();
    } catch (error) {
      // asyncio's create_server: `[Errno N] error while attempting to bind on address (h, p): strerror`.
      const { errno, strerror } = pyOsError(error as NodeJS.ErrnoException);
      const address = `(${pyRepr(args.host)}, ${args.port})`;
      log.uvicorn('ERROR', `[Errno ${errno}] error while attempting to bind on address ${address}: ${strerror.toLowerCase()}`);
      log.uvicorn('INFO', 'Waiting for application shutdown.');
      log.uvicorn('INFO', 'Application shutdown complete.');
      this.killChildren();
      process.exit(1);
    }
    const shown = args.host.includes(':') ? `[${args.host}]` : args.host;
    log.uvicorn('INFO', `Uvicorn running on http://${shown}:${args.port} (Press CTRL+C to quit)`);
    if (!this.settings.ignoreSigterm) {
      process.on('SIGTERM', () => this.onSigterm());
      process.on('SIGINT', () => void this.uvicornShutdown('SIGINT'));
    }
    this.exitWhenOrphaned();
    void this.warmup();
  }

  /** _wait_and_warmup / _execute_server_warmup. */
  private async warmup(): Promise<void> {
    const { args, log } = this;
    const ctx = this.ctx as SglContext;
    if (args.skipServerWarmup) {
      ctx.status = 'Up';
      log.info('The server is fired up and ready to roll!');
      return;
    }
    const url = `http://${connectHost(args.host).includes(':') ? `[${connectHost(args.host)}]` : connectHost(args.host)}:${args.port}`;
    const headers: Record<string, string> = args.apiKey ? { authorization: `Bearer ${args.apiKey}` } : {};
    let lastError = '';
    let reached = false;
    for (let i = 0; i < WARMUP_TRIES && !reached; i += 1) {
      await sleep(WARMUP_INTERVAL_MS);
      try {
        const res = await request(`${url}/model_info`, 'GET', headers);
        if (res.status === 200) reached = true;
        else lastError = `AssertionError: res=<Response [${res.status}]>, res.text='${res.body}'`;
      } catch (error) {
        lastError = `requests.exceptions.ConnectionError: ${(error as Error).message}`;
      }
    }
    if (!reached) return this.warmupFailed(lastError);
    log.info('Start of co-locate warmup ...');
    try {
      // An embedding model (--is-embedding, /model_info is_generation false) warms up on /encode.
      const res = await request(
        `${url}${args.isEmbedding ? '/encode' : '/generate'}`,
        'POST',
        { ...headers, 'x-sim-warmup': '1' },
        { sampling_params: { temperature: 0, max_new_tokens: args.isEmbedding ? 1 : 8 }, text: 'The capital city of France is' },
      );
      if (res.status !== 200) return this.warmupFailed(`AssertionError: ${res.body}`);
    } catch (error) {
      return this.warmupFailed(`requests.exceptions.ConnectionError: ${(error as Error).message}`);
    }
    ctx.status = 'Up';
    log.info('The server is fired up and ready to roll!');
  }

  private warmupFailed(detail: string): void {
    this.log.error(`Initialization failed. warmup error: Traceback (most recent call last):\n${detail}`);
    this.killTree();
  }

  /**
   * The TokenizerManager's handle loop starts with its first request; with it SGLang installs its
   * own SIGTERM handler and the sigterm watchdog (before that, uvicorn handles SIGTERM).
   */
  private ensureHandleLoop(): void {
    if (this.handleLoop) return;
    this.handleLoop = true;
    void this.sigtermWatchdog();
  }

  private onSigterm(): void {
    if (!this.handleLoop) {
      void this.uvicornShutdown('SIGTERM');
      return;
    }
    const ctx = this.ctx as SglContext;
    this.log.warning('SIGTERM received. signum=None frame=None. Draining requests and shutting down...');
    ctx.gracefullyExit = true;
  }

  /** tokenizer_manager.sigterm_watchdog. */
  private async sigtermWatchdog(): Promise<void> {
    const ctx = this.ctx as SglContext;
    const periodMs = this.settings.watchdogSeconds * 1000;
    while (!ctx.gracefullyExit) await sleep(periodMs);
    for (;;) {
      const rids = [...ctx.inflight.keys()];
      if (ctx.status === 'UnHealthy') {
        this.log.error('Signal SIGTERM received while health check failed. Force exiting.');
        break;
      }
      if (['1', 'true'].includes((process.env.SGL_FORCE_SHUTDOWN ?? '').toLowerCase())) {
        this.log.error('Signal SIGTERM received while force shutdown flag set. Force exiting.');
        break;
      }
      this.log.info(
        `Gracefully exiting... Remaining number of requests ${rids.length}. Remaining requests remaining_rids=${pyRepr(rids)}.`,
      );
      if (rids.length === 0) break;
      await sleep(periodMs);
    }
    // ShutdownReq to the schedulers, wait for them, then kill the tree and sys.exit(0).
    await (this.engine as EngineClient).shutdown(SHUTDOWN_WAIT_S);
    this.killChildren();
    process.exit(0);
  }

  /** uvicorn's own signal handling (before the handle loop exists, and for SIGINT). */
  private async uvicornShutdown(signal: 'SIGTERM' | 'SIGINT'): Promise<void> {
    if (this.shuttingDown) return;
    this.shuttingDown = true;
    await (this.server as SglServer).shutdown();
    // uvicorn re-raises the captured signal; its default action ends the process.
    this.killChildren();
    process.removeAllListeners(signal);
    process.kill(process.pid, signal);
  }

  /** Simulator safety net: exit VLLM_SIM_ORPHAN_EXIT_S after the launching parent is gone. */
  private exitWhenOrphaned(): void {
    const poll = setInterval(() => {
      if (process.ppid === launchParent) return;
      clearInterval(poll);
      const seconds = this.settings.orphanExitSeconds;
      setTimeout(() => {
        this.log.warning(`Parent process gone for ${seconds}s; the simulator exits.`);
        this.killChildren();
        process.exit(0);
      }, seconds * 1000);
    }, ORPHAN_POLL_MS);
    poll.unref();
  }
}

const SIGNAL_NUMBERS: Partial<Record<NodeJS.Signals, number>> = {
  SIGHUP: 1,
  SIGINT: 2,
  SIGQUIT: 3,
  SIGKILL: 9,
  SIGSEGV: 11,
  SIGTERM: 15,
};

function signalNumber(signal: NodeJS.Signals): number {
  return SIGNAL_NUMBERS[signal] ?? 0;
}

/** Entry point of the SGLang mode (argv after `sglang`). */
export async function runSglang(argv: string[]): Promise<void> {
  ignorePipeErrors();
  let outcome;
  try {
    outcome = parseSglangCli(argv);
  } catch (error) {
    if (!(error instanceof SglangCliException)) throw error;
    process.stderr.write(
      pyTraceback(
        [
          ['/usr/local/bin/sglang', 8, '<module>', 'sys.exit(main())'],
          ['sglang/srt/server_args.py', 5120, 'prepare_server_args', 'raw_args = parser.parse_args(argv)'],
        ],
        error.message,
      ).join('\n') + '\n',
    );
    process.exit(1);
  }
  if (outcome.kind === 'exit') {
    process.stdout.write(outcome.stdout);
    process.stderr.write(outcome.stderr);
    process.exit(outcome.code);
  }
  await new SglangProcess(outcome.args).run();
}
