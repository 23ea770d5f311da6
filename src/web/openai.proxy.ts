import type { IncomingHttpHeaders, IncomingMessage, RequestListener, ServerResponse } from 'node:http';
import { Logger } from '@nestjs/common';
import type { VllmConfig } from '../config/config.schema';
import { AppError } from '../domain/app-error';
import { promptTooLong } from '../domain/chat.factory';
import { upstreamStatusError } from '../infrastructure/vllm.client';
import type { VLLMServerManager } from '../infrastructure/vllm-server.manager';
import type { RelayRequest, RelaySink, Resumable, VLLMRelay } from '../infrastructure/vllm.relay';
import { logUnhandled, writeError } from './app-error.filter';
import type { ApiKeys } from './auth.hook';
import type { Cors } from './cors';
import { CLIENT_GONE, type ErrorFlavor, chatBodyKind, errorBody, errorType, flavorOf, flavorOfRoute, routePathOf, toHttpError } from './http-error';
import { type HandedOver, isObject, readJson } from './json-body';
import { relayedRequestId, requestIdFor, traceHeaders } from './logging';
import type { Metrics } from './metrics';
import { noteError, outcomeOf } from './request-outcome';
import { ChunkedBody, SSE_HEADERS } from './sse.writer';
import type { RequestScope, TrafficGate } from './traffic.gate';
import { TOO_DEEP } from './validation';

/** POST routes relayed to vLLM as they are; vLLM answers 404 for those the model does not support. */
const RELAYED_POSTS = ['/v1/completions', '/v1/responses', '/v1/embeddings', '/v1/rerank', '/v1/score', '/tokenize', '/detokenize'];
/** SGLang's OpenAI routes that vLLM has not (vLLM's tokenizer is at /tokenize alone; its classify is /classify). */
const SGLANG_POSTS = ['/v1/classify', '/v1/tokenize', '/v1/detokenize'];

/**
 * Routes vLLM's API server answers by itself, without the engine: the model list (SGLang's model
 * card too) and the tokenizer's. They go to a vLLM asleep at level 1 or 2 without waking it, and
 * are no activity for the idle sleep.
 */
const ENGINE_FREE_POSTS: ReadonlySet<string> = new Set(['/tokenize', '/detokenize', '/v1/tokenize', '/v1/detokenize']);

/** False for a request vLLM answers without its engine (ENGINE_FREE_POSTS, the model list). */
export function needsEngine(method: string, path: string): boolean {
  if (method === 'GET') return !(path === MODELS_PATH || path.startsWith(`${MODELS_PATH}/`));
  return !ENGINE_FREE_POSTS.has(path);
}

/** The POST routes relayed to `engine` besides /v1/chat/completions. */
export function relayedPosts(engine: VllmConfig['engine']): readonly string[] {
  return engine === 'sglang' ? [...RELAYED_POSTS, ...SGLANG_POSTS] : RELAYED_POSTS;
}
/**
 * The Responses API: its stream is named events ending in `response.completed`, with no [DONE].
 * Its stored responses (`/v1/responses/{id}`, `…/{id}/cancel`) go by the Fastify routes alone.
 */
export const RESPONSES_PATH = '/v1/responses';
export const CHAT_PATH = '/v1/chat/completions';
export const MODELS_PATH = '/v1/models';

const PROXY_LOG = new Logger('OpenAiProxy');
const DONE = Buffer.from('data: [DONE]\n\n');
/** The error types of vLLM's own error answers, as the one code → type mapping names them. */
const UPSTREAM_ERROR_TYPE = errorType('UPSTREAM_ERROR');
/** vLLM ended a relayed stream with its own error event (relayed as it is): its failure, noted as the simple API notes it. */
const FAILED_IN_STREAM = toHttpError(new AppError('UPSTREAM_ERROR', 'vLLM ended the stream with an error event'));
const UPSTREAM_REJECTED_TYPE = errorType('UPSTREAM_REJECTED');
/**
 * The events that end a Responses stream (OpenAI's terminal events, and its error event), read
 * from an event's first line. vLLM sends `response.completed` whatever the response's status.
 */
