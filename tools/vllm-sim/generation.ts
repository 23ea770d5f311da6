/**
 * POST /v1/chat/completions and /v1/completions: request validation in vLLM's order and with its
 * messages (pydantic errors, model check, token-length checks, SamplingParams checks), then the
 * generation itself — non-streaming or SSE with vLLM's exact chunk sequence — including client
 * disconnects (abort), engine death and the simulator's mid-request faults.
 */
import { randomBytes } from 'node:crypto';
import type { IncomingMessage, ServerResponse } from 'node:http';
import type { LoraAdapter, RunningSequence, SimContext } from './context';
import type { RequestListener } from './engine-client';
import {
  BodyErrors,
  FieldKind,
  coerceFields,
  readJsonBody,
  requireObject as requireJsonObject,
  sendError,
  sendJson,
} from './fastapi';
import type { FinishReason } from './ipc';
import {
  ChoiceResult,
  ResponseHead,
  Usage,
  badRequest,
  chatCompletion,
  chatDeltaChunk,
  chatRoleChunk,
  completionChunk,
  engineDeadError,
  internalServerError,
  modelNotFound,
  modelValidatorError,
  requestValidationError,
  textCompletion,
  unsupportedMediaType,
  usage,
  usageChunk,
  validationError,
} from './protocol';
import { pyFloat, pyJsonDumps } from './python-format';
import { ResponsesShape, readResponsesInput, responseId } from './responses';
import { ChatMessage, MAX_CHARS_PER_TOKEN, OutputPlan, contentText, planOutput } from './tokenizer';

export type GenerationKind = 'chat' | 'completion' | 'responses';

/** What the simulator generates from weights a level-2 sleep discarded and nothing reloaded (real vLLM: garbage). */
export const DISCARDED_WEIGHTS_TEXT = '?? garbage: weights discarded by sleep level 2 and never reloaded ??';

/** Completions' default max_tokens (completion/protocol.py). */
const COMPLETION_DEFAULT_MAX_TOKENS = 16;
/** Below this temperature sampling is greedy (vllm/sampling_params.py _SAMPLING_EPS). */
const SAMPLING_EPS = 1e-5;
/** VLLM_MAX_N_SEQUENCES's default (vllm/envs.py). */
const DEFAULT_MAX_N_SEQUENCES = 16384;

// ---------------------------------------------------------------------------------------------
// Request validation

const COMMON_FIELDS: Record<string, FieldKind> = {
  model: 'str',
  n: 'int',
  presence_penalty: 'float',
  frequency_penalty: 'float',
  repetition_penalty: 'float',
  temperature: 'float',
  top_p: 'float',
  top_k: 'int',
  min_p: 'float',
  seed: 'int',
  stream: 'bool',
  stream_options: 'object',
  max_tokens: 'int',
  min_tokens: 'int',
  ignore_eos: 'bool',
  request_id: 'str',
};
const CHAT_FIELDS: Record<string, FieldKind> = {
  messages: 'list',
  max_completion_tokens: 'int',
  add_generation_prompt: 'bool',
  ...COMMON_FIELDS,
};

/** ResponsesRequest's fields used here (`input` is a string or a list of items). */
const RESPONSES_FIELDS: Record<string, FieldKind> = {
  model: 'str',
  instructions: 'str',
  max_output_tokens: 'int',
  temperature: 'float',
  top_p: 'float',
  stream: 'bool',
  request_id: 'str',
};

/** vLLM's body errors: its validation handler's message, and validate_json_request's. */
const BODY_ERRORS: BodyErrors = { requestValidationError, unsupportedMediaType };

/** Validates declared fields (null means "unset"); returns the coerced body or throws 400. */
function validateFields(
  body: Record<string, unknown>,
  fields: Record<string, FieldKind>,
  required: string[],
): Record<string, unknown> {
  const { value, errors } = coerceFields(body, fields, required);
  if (errors.length) throw requestValidationError(errors);
  return value;
}

/** Reads the JSON body the way FastAPI does (content-type check, then json.loads). */
export function parseJsonBody(req: IncomingMessage, raw: Buffer): unknown {
  return readJsonBody(req, raw, BODY_ERRORS);
}

