import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import { setTimeout as sleep } from 'node:timers/promises';
import { Logger } from '@nestjs/common';
import { AppError } from '../domain/app-error';
import { type SleepLevel, type VllmConfig, isLoopback } from '../config/config.schema';
import { buildLaunchSpec, redactArgs, usesEngineSleep } from './engine-args';
import { EngineProcess } from './engine-process';
import { listenProblem, portIsFree } from './listen';
import { terminateGroup } from './process-group';
import { type Claim, INSTANCE_ENV, OrphanRecord, type RunningGroup } from './orphan-record';
import { RotatingLog } from './rotating-log';
import { type VLLMClient, abortReason, connectionFailed } from './vllm.client';

/**
 * The supervisor's states. Auto-start walks stopped → starting → ready → stopping → stopped,
 * with restarting after a crash and sleeping/waking when idle; manual mode walks stopped →
 * starting (not yet seen) → ready ⇄ unreachable → stopping → stopped (vLLM itself is not its to
 * start or stop); disabled (vllm.enabled false) only ever stops.
 */
export const SERVER_STATES = ['disabled', 'stopped', 'starting', 'ready', 'unreachable', 'restarting', 'sleeping', 'waking', 'stopping', 'failed'] as const;
export type ServerState = (typeof SERVER_STATES)[number];

/** Asleep, or being woken: a request is served after the wake-up it starts or joins. */
export const isAsleep = (state: ServerState): boolean => state === 'sleeping' || state === 'waking';

/** What the supervisor needs of the requests in flight (TrafficGate). */
interface Traffic {
  /**
   * Requests in flight that need the engine (or count as activity: RequestScope.activity). A model
   * list or a tokenizer request, which vLLM answers asleep, neither holds off the idle sleep nor
   * wakes a vLLM put to sleep elsewhere.
   */
  readonly activeInFlight: number;
  /** Resolves when none is in flight, or after `timeoutMs`, with how many still are. */
  waitIdle(timeoutMs: number): Promise<number>;
  /** Ends every request in flight with `error`; `why` is logged. */
  cutAll(why: string, error: AppError): void;
}

const NO_TRAFFIC: Traffic = { activeInFlight: 0, waitIdle: () => Promise.resolve(0), cutAll: () => undefined };

const TRANSITIONS: Readonly<Record<ServerState, readonly ServerState[]>> = {
  disabled: ['stopping'],
  stopped: ['starting', 'stopping'],
  starting: ['ready', 'unreachable', 'restarting', 'failed', 'stopping'],
  ready: ['unreachable', 'restarting', 'sleeping', 'failed', 'stopping'],
  // Manual mode's only: a vLLM of its own that stops answering is restarted instead.
  unreachable: ['ready', 'stopping'],
  restarting: ['starting', 'stopping'],
  // sleeping → ready: a sleep that failed with vLLM still awake, or a wake-up from outside tide-vllm.
  sleeping: ['waking', 'ready', 'restarting', 'failed', 'stopping'],
  waking: ['ready', 'restarting', 'failed', 'stopping'],
  stopping: ['stopped'],
  failed: ['stopping'],
};

/** A probe's finding for a vLLM that did not answer /health (in time). */
const NO_HEALTH = 'does not answer /health';
/**
 * A probe's finding for an engine asleep at level 1 or 2 whose /health answers (it stays 200 for
 * a hung engine, A3) but /is_sleeping, an engine call, does not: it hangs.
 */
const NO_SLEEP_STATE = 'does not answer /is_sleeping';
/** A probe's finding for a vLLM run by hand that was put to sleep (its /is_sleeping): its /health stays 200, generations would hang in it (A9). */
const ASLEEP_BY_HAND = 'is asleep (put to sleep outside tide-vllm; a POST to its /wake_up wakes it): generations are refused until it is awake';
/** Refusals by the supervisor's state (starting, restarting, stopping): logged as warnings. */
const BY_STATE = { byState: true } as const;
/** The exit status of Python's argparse refusing a command line (`unrecognized arguments: --enforce-eagr`). */
const ARGPARSE_EXIT = 2;
const disabledError = () => new AppError('VLLM_DISABLED', 'vLLM is disabled in this service (vllm.enabled: false)', { permanent: true });
const notServedYet = () => new AppError('VLLM_NOT_READY', 'vLLM is starting; the model is not served yet', BY_STATE);
const startAborted = () => new AppError('VLLM_START_FAILED', 'vLLM start was aborted because the service is stopping');
/** How often a sleep looks whether tide-vllm's requests in the engine have finished. */
const IDLE_POLL_MS = 50;
/** The series of vLLM's metrics (A10) that tell whether an engine steps: work in it, and tokens done. */
const PROGRESS_NAMES = ['num_requests_running', 'num_requests_waiting', 'prompt_tokens_total', 'generation_tokens_total'];
const PROGRESS_SERIES = new RegExp(`^vllm:(${PROGRESS_NAMES.join('|')})(\\{[^}]*\\})? (\\S+)$`, 'gm');

/**
 * Per engine (vLLM's `engine` label: one per data-parallel rank), the requests in it and the
 * tokens it has processed (prefill and generated), from vLLM's /metrics text; null when a series
 * is missing (`--disable-log-stats`).
 */
export function engineProgress(metrics: string): Map<string, { busy: number; tokens: number }> | null {
  const engines = new Map<string, { busy: number; tokens: number }>();
  const seen = new Set<string>();
  for (const [, name, labels, value] of metrics.matchAll(PROGRESS_SERIES)) {
    seen.add(name);
    const engine = /engine="([^"]*)"/.exec(labels ?? '')?.[1] ?? '';
    const sample = engines.get(engine) ?? { busy: 0, tokens: 0 };
    if (name.startsWith('num_requests')) sample.busy += Number(value);
    else sample.tokens += Number(value);
    engines.set(engine, sample);
  }
  return seen.size === PROGRESS_NAMES.length ? engines : null;
}

/** Pause between readiness probes while the model loads. */
const READY_POLL_MS = 250;
/** How often idleness is checked (at most; shorter idle_seconds check more often). */
const IDLE_CHECK_MS = 1_000;
/** Upper bound for one readiness probe; a loading vLLM refuses at once, a hung one must not stall us. */
const READY_PROBE_TIMEOUT_MS = 2_000;

export interface ServerSnapshot {
  state: ServerState;
  /** Starting again, after a crash or at an operator's request: the model loads once more (state `starting`). */
  relaunching: boolean;
  mode: 'auto' | 'manual' | 'disabled';
  engine: 'vllm' | 'sglang';
  model: string;
  pid: number | null;
  since: number;
  /** Seconds since the running vLLM was launched; null while none runs. */
  uptimeSeconds: number | null;
  restarts: number;
  /** Times the engine died or hung asleep at level 1 or 2 (it then slept on as at level 3; not restarts). */
  diedAsleep: number;
  sleepLevel: SleepLevel | null;
  sleeps: number;
  wakeups: number;
  /** LoRA adapters served, name → path: vllm.lora.modules, then those loaded at run time. */
  loras: Record<string, string>;
  lastError: string | null;
  logFile: string | null;
  argv: string[] | null;
}

/**
 * Launches, watches, restarts and stops the one vLLM (or SGLang) server of this service —
 * or, in manual mode, watches one that someone else runs.
 */
