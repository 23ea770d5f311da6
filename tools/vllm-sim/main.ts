#!/usr/bin/env node
/**
 * vLLM simulator entry point: `node dist/tools/vllm-sim/main.js serve MODEL [flags]` behaves like
 * `vllm serve`, anything else like `python -m vllm.entrypoints.openai.api_server`;
 * `main.js sglang serve ...` runs the SGLang mode (tools/vllm-sim/sglang/main.ts).
 *
 * Start-up follows vLLM: parse the CLI, log the version and non-default args, bind-check the port
 * (an occupied port fails at once with OSError Errno 98, any other bind error with Python's error
 * for it), start the EngineCore child and wait for it to load the model while the port refuses
 * connections, then listen and serve. SIGTERM/SIGINT run vLLM's shutdown sequence; engine death
 * is noticed by a watchdog that stops the server. See tools/vllm-sim/README.md.
 */
import { createHash } from 'node:crypto';
import net from 'node:net';
import { CliTypeError, CliValueError, ServeArgs, SIM_VLLM_VERSION, parseCli } from './cli';
import type { SimContext } from './context';
import { EngineClient, EngineReadyTimeout, EngineStartError } from './engine-client';
import { SimSettings, engineSettings, readSimSettings } from './faults';
import type { EngineConfig } from './ipc';
import { VllmLogger, ignorePipeErrors } from './log';
import { SimMetrics } from './metrics';
import {
  PyFrame,
  PyTuple,
  pyOsError,
  pyOsErrorLine,
  pyRepr,
  pyTraceback,
  VLLM_CLI_FRAMES,
} from './python-format';
import { LORA_NOT_ENABLED, SimServer } from './server';
import { runSglang } from './sglang/main';
import { SimTokenizer } from './tokenizer';

/** KV-cache tokens the simulated GPU holds at --gpu-memory-utilization 1.0. */
const KV_TOKENS_AT_FULL_MEMORY = 200_000;
/** How often the API server checks whether its parent process is gone. */
const ORPHAN_POLL_MS = 2000;
/** VLLM_LOG_STATS_INTERVAL default (seconds). */
const DEFAULT_STATS_INTERVAL_S = 10;
const API_SERVER = 'vllm/entrypoints/openai/api_server.py';

const log = new VllmLogger();
/** The process that launched us; if it goes away we are orphaned (see exitWhenOrphaned). */
const launchParent = process.ppid;

/** Frames from the entry point down to run_server, for tracebacks raised while serving. */
function serverFrames(args: ServeArgs): PyFrame[] {
  const entry: PyFrame[] =
    args.entrypoint === 'serve'
      ? [...VLLM_CLI_FRAMES]
      : [[API_SERVER, 2047, '<module>', 'uvloop.run(run_server(args))']];
  return [
    ...entry,
    ['uvloop/__init__.py', 96, 'run', 'return __asyncio.run('],
    ['/usr/lib/python3.12/asyncio/runners.py', 194, 'run', 'return runner.run(main)'],
    ['/usr/lib/python3.12/asyncio/runners.py', 118, 'run', 'return self._loop.run_until_complete(task)'] as PyFrame,
  ];
}

/** VLLM_ENGINE_READY_TIMEOUT_S (vllm/envs.py: `int(os.getenv(..., "600"))`). */
function engineReadyTimeoutS(): number {
  const value = Number(process.env.VLLM_ENGINE_READY_TIMEOUT_S ?? '600');
  return Number.isInteger(value) && value > 0 ? value : 600;
}

function fail(lines: string[], code = 1): never {
  log.stderrLines(lines);
  process.exit(code);
}

/** `sock.bind(addr)` failed: the traceback ends in Python's error for it (Errno 98, 99, 13 ...). */
function bindFailed(args: ServeArgs, error: NodeJS.ErrnoException): never {
  fail(
    pyTraceback(
      [
        ...serverFrames(args),
        [API_SERVER, 1874, 'run_server', 'listen_address, sock = setup_server(args)'],
        [API_SERVER, 1829, 'setup_server', 'sock = create_server_socket(sock_addr)'],
        [API_SERVER, 1762, 'create_server_socket', 'sock.bind(addr)'],
      ],
      pyOsErrorLine(pyOsError(error)),
    ),
  );
}

