import { AppError } from '../domain/app-error';
import type { ChatCompletion, ChatDelta, ChatEntity, TokenUsage } from '../domain/chat.entity';
import type { ChatRepository } from '../domain/chat.repository';
import { StreamIdleError, sseData } from './sse';
import { readVllmError, type VLLMClient } from './vllm.client';
import type { VLLMServerManager } from './vllm-server.manager';

interface VllmChoice {
  message?: { content?: string | null };
  delta?: { content?: string | null };
  finish_reason?: string | null;
}

interface VllmChatBody {
  model?: string;
  choices?: VllmChoice[];
  usage?: Partial<TokenUsage> | null;
  error?: unknown;
}

/** Answers chats with vLLM's /v1/chat/completions, once the manager says vLLM can take them. */
export class VLLMChatRepository implements ChatRepository {
  constructor(
    private readonly client: VLLMClient,
    private readonly manager: VLLMServerManager,
    private readonly model: string,
    /** vllm.timeout: the longest silence allowed between two stream events. */
    private readonly idleMs: number,
  ) {}

  async complete(chat: ChatEntity, signal: AbortSignal): Promise<ChatCompletion> {
    await this.manager.ensureServing();
    const body = await this.client.postJson<VllmChatBody>('/v1/chat/completions', this.body(chat, false), {
      requestId: chat.requestId,
      signal,
    });
    const choice = body.choices?.[0];
    const content = choice?.message?.content;
    if (!choice || (typeof content !== 'string' && content !== null)) {
      throw new AppError('UPSTREAM_ERROR', 'vLLM answered a chat completion without a choice');
    }
    return {
      content: content ?? '',
      model: typeof body.model === 'string' ? body.model : this.model,
      usage: usageOf(body.usage),
      finishReason: choice.finish_reason ?? null,
    };
  }

  async *stream(chat: ChatEntity, signal: AbortSignal): AsyncGenerator<ChatDelta> {
    await this.manager.ensureServing();
    const stream = await this.client.postStream('/v1/chat/completions', this.body(chat, true), {
      requestId: chat.requestId,
      signal,
    });
    let finishReason: string | null = null;
    let model = this.model;
    try {
      for await (const data of sseData(stream, this.idleMs)) {
        if (data === '[DONE]') {
          if (finishReason === null) break; // [DONE] without a finish is a truncation, reported below
          return;
        }
        const event = parseEvent(data);
        if (event.error !== undefined) {
          const upstream = readVllmError(event.error) ?? readVllmError(event);
          throw new AppError('UPSTREAM_ERROR', `vLLM failed during generation: ${upstream?.type ?? 'unknown error'}`);
        }
        if (typeof event.model === 'string') model = event.model;
        const choice = event.choices?.[0];
        if (choice) {
          finishReason = choice.finish_reason ?? finishReason;
          const content = choice.delta?.content ?? '';
          if (content !== '' || choice.finish_reason) {
            yield { content, finishReason: choice.finish_reason ?? null, usage: null, model };
          }
        } else if (event.usage) {
          yield { content: '', finishReason, usage: usageOf(event.usage), model };
        }
      }
    } catch (err) {
      throw err instanceof AppError ? err : streamFailure(err);
    } finally {
      stream.destroy();
    }
    throw new AppError('UPSTREAM_ERROR', 'vLLM closed the stream before the answer was complete');
  }

  private body(chat: ChatEntity, stream: boolean): Record<string, unknown> {
    return {
      model: this.model,
      messages: chat.messages,
      max_tokens: chat.params.maxTokens,
      temperature: chat.params.temperature,
      top_p: chat.params.topP,
      ...(stream ? { stream: true, stream_options: { include_usage: true } } : {}),
    };
  }
}

function parseEvent(data: string): VllmChatBody {
  try {
    const parsed = JSON.parse(data) as unknown;
    if (parsed !== null && typeof parsed === 'object') return parsed as VllmChatBody;
  } catch {
    // reported below
  }
  throw new AppError('UPSTREAM_ERROR', 'vLLM sent a stream event that is not JSON');
}

function usageOf(usage: Partial<TokenUsage> | null | undefined): TokenUsage {
  const prompt = Number(usage?.prompt_tokens ?? 0);
  const completion = Number(usage?.completion_tokens ?? 0);
  return { prompt_tokens: prompt, completion_tokens: completion, total_tokens: Number(usage?.total_tokens ?? prompt + completion) };
}

function streamFailure(err: unknown): AppError {
  const code = (err as NodeJS.ErrnoException)?.code;
  if (err instanceof StreamIdleError || code === 'ECONNABORTED' || code === 'ETIMEDOUT') {
    return new AppError('UPSTREAM_TIMEOUT', 'vLLM sent nothing for longer than vllm.timeout');
  }
  return new AppError('UPSTREAM_ERROR', 'vLLM closed the stream before the answer was complete', { cause: err });
}