export class VLLMServerManager {
  private readonly log = new Logger(VLLMServerManager.name);
  private readonly vllmLog = new Logger('vllm');
  private readonly mode: ServerSnapshot['mode'];
  private state: ServerState;
  private since = Date.now();
  private proc: EngineProcess | null = null;
  private startedAt: number | null = null;
  private lastError: string | null = null;
  private restartTimes: number[] = [];
  private restartCount = 0;
  private diedAsleepCount = 0;
  private attempt: AbortController | null = null;
  private startPromise: Promise<void> | null = null;
  /** Stopping the process group an earlier run left behind (start-up's first step). */
  private reaping: Promise<void> | null = null;
  /** Requests (traffic) waiting for a wake-up: in flight, but not in the engine. */
  private waitingForWake = 0;
  private stopPromise: Promise<void> | null = null;
  private monitorTimer: NodeJS.Timeout | null = null;
  private restartTimer: NodeJS.Timeout | null = null;
  private probing = false;
  private failedProbes = 0;
  /** Manual mode: the vLLM run by hand was found asleep (ASLEEP_BY_HAND); generations are refused meanwhile. */
  private asleepByHand = false;
  /** Manual mode: whether to ask the vLLM run by hand /is_sleeping; not after a 404 (no VLLM_SERVER_DEV_MODE, so no /sleep either) until it was down. */
  private askSleepByHand = true;
  /** Manual mode: the served model's context was found to differ from vllm.max_model_len, and it was said. */
  private contextWarned = false;
  /** Engines (vLLM's `engine` label) with work: their token count, and since when it has not moved (engineHung). */
  private readonly progress = new Map<string, { tokens: number; since: number }>();
  private fatalHandler: (message: string) => void = () => undefined;
  private sleepLevel: SleepLevel | null = null;
  private sleepCount = 0;
  private wakeCount = 0;
  private falling: Promise<void> | null = null;
  /**
   * A level-3 sleep (or an engine that died or hung asleep) stopping the engine's group (SIGTERM,
   * stop_timeout, SIGKILL). The process is no longer `proc` (its exit is no crash), but its group
   * lives until this settles: a stop or a restart waits for it, rather than report stopped (or
   * launch) while the group still runs.
   */
  private retiring: Promise<void> | null = null;
  /** Why vllm.log_file could not be opened: the start fails with it, before anything is spawned. */
  private logFileProblem: string | null = null;
  /** Why vLLM is restarting, for the requests that meet it: "after a failure", "at an operator's request". */
  private restartCause = 'after a failure';
  /** This start is a restart's (restartNow): cleared with the state's next change. */
  private relaunching = false;
  /** The group of a vLLM that crashed being stopped during the backoff: its restart (or a stop) waits for it. */
  private clearing: Promise<void> | null = null;
  private waking: Promise<void> | null = null;
  private idleTimer: NodeJS.Timeout | null = null;
  private lastActivity = Date.now();
  /** The web layer's requests in flight (none until trackTraffic): idle sleep and an operator's restart wait for them. */
  private traffic: Traffic = NO_TRAFFIC;
  private drainMs = 0;
  /** Adapters loaded at run time, loaded again after a restart (those of vllm.lora.modules are not here). */
  private readonly loras = new Map<string, string>();
  private readonly logFile: RotatingLog | null;
  private readonly orphans: OrphanRecord;

  /** Give vLLM a fresh random API key at each start that only `client` knows (see the constructor). */
  private readonly protectEngine: boolean;

  /**
   * @param gateway tide-vllm's own keys (auth.*). With any, vLLM gets a fresh random API key at
   *   each start that only `client` knows, so its /v1 routes are no side door around tide-vllm's
   *   authentication (vLLM leaves its other routes unguarded: A4); and no variable of tide-vllm's
   *   environment holding one of them, or named in one (`gateway.variables`), reaches vLLM (model
   *   code run with trust_remote_code, say).
   */
  constructor(
    private readonly vllm: VllmConfig,
    private readonly client: VLLMClient,
    private readonly gateway: GatewaySecrets = { keys: [], variables: [] },
  ) {
    this.protectEngine = gateway.keys.length > 0;
    this.mode = !this.vllm.enabled ? 'disabled' : this.vllm.auto_start ? 'auto' : 'manual';
    this.state = this.mode === 'disabled' ? 'disabled' : 'stopped';
    this.logFile = this.mode === 'auto' && this.vllm.log_file ? this.openLogFile() : null;
    this.orphans = new OrphanRecord(this.vllm.state_dir, this.vllm.port);
    // A vLLM run by hand keeps its key for good; auto-start sets a fresh one (or none) at each launch.
    if (this.mode === 'manual') this.client.setApiKey(this.vllm.api_key);
  }

  /** Called once when vLLM is gone for good (startup failed, restarts exhausted). */
  onFatal(handler: (message: string) => void): void {
    this.fatalHandler = handler;
  }

  get currentState(): ServerState {
    return this.state;
  }

  get configuredSleepLevel(): SleepLevel {
    return this.vllm.sleep.level;
  }

  snapshot(): ServerSnapshot {
    const running = this.proc && !this.proc.exitInfo ? this.proc : null; // after a crash, until the restart
    return {
      state: this.state,
      relaunching: this.relaunching,
      mode: this.mode,
      engine: this.vllm.engine,
      model: this.vllm.model_name,
      pid: running?.pid ?? null,
      since: this.since,
      uptimeSeconds: running && this.startedAt ? Math.round((Date.now() - this.startedAt) / 1000) : null,
      restarts: this.restartCount,
      diedAsleep: this.diedAsleepCount,
      sleepLevel: this.sleepLevel,
      sleeps: this.sleepCount,
      wakeups: this.wakeCount,
      loras: this.adapters(),
      lastError: this.lastError,
      logFile: this.logFile?.path ?? null,
      argv: this.proc ? [this.proc.spec.command, ...redactArgs(this.proc.spec.args)] : null,
    };
  }

  /**
   * Brings vLLM up. Auto-start: resolves once the model is served, rejects with a VLLM_START_FAILED AppError
   * otherwise. Manual mode: starts watching and resolves at once. Concurrent callers share one start.
   */
  start(): Promise<void> {
    if (this.mode === 'disabled') return Promise.resolve();
    this.startPromise ??= this.mode === 'auto' ? this.startAuto() : this.startManual();
    return this.startPromise;
  }

  /**
   * True when a request can go to vLLM right now, without waiting or an error (ensureServing's
   * fast case). Asked for a request about to go to vLLM, so it counts as activity for the idle sleep.
   */
  servesNow(): boolean {
    if (!this.takesRequests() || this.asleepByHand) return false;
    this.lastActivity = Date.now();
    return true;
  }

  /** Requests go to vLLM as they come: it serves (manual mode: it may, and its answer says). */
  private takesRequests(): boolean {
    return this.state === 'ready' || this.state === 'unreachable' || (this.state === 'starting' && this.mode === 'manual');
  }

  /**
   * True when a request that needs no engine (the model list, tokenizing: needsEngine) can go to
   * vLLM now: it serves, or sleeps at level 1 or 2, where its API server runs on and answers them
   * (A9: only generations wait for the wake-up). No activity for the idle sleep: a client that
   * polls the model list must neither wake vLLM nor keep it awake.
   */
  answersWithoutEngine(): boolean {
    return this.takesRequests() || (isAsleep(this.state) && this.sleepLevel !== null && this.sleepLevel !== 3);
  }

  /**
   * A request that needs no engine counts as activity all the same when the idle sleep is level 3:
   * asleep there, nothing answers it but a fresh start, and a client polling the model list would
   * otherwise have vLLM loaded again after every idle_seconds.
   */
  get engineFreeIsActivity(): boolean {
    return this.vllm.sleep.level === 3;
  }

  /**
   * Throws the AppError a request should get when vLLM cannot take it now; resolves when it can
   * (after a wake-up, when vLLM sleeps). Manual mode always lets requests through: vLLM's own
   * answer is the truth there. Activity for the idle sleep, like servesNow.
   */
  async ensureServing(signal?: AbortSignal): Promise<void> {
    // Nobody waits for an answer any more (the client left, or a stop cut the request): no wake-up for it.
    if (signal?.aborted) throw abortReason(signal);
    this.lastActivity = Date.now();
    if (isAsleep(this.state)) return this.wakeWithin(this.vllm.sleep.wake_timeout * 1000, signal);
    this.refuseUnlessServing();
  }

  /** Throws the AppError a request gets in the current state, unless the request can go to vLLM now. */
  private refuseUnlessServing(): void {
    switch (this.state) {
      case 'ready':
        return;
      case 'unreachable': // manual mode: probes are failing, but vLLM's own answer is the truth (it may just be busy)
        if (this.asleepByHand) throw new AppError('VLLM_NOT_READY', `vLLM at ${this.client.baseUrl} ${ASLEEP_BY_HAND}`, BY_STATE);
        return;
      case 'disabled':
        throw disabledError();
      case 'starting':
        if (this.mode === 'manual') return;
        if (this.relaunching) throw new AppError('VLLM_NOT_READY', `vLLM is restarting ${this.restartCause}; the model is loading again`, BY_STATE);
        throw notServedYet();
      case 'restarting':
        throw new AppError('VLLM_NOT_READY', `vLLM is restarting ${this.restartCause}`, BY_STATE);
      case 'sleeping':
      case 'waking':
        return; // ensureServing wakes vLLM first, and a wake-up ends in neither state
      case 'stopped':
      case 'stopping':
        // Stopped and no stop asked: the moment between listening and start(), not started yet.
        if (this.state === 'stopped' && !this.stopRequested) throw notServedYet();
        throw new AppError('SHUTTING_DOWN', 'the service is shutting down', BY_STATE);
      case 'failed':
        throw new AppError('VLLM_NOT_READY', 'vLLM has failed and is not being restarted');
    }
  }

  /** Stops vLLM (group SIGTERM, stop_timeout, SIGKILL) and the monitor. Idempotent; aborts a start in progress. */
  stop(): Promise<void> {
    this.stopPromise ??= this.stopNow();
    return this.stopPromise;
  }

