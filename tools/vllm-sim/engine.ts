/**
 * The simulated EngineCore process (`VLLM::EngineCore`): "loads the model", reports ready to the
 * API server, schedules requests and emits their tokens at the configured pace, sleeps and wakes,
 * and shuts down on SIGTERM the way vllm/v1/engine/core.py does (abort or drain).
 *
 * Like the real EngineCore it stays in the API server's process group and has no parent-death
 * watch: if the API server is SIGKILLed it keeps running as an orphan. Unlike the real one it
 * exits by itself VLLM_SIM_ORPHAN_EXIT_S after its parent is gone, so a failed test can never
 * leak it for good.
 *
 * Run as `engine.js <config-json>`; `engine.js --worker <name>` is a tensor/pipeline-parallel
 * worker (`VLLM::Worker_TP1`), which exits when its EngineCore does.
 *
 * With `flavor: 'sglang'` in the config the same process is SGLang's scheduler
 * (`sglang::scheduler`): SGLang's log lines, no SIGTERM handler (the default action ends it), death
 * with its parent like PR_SET_PDEATHSIG(SIGKILL), fatal errors reported to the parent with SIGQUIT,
 * a bounded waiting queue (--max-queued-requests) and release/resume of memory by tag.
 * `engine.js --sglang-child <title>` is one of SGLang's other children (`sglang::detokenizer`,
 * further TP ranks): it does nothing but die with its parent.
 */
import { ChildProcess, fork } from 'node:child_process';
import {
  SHUTTING_DOWN_MESSAGE,
  type AddRequest,
  type EngineConfig,
  type EngineMethod,
  type FinishReason,
  type FromEngine,
  type SleepMode,
  type SleepStatus,
  type ToEngine,
} from './ipc';
import { readSimSettings } from './faults';
import { ignorePipeErrors, VllmLogger } from './log';
import { pyRepr, pyTraceback } from './python-format';
import { SglangLogger } from './sglang/log';

const PROCESS_NAME_PREFIX = process.env.VLLM_PROCESS_NAME_PREFIX ?? 'VLLM';
/** Simulated size of the weights, for the load and sleep log lines. */
const WEIGHTS_GIB = 1.12;

type MemoryTag = 'weights' | 'kv_cache';

/** How often an SGLang child checks that its parent is still there (PR_SET_PDEATHSIG stand-in). */
const PARENT_POLL_MS = 100;

/** The logging calls the engine makes; VllmLogger has them, SGLang's format drops the fileinfo. */
interface EngineLog {
  info(fileinfo: string, message: string): void;
  warning(fileinfo: string, message: string): void;
  error(fileinfo: string, message: string, traceback?: string[]): void;
}

function sglangEngineLog(config: EngineConfig): EngineLog {
  const log = new SglangLogger({ prefix: config.logPrefix ?? ' TP0', level: config.logLevel });
  return {
    info: (_f, message) => log.info(message),
    warning: (_f, message) => log.warning(message),
    error: (_f, message, traceback = []) => log.error([message, ...traceback].join('\n')),
  };
}

/**
 * PR_SET_PDEATHSIG(SIGKILL) for an SGLang child: the moment the parent is gone (IPC channel closed
 * or re-parented), the process kills itself with SIGKILL.
 */
function dieWithParent(): void {
  const parent = process.ppid;
  const die = (): void => void process.kill(process.pid, 'SIGKILL');
  process.on('disconnect', die);
  setInterval(() => process.ppid !== parent && die(), PARENT_POLL_MS).unref();
}

interface EngineRequest {
  spec: AddRequest;
  emitted: number;
  timer: NodeJS.Timeout | null;
}

/** Sends to the API server; a closed channel (parent gone) is silently ignored. */
function send(message: FromEngine): Promise<void> {
  return new Promise((resolve) => {
    if (!process.send || !process.connected) return resolve();
    try {
      process.send(message, undefined, {}, () => resolve());
    } catch {
      resolve();
    }
  });
}

