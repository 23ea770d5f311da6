/**
 * SGLang's generation routes: POST /v1/chat/completions, /v1/completions and the native
 * /generate (and the generation behind /v1/responses, whose shapes are responses.ts'). Validation follows SGLang's order (pydantic → the serving class's
 * `_validate_request` → the TokenizerManager's length checks → SamplingParams.verify); answers
 * and SSE chunks use SGLang's shapes: the response `model` echoes the request's (no check), chat
 * streams send the role chunk with the first token, skip empty deltas and close each choice with a
 * separate finish chunk (`matched_stop`), errors before the first token are plain JSON (the
 * kick-started generator), errors after it are `data: {"error": {...}}` events, then
 * `data: [DONE]`.
 */
import { randomBytes } from 'node:crypto';
import type { IncomingMessage, ServerResponse } from 'node:http';
import type { RequestListener } from '../engine-client';
import {
  BodyErrors,
  FieldKind,
  HttpError,
  coerceFields,
  readJsonBody,
  requireObject,
  sendError,
  sendJson,
} from '../fastapi';
import type { AbortError, FinishReason } from '../ipc';
import { PyRaw, pyFloat, pyRepr } from '../python-format';
import { ChatMessage, EOS_TOKEN_ID, OutputPlan, contentText, planOutput } from '../tokenizer';
import type { InflightRequest, SglContext } from './context';
import {
  NativeError,
  SglChoice,
  SglHead,
  badRequestError,
  chatChunk,
  chatResponse,
  completionChunk,
  completionResponse,
  flatError,
  httpException,
  internalServerError,
  requestValidationError,
  responsesError,
  servingError,
  sglUsage,
  streamErrorEvent,
  unsupportedMediaType,
  usageChunk,
} from './protocol';

export type SglKind = 'chat' | 'completion' | 'generate' | 'responses';

/** protocol.py DEFAULT_MODEL_NAME: the `model` of a request that names none. */
const DEFAULT_MODEL_NAME = 'default';
const COMPLETION_DEFAULT_MAX_TOKENS = 16;
/** SamplingParams' default max_new_tokens for /generate. */
const GENERATE_DEFAULT_MAX_NEW_TOKENS = 128;
const SAMPLING_EPS = 1e-6;
const GENERIC_ROLES = ['system', 'assistant', 'tool', 'function', 'developer', 'latest_reminder'];

const COMMON_FIELDS: Record<string, FieldKind> = {
  model: 'str',
  n: 'int',
  temperature: 'float',
  top_p: 'float',
  top_k: 'int',
  min_p: 'float',
  presence_penalty: 'float',
  frequency_penalty: 'float',
  repetition_penalty: 'float',
  seed: 'int',
  stream: 'bool',
  stream_options: 'object',
  min_tokens: 'int',
  ignore_eos: 'bool',
  rid: 'str',
  lora_path: 'str',
};
const CHAT_FIELDS: Record<string, FieldKind> = {
  messages: 'list',
  max_tokens: 'int',
  max_completion_tokens: 'int',
  ...COMMON_FIELDS,
};
const COMPLETION_FIELDS: Record<string, FieldKind> = { max_tokens: 'int', ...COMMON_FIELDS };

// ---------------------------------------------------------------------------------------------
// Bodies

/** SGLang's body errors; validate_json_request (OpenAI routes only) adds the content-type check. */
const BODY_ERRORS: BodyErrors = { requestValidationError };
const JSON_BODY_ERRORS: BodyErrors = { requestValidationError, unsupportedMediaType };

/**
 * FastAPI's body handling. `jsonOnly` adds SGLang's validate_json_request (OpenAI routes: any
 * other content type is a 400). An empty body is a missing required body.
 */
export function parseSglBody(req: IncomingMessage, raw: Buffer, jsonOnly: boolean): unknown {
  return readJsonBody(req, raw, jsonOnly ? JSON_BODY_ERRORS : BODY_ERRORS);
}

export function requireSglObject(body: unknown): Record<string, unknown> {
  return requireObject(body, BODY_ERRORS);
}

