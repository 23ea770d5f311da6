/**
 * SGLang's wire shapes (python/sglang/srt/entrypoints/openai/protocol.py, pydantic field order,
 * so JSON.stringify emits the keys in SGLang's order) and its error bodies: the flat
 * `ErrorResponse` of the OpenAI routes, `{"error": {...}}` stream events, the native routes'
 * `{"error": {"message": ...}}`, and the 404 of `GET /v1/models/{unknown}`.
 */
import { HttpError } from '../fastapi';
import { PyTuple, pyJsonDumps, pyRepr } from '../python-format';

// ---------------------------------------------------------------------------------------------
// Errors

/** An error answered with SGLang's flat ErrorResponse `{object, message, type, param, code}`. */
export class SglError extends HttpError {
  override body(): FlatError {
    return flatError(this.message, this.type, this.status, this.param);
  }
}

export interface FlatError {
  object: 'error';
  message: string;
  type: string;
  param: string | null;
  code: number;
}

export function flatError(message: string, type: string, code: number, param: string | null = null): FlatError {
  return { object: 'error', message, type, param, code };
}

/** create_error_response's default: a ValueError from validation or generation (400, type BadRequest). */
export function badRequestError(message: string): SglError {
  return new SglError(400, 'BadRequest', message);
}

/** handle_request's catch-all: `Internal server error: ...` (500). */
export function internalServerError(detail: string): SglError {
  return new SglError(500, 'InternalServerError', `Internal server error: ${detail}`);
}

/** fastapi.HTTPException through SGLang's handler: type is the status code as a string. */
export function httpException(status: number, detail: string): SglError {
  return new SglError(status, String(status), detail);
}

/** One pydantic/FastAPI error entry; `loc` is a tuple in Python's repr. */
export interface PydanticEntry {
  type: string;
  loc: (string | number)[];
  msg: string;
  input?: unknown;
  ctx?: Record<string, unknown>;
}

function entryRepr(entry: PydanticEntry, locAsList = false): Record<string, unknown> {
  const out: Record<string, unknown> = { type: entry.type };
  out.loc = locAsList ? entry.loc : new PyTuple(entry.loc);
  out.msg = entry.msg;
  if ('input' in entry) out.input = entry.input;
  if (entry.ctx) out.ctx = entry.ctx;
  return out;
}

/**
 * RequestValidationError through SGLang's handler: 400, type "Bad Request", message
 * `f"{exc_str} {errors_str}"` (FastAPI's `N validation error(s):` text, then the list).
 */
export function requestValidationError(entries: PydanticEntry[], locAsList = false): SglError {
  const reprs = entries.map((e) => pyRepr(entryRepr(e, locAsList)));
  const label = entries.length === 1 ? 'error' : 'errors';
  const excStr = `${entries.length} validation ${label}:\n${reprs.map((r) => `  ${r}\n`).join('')}`;
  return new SglError(400, 'Bad Request', `${excStr} [${reprs.join(', ')}]`);
}

/** validate_json_request: a content type other than application/json. */
export function unsupportedMediaType(): SglError {
  return requestValidationError(
    [
      {
        loc: ['header', 'content-type'],
        msg: "Unsupported Media Type: Only 'application/json' is allowed",
        type: 'value_error',
      },
    ],
    true,
  );
}

/** A streamed error event: `data: {"error": {...}}` with json.dumps spacing. */
export function streamErrorEvent(error: FlatError): string {
  return `data: ${pyJsonDumps({ error })}\n\n`;
}

/** `_create_error_response` of the native routes: `400 {"error": {"message": ...}}`. */
export function nativeError(message: string): { error: { message: string } } {
  return { error: { message } };
}

/** A native route's error (/generate's ValueErrors), answered with nativeError's body. */
export class NativeError extends HttpError {
  constructor(status: number, message: string) {
    super(status, 'native', message);
  }

  override body(): { error: { message: string } } {
    return nativeError(this.message);
  }
}

