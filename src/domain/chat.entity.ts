export type ChatRole = 'system' | 'user' | 'assistant';

export interface ChatMessage {
  readonly role: ChatRole;
  readonly content: string;
}

export interface SamplingParams {
  readonly maxTokens: number;
  /** The client gave no max_tokens: maxTokens is the default, which a long prompt may leave no room for. */
  readonly maxTokensDefaulted?: boolean;
  readonly temperature: number;
  readonly topP: number;
}

export interface TokenUsage {
  readonly prompt_tokens: number;
  readonly completion_tokens: number;
  readonly total_tokens: number;
}

/** What vLLM answered for one chat, in the simple envelope's terms. */
export interface ChatCompletion {
  readonly content: string;
  readonly model: string;
  readonly usage: TokenUsage;
  readonly finishReason: string | null;
}

/** One piece of a streamed answer. The last one carries finishReason (and usage when known). */
export interface ChatDelta {
  readonly content: string;
  readonly finishReason: string | null;
  readonly usage: TokenUsage | null;
  readonly model: string;
}

/**
 * The caller's W3C trace context (checked by the web layer), passed on with the chat so that the
 * model server's spans join the caller's trace.
 */
export interface TraceContext {
  readonly traceparent: string;
  readonly tracestate?: string;
}

/** A conversation to be answered by the model: messages in order plus sampling parameters. */
export class ChatEntity {
  constructor(
    readonly requestId: string,
    readonly messages: readonly ChatMessage[],
    readonly params: SamplingParams,
    readonly trace: TraceContext | null = null,
  ) {}
}
