import type { AppError } from './app-error';
import type { ChatCompletion, ChatDelta, ChatEntity } from './chat.entity';

/** Injection token for ChatRepository (interfaces do not exist at run time). */
export const CHAT_REPOSITORY = Symbol('ChatRepository');

/**
 * Receives a streamed answer as it arrives: any number of `write`, then exactly one `end` or
 * `fail`. Pushed rather than pulled (no async iteration): it runs once per token.
 */
export interface ChatSink {
  /** One piece of the answer; false when the receiver cannot take more now (see onDrain). */
  write(delta: ChatDelta): boolean;
  /** Calls `resume` once the receiver can take more again, after a write returned false. */
  onDrain(resume: () => void): void;
  end(): void;
  fail(error: AppError): void;
}

/**
 * Where chats are answered. `signal` aborts the upstream request when the client goes away,
 * so the engine stops generating and frees its KV cache.
 */
export interface ChatRepository {
  complete(chat: ChatEntity, signal: AbortSignal): Promise<ChatCompletion>;
  stream(chat: ChatEntity, signal: AbortSignal, sink: ChatSink): void;
}