/** The body must be a JSON object for the request model. */
export function requireObject(body: unknown): Record<string, unknown> {
  return requireJsonObject(body, BODY_ERRORS);
}

/** The served model a request names: a base name (or none) or a loaded LoRA adapter. */
export function resolveModel(
  ctx: SimContext,
  requested: unknown,
): { responseName: string; lora: LoraAdapter | null } {
  const name = typeof requested === 'string' ? requested : '';
  if (!name || ctx.args.servedModelNames.includes(name)) {
    return { responseName: ctx.args.servedModelNames[0], lora: null };
  }
  const lora = ctx.loras.get(name);
  if (lora) return { responseName: lora.name, lora };
  if (process.env.VLLM_SKIP_MODEL_NAME_VALIDATION === '1') {
    return { responseName: ctx.args.servedModelNames[0], lora: null };
  }
  throw modelNotFound(name);
}

function num(value: unknown, fallback: number): number {
  return typeof value === 'number' ? value : fallback;
}

/** envs.VLLM_MAX_N_SEQUENCES: the largest `n` a request may ask for. */
function maxNSequences(): number {
  const value = Number(process.env.VLLM_MAX_N_SEQUENCES ?? DEFAULT_MAX_N_SEQUENCES);
  return Number.isInteger(value) ? value : DEFAULT_MAX_N_SEQUENCES;
}

/** SamplingParams._verify_args and _verify_greedy_sampling, in their order. */
function verifySamplingParams(body: Record<string, unknown>, maxTokens: number | null): void {
  const n = num(body.n, 1);
  // _verify_num_sequences: both bounds without a parameter (param null, no suffix).
  if (n < 1) throw badRequest(`n must be at least 1, got ${n}.`);
  const maxN = maxNSequences();
  if (n > maxN) {
    throw badRequest(
      `n must be at most ${maxN}, got ${n}. To increase this limit, set the VLLM_MAX_N_SEQUENCES ` +
        'environment variable.',
    );
  }
  const presence = num(body.presence_penalty, 0);
  if (!(presence >= -2 && presence <= 2)) {
    throw badRequest(`presence_penalty must be in [-2, 2], got ${pyFloat(presence)}.`);
  }
  const frequency = num(body.frequency_penalty, 0);
  if (!(frequency >= -2 && frequency <= 2)) {
    throw badRequest(`frequency_penalty must be in [-2, 2], got ${pyFloat(frequency)}.`);
  }
  const temperature = num(body.temperature, 1.0);
  const t = pyFloat(temperature);
  if (!Number.isFinite(temperature)) {
    throw validationError(`temperature must be a finite number, got ${t}.`, 'temperature', t);
  }
  if (temperature < 0) {
    throw validationError(`temperature must be non-negative, got ${t}.`, 'temperature', t);
  }
  if (temperature > 2) {
    throw validationError(`temperature must be in [0, 2], got ${t}.`, 'temperature', t);
  }
  const topP = num(body.top_p, 1.0);
  if (!(topP > 0 && topP <= 1)) {
    const p = pyFloat(topP);
    throw validationError(`top_p must be in (0, 1], got ${p}.`, 'top_p', p);
  }
  const topK = num(body.top_k, 0);
  if (topK < -1) {
    throw badRequest(`top_k must be 0 (disable), or at least 1, got ${topK}.`);
  }
  const minP = num(body.min_p, 0);
  if (!(minP >= 0 && minP <= 1)) {
    throw badRequest(`min_p must be in [0, 1], got ${pyFloat(minP)}.`);
  }
  if (maxTokens !== null && maxTokens < 1) {
    const message = `max_tokens must be at least 1, got ${maxTokens}.`;
    throw validationError(message, 'max_tokens', maxTokens);
  }
  const minTokens = num(body.min_tokens, 0);
  if (minTokens < 0) {
    throw badRequest(`min_tokens must be greater than or equal to 0, got ${minTokens}.`);
  }
  if (maxTokens !== null && minTokens > maxTokens) {
    throw badRequest(
      `min_tokens must be less than or equal to max_tokens=${maxTokens}, got ${minTokens}.`,
    );
  }
  if (temperature < SAMPLING_EPS && n > 1) {
    throw badRequest(`n must be 1 when using greedy sampling, got ${n}.`);
  }
}

