/** State shared by the simulator's HTTP handlers (one API server process). */
import type { ServeArgs } from './cli';
import type { EngineClient } from './engine-client';
import type { SimSettings } from './faults';
import type { VllmLogger } from './log';
import type { SimMetrics } from './metrics';
import type { SimTokenizer } from './tokenizer';

/** A loaded LoRA adapter (static from --lora-modules or loaded at runtime). */
export interface LoraAdapter {
  name: string;
  path: string;
  /** The base model the card names as parent, or null for the first served name. */
  baseModelName: string | null;
}

/** A request the engine is running, for the KV-cache usage gauge. */
export interface RunningSequence {
  promptTokens: number;
  emitted: number;
}

export interface SimContext {
  /** The vLLM version the simulator reports (/version, logs, system_fingerprint). */
  version: string;
  args: ServeArgs;
  settings: SimSettings;
  log: VllmLogger;
  engine: EngineClient;
  metrics: SimMetrics;
  tokenizer: SimTokenizer;
  loras: Map<string, LoraAdapter>;
  /** `system_fingerprint` of responses, or null with --fingerprint-mode none. */
  fingerprint: string | null;
  kvCacheTokens: number;
  running: Set<RunningSequence>;
  /** In-flight generation requests, counted only with --enable-server-load-tracking. */
  serverLoad: number;
  /** Generation requests that passed validation (VLLM_SIM_FAIL_NTH_REQUEST counts these). */
  acceptedRequests: number;
  /** Generation requests whose response completed (VLLM_SIM_CRASH_AFTER_REQUESTS). */
  completedRequests: number;
  /**
   * Sleep level 2 discarded the weights (A9): a wake-up gives their memory back, uninitialized,
   * until `collective_rpc` `reload_weights` loads them again. Until then vLLM generates garbage,
   * with a 200; the simulator generates DISCARDED_WEIGHTS_TEXT, so a test sees it.
   */
  weightsDiscarded: boolean;
  /** Ends the whole process abruptly (engine included), for the hard crash faults. */
  crash(reason: string, mode: 'exit' | 'sigkill'): void;
}
