/**
 * Messages between the API server process and the simulated EngineCore process (a Node IPC
 * channel stands in for vLLM's ZMQ sockets), plus the engine's start-up configuration.
 */

/** vLLM's FinishReason strings (vllm/v1/engine/__init__.py). */
export type FinishReason = 'stop' | 'length' | 'abort' | 'error' | 'repetition';

/** `/sleep?mode=`: abort in-flight requests, wait for them, or freeze them. */
export type SleepMode = 'abort' | 'wait' | 'keep';

/** Value of the `sleep_state` label of vllm:engine_sleep_state. */
export type SleepState = 'awake' | 'weights_offloaded' | 'discard_all';

/** Everything the engine needs, passed as its single argv entry (JSON). */
export interface EngineConfig {
  model: string;
  maxModelLen: number;
  maxNumSeqs: number;
  tensorParallelSize: number;
  pipelineParallelSize: number;
  shutdownTimeoutSeconds: number;
  kvCacheTokens: number;
  loadSeconds: number;
  ttftMs: number;
  itlMs: number;
  crashOnLoad: boolean;
  engineExitAfterMs: number | null;
  /** VLLM_SIM_ENGINE_HANG_AFTER_TOKENS (faults.ts). */
  engineHangAfterTokens: number | null;
  ignoreSigterm: boolean;
  orphanExitSeconds: number;
  /** The tokens/s numbers etc. are not simulated; this only labels log lines. */
  version: string;
  /**
   * `sglang`: the process is SGLang's scheduler (`sglang::scheduler`): SGLang's log format and
   * messages, default SIGTERM disposition, death with its parent (PR_SET_PDEATHSIG), failures
   * reported to the parent with SIGQUIT, a bounded waiting queue and memory release/resume.
   */
  flavor?: 'vllm' | 'sglang';
  /** SGLang: process title (`sglang::scheduler`, `sglang::scheduler_TP0`). */
  processTitle?: string;
  /** SGLang: the log prefix after the timestamp (`' TP0'`). */
  logPrefix?: string;
  /** SGLang: --max-queued-requests; a request arriving at a full queue is aborted with 503. */
  maxQueuedRequests?: number | null;
  /** SGLang: --log-level. */
  logLevel?: string;
}

/** A generation request handed to the engine: how many tokens to emit and why it ends. */
export interface AddRequest {
  type: 'add';
  id: string;
  numTokens: number;
  finishReason: 'stop' | 'length';
  /** VLLM_SIM_CRASH_MID_STREAM: the engine dies after emitting this many tokens. */
  crashAfterTokens?: number;
  /** SGLang: the prompt length, for the scheduler's `Prefill batch.` log line. */
  promptTokens?: number;
}

export type EngineMethod =
  | 'sleep'
  | 'wake_up'
  | 'is_sleeping'
  | 'reset_prefix_cache'
  | 'collective_rpc'
  /** SGLang: release_memory_occupation / resume_memory_occupation with `tags`. */
  | 'release_memory'
  | 'resume_memory';

export type ToEngine =
  | AddRequest
  | { type: 'abort'; ids: string[] }
  /** A simulated fatal engine error (VLLM_SIM_CRASH_AFTER_REQUESTS in SGLang mode). */
  | { type: 'crash'; reason: string }
  | { type: 'call'; callId: number; method: EngineMethod; args: Record<string, unknown> };

export type FromEngine =
  | { type: 'ready' }
  /** The request left the waiting queue and is now running. */
  | { type: 'started'; id: string }
  | { type: 'token'; id: string; index: number }
  | { type: 'finished'; id: string; reason: FinishReason; error?: AbortError }
  /** A utility call's answer; `error` when the engine refused it (shutting down). */
  | { type: 'result'; callId: number; result: unknown; error?: string }
  /** Sent last before a clean shutdown exit, so every earlier message has been delivered. */
  | { type: 'exiting' };

/** What a utility call fails with once the engine is shutting down. */
export const SHUTTING_DOWN_MESSAGE = 'Server shutting down';

/** Result of the engine's sleep/wake calls. */
export interface SleepStatus {
  isSleeping: boolean;
}

/** SGLang: an abort with an HTTP status (e.g. 503 "The request queue is full."). */
export interface AbortError {
  status: number;
  message: string;
}