  // ---------------------------------------------------------------- state

  /** One probe's time box (vllm.health_timeout). */
  private get probeTimeoutMs(): number {
    return this.vllm.health_timeout * 1000;
  }

  private get stopRequested(): boolean {
    return this.stopPromise !== null;
  }

  private setState(next: ServerState, reason: string): void {
    if (this.state === next) return;
    if (!TRANSITIONS[this.state].includes(next)) {
      throw new Error(`VLLMServerManager: illegal transition ${this.state} → ${next} (${reason})`);
    }
    this.log.log(`vLLM ${this.state} → ${next}: ${reason}`);
    // Probes failed while awake say nothing of the engine asleep, and the other way round.
    if (next === 'sleeping' || this.state === 'sleeping') this.failedProbes = 0;
    this.progress.clear(); // an engine's progress is judged within one state of one process
    this.relaunching = next === 'starting' && this.state === 'restarting';
    this.state = next;
    this.since = Date.now();
  }

  // ---------------------------------------------------------------- manual mode

  private async startManual(): Promise<void> {
    this.setState('starting', `watching the vLLM at ${this.client.baseUrl}`);
    this.startMonitor();
    void this.probe();
  }

  // ---------------------------------------------------------------- auto-start

  private async startAuto(): Promise<void> {
    if (this.stopRequested) throw startAborted(); // claims nothing
    if (this.logFileProblem !== null) throw new AppError('VLLM_START_FAILED', this.logFileProblem);
    // Starting from here: /health must not call a service that is reaping an orphan unhealthy.
    this.setState('starting', `launching ${this.vllm.engine} for model ${this.vllm.model_name}`);
    if (!isLoopback(this.vllm.host)) {
      this.log.warn(
        `vLLM will listen on ${this.vllm.host} (vllm.host), not loopback: clients that reach it directly bypass ` +
          `tide-vllm's keys, limits and metrics${this.protectEngine ? " (the per-start key guards only vLLM's /v1 routes: /invocations, /tokenize, /sleep, /collective_rpc and others stay open)" : ''}`,
      );
    }
    const { sleep, lora } = this.vllm;
    if (this.vllm.engine === 'vllm' && sleep.idle_seconds > 0 && sleep.level === 2 && lora.enabled) {
      this.log.warn(
        'vllm.sleep.level 2 with vllm.lora.enabled: vLLM releases before the fix of vllm-project/vllm#39934 (PR #39935; ' +
          'v0.17 has the bug) fail to reload the weights on waking (KeyError), and each wake-up then costs a restart; level 1 has no such problem',
      );
    }
    try {
      this.reaping = this.reapOrphan(); // a stop meanwhile waits for it, then launchOnce spawns nothing
      await this.reaping;
      await this.launchOnce();
    } catch (err) {
      const message = (err as Error).message;
      this.lastError = message;
      if (!this.stopRequested) this.setState('failed', 'startup failed');
      throw err instanceof AppError && err.code === 'VLLM_START_FAILED' ? err : new AppError('VLLM_START_FAILED', message);
    }
    this.startMonitor();
    this.startIdleTimer();
  }

  /** One launch: port check, spawn, wait until the model is listed. Leaves the state at ready. */
  private async launchOnce(): Promise<void> {
    const attempt = (this.attempt = new AbortController());
    this.checkAborted(attempt);
    const { host, port } = this.vllm;
    const free = await portIsFree(host, port);
    if (free !== true) {
      const where = `${host}:${port} (vllm.host:vllm.port)`;
      if (free.code !== 'EADDRINUSE') throw new AppError('VLLM_START_FAILED', `Cannot start ${this.vllm.engine}: it could not listen on ${where}: ${listenProblem(free)}.`);
      throw new AppError('VLLM_START_FAILED',
        `Cannot start ${this.vllm.engine}: ${where} is already in use — by another program, ` +
          `or by a vLLM no tide-vllm supervises (one recorded in another vllm.state_dir by a tide-vllm killed with -9: ` +
          `a relative state_dir depends on the working directory). Find it with \`ss -ltnp 'sport = :${port}'\` and stop ` +
          `its process group, or choose another vllm.port.`,
      );
    }
    this.checkAborted(attempt);
    const apiKey = this.protectEngine ? randomBytes(24).toString('hex') : undefined;
    const spec = buildLaunchSpec(this.vllm, { apiKey });
    // Marks every process of this launch (children inherit it) so a later run can tell it is ours.
    const instance = randomBytes(8).toString('hex');
    this.client.setApiKey(apiKey);
    this.log.log(`spawning: ${[spec.command, ...redactArgs(spec.args)].join(' ')}`);
    if (this.logFile) this.log.log(`vLLM output is also written to ${this.logFile.path}`);
    const child = spawn(spec.command, spec.args, {
      detached: true, // the child leads its own process group, so the whole group can be signalled
      stdio: ['ignore', 'pipe', 'pipe'],
      env: { ...inheritedEnv(this.vllm.engine, this.gateway), ...spec.env, [INSTANCE_ENV]: instance },
    });
    const proc = (this.proc = new EngineProcess(child, spec, this.vllmLog, this.logFile));
    this.startedAt = Date.now();
    if (proc.pid !== undefined) this.updateRecord(() => this.orphans.save(proc.pid as number, spec.command, instance));
    void proc.exited.then(() => this.onExit(proc));
    await this.waitReady(proc, attempt);
    this.failedProbes = 0;
    this.lastActivity = Date.now();
    await this.reloadLoras(proc);
    this.checkAborted(attempt); // stopped while the adapters were loaded: the stop has stopped this process
    if (proc.exitInfo) throw await this.exitDuringStartup(proc); // died while the adapters were loaded: not ready
    this.setState('ready', `model ${this.vllm.model_name} is served (pid ${proc.pid}, ${((Date.now() - this.startedAt) / 1000).toFixed(1)} s)`);
  }

  private async waitReady(proc: EngineProcess, attempt: AbortController): Promise<void> {
    const deadline = Date.now() + this.vllm.startup_timeout * 1000;
    const exited = proc.exited.then(() => 'exited' as const);
    const aborted = new Promise<'aborted'>((resolve) => attempt.signal.addEventListener('abort', () => resolve('aborted')));
    for (;;) {
      if (proc.exitInfo) throw await this.exitDuringStartup(proc);
      this.checkAborted(attempt);
      const remaining = deadline - Date.now();
      if (remaining <= 0) {
        await this.terminate(proc);
        throw new AppError('VLLM_START_FAILED',
          `${this.vllm.engine} did not serve model "${this.vllm.model_name}" within ${this.vllm.startup_timeout} s ` +
            `(vllm.startup_timeout); its process group was stopped. Last lines of its output:\n${proc.tailText()}`,
        );
      }
      const probe = this.readinessProbe(Math.min(READY_PROBE_TIMEOUT_MS, remaining), attempt.signal)
        .then((ready) => (ready ? ('ready' as const) : ('loading' as const)))
        .catch(() => 'loading' as const);
      const outcome = await Promise.race([probe, exited, aborted]);
      if (outcome === 'ready') return;
      if (outcome === 'loading') {
        await Promise.race([sleep(Math.min(READY_POLL_MS, Math.max(0, deadline - Date.now()))), exited, aborted]);
      }
    }
  }

  /**
   * Ready means the model is listed on /v1/models. SGLang also lists it while its warm-up
   * request is still running, so for SGLang /health (503 until warm) must answer 200 too.
   */
  private async readinessProbe(timeoutMs: number, signal: AbortSignal): Promise<boolean> {
    const ids = await this.client.listModels({ timeoutMs, signal });
    if (!ids.includes(this.vllm.model_name)) return false;
    return this.vllm.engine !== 'sglang' || (await this.client.status('/health', { timeoutMs, signal })) === 200;
  }

  /** A stop aborts the attempt in progress, and any attempt begun after it (one waited on an orphan's end). */
  private checkAborted(attempt: AbortController): void {
    if (attempt.signal.aborted || this.stopRequested) throw startAborted();
  }

