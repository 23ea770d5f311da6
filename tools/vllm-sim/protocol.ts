/**
 * vLLM's OpenAI-compatible wire shapes (vllm/entrypoints/openai/*\/protocol.py), built as object
 * literals in vLLM's field order so JSON.stringify emits the same keys in the same order, and the
 * error envelopes of vllm/entrypoints/serve/exception_handling.
 */
import { HttpError, PydanticError } from './fastapi';
import { PyRaw, pyRepr, pyStr } from './python-format';

// ---------------------------------------------------------------------------------------------
// Errors

/** An error answered as vLLM's `{"error": {message, type, param, code}}` envelope. */
export class ApiError extends HttpError {
  override body(): ErrorBody {
    return errorBody(this.message, this.type, this.param, this.status);
  }
}

export interface ErrorBody {
  error: { message: string; type: string; param: string | null; code: number };
}

export function errorBody(message: string, type: string, param: string | null, code: number): ErrorBody {
  return { error: { message, type, param, code } };
}

/** A VLLMClientError without parameter: 400 BadRequestError, param null. */
export function badRequest(message: string): ApiError {
  return new ApiError(400, 'BadRequestError', message);
}

/** `str()` of a value inside VLLMValidationError's ` (parameter=p, value=v)` suffix. */
function pyStrValue(value: unknown): string {
  if (typeof value === 'string') return value;
  return pyRepr(value);
}

/** VLLMValidationError → 400 BadRequestError, message suffixed with parameter and value. */
export function validationError(message: string, parameter: string, value?: unknown): ApiError {
  const extras = [`parameter=${parameter}`];
  if (value !== undefined && value !== null) extras.push(`value=${pyStrValue(value)}`);
  return new ApiError(400, 'BadRequestError', `${message} (${extras.join(', ')})`, parameter);
}

/** The EngineDeadError message (vllm/v1/engine/exceptions.py). */
export const ENGINE_DEAD_MESSAGE =
  'EngineCore encountered an issue. See stack trace (above) for the root cause.';

export function engineDeadError(): ApiError {
  return new ApiError(500, 'InternalServerError', ENGINE_DEAD_MESSAGE);
}

/** GenerationError (finish_reason "error") and other internal failures. */
export function internalServerError(message = 'Internal server error'): ApiError {
  return new ApiError(500, 'InternalServerError', message);
}

export function modelNotFound(model: string): ApiError {
  return new ApiError(404, 'NotFoundError', `The model \`${model}\` does not exist.`, 'model');
}

/** Longest `input` text the validation handler echoes (_MAX_ERROR_INPUT_CHARS). */
const MAX_ERROR_INPUT_CHARS = 200;

/** The validation handler's bounded stand-in for an error's `input` (_summarize_error_input). */
function summarizeInput(value: unknown): string {
  if (Array.isArray(value)) return `<list of ${value.length} items>`;
  if (value !== null && typeof value === 'object') {
    return `<dict of ${Object.keys(value).length} items>`;
  }
  // Anything else is shown as its str(): None, True, 1.5, the string itself.
  const text = typeof value === 'string' ? value : pyRepr(value);
  return text.length > MAX_ERROR_INPUT_CHARS
    ? `${text.slice(0, MAX_ERROR_INPUT_CHARS)}...[truncated]`
    : text;
}

/** vllm's sanitize_message: no object addresses, traceback fragments or absolute paths. */
export function sanitizeMessage(message: string): string {
  return message
    .replace(/ at 0x[0-9a-f]+>/g, '>')
    .replace(/\n?\s*File "[^"]+", line \d+, in \S+(\n\s+.*)?/g, '')
    .replace(/\/(?:home|usr|opt|var|tmp|root|lib|mnt|srv)(?:\/[\w.-]+)+/g, '<path>')
    .replace(/(?:\/[\w-]+)+\/[\w-]+\.\w+/g, '<path>')
    .trim();
}

/**
 * A RequestValidationError as vLLM's validation handler answers it: 400, type "Bad Request",
 * message `N validation error(s):\n  {...}`, param from a VLLMValidationError in ctx or the first
 * error's loc joined with dots.
 */