/**
 * vLLM binds before loading and listens after; Node cannot bind without listening, so the port
 * is test-bound here (listen + close) and really bound once the model is loaded. Resolves with
 * the bind error (an occupied port, an address not on this host, a privileged port), or null.
 */
function checkBind(args: ServeArgs): Promise<NodeJS.ErrnoException | null> {
  if (args.uds) return Promise.resolve(null);
  return new Promise((resolve) => {
    const probe = net.createServer();
    probe.once('error', (error: NodeJS.ErrnoException) => resolve(error));
    probe.listen({ host: args.host ?? '0.0.0.0', port: args.port, exclusive: true }, () =>
      probe.close(() => resolve(null)),
    );
  });
}

function logVersionAndModel(args: ServeArgs): void {
  const fileinfo = 'utils.py:299';
  if (process.env.VLLM_DISABLE_LOG_LOGO === '1') {
    log.info(fileinfo, `vLLM server version ${SIM_VLLM_VERSION}, serving model ${args.model}`);
    return;
  }
  log.info(
    fileinfo,
    '\n       █     █     █▄   ▄█\n' +
      ` ▄▄ ▄█ █     █     █ ▀▄▀ █  version ${SIM_VLLM_VERSION}\n` +
      `  █▄█▀ █     █     █     █  model   ${args.model}\n` +
      '   ▀▀  ▀▀▀▀▀ ▀▀▀▀▀ ▀     ▀\n',
  );
}

/** `vllm-<version>[-tp<N>][-pp<N>][-dp<N>]-<hash8>` (--fingerprint-mode full). */
function systemFingerprint(args: ServeArgs): string | null {
  if (args.fingerprintMode === 'none') return null;
  if (args.fingerprintMode === 'custom') return args.fingerprintValue;
  const hash = createHash('sha256').update(args.nonDefaultArgs).digest('hex').slice(0, 8);
  let parallel = '';
  if (args.fingerprintMode === 'full') {
    if (args.tensorParallelSize > 1) parallel += `-tp${args.tensorParallelSize}`;
    if (args.pipelineParallelSize > 1) parallel += `-pp${args.pipelineParallelSize}`;
    if (args.dataParallelSize > 1) parallel += `-dp${args.dataParallelSize}`;
  }
  return `vllm-${SIM_VLLM_VERSION}${parallel}-${hash}`;
}

function engineConfig(args: ServeArgs, settings: SimSettings, kvCacheTokens: number): EngineConfig {
  return {
    model: args.model,
    maxModelLen: args.maxModelLen,
    maxNumSeqs: args.maxNumSeqs,
    tensorParallelSize: args.tensorParallelSize,
    pipelineParallelSize: args.pipelineParallelSize,
    shutdownTimeoutSeconds: args.shutdownTimeout,
    kvCacheTokens,
    ...engineSettings(settings),
    version: SIM_VLLM_VERSION,
  };
}

/**
 * SIGTERM/SIGINT before serving: vLLM's `_interrupt_init` raises KeyboardInterrupt, the engine
 * is stopped while unwinding, and Python ends an uncaught KeyboardInterrupt by re-raising SIGINT
 * (exit status 130 in a shell).
 */
function interruptStartup(
  args: ServeArgs,
  engine: EngineClient | null,
  signal: NodeJS.Signals,
): void {
  const exception = signal === 'SIGTERM' ? 'KeyboardInterrupt: terminated' : 'KeyboardInterrupt';
  void (engine ? engine.shutdown(0) : Promise.resolve()).then(() => {
    log.stderrLines(pyTraceback(serverFrames(args), exception));
    process.removeAllListeners('SIGINT');
    process.removeAllListeners('SIGTERM');
    process.kill(process.pid, 'SIGINT');
  });
}

