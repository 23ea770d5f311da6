import { StringDecoder } from 'node:string_decoder';
import { AppError } from '../domain/app-error';
import type { ChatCompletion, ChatDelta, ChatEntity, TokenUsage } from '../domain/chat.entity';
import type { ChatRepository, ChatSink } from '../domain/chat.repository';
import { SseParser } from './sse';
import { abortReason, abortedByVllm, parseJsonOrNull, REJECTED_STATUSES, readVllmError, upstreamStatusError, type VLLMClient } from './vllm.client';
import { type RelaySink, type Resumable, type VLLMRelay, traceLines } from './vllm.relay';
import type { VLLMServerManager } from './vllm-server.manager';

/**
 * How long a refusal's explanation may wait for vLLM's model list: it only names the models in
 * the message, so it is bounded well below any client's patience.
 */
const SERVED_MODELS_TIMEOUT_MS = 2_000;

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
  /** The status of an error event in the flat form (old vLLM, SGLang). */
  code?: unknown;
}

/**
 * Answers chats with vLLM's /v1/chat/completions, once the manager says vLLM can take them:
 * whole answers through VLLMClient (axios), streams through VLLMRelay (per token).
 */
export class VLLMChatRepository implements ChatRepository {
  constructor(
    private readonly client: VLLMClient,
    private readonly relay: VLLMRelay,
    private readonly manager: VLLMServerManager,
    private readonly model: string,
  ) {}

  async complete(chat: ChatEntity, signal: AbortSignal): Promise<ChatCompletion> {
    await this.manager.ensureServing(signal);
    const post = (fit: boolean) =>
      this.client.postJson<VllmChatBody>('/v1/chat/completions', this.body(chat, false, fit), { requestId: chat.requestId, signal, trace: chat.trace });
    const body = await post(false)
      .catch((first: unknown) => {
        if (!chat.params.maxTokensDefaulted || !leftNoRoom(first)) throw first;
        return post(true).catch((second: unknown) => {
          throw refusedAgain(second) ? tooLongAlone(first as AppError, second as AppError) : second;
        });
      })
      .catch(async (err: unknown) => {
        throw modelNotServed(err) ? await this.misconfigured(err) : err;
      });
    const choice = body.choices?.[0];
    const content = choice?.message?.content;
    if (!choice || (typeof content !== 'string' && content !== null)) {
      throw new AppError('UPSTREAM_ERROR', 'vLLM answered a chat completion without a choice');
    }
    if (choice.finish_reason === 'abort') throw abortedByVllm();
    return {
      content: content ?? '',
      model: typeof body.model === 'string' ? body.model : this.model,
      usage: usageOf(body.usage),
      finishReason: choice.finish_reason ?? null,
    };
  }

  /**
   * Streams over the relay's keep-alive connections, parsing each SSE chunk as it arrives and pushing its
   * deltas to the sink. vllm.timeout bounds every silence (the relay's body timeout).
   */
  stream(chat: ChatEntity, signal: AbortSignal, sink: ChatSink): void {
    const failed = (err: unknown) => sink.fail(err instanceof AppError ? err : new AppError('UPSTREAM_ERROR', 'vLLM failed to answer', { cause: err }));
    const send = (fit: boolean, firstRefusal: AppError | null) => {
      if (signal.aborted) return sink.fail(abortReason(signal));
      const reader = new DeltaReader(sink, this.model, this.explainModelRefusal);
      // A refusal comes before any delta: one that left no room is tried again (leftNoRoom).
      if (!fit && chat.params.maxTokensDefaulted) reader.retry = (refusal) => send(true, refusal);
      reader.firstRefusal = firstRefusal;
      const body = JSON.stringify(this.body(chat, true, fit));
      const request = { method: 'POST', path: '/v1/chat/completions', body, requestId: chat.requestId, headers: traceLines(chat.trace) } as const;
      reader.abort = this.relay.send(request, reader);
      signal.addEventListener('abort', () => reader.abort?.(abortReason(signal)), { once: true });
    };
    this.manager
      .ensureServing(signal)
      .then(() => send(false, null), failed)
      .catch(failed); // never an unhandled rejection: that would stop the service
  }

