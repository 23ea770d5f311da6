import type { IncomingHttpHeaders } from 'node:http';
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import type { ChatHandler } from '../application/chat.handler';
import { AppError } from '../domain/app-error';
import type { VLLMServerManager } from '../infrastructure/vllm-server.manager';
import type { RelaySink, VLLMRelay } from '../infrastructure/vllm.relay';
import { ChatRequestDto } from './chat.dto';
import { envelope } from './chat.controller';
import { sendError } from './app-error.filter';
import { toHttpError } from './http-error';
import { outcomeOf } from './request-outcome';
import { SSE_HEADERS, sendChatStream } from './sse.writer';
import { requestSignal } from './traffic.gate';
import { TOO_DEEP, requestValidationPipe } from './validation';

/** POST routes relayed to vLLM as they are; vLLM answers 404 for those the model does not support. */
const RELAYED_POSTS = ['/v1/completions', '/v1/embeddings', '/v1/rerank', '/v1/score', '/tokenize', '/detokenize'];

const DONE = Buffer.from('data: [DONE]\n\n');
/** vLLM's usage object in its field order (A5): prompt_tokens, total_tokens, completion_tokens. */
const USAGE_FIELDS = /^"usage":\{"prompt_tokens":(\d+),"total_tokens":(\d+),"completion_tokens":(\d+)/;
/** Bytes of the body read from `"usage":` on; the three counts fit well within it. */
const USAGE_WINDOW = 120;

export interface OpenAiRouteDeps {
  relay: VLLMRelay;
  manager: VLLMServerManager;
  chat: ChatHandler;
  model: string;
  engine: 'vllm' | 'sglang';
  /** web.max_prompt_chars, applied to messages and prompts of relayed requests too. */
  maxPromptChars: number;
}

/**
 * The OpenAI-compatible API, relayed to vLLM byte for byte. These are plain Fastify routes, not
 * Nest controllers: they run once per request at proxy speed, and Nest's pipeline alone would
 * cost more than the whole relay (see README, "Performance").
 */
export function registerOpenAiRoutes(fastify: FastifyInstance, deps: OpenAiRouteDeps): void {
  const validate = requestValidationPipe();

  fastify.post('/v1/chat/completions', async (request, reply) => {
    const body = request.body as Record<string, unknown> | undefined;
    if (!isObject(body)) return sendError(reply, AppError.invalid('request body must be a JSON object'));
    const hasPrompt = 'prompt' in body;
    const hasMessages = 'messages' in body;
    if (hasPrompt && hasMessages) {
      return sendError(reply, AppError.invalid('use either "prompt" (simple API) or "messages" (OpenAI API), not both', 'messages'));
    }
    if (hasPrompt) return simpleChat(request, reply, body);
    if (!hasMessages) {
      return sendError(reply, AppError.invalid('the body needs "messages" (OpenAI chat) or "prompt" (simple API)', 'messages'));
    }
    return relayJson(request, reply, body);
  });

  for (const path of RELAYED_POSTS) {
    fastify.post(path, async (request, reply) => {
      const body = request.body;
      if (!isObject(body)) return sendError(reply, AppError.invalid('request body must be a JSON object'));
      return relayJson(request, reply, body);
    });
  }

  fastify.get('/v1/models', async (request, reply) => relay(request, reply, 'GET', '/v1/models', undefined, false));

  async function simpleChat(request: FastifyRequest, reply: FastifyReply, body: Record<string, unknown>) {
    try {
      const dto = (await validate.transform(body, { type: 'body', metatype: ChatRequestDto })) as ChatRequestDto;
      const input = { ...dto, request_id: dto.request_id ?? request.id };
      if (dto.stream) return await sendChatStream(reply, deps.chat.stream(input, requestSignal(request)));
      return reply.send(envelope(await deps.chat.complete(input, requestSignal(request)), reply));
    } catch (err) {
      return sendError(reply, err);
    }
  }

  function relayJson(request: FastifyRequest, reply: FastifyReply, body: Record<string, unknown>) {
    const chars = promptChars(body);
    if (chars > deps.maxPromptChars) {
      return sendError(reply, AppError.invalid(`the prompt is ${chars} characters long; at most ${deps.maxPromptChars} are accepted (web.max_prompt_chars)`, 'messages'));
    }
    // vLLM requires no model, but an OpenAI SDK always sends one: default it for curl users.
    if (body.model === undefined || body.model === null || body.model === '') body.model = deps.model;
    // SGLang ignores `model`: an adapter named there must be selected with lora_path.
    else if (deps.engine === 'sglang' && body.lora_path === undefined && typeof body.model === 'string' && deps.manager.hasAdapter(body.model)) {
      body.lora_path = body.model;
    }
    let json: string;
    try {
      json = JSON.stringify(body);
    } catch {
      return sendError(reply, TOO_DEEP); // JSON.stringify recurses: absurd nesting overflows its stack
    }
    return relay(request, reply, 'POST', request.url, json, body.stream === true);
  }

  async function relay(request: FastifyRequest, reply: FastifyReply, method: 'GET' | 'POST', path: string, body: string | undefined, stream: boolean) {
    try {
      await deps.manager.ensureServing();
    } catch (err) {
      return sendError(reply, err);
    }
    // Resolves once the answer is in the client's hands (hijacked) or an error was sent.
    return new Promise<FastifyReply | undefined>((settle) => {
      const sink = stream ? new SseSink(request, reply, settle) : new PlainSink(reply, settle);
      const abort = deps.relay.send({ method, path, body, requestId: request.id }, sink);
      request.tideScope?.onAbort(abort);
    });
  }
}

type Settle = (reply?: FastifyReply) => void;

/** Before vLLM answered, a failure is a normal error answer; afterwards the sink must end the response. */
abstract class Sink implements RelaySink {
  protected started = false;

  constructor(
    protected readonly reply: FastifyReply,
    private readonly settle: Settle,
  ) {}

  onStart(status: number, headers: IncomingHttpHeaders): void {
    this.started = true;
    this.reply.hijack();
    this.start(status, headers);
    this.settle();
  }

  onError(error: AppError): void {
    if (this.started) return this.fail(error);
    this.settle(sendError(this.reply, error));
  }

  protected resumeOnDrain(resume: () => void): false {
    this.reply.raw.once('drain', resume);
    return false;
  }

  protected abstract start(status: number, headers: IncomingHttpHeaders): void;
  protected abstract fail(error: AppError): void;
  abstract onData(chunk: Buffer, resume: () => void): boolean;
  abstract onEnd(): void;
}

/**
 * A plain answer, passed through as it arrives (vLLM's status, content type and length). A body
 * that breaks midway ends the connection, so the client sees a failure, never a short body.
 */
class PlainSink extends Sink {
  /** The last pieces of the body, where vLLM puts `usage` (for the metrics). */
  private tail: Buffer[] = [];

  protected start(status: number, headers: IncomingHttpHeaders): void {
    const out: Record<string, string> = {}; // x-request-id is already set for every answer (metrics hook)
    if (typeof headers['content-type'] === 'string') out['content-type'] = headers['content-type'];
    if (typeof headers['content-length'] === 'string') out['content-length'] = headers['content-length'];
    this.reply.raw.writeHead(status, out);
  }

  onData(chunk: Buffer, resume: () => void): boolean {
    if (this.tail.length === 2) this.tail.shift();
    this.tail.push(chunk);
    return this.reply.raw.write(chunk) || this.resumeOnDrain(resume);
  }

  onEnd(): void {
    this.reply.raw.end();
    if (this.reply.raw.statusCode === 200) noteUsage(this.reply, this.tail);
  }

  protected fail(): void {
    this.reply.raw.destroy();
  }
}

/**
 * An SSE stream relayed chunk by chunk as vLLM writes it: no parsing, no buffering. If vLLM dies
 * or stalls midway, the client gets vLLM's error event and `[DONE]`, never a stream that merely stops.
 */
class SseSink extends Sink {
  private sse = false;
  /** The stream's last bytes, to tell whether it ended with [DONE] and whether events are whole. */
  private tail: Buffer = Buffer.alloc(0);
  private ended = false;

  constructor(
    private readonly request: FastifyRequest,
    reply: FastifyReply,
    settle: Settle,
  ) {
    super(reply, settle);
  }

  protected start(status: number, headers: IncomingHttpHeaders): void {
    const type = headers['content-type'];
    this.sse = status === 200 && typeof type === 'string' && type.startsWith('text/event-stream');
    const res = this.reply.raw;
    if (!this.sse) {
      // vLLM refused before streaming (a validation error): its JSON answer, as it is.
      const out: Record<string, string> = {};
      if (typeof type === 'string') out['content-type'] = type;
      res.writeHead(status, out);
      return;
    }
    res.writeHead(200, SSE_HEADERS);
    outcomeOf(res).firstEventAt = performance.now();
    if (this.request.tideScope) this.request.tideScope.cut = (error) => this.fail(error);
  }

  onData(chunk: Buffer, resume: () => void): boolean {
    if (this.ended) return true;
    if (this.sse) {
      this.tail = chunk.length >= DONE.length ? chunk : Buffer.concat([this.tail, chunk]).subarray(-DONE.length);
    }
    return this.reply.raw.write(chunk) || this.resumeOnDrain(resume);
  }

  onEnd(): void {
    if (this.ended) return;
    if (!this.sse || this.tail.subarray(-DONE.length).equals(DONE)) {
      this.ended = true;
      this.reply.raw.end();
      return;
    }
    this.fail(new AppError('UPSTREAM_ERROR', 'vLLM closed the stream before it was complete'));
  }

  protected fail(error: AppError): void {
    if (this.ended) return;
    this.ended = true;
    const res = this.reply.raw;
    if (!this.sse || res.destroyed) return void res.destroy();
    // Mid-stream, a lost connection means vLLM failed; "not reachable" would suggest a retry.
    const shown = error.code === 'VLLM_NOT_READY' ? new AppError('UPSTREAM_ERROR', 'vLLM failed in the middle of the stream') : error;
    outcomeOf(res).errorType = toHttpError(shown).type;
    const whole = this.tail.length === 0 || this.tail.subarray(-2).toString() === '\n\n';
    res.end((whole ? '' : '\n\n') + streamErrorEvent(shown) + DONE.toString());
  }
}

/** vLLM's in-stream error event: json.dumps spacing, as vLLM's own create_streaming_error_response. */
function streamErrorEvent(error: AppError): string {
  const http = toHttpError(error);
  const type = http.status === 504 ? 'TimeoutError' : http.status >= 500 ? 'InternalServerError' : 'BadRequestError';
  const payload = { error: { message: http.message, type, param: null, code: http.status } };
  return `data: ${JSON.stringify(payload).replace(/":/g, '": ').replace(/,"/g, ', "')}\n\n`;
}

/**
 * Token usage of a plain answer, for the metrics, read without parsing the whole body: vLLM puts
 * `"usage":{"prompt_tokens":N,…,"completion_tokens":M…}` near its end.
 */
function noteUsage(reply: FastifyReply, tail: Buffer[]): void {
  const body = tail.length === 1 ? tail[0] : Buffer.concat(tail);
  const at = body.lastIndexOf('"usage":{');
  if (at === -1) return;
  const usage = USAGE_FIELDS.exec(body.toString('latin1', at, at + USAGE_WINDOW));
  if (!usage) return;
  const prompt = Number(usage[1]);
  const completion = Number(usage[3]);
  outcomeOf(reply.raw).usage = { prompt_tokens: prompt, completion_tokens: completion, total_tokens: Number(usage[2]) };
}

/** Characters of text in an OpenAI body: messages' contents (strings or text parts) and prompts. */
export function promptChars(body: Record<string, unknown>): number {
  const text = (value: unknown): number => {
    if (typeof value === 'string') return value.length;
    if (Array.isArray(value)) return value.reduce((sum: number, item) => sum + text(item), 0);
    if (isObject(value)) return text(value.content) + text(value.text);
    return 0;
  };
  return text(body.messages) + text(body.prompt) + text(body.input);
}

function isObject(value: unknown): value is Record<string, unknown> {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}