const TERMINAL_EVENT = /^event: ?(?:response\.(?:completed|incomplete|failed)|error)\r?\n/;
/** A Responses stream's terminal event that says vLLM failed. */
const FAILED_EVENT = /^event: ?(?:response\.failed|error)\r?\n/;
/**
 * The start of vLLM's in-stream error event on the chat and completions streams (A5): it can
 * appear nowhere else in a stream, as a `"` inside a chunk's JSON strings is escaped.
 */
const ERROR_EVENT = Buffer.from('data: {"error"');
/** The events a Responses stream begins with, before the model generates anything. */
const PREAMBLE_EVENT = /^event: ?response\.(?:created|in_progress)\r?\n/;
/** Bytes of an event's start kept to read its type: the longest terminal `event:` line fits. */
const EVENT_HEAD_BYTES = 32;
/** vLLM's usage object in its field order (A5): prompt_tokens, total_tokens, completion_tokens. */
const USAGE_FIELDS = /^"usage":\{"prompt_tokens":(\d+),"total_tokens":(\d+),"completion_tokens":(\d+)/;
/**
 * The Responses API's usage: input_tokens, input_tokens_details (which may carry per-turn lists of
 * any length), output_tokens, … (OpenAI's ResponseUsage): output_tokens is looked for after it.
 */
const RESPONSES_INPUT_TOKENS = /^"usage":\{"input_tokens":(\d+),/;
const OUTPUT_TOKENS = /^"output_tokens":(\d+)/;
/** The field that holds the prompt, by route: the `param` of a prompt over web.max_prompt_chars (none where several compare). */
const PROMPT_PARAM: Readonly<Record<string, string>> = {
  [CHAT_PATH]: 'messages',
  '/v1/completions': 'prompt',
  [RESPONSES_PATH]: 'input',
  '/v1/embeddings': 'input',
};
/** Bytes of the body read from `"usage":` on (and from `"output_tokens":`); the counts fit well within it. */
const USAGE_WINDOW = 120;
const USAGE_KEY = Buffer.from('"usage":{');
/**
 * Bytes kept from `"usage":{` on when it comes before a plain answer's last two pieces (vLLM puts
 * `prompt_logprobs`, `prompt_token_ids` … after it): the Responses API's usage holds per-turn details.
 */
const USAGE_KEPT = 16384;
/** The most of vLLM's own words an access line carries for a failure it reported. */
const VLLM_MESSAGE_CHARS = 300;

interface OpenAiProxyDeps {
  relay: VLLMRelay;
  manager: VLLMServerManager;
  metrics: Metrics;
  gate: TrafficGate;
  keys: ApiKeys;
  cors: Cors;
  model: string;
  engine: VllmConfig['engine'];
  /** web.max_prompt_chars, applied to messages and prompts of relayed requests too. */
  maxPromptChars: number;
  /** web.body_limit, bytes. */
  bodyLimit: number;
  /** logging.log_bodies: the access line carries the request body. */
  logBodies: boolean;
  /** web.client_timeout, ms: also how long a client may read nothing of its answer. */
  clientTimeoutMs: number;
}

/**
 * The OpenAI-compatible API, relayed to vLLM byte for byte.
 *
 * Its common case runs at the Node http level, before Fastify and Nest see the request
 * (`handle`): a well-formed request, with a valid key or none needed, admitted, while vLLM
 * serves. Nest's global Fastify hooks, routing and reply objects would cost about as much as
 * the relay itself (README, "Performance"). The same metrics, access line, request id,
 * admission and key check run here as in the hooks. Anything else is handed to the Fastify
 * routes (openai.routes.ts) with what was read of it, where every error and the simple API are
 * answered by the code that answers them elsewhere.
 */
export class OpenAiProxy {
  /** The POST routes relayed (and taken at the http level). */
  private readonly posts: ReadonlySet<string>;

  constructor(readonly deps: OpenAiProxyDeps) {
    this.posts = new Set([CHAT_PATH, ...relayedPosts(deps.engine)]);
  }

  /** Takes the request (true) or leaves it untouched for `fallback`, Fastify (false). */
  handle(req: IncomingMessage, res: ServerResponse, fallback: RequestListener): boolean {
    const url = req.url ?? '';
    const method = req.method;
    const post = method === 'POST' && this.posts.has(url);
    if (!post && !(method === 'GET' && url === MODELS_PATH)) return false;
    const { keys, gate, metrics } = this.deps;
    // Refusals (401, 429, 503) and waits for vLLM (asleep, starting) are Fastify's to answer,
    // before a byte of the body is read. (`url` is one of the routes' paths exactly, so it is the routed path.)
    const engine = needsEngine(method, url);
    if (keys.refusal(method, url, req.headers) || gate.refusal() !== null || !this.servesNow(engine)) return false;
    // Admitted: measured and counted in flight until the response closes, whatever follows.
    const requestId = requestIdFor(req);
    metrics.track(req, res, url, requestId);
    this.deps.cors.apply(req, res, url);
    outcomeOf(res).requestId = requestId; // for an answer while its body is read: a 408 (answerClientError)
    const scope = gate.admit(res);
    scope.activity = this.isActivity(engine);
    if (!post) {
      this.start(res, scope, { method: 'GET', path: url, requestId, headers: traceHeaders(req.headers) });
      return true;
    }
    readJson(req, req, this.deps.bodyLimit)
      .then(
        (read) => {
          if (scope.abortReason === CLIENT_GONE) return; // the client left while sending: nobody to answer
          const body = read.value;
          const json = isObject(body) && (url !== CHAT_PATH || chatBodyKind(body) === 'openai') ? this.prepare(body, read.text, url) : null;
          // vLLM may have been put to sleep or restarted while the body came: the routes wait for it. A
          // restart's or a stop's cut (the drain ran out) they answer with its reason, in the body's shape and id.
          if (typeof json !== 'string' || !this.servesNow(engine) || scope.aborted) return handOver(req, res, fallback, { body: read, requestId, scope });
          if (this.deps.logBodies) outcomeOf(res).body = body;
          this.start(res, scope, { method: 'POST', path: url, body: json, requestId: relayedRequestId(req.headers, body, requestId), headers: traceHeaders(req.headers) });
        },
        (error: AppError) => {
          if (scope.abortReason !== CLIENT_GONE) handOver(req, res, fallback, { error, requestId, scope });
        },
      )
      .catch((err: unknown) => {
        logUnhandled(method, url, err, PROXY_LOG);
        writeError(res, AppError.internal(), flavorOf(url, undefined), requestId);
      });
    return true;
  }

  /** The request counts as activity for the idle sleep (`engine`: see needsEngine). */
  isActivity(engine: boolean): boolean {
    return engine || this.deps.manager.engineFreeIsActivity;
  }

  /** vLLM can take the request now, without waiting (asleep, starting) or an error; `engine`: see needsEngine. */
  servesNow(engine: boolean): boolean {
    return engine ? this.deps.manager.servesNow() : this.deps.manager.answersWithoutEngine();
  }

  /**
   * The body vLLM gets, or why the request is refused: the prompt's length checked, the model
   * defaulted (an OpenAI SDK always sends one, curl users often not), SGLang's adapter selected.
   * `text` is the body as sent (`body` parsed from it): it goes to vLLM as it is, with those
   * fields added at its end (a model that was null or "" is named again there: Python's json
   * keeps a key's last value). `route`: the route's path, for the `param` of a refusal.
   */
  prepare(body: Record<string, unknown>, text: string, route: string): string | AppError {
    // promptChars counts characters of the body's strings and keys: never more than the body's
    // text has. So only a body longer than the limit is walked.
    if (text.length > this.deps.maxPromptChars) {
      let chars: number;
      try {
        chars = promptChars(body);
      } catch {
        return TOO_DEEP; // it recurses: absurd nesting overflows its stack
      }
      if (chars > this.deps.maxPromptChars) {
        return promptTooLong(chars, '', this.deps.maxPromptChars, PROMPT_PARAM[route]);
      }
    }
    let added: string;
    // SGLang does not check `model` (Part B): any name would be answered by the base model, an
    // adapter unloaded since included. Refused here as vLLM refuses a model it does not serve.
    if (this.deps.engine === 'sglang' && typeof body.model === 'string' && body.model !== '' && !this.sglangServes(body.model)) {
      return new AppError('NOT_FOUND', `The model \`${body.model}\` does not exist.`, { param: 'model' });
    }
    if (body.model === undefined || body.model === null || body.model === '') added = `"model":${JSON.stringify(this.deps.model)}`;
    // SGLang ignores `model`: an adapter named there must be selected with lora_path.
    else if (this.deps.engine === 'sglang' && body.lora_path === undefined && typeof body.model === 'string' && this.deps.manager.hasAdapter(body.model)) {
      added = `"lora_path":${JSON.stringify(body.model)}`;
    } else return text;
    const close = text.lastIndexOf('}');
    return `${text.slice(0, close)}${hasKeys(body) ? ',' : ''}${added}${text.slice(close)}`;
  }

  /** SGLang serves `model`: the served model, an adapter loaded, or SGLang's `base:adapter` for one. */
  private sglangServes(model: string): boolean {
    const { model: served, manager } = this.deps;
    if (model === served || manager.hasAdapter(model)) return true;
    return model.startsWith(`${served}:`) && manager.hasAdapter(model.slice(served.length + 1));
  }

  /**
   * Sends the request to vLLM and its answer to `res` as it arrives; the response must be the
   * caller's alone (a hijacked reply). The request id (relayedRequestId: the client's X-Request-Id, else the body's request_id, else a fresh one)
   * goes to vLLM, so vLLM's ids match, and is the answer's X-Request-Id.
   */
  start(res: ServerResponse, scope: RequestScope | undefined, request: RelayRequest): void {
    const { method, path, requestId } = request;
    outcomeOf(res).requestId = requestId;
    // Judged by the path as routed (vLLM decodes percent-escapes too): `/v1/respons%65s` is a Responses stream.
    const route = routePathOf(path);
    const named = route.startsWith(RESPONSES_PATH) ? new NamedEvents() : null;
    // Usage is counted for what vLLM generated: a stored response read or cancelled again carries it too.
    const generates = method === 'POST' && this.posts.has(route);
    const answer = new RelayedAnswer(res, scope, requestId, flavorOfRoute(route, undefined), this.deps.clientTimeoutMs, named, generates);
    const abort = this.deps.relay.send(request, answer);
    scope?.onAbort(abort);
  }
}

/** A request that OpenAiProxy admitted and read, then left to the Fastify routes. */
function handOver(req: IncomingMessage, res: ServerResponse, fallback: RequestListener, read: HandedOver): void {
  req.tideHandedOver = read;
  fallback(req, res);
}

/**
 * vLLM's answer, relayed as it arrives. An event stream (told by vLLM's content type: vLLM also
 * streams for `"stream": "true"` or `1`) goes chunk by chunk as vLLM writes it, no parsing, no
 * buffering; if vLLM dies or stalls midway, the client gets vLLM's error event and `[DONE]`, never
 * a stream that merely stops. A Responses stream (`named`) has no [DONE]: it is whole when its
 * last event is a terminal one (`response.completed`…), and otherwise (vLLM dropped, stalled, or
 * ended it early) it ends with an OpenAI `error` event numbered after the events relayed. Only
 * that stream's chunks are scanned for event boundaries; the chat and completions streams keep
 * their [DONE] check. Anything else is passed through with vLLM's status, content type and
 * length, its head held until the first byte of its body (or its end): a failure before then is
 * a normal error answer, as it is before vLLM answered; a body that breaks midway ends the
 * connection, so the client sees a failure, never a short body.
 */
class RelayedAnswer implements RelaySink {
  private started = false;
  private sse = false;
  private ended = false;
  private firstEventSeen = false;
  /** A plain answer's head, held until its body's first byte or its end (then null). */
  private plainHead: Record<string, string> | null = null;
  private plainStatus = 0;
  private readonly body: ChunkedBody;
  /**
   * An event stream's last bytes (at most DONE's length; `tailLength` of them valid,
   * right-aligned), to tell whether it ended with [DONE] and whether events are whole.
   */
  private readonly tail = Buffer.alloc(DONE.length);
  private tailLength = 0;
  /** A plain answer's last pieces (copies), where vLLM puts `usage` (for the metrics). */
  private plainTail: Buffer[] = [];
  /** A plain answer's usage that came before its last two pieces: the bytes from `"usage":{` on (USAGE_KEPT). */
  private usageHead: Buffer | null = null;
  /** vLLM compressed the plain answer: its usage cannot be read from its bytes. */
  private encoded = false;

  constructor(
    private readonly res: ServerResponse,
    private readonly scope: RequestScope | undefined,
    private readonly requestId: string,
    private readonly flavor: ErrorFlavor,
    /** web.client_timeout: a client that takes nothing for this long is cut off. */
    stallMs: number,
    /** A Responses stream (named events, no [DONE]): what has passed of it; null on other routes. */
    private readonly named: NamedEvents | null = null,
    /** The request generated (or embedded, scored…): a plain answer's usage goes to the metrics. */
    private readonly countsUsage = true,
  ) {
    this.body = new ChunkedBody(res, stallMs);
  }

  onStart(status: number, headers: IncomingHttpHeaders): void {
    this.started = true;
    if (status === 401) {
      // vLLM refused tide-vllm's own key (a manual-mode vLLM and vllm.api_key): relayed, the client
      // would take it for a refusal of its key. The rest of vLLM's answer is read and dropped.
      this.ended = true;
      return writeError(this.res, upstreamStatusError(401, null), this.flavor, this.requestId);
    }
    const type = headers['content-type'];
    this.sse = status === 200 && typeof type === 'string' && type.startsWith('text/event-stream');
    if (this.sse) {
      this.res.writeHead(200, { ...SSE_HEADERS, 'x-request-id': this.requestId });
      // The drain ran out: end the stream here (TrafficGate then aborts vLLM's generation).
      if (this.scope) this.scope.cut = (error) => this.fail(error);
      return;
    }
    // X-Request-Id given here rather than with setHeader: a head from writeHead alone is cheaper.
    const out: Record<string, string> = { 'x-request-id': this.requestId };
    if (typeof type === 'string') out['content-type'] = type;
    // A 204 or 304 has no body, and no length either (RFC 9110).
    if (typeof headers['content-length'] === 'string' && status !== 204 && status !== 304) out['content-length'] = headers['content-length'];
    // A body vLLM compressed (its --middleware can) says so, or the client reads it as text; a
    // refusal to retry later (a proxy in front of a hand-run vLLM) says when.
    const encoding = headers['content-encoding'];
    if (typeof encoding === 'string') {
      out['content-encoding'] = encoding;
      this.encoded = encoding.trim().toLowerCase() !== 'identity';
    }
    const retryAfter = headers['retry-after'];
    if (typeof retryAfter === 'string' && (status === 429 || status === 503)) out['retry-after'] = retryAfter;
    this.plainHead = out;
    this.plainStatus = status;
    // Relayed as they are, and counted as the simple API counts them: vLLM failed, or refused the request.
    if (status >= 500) Object.assign(outcomeOf(this.res), { errorType: UPSTREAM_ERROR_TYPE, errorMessage: `vLLM answered HTTP ${status}` });
    else if (status >= 400) outcomeOf(this.res).errorType = UPSTREAM_REJECTED_TYPE;
  }

  onData(chunk: Buffer, request: Resumable): boolean {
    if (this.ended) return true;
    let more: boolean;
    if (this.sse) {
      if (this.named) this.named.feed(chunk);
      // vLLM's own error event ends a stream whole (then [DONE]), but vLLM failed: counted as such.
      // (A Responses stream's is its last event, which `named` reads.)
      else if (chunk.indexOf(ERROR_EVENT) !== -1 || this.errorEventAcross(chunk)) this.noteErrorEvent(chunk);
      // vLLM sends its head before the first token: the first event is the first piece of body
      // (of a Responses stream, the first after response.created and response.in_progress).
      if (!this.firstEventSeen && (this.named === null || this.named.generating)) {
        this.firstEventSeen = true;
        outcomeOf(this.res).firstEventAt = performance.now();
      }
      this.keepTail(chunk);
      more = this.body.write(chunk);
    } else {
      // One copy (the relay reads into the chunk again), kept for the usage and written as it is:
      // Node frames a plain answer (Content-Length, or chunked).
      const piece = Buffer.from(chunk);
      if (this.plainTail.length === 2) this.keepUsageOf(this.plainTail.shift()!);
      this.plainTail.push(piece);
      this.writePlainHead();
      more = this.res.write(piece);
    }
    if (more) return true;
    this.body.whenDrained(() => request.resume());
    return false;
  }

  onEnd(): void {
    if (this.ended) return;
    if (this.sse && !this.wholeStream()) return this.fail(new AppError('UPSTREAM_ERROR', 'vLLM closed the stream before it was complete'));
    if (this.named?.failed()) noteError(this.res, FAILED_IN_STREAM);
    this.ended = true;
    this.writePlainHead();
    this.body.end();
    if (!this.sse && this.countsUsage && !this.encoded && this.res.statusCode === 200) {
      noteUsage(this.res, this.usageHead === null ? this.plainTail : [this.usageHead, ...this.plainTail]);
    }
  }

  /** A piece leaving plainTail: what of `usage` it holds (or continues) is kept, for noteUsage. */
  private keepUsageOf(piece: Buffer): void {
    const at = piece.lastIndexOf(USAGE_KEY);
    if (at !== -1) this.usageHead = piece.subarray(at, at + USAGE_KEPT); // the piece is a copy of its own
    else if (this.usageHead !== null && this.usageHead.length < USAGE_KEPT) {
      this.usageHead = Buffer.concat([this.usageHead, piece.subarray(0, USAGE_KEPT - this.usageHead.length)]);
    }
  }

  /** vLLM ended the stream with its error event: its failure, with its words when the event is in this chunk (for the access line). */
  private noteErrorEvent(chunk: Buffer): void {
    noteError(this.res, FAILED_IN_STREAM);
    const at = chunk.indexOf(ERROR_EVENT);
    const end = at === -1 ? -1 : chunk.indexOf(10, at);
    if (end === -1) return;
    try {
      const message = (JSON.parse(chunk.toString('utf8', at + 6, end)) as { error?: { message?: unknown } }).error?.message;
      if (typeof message === 'string') outcomeOf(this.res).errorMessage = `${FAILED_IN_STREAM.message}: ${message.slice(0, VLLM_MESSAGE_CHARS)}`;
    } catch {
      // not JSON after all: the plain message stands
    }
  }

  onError(error: AppError): void {
    if (this.started) return this.fail(error);
    writeError(this.res, error, this.flavor, this.requestId);
  }

  private writePlainHead(): void {
    if (this.plainHead === null) return;
    this.res.writeHead(this.plainStatus, this.plainHead);
    this.plainHead = null;
  }

  private keepTail(chunk: Buffer): void {
    // Byte by byte: Buffer#copy of part of a buffer makes a Uint8Array view per call.
    const tail = this.tail;
    const size = DONE.length;
    const n = chunk.length;
    if (n >= size) for (let i = 0; i < size; i++) tail[i] = chunk[n - size + i];
    else {
      for (let i = 0; i < size - n; i++) tail[i] = tail[i + n]; // shift the older bytes left
      for (let i = 0; i < n; i++) tail[size - n + i] = chunk[i];
    }
    this.tailLength = Math.min(size, this.tailLength + n);
  }

  /**
   * vLLM's error event began in the last chunk and goes on in `chunk` (a read cut it). Only looked
   * for when the last chunk ended inside an event (not at a line feed): vLLM writes whole events,
   * so that is rare, and the common case costs one comparison.
   */
  private errorEventAcross(chunk: Buffer): boolean {
    const size = DONE.length;
    if (this.tailLength === 0 || this.tail[size - 1] === 10) return false;
    const kept = Math.min(this.tailLength, ERROR_EVENT.length - 1);
    const seam = Buffer.concat([this.tail.subarray(size - kept), chunk.subarray(0, ERROR_EVENT.length - 1)]);
    return seam.indexOf(ERROR_EVENT) !== -1;
  }

  private endedWithDone(): boolean {
    return this.tailLength === DONE.length && this.tail.equals(DONE);
  }

  /** The event stream so far is complete: [DONE] came, or a Responses stream's terminal event. */
  private wholeStream(): boolean {
    return this.named ? this.named.ended() : this.endedWithDone();
  }

  private fail(error: AppError): void {
    if (this.ended) return;
    this.ended = true;
    const res = this.res;
    // Nothing of a plain answer went out yet: the client gets the error instead.
    if (this.plainHead !== null && !res.destroyed) return writeError(res, error, this.flavor, this.requestId);
    if (!this.sse || res.destroyed) {
      noteError(res, toHttpError(error));
      return void res.destroy();
    }
    // The stream was whole ([DONE] came) and only the connection's last bytes were lost: it ends as it was.
    if (this.wholeStream()) return this.body.end();
    noteError(res, toHttpError(error));
    const size = DONE.length;
    const whole = this.tailLength === 0 || (this.tailLength >= 2 && this.tail[size - 2] === 10 && this.tail[size - 1] === 10);
    this.body.end((whole ? '' : '\n\n') + (this.named ? responsesErrorEvent(error, this.named.count) : streamErrorEvent(error) + DONE.toString()));
  }
}

/**
 * A Responses stream's events as they pass: how many have ended (vLLM numbers them from 0, so
 * this is the sequence_number an event of ours takes) and how the last one began. Of each event
 * only its first EVENT_HEAD_BYTES are kept, whichever chunks it comes in.
 */
class NamedEvents {
  count = 0;
  /** An event came that is not one vLLM sends before generating (response.created, response.in_progress). */
  generating = false;
  /** The start of the event being received, and of the last whole one. */
  private head = '';
  private lastHead = '';
  /** The previous chunk ended with a line feed (an event's end may straddle two chunks). */
  private lineFeedLast = false;

  feed(chunk: Buffer): void {
    let from = 0;
    if (this.lineFeedLast && chunk[0] === 10) {
      this.close();
      from = 1;
    }
    let at: number;
    while ((at = chunk.indexOf('\n\n', from)) !== -1) {
      this.grow(chunk, from, at);
      this.close();
      from = at + 2;
    }
    this.grow(chunk, from, chunk.length);
    this.lineFeedLast = chunk.length > 0 && chunk[chunk.length - 1] === 10;
  }

  /** The stream ended at an event's end, and that event was a terminal one. */
  ended(): boolean {
    return this.head === '' && TERMINAL_EVENT.test(this.lastHead);
  }

  /** The last whole event says the response failed (`response.failed`, `error`). */
  failed(): boolean {
    return FAILED_EVENT.test(this.lastHead);
  }

  private grow(chunk: Buffer, from: number, to: number): void {
    const room = EVENT_HEAD_BYTES - this.head.length;
    if (room > 0 && to > from) this.head += chunk.toString('latin1', from, Math.min(to, from + room));
  }

  /** An event ended (a blank line; one after nothing is no event). */
  private close(): void {
    if (this.head === '') return;
    if (!PREAMBLE_EVENT.test(this.head)) this.generating = true;
    this.count += 1;
    this.lastHead = this.head;
    this.head = '';
  }
}

/**
 * vLLM's in-stream error event: json.dumps spacing, as vLLM's own create_streaming_error_response;
 * the body of an error answer otherwise (one builder: the type names the code).
 */
function streamErrorEvent(error: AppError): string {
  const payload = errorBody(toHttpError(error), 'openai', null);
  return `data: ${JSON.stringify(payload).replace(/":/g, '": ').replace(/,"/g, ', "')}\n\n`;
}

/**
 * The Responses API's error event. OpenAI documents it flat (ResponseErrorEvent: `code`, `message`,
 * `param` on the event; `code` here is the error's type), but its live API nests the error under
 * `error`, and only that makes the openai SDKs (node, python) throw rather than yield an event and
 * end as if the stream were whole. Both are sent; `error` is the error answer's body, as elsewhere.
 */
function responsesErrorEvent(error: AppError, sequenceNumber: number): string {
  const { error: body } = errorBody(toHttpError(error), 'openai', null) as { error: { message: string; type: string } };
  const data = { type: 'error', code: body.type, message: body.message, param: null, sequence_number: sequenceNumber, error: body };
  return `event: error\ndata: ${JSON.stringify(data)}\n\n`;
}

/**
 * Token usage of a plain answer, for the metrics, read without parsing the whole body: vLLM puts
 * `"usage":{"prompt_tokens":N,…,"completion_tokens":M…}` near its end (the Responses API:
 * `"usage":{"input_tokens":N,…,"output_tokens":M,…}`).
 */
function noteUsage(res: ServerResponse, tail: Buffer[]): void {
  const body = tail.length === 1 ? tail[0] : Buffer.concat(tail);
  const at = body.lastIndexOf('"usage":{');
  if (at === -1) return;
  const window = body.toString('latin1', at, at + USAGE_WINDOW);
  const usage = USAGE_FIELDS.exec(window);
  if (usage) return void (outcomeOf(res).usage = { prompt_tokens: Number(usage[1]), completion_tokens: Number(usage[3]), total_tokens: Number(usage[2]) });
  const input = RESPONSES_INPUT_TOKENS.exec(window);
  const outputAt = input ? body.indexOf('"output_tokens":', at) : -1;
  const output = outputAt === -1 ? null : OUTPUT_TOKENS.exec(body.toString('latin1', outputAt, outputAt + USAGE_WINDOW));
  if (!input || !output) return;
  const [prompt, completion] = [Number(input[1]), Number(output[1])];
  outcomeOf(res).usage = { prompt_tokens: prompt, completion_tokens: completion, total_tokens: prompt + completion };
}

/**
 * Characters of text in an OpenAI body: messages' contents (strings or text parts, `input_text`
 * ones included), prompts, the Responses API's `input` and `instructions` (embeddings' `input`
 * too), and what /v1/rerank and /v1/score compare (`query`, `queries`, `documents`, `text_1`, `text_2`, SGLang's `items`).
 * The chat template writes tool definitions and the tool calls of earlier turns into the prompt
 * too: `tools` and messages' `tool_calls` count with all their strings and keys. Only characters
 * of strings and keys count, so the total never exceeds the length of the body's JSON text.
 */
function promptChars(body: Record<string, unknown>): number {
  const text = (value: unknown): number => {
    if (typeof value === 'string') return value.length;
    if (Array.isArray(value)) return value.reduce((sum: number, item) => sum + text(item), 0);
    if (isObject(value)) return text(value.content) + text(value.text) + allStrings(value.tool_calls);
    return 0;
  };
  const compared = text(body.query) + text(body.queries) + text(body.documents) + text(body.items) + text(body.text_1) + text(body.text_2);
  return text(body.messages) + text(body.prompt) + text(body.input) + text(body.instructions) + compared + allStrings(body.tools);
}

/** Characters of every string and key in `value` (a tool's name, description, parameter schema…). */
function allStrings(value: unknown): number {
  if (typeof value === 'string') return value.length;
  if (Array.isArray(value)) return value.reduce((sum: number, item) => sum + allStrings(item), 0);
  if (!isObject(value)) return 0;
  let sum = 0;
  for (const key in value) sum += key.length + allStrings(value[key]);
  return sum;
}

function hasKeys(object: Record<string, unknown>): boolean {
  for (const _ in object) return true;
  return false;
}