  /**
   * Why the start failed, once what is left of the group is stopped: vLLM's API server can exit
   * (its own VLLM_ENGINE_READY_TIMEOUT_S) with its EngineCore still loading, holding the GPU.
   */
  private async exitDuringStartup(proc: EngineProcess): Promise<AppError> {
    await this.terminate(proc);
    const error = proc.exitInfo?.error;
    const product = this.vllm.engine === 'vllm' ? 'vLLM' : 'SGLang';
    if (error?.code === 'ENOENT' && proc.spec.command.includes('/') && existsSync(proc.spec.command)) {
      // execve answers ENOENT for a script whose #! interpreter is missing, too (a moved virtualenv).
      return new AppError('VLLM_START_FAILED',
        `Cannot start ${this.vllm.engine}: the launcher "${proc.spec.command}" exists but could not be executed — ` +
          `probably the interpreter in its #! line is missing (a virtualenv moved or deleted). ` +
          `Reinstall ${product} there, or point vllm.command at a working launcher.`,
      );
    }
    if (error?.code === 'ENOENT') {
      // A name is looked up on PATH; a path (with a slash) is taken as it is.
      const where = proc.spec.command.includes('/') ? 'does not exist' : 'was not found on PATH';
      return new AppError('VLLM_START_FAILED',
        `Cannot start ${this.vllm.engine}: the launcher "${proc.spec.command}" ${where}. ` +
          `Install ${product}, set vllm.command to the launcher's full path, ` +
          `or set vllm.auto_start: false to use a server you run yourself.`,
      );
    }
    if (error?.code === 'EACCES') {
      // No execute permission, a directory, or a file system mounted noexec.
      return new AppError('VLLM_START_FAILED',
        `Cannot start ${this.vllm.engine}: the launcher "${proc.spec.command}" (vllm.command) cannot be executed: ` +
          `it is not executable (chmod +x it), is a directory, or is on a file system mounted noexec.`,
      );
    }
    if (error) {
      return new AppError('VLLM_START_FAILED', `Cannot start ${this.vllm.engine}: spawning "${proc.spec.command}" (vllm.command) failed: ${error.message}`);
    }
    return new AppError('VLLM_START_FAILED',
      `${this.vllm.engine} ${proc.describeExit()} before serving model "${this.vllm.model_name}". ` +
        // argparse's status: a flag refused, most often one of vllm.extra_args (the output says which).
        (proc.exitInfo?.code === ARGPARSE_EXIT ? 'Exit status 2 is usually its command line refused (argparse): look at vllm.extra_args. ' : '') +
        `Last ${proc.tail.length} lines of its output:\n${proc.tailText()}`,
    );
  }

  /**
   * The process ended. During a start the start loop reports it, during a wake-up the wake-up
   * (one failure, one crash: counting it twice would spend two restarts on it); otherwise it is a crash.
   */
  private onExit(proc: EngineProcess): void {
    if (proc !== this.proc) return;
    // EngineCore may outlive the leader in its group; the restart (or the stop) clears the group.
    if (this.state === 'ready' || this.state === 'sleeping') {
      const message = `${this.vllm.engine} ${proc.describeExit()} unexpectedly. Last lines of its output:\n${proc.tailText()}`;
      if (this.asleepInEngine()) this.diedAsleep(message);
      else this.crashed(message);
    }
  }

  /**
   * The engine died or hung while asleep at level 1 or 2. A restart would bring it back awake,
   * taking again the GPU memory its sleep gave up (to another model, perhaps); instead it sleeps on
   * as at level 3, no process left, and the next request starts it. No restart is spent on it.
   */
  private diedAsleep(message: string): void {
    this.lastError = message;
    this.diedAsleepCount += 1;
    this.log.error(`${message}\nIt stays asleep, as at level 3: the next request starts it`);
    const proc = this.proc;
    this.proc = null; // its exit is intended now, not a crash
    this.sleepLevel = 3;
    const retiring = (this.retiring = proc ? this.terminate(proc) : Promise.resolve());
    // A wake-up waits until the group is gone (it would find the port held), as after a level-3 sleep.
    const falling = (this.falling = retiring
      .catch((err: Error) => this.log.error(`stopping the engine that died asleep failed: ${err.message}`))
      .finally(() => {
        if (this.retiring === retiring) this.retiring = null;
        if (this.falling === falling) this.falling = null;
      }));
  }

  /** vLLM is gone or stopped answering after it was ready: restart it with backoff, or give up. */
  private crashed(message: string): void {
    this.lastError = message;
    this.log.error(message);
    this.sleepLevel = null; // whatever comes next (a fresh start, or nothing) is not asleep
    const { restart } = this.vllm;
    const now = Date.now();
    this.restartTimes = this.restartTimes.filter((t) => now - t < restart.window * 1000);
    if (!restart.enabled || this.restartTimes.length >= restart.max_restarts) {
      const why = restart.enabled
        ? `${restart.max_restarts} ${restart.max_restarts === 1 ? 'restart' : 'restarts'} within ${restart.window} s (vllm.restart) ${restart.max_restarts === 1 ? 'is' : 'are'} used up`
        : 'vllm.restart.enabled is false';
      this.setState('failed', why);
      void this.terminateCurrent();
      this.fatalHandler(`vLLM is gone and will not be restarted: ${why}. Last error: ${message}`);
      return;
    }
    const delay = Math.min(restart.backoff_initial * 2 ** this.restartTimes.length, restart.backoff_max);
    this.restartTimes.push(now);
    this.restartCount += 1;
    this.restartCause = 'after a failure';
    this.setState('restarting', `restart ${this.restartCount} in ${delay} s`);
    // What is left of the group (an EngineCore outlives its API server, holding the GPU; a hung
    // vLLM) is stopped now, not after the backoff.
    this.clearing = this.terminateCurrent();
    this.restartTimer = setTimeout(() => void this.restartNow(), delay * 1000);
  }

  private async restartNow(): Promise<void> {
    this.restartTimer = null;
    if (this.state !== 'restarting') return;
    const clearing = this.clearing ?? this.terminateCurrent();
    this.clearing = null;
    await clearing;
    if (this.state !== 'restarting') return;
    this.setState('starting', `restart ${this.restartCount}`);
    try {
      await this.launchOnce();
    } catch (err) {
      if (this.stopRequested) return;
      this.crashed(`restart ${this.restartCount} failed: ${(err as Error).message}`);
    }
  }

  /** An operator's restart (admin API): stop the group, start again, resolve when served. */
  async restart(): Promise<void> {
    this.requireAuto('restart');
    if (this.state !== 'ready' && this.state !== 'sleeping') {
      throw new AppError('CONFLICT', `vLLM is ${this.state}; only a running vLLM can be restarted`);
    }
    this.restartCount += 1;
    this.sleepLevel = null;
    this.restartCause = "at an operator's request";
    this.setState('restarting', 'requested by an operator');
    // New requests are refused (503) from here; those in flight finish first, as at shutdown.
    if ((await this.traffic.waitIdle(this.drainMs)) > 0 && this.currentState === 'restarting') {
      this.traffic.cutAll(
        `the restart's drain (web.drain_timeout = ${this.drainMs / 1000} s) ran out`,
        new AppError('VLLM_NOT_READY', "vLLM was restarted at an operator's request before the answer was complete"),
      );
    }
    await this.restartNow();
    if (this.stopRequested) throw new AppError('SHUTTING_DOWN', 'the service is shutting down; the restart was abandoned');
    if (this.state !== 'ready') throw new AppError('UPSTREAM_ERROR', `the restart did not bring vLLM back (${this.state}): ${this.lastError ?? ''}`);
  }

  // ---------------------------------------------------------------- health monitor

  private startMonitor(): void {
    if (this.monitorTimer) return;
    this.monitorTimer = setInterval(() => void this.probe(), this.vllm.health_interval * 1000);
    this.monitorTimer.unref();
  }

  /**
   * One time-boxed GET /health. Never overlaps with the previous probe. A vLLM run by hand must
   * also serve vllm.model_name to tide-vllm's key before it counts as ready: one that answers
   * /health but refuses the key, or serves another model, would fail every request.
   */
  private async probe(): Promise<void> {
    if (this.probing || !this.probedNow()) return;
    this.probing = true;
    try {
      const status = await this.client
        .status('/health', { timeoutMs: this.probeTimeoutMs })
        .catch(() => 0);
      let problem = status === 200 ? null : NO_HEALTH;
      if (this.mode === 'manual') {
        if (problem !== null) this.askSleepByHand = true; // it may come back with other flags
        else if (await this.sleptByHand()) problem = ASLEEP_BY_HAND;
        if (problem === null && this.state !== 'ready') problem = await this.cannotServe();
      }
      // vLLM's /sleep and /wake_up are unguarded (A4) and its /health stays 200 asleep (A9): ask it directly.
      if (problem === null && this.state === 'ready' && this.sleepsOnRequest() && (await this.engineSleeps()) === true) {
        await this.sleptElsewhere();
        return;
      }
      if (problem === null && this.asleepUntouched()) problem = await this.noticeOutsideWake();
      const hung = problem === null ? await this.engineHung() : null;
      if (hung !== null) return this.crashed(hung);
      this.onProbe(problem);
      if (problem === null && this.mode === 'manual' && this.loras.size > 0) await this.restoreLoras();
    } finally {
      this.probing = false;
    }
  }