function validateFields(
  body: Record<string, unknown>,
  fields: Record<string, FieldKind>,
  required: string[],
): Record<string, unknown> {
  const { value: out, errors } = coerceFields(body, fields, required);
  if (Array.isArray(out.messages)) {
    (out.messages as unknown[]).forEach((m, i) => {
      const role = (m as Record<string, unknown> | null)?.role;
      if (m === null || typeof m !== 'object' || Array.isArray(m)) {
        errors.push({
          type: 'model_attributes_type',
          loc: ['body', 'messages', i],
          msg: 'Input should be a valid dictionary or object to extract fields from',
          input: m,
        });
      } else if (typeof role !== 'string' || (role.toLowerCase() !== 'user' && !GENERIC_ROLES.includes(role.toLowerCase()))) {
        const allowed = GENERIC_ROLES.map((r) => pyRepr(r)).join(', ');
        errors.push({
          type: 'value_error',
          loc: ['body', 'messages', i, 'ChatCompletionMessageGenericParam', 'role'],
          msg: `Value error, 'role' must be one of ${allowed} (case-insensitive).`,
          input: role ?? null,
        });
      }
    });
  }
  if (errors.length) throw requestValidationError(errors);
  return out;
}

// ---------------------------------------------------------------------------------------------
// Sampling parameters

interface Sampling {
  temperature: number;
  topP: number;
  topK: number;
  minP: number;
  frequencyPenalty: number;
  presencePenalty: number;
  repetitionPenalty: number;
  minNewTokens: number;
  maxNewTokens: number | null;
  n: number;
  ignoreEos: boolean;
}

export function numberOr(value: unknown, fallback: number): number {
  return typeof value === 'number' ? value : fallback;
}