/** GET /v1/models/{unknown}: OpenAI's nested not-found body. */
export function modelNotFoundBody(model: string): Record<string, unknown> {
  return {
    error: {
      message: `The model '${model}' does not exist`,
      type: 'invalid_request_error',
      param: 'model',
      code: 'model_not_found',
    },
  };
}

// ---------------------------------------------------------------------------------------------
// Models

export function modelCard(
  id: string,
  root: string,
  parent: string | null,
  maxModelLen: number | null,
  created = Math.floor(Date.now() / 1000),
): Record<string, unknown> {
  return { id, object: 'model', created, owned_by: 'sglang', root, parent, max_model_len: maxModelLen };
}

// ---------------------------------------------------------------------------------------------
// Completions

export interface SglUsage {
  prompt_tokens: number;
  total_tokens: number;
  completion_tokens: number;
  prompt_tokens_details: null;
  reasoning_tokens: number;
}

export function sglUsage(prompt: number, completion: number): SglUsage {
  return {
    prompt_tokens: prompt,
    total_tokens: prompt + completion,
    completion_tokens: completion,
    prompt_tokens_details: null,
    reasoning_tokens: 0,
  };
}

export interface SglHead {
  id: string;
  created: number;
  /** The request's `model` field, echoed (SGLang does not check it). */
  model: string;
}

/** The leading `id, object, created, model` of a response or chunk (a chunk's own creation time). */
function headFields(head: SglHead, object: string, created = head.created): Record<string, unknown> {
  return { id: head.id, object, created, model: head.model };
}

export interface SglChoice {
  index: number;
  text: string;
  finishReason: string | null;
  matchedStop: number | string | null;
}

export function chatResponse(
  head: SglHead,
  choices: SglChoice[],
  usage: SglUsage,
  weightVersion: string,
): Record<string, unknown> {
  return {
    ...headFields(head, 'chat.completion'),
    choices: choices.map((c) => ({
      index: c.index,
      message: { role: 'assistant', content: c.text, reasoning_content: null, tool_calls: null },
      logprobs: null,
      finish_reason: c.finishReason,
      matched_stop: c.matchedStop,
    })),
    usage,
    metadata: { weight_version: weightVersion },
  };
}

export function completionResponse(
  head: SglHead,
  choices: SglChoice[],
  usage: SglUsage,
  weightVersion: string,
): Record<string, unknown> {
  return {
    ...headFields(head, 'text_completion'),
    choices: choices.map((c) => ({
      index: c.index,
      text: c.text,
      logprobs: null,
      finish_reason: c.finishReason,
      matched_stop: c.matchedStop,
    })),
    usage,
    metadata: { weight_version: weightVersion },
  };
}

export interface DeltaFields {
  role?: string;
  content?: string;
}

/** ChatCompletionStreamResponse.model_dump_json(): every delta field, `usage` null or set. */
export function chatChunk(
  head: SglHead,
  index: number,
  delta: DeltaFields,
  finishReason: string | null = null,
  matchedStop: number | string | null = null,
  usage: SglUsage | null = null,
): Record<string, unknown> {
  return {
    ...headFields(head, 'chat.completion.chunk', Math.floor(Date.now() / 1000)),
    choices: [
      {
        index,
        delta: {
          role: delta.role ?? null,
          content: delta.content ?? null,
          reasoning_content: null,
          tool_calls: null,
        },
        logprobs: null,
        finish_reason: finishReason,
        matched_stop: matchedStop,
      },
    ],
    usage,
  };
}

export function completionChunk(
  head: SglHead,
  index: number,
  text: string,
  finishReason: string | null,
  matchedStop: number | string | null,
  usage: SglUsage | null = null,
): Record<string, unknown> {
  return {
    ...headFields(head, 'text_completion', Math.floor(Date.now() / 1000)),
    choices: [{ index, text, logprobs: null, finish_reason: finishReason, matched_stop: matchedStop }],
    usage,
  };
}

/** The closing usage chunk (`choices: []`). */
export function usageChunk(head: SglHead, object: string, usage: SglUsage): Record<string, unknown> {
  return {
    ...headFields(head, object, Math.floor(Date.now() / 1000)),
    choices: [],
    usage,
  };
}

