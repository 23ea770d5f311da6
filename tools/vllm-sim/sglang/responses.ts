/**
 * POST /v1/responses in SGLang mode (python/sglang/srt/entrypoints/openai/serving_responses.py,
 * protocol.py ResponsesRequest/ResponsesResponse, http_server.py v1_responses_request), plus
 * GET /v1/responses/{response_id} and POST /v1/responses/{response_id}/cancel.
 *
 * - The body is read as a plain dict (a bad body or content type is the nested 400 "Bad
 *   Request"), then `ResponsesRequest(**request)` runs in the endpoint: a missing `input` or a
 *   field of the wrong type is an uncaught pydantic error, FastAPI's plain-text 500.
 * - The conversation is chat's: `instructions` and any system/developer input merged into one
 *   leading system message, `input` a user message or a list of messages (`input_text` parts).
 * - to_sampling_params: max_new_tokens = min(max_output_tokens, max(context − prompt, 512)) − 2
 *   (without max_output_tokens, that max alone − 2: on a short context the request then exceeds
 *   it); temperature 0.7 and top_p 1.0 unless given.
 * - Errors SGLang meets before generating are the nested `{"error": {...}}` 400 (404 for an
 *   unknown previous_response_id); the tokenizer's length and sampling errors arrive during
 *   generation: a nested 400 without streaming, `response.failed` after created/in_progress
 *   with it.
 * - The answer: status "completed" (also when max_output_tokens cut the text), a `msg_…` message
 *   item, `usage` as chat's UsageInfo (prompt_tokens …). The stream (non-harmony generator):
 *   `event: <type>\ndata: <json>\n\n` numbered from 0 — created, in_progress, with the first text
 *   output_item.added and content_part.added, output_text.delta…, output_text.done,
 *   content_part.done, output_item.done, completed — no [DONE]; the completed response has
 *   `tools: []` and usage as input_tokens/output_tokens.
 * - A request without `model`: ResponsesResponse requires a string, so the finished generation
 *   fails (400) and a stream breaks off right after its headers.
 * - `store` (default true) keeps the response for GET /v1/responses/{id} and previous_response_id.
 */
import type { IncomingMessage, ServerResponse } from 'node:http';
import { coerceFields, sendError, sendJson, type FieldKind } from '../fastapi';
import { pyFloat, pyRepr } from '../python-format';
import { ChatMessage, contentText } from '../tokenizer';
import type { SglContext, StoredResponse } from './context';
import {
  SglPrepared,
  SglResponsesRenderer,
  checkLength,
  numberOr,
  parseSglBody,
  randomHex,
  requireSglObject,
  runSglGeneration,
  verifySampling,
} from './generation';
import { runPrefill } from './pooling';
import { SglError, SglResponsesError, responsesError, responsesValidationError, sglUsage } from './protocol';

/** ResponsesRequest._DEFAULT_SAMPLING_PARAMS. */
const DEFAULT_TEMPERATURE = 0.7;
const DEFAULT_TOP_P = 1.0;
/** to_sampling_params' floor for the default max tokens, and what it takes off. */
const MIN_DEFAULT_MAX_TOKENS = 512;
const CONTEXT_MARGIN_TOKENS = 2;
/** Stored responses kept (SGLang keeps all; the simulator forgets the oldest). */
const STORE_LIMIT = 1000;

const FIELDS: Record<string, FieldKind> = {
  background: 'bool',
  instructions: 'str',
  max_output_tokens: 'int',
  max_tool_calls: 'int',
  metadata: 'object',
  model: 'str',
  parallel_tool_calls: 'bool',
  previous_response_id: 'str',
  store: 'bool',
  stream: 'bool',
  temperature: 'float',
  tools: 'list',
  top_logprobs: 'int',
  top_p: 'float',
  user: 'str',
  request_id: 'str',
  priority: 'int',
  frequency_penalty: 'float',
  presence_penalty: 'float',
  top_k: 'int',
  min_p: 'float',
  repetition_penalty: 'float',
};
const TOOL_CHOICES = ['auto', 'required', 'none'];
const TRUNCATIONS = ['auto', 'disabled'];