class EngineCore {
  private readonly sglang: boolean;
  private readonly log: EngineLog;
  private readonly waiting: EngineRequest[] = [];
  private readonly running = new Map<string, EngineRequest>();
  private readonly workers: ChildProcess[] = [];
  private ready = false;
  /** Scheduling paused by /sleep; requests are queued but not run. */
  private paused = false;
  /** mode=keep froze the running requests. */
  private frozen = false;
  private readonly sleepingTags = new Set<MemoryTag>();
  private shuttingDown = false;
  /** Tokens generated since start, for VLLM_SIM_ENGINE_HANG_AFTER_TOKENS. */
  private generated = 0;
  /** Hung (VLLM_SIM_ENGINE_HANG_AFTER_TOKENS): no step and no answer any more; signals still work. */
  private hung = false;
  private drainTimer: NodeJS.Timeout | null = null;
  /** Checks re-run whenever a request finishes (see until()). */
  private readonly waiters: Array<() => void> = [];

  constructor(private readonly config: EngineConfig) {
    this.sglang = config.flavor === 'sglang';
    if (this.sglang) {
      this.log = sglangEngineLog(config);
    } else {
      const log = new VllmLogger();
      log.decorate('EngineCore');
      this.log = log;
    }
  }

  start(): void {
    ignorePipeErrors();
    process.on('message', (m: ToEngine) => this.onMessage(m));
    if (this.sglang) {
      process.title = this.config.processTitle ?? 'sglang::scheduler';
      dieWithParent();
      // SGLang's scheduler installs no SIGTERM handler: the signal's default action ends it.
      if (this.config.ignoreSigterm) for (const signal of ['SIGTERM', 'SIGINT'] as const) process.on(signal, () => undefined);
      this.loadSglang();
      return;
    }
    process.title = `${PROCESS_NAME_PREFIX}::EngineCore`;
    process.on('disconnect', () => this.onParentGone());
    for (const signal of ['SIGTERM', 'SIGINT'] as const) {
      process.on(signal, () => this.onShutdownSignal());
    }
    this.load();
  }

  /** SGLang's scheduler start-up lines (model_runner.py, scheduler.py), then ready. */
  private loadSglang(): void {
    const c = this.config;
    this.log.info('', 'Init torch distributed begin.');
    this.log.info('', 'Init torch distributed ends. mem usage=0.00 GB');
    this.log.info('', 'Load weight begin. avail mem=78.50 GB');
    setTimeout(() => {
      if (c.crashOnLoad) {
        this.die('simulated failure while loading the model (VLLM_SIM_CRASH_ON_LOAD=1)');
        return;
      }
      this.log.info(
        '',
        `Load weight end. type=Qwen3ForCausalLM, dtype=torch.bfloat16, avail mem=77.38 GB, ` +
          `mem usage=${WEIGHTS_GIB} GB.`,
      );
      this.log.info('', `KV Cache is allocated. #tokens: ${c.kvCacheTokens}, K size: 0.50 GB, V size: 0.50 GB`);
      this.log.info('', 'Memory pool end. avail mem=10.25 GB');
      this.log.info(
        '',
        `max_total_num_tokens=${c.kvCacheTokens}, max_running_requests=${c.maxNumSeqs}, ` +
          `context_len=${c.maxModelLen}, available_gpu_mem=10.25 GB`,
      );
      this.ready = true;
      void send({ type: 'ready' });
      if (c.engineExitAfterMs !== null) {
        setTimeout(() => this.die('simulated engine failure (VLLM_SIM_ENGINE_EXIT_AFTER_MS)'), c.engineExitAfterMs);
      }
    }, c.loadSeconds * 1000);
  }