async function main(argv: string[]): Promise<void> {
  ignorePipeErrors();
  let outcome;
  try {
    outcome = parseCli(argv);
  } catch (error) {
    if (error instanceof CliTypeError) {
      fail(
        pyTraceback(
          [
            VLLM_CLI_FRAMES[0],
            ['vllm/entrypoints/cli/main.py', 73, 'main', 'cmds[args.subparser].validate(args)'],
            ['vllm/entrypoints/cli/serve.py', 118, 'validate', 'validate_parsed_serve_args(args)'],
            ['vllm/entrypoints/openai/cli_args.py', 326, 'validate_parsed_serve_args', 'raise TypeError('],
          ],
          `TypeError: ${error.message}`,
        ),
      );
    }
    if (!(error instanceof CliValueError)) throw error;
    fail(
      pyTraceback(
        [
          VLLM_CLI_FRAMES[0],
          ['vllm/entrypoints/cli/main.py', 68, 'main', 'args = parser.parse_args()'],
          ['vllm/utils/argparse_utils.py', 268, 'parse_args', 'raise ValueError('],
        ],
        `ValueError: ${error.message}`,
      ),
    );
  }
  for (const warning of outcome.warnings) log.warning(warning.fileinfo, warning.message);
  if (outcome.kind === 'exit') {
    process.stdout.write(outcome.stdout);
    process.stderr.write(outcome.stderr);
    process.exit(outcome.code);
  }
  const args = outcome.args;
  const settings = readSimSettings();
  log.setUvicornLevel(args.uvicornLogLevel);
  log.decorate('APIServer');

  let engine: EngineClient | null = null;
  let starting = true;
  const onStartupSignal = (signal: NodeJS.Signals): void => {
    if (settings.ignoreSigterm || !starting) return;
    starting = false;
    interruptStartup(args, engine, signal);
  };
  process.on('SIGTERM', onStartupSignal);
  process.on('SIGINT', onStartupSignal);

  logVersionAndModel(args);
  log.info('utils.py:233', `non-default args: ${args.nonDefaultArgs}`);
  const bindError = await checkBind(args);
  if (bindError) bindFailed(args, bindError);
  log.info('model.py:547', 'Resolved architecture: Qwen3ForCausalLM');
  log.info('model.py:1510', `Using max model len ${args.maxModelLen}`);

  const kvCacheTokens = Math.floor(KV_TOKENS_AT_FULL_MEMORY * args.gpuMemoryUtilization);
  engine = new EngineClient(engineConfig(args, settings, kvCacheTokens));
  try {
    await engine.start(engineReadyTimeoutS());
  } catch (error) {
    if (!starting) return; // interrupted while loading: interruptStartup finishes the exit
    if (error instanceof EngineReadyTimeout) {
      // vLLM's API server exits on the TimeoutError; its EngineCore goes on loading in the group.
      fail(
        pyTraceback(
          [...serverFrames(args), ['vllm/v1/engine/core_client.py', 663, '__init__', 'raise TimeoutError(']],
          'TimeoutError: Timed out waiting for engine core processes to start. This is often caused by slow weight ' +
            `loading for large models. Waited ${error.seconds}s (configured by VLLM_ENGINE_READY_TIMEOUT_S). To ` +
            'increase the timeout, set the environment variable: VLLM_ENGINE_READY_TIMEOUT_S=<seconds>',
        ),
      );
    }
    if (!(error instanceof EngineStartError)) throw error;
    fail(
      pyTraceback(
        [
          ...serverFrames(args),
          ['vllm/v1/engine/utils.py', 1021, 'wait_for_engine_startup', 'raise RuntimeError('],
        ],
        `RuntimeError: Engine core initialization failed. See root cause above. Failed core ` +
          `proc(s): {'EngineCore': ${error.exitCode ?? 1}}`,
      ),
    );
  }
  if (!starting) return; // interrupted while loading: interruptStartup finishes the exit

  const ctx = buildContext(args, settings, engine, kvCacheTokens);
  if (args.loraModules.length && !args.enableLora) {
    starting = false;
    await engine.shutdown(0);
    const raise: PyFrame = [
      'vllm/entrypoints/openai/models/serving.py',
      124,
      'init_static_loras',
      'raise ValueError(load_result.error.message)',
    ];
    fail(pyTraceback([...serverFrames(args), raise], `ValueError: ${LORA_NOT_ENABLED}`));
  }
  for (const lora of args.loraModules) {
    const { name, path, base_model_name: baseModelName } = lora;
    ctx.loras.set(name, { name, path, baseModelName });
    log.info('serving.py:211', `Loaded new LoRA adapter: name '${lora.name}', path '${lora.path}'`);
  }
  await serve(ctx, () => {
    starting = false;
    process.off('SIGTERM', onStartupSignal);
    process.off('SIGINT', onStartupSignal);
  });
}