/** The request fields the response echoes. */
interface ResponsesRequest {
  id: string;
  model: string | null;
  instructions: string | null;
  maxOutputTokens: number | null;
  temperature: number | null;
  topP: number | null;
  toolChoice: string;
  tools: unknown[];
  store: boolean;
  metadata: Record<string, unknown> | null;
  previousResponseId: string | null;
  reasoningEffort: string | null;
  truncation: string | null;
  user: string | null;
  stream: boolean;
}

/** pydantic's rendering of the validation error `ResponsesResponse(model=None)` raises. */
const MODEL_NOT_A_STRING =
  '1 validation error for ResponsesResponse\nmodel\n  Input should be a valid string ' +
  '[type=string_type, input_value=None, input_type=NoneType]\n' +
  '    For further information visit https://errors.pydantic.dev/2.11/v/string_type';

type Usage = { prompt: number; completion: number };

/** One response's wire shapes and stream state (SglJob drives it). */
export class SglResponses implements SglResponsesRenderer {
  private sequence = 0;
  private itemAdded = false;
  private text = '';
  private readonly itemId = `msg_${randomHex()}`;
  readonly createdAt = Math.floor(Date.now() / 1000);

  constructor(
    private readonly ctx: SglContext,
    readonly request: ResponsesRequest,
    private readonly messages: ChatMessage[],
  ) {}

  /** ResponsesResponse.from_request(...).model_dump(), in its field order. */
  response(status: string, output: unknown[], usage: Record<string, unknown> | null): Record<string, unknown> {
    const r = this.request;
    return {
      id: r.id,
      object: 'response',
      created_at: this.createdAt,
      model: r.model,
      output,
      status,
      usage,
      parallel_tool_calls: true,
      tool_choice: r.toolChoice,
      tools: r.tools,
      error: null,
      incomplete_details: null,
      instructions: r.instructions,
      max_output_tokens: r.maxOutputTokens,
      previous_response_id: r.previousResponseId,
      reasoning: { effort: r.reasoningEffort, summary: null },
      store: r.store,
      temperature: r.temperature,
      text: output.length ? { format: { type: 'text' } } : null,
      top_p: r.topP,
      truncation: r.truncation,
      user: r.user,
      metadata: r.metadata ?? {},
    };
  }

  private message(text: string, status: string): Record<string, unknown> {
    return { id: this.itemId, content: status === 'completed' ? [this.part(text)] : [], role: 'assistant', status, type: 'message' };
  }

  private part(text: string): Record<string, unknown> {
    return { annotations: [], text, type: 'output_text', logprobs: null };
  }

  /**
   * A response inside an event: `tools` emptied (`_sanitize_response_dict`), the usage as
   * input/output tokens, and the keys in the order of openai's Response model, which the event
   * re-validates it into (SGLang's extra `store` last).
   */
  private streamed(response: Record<string, unknown>): Record<string, unknown> {
    const usage = response.usage as ReturnType<typeof sglUsage> | null;
    const converted = {
      ...response,
      tools: [],
      usage: usage && {
        input_tokens: usage.prompt_tokens,
        input_tokens_details: { cached_tokens: 0 },
        output_tokens: usage.completion_tokens,
        output_tokens_details: { reasoning_tokens: 0 },
        total_tokens: usage.total_tokens,
      },
    };
    const order = [
      'id', 'created_at', 'error', 'incomplete_details', 'instructions', 'metadata', 'model', 'object', 'output',
      'parallel_tool_calls', 'temperature', 'tool_choice', 'tools', 'top_p', 'max_output_tokens',
      'previous_response_id', 'reasoning', 'status', 'text', 'truncation', 'usage', 'user',
    ];
    const out: Record<string, unknown> = {};
    for (const key of order) out[key] = converted[key as keyof typeof converted];
    for (const [key, value] of Object.entries(converted)) if (!(key in out)) out[key] = value;
    return out;
  }

  opening(): string {
    const response = this.streamed(this.response('in_progress', [], null));
    return this.event('response.created', { response }) + this.event('response.in_progress', { response });
  }

  delta(text: string): string {
    if (!text) return '';
    let events = '';
    if (!this.itemAdded) {
      this.itemAdded = true;
      events =
        this.event('response.output_item.added', { item: this.message('', 'in_progress'), output_index: 0 }) +
        this.event('response.content_part.added', { content_index: 0, item_id: this.itemId, output_index: 0, part: this.part('') });
    }
    this.text += text;
    return events + this.event('response.output_text.delta', { content_index: 0, delta: text, item_id: this.itemId, logprobs: [], output_index: 0 });
  }