/** One prompt of a request: its token count and the text the simulated model answers. */
interface PromptInput {
  tokenIds: number[];
  sourceText: string;
}

/** One prompt as rendered, before tokenization. */
interface RenderedPrompt {
  /** The text the tokenizer gets (chat: the template applied); null for a prompt of token ids. */
  text: string | null;
  sourceText: string;
  tokenize(): number[];
}

/** A validated generation request, ready to run. */
export interface PreparedGeneration {
  kind: GenerationKind;
  requestId: string;
  head: ResponseHead;
  /** /v1/responses: its wire shapes (null for chat and completions). */
  responses: ResponsesShape | null;
  lora: LoraAdapter | null;
  prompts: PromptInput[];
  maxTokens: number;
  n: number;
  stream: boolean;
  includeUsage: boolean;
  continuousUsage: boolean;
  ignoreEos: boolean;
  temperature: number;
}

function randomUuid(): string {
  return randomBytes(8).toString('hex');
}

function chatPrompt(ctx: SimContext, body: Record<string, unknown>): RenderedPrompt {
  const messages = (body.messages as unknown[]).map((m): ChatMessage => {
    const message = (m ?? {}) as Record<string, unknown>;
    return { role: String(message.role ?? 'user'), content: message.content };
  });
  const addGenerationPrompt = body.add_generation_prompt !== false;
  const lastUser = [...messages].reverse().find((m) => m.role === 'user') ?? messages.at(-1);
  return {
    text: ctx.tokenizer.renderChat(messages, addGenerationPrompt),
    sourceText: contentText(lastUser?.content),
    tokenize: () => ctx.tokenizer.encodeChat(messages, addGenerationPrompt),
  };
}

function completionPrompts(ctx: SimContext, prompt: unknown, body: unknown): RenderedPrompt[] {
  const isTokenList = (p: unknown): p is number[] =>
    Array.isArray(p) && p.length > 0 && p.every((t) => typeof t === 'number');
  const fromText = (text: string): RenderedPrompt => ({
    text,
    sourceText: text,
    tokenize: () => ctx.tokenizer.encode(text),
  });
  const fromTokens = (ids: number[]): RenderedPrompt => ({
    text: null,
    sourceText: ctx.tokenizer.decode(ids, true),
    tokenize: () => ids,
  });
  if (typeof prompt === 'string' && prompt !== '') return [fromText(prompt)];
  if (isTokenList(prompt)) return [fromTokens(prompt)];
  if (Array.isArray(prompt) && prompt.length > 0) {
    if (prompt.every((p) => typeof p === 'string')) return (prompt as string[]).map(fromText);
    if (prompt.every(isTokenList)) return (prompt as number[][]).map(fromTokens);
  }
  const message = 'Either prompt or prompt_embeds must be provided and non-empty.';
  throw modelValidatorError(message, 'prompt', body);
}

/** Characters as Python's len() counts them (code points, not UTF-16 units). */
function pyLen(text: string): number {
  return text.length - (text.match(/[\uD800-\uDBFF][\uDC00-\uDFFF]/g)?.length ?? 0);
}

/**
 * TokenizeParams' length checks around tokenization, for max_input_tokens = max_model_len -
 * max_tokens: a text longer than max_input_tokens × max_chars_per_token characters is refused
 * before it is tokenized (`input_text`), then the tokens are counted (`input_tokens`).
 */
function tokenizePrompt(ctx: SimContext, prompt: RenderedPrompt, outputTokens: number): PromptInput {
  const maxModelLen = ctx.args.maxModelLen;
  const maxInputTokens = maxModelLen - outputTokens;
  const context =
    `This model's maximum context length is ${maxModelLen} tokens. However, you requested ` +
    `${outputTokens} output tokens and your prompt contains`;
  const advice =
    'Please reduce the length of the input prompt or the number of requested output tokens.';
  if (prompt.text !== null) {
    const chars = pyLen(prompt.text);
    const maxChars = maxInputTokens * MAX_CHARS_PER_TOKEN;
    if (chars > maxChars) {
      throw validationError(
        `${context} ${chars} characters (more than ${maxChars} characters, which is the upper ` +
          `bound for ${maxInputTokens} input tokens). ${advice}`,
        'input_text',
        chars,
      );
    }
  }
  const tokenIds = prompt.tokenize();
  const inputTokens = tokenIds.length;
  if (inputTokens > maxInputTokens) {
    throw validationError(
      `${context} ${inputTokens} input tokens, for a total of ${inputTokens + outputTokens} ` +
        `tokens. ${advice}`,
      'input_tokens',
      inputTokens,
    );
  }
  return { tokenIds, sourceText: prompt.sourceText };
}

