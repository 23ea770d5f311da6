import type { ServerResponse } from 'node:http';
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import type { ChatHandler } from '../application/chat.handler';
import { AppError } from '../domain/app-error';
import type { VLLMServerManager } from '../infrastructure/vllm-server.manager';
import type { RelayResponse, VLLMRelay } from '../infrastructure/vllm.relay';
import { ChatRequestDto } from './chat.dto';
import { envelope } from './chat.controller';
import { sendError } from './app-error.filter';
import type { TokenUsage } from '../domain/chat.entity';
import { toHttpError } from './http-error';
import { outcomeOf } from './request-outcome';
import { SSE_HEADERS, sendChatStream } from './sse.writer';
import { requestSignal } from './traffic.gate';
import { TOO_DEEP, requestValidationPipe } from './validation';

/** POST routes relayed to vLLM as they are; vLLM answers 404 for those the model does not support. */
const RELAYED_POSTS = ['/v1/completions', '/v1/embeddings', '/v1/rerank', '/v1/score', '/tokenize', '/detokenize'];

const DONE = Buffer.from('data: [DONE]\n\n');
/** Plain answers up to this size are parsed for their token usage (metrics); larger ones are not. */
const USAGE_PARSE_LIMIT = 256 * 1024;

export interface OpenAiRouteDeps {
  relay: VLLMRelay;
  manager: VLLMServerManager;
  chat: ChatHandler;
  model: string;
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
    let json: string;
    try {
      json = JSON.stringify(body);
    } catch {
      return sendError(reply, TOO_DEEP); // JSON.stringify recurses: absurd nesting overflows its stack
    }
    return relay(request, reply, 'POST', request.url, json, body.stream === true);
  }

  async function relay(request: FastifyRequest, reply: FastifyReply, method: 'GET' | 'POST', path: string, body: string | undefined, stream: boolean) {
    const signal = requestSignal(request);
    let upstream: RelayResponse;
    try {
      await deps.manager.ensureServing();
      upstream = await deps.relay.send({ method, path, body, requestId: request.id, signal });
    } catch (err) {
      return sendError(reply, err);
    }
    const isSse = stream && upstream.status === 200 && (upstream.headers['content-type'] ?? '').startsWith('text/event-stream');
    if (isSse) return pumpSse(request, reply, upstream, deps.relay);
    // Plain answers are small: read them whole, so a failure midway is an honest 502, not a cut body.
    try {
      const chunks: Buffer[] = [];
      for await (const chunk of upstream.body) chunks.push(chunk);
      const body = Buffer.concat(chunks);
      if (upstream.status === 200 && body.length < USAGE_PARSE_LIMIT) noteUsage(reply, body);
      return reply.code(upstream.status).headers(upstream.headers).send(body);
    } catch (err) {
      return sendError(reply, deps.relay.errorOf(err, signal));
    }
  }
}

/**
 * Relays an SSE stream chunk by chunk as vLLM writes it: no parsing, no buffering, backpressure
 * respected. If vLLM dies or stalls midway, the client gets vLLM's error event and `[DONE]`,
 * never a stream that merely stops.
 */
async function pumpSse(request: FastifyRequest, reply: FastifyReply, upstream: RelayResponse, relay: VLLMRelay): Promise<void> {
  reply.hijack();
  const res = reply.raw;
  res.writeHead(200, { ...SSE_HEADERS, ...upstream.headers, 'content-type': SSE_HEADERS['content-type'] });
  const outcome = outcomeOf(res);
  let tail: Buffer = Buffer.alloc(0); // the last bytes written, to see whether [DONE] came and events are whole
  let ended = false;
  const finishWithError = (error: AppError) => {
    if (ended) return;
    ended = true;
    const separator = tail.length === 0 || tail.subarray(-2).toString() === '\n\n' ? '' : '\n\n';
    outcome.errorType = toHttpError(error).type;
    res.end(separator + streamErrorEvent(error) + DONE.toString());
  };
  if (request.tideScope) {
    request.tideScope.cut = (error) => {
      finishWithError(error);
      upstream.body.destroy();
    };
  }
  try {
    for await (const chunk of upstream.body) {
      if (ended || res.destroyed) break;
      outcome.firstEventAt ??= performance.now();
      tail = chunk.length >= DONE.length ? chunk : Buffer.concat([tail, chunk]).subarray(-DONE.length);
      if (!res.write(chunk)) await drained(res);
    }
    if (ended || res.destroyed) return;
    if (tail.subarray(-DONE.length).equals(DONE)) {
      ended = true;
      res.end();
    } else {
      finishWithError(new AppError('UPSTREAM_ERROR', 'vLLM closed the stream before it was complete'));
    }
  } catch (err) {
    if (res.destroyed) return;
    const error = relay.errorOf(err, requestSignal(request));
    // Mid-stream, a lost connection means vLLM failed; "not reachable" would suggest a retry.
    finishWithError(error.code === 'VLLM_NOT_READY' ? new AppError('UPSTREAM_ERROR', 'vLLM failed in the middle of the stream') : error);
  }
}

/** vLLM's in-stream error event: json.dumps spacing, as vLLM's own create_streaming_error_response. */
export function streamErrorEvent(error: AppError): string {
  const http = toHttpError(error);
  const type = http.status === 504 ? 'TimeoutError' : http.status >= 500 ? 'InternalServerError' : 'BadRequestError';
  const payload = { error: { message: http.message, type, param: null, code: http.status } };
  return `data: ${JSON.stringify(payload).replace(/":/g, '": ').replace(/,"/g, ', "')}\n\n`;
}

function drained(res: ServerResponse): Promise<void> {
  return new Promise((resolve) => {
    const done = () => {
      res.off('drain', done);
      res.off('close', done);
      resolve();
    };
    res.once('drain', done);
    res.once('close', done);
  });
}

/** Token usage of a plain answer, for the metrics; the body is vLLM's, so anything may be wrong with it. */
function noteUsage(reply: FastifyReply, body: Buffer): void {
  try {
    const usage = (JSON.parse(body.toString('utf8')) as { usage?: TokenUsage }).usage;
    if (usage && typeof usage.prompt_tokens === 'number') outcomeOf(reply.raw).usage = usage;
  } catch {
    // not JSON: relayed as it is, nothing to count
  }
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