  closing(usage: Usage): string {
    let events = '';
    const output: unknown[] = [];
    if (this.itemAdded) {
      const text = this.text;
      events =
        this.event('response.output_text.done', { content_index: 0, item_id: this.itemId, logprobs: [], output_index: 0, text }) +
        this.event('response.content_part.done', { content_index: 0, item_id: this.itemId, output_index: 0, part: this.part(text) }) +
        this.event('response.output_item.done', { item: this.message(text, 'completed'), output_index: 0 });
      output.push(this.message(text, 'completed'));
    }
    const response = this.response('completed', output, sglUsage(usage.prompt, usage.completion) as unknown as Record<string, unknown>);
    this.store(response);
    return events + this.event('response.completed', { response: this.streamed(response) });
  }

  failed(): string {
    return this.event('response.failed', { response: this.streamed(this.response('failed', [], null)) });
  }

  /** responses_full_generator: the response (and its storing), or the error building it raised. */
  final(text: string, usage: Usage): { status: number; body: unknown } {
    if (this.request.model === null) return { status: 400, body: responsesError(MODEL_NOT_A_STRING).body() };
    const output = text ? [this.message(text, 'completed')] : [];
    const response = this.response('completed', output, sglUsage(usage.prompt, usage.completion) as unknown as Record<string, unknown>);
    this.store(response);
    return { status: 200, body: response };
  }

  private store(response: Record<string, unknown>): void {
    if (!this.request.store) return;
    const { responses } = this.ctx;
    responses.delete(this.request.id);
    responses.set(this.request.id, { response, messages: this.messages });
    if (responses.size > STORE_LIMIT) responses.delete(responses.keys().next().value as string);
  }

  /** `event: <type>` and the event's model_dump_json (compact, keys in openai's order). */
  private event(type: string, fields: Record<string, unknown>): string {
    const data = { ...fields, sequence_number: this.sequence++, type };
    return `event: ${type}\ndata: ${JSON.stringify(data)}\n\n`;
  }
}

// ---------------------------------------------------------------------------------------------
// The request

/** _construct_input_messages: instructions, the previous turn, the input; system parts merged. */
function conversation(body: Record<string, unknown>, previous: StoredResponse | null): ChatMessage[] {
  const messages: ChatMessage[] = [];
  if (typeof body.instructions === 'string' && body.instructions) messages.push({ role: 'system', content: body.instructions });
  if (previous) {
    messages.push(...previous.messages);
    for (const item of previous.response.output as Array<Record<string, unknown>>) {
      const text = (item.content as Array<Record<string, unknown>> | undefined)?.map((p) => String(p.text ?? '')).join('\n');
      if (item.type === 'message' && text) messages.push({ role: 'assistant', content: text });
    }
  }
  const { input } = body;
  if (typeof input === 'string') messages.push({ role: 'user', content: input });
  else {
    for (const raw of input as unknown[]) {
      const item = (raw ?? {}) as Record<string, unknown>;
      const type = item.type;
      if (type === 'function_call_output') {
        messages.push({ role: 'tool', content: String(item.output ?? '') });
        continue;
      }
      if (type === 'function_call' || type === 'reasoning') continue;
      if (type !== undefined && type !== null && type !== 'message') {
        // _normalize_response_message_for_chat's ValueError, caught as `f"{e} {e.__cause__}"`.
        throw responsesError(`Unsupported Responses API input item type: ${pyRepr(type)} None`);
      }
      const role = item.role === 'developer' ? 'system' : String(item.role ?? 'user');
      const content = Array.isArray(item.content)
        ? (item.content as Array<Record<string, unknown> | null>).map((p) =>
            p?.type === 'input_text' || p?.type === 'output_text' ? { type: 'text', text: String(p.text ?? '') } : p,
          )
        : item.content;
      messages.push({ role, content });
    }
  }
  // One leading system message (instructions and developer entries joined).
  const system = messages.filter((m) => m.role === 'system').map((m) => contentText(m.content));
  const others = messages.filter((m) => m.role !== 'system');
  return system.length ? [{ role: 'system', content: system.join('\n\n') }, ...others] : others;
}