  private load(): void {
    const c = this.config;
    this.log.info(
      'core.py:95',
      `Initializing a V1 LLM engine (v${c.version}) with config: model='${c.model}', ` +
        `speculative_config=None, tokenizer='${c.model}', skip_tokenizer_init=False, ` +
        `tokenizer_mode=auto, revision=None, trust_remote_code=False, dtype=torch.bfloat16, ` +
        `max_seq_len=${c.maxModelLen}, download_dir=None, load_format=auto, ` +
        `tensor_parallel_size=${c.tensorParallelSize}, ` +
        `pipeline_parallel_size=${c.pipelineParallelSize}, device_config=cuda, seed=0, ` +
        `served_model_name=${c.model}, enable_prefix_caching=True, enable_chunked_prefill=True`,
    );
    const workersReady = this.spawnWorkers();
    this.log.info('gpu_model_runner.py:2602', `Starting to load model ${c.model}...`);
    const loaded = new Promise((resolve) => setTimeout(resolve, c.loadSeconds * 1000));
    void Promise.all([loaded, workersReady]).then(() =>
      c.crashOnLoad ? this.crashDuringLoad() : this.finishLoad(),
    );
  }

  /**
   * TP×PP > 1: one worker process per rank, as the multiproc executor starts them; resolves
   * when every worker has reported ready (the engine is not ready before its workers).
   */
  private spawnWorkers(): Promise<unknown> {
    const { tensorParallelSize: tp, pipelineParallelSize: pp } = this.config;
    if (tp * pp <= 1) return Promise.resolve();
    const ready: Promise<unknown>[] = [];
    for (let p = 0; p < pp; p += 1) {
      for (let t = 0; t < tp; t += 1) {
        const name = pp > 1 ? `Worker_PP${p}_TP${t}` : `Worker_TP${t}`;
        const worker = fork(__filename, ['--worker', name], {
          stdio: ['ignore', 'inherit', 'inherit', 'ipc'],
        });
        worker.on('error', () => undefined);
        ready.push(new Promise((resolve) => worker.once('message', resolve)));
        this.workers.push(worker);
      }
    }
    return Promise.all(ready);
  }

  private finishLoad(): void {
    const c = this.config;
    const seconds = c.loadSeconds.toFixed(2);
    this.log.info('default_loader.py:267', `Loading weights took ${seconds} seconds`);
    this.log.info(
      'gpu_model_runner.py:2653',
      `Model loading took ${WEIGHTS_GIB} GiB and ${seconds} seconds`,
    );
    this.log.info(
      'kv_cache_utils.py:1087',
      `GPU KV cache size: ${c.kvCacheTokens.toLocaleString('en-US')} tokens`,
    );
    const concurrency = (c.kvCacheTokens / c.maxModelLen).toFixed(2);
    this.log.info(
      'kv_cache_utils.py:1091',
      `Maximum concurrency for ${c.maxModelLen.toLocaleString('en-US')} tokens per request: ` +
        `${concurrency}x`,
    );
    this.log.info(
      'core.py:210',
      `init engine (profile, create kv cache, warmup model) took ${seconds} seconds`,
    );
    this.ready = true;
    void send({ type: 'ready' });
    if (c.engineExitAfterMs !== null) {
      const reason = 'simulated engine failure (VLLM_SIM_ENGINE_EXIT_AFTER_MS)';
      setTimeout(() => this.die(reason), c.engineExitAfterMs);
    }
  }

  private crashDuringLoad(): void {
    const lines = pyTraceback(
      [
        ['vllm/v1/engine/core.py', 1021, 'run_engine_core', 'engine_core = EngineCoreProc(**kwargs)'],
        ['vllm/v1/worker/gpu_model_runner.py', 2610, 'load_model', 'self.model = loader.load_model('],
      ],
      'RuntimeError: simulated failure while loading the model (VLLM_SIM_CRASH_ON_LOAD=1)',
    );
    this.log.error('core.py:1030', 'EngineCore failed to start.', lines);
    this.exit(1);
  }

  /** A fatal engine error while serving: the process ends, the API server sees it die. */
  die(reason: string): void {
    if (this.sglang) {
      // scheduler.py: log the traceback, then SIGQUIT the parent, which kills the process tree.
      const lines = pyTraceback(
        [['sglang/srt/managers/scheduler.py', 3021, 'run_scheduler_process', 'scheduler.event_loop_overlap()']],
        `RuntimeError: ${reason}`,
      );
      this.log.error('', `Scheduler hit an exception: ${lines.join('\n')}`);
      try {
        process.kill(process.ppid, 'SIGQUIT');
      } catch {
        // parent already gone
      }
      this.exit(1);
      return;
    }
    const lines = pyTraceback(
      [['vllm/v1/engine/core.py', 860, 'run_busy_loop', 'self._process_engine_step()']],
      `RuntimeError: ${reason}`,
    );
    this.log.error('core.py:868', 'EngineCore encountered a fatal error.', lines);
    this.exit(1);
  }