/** Validates a chat/completions body in vLLM's order; throws ApiError for the first problem. */
export function prepareGeneration(
  ctx: SimContext,
  kind: GenerationKind,
  rawBody: unknown,
  headerRequestId: string | undefined,
): PreparedGeneration {
  const raw = requireObject(rawBody);
  // Model validators (mode="before") run ahead of the field checks.
  if (raw.stream_options && !raw.stream) {
    const message = 'Stream options can only be defined when `stream=True`.';
    throw modelValidatorError(message, 'stream_options', raw);
  }
  const fields = kind === 'chat' ? CHAT_FIELDS : kind === 'responses' ? RESPONSES_FIELDS : COMMON_FIELDS;
  const body = validateFields(raw, fields, kind === 'chat' ? ['messages'] : []);
  const input = kind === 'responses' ? readResponsesInput(raw) : null;
  if (input) body.messages = input.messages;
  const { responseName, lora } = resolveModel(ctx, body.model);
  if (ctx.engine.dead) throw engineDeadError();

  const rendered =
    kind === 'completion' ? completionPrompts(ctx, body.prompt, raw) : [chatPrompt(ctx, body)];
  const maxTokensParam =
    input ? 'max_output_tokens' : kind === 'chat' && body.max_completion_tokens != null ? 'max_completion_tokens' : 'max_tokens';
  const requested =
    ((input ? input.maxOutputTokens : body[maxTokensParam]) as number | null | undefined) ??
    (kind === 'completion' ? COMPLETION_DEFAULT_MAX_TOKENS : null);
  const maxModelLen = ctx.args.maxModelLen;
  if (requested !== null && requested > maxModelLen) {
    // The f-string quirk of TokenizeParams (`{max_total_tokens=}`) is part of the message.
    throw validationError(
      `${maxTokensParam}=${requested} cannot be greater than max_model_len=max_total_tokens=` +
        `${maxModelLen}. Please request fewer output tokens.`,
      maxTokensParam,
      requested,
    );
  }
  const prompts = rendered.map((prompt) => tokenizePrompt(ctx, prompt, requested ?? 0));
  // Chat without max_tokens may generate up to the rest of the context (get_max_tokens).
  const maxTokens = requested ?? maxModelLen - prompts[0].tokenIds.length;
  verifySamplingParams(body, maxTokens);

  const streamOptions = (body.stream_options ?? {}) as Record<string, unknown>;
  const stream = body.stream === true;
  const idSuffix = headerRequestId ?? (body.request_id as string | undefined) ?? randomUuid();
  const requestId = input ? responseId(idSuffix) : `${kind === 'chat' ? 'chatcmpl' : 'cmpl'}-${idSuffix}`;
  const temperature = num(body.temperature, 1.0);
  return {
    kind,
    requestId,
    head: { id: requestId, created: Math.floor(Date.now() / 1000), model: responseName },
    responses: input && new ResponsesShape(requestId, responseName, input, temperature, num(body.top_p, 1.0)),
    lora,
    prompts,
    maxTokens,
    n: num(body.n, 1),
    stream,
    includeUsage:
      stream && (Boolean(streamOptions.include_usage) || ctx.args.enableForceIncludeUsage),
    continuousUsage:
      stream &&
      Boolean(streamOptions.include_usage) &&
      Boolean(streamOptions.continuous_usage_stats),
    ignoreEos: body.ignore_eos === true,
    temperature,
  };
}

// ---------------------------------------------------------------------------------------------
// Running a generation