  /**
   * Why vLLM's engine is taken for hung, or null. Its /health stays 200 while the engine is stuck
   * (a kernel that never returns: check_health only asks whether it has `errored`, A3), so every
   * request would wait vllm.timeout and fail, for good. While requests are in flight, its metrics
   * are read at each probe: work in the engine (running or waiting) and no token processed for
   * vllm.timeout, the longest silence tide-vllm takes from vLLM, is a hang. vLLM started by
   * tide-vllm only (it restarts it); not SGLang, whose /health runs a generation and fails.
   */
  private async engineHung(): Promise<string | null> {
    const watched = this.mode === 'auto' && this.vllm.engine === 'vllm' && this.state === 'ready';
    if (!watched || (this.progress.size === 0 && this.traffic.activeInFlight === 0)) {
      this.progress.clear();
      return null;
    }
    const engines = await this.client
      .getText('/metrics', { timeoutMs: this.probeTimeoutMs })
      .then(engineProgress, () => null);
    if (this.state !== 'ready') return null; // it changed meanwhile (a sleep, a restart): not this check's
    if (engines === null) {
      this.progress.clear();
      return null;
    }
    // A request stalled for vllm.timeout is cut by the relay (within its second-long sweep) and
    // aborted in vLLM: a slow one (a long prefill counts its tokens only when done) ends there, as
    // a 504, before an engine is taken for hung.
    const limitMs = (this.vllm.timeout + this.vllm.health_interval + 1) * 1000;
    const now = Date.now();
    for (const [engine, { busy, tokens }] of engines) {
      const last = this.progress.get(engine);
      if (busy === 0) this.progress.delete(engine);
      else if (last === undefined || last.tokens !== tokens) this.progress.set(engine, { tokens, since: now });
      else if (now - last.since >= limitMs) {
        this.progress.clear();
        const which = engines.size > 1 ? ` ${engine}` : '';
        return `vLLM's engine${which} processed no token for ${Math.round((now - last.since) / 1000)} s (vllm.timeout = ${this.vllm.timeout} s) with ${busy} requests in it: it is hung, though /health answers`;
      }
    }
    return null;
  }

  /**
   * Whether vLLM can be probed in this state. Asleep at levels 1 and 2 it runs on and answers
   * /health (A9), so a hung one is noticed before a request waits wake_timeout for it; SGLang's
   * /health runs a generation, which its released memory cannot. An engine asleep at level 3 has
   * no process; one falling asleep or waking up is busy with it, and that call reports its failure.
   */
  private probedNow(): boolean {
    if (this.state === 'sleeping') return this.asleepUntouched();
    return this.state !== 'waking';
  }

  /** Asleep at level 1 or 2 (the engine's own sleep, its process running), with no sleep or wake-up of tide-vllm's in progress. */
  private asleepInEngine(): boolean {
    return this.state === 'sleeping' && this.sleepLevel !== 3 && !this.falling && !this.waking;
  }

  /** As asleepInEngine, for a vLLM whose sleep can be probed (/health 200 and GET /is_sleeping while asleep). */
  private asleepUntouched(): boolean {
    return this.asleepInEngine() && this.sleepsOnRequest();
  }

  /**
   * Whether the vLLM run by hand was put to sleep (its own /sleep: /health stays 200 asleep, and
   * generations would wait in it until vllm.timeout, A9). Asked only of one that has the route.
   */
  private async sleptByHand(): Promise<boolean> {
    if (this.vllm.engine !== 'vllm' || !this.askSleepByHand) return false;
    try {
      const body = await this.client.getJsonIfRouted<{ is_sleeping?: unknown }>('/is_sleeping', { timeoutMs: this.probeTimeoutMs });
      if (body === null) this.askSleepByHand = false;
      return body?.is_sleeping === true;
    } catch {
      return false; // not known: /health's answer stands
    }
  }

  /** Why a vLLM run by hand that answers /health cannot serve tide-vllm's requests; null when it can. */
  private async cannotServe(): Promise<string | null> {
    let cards: Array<{ id: string; maxModelLen: number | null }>;
    try {
      cards = await this.client.modelCards({ timeoutMs: this.probeTimeoutMs });
    } catch (err) {
      return `answers /health, but not GET /v1/models: ${(err as Error).message}`;
    }
    const served = cards.find((card) => card.id === this.vllm.model_name);
    if (served === undefined) return `serves ${cards.map((m) => `"${m.id}"`).join(', ') || 'no model'}, not vllm.model_name "${this.vllm.model_name}"`;
    // The simple API checks and defaults max_tokens by vllm.max_model_len: said once, when it is not vLLM's.
    if (served.maxModelLen !== null && served.maxModelLen !== this.vllm.max_model_len && !this.contextWarned) {
      this.contextWarned = true;
      this.log.warn(
        `vLLM at ${this.client.baseUrl} serves "${served.id}" with a context of ${served.maxModelLen} tokens, vllm.max_model_len says ${this.vllm.max_model_len}: ` +
          `set vllm.max_model_len to ${served.maxModelLen} (the simple API checks and defaults max_tokens by it)`,
      );
    }
    return null;
  }

  private onProbe(problem: string | null): void {
    if (this.mode === 'manual') this.asleepByHand = problem === ASLEEP_BY_HAND;
    if (problem === null) {
      this.failedProbes = 0;
      if (this.state === 'unreachable' || (this.state === 'starting' && this.mode === 'manual')) {
        if (this.mode === 'manual') this.lastError = null;
        this.setState('ready', `vLLM at ${this.client.baseUrl} answers /health`);
      }
      return;
    }
    this.failedProbes += 1;
    const threshold = this.vllm.health_failure_threshold;
    if (this.mode === 'manual') {
      const why = `vLLM at ${this.client.baseUrl} ${problem}`;
      // Asleep is known at the first probe: no threshold to wait for.
      const lost = this.state === 'ready' && (this.failedProbes >= threshold || this.asleepByHand);
      // Said once (and shown in /admin/status), not at every probe; a vLLM not up yet is no news.
      if (why !== this.lastError && (problem !== NO_HEALTH || lost)) this.log.warn(why);
      if (this.state === 'starting' || this.state === 'unreachable' || lost) {
        this.lastError = why;
        this.setState('unreachable', why);
      }
      return;
    }
    const watched = this.state === 'ready' || this.asleepUntouched();
    if (watched && this.failedProbes >= threshold) {
      this.failedProbes = 0;
      const message =
        problem === NO_SLEEP_STATE
          ? `vLLM's engine stopped answering /is_sleeping while asleep (${threshold} probes in a row failed or took over ${this.vllm.health_timeout} s): it is hung, though /health answers`
          : `${this.vllm.engine} stopped answering /health (${threshold} probes in a row failed or took over ${this.vllm.health_timeout} s)`;
      if (this.state === 'sleeping') this.diedAsleep(message);
      else this.crashed(message);
    }
  }

  // ---------------------------------------------------------------- sleep and wake

  /**
   * The web layer's requests in flight: an engine is idle only when there are none, and an
   * operator's restart lets them finish first, for up to `drainMs` (web.drain_timeout).
   */
  trackTraffic(traffic: Traffic, drainMs: number): void {
    this.traffic = traffic;
    this.drainMs = drainMs;
  }

  /** Marks activity (a request ended), so idle time counts from the last answer. */
  touch(): void {
    this.lastActivity = Date.now();
  }

  private startIdleTimer(): void {
    const idleMs = this.vllm.sleep.idle_seconds * 1000;
    if (idleMs <= 0 || this.idleTimer) return;
    this.idleTimer = setInterval(() => {
      if (this.state !== 'ready' || this.traffic.activeInFlight > 0 || Date.now() - this.lastActivity < idleMs) return;
      this.sleep(this.vllm.sleep.level, `idle for ${this.vllm.sleep.idle_seconds} s`).catch((err: Error) =>
        this.log.warn(`could not put vLLM to sleep: ${err.message}`),
      );
    }, Math.min(IDLE_CHECK_MS, idleMs));
    this.idleTimer.unref();
  }