function buildContext(
  args: ServeArgs,
  settings: SimSettings,
  engine: EngineClient,
  kvCacheTokens: number,
): SimContext {
  const cacheConfig = {
    block_size: '16',
    cache_dtype: 'auto',
    enable_prefix_caching: 'True',
    gpu_memory_utilization: String(args.gpuMemoryUtilization),
    num_gpu_blocks: String(Math.floor(kvCacheTokens / 16)),
  };
  return {
    version: SIM_VLLM_VERSION,
    args,
    settings,
    log,
    engine,
    metrics: new SimMetrics(args.servedModelNames[0], args.maxModelLen, cacheConfig),
    tokenizer: new SimTokenizer(),
    loras: new Map(),
    fingerprint: systemFingerprint(args),
    kvCacheTokens,
    running: new Set(),
    serverLoad: 0,
    acceptedRequests: 0,
    completedRequests: 0,
    weightsDiscarded: false,
    crash(reason, mode) {
      log.error('core_client.py:602', `Simulated fatal crash of the whole server (${reason}).`);
      engine.kill();
      // Node's responses are corked until the next tick: the kill waits for that, so what was
      // "written" before the crash is on the wire, as a real process's returned writes would be.
      if (mode === 'sigkill') setImmediate(() => process.kill(process.pid, 'SIGKILL'));
      else process.exit(1);
    },
  };
}

/** Model loaded: build the app, listen, and handle signals, engine death and stats logging. */
async function serve(ctx: SimContext, onServing: () => void): Promise<void> {
  const { args, settings, engine } = ctx;
  // envs.py: bool(int(VLLM_SERVER_DEV_MODE)), read as the app is built: "true" is a ValueError.
  const devModeText = process.env.VLLM_SERVER_DEV_MODE ?? '0';
  if (!/^\s*[+-]?\d+\s*$/.test(devModeText)) {
    await engine.shutdown(0);
    fail(
      pyTraceback(
        [...serverFrames(args), ['vllm/envs.py', 1190, '<lambda>', 'lambda: bool(int(os.getenv("VLLM_SERVER_DEV_MODE", "0"))),']],
        `ValueError: invalid literal for int() with base 10: ${pyRepr(devModeText)}`,
      ),
    );
  }
  const devMode = Number(devModeText) !== 0;
  const runtimeLora = ['1', 'true'].includes(
    (process.env.VLLM_ALLOW_RUNTIME_LORA_UPDATING ?? '').toLowerCase(),
  );
  const server = new SimServer(ctx, { devMode, runtimeLora });

  log.info('api_server.py:1664', `Supported tasks: ${pyRepr(new PyTuple(['generate']))}`);
  if (runtimeLora) {
    log.warning(
      'api_router.py:29',
      'LoRA dynamic loading & unloading is enabled in the API server. This should ONLY be used ' +
        'for local development!',
    );
  }
  if (devMode) {
    log.warning(
      'api_server.py:1205',
      'SECURITY WARNING: Development endpoints are enabled! This should NOT be used in production!',
    );
  }
  const address = args.uds ? `unix:${args.uds}` : `http://${args.host ?? '0.0.0.0'}:${args.port}`;
  log.info('api_server.py:1912', `Starting vLLM server on ${address}`);
  log.info('launcher.py:37', 'Available routes are:');
  for (const line of server.routeLines()) log.info('launcher.py:45', line);
  log.uvicorn('INFO', `Started server process [${process.pid}]`);
  log.uvicorn('INFO', 'Waiting for application startup.');
  try {
    await server.listen();
  } catch (error) {
    engine.kill();
    if ((error as NodeJS.ErrnoException).code) bindFailed(args, error as NodeJS.ErrnoException);
    throw error;
  }
  log.uvicorn('INFO', 'Application startup complete.');
  onServing();

  let stopping = false;
  const onSignal = (): void => {
    // vLLM's handler returns early once shutdown started, so a second signal does nothing.
    if (settings.ignoreSigterm || stopping) return;
    stopping = true;
    const timeout = args.shutdownTimeout;
    const mode = timeout > 0 ? 'drain' : 'abort';
    log.info('launcher.py:118', '[shutdown] API server: shutdown triggered');
    const how = `mode=${mode} timeout=${timeout}s`;
    log.info('launcher.py:124', `[shutdown] API server: stopping engine client ${how}`);
    void engine
      .shutdown(timeout)
      .then(async () => {
        log.info('launcher.py:131', '[shutdown] API server: engine client stopped');
        log.info('launcher.py:135', '[shutdown] API server: signalling HTTP server shutdown');
        log.info('launcher.py:142', '[shutdown] API server: shutting down FastAPI HTTP server');
        await server.shutdown();
      })
      .then(() => process.exit(0));
  };
  process.on('SIGTERM', onSignal);
  process.on('SIGINT', onSignal);

  engine.onDeath(() => {
    log.error(
      'core_client.py:564',
      'Engine core proc EngineCore died unexpectedly, shutting down client.',
    );
  });
  // The watchdog (launcher.py watchdog_loop): engine dead → the server shuts itself down.
  const watchdog = setInterval(() => {
    if (!engine.dead || stopping || process.env.VLLM_KEEP_ALIVE_ON_ENGINE_DEATH === '1') return;
    stopping = true;
    clearInterval(watchdog);
    void server.shutdown().then(() => process.exit(0));
  }, settings.watchdogSeconds * 1000);

  if (!args.disableLogStats) startStatsLogger(ctx);
  exitWhenOrphaned(ctx);
}