/** One prompt's engine request and its progress. */
interface Sequence extends RunningSequence {
  engineId: string;
  /**
   * The engine's key for it: engineId with a random suffix, as vLLM's InputProcessor makes it
   * (PR #27987), so requests that share an id (a client's X-Request-Id) run side by side.
   */
  engineKey: string;
  choiceBase: number;
  plan: OutputPlan;
  finish: FinishReason | null;
  started: boolean;
  startedAt: number;
  lastTokenAt: number;
  /** The last planned token's text, sent with finish_reason when the engine finishes. */
  heldText: string | null;
  roleSent: boolean;
}

/** Drives one generation request from engine admission to the HTTP response's end. */
export class GenerationJob {
  private readonly sequences: Sequence[];
  private readonly arrivedAt = Date.now();
  private ended = false;
  private clientGone = false;
  private streamedTokens = 0;

  constructor(
    private readonly ctx: SimContext,
    private readonly g: PreparedGeneration,
    private readonly res: ServerResponse,
  ) {
    this.sequences = g.prompts.map((prompt, i) => ({
      engineId: g.prompts.length > 1 ? `${g.requestId}-${i}` : g.requestId,
      engineKey: `${g.prompts.length > 1 ? `${g.requestId}-${i}` : g.requestId}-${randomBytes(4).toString('hex')}`,
      choiceBase: i * g.n,
      plan: planOutput(ctx.tokenizer, ctx.weightsDiscarded ? DISCARDED_WEIGHTS_TEXT : prompt.sourceText, g.maxTokens, g.ignoreEos),
      promptTokens: prompt.tokenIds.length,
      emitted: 0,
      finish: null,
      started: false,
      startedAt: 0,
      lastTokenAt: 0,
      heldText: null,
      roleSent: false,
    }));
  }

  start(): void {
    const { ctx, g } = this;
    this.res.on('close', () => {
      if (!this.res.writableFinished) this.onClientGone();
    });
    if (g.stream) {
      this.res.writeHead(200, { 'content-type': 'text/event-stream; charset=utf-8' });
      this.res.flushHeaders();
      if (g.responses) this.write(g.responses.opening());
    }
    this.logReceived();
    const crashAfter =
      g.stream && ctx.settings.crashMidStream !== null && !ctx.settings.crashMidStreamHard
        ? ctx.settings.crashMidStream
        : undefined;
    for (const seq of this.sequences) {
      ctx.metrics.waiting += 1;
      ctx.engine.add(
        {
          type: 'add',
          id: seq.engineKey,
          numTokens: seq.plan.texts.length,
          finishReason: seq.plan.finishReason,
          crashAfterTokens: crashAfter,
        },
        this.listener(seq),
      );
    }
  }

  private logReceived(): void {
    const { ctx, g } = this;
    if (!ctx.args.enableLogRequests) return;
    for (const seq of this.sequences) {
      ctx.log.info(
        'logger.py:49',
        `Received request ${seq.engineId}: params: SamplingParams(n=${g.n}, ` +
          `temperature=${pyFloat(g.temperature)}, max_tokens=${g.maxTokens}, ` +
          `ignore_eos=${g.ignoreEos ? 'True' : 'False'}), num_prompt_tokens: ${seq.promptTokens}, ` +
          `lora_request: ${g.lora ? `LoRARequest(lora_name='${g.lora.name}')` : 'None'}.`,
      );
      ctx.log.info('async_llm.py:380', `Added request ${seq.engineId}.`);
    }
  }

  private listener(seq: Sequence): RequestListener {
    return {
      onStarted: () => this.onStarted(seq),
      onToken: (index) => this.onToken(seq, index),
      onFinished: (reason) => this.onFinished(seq, reason),
      onEngineDead: () => this.onEngineDead(seq),
    };
  }

  private onStarted(seq: Sequence): void {
    const { metrics } = this.ctx;
    seq.started = true;
    seq.startedAt = seq.lastTokenAt = Date.now();
    metrics.waiting -= 1;
    metrics.running += 1;
    metrics.recordPrefill(seq.promptTokens);
    this.ctx.running.add(seq);
  }