  /**
   * Puts the engine to sleep. Levels 1 and 2 are the engine's own (weights offloaded or
   * discarded): vLLM first lets generations in flight finish, for up to vllm.timeout, then aborts
   * the rest. Level 3 stops the process. Requests that arrive meanwhile wake it again.
   */
  async sleep(level: SleepLevel, reason = 'requested by an operator'): Promise<void> {
    this.requireAuto('sleep');
    if (this.state === 'waking') throw new AppError('CONFLICT', `vLLM is waking up (from level ${this.sleepLevel}); put it to sleep once it is ready`);
    if (this.state === 'sleeping') throw new AppError('CONFLICT', `vLLM is already asleep (level ${this.sleepLevel})`);
    if (this.state !== 'ready') throw new AppError('CONFLICT', `vLLM is ${this.state}; only a ready vLLM can sleep`);
    if (this.falling) throw new AppError('CONFLICT', 'an earlier sleep of vLLM is still being settled');
    if (level !== 3 && !usesEngineSleep(this.vllm)) {
      throw new AppError(
        'CONFLICT',
        `sleep level ${level} needs the engine's sleep mode: set vllm.sleep.idle_seconds > 0 and vllm.sleep.level 1 or 2 (level 3 always works)`,
      );
    }
    if (level === 2 && this.vllm.engine === 'sglang') throw new AppError('CONFLICT', 'SGLang has no sleep level 2');
    this.sleepLevel = level;
    this.setState('sleeping', `level ${level}: ${reason}`);
    // A wake-up waits on this promise: it settles only once the state says what the engine is.
    this.falling = this.fallAsleep(level);
    try {
      await this.falling;
    } finally {
      this.falling = null;
    }
  }

  /**
   * Asks the engine to sleep and leaves the state true to it: `sleeping` when it sleeps, or may
   * (the next request's wake-up, harmless on an awake engine, settles it); `ready` only when the
   * engine says it is awake. A restart or a stop that took over meanwhile keeps its own state.
   */
  private async fallAsleep(level: SleepLevel): Promise<void> {
    const proc = this.proc;
    try {
      await this.askToSleep(level);
    } catch (err) {
      this.throwIfSuperseded();
      // A CONFLICT is a sleep given up before the engine was asked, or one it refused: awake.
      const asleep = err instanceof AppError && err.code === 'CONFLICT' ? false : await this.engineSleeps();
      // vLLM died under the sleep: the connection broke before its exit came. Waited for here, the
      // exit is a crash (onExit while falling asleep), not a death asleep of an engine that never slept.
      if (asleep === null && connectionFailed(err) && level !== 3 && proc !== null && proc === this.proc) await proc.exitWithin(this.probeTimeoutMs);
      this.throwIfSuperseded();
      if (asleep === false) {
        this.log.warn(`${this.vllm.engine} did not fall asleep, and is awake: ${(err as Error).message}`);
        this.sleepLevel = null;
        this.setState('ready', 'the sleep failed; still awake');
      } else {
        this.log.warn(
          `vLLM's sleep failed (${(err as Error).message}) and it ${asleep ? 'says it is asleep' : 'cannot tell whether it is asleep'}: ` +
            'left sleeping, the next request wakes it',
        );
      }
      throw err;
    }
    this.throwIfSuperseded();
    this.sleepCount += 1;
  }

  private async askToSleep(level: SleepLevel): Promise<void> {
    const timeoutMs = this.vllm.sleep.wake_timeout * 1000;
    if (level === 3) {
      const proc = this.proc;
      this.proc = null; // its exit is intended, not a crash
      if (!proc) return;
      this.retiring = this.terminate(proc);
      try {
        await this.retiring;
      } finally {
        this.retiring = null;
      }
    } else if (this.vllm.engine === 'sglang') {
      const busy = await this.ownRequestsDone(Date.now() + this.vllm.timeout * 1000);
      if (busy > 0) throw new AppError('CONFLICT', `SGLang still had ${busy} request(s) running after ${this.vllm.timeout} s (vllm.timeout): not put to sleep`);
      try {
        await this.client.call('POST', '/release_memory_occupation', {}, { timeoutMs });
      } catch (err) {
        if (!(err instanceof AppError && err.code === 'UPSTREAM_REJECTED')) throw err;
        throw new AppError('CONFLICT', `SGLang refused to release its memory (it stays awake): ${err.message}`);
      }
    } else {
      // Generations in flight may finish first, for up to vllm.timeout (tide-vllm waits no longer
      // than that for a non-streamed one): tide-vllm's own are waited for here, as vLLM up to 0.16
      // sleeps at once whatever `mode` says (A9), and mode=wait (vLLM's default, abort, would cut
      // them) drains any others of a later vLLM.
      const deadline = Date.now() + this.vllm.timeout * 1000;
      try {
        if ((await this.ownRequestsDone(deadline)) > 0) throw new AppError('UPSTREAM_TIMEOUT', 'generations still running');
        await this.client.call('POST', `/sleep?level=${level}&mode=wait`, undefined, { timeoutMs: Math.max(1, deadline - Date.now()) });
      } catch (err) {
        if (!(err instanceof AppError && err.code === 'UPSTREAM_TIMEOUT')) throw err;
        // That sleep is still pending in vLLM and will happen once the engine is idle; a /wake_up
        // now would not cancel it. Abort what still runs, so it happens now, while we know it.
        this.log.warn(`generations still running after ${this.vllm.timeout} s (vllm.timeout) are aborted so that vLLM can sleep`);
        await this.client.call('POST', `/sleep?level=${level}&mode=abort`, undefined, { timeoutMs });
      }
    }
  }

  /**
   * Waits until none of tide-vllm's requests is in the engine and no probe of tide-vllm's (SGLang's
   * /health runs a generation) is under way, or `deadline` passed; resolves with how many still
   * are. It sleeps only when idle: SGLang asserts so, and vLLM up to 0.16 sleeps under running
   * generations. tide-vllm is the only client of the engine it starts, so its own requests in
   * flight are what the engine runs, less those waiting for the wake-up (new requests wait for it
   * meanwhile: the state is `sleeping`). SGLang's gauges lag by up to 30 s when idle, so they are not asked.
   */
  private async ownRequestsDone(deadline: number): Promise<number> {
    for (;;) {
      this.throwIfSuperseded(); // taken over (a crash, a restart, a stop): nothing is sent
      const busy = this.traffic.activeInFlight - this.waitingForWake + (this.probing && this.vllm.engine === 'sglang' ? 1 : 0);
      if (busy <= 0 || Date.now() >= deadline) return Math.max(0, busy);
      await sleep(IDLE_POLL_MS);
    }
  }

  /** True when the vLLM tide-vllm started exposes /sleep (VLLM_SERVER_DEV_MODE), so anyone can put it to sleep. */
  private sleepsOnRequest(): boolean {
    return this.mode === 'auto' && this.vllm.engine === 'vllm' && usesEngineSleep(this.vllm);
  }

  /**
   * Someone put vLLM to sleep behind tide-vllm's back (a POST to vLLM's own /sleep). Requests would
   * queue in vLLM until vllm.timeout; instead tide-vllm takes it as its own sleep, at the level
   * vLLM's metrics show, so that the next request (or one already waiting) wakes it.
   */
  private async sleptElsewhere(): Promise<void> {
    const level = await this.outsideSleepLevel();
    if (this.state !== 'ready') return; // a sleep, restart or stop of tide-vllm's own came first
    this.sleepLevel = level;
    this.log.warn(`vLLM was put to sleep outside tide-vllm (a POST to its own /sleep; level ${level} by its metrics): the next request wakes it`);
    this.setState('sleeping', `level ${level}: put to sleep outside tide-vllm`);
    if (this.traffic.activeInFlight > 0) {
      this.wake().catch((err: Error) => this.log.warn(`could not wake vLLM for the requests waiting in it: ${err.message}`));
    }
  }

  /**
   * Someone woke vLLM behind tide-vllm's back (a POST to its own /wake_up): it is ready again. An
   * engine that does not say whether it sleeps is the probe's problem (NO_SLEEP_STATE): it hangs.
   */
  private async noticeOutsideWake(): Promise<string | null> {
    const asleep = await this.engineSleeps();
    if (asleep === null) return this.asleepUntouched() ? NO_SLEEP_STATE : null; // not if a wake-up of tide-vllm's began meanwhile
    if (asleep === true || !this.asleepUntouched()) return null;
    this.log.warn('vLLM was woken outside tide-vllm (a POST to its own /wake_up): ready again');
    this.sleepLevel = null;
    this.setState('ready', 'woken outside tide-vllm');
    this.lastActivity = Date.now();
    return null;
  }