  /**
   * vLLM's 404 to a simple-API chat: it does not serve vllm.model_name, the model every such chat
   * names. The client chose no model, so this is the service's misconfiguration (502, like a wrong
   * vllm.api_key), not a refusal of the client's input; the message names the setting and, when
   * vLLM lists them in time, the models it does serve.
   */
  private async misconfigured(refusal: AppError): Promise<AppError> {
    const served = await this.client.listModels({ timeoutMs: SERVED_MODELS_TIMEOUT_MS }).catch(() => null);
    const instead = served === null ? '' : `, but vLLM serves ${served.map((m) => `"${m}"`).join(', ') || 'no model'}`;
    return new AppError('UPSTREAM_ERROR', `vLLM refused tide-vllm's model (HTTP 404): vllm.model_name is "${this.model}"${instead}`, {
      cause: refusal,
      permanent: true,
    });
  }

  /** misconfigured, for the stream readers (one function for all of them). */
  private readonly explainModelRefusal = (refusal: AppError) => this.misconfigured(refusal);

  /** `fit`: no max_tokens, so vLLM generates what fits in the context (A3: chat's default). */
  private body(chat: ChatEntity, stream: boolean, fit: boolean): Record<string, unknown> {
    return {
      model: this.model,
      messages: chat.messages,
      ...(fit ? {} : { max_tokens: chat.params.maxTokens }),
      temperature: chat.params.temperature,
      top_p: chat.params.topP,
      ...(stream ? { stream: true, stream_options: { include_usage: true } } : {}),
    };
  }
}

/**
 * The retry refused too: the prompt is too long by itself (or, at exactly max_model_len, leaves
 * vLLM a max_tokens of 0).
 */
function refusedAgain(err: unknown): boolean {
  return err instanceof AppError && err.code === 'UPSTREAM_REJECTED';
}

/**
 * What the client hears when its prompt alone fills the context: said in its terms, as it asked
 * for no length (vLLM's first refusal names the default max_tokens tide-vllm sent), then vLLM's
 * own words — the retry's when they are about the prompt's length, else the first's.
 */
function tooLongAlone(first: AppError, second: AppError): AppError {
  const said = leftNoRoom(second) ? second : first;
  return new AppError('UPSTREAM_REJECTED', `the prompt leaves no room for an answer in the model's context (vllm.max_model_len), even without max_tokens. vLLM: ${said.message}`, {
    param: said.param,
    upstreamStatus: said.upstreamStatus,
    cause: second,
  });
}

/**
 * vLLM's 404 to a chat: the only 404 in vLLM's error shape on /v1/chat/completions is its unknown
 * model check (a route it does not serve answers `{"detail": …}`, which is no refusal).
 */
function modelNotServed(err: unknown): err is AppError {
  return err instanceof AppError && err.code === 'UPSTREAM_REJECTED' && err.upstreamStatus === 404;
}

/**
 * vLLM refused the chat because prompt plus max_tokens exceed the context (param input_tokens, or
 * input_text for its character pre-check), or max_tokens alone does (param max_tokens: a vLLM run
 * by hand with a shorter max_model_len than vllm.max_model_len says). When the client left
 * max_tokens to the default, it asked for no particular length: the chat is tried once more
 * without max_tokens, where vLLM generates what fits (fewer tokens than the default); a prompt too
 * long by itself is refused again.
 */
function leftNoRoom(err: unknown): boolean {
  if (!(err instanceof AppError) || err.code !== 'UPSTREAM_REJECTED') return false;
  // SGLang names no param (its errors' is null): its refusal of the prompt and max_tokens together says so.
  return err.param === 'input_tokens' || err.param === 'input_text' || err.param === 'max_tokens' || err.message.includes(SGLANG_NO_ROOM);
}

/** SGLang's refusal of a prompt and max_tokens that do not fit its context together (TokenizerManager._validate_one_request). */
const SGLANG_NO_ROOM = "Requested token count exceeds the model's maximum context length";

/**
 * vLLM's chat stream, chunk by chunk, turned into deltas for a ChatSink: content deltas read
 * without JSON.parse (plainContent), the finish and the usage chunk parsed. A stream is whole
 * only when it ends with a finish_reason and [DONE]; anything else fails the sink, once.
 */
class DeltaReader implements RelaySink {
  /** Ends the request to vLLM (set once it is sent). */
  abort: ((reason: Error) => void) | null = null;
  /** Sends the chat again without max_tokens, for a refusal that says the default left no room. */
  retry: ((refusal: AppError) => void) | null = null;
  /** On the retry: the first try's refusal, the one to show if vLLM refuses again. */
  firstRefusal: AppError | null = null;
  private readonly parser = new SseParser();
  private readonly decoder = new StringDecoder('utf8');
  private finishReason: string | null = null;
  private done = false;
  /** A refusal (non-200): its body, for vLLM's message. */
  private refused: { status: number; body: string } | null = null;

