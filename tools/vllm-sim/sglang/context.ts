/** State shared by the SGLang mode's handlers (the main process: HTTP server + TokenizerManager). */
import type { EngineClient } from '../engine-client';
import type { SimSettings } from '../faults';
import type { ChatMessage, SimTokenizer } from '../tokenizer';
import type { LoraPath, SglangArgs } from './cli';
import type { SglangLogger } from './log';
import type { SglangMetrics } from './metrics';

/** tokenizer_manager.ServerStatus. */
export type ServerStatus = 'Starting' | 'Up' | 'UnHealthy';

/** A generation request the TokenizerManager tracks (`rid_to_state`). */
export interface InflightRequest {
  rid: string;
  promptTokens: number;
  emitted: number;
  started: boolean;
}

/** A stored /v1/responses answer: the response object and the conversation that led to it. */
export interface StoredResponse {
  response: Record<string, unknown>;
  messages: ChatMessage[];
}

export interface SglContext {
  args: SglangArgs;
  settings: SimSettings;
  log: SglangLogger;
  engine: EngineClient;
  metrics: SglangMetrics;
  tokenizer: SimTokenizer;
  /** Loaded LoRA adapters by name (static --lora-paths and runtime loads). */
  loras: Map<string, LoraPath>;
  status: ServerStatus;
  /** Set by SIGTERM once the handle loop runs: /health answers 503, requests drain. */
  gracefullyExit: boolean;
  /** rid_to_state: generation requests in flight (health checks not included). */
  inflight: Map<string, InflightRequest>;
  /** KV-cache tokens of the simulated pool (max_total_num_tokens). */
  kvTokens: number;
  /** tokenizer_manager.last_receive_tstamp (ms): the last time any output arrived. */
  lastReceive: number;
  /** Generation requests that passed validation (VLLM_SIM_FAIL_NTH_REQUEST counts these). */
  acceptedRequests: number;
  /** Generation requests that completed (VLLM_SIM_CRASH_AFTER_REQUESTS). */
  completedRequests: number;
  /** Tags whose memory is released (release_memory_occupation). */
  releasedTags: Set<string>;
  /**
   * OpenAIServingResponses.response_store and msg_store: responses kept for GET
   * /v1/responses/{id} and `previous_response_id` (request `store`, default true).
   */
  responses: Map<string, StoredResponse>;
  /** Called by every generation request: SGLang creates its handle loop (and SIGTERM handler) lazily. */
  ensureHandleLoop(): void;
}
