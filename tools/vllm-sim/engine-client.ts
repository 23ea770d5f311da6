/**
 * The API server's side of the engine (vLLM's AsyncLLM + CoreEngineProcManager): starts the
 * EngineCore child, waits for it to report ready, routes its token/finish messages to the
 * requests that asked for them, notices when it dies, and stops it at shutdown.
 */
import { ChildProcess, fork } from 'node:child_process';
import path from 'node:path';
import {
  SHUTTING_DOWN_MESSAGE,
  type AbortError,
  type AddRequest,
  type EngineConfig,
  type EngineMethod,
  type FinishReason,
  type FromEngine,
  type ToEngine,
} from './ipc';

/** How the frontend waits for the engine at shutdown: max(shutdown timeout, this). */
const MIN_ENGINE_STOP_WAIT_S = 5;

/** Callbacks of one generation request. */
export interface RequestListener {
  onStarted(): void;
  onToken(index: number): void;
  /** `error`: SGLang aborts that carry an HTTP status (queue full). */
  onFinished(reason: FinishReason, error?: AbortError): void;
  /** The engine died with the request in flight (EngineDeadError). */
  onEngineDead(): void;
}

/**
 * A utility call that cannot be answered: the engine is dead (vLLM raises EngineDeadError) or
 * shutting down (the engine answers the call with a failure). Each mode's server turns it into
 * its own error body.
 */
export class EngineCallError extends Error {
  constructor(readonly reason: 'dead' | 'shutting_down') {
    super(reason === 'dead' ? 'engine is dead' : SHUTTING_DOWN_MESSAGE);
  }
}

interface PendingCall {
  resolve(result: unknown): void;
  reject(error: EngineCallError): void;
}

/** The engine process ended before it reported ready. */
export class EngineStartError extends Error {
  constructor(readonly exitCode: number | null, readonly signal: NodeJS.Signals | null) {
    super('engine exited during start-up');
  }
}

/** The engine did not report ready within VLLM_ENGINE_READY_TIMEOUT_S; it is left running, as vLLM leaves it. */
export class EngineReadyTimeout extends Error {
  constructor(readonly seconds: number) {
    super('engine did not report ready in time');
  }
}

export class EngineClient {
  private child: ChildProcess | null = null;
  private readonly listeners = new Map<string, RequestListener>();
  private readonly pendingCalls = new Map<number, PendingCall>();
  private nextCallId = 1;
  private stopping = false;
  private exited: Promise<void> = Promise.resolve();
  /** True once the engine died unexpectedly (EngineCore died / errored). */
  dead = false;
  private deathHandlers: Array<() => void> = [];

  constructor(private readonly config: EngineConfig) {}

  get pid(): number | undefined {
    return this.child?.pid;
  }

  /**
   * Starts the EngineCore process; resolves when it reports ready (the model is loaded), rejects
   * with EngineReadyTimeout after `readyTimeoutS` when given (vLLM's VLLM_ENGINE_READY_TIMEOUT_S).
   */
  start(readyTimeoutS?: number): Promise<void> {
    const script = path.join(__dirname, 'engine.js');
    const child = fork(script, [JSON.stringify(this.config)], {
      stdio: ['ignore', 'inherit', 'inherit', 'ipc'],
    });
    this.child = child;
    this.exited = new Promise((resolve) => child.once('exit', () => resolve()));
    return new Promise((resolve, reject) => {
      let ready = false;
      const timer = readyTimeoutS === undefined ? undefined : setTimeout(() => reject(new EngineReadyTimeout(readyTimeoutS)), readyTimeoutS * 1000);
      child.once('exit', () => clearTimeout(timer));
      child.on('message', (message: FromEngine) => {
        if (message.type === 'ready') {
          ready = true;
          clearTimeout(timer);
          resolve();
        } else this.onMessage(message);
      });
      child.on('error', () => undefined);
      child.once('exit', (code, signal) => {
        if (!ready) return reject(new EngineStartError(code, signal));
        this.onExit();
      });
    });
  }

  /** Registers a callback for engine death (not for a requested stop). */
  onDeath(handler: () => void): void {
    this.deathHandlers.push(handler);
  }