  constructor(
    private readonly sink: ChatSink,
    private readonly model: string,
    /** The error a refusal that is the service's misconfiguration (modelNotServed) becomes. */
    private readonly explain: (refusal: AppError) => Promise<AppError>,
  ) {}

  onStart(status: number): void {
    if (status !== 200) this.refused = { status, body: '' };
  }

  onData(chunk: Buffer, request: Resumable): boolean {
    if (this.done) return true;
    if (this.refused) {
      this.refused.body += this.decoder.write(chunk);
      return true;
    }
    let more = true;
    for (const data of this.parser.push(this.decoder.write(chunk))) {
      const delta = this.deltaOf(data);
      if (this.done) return true;
      if (delta !== null) more = this.sink.write(delta) && more;
    }
    if (more || this.done) return true;
    this.sink.onDrain(() => request.resume());
    return false;
  }

  onEnd(): void {
    if (this.done) return; // the usual end: [DONE] came first (an Error per request costs ~15 µs)
    if (this.refused) {
      const refusal = upstreamStatusError(this.refused.status, parseJsonOrNull(this.refused.body + this.decoder.end()));
      if (this.retry && leftNoRoom(refusal)) return this.retry(refusal);
      if (modelNotServed(refusal)) {
        this.done = true; // vLLM's answer is over; only its explanation is pending
        this.abort?.(refusal);
        return void this.explain(refusal).then((error) => this.sink.fail(error));
      }
      return this.fail(this.firstRefusal && refusedAgain(refusal) ? tooLongAlone(this.firstRefusal, refusal) : refusal);
    }
    this.fail(new AppError('UPSTREAM_ERROR', 'vLLM closed the stream before the answer was complete'));
  }

  onError(error: AppError): void {
    this.fail(error); // a connection lost midway comes as UPSTREAM_ERROR (the relay tells it from "not reachable")
  }

  /** The delta an event carries, or null; ends or fails the stream on [DONE] and on errors. */
  private deltaOf(data: string): ChatDelta | null {
    if (data === '[DONE]') {
      // [DONE] without a finish is a truncation.
      if (this.finishReason === null) this.fail(new AppError('UPSTREAM_ERROR', 'vLLM ended the stream before the answer was complete'));
      else this.finish();
      return null;
    }
    const content = plainContent(data);
    if (content !== null) return content === '' ? null : { content, finishReason: null, usage: null, model: this.model };
    let event: VllmChatBody;
    try {
      event = parseEvent(data);
    } catch (err) {
      this.fail(err as AppError);
      return null;
    }
    if (event.error !== undefined) {
      const upstream = readVllmError(event.error) ?? readVllmError(event);
      // The status vLLM's error event names (A5: mapped as before a stream). A refusal of the input
      // (SGLang's ValueError after its stream began) keeps vLLM's words, a 503 (SGLang's full queue)
      // is one to retry; vLLM's own failure says only its type, as before a stream.
      const status = Number(typeof event.error === 'object' && event.error !== null ? (event.error as { code?: unknown }).code : event.code);
      if (upstream !== null && (REJECTED_STATUSES.has(status) || status === 503)) this.fail(upstreamStatusError(status, event));
      else this.fail(new AppError('UPSTREAM_ERROR', `vLLM failed during generation: ${upstream?.type ?? 'unknown error'}`));
      return null;
    }
    const model = typeof event.model === 'string' ? event.model : this.model;
    const choice = event.choices?.[0];
    if (choice) {
      if (choice.finish_reason === 'abort') {
        this.fail(abortedByVllm());
        return null;
      }
      this.finishReason = choice.finish_reason ?? this.finishReason;
      const piece = choice.delta?.content ?? '';
      return piece !== '' || choice.finish_reason ? { content: piece, finishReason: choice.finish_reason ?? null, usage: null, model } : null;
    }
    return event.usage ? { content: '', finishReason: this.finishReason, usage: usageOf(event.usage), model } : null;
  }

  /** The answer is whole: vLLM ends its body by itself and the connection is reused. */
  private finish(): void {
    this.done = true;
    this.sink.end();
  }

  private fail(error: AppError): void {
    if (this.done) return;
    this.done = true;
    this.abort?.(error); // closes the connection; the relay's onError that follows is ignored
    this.sink.fail(error);
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