// ---------------------------------------------------------------------------------------------
// Embeddings, classification, scoring, rerank (the pooling routes)

/**
 * `self.create_error_response(message)` with its default type (serving_base.py): a
 * `_validate_request` message, or a ValueError the serving class catches itself (the
 * embeddings, classify, score and rerank handlers): 400, type "BadRequestError" — unlike
 * handle_request's own `except ValueError`, which says "BadRequest".
 */
export function servingError(message: string): SglError {
  return new SglError(400, 'BadRequestError', message);
}

/** TokenizerManager._validate_one_request: an EmbeddingReqInput on a generation model. */
export const NOT_AN_EMBEDDING_MODEL =
  'This model does not appear to be an embedding model by default. ' +
  'Please add `--is-embedding` when launching the server or try another model.';

/** One pooled output's meta_info (TokenizerManager._handle_batch_output, BatchEmbeddingOutput). */
export function embeddingMetaInfo(
  rid: string,
  promptTokens: number,
  weightVersion: string,
  e2eLatency: number,
): Record<string, unknown> {
  return {
    id: rid,
    // EmbeddingReqInput sets max_new_tokens 0: the dummy output token finishes it by length.
    finish_reason: { type: 'length', length: 0 },
    prompt_tokens: promptTokens,
    weight_version: weightVersion,
    total_retractions: 0,
    e2e_latency: e2eLatency,
  };
}

/** EmbeddingResponse (`data, model, object, usage`); `model` is the model path. */
export function embeddingResponse(vectors: number[][], model: string, promptTokens: number): Record<string, unknown> {
  return {
    data: vectors.map((embedding, index) => ({ embedding, index, object: 'embedding' })),
    model,
    object: 'list',
    usage: sglUsage(promptTokens, 0),
  };
}

export interface ClassifyData {
  index: number;
  label: string;
  probs: number[];
  num_classes: number;
}

/** ClassifyResponse (`id, object, created, model, data, usage`); `model` is the served name. */
export function classifyResponse(
  id: string,
  created: number,
  model: string,
  data: ClassifyData[],
  promptTokens: number,
): Record<string, unknown> {
  return { id, object: 'list', created, model, data, usage: sglUsage(promptTokens, 0) };
}

/** ScoringResponse.model_dump(): `scores, pooled_hidden_states, model, usage, object`. */
export function scoringResponse(scores: number[][], model: string, promptTokens: number): Record<string, unknown> {
  return { scores, pooled_hidden_states: null, model, usage: sglUsage(promptTokens, 0), object: 'scoring' };
}

/** RerankResponse: `score, document, index, meta_info`; `document` left out when null. */
export function rerankItem(
  score: number,
  document: unknown,
  index: number,
  metaInfo: Record<string, unknown> | null,
): Record<string, unknown> {
  const item: Record<string, unknown> = { score };
  if (document !== null && document !== undefined) item.document = document;
  item.index = index;
  item.meta_info = metaInfo;
  return item;
}

// ---------------------------------------------------------------------------------------------
// Responses API

/**
 * OpenAIServingResponses.create_error_response and the app's handlers for paths under
 * /v1/responses: OpenAI's nested envelope `{"error": {"message", "type", "param", "code"}}`
 * with the HTTP status as `code`.
 */
export class SglResponsesError extends HttpError {
  override body(): { error: { message: string; type: string; param: string | null; code: number } } {
    return { error: { message: this.message, type: this.type, param: this.param, code: this.status } };
  }
}

/** The serving class's default: 400 `invalid_request_error`. */
export function responsesError(
  message: string,
  status = 400,
  type = 'invalid_request_error',
  param: string | null = null,
): SglResponsesError {
  return new SglResponsesError(status, type, message, param);
}

/** A RequestValidationError (bad JSON, content type) on /v1/responses: nested, type "Bad Request". */
export function responsesValidationError(error: SglError): SglResponsesError {
  return new SglResponsesError(error.status, 'Bad Request', error.message);
}