  private onToken(seq: Sequence, index: number): void {
    const now = Date.now();
    const first = index === 0;
    const since = first ? now - this.arrivedAt : now - seq.lastTokenAt;
    this.ctx.metrics.recordTokens(this.g.n, since / 1000, first);
    seq.lastTokenAt = now;
    seq.emitted = index + 1;
    if (!this.g.stream || this.ended) return;
    this.sendRoleChunks(seq);
    // The last planned token goes out with finish_reason in the final chunk, as in vLLM.
    if (index === seq.plan.texts.length - 1) seq.heldText = seq.plan.texts[index];
    else this.sendDeltas(seq, seq.plan.texts[index]);
    this.streamedTokens += 1;
    const { crashMidStream, crashMidStreamHard } = this.ctx.settings;
    if (crashMidStreamHard && crashMidStream !== null && this.streamedTokens >= crashMidStream) {
      this.ctx.crash('VLLM_SIM_CRASH_MID_STREAM_HARD', 'sigkill');
    }
  }

  private onFinished(seq: Sequence, reason: FinishReason): void {
    const { metrics } = this.ctx;
    seq.finish = reason;
    if (seq.started) metrics.running -= 1;
    else metrics.waiting -= 1;
    this.ctx.running.delete(seq);
    metrics.recordFinished({
      reason,
      promptTokens: seq.promptTokens,
      generationTokens: seq.emitted * this.g.n,
      maxTokens: this.g.maxTokens,
      n: this.g.n,
      e2eSeconds: (Date.now() - this.arrivedAt) / 1000,
      queueSeconds: seq.started ? (seq.startedAt - this.arrivedAt) / 1000 : null,
    });
    if (this.ended) return;
    if (this.g.stream) {
      this.sendRoleChunks(seq);
      const last = seq.heldText ?? '';
      seq.heldText = null;
      this.sendFinalChunks(seq, last, reason);
    }
    if (this.sequences.every((s) => s.finish !== null)) this.complete();
  }

  private onEngineDead(seq: Sequence): void {
    this.ctx.running.delete(seq);
    if (seq.started) this.ctx.metrics.running -= 1;
    else this.ctx.metrics.waiting -= 1;
    if (this.ctx.args.enableLogRequests) {
      this.ctx.log.info('async_llm.py:470', `Request ${seq.engineId} failed (engine dead).`);
    }
    if (this.ended) return;
    this.ended = true;
    const error = engineDeadError();
    if (this.g.stream && this.g.responses) {
      // The Responses stream generator catches nothing: Starlette drops the connection mid-body.
      this.res.destroy();
    } else if (this.g.stream) {
      // After a 200 has gone out, the error travels in the stream (json.dumps spacing).
      this.write(`data: ${pyJsonDumps(error.body())}\n\n`);
      this.write('data: [DONE]\n\n');
      this.res.end();
    } else {
      sendJson(this.res, error.status, error.body());
    }
  }

  /** The client went away: abort the request in the engine (vLLM's with_cancellation). */
  private onClientGone(): void {
    if (this.ended || this.clientGone) return;
    this.clientGone = true;
    this.ended = true;
    const aborted = this.sequences.filter((s) => s.finish === null);
    this.ctx.engine.abort(aborted.map((s) => s.engineKey));
    const ids = aborted.map((s) => s.engineId);
    if (this.ctx.args.enableLogRequests) {
      for (const id of ids) this.ctx.log.info('async_llm.py:462', `Request ${id} aborted.`);
      if (ids.length) this.ctx.log.info('async_llm.py:540', `Aborted request(s) ${ids.join(',')}.`);
    }
  }

  private usageFor(seq: Sequence): Usage {
    return usage(seq.promptTokens, seq.emitted, false, this.ctx.args.enablePromptTokensDetails);
  }

  private sendRoleChunks(seq: Sequence): void {
    if (seq.roleSent || this.g.kind !== 'chat') return;
    seq.roleSent = true;
    for (let j = 0; j < this.g.n; j += 1) {
      const u = this.g.continuousUsage ? usage(seq.promptTokens, 0, false) : undefined;
      this.writeChunk(chatRoleChunk(this.g.head, seq.choiceBase + j, u));
    }
  }

  private sendDeltas(seq: Sequence, text: string): void {
    if (this.g.responses) {
      const events = this.g.responses.delta(text); // nothing for empty text, as vLLM skips an empty delta
      if (events) this.write(events);
      return;
    }
    for (let j = 0; j < this.g.n; j += 1) {
      const u = this.g.continuousUsage ? this.usageFor(seq) : undefined;
      const index = seq.choiceBase + j;
      this.writeChunk(
        this.g.kind === 'chat'
          ? chatDeltaChunk(this.g.head, index, text, null, u)
          : completionChunk(this.g.head, index, text, null, u),
      );
    }
  }