  add(request: AddRequest, listener: RequestListener): void {
    if (this.dead) {
      setImmediate(() => listener.onEngineDead());
      return;
    }
    if (this.stopping && !this.child?.connected) {
      // The engine already stopped for shutdown: new work ends as an abort, like a rejected add.
      setImmediate(() => listener.onFinished('abort'));
      return;
    }
    this.listeners.set(request.id, listener);
    this.send(request);
  }

  abort(ids: string[]): void {
    if (ids.length) this.send({ type: 'abort', ids });
  }

  /** Makes the engine fail as if it hit a fatal error (SGLang mode: it then SIGQUITs us). */
  crash(reason: string): void {
    this.send({ type: 'crash', reason });
  }

  /** How the engine process ended (null while it runs). */
  get exitInfo(): { code: number | null; signal: NodeJS.Signals | null } | null {
    const child = this.child;
    if (!child || (child.exitCode === null && child.signalCode === null)) return null;
    return { code: child.exitCode, signal: child.signalCode };
  }

  /**
   * A utility call (sleep, wake_up, collective_rpc ...), answered by the engine. It fails at once
   * with EngineCallError when the engine is dead, stopping or gone, and when the engine dies or
   * stops before answering: nothing waits for an engine that will never answer.
   */
  call(method: EngineMethod, args: Record<string, unknown> = {}): Promise<unknown> {
    const callId = this.nextCallId++;
    return new Promise((resolve, reject) => {
      if (this.dead) return reject(new EngineCallError('dead'));
      if (this.stopping) return reject(new EngineCallError('shutting_down'));
      if (!this.child?.connected) return reject(new EngineCallError('dead'));
      this.pendingCalls.set(callId, { resolve, reject });
      this.send({ type: 'call', callId, method, args });
    });
  }

  private send(message: ToEngine): void {
    const child = this.child;
    if (!child || !child.connected) return;
    child.send(message, (error) => error && undefined);
  }

  private onMessage(message: FromEngine): void {
    switch (message.type) {
      case 'started':
        return this.listeners.get(message.id)?.onStarted();
      case 'token':
        return this.listeners.get(message.id)?.onToken(message.index);
      case 'finished': {
        const listener = this.listeners.get(message.id);
        this.listeners.delete(message.id);
        return listener?.onFinished(message.reason, message.error);
      }
      case 'result': {
        const pending = this.pendingCalls.get(message.callId);
        this.pendingCalls.delete(message.callId);
        if (message.error !== undefined) return pending?.reject(new EngineCallError('shutting_down'));
        return pending?.resolve(message.result);
      }
      case 'ready':
      case 'exiting':
        return;
    }
  }

  private onExit(): void {
    const listeners = [...this.listeners.values()];
    this.listeners.clear();
    const calls = [...this.pendingCalls.values()];
    this.pendingCalls.clear();
    const callError = new EngineCallError(this.stopping ? 'shutting_down' : 'dead');
    for (const call of calls) call.reject(callError);
    if (this.stopping) {
      // A requested stop that left requests behind (engine SIGKILLed): they end as aborts.
      for (const listener of listeners) listener.onFinished('abort');
      return;
    }
    this.dead = true;
    for (const listener of listeners) listener.onEngineDead();
    for (const handler of this.deathHandlers) handler();
  }

  /**
   * Stops the engine like CoreEngineProcManager.shutdown: SIGTERM (the engine aborts or drains
   * on its own), wait max(timeout, 5) s, then SIGKILL.
   */
  async shutdown(timeoutSeconds: number): Promise<void> {
    const child = this.child;
    this.stopping = true;
    if (!child || child.exitCode !== null || child.signalCode !== null) return;
    child.kill('SIGTERM');
    const waitMs = Math.max(timeoutSeconds, MIN_ENGINE_STOP_WAIT_S) * 1000;
    let timer: NodeJS.Timeout | undefined;
    const timedOut = new Promise<boolean>((resolve) => {
      timer = setTimeout(() => resolve(true), waitMs);
    });
    const gaveUp = await Promise.race([this.exited.then(() => false), timedOut]);
    clearTimeout(timer);
    if (gaveUp) {
      child.kill('SIGKILL');
      await this.exited;
    }
  }

  /** SIGKILLs the engine (used when the whole server dies abruptly). */
  kill(): void {
    this.stopping = true;
    this.child?.kill('SIGKILL');
  }
}
