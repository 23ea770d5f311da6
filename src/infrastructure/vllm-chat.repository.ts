import { AppError } from '../domain/app-error';
import type { ChatCompletion, ChatDelta, ChatEntity, TokenUsage } from '../domain/chat.entity';
import type { ChatRepository } from '../domain/chat.repository';
import { SseParser } from './sse';
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
    stream.setEncoding('utf8');
    const parser = new SseParser();
    let finishReason: string | null = null;
    let complete = false;
    // vllm.timeout is the longest silence allowed between two events.
    let idle: NodeJS.Timeout | undefined;
    const arm = () => {
      clearTimeout(idle);
      idle = setTimeout(() => stream.destroy(new StreamIdleError()), this.idleMs);
    };
    try {
      arm();
      for await (const text of stream as AsyncIterable<string>) {
        arm();
        for (const data of parser.push(text)) {
          if (data === '[DONE]') {
            if (finishReason === null) break; // [DONE] without a finish is a truncation
            complete = true;
            return;
          }
          const content = plainContent(data);
          if (content !== null) {
            if (content !== '') yield { content, finishReason: null, usage: null, model: this.model };
            continue;
          }
          const event = parseEvent(data);
          if (event.error !== undefined) {
            const upstream = readVllmError(event.error) ?? readVllmError(event);
            throw new AppError('UPSTREAM_ERROR', `vLLM failed during generation: ${upstream?.type ?? 'unknown error'}`);
          }
          const model = typeof event.model === 'string' ? event.model : this.model;
          const choice = event.choices?.[0];
          if (choice) {
            finishReason = choice.finish_reason ?? finishReason;
            const piece = choice.delta?.content ?? '';
            if (piece !== '' || choice.finish_reason) yield { content: piece, finishReason: choice.finish_reason ?? null, usage: null, model };
          } else if (event.usage) {
            yield { content: '', finishReason, usage: usageOf(event.usage), model };
          }
        }
      }
      throw new AppError('UPSTREAM_ERROR', 'vLLM closed the stream before the answer was complete');
    } catch (err) {
      throw err instanceof AppError ? err : streamFailure(err);
    } finally {
      clearTimeout(idle);
      // After [DONE] the body ends by itself and its keep-alive connection is reused;
      // anything else (an error, the client leaving) closes it.
      if (complete) stream.resume();
      else stream.destroy();
    }
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

/**
 * The text of an ordinary content delta, read without parsing the event: vLLM sends one per
 * token, `…"delta":{"content":"<text>"},"logprobs":null,"finish_reason":null…`. Anything else
 * (role, finish, usage, tool calls, errors, another layout) returns null and is parsed in full.
 */
export function plainContent(data: string): string | null {
  if (!data.includes('"finish_reason":null') || data.includes('"usage":') || data.includes('"error"')) return null;
  const at = data.indexOf(CONTENT_DELTA);
  if (at === -1 || data.indexOf('"delta":', at + CONTENT_DELTA.length) !== -1) return null; // one choice only
  const open = at + CONTENT_DELTA.length - 1;
  let close = open + 1;
  for (;;) {
    close = data.indexOf('"', close);
    if (close === -1) return null;
    let backslashes = 0;
    while (data.charCodeAt(close - 1 - backslashes) === 92) backslashes += 1;
    if (backslashes % 2 === 0) break;
    close += 1;
  }
  if (data.charCodeAt(close + 1) !== 125 /* } */) return null; // the delta has more than content
  const literal = data.slice(open, close + 1);
  return literal.includes('\\') ? (JSON.parse(literal) as string) : literal.slice(1, -1);
}

const CONTENT_DELTA = '"delta":{"content":"';

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

/** The error a stream fails with when vLLM stays silent for longer than vllm.timeout. */
class StreamIdleError extends Error {
  override name = 'StreamIdleError';
}

function streamFailure(err: unknown): AppError {
  const code = (err as NodeJS.ErrnoException)?.code;
  if (err instanceof StreamIdleError || code === 'ECONNABORTED' || code === 'ETIMEDOUT') {
    return new AppError('UPSTREAM_TIMEOUT', 'vLLM sent nothing for longer than vllm.timeout');
  }
  return new AppError('UPSTREAM_ERROR', 'vLLM closed the stream before the answer was complete', { cause: err });
}