/** What prepareResponses found: a job to run, and the error its generation will meet (if any). */
export interface ResponsesPlan {
  prepared: SglPrepared;
  shape: SglResponses;
  /** A tokenizer-side ValueError (length, sampling) raised once generation starts. */
  deferred: string | null;
}

/** POST /v1/responses up to the generation (SGLang's order of checks). */
export function prepareResponses(ctx: SglContext, req: IncomingMessage, raw: Buffer): ResponsesPlan {
  let body: Record<string, unknown>;
  try {
    body = requireSglObject(parseSglBody(req, raw, true));
  } catch (error) {
    if (error instanceof SglError) throw responsesValidationError(error);
    throw error;
  }
  // ResponsesRequest(**request) inside the endpoint: uncaught, FastAPI's plain 500.
  const { value, errors } = coerceFields(body, FIELDS, ['input']);
  const input = body.input;
  if (input !== undefined && typeof input !== 'string' && !Array.isArray(input)) {
    errors.push({ type: 'string_type', loc: ['input', 'str'], msg: 'Input should be a valid string', input });
  }
  for (const [field, allowed] of [['tool_choice', TOOL_CHOICES], ['truncation', TRUNCATIONS]] as const) {
    if (value[field] !== undefined && value[field] !== null && !allowed.includes(value[field] as string)) {
      errors.push({ type: 'literal_error', loc: [field], msg: `Input should be ${allowed.map((a) => pyRepr(a)).join(' or ')}`, input: value[field] });
    }
  }
  if (errors.length) {
    const lines = errors.map((e) => `${e.loc.join('.')}\n  ${e.msg} [type=${e.type}, input_value=${pyRepr(e.input)}]`);
    throw new Error(`pydantic_core._pydantic_core.ValidationError: ${errors.length} validation error(s) for ResponsesRequest\n${lines.join('\n')}`);
  }
  const str = (v: unknown): string | null => (typeof v === 'string' ? v : null);
  const num = (v: unknown): number | null => (typeof v === 'number' ? v : null);
  const reasoning = value.reasoning as Record<string, unknown> | null | undefined;
  const request: ResponsesRequest = {
    id: str(value.request_id) ?? `resp_${randomHex()}`,
    model: str(value.model),
    instructions: str(value.instructions),
    maxOutputTokens: num(value.max_output_tokens),
    temperature: num(value.temperature),
    topP: num(value.top_p),
    toolChoice: str(value.tool_choice) ?? 'auto',
    tools: (value.tools as unknown[] | undefined) ?? [],
    store: value.store !== false,
    metadata: (value.metadata as Record<string, unknown> | undefined) ?? null,
    previousResponseId: str(value.previous_response_id),
    reasoningEffort: reasoning ? (str(reasoning.effort) ?? (reasoning.effort === null ? null : 'medium')) : null,
    truncation: value.truncation === null ? null : (str(value.truncation) ?? 'disabled'),
    user: str(value.user),
    stream: value.stream === true,
  };
  // create_responses
  if (request.toolChoice === 'required' && !request.tools.some((t) => (t as Record<string, unknown> | null)?.type === 'function')) {
    throw responsesError(
      'tool_choice="required" requires at least one tool with type="function"; other built-in tool types cannot be forced.',
    );
  }
  let previous: StoredResponse | null = null;
  if (request.previousResponseId !== null) {
    const id = request.previousResponseId;
    if (!id.startsWith('resp_')) throw invalidId(id);
    previous = ctx.responses.get(id) ?? null;
    if (!previous) throw notFound(id);
  }
  const messages = conversation(value, previous);
  const promptTokens = ctx.tokenizer.encodeChat(messages, true).length;
  const lastUser = [...messages].reverse().find((m) => m.role === 'user') ?? messages.at(-1);
  // to_sampling_params
  const defaultMax = Math.max(ctx.args.contextLength - promptTokens, MIN_DEFAULT_MAX_TOKENS);
  const maxNew = (request.maxOutputTokens !== null ? Math.min(request.maxOutputTokens, defaultMax) : defaultMax) - CONTEXT_MARGIN_TOKENS;
  const sampling = {
    temperature: request.temperature ?? DEFAULT_TEMPERATURE,
    topP: request.topP ?? DEFAULT_TOP_P,
    topK: numberOr(value.top_k, -1),
    minP: numberOr(value.min_p, 0),
    frequencyPenalty: numberOr(value.frequency_penalty, 0),
    presencePenalty: numberOr(value.presence_penalty, 0),
    repetitionPenalty: numberOr(value.repetition_penalty, 1.0),
    minNewTokens: 0,
    maxNewTokens: maxNew,
    n: 1,
    ignoreEos: false,
  };
  let deferred: string | null = null;
  try {
    checkLength(ctx, promptTokens, maxNew);
    verifySampling(sampling, pyFloat);
  } catch (error) {
    deferred = (error as Error).message;
  }
  const shape = new SglResponses(ctx, request, messages);
  const prepared: SglPrepared = {
    kind: 'responses',
    rid: request.id,
    head: { id: request.id, created: shape.createdAt, model: request.model ?? '' },
    prompts: [{ tokens: promptTokens, sourceText: contentText(lastUser?.content) }],
    maxNewTokens: Math.max(0, maxNew),
    n: 1,
    stream: request.stream,
    includeUsage: false,
    continuousUsage: false,
    ignoreEos: false,
    lora: null,
    warmup: false,
    sampling: { max_new_tokens: maxNew, temperature: sampling.temperature, top_p: sampling.topP },
    responses: shape,
  };
  return { prepared, shape, deferred };
}