  private sendFinalChunks(seq: Sequence, text: string, reason: FinishReason): void {
    const { g } = this;
    if (g.responses) {
      const all = seq.plan.texts.slice(0, seq.emitted).join('');
      return this.write(g.responses.delta(text) + g.responses.closing(all, reason, { input: seq.promptTokens, output: seq.emitted }));
    }
    for (let j = 0; j < g.n; j += 1) {
      const u = g.continuousUsage ? this.usageFor(seq) : undefined;
      const index = seq.choiceBase + j;
      // system_fingerprint rides on the terminal chunk only when no usage chunk follows.
      const fingerprint = g.includeUsage ? undefined : this.ctx.fingerprint;
      this.writeChunk(
        g.kind === 'chat'
          ? chatDeltaChunk(g.head, index, text, reason, u, fingerprint)
          : completionChunk(g.head, index, text, reason, u),
      );
    }
  }

  private totals(): { prompt: number; completion: number } {
    return {
      prompt: this.sequences.reduce((sum, s) => sum + s.promptTokens, 0),
      completion: this.sequences.reduce((sum, s) => sum + s.emitted * this.g.n, 0),
    };
  }

  /** Every sequence finished: send the usage chunk and [DONE], or the JSON response. */
  private complete(): void {
    const { g, ctx } = this;
    this.ended = true;
    const { prompt, completion } = this.totals();
    if (g.stream && g.responses) {
      this.res.end(() => this.onResponseDone()); // its last event, response.completed, went with the final chunks
      return;
    }
    if (!g.stream && g.responses) {
      const seq = this.sequences[0];
      const text = seq.plan.texts.slice(0, seq.emitted).join('');
      const status = ResponsesShape.status(seq.finish);
      sendJson(this.res, 200, g.responses.response(status, text, { input: prompt, output: completion }), () => this.onResponseDone());
      return;
    }
    if (g.stream) {
      if (g.includeUsage) {
        const object = g.kind === 'chat' ? 'chat.completion.chunk' : 'text_completion';
        const u = usage(prompt, completion, false, ctx.args.enablePromptTokensDetails);
        this.writeChunk(usageChunk(g.head, object, u, ctx.fingerprint));
      }
      this.write('data: [DONE]\n\n');
      this.res.end(() => this.onResponseDone());
      return;
    }
    const choices: ChoiceResult[] = [];
    for (const seq of this.sequences) {
      const text = seq.plan.texts.slice(0, seq.emitted).join('');
      for (let j = 0; j < g.n; j += 1) {
        choices.push({ index: seq.choiceBase + j, text, finishReason: seq.finish as string });
      }
    }
    const u = usage(prompt, completion, true, ctx.args.enablePromptTokensDetails);
    const build = g.kind === 'chat' ? chatCompletion : textCompletion;
    const response = build(g.head, choices, ctx.fingerprint, u);
    sendJson(this.res, 200, response, () => this.onResponseDone());
  }

  private onResponseDone(): void {
    const { ctx } = this;
    ctx.completedRequests += 1;
    const limit = ctx.settings.crashAfterRequests;
    if (limit !== null && ctx.completedRequests >= limit) {
      ctx.crash(`VLLM_SIM_CRASH_AFTER_REQUESTS=${limit}`, 'exit');
    }
  }

  private writeChunk(chunk: Record<string, unknown>): void {
    this.write(`data: ${JSON.stringify(chunk)}\n\n`);
  }

  private write(text: string): void {
    if (!this.res.writableEnded && !this.res.destroyed) this.res.write(text);
  }
}

/** Runs a validated generation; VLLM_SIM_FAIL_NTH_REQUEST answers the Nth one with a 500. */
export function runGeneration(ctx: SimContext, g: PreparedGeneration, res: ServerResponse): void {
  ctx.acceptedRequests += 1;
  if (ctx.acceptedRequests === ctx.settings.failNthRequest) {
    sendError(res, internalServerError());
    return;
  }
  new GenerationJob(ctx, g, res).start();
}