  private exit(code: number): void {
    for (const worker of this.workers) worker.kill('SIGKILL');
    process.exit(code);
  }

  private onMessage(message: ToEngine): void {
    if (this.hung) return; // its busy loop never comes back to read its input
    switch (message.type) {
      case 'add':
        return this.add(message);
      case 'abort':
        for (const id of message.ids) void this.finish(id, 'abort');
        return;
      case 'crash':
        return this.die(message.reason);
      case 'call':
        if (this.shuttingDown) {
          // Utility calls during shutdown fail instead of running (EngineCore's shutdown state).
          void send({ type: 'result', callId: message.callId, result: null, error: SHUTTING_DOWN_MESSAGE });
          return;
        }
        void this.call(message.method, message.args).then((result) =>
          send({ type: 'result', callId: message.callId, result }),
        );
    }
  }

  private add(spec: AddRequest): void {
    const request: EngineRequest = { spec, emitted: 0, timer: null };
    if (this.shuttingDown) {
      // _reject_add_in_shutdown: new work during shutdown finishes at once as an abort.
      void send({ type: 'finished', id: spec.id, reason: 'abort' });
      return;
    }
    const limit = this.config.maxQueuedRequests;
    if (this.sglang && limit !== undefined && limit !== null && this.waiting.length + 1 > limit) {
      // scheduler.py _abort_on_queued_limit: the new request is aborted with 503.
      const error = { status: 503, message: 'The request queue is full.' };
      void send({ type: 'finished', id: spec.id, reason: 'abort', error });
      return;
    }
    this.waiting.push(request);
    this.schedule();
  }

  /** Moves waiting requests into the running set while there is room and scheduling is on. */
  private schedule(): void {
    while (!this.paused && this.waiting.length && this.running.size < this.config.maxNumSeqs) {
      const request = this.waiting.shift() as EngineRequest;
      this.running.set(request.spec.id, request);
      void send({ type: 'started', id: request.spec.id });
      if (this.sglang && request.spec.promptTokens !== undefined) {
        this.log.info(
          '',
          `Prefill batch. #new-seq: 1, #new-token: ${request.spec.promptTokens}, #cached-token: 0, ` +
            `token usage: 0.00, #running-req: ${this.running.size - 1}, #queue-req: ${this.waiting.length}, `,
        );
      }
      this.armTimer(request);
    }
  }

  private armTimer(request: EngineRequest): void {
    const delay = request.emitted === 0 ? this.config.ttftMs : this.config.itlMs;
    request.timer = setTimeout(() => this.emitToken(request), delay);
  }

  private emitToken(request: EngineRequest): void {
    request.timer = null;
    const { id, numTokens, crashAfterTokens } = request.spec;
    void send({ type: 'token', id, index: request.emitted });
    request.emitted += 1;
    this.generated += 1;
    const hangAfter = this.config.engineHangAfterTokens;
    if (hangAfter !== null && this.generated >= hangAfter) return this.hang();
    if (crashAfterTokens !== undefined && request.emitted >= crashAfterTokens) {
      this.die('simulated engine failure mid-stream (VLLM_SIM_CRASH_MID_STREAM)');
      return;
    }
    if (request.emitted >= numTokens) void this.finish(id, request.spec.finishReason);
    else this.armTimer(request);
  }

  /** A kernel that never returns: every request stays where it is, nothing is stepped or answered. */
  private hang(): void {
    this.hung = true;
    for (const request of this.running.values()) if (request.timer) clearTimeout(request.timer);
  }