/**
 * Simulator safety net (real vLLM has none): when the process that started the API server is
 * gone, exit after VLLM_SIM_ORPHAN_EXIT_S, so a crashed test or supervisor cannot leak it forever.
 */
function exitWhenOrphaned(ctx: SimContext): void {
  const poll = setInterval(() => {
    if (process.ppid === launchParent) return;
    clearInterval(poll);
    const seconds = ctx.settings.orphanExitSeconds;
    setTimeout(() => {
      ctx.log.warning('main.py:0', `Parent process gone for ${seconds}s; the simulator exits.`);
      ctx.engine.kill();
      process.exit(0);
    }, seconds * 1000);
  }, ORPHAN_POLL_MS);
  poll.unref();
}

/** loggers.py LoggingStatLogger: a throughput line every VLLM_LOG_STATS_INTERVAL when active. */
function startStatsLogger(ctx: SimContext): void {
  const intervalS = Number(process.env.VLLM_LOG_STATS_INTERVAL ?? DEFAULT_STATS_INTERVAL_S);
  let last = ctx.metrics.tokenTotals();
  let lastWasActive = false;
  const timer = setInterval(() => {
    const now = ctx.metrics.tokenTotals();
    const prompt = (now.prompt - last.prompt) / intervalS;
    const generation = (now.generation - last.generation) / intervalS;
    last = now;
    const { running, waiting } = ctx.metrics;
    const active = prompt > 0 || generation > 0 || running > 0 || waiting > 0;
    if (active || lastWasActive) {
      ctx.log.info(
        'loggers.py:236',
        `Engine 000: Avg prompt throughput: ${prompt.toFixed(1)} tokens/s, Avg generation ` +
          `throughput: ${generation.toFixed(1)} tokens/s, Running: ${running} reqs, ` +
          `Waiting: ${waiting} reqs, GPU KV cache usage: ` +
          `${(ctx.metrics.kvCacheUsage * 100).toFixed(1)}%, Prefix cache hit rate: 0.0%`,
      );
    }
    lastWasActive = active;
  }, intervalS * 1000);
  timer.unref();
}

// `main.js sglang serve ...` (what a `sglang` console script would run) is the SGLang mode.
const entry = process.argv[2] === 'sglang' ? runSglang(process.argv.slice(3)) : main(process.argv.slice(2));
entry.catch((error: unknown) => {
  log.stderrLines([String((error as Error)?.stack ?? error)]);
  process.exit(1);
});
