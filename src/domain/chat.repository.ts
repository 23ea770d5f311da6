import type { ChatCompletion, ChatDelta, ChatEntity } from './chat.entity';

/** Injection token for ChatRepository (interfaces do not exist at run time). */
export const CHAT_REPOSITORY = Symbol('ChatRepository');

/**
 * Where chats are answered. `signal` aborts the upstream request when the client goes away,
 * so the engine stops generating and frees its KV cache.
 */
export interface ChatRepository {
  complete(chat: ChatEntity, signal: AbortSignal): Promise<ChatCompletion>;
  stream(chat: ChatEntity, signal: AbortSignal): AsyncIterable<ChatDelta>;
}