  /**
   * The level of a sleep tide-vllm did not ask for, from vllm:engine_sleep_state (A9, A10), which
   * vLLM sets as it is asked (record_sleep_state): weights offloaded (1), discarded (2), or none of
   * the three at 1 — only scheduling paused (level 0), which a plain /wake_up ends, as level 1's.
   * Anything else counts as 2 — no metrics, or "awake" while vLLM says it sleeps (someone woke a
   * part of it): that wake-up reloads the weights, right whatever the engine discarded.
   */
  private async outsideSleepLevel(): Promise<SleepLevel> {
    try {
      const text = await this.client.getText('/metrics', { timeoutMs: this.probeTimeoutMs });
      const series = [...text.matchAll(/^vllm:engine_sleep_state\{[^}]*sleep_state="(\w+)"[^}]*\} (\S+)$/gm)];
      const atOne = series.filter(([, , value]) => Number(value) === 1).map(([, state]) => state);
      if (atOne.length === 1 && atOne[0] === 'weights_offloaded') return 1;
      if (series.length > 0 && atOne.length === 0) return 1;
    } catch {
      // no metrics: the safe wake-up
    }
    return 2;
  }

  /** vLLM's own answer to "are you asleep?" (GET /is_sleeping); null when it cannot be had (SGLang has no such route). */
  private async engineSleeps(): Promise<boolean | null> {
    if (this.vllm.engine === 'sglang') return null;
    try {
      const body = await this.client.getJson<{ is_sleeping?: unknown }>('/is_sleeping', { timeoutMs: this.probeTimeoutMs });
      return typeof body.is_sleeping === 'boolean' ? body.is_sleeping : null;
    } catch {
      return null;
    }
  }

  /** A sleep whose state was taken over (a restart, a crash, a stop) answers with that, not its own outcome. */
  private throwIfSuperseded(): void {
    if (this.state === 'sleeping') return;
    if (this.stopRequested) throw new AppError('SHUTTING_DOWN', 'the service is shutting down');
    throw new AppError('CONFLICT', `the sleep was cut short: vLLM is ${this.state} now (it was restarted, or failed, meanwhile)`);
  }

  /** Wakes the engine; concurrent callers share one wake-up. Resolves at once when awake. */
  wake(): Promise<void> {
    if (!isAsleep(this.state)) return Promise.resolve();
    this.waking ??= this.wakeNow().finally(() => {
      this.waking = null;
    });
    return this.waking;
  }

  /**
   * Waits for the one wake-up, for at most `timeoutMs`; a request whose `signal` aborts (its
   * client left, or the shutdown cut it) stops waiting at once, with the abort's reason.
   */
  private async wakeWithin(timeoutMs: number, signal?: AbortSignal): Promise<void> {
    let timer: NodeJS.Timeout | undefined;
    let onAbort: (() => void) | undefined;
    const given = new Promise<never>((_, reject) => {
      timer = setTimeout(
        () => reject(new AppError('VLLM_NOT_READY', `vLLM is still waking up after ${timeoutMs / 1000} s (vllm.sleep.wake_timeout)`)),
        timeoutMs,
      );
      if (!signal) return;
      onAbort = () => reject(abortReason(signal));
      if (signal.aborted) onAbort();
      else signal.addEventListener('abort', onAbort, { once: true });
    });
    // A request's wait (the admin API's calls carry no signal, and are no traffic).
    const request = signal !== undefined ? 1 : 0;
    this.waitingForWake += request;
    try {
      await Promise.race([this.wake(), given]);
    } finally {
      this.waitingForWake -= request;
      clearTimeout(timer);
      if (onAbort) signal?.removeEventListener('abort', onAbort);
    }
  }

  private async wakeNow(): Promise<void> {
    if (this.falling) await this.falling.catch(() => undefined);
    if (this.state !== 'sleeping') {
      // The sleep failed (vLLM awake: ready), or a crash, a restart or a stop took over while vLLM
      // fell asleep. The callers get what a request gets in that state: resolving would send them on
      // to a vLLM that is gone or not up yet, and they would get "not reachable" instead.
      this.refuseUnlessServing();
      return;
    }
    const level = this.sleepLevel;
    const started = Date.now();
    this.setState('waking', `level ${level}`);
    try {
      if (level === 3) {
        await this.launchOnce(); // ends in ready
      } else {
        const timeoutMs = this.vllm.sleep.wake_timeout * 1000;
        if (this.vllm.engine === 'sglang') {
          await this.client.call('POST', '/resume_memory_occupation', {}, { timeoutMs });
        } else if (level === 2) {
          // Level 2 discarded the weights: allocate them, reload them from disk, then the KV cache.
          await this.client.call('POST', '/wake_up?tags=weights', undefined, { timeoutMs });
          await this.client.call('POST', '/collective_rpc', { method: 'reload_weights' }, { timeoutMs });
          await this.client.call('POST', '/wake_up?tags=kv_cache', undefined, { timeoutMs });
        } else {
          await this.client.call('POST', '/wake_up', undefined, { timeoutMs });
        }
        // It answered, then died: its exit came while waking, which is no crash to onExit.
        if (this.proc?.exitInfo) throw new Error(`${this.vllm.engine} ${this.proc.describeExit()} after waking up`);
        this.setState('ready', `awake after ${((Date.now() - started) / 1000).toFixed(1)} s`);
      }
      this.sleepLevel = null;
      this.wakeCount += 1;
      this.lastActivity = Date.now();
    } catch (err) {
      if (this.stopRequested) throw new AppError('SHUTTING_DOWN', 'the service is shutting down');
      this.crashed(`vLLM failed to wake up: ${(err as Error).message}`);
      if ((this.state as ServerState) === 'failed') this.refuseUnlessServing(); // no restart left: says so
      throw new AppError('VLLM_NOT_READY', 'vLLM failed to wake up; it is being restarted');
    }
  }

  // ---------------------------------------------------------------- LoRA adapters

  /** Every adapter served, name → path: those of vllm.lora.modules (loaded at start) first, then those loaded at run time. */
  private adapters(): Record<string, string> {
    const configured = this.mode === 'disabled' ? {} : this.vllm.lora.modules;
    return { ...configured, ...Object.fromEntries(this.loras) };
  }

  /** True for a LoRA adapter that is loaded: at start (vllm.lora.modules) or at run time. */
  hasAdapter(name: string): boolean {
    return this.loras.has(name) || Object.prototype.hasOwnProperty.call(this.vllm.lora.modules, name);
  }

  async loadLora(name: string, path: string): Promise<void> {
    this.requireLora();
    // A request naming the served model is for the base model (SGLang would send it to the adapter).
    if (name === this.vllm.model_name) throw AppError.invalid(`an adapter cannot take the served model's name "${name}" (vllm.model_name)`, 'name');
    await this.ensureServing();
    await this.sendLoadLora(name, path);
    this.loras.set(name, path);
  }

  /**
   * Unloads an adapter loaded at run time. One from vllm.lora.modules is part of the
   * configuration, loaded again at every start: refused (409), so hasAdapter stays true to it.
   */
  async unloadLora(name: string): Promise<void> {
    this.requireLora();
    if (Object.prototype.hasOwnProperty.call(this.vllm.lora.modules, name)) {
      throw new AppError(
        'CONFLICT',
        `LoRA adapter '${name}' is configured in vllm.lora.modules and loaded at every start; remove it there to unload it`,
      );
    }
    // SGLang answers an unknown name with a 400 like any refusal; the adapters it serves are the ones loaded through us.
    if (this.vllm.engine === 'sglang' && !this.loras.has(name)) throw new AppError('NOT_FOUND', `there is no LoRA adapter named '${name}'`);
    await this.ensureServing();
    // vLLM answers an unknown name with a 404 itself (it may serve adapters a resolver plugin
    // loaded, which tide-vllm never saw): the admin API's own "no such adapter", with vLLM's words.
    await this.client.call('POST', this.vllm.engine === 'sglang' ? '/unload_lora_adapter' : '/v1/unload_lora_adapter', { lora_name: name }).catch((err: unknown) => {
      if (!(err instanceof AppError && err.code === 'UPSTREAM_REJECTED' && err.upstreamStatus === 404)) throw err;
      this.loras.delete(name); // not loaded again after a restart either: the operator unloaded it
      throw new AppError('NOT_FOUND', err.message);
    });
    this.loras.delete(name);
  }

  private async sendLoadLora(name: string, path: string): Promise<void> {
    const body = { lora_name: name, lora_path: path };
    await this.client.call('POST', this.vllm.engine === 'sglang' ? '/load_lora_adapter' : '/v1/load_lora_adapter', body);
  }

  /**
   * Loads the adapters loaded at run time again, in order, into a new process. One vLLM refuses
   * (its path is gone…) is dropped, with a warning. A vLLM that goes away meanwhile (it died
   * loading one: out of memory) fails this start, the list kept whole for the next one.
   */
  private async reloadLoras(proc: EngineProcess): Promise<void> {
    for (const [name, path] of this.loras) {
      try {
        await this.sendLoadLora(name, path);
      } catch (err) {
        if (connectionFailed(err)) {
          await proc.exitWithin(this.probeTimeoutMs);
          if (proc.exitInfo) throw await this.exitDuringStartup(proc);
          throw new AppError('VLLM_START_FAILED', `${this.vllm.engine} could not be reached to load LoRA adapter ${name} again: ${(err as Error).message}`);
        }
        this.log.warn(`could not load LoRA adapter ${name} again after the restart: ${(err as Error).message}`);
        this.loras.delete(name);
      }
    }
  }

  /**
   * Manual mode: the vLLM run by hand may have been restarted (between two probes, unseen), and
   * lost the adapters loaded through tide-vllm. Those it no longer lists are loaded again; one it
   * refuses is dropped, with a warning; if it cannot be reached, the next probe tries again.
   */
  private async restoreLoras(): Promise<void> {
    let served: Set<string>;
    try {
      served = new Set((await this.client.modelCards({ timeoutMs: this.probeTimeoutMs })).map((card) => card.id));
    } catch {
      return;
    }
    for (const [name, path] of this.loras) {
      if (served.has(name)) continue;
      try {
        await this.sendLoadLora(name, path);
        this.log.warn(`vLLM at ${this.client.baseUrl} no longer served LoRA adapter ${name} (restarted?): loaded it again`);
      } catch (err) {
        if (!(err instanceof AppError && err.code === 'UPSTREAM_REJECTED')) return;
        // Loaded meanwhile (vLLM: "has already been loaded"), or unloaded or replaced by an operator.
        if (err.message.includes('already been loaded') || this.loras.get(name) !== path) continue;
        this.log.warn(`could not load LoRA adapter ${name} again into the vLLM at ${this.client.baseUrl}: ${err.message}`);
        this.loras.delete(name);
      }
    }
  }

  private requireLora(): void {
    if (!this.vllm.enabled) throw disabledError();
    if (!this.vllm.lora.enabled) throw new AppError('CONFLICT', 'LoRA adapters are not enabled: set vllm.lora.enabled: true');
  }

  private requireAuto(action: string): void {
    if (this.mode !== 'auto') {
      throw new AppError('CONFLICT', `${action} is only available when tide-vllm starts vLLM itself (vllm.auto_start: true)`);
    }
  }

  // ---------------------------------------------------------------- stopping

  private async stopNow(): Promise<void> {
    if (this.monitorTimer) clearInterval(this.monitorTimer);
    if (this.idleTimer) clearInterval(this.idleTimer);
    if (this.restartTimer) clearTimeout(this.restartTimer);
    this.monitorTimer = this.restartTimer = this.idleTimer = null;
    this.attempt?.abort();
    this.setState('stopping', 'stop requested');
    this.client.close(); // its idle keep-alive sockets would make vLLM's shutdown wait
    await this.reaping?.catch(() => undefined); // its failure is the start's to report
    await this.clearing;
    await this.terminateCurrent();
    this.updateRecord(() => this.orphans.release());
    this.logFile?.close();
    this.setState('stopped', 'vLLM stopped');
  }

  private async terminateCurrent(): Promise<void> {
    await this.retiring?.catch(() => undefined); // the group a level-3 sleep is stopping; its failure is the sleep's to report
    if (this.proc) await this.terminate(this.proc);
  }

  private async terminate(proc: EngineProcess): Promise<void> {
    // Found gone once (a crash's clearing), its group id may since name another process's group.
    if (proc.groupGone || proc.pid === undefined) return;
    if (proc.exitInfo === null) proc.signalled = true;
    proc.groupGone = await this.terminateRecorded(proc.pid);
  }

  /**
   * Stops a vLLM process group and forgets its record, unless processes survived SIGKILL: then the
   * record stays, so the next start finds them again instead of a port held by nobody it knows.
   */
  private async terminateRecorded(pgid: number, record = this.orphans): Promise<boolean> {
    const result = await terminateGroup(pgid, this.vllm.stop_timeout * 1000);
    if (result.killed) this.log.warn(`vLLM did not stop within ${this.vllm.stop_timeout} s (vllm.stop_timeout) of SIGTERM; its process group was killed`);
    if (!result.gone) this.log.error(`processes of vLLM's group ${pgid} survived SIGKILL`);
    else this.updateRecord(() => record.clear(pgid));
    return result.gone;
  }

  private openLogFile(): RotatingLog | null {
    try {
      return new RotatingLog(this.vllm.log_file, this.vllm.log_max_bytes, this.vllm.log_backups);
    } catch (err) {
      this.logFileProblem = `Cannot write vLLM's log to vllm.log_file (${this.vllm.log_file}): ${(err as Error).message}`;
      return null;
    }
  }

  /**
   * The port's record, once claimed, is kept up to date on a best-effort basis: a full disk must
   * not stop a launch, a stop or a restart. It costs only the clean-up after a kill -9.
   */
  private updateRecord(update: () => void): void {
    try {
      update();
    } catch (err) {
      this.log.warn(`could not update the record of vLLM's process groups in vllm.state_dir (${this.vllm.state_dir}): ${(err as Error).message}`);
    }
  }

  /**
   * Claims vllm.port in vllm.state_dir, and stops the process groups an earlier run that died
   * without stopping vLLM left there (kill -9, OOM). A port claimed by a tide-vllm that still runs
   * (another instance with the same state_dir and vllm.port) is refused, whether its vLLM runs or
   * not (asleep at level 3, between restarts): it would start one on the same port.
   */
  private async reapOrphan(): Promise<void> {
    let found: Claim;
    try {
      found = this.orphans.claim();
    } catch (err) {
      throw new AppError('VLLM_START_FAILED', `Cannot record vLLM's process group in vllm.state_dir (${this.vllm.state_dir}): ${(err as Error).message}`);
    }
    if (found.supervisor !== null) {
      throw new AppError('VLLM_START_FAILED',
        `vllm.port ${this.vllm.port} is supervised by another tide-vllm (pid ${found.supervisor}, state_dir ${this.vllm.state_dir}), ` +
          (found.group
            ? `whose vLLM (process group ${found.group.pgid}) is left running. `
            : 'whose vLLM is not running now (asleep at level 3, or between restarts) and is left alone. ') +
          'Stop that tide-vllm, or give this one another vllm.port.',
      );
    }
    await this.stopOrphans(found.orphans, this.orphans, '');
    await this.reapOtherPorts();
  }

  /**
   * The groups recorded under other ports in this state_dir by a tide-vllm that is gone (killed,
   * then started again with another vllm.port) hold a GPU as much as those of this port: they are
   * stopped too. A port whose tide-vllm runs is left alone; its record is held only while its
   * orphans are stopped (a tide-vllm starting there meanwhile is refused, then may start).
   */
  private async reapOtherPorts(): Promise<void> {
    for (const port of OrphanRecord.recordedPorts(this.vllm.state_dir)) {
      if (port === this.vllm.port) continue;
      const record = new OrphanRecord(this.vllm.state_dir, port);
      let found: Claim;
      try {
        found = record.claim();
      } catch (err) {
        this.log.warn(`could not read the record of port ${port} in vllm.state_dir (${this.vllm.state_dir}): ${(err as Error).message}`);
        continue;
      }
      if (found.supervisor !== null) continue; // a live tide-vllm's
      await this.stopOrphans(found.orphans, record, ` on port ${port}`);
      this.updateRecord(() => record.release());
    }
  }

  private async stopOrphans(orphans: RunningGroup[], record: OrphanRecord, where: string): Promise<void> {
    for (const orphan of orphans) {
      this.log.warn(`stopping vLLM process group ${orphan.pgid}${where} left running by an earlier tide-vllm (${orphan.command})`);
      if (await this.terminateRecorded(orphan.pgid, record)) this.log.log(`vLLM process group ${orphan.pgid}${where} is stopped`);
    }
  }
}

/**
 * tide-vllm's environment as vLLM gets it: without VLLM_API_KEY (vLLM would take it as its key
 * and lock tide-vllm out), nor any variable holding one of tide-vllm's own keys, nor any that the
 * configuration put into one (`sk-${PART}`: auth.keyVariables).
 */
function inheritedEnv(engine: VllmConfig['engine'], gateway: GatewaySecrets): NodeJS.ProcessEnv {
  const env = { ...process.env };
  if (engine === 'vllm') delete env.VLLM_API_KEY;
  for (const name of gateway.variables) delete env[name];
  const keys = new Set(gateway.keys);
  for (const [name, value] of Object.entries(env)) if (value !== undefined && keys.has(value)) delete env[name];
  return env;
}

/** tide-vllm's own keys (auth.*), and the environment variables they were made of. */
export interface GatewaySecrets {
  keys: readonly string[];
  variables: readonly string[];
}