export function requestValidationError(errors: (PydanticError | string)[], param?: string): ApiError {
  const label = errors.length === 1 ? 'error' : 'errors';
  const rendered = errors.slice(0, 10).map((e) => {
    if (typeof e === 'string') return e;
    const entry: Record<string, unknown> = {
      type: e.type,
      loc: e.loc.join('.'),
      msg: e.msg,
      input: summarizeInput(e.input),
    };
    if (e.ctx) entry.ctx = e.ctx;
    return pyRepr(entry);
  });
  let message = `${errors.length} validation ${label}:\n` + rendered.map((r) => `  ${r}\n`).join('');
  if (errors.length > 10) message += `  ...and ${errors.length - 10} more ${label}\n`;
  const first = errors[0];
  const resolvedParam = param ?? (typeof first === 'object' ? first.loc.join('.') : null);
  return new ApiError(400, 'Bad Request', sanitizeMessage(message.trimEnd()), resolvedParam);
}

/** Pydantic's `missing` error for required body fields. */
export function missingFields(body: unknown, ...fields: string[]): ApiError {
  return requestValidationError(
    fields.map((f) => ({ type: 'missing', loc: ['body', f], msg: 'Field required', input: body })),
  );
}

/** validate_json_request: anything but application/json is a 400 (not 415). */
export function unsupportedMediaType(): ApiError {
  return requestValidationError(["Unsupported Media Type: Only 'application/json' is allowed"]);
}

/** A model_validator(mode="before") raising VLLMValidationError (no value). */
export function modelValidatorError(message: string, parameter: string, body: unknown): ApiError {
  return requestValidationError(
    [
      {
        type: 'value_error',
        loc: ['body'],
        msg: `Value error, ${message} (parameter=${parameter})`,
        input: body,
        ctx: { error: new PyRaw(`VLLMValidationError(${pyStr(message)})`) },
      },
    ],
    parameter,
  );
}

// ---------------------------------------------------------------------------------------------
// Models

export function modelPermission(id: string, created: number): Record<string, unknown> {
  return {
    id,
    object: 'model_permission',
    created,
    allow_create_engine: false,
    allow_sampling: true,
    allow_logprobs: true,
    allow_search_indices: false,
    allow_view: true,
    allow_fine_tuning: false,
    organization: '*',
    group: null,
    is_blocking: false,
  };
}

export interface ModelCardInput {
  id: string;
  created: number;
  root: string;
  parent: string | null;
  maxModelLen: number | null;
  permissionId: string;
}

export function modelCard(c: ModelCardInput): Record<string, unknown> {
  return {
    id: c.id,
    object: 'model',
    created: c.created,
    owned_by: 'vllm',
    root: c.root,
    parent: c.parent,
    max_model_len: c.maxModelLen,
    permission: [modelPermission(c.permissionId, c.created)],
  };
}

// ---------------------------------------------------------------------------------------------
// Completions

export interface Usage {
  prompt_tokens: number;
  total_tokens: number;
  completion_tokens: number;
  prompt_tokens_details?: Record<string, unknown> | null;
  completion_tokens_details?: null;
}

/** UsageInfo; `full` adds the two detail fields the non-streaming model_dump() includes. */
export function usage(
  promptTokens: number,
  completionTokens: number,
  full: boolean,
  promptTokensDetails = false,
): Usage {
  const u: Usage = {
    prompt_tokens: promptTokens,
    total_tokens: promptTokens + completionTokens,
    completion_tokens: completionTokens,
  };
  if (full || promptTokensDetails) {
    u.prompt_tokens_details = promptTokensDetails ? { cached_tokens: 0 } : null;
  }
  if (full) u.completion_tokens_details = null;
  return u;
}

/** Fields shared by every response and chunk: id, object, created, model. */
export interface ResponseHead {
  id: string;
  created: number;
  model: string;
}

/** The leading `id, object, created, model` of a response or chunk. */
function headFields(head: ResponseHead, object: string): Record<string, unknown> {
  return { id: head.id, object, created: head.created, model: head.model };
}

export interface ChoiceResult {
  index: number;
  text: string;
  finishReason: string;
}