/** SamplingParams.__post_init__ + verify, with its messages; `show` prints values as Python does. */
export function verifySampling(s: Sampling, show: (v: number) => string): void {
  if (!Number.isFinite(s.temperature) || s.temperature < 0) {
    throw new Error(`temperature must be a non-negative finite number, got ${show(s.temperature)}.`);
  }
  if (!(s.topP > 0 && s.topP <= 1)) throw new Error(`top_p must be in (0, 1], got ${show(s.topP)}.`);
  if (!(s.minP >= 0 && s.minP <= 1)) throw new Error(`min_p must be in [0, 1], got ${show(s.minP)}.`);
  const greedy = s.temperature >= 0 && s.temperature < SAMPLING_EPS;
  const topK = greedy ? 1 : s.topK === -1 ? 1 << 30 : s.topK;
  if (topK < 1) throw new Error(`top_k must be -1 (disable) or at least 1, got ${s.topK}.`);
  if (!(s.frequencyPenalty >= -2 && s.frequencyPenalty <= 2)) {
    throw new Error(`frequency_penalty must be in [-2, 2], got ${show(s.frequencyPenalty)}.`);
  }
  if (!(s.presencePenalty >= -2 && s.presencePenalty <= 2)) {
    throw new Error(`presence_penalty must be in [-2, 2], got ${show(s.presencePenalty)}.`);
  }
  if (!(s.repetitionPenalty > 0 && s.repetitionPenalty <= 2)) {
    throw new Error(`repetition_penalty must be in (0, 2] (1.0 = no penalty), got ${show(s.repetitionPenalty)}.`);
  }
  if (s.minNewTokens < 0) throw new Error(`min_new_tokens must be in [0, max_new_tokens], got ${s.minNewTokens}.`);
  if (s.maxNewTokens !== null) {
    if (s.maxNewTokens < 0) throw new Error(`max_new_tokens must be at least 0, got ${s.maxNewTokens}.`);
    if (s.minNewTokens > s.maxNewTokens) {
      throw new Error(`min_new_tokens must be in [0, max_new_tokens(${s.maxNewTokens})], got ${s.minNewTokens}.`);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Preparing a request

interface PromptInput {
  tokens: number;
  sourceText: string;
}

/** A validated generation request. */
export interface SglPrepared {
  kind: SglKind;
  rid: string;
  head: SglHead;
  prompts: PromptInput[];
  maxNewTokens: number;
  n: number;
  stream: boolean;
  includeUsage: boolean;
  continuousUsage: boolean;
  ignoreEos: boolean;
  lora: string | null;
  /** The simulator's own warm-up request: not counted by the VLLM_SIM_* request counters. */
  warmup: boolean;
  sampling: Record<string, unknown>;
  /** kind 'responses': the response's shapes and events (responses.ts). */
  responses?: SglResponsesRenderer;
}

/** What SglJob needs from a /v1/responses request (responses.ts SglResponses). */
export interface SglResponsesRenderer {
  /** The stream's first events (response.created, response.in_progress). */
  opening(): string;
  /** A piece of text: its delta event (and, with the first, the item and part announcements). */
  delta(text: string): string;
  /** The done events and response.completed; stores the response. */
  closing(usage: { prompt: number; completion: number }): string;
  /** response.failed (an error after the stream began). */
  failed(): string;
  /** The non-streamed answer (status and body) for the generated text; stored when it is a response. */
  final(text: string, usage: { prompt: number; completion: number }): { status: number; body: unknown };
}

/** A 32-hex-digit id, as SGLang's uuid4().hex. */
export function randomHex(): string {
  return randomBytes(16).toString('hex');
}

/** `base:adapter` in `model`, or `lora_path`: the adapter must be loaded (and LoRA enabled). */
function resolveLora(ctx: SglContext, model: unknown, loraPath: unknown): string | null {
  let adapter: string | null = typeof loraPath === 'string' && loraPath ? loraPath : null;
  if (!adapter && typeof model === 'string' && model.includes(':')) adapter = model.slice(model.indexOf(':') + 1);
  if (!adapter) return null;
  if (!ctx.args.enableLora) throw new Error('LoRA is not enabled. Please set `--enable-lora` to enable LoRA.');
  if (!ctx.loras.has(adapter)) {
    throw new Error(
      `The following requested LoRA adapters are not loaded: ${adapter}\n` +
        `Loaded adapters: ${pyRepr([...ctx.loras.keys()])}`,
    );
  }
  return adapter;
}

/** TokenizerManager._validate_one_request: the prompt and the total must fit the context. */
export function checkLength(ctx: SglContext, inputTokens: number, maxNew: number | null): void {
  const contextLen = ctx.args.contextLength;
  if (inputTokens >= contextLen) {
    throw new Error(
      `The input (${inputTokens} tokens) is longer than the model's context length (${contextLen} tokens).`,
    );
  }
  if (maxNew !== null && maxNew + inputTokens >= contextLen) {
    throw new Error(
      `Requested token count exceeds the model's maximum context length of ${contextLen} tokens. ` +
        `You requested a total of ${maxNew + inputTokens} tokens: ${inputTokens} tokens from the input ` +
        `messages and ${maxNew} tokens for the completion. Please reduce the number of tokens in the ` +
        `input messages or the completion to fit within the limit.`,
    );
  }
}

/** What the scheduler lets a request generate when it asked for no limit. */
function defaultMaxNew(ctx: SglContext, inputTokens: number): number {
  return Math.max(1, ctx.args.contextLength - inputTokens - 2);
}

function samplingFrom(body: Record<string, unknown>, maxNew: number | null): Sampling {
  return {
    temperature: numberOr(body.temperature, 1.0),
    topP: numberOr(body.top_p, 1.0),
    topK: numberOr(body.top_k, -1),
    minP: numberOr(body.min_p, 0),
    frequencyPenalty: numberOr(body.frequency_penalty, 0),
    presencePenalty: numberOr(body.presence_penalty, 0),
    repetitionPenalty: numberOr(body.repetition_penalty, 1.0),
    minNewTokens: numberOr(body.min_tokens ?? body.min_new_tokens, 0),
    maxNewTokens: maxNew,
    n: numberOr(body.n, 1),
    ignoreEos: body.ignore_eos === true,
  };
}

/** Runs a ValueError-raising check; SGLang answers it with create_error_response (400). */
function asValueError<T>(fn: () => T, toError: (message: string) => HttpError = badRequestError): T {
  try {
    return fn();
  } catch (error) {
    if (error instanceof HttpError) throw error;
    throw toError((error as Error).message);
  }
}

/** POST /v1/chat/completions and /v1/completions. */
export function prepareOpenAi(ctx: SglContext, kind: 'chat' | 'completion', raw: unknown, warmup: boolean): SglPrepared {
  const rawBody = requireSglObject(raw);
  const body =
    kind === 'chat'
      ? validateFields(rawBody, CHAT_FIELDS, ['messages'])
      : validateFields(rawBody, COMPLETION_FIELDS, ['prompt']);
  if (kind === 'completion' && typeof body.max_tokens === 'number' && body.max_tokens <= 0) {
    throw requestValidationError([
      {
        type: 'value_error',
        loc: ['body', 'max_tokens'],
        msg: 'Value error, max_tokens must be positive',
        input: body.max_tokens,
        ctx: { error: new PyRaw("ValueError('max_tokens must be positive')") },
      },
    ]);
  }
  // _validate_request: its messages are create_error_response's default type (BadRequestError)
  let prompts: PromptInput[];
  if (kind === 'chat') {
    const messages = body.messages as Array<Record<string, unknown>>;
    if (messages.length === 0) throw servingError('Messages cannot be empty.');
  } else {
    const prompt = body.prompt;
    if (!prompt || (Array.isArray(prompt) && prompt.every((p) => !p))) throw servingError('Prompt cannot be empty');
  }
  const maxOut = kind === 'chat' ? (body.max_completion_tokens as number | null) || (body.max_tokens as number | null) || null : null;
  if (kind === 'chat' && maxOut && ctx.args.fields.context_length !== null && maxOut > ctx.args.contextLength) {
    throw servingError(
      `max_completion_tokens is too large: ${maxOut}.This model supports at most ${ctx.args.contextLength} completion tokens.`,
    );
  }
  if (kind === 'chat') {
    const messages = (body.messages as Array<Record<string, unknown>>).map(
      (m): ChatMessage => ({ role: String(m.role).toLowerCase(), content: m.content }),
    );
    const lastUser = [...messages].reverse().find((m) => m.role === 'user') ?? messages.at(-1);
    prompts = [{ tokens: ctx.tokenizer.encodeChat(messages, true).length, sourceText: contentText(lastUser?.content) }];
  } else {
    prompts = completionPrompts(ctx, body.prompt);
  }
  const requested = kind === 'chat' ? maxOut : ((body.max_tokens as number | null) ?? COMPLETION_DEFAULT_MAX_TOKENS);
  const lora = asValueError(() => resolveLora(ctx, body.model, body.lora_path));
  for (const p of prompts) asValueError(() => checkLength(ctx, p.tokens, requested));
  const sampling = samplingFrom(body, requested);
  asValueError(() => verifySampling(sampling, pyFloat));
  const streamOptions = (body.stream_options ?? {}) as Record<string, unknown>;
  const stream = body.stream === true;
  const prefix = kind === 'chat' ? 'chatcmpl-' : 'cmpl-';
  const rid = typeof body.rid === 'string' && body.rid ? body.rid : `${prefix}${randomHex()}`;
  const model = typeof body.model === 'string' ? body.model : DEFAULT_MODEL_NAME;
  return {
    kind,
    rid,
    head: { id: rid, created: Math.floor(Date.now() / 1000), model },
    prompts,
    maxNewTokens: requested ?? defaultMaxNew(ctx, prompts[0].tokens),
    n: sampling.n,
    stream,
    includeUsage: stream && streamOptions.include_usage === true,
    continuousUsage: stream && streamOptions.continuous_usage_stats === true,
    ignoreEos: sampling.ignoreEos,
    lora,
    warmup,
    sampling: {
      temperature: sampling.temperature,
      max_new_tokens: requested,
      top_p: sampling.topP,
      n: sampling.n,
      ignore_eos: sampling.ignoreEos,
    },
  };
}

function completionPrompts(ctx: SglContext, prompt: unknown): PromptInput[] {
  const isIds = (p: unknown): p is number[] => Array.isArray(p) && p.length > 0 && p.every((t) => typeof t === 'number');
  const fromText = (text: string): PromptInput => ({ tokens: ctx.tokenizer.encode(text).length, sourceText: text });
  const fromIds = (ids: number[]): PromptInput => ({ tokens: ids.length, sourceText: ctx.tokenizer.decode(ids, true) });
  if (typeof prompt === 'string') return [fromText(prompt)];
  if (isIds(prompt)) return [fromIds(prompt)];
  if (Array.isArray(prompt) && prompt.every((p) => typeof p === 'string')) return (prompt as string[]).map(fromText);
  if (Array.isArray(prompt) && prompt.every(isIds)) return (prompt as number[][]).map(fromIds);
  throw requestValidationError([
    { type: 'string_type', loc: ['body', 'prompt', 'str'], msg: 'Input should be a valid string', input: prompt },
  ]);
}

/** POST /generate (GenerateReqInput): `text` or `input_ids`, `sampling_params`, `stream`, `rid`. */
export function prepareGenerate(ctx: SglContext, raw: unknown, warmup: boolean): SglPrepared {
  const body = requireSglObject(raw);
  const valueError = (message: string): NativeError => new NativeError(400, message);
  let prompts: PromptInput[];
  if (typeof body.text === 'string') prompts = [{ tokens: ctx.tokenizer.encode(body.text).length, sourceText: body.text }];
  else if (Array.isArray(body.text) && body.text.every((t) => typeof t === 'string')) {
    prompts = (body.text as string[]).map((t) => ({ tokens: ctx.tokenizer.encode(t).length, sourceText: t }));
  } else if (Array.isArray(body.input_ids) && body.input_ids.every((t) => typeof t === 'number')) {
    const ids = body.input_ids as number[];
    prompts = [{ tokens: ids.length, sourceText: ctx.tokenizer.decode(ids, true) }];
  } else {
    throw valueError('Either text, input_ids or input_embeds should be provided.');
  }
  const sp = (body.sampling_params ?? {}) as Record<string, unknown>;
  const maxNew = sp.max_new_tokens === null ? null : numberOr(sp.max_new_tokens, GENERATE_DEFAULT_MAX_NEW_TOKENS);
  const lora = asValueError(() => resolveLora(ctx, '', body.lora_path), valueError);
  for (const p of prompts) asValueError(() => checkLength(ctx, p.tokens, maxNew), valueError);
  const sampling = samplingFrom({ ...sp, min_tokens: sp.min_new_tokens }, maxNew);
  asValueError(() => verifySampling(sampling, (v) => pyRepr(v)), valueError);
  const rid = typeof body.rid === 'string' && body.rid ? body.rid : randomHex();
  return {
    kind: 'generate',
    rid,
    head: { id: rid, created: Math.floor(Date.now() / 1000), model: ctx.args.servedModelName },
    prompts,
    maxNewTokens: maxNew ?? defaultMaxNew(ctx, prompts[0].tokens),
    n: sampling.n,
    stream: body.stream === true,
    includeUsage: false,
    continuousUsage: false,
    ignoreEos: sampling.ignoreEos,
    lora,
    warmup,
    sampling: sp,
  };
}

// ---------------------------------------------------------------------------------------------
// Running a request

interface Seq {
  engineId: string;
  promptIndex: number;
  promptTokens: number;
  plan: OutputPlan;
  emitted: number;
  finish: FinishReason | null;
  started: boolean;
  startedAt: number;
  lastTokenAt: number;
  roleSent: boolean;
  /** Completions: the last token's text, sent with finish_reason. */
  held: string | null;
}

let engineSeq = 0;

export class SglJob {
  private readonly seqs: Seq[];
  private readonly arrivedAt = Date.now();
  private readonly state: InflightRequest;
  private ended = false;
  private headSent = false;

  constructor(
    private readonly ctx: SglContext,
    private readonly g: SglPrepared,
    private readonly res: ServerResponse,
  ) {
    this.seqs = g.prompts.map((p, i) => ({
      engineId: `${g.rid}#${(engineSeq += 1)}`,
      promptIndex: i,
      promptTokens: p.tokens,
      plan: planOutput(ctx.tokenizer, p.sourceText, g.maxNewTokens, g.ignoreEos),
      emitted: 0,
      finish: null,
      started: false,
      startedAt: 0,
      lastTokenAt: 0,
      roleSent: false,
      held: null,
    }));
    this.state = { rid: g.rid, promptTokens: this.seqs.reduce((s, q) => s + q.promptTokens, 0), emitted: 0, started: false };
  }

  start(): void {
    const { ctx, g } = this;
    ctx.inflight.set(g.rid, this.state);
    this.res.on('close', () => {
      if (!this.res.writableFinished) this.onClientGone();
    });
    if (ctx.args.logRequests) {
      ctx.log.info(
        `Receive: obj=GenerateReqInput(rid=${pyRepr(g.rid)}, text=${pyRepr(g.prompts[0].sourceText)}, ` +
          `sampling_params=${pyRepr(g.sampling)}, stream=${g.stream ? 'True' : 'False'}, ` +
          `lora_path=${pyRepr(g.lora)})`,
      );
    }
    if (g.responses && g.stream) {
      // The Responses stream opens before the first token: created and in_progress.
      this.head();
      this.write(g.responses.opening());
    }
    const { crashMidStream } = ctx.settings;
    for (const seq of this.seqs) {
      ctx.engine.add(
        {
          type: 'add',
          id: seq.engineId,
          numTokens: seq.plan.texts.length,
          finishReason: seq.plan.finishReason,
          promptTokens: seq.promptTokens,
          crashAfterTokens: g.stream && crashMidStream !== null ? crashMidStream : undefined,
        },
        this.listener(seq),
      );
    }
  }

  private listener(seq: Seq): RequestListener {
    return {
      onStarted: () => {
        seq.started = true;
        seq.startedAt = seq.lastTokenAt = Date.now();
        this.state.started = true;
        this.ctx.metrics.recordQueueTime((seq.startedAt - this.arrivedAt) / 1000);
      },
      onToken: (index) => this.onToken(seq, index),
      onFinished: (reason, error) => this.onFinished(seq, reason, error),
      // The scheduler died: SGLang's TokenizerManager never hears of the request again.
      onEngineDead: () => undefined,
    };
  }

  private onToken(seq: Seq, index: number): void {
    const now = Date.now();
    const { ctx, g } = this;
    ctx.lastReceive = now;
    if (index === 0) ctx.metrics.recordFirstToken((now - this.arrivedAt) / 1000);
    else ctx.metrics.recordInterToken((now - seq.lastTokenAt) / 1000);
    seq.lastTokenAt = now;
    seq.emitted = index + 1;
    this.state.emitted = this.seqs.reduce((s, q) => s + q.emitted, 0);
    if (!g.stream || this.ended) return;
    const text = seq.plan.texts[index];
    const last = index === seq.plan.texts.length - 1;
    if (g.responses) {
      this.write(g.responses.delta(text ?? ''));
    } else if (g.kind === 'chat') {
      this.sendRole(seq);
      if (text) this.eachChoice(seq, (i) => chatChunk(g.head, i, { content: text }, null, null, this.continuous(seq)));
    } else if (g.kind === 'completion') {
      // The last token's output carries finish_reason, so its text goes out with the finish.
      if (last) seq.held = text;
      else this.eachChoice(seq, (i) => completionChunk(g.head, i, text, null, null, this.continuous(seq)));
    } else {
      this.head();
      this.writeData(this.generateOutput(seq, null));
    }
  }

  private onFinished(seq: Seq, reason: FinishReason, error?: AbortError): void {
    const { ctx, g } = this;
    ctx.lastReceive = Date.now();
    if (this.ended) return;
    if (reason === 'abort') {
      this.ended = true;
      ctx.inflight.delete(g.rid);
      ctx.metrics.recordAborted();
      for (const other of this.seqs) if (other !== seq && other.finish === null) ctx.engine.abort([other.engineId]);
      const status = error?.status ?? 500;
      const message = error?.message ?? 'Generation aborted.';
      if (g.responses) {
        // The HTTPException escapes the generator: a response.failed event, or create_responses'
        // `except Exception` (400, `str(e)` is "status: detail").
        if (g.stream) {
          this.write(g.responses.failed());
          this.res.end();
        } else sendError(this.res, responsesError(`${status}: ${message}`));
      } else if (g.stream) {
        // A status-carrying abort becomes an error event; the kick-started 200 is already out.
        this.head();
        const code = status === 503 ? 'SERVICE_UNAVAILABLE' : status === 400 ? 'BAD_REQUEST' : 'INTERNAL_SERVER_ERROR';
        this.write(streamErrorEvent(flatError(message, code, status)));
        this.write('data: [DONE]\n\n');
        this.res.end();
      } else if (g.kind === 'generate') {
        sendError(this.res, new NativeError(status, message));
      } else {
        sendError(this.res, httpException(status, message));
      }
      return;
    }
    seq.finish = reason;
    if (g.stream && g.kind === 'completion') {
      this.head();
      const text = seq.held ?? '';
      seq.held = null;
      this.eachChoice(seq, (i) =>
        completionChunk(g.head, i, text, reason, this.matchedStop(seq), this.continuous(seq)),
      );
    } else if (g.stream && g.kind === 'generate') {
      this.head();
      this.writeData(this.generateOutput(seq, reason));
    } else if (g.stream && g.kind === 'chat') {
      this.sendRole(seq);
    }
    if (this.seqs.every((s) => s.finish !== null)) this.complete();
  }

  private matchedStop(seq: Seq): number | null {
    return seq.finish === 'stop' ? EOS_TOKEN_ID : null;
  }

  private usage(): ReturnType<typeof sglUsage> {
    const prompt = this.seqs.reduce((s, q) => s + q.promptTokens, 0);
    const completion = this.seqs.reduce((s, q) => s + q.emitted * this.g.n, 0);
    return sglUsage(prompt, completion);
  }

  private continuous(seq: Seq): ReturnType<typeof sglUsage> | null {
    return this.g.continuousUsage ? sglUsage(seq.promptTokens, seq.emitted) : null;
  }

  private complete(): void {
    const { ctx, g } = this;
    this.ended = true;
    ctx.inflight.delete(g.rid);
    const usage = this.usage();
    ctx.metrics.recordFinished(usage.prompt_tokens, usage.completion_tokens, (Date.now() - this.arrivedAt) / 1000);
    if (ctx.args.logRequests) {
      ctx.log.info(
        `Finish: obj=GenerateReqInput(rid=${pyRepr(g.rid)}), out={'text': ` +
          `${pyRepr(this.seqs[0].plan.texts.slice(0, this.seqs[0].emitted).join(''))}, 'meta_info': ` +
          `{'id': ${pyRepr(g.rid)}, 'finish_reason': ${pyRepr(this.finishInfo(this.seqs[0]))}, ` +
          `'prompt_tokens': ${usage.prompt_tokens}, 'completion_tokens': ${usage.completion_tokens}}}`,
      );
    }
    if (g.responses) {
      const counts = { prompt: usage.prompt_tokens, completion: usage.completion_tokens };
      if (g.stream) {
        this.write(g.responses.closing(counts));
        this.res.end(() => this.onResponseDone());
      } else {
        const seq = this.seqs[0];
        const { status, body } = g.responses.final(seq.plan.texts.slice(0, seq.emitted).join(''), counts);
        sendJson(this.res, status, body, () => this.onResponseDone());
      }
      return;
    }
    if (g.stream) {
      if (g.kind === 'chat') {
        for (const seq of this.seqs) {
          this.eachChoice(seq, (i) => chatChunk(g.head, i, {}, seq.finish, this.matchedStop(seq)));
        }
      }
      if (g.includeUsage) {
        this.writeData(usageChunk(g.head, g.kind === 'chat' ? 'chat.completion.chunk' : 'text_completion', usage));
      }
      this.write('data: [DONE]\n\n');
      this.res.end(() => this.onResponseDone());
      return;
    }
    const choices: SglChoice[] = [];
    for (const seq of this.seqs) {
      const text = seq.plan.texts.slice(0, seq.emitted).join('');
      for (let j = 0; j < g.n; j += 1) {
        choices.push({ index: seq.promptIndex * g.n + j, text, finishReason: seq.finish, matchedStop: this.matchedStop(seq) });
      }
    }
    const weightVersion = ctx.args.weightVersion;
    let body: unknown;
    if (g.kind === 'chat') body = chatResponse(g.head, choices, usage, weightVersion);
    else if (g.kind === 'completion') body = completionResponse(g.head, choices, usage, weightVersion);
    else {
      const outputs = this.seqs.map((seq) => this.generateOutput(seq, seq.finish));
      body = outputs.length === 1 ? outputs[0] : outputs;
    }
    sendJson(this.res, 200, body, () => this.onResponseDone());
  }

  private finishInfo(seq: Seq): Record<string, unknown> | null {
    if (seq.finish === 'stop') return { type: 'stop', matched: EOS_TOKEN_ID };
    if (seq.finish === 'length') return { type: 'length', length: seq.emitted };
    return null;
  }

  /** One /generate output: the text so far (cumulative, also when streaming) and meta_info. */
  private generateOutput(seq: Seq, finish: FinishReason | null): Record<string, unknown> {
    return {
      text: seq.plan.texts.slice(0, seq.emitted).join(''),
      output_ids: seq.plan.tokenIds.slice(0, seq.emitted),
      meta_info: {
        id: this.g.rid,
        finish_reason: finish ? this.finishInfo(seq) : null,
        prompt_tokens: seq.promptTokens,
        weight_version: this.ctx.args.weightVersion,
        total_retractions: 0,
        completion_tokens: seq.emitted,
        cached_tokens: 0,
        e2e_latency: (Date.now() - this.arrivedAt) / 1000,
      },
    };
  }

  private onResponseDone(): void {
    const { ctx, g } = this;
    if (g.warmup) return;
    ctx.completedRequests += 1;
    const limit = ctx.settings.crashAfterRequests;
    if (limit !== null && ctx.completedRequests >= limit) {
      ctx.engine.crash(`simulated scheduler failure (VLLM_SIM_CRASH_AFTER_REQUESTS=${limit})`);
    }
  }

  /** The client went away: the request is aborted in the scheduler. */
  private onClientGone(): void {
    if (this.ended) return;
    this.ended = true;
    const { ctx, g } = this;
    ctx.inflight.delete(g.rid);
    ctx.metrics.recordAborted();
    ctx.engine.abort(this.seqs.filter((s) => s.finish === null).map((s) => s.engineId));
    if (ctx.args.logRequests) ctx.log.info(`Abort request ${g.rid}`);
  }

  private sendRole(seq: Seq): void {
    if (seq.roleSent) return;
    seq.roleSent = true;
    this.eachChoice(seq, (i) => chatChunk(this.g.head, i, { role: 'assistant', content: '' }));
  }

  private eachChoice(seq: Seq, build: (index: number) => Record<string, unknown>): void {
    this.head();
    for (let j = 0; j < this.g.n; j += 1) this.writeData(build(seq.promptIndex * this.g.n + j));
  }

  /** StreamingResponse sends its headers with the first chunk. */
  private head(): void {
    if (this.headSent) return;
    this.headSent = true;
    // /v1/responses' StreamingResponse adds Cache-Control and Connection headers.
    const extra = this.g.responses ? { 'cache-control': 'no-cache', connection: 'keep-alive' } : {};
    this.res.writeHead(200, { 'content-type': 'text/event-stream; charset=utf-8', ...extra });
  }

  private writeData(chunk: unknown): void {
    this.write(`data: ${JSON.stringify(chunk)}\n\n`);
  }

  private write(text: string): void {
    if (!this.res.writableEnded && !this.res.destroyed) this.res.write(text);
  }
}

/** Runs a validated request; VLLM_SIM_FAIL_NTH_REQUEST answers the Nth with a 500. */
export function runSglGeneration(ctx: SglContext, g: SglPrepared, res: ServerResponse): void {
  ctx.ensureHandleLoop();
  if (!g.warmup) {
    ctx.acceptedRequests += 1;
    if (ctx.acceptedRequests === ctx.settings.failNthRequest) {
      const detail = 'simulated failure (VLLM_SIM_FAIL_NTH_REQUEST)';
      if (g.kind === 'generate') {
        res.writeHead(500, { 'content-type': 'text/plain; charset=utf-8', 'content-length': 21 });
        res.end('Internal Server Error');
      } else if (g.responses) {
        sendError(res, responsesError(`Internal server error: ${detail}`, 500, 'InternalServerError'));
      } else {
        sendError(res, internalServerError(detail));
      }
      return;
    }
  }
  new SglJob(ctx, g, res).start();
}