  private async finish(id: string, reason: FinishReason): Promise<void> {
    const request = this.running.get(id);
    const waitingIdx = this.waiting.findIndex((r) => r.spec.id === id);
    if (!request && waitingIdx === -1) return;
    if (request?.timer) clearTimeout(request.timer);
    this.running.delete(id);
    if (waitingIdx !== -1) this.waiting.splice(waitingIdx, 1);
    await send({ type: 'finished', id, reason });
    this.schedule();
    this.onRequestDone();
  }

  private async call(method: EngineMethod, args: Record<string, unknown>): Promise<unknown> {
    switch (method) {
      case 'sleep':
        return this.sleep(Number(args.level), args.mode as SleepMode);
      case 'wake_up':
        return this.wakeUp((args.tags as MemoryTag[] | undefined) ?? []);
      case 'is_sleeping':
        return this.status();
      case 'reset_prefix_cache':
        return true;
      case 'collective_rpc': {
        const { tensorParallelSize: tp, pipelineParallelSize: pp } = this.config;
        return Array.from({ length: tp * pp }, () => null);
      }
      case 'release_memory':
        return this.releaseMemory(args.tags as MemoryTag[] | null);
      case 'resume_memory':
        return this.resumeMemory(args.tags as MemoryTag[] | null);
    }
  }

  /** SGLang release_memory_occupation: the tags' memory is gone; scheduling stops meanwhile. */
  private releaseMemory(tags: MemoryTag[] | null): SleepStatus {
    const released = tags?.length ? tags : (['weights', 'kv_cache'] as MemoryTag[]);
    this.paused = true;
    for (const tag of released) this.sleepingTags.add(tag);
    this.log.info('', `Released memory occupation of ${pyRepr(released)}.`);
    return this.status();
  }

  /** SGLang resume_memory_occupation: scheduling resumes once nothing is released any more. */
  private resumeMemory(tags: MemoryTag[] | null): SleepStatus {
    const resumed = tags?.length ? tags : (['weights', 'kv_cache'] as MemoryTag[]);
    for (const tag of resumed) this.sleepingTags.delete(tag);
    this.log.info('', `Resumed memory occupation of ${pyRepr(resumed)}.`);
    if (this.sleepingTags.size === 0 && this.paused) this.resume();
    return this.status();
  }

  private status(): SleepStatus {
    return { isSleeping: this.paused || this.sleepingTags.size > 0 };
  }

  /** EngineCore.sleep: pause the scheduler per `mode`, then (level ≥ 1) release memory. */
  private async sleep(level: number, mode: SleepMode): Promise<SleepStatus> {
    const started = Date.now();
    this.paused = true;
    if (mode === 'abort') {
      const ids = [...this.running.keys(), ...this.waiting.map((r) => r.spec.id)];
      await Promise.all(ids.map((id) => this.finish(id, 'abort')));
    } else if (mode === 'wait') {
      await this.until(() => this.running.size === 0);
    } else {
      this.frozen = true;
      for (const request of this.running.values()) {
        if (request.timer) clearTimeout(request.timer);
        request.timer = null;
      }
    }
    if (level >= 1) {
      this.sleepingTags.add('weights');
      this.sleepingTags.add('kv_cache');
      const seconds = ((Date.now() - started) / 1000).toFixed(6); // Python's %.6f
      this.log.info('gpu_worker.py:117', `It took ${seconds} seconds to fall asleep.`);
      this.log.info(
        'gpu_worker.py:120',
        `Sleep mode freed ${WEIGHTS_GIB} GiB memory, 0.35 GiB memory is still in use.`,
      );
    }
    return this.status();
  }

  /** EngineCore.wake_up: scheduling resumes only when all memory is awake. */
  private wakeUp(tags: string[]): SleepStatus {
    const memoryTags = tags.filter((t): t is MemoryTag => t === 'weights' || t === 'kv_cache');
    const toWake = tags.length === 0 ? [...this.sleepingTags] : memoryTags;
    for (const tag of memoryTags) {
      if (!this.sleepingTags.has(tag)) {
        this.log.warning('abstract.py:175', `Executor is not sleeping on tag ${tag}, ignoring.`);
      }
    }
    for (const tag of toWake) this.sleepingTags.delete(tag);
    if (toWake.length) {
      const message = `It took 0.000100 seconds to wake up tags ${pyRepr(toWake)}.`;
      this.log.info('abstract.py:180', message);
    }
    if (this.sleepingTags.size === 0 && this.paused) this.resume();
    return this.status();
  }