export function chatCompletion(
  head: ResponseHead,
  choices: ChoiceResult[],
  fingerprint: string | null,
  u: Usage,
): Record<string, unknown> {
  return {
    ...headFields(head, 'chat.completion'),
    choices: choices.map((c) => ({
      index: c.index,
      message: {
        role: 'assistant',
        content: c.text,
        refusal: null,
        annotations: null,
        audio: null,
        function_call: null,
        reasoning: null,
      },
      logprobs: null,
      finish_reason: c.finishReason,
      stop_reason: null,
      token_ids: null,
      routed_experts: null,
    })),
    service_tier: null,
    system_fingerprint: fingerprint,
    usage: u,
    prompt_logprobs: null,
    prompt_token_ids: null,
    prompt_text: null,
    kv_transfer_params: null,
    ec_transfer_params: null,
    metrics: null,
  };
}

export function textCompletion(
  head: ResponseHead,
  choices: ChoiceResult[],
  fingerprint: string | null,
  u: Usage,
): Record<string, unknown> {
  return {
    ...headFields(head, 'text_completion'),
    choices: choices.map((c) => ({
      index: c.index,
      text: c.text,
      logprobs: null,
      finish_reason: c.finishReason,
      stop_reason: null,
      token_ids: null,
      prompt_logprobs: null,
      prompt_token_ids: null,
      routed_experts: null,
    })),
    service_tier: null,
    system_fingerprint: fingerprint,
    usage: u,
    kv_transfer_params: null,
    ec_transfer_params: null,
    metrics: null,
  };
}

/** First chat chunk of a choice: the role and empty content. */
export function chatRoleChunk(head: ResponseHead, index: number, u?: Usage): Record<string, unknown> {
  const chunk: Record<string, unknown> = {
    ...headFields(head, 'chat.completion.chunk'),
    choices: [
      { index, delta: { role: 'assistant', content: '' }, logprobs: null, finish_reason: null },
    ],
  };
  if (u) chunk.usage = u;
  chunk.prompt_token_ids = null;
  chunk.prompt_text = null;
  return chunk;
}

/** A chat delta; with `finishReason` it is the choice's final chunk. */
export function chatDeltaChunk(
  head: ResponseHead,
  index: number,
  text: string,
  finishReason: string | null,
  u?: Usage,
  fingerprint?: string | null,
): Record<string, unknown> {
  const choice: Record<string, unknown> = {
    index,
    delta: { content: text },
    logprobs: null,
    finish_reason: finishReason,
  };
  if (finishReason !== null) choice.stop_reason = null;
  choice.token_ids = null;
  const chunk: Record<string, unknown> = {
    ...headFields(head, 'chat.completion.chunk'),
    choices: [choice],
  };
  if (u) chunk.usage = u;
  if (fingerprint !== undefined) chunk.system_fingerprint = fingerprint;
  return chunk;
}

export function completionChunk(
  head: ResponseHead,
  index: number,
  text: string,
  finishReason: string | null,
  u?: Usage,
): Record<string, unknown> {
  const chunk: Record<string, unknown> = {
    ...headFields(head, 'text_completion'),
    choices: [
      {
        index,
        text,
        logprobs: null,
        finish_reason: finishReason,
        stop_reason: null,
        prompt_token_ids: null,
        token_ids: null,
      },
    ],
  };
  if (u) chunk.usage = u;
  return chunk;
}

/** The closing usage chunk (`choices: []`), exclude_none. */
export function usageChunk(
  head: ResponseHead,
  object: string,
  u: Usage,
  fingerprint: string | null,
): Record<string, unknown> {
  const chunk: Record<string, unknown> = { ...headFields(head, object), choices: [], usage: u };
  if (fingerprint !== null) chunk.system_fingerprint = fingerprint;
  return chunk;
}

// ---------------------------------------------------------------------------------------------
// Tokenize

export function tokenizeResponse(
  tokens: number[],
  maxModelLen: number,
  tokenStrs: string[] | null,
): Record<string, unknown> {
  return { count: tokens.length, max_model_len: maxModelLen, tokens, token_strs: tokenStrs };
}