function invalidId(id: string): SglResponsesError {
  return responsesError(`Invalid 'response_id': '${id}'. Expected an ID that begins with 'resp'.`, 400, 'invalid_request_error', 'response_id');
}

function notFound(id: string): SglResponsesError {
  return responsesError(`Response with id '${id}' not found.`, 404, 'invalid_request_error', 'response_id');
}

function openStream(res: ServerResponse): void {
  res.writeHead(200, { 'content-type': 'text/event-stream; charset=utf-8', 'cache-control': 'no-cache', connection: 'keep-alive' });
}

/**
 * Runs a prepared /v1/responses request. On an embedding model (--is-embedding) the scheduler
 * answers the GenerateReqInput with a pooled output and no text: the non-streamed answer fails on
 * its missing `text` (400 "'text'"), the stream completes with no output.
 */
export async function runResponses(ctx: SglContext, plan: ResponsesPlan, res: ServerResponse): Promise<void> {
  const { prepared: g, shape, deferred } = plan;
  if (g.stream && shape.request.model === null) {
    // The generator's first ResponsesResponse.from_request raises after the headers went out.
    ctx.log.error(`Exception in ASGI application\npydantic_core._pydantic_core.ValidationError: ${MODEL_NOT_A_STRING}`);
    openStream(res);
    res.flushHeaders();
    res.destroy();
    return;
  }
  if (deferred !== null) {
    ctx.ensureHandleLoop();
    if (!g.stream) return sendError(res, responsesError(deferred));
    openStream(res);
    res.end(shape.opening() + shape.failed());
    return;
  }
  if (!ctx.args.isEmbedding) return runSglGeneration(ctx, g, res);
  if (g.stream) {
    openStream(res);
    res.write(shape.opening());
  }
  try {
    await runPrefill(ctx, res, g.rid, [g.prompts[0].tokens]);
  } catch (error) {
    if (!(error instanceof SglError)) throw error;
    if (g.stream) res.end(shape.failed());
    else sendError(res, responsesError(`${error.status}: ${error.message}`));
    return;
  }
  if (g.stream) res.end(shape.closing({ prompt: g.prompts[0].tokens, completion: 0 }));
  else sendError(res, responsesError("'text'"));
}

/** GET /v1/responses/{response_id}: the stored response. */
export function retrieveResponse(ctx: SglContext, res: ServerResponse, id: string): void {
  if (!id.startsWith('resp_')) throw invalidId(id);
  const stored = ctx.responses.get(id);
  if (!stored) throw notFound(id);
  sendJson(res, 200, stored.response);
}

/** POST /v1/responses/{response_id}/cancel: only background responses (not simulated) can be. */
export function cancelResponse(ctx: SglContext, id: string): never {
  if (!id.startsWith('resp_')) throw invalidId(id);
  if (!ctx.responses.has(id)) throw notFound(id);
  throw responsesError('Cannot cancel a synchronous response.');
}