  private resume(): void {
    this.paused = false;
    if (this.frozen) {
      this.frozen = false;
      for (const request of this.running.values()) this.armTimer(request);
    }
    this.schedule();
  }

  private until(condition: () => boolean): Promise<void> {
    if (condition()) return Promise.resolve();
    return new Promise((resolve) => {
      const check = (): void => (condition() ? resolve() : void this.waiters.push(check));
      this.waiters.push(check);
    });
  }

  private onRequestDone(): void {
    const waiters = this.waiters.splice(0);
    for (const check of waiters) check();
  }

  /** SIGTERM/SIGINT: vLLM's `_handle_shutdown` — abort (timeout 0) or drain, then exit. */
  private onShutdownSignal(): void {
    if (this.config.ignoreSigterm || this.shuttingDown) return;
    this.shuttingDown = true;
    if (!this.ready) this.exit(0);
    const timeout = this.config.shutdownTimeoutSeconds;
    const mode = timeout > 0 ? 'drain' : 'abort';
    this.log.info('core.py:1210', `[shutdown] EngineCore: start mode=${mode} timeout=${timeout}s`);
    const count = this.running.size + this.waiting.length;
    if (mode === 'abort') {
      if (count) {
        const message = `[shutdown] EngineCore: aborting in-flight requests count=${count}`;
        this.log.info('core.py:1224', message);
      }
      this.abortAll();
    } else {
      this.log.info(
        'core.py:1231',
        `[shutdown] EngineCore: draining in-flight requests count=${count} timeout=${timeout}s`,
      );
      this.resume();
      this.drainTimer = setTimeout(() => this.abortAll(), timeout * 1000);
    }
    void this.until(() => this.running.size + this.waiting.length === 0).then(async () => {
      if (this.drainTimer) clearTimeout(this.drainTimer);
      this.log.info(
        'core.py:1245',
        '[shutdown] EngineCore: request processing complete; starting resource teardown',
      );
      await send({ type: 'exiting' });
      this.exit(0);
    });
  }

  private abortAll(): void {
    const ids = [...this.running.keys(), ...this.waiting.map((r) => r.spec.id)];
    for (const id of ids) void this.finish(id, 'abort');
  }

  /** The API server is gone: keep running like the real EngineCore, but not forever. */
  private onParentGone(): void {
    const timer = setTimeout(() => this.exit(0), this.config.orphanExitSeconds * 1000);
    timer.unref();
    // Keep the process alive while orphaned (the IPC channel no longer does).
    setInterval(() => undefined, 60_000);
  }
}

/** A tensor-parallel worker: it only lives as long as its EngineCore (death pipe). */
function runWorker(name: string): void {
  process.title = `${PROCESS_NAME_PREFIX}::${name}`;
  ignorePipeErrors();
  process.send?.('ready');
  const keepAlive = setInterval(() => undefined, 60_000);
  process.on('disconnect', () => {
    clearInterval(keepAlive);
    process.exit(0);
  });
  const { ignoreSigterm } = readSimSettings();
  for (const signal of ['SIGTERM', 'SIGINT'] as const) {
    process.on(signal, () => (ignoreSigterm ? undefined : process.exit(0)));
  }
}

/** One of SGLang's other children (detokenizer, TP ranks > 0): it only dies with its parent. */
function runSglangChild(title: string): void {
  process.title = title;
  ignorePipeErrors();
  dieWithParent();
  const { ignoreSigterm } = readSimSettings();
  if (ignoreSigterm) for (const signal of ['SIGTERM', 'SIGINT'] as const) process.on(signal, () => undefined);
  setInterval(() => undefined, 60_000);
  process.send?.('ready');
}

if (process.argv[2] === '--worker') runWorker(process.argv[3]);
else if (process.argv[2] === '--sglang-child') runSglangChild(process.argv[3]);
else new EngineCore(JSON.parse(process.argv[2]) as EngineConfig).start();
