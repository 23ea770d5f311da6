import type { IncomingHttpHeaders } from 'node:http';
import { AppError, type ErrorCode } from '../domain/app-error';

export interface HttpError {
  status: number;
  /** Machine-readable type: snake case of the code (`invalid_request`, `vllm_not_ready` …). */
  type: string;
  message: string;
  param: string | null;
  retryAfter?: number;
  /** The Allow header of a 405. */
  allow?: string;
  /** The OpenAI shape's `type`, when not the one of the status (openAiType). */
  openAiType?: string;
  /** A refusal by the service's state (AppError's byState): logged as a warning. */
  byState?: boolean;
  /** Retrying cannot help (AppError's permanent): `x-should-retry: false`. */
  permanent?: boolean;
}

/** The one place where an error code becomes an HTTP status. */
export function statusOf(error: AppError): number {
  const code: ErrorCode = error.code;
  switch (code) {
    case 'INVALID_REQUEST':
      return 400;
    case 'UPSTREAM_REJECTED':
      return error.upstreamStatus ?? 400;
    case 'UNAUTHORIZED':
      return 401;
    case 'FORBIDDEN':
      return 403;
    case 'NOT_FOUND':
      return 404;
    case 'METHOD_NOT_ALLOWED':
      return 405;
    case 'REQUEST_TIMEOUT':
      return 408;
    case 'CONFLICT':
      return 409;
    case 'PAYLOAD_TOO_LARGE':
      return 413;
    case 'URI_TOO_LONG':
      return 414;
    case 'UNSUPPORTED_MEDIA_TYPE':
      return 415;
    case 'REQUEST_HEADERS_TOO_LARGE':
      return 431;
    case 'OVERLOADED':
      return 429;
    case 'INTERNAL':
      return 500;
    case 'UPSTREAM_ERROR':
      return 502;
    case 'VLLM_DISABLED':
    case 'VLLM_NOT_READY':
    case 'VLLM_START_FAILED':
    case 'SHUTTING_DOWN':
      return 503;
    case 'UPSTREAM_TIMEOUT':
      return 504;
    case 'CLIENT_GONE':
      return 499; // nginx's "client closed request": never sent, only recorded
    default: {
      const unreachable: never = code;
      throw new Error(`unmapped error code ${String(unreachable)}`);
    }
  }
}

/** The client disconnected: what it waited for is aborted; never sent, recorded as 499. */
export const CLIENT_GONE = new AppError('CLIENT_GONE', 'client went away');
/** Refusals of a request body, worded the same whoever finds them (json-body's readJson, or Fastify: no parser for the type). */
export const TOO_LARGE = new AppError('PAYLOAD_TOO_LARGE', 'request body is larger than the limit (web.body_limit)');
export const NOT_JSON_TYPE = new AppError('UNSUPPORTED_MEDIA_TYPE', 'request body must be JSON (Content-Type: application/json)');

/** Seconds a client is told to wait (Retry-After) on a 503 or 429, unless the error says otherwise. */
const RETRY_AFTER_SECONDS = 5;

/** The machine-readable type of an error code, as clients see it (`upstream_timeout` …). */
export function errorType(code: ErrorCode): string {
  return code.toLowerCase();
}

/** What a client may see of an error: status, type, message — never a stack or an address. */
export function toHttpError(error: AppError): HttpError {
  const status = statusOf(error);
  // A 503 passes, but a permanent one (vllm.enabled: false) is for good: no Retry-After, or clients retry forever.
  const retryAfter = error.retryAfter ?? ((status === 503 && !error.permanent) || status === 429 ? RETRY_AFTER_SECONDS : undefined);
  const allow = error.allow?.join(', ');
  return {
    status,
    type: errorType(error.code),
    message: error.message,
    param: error.param,
    retryAfter,
    ...(allow !== undefined && { allow }),
    ...(error.byState && { byState: true }),
    ...(error.permanent && { permanent: true }),
  };
}

/**
 * The longest path segment routed (Fastify's maxParamLength; its default is 100): the longest
 * LoRA adapter name a load takes, so that its unload (DELETE /admin/lora/NAME) is routed too.
 */
export const MAX_PATH_SEGMENT = 128;

/**
 * Errors of the connection rather than of the application, raised by Node's HTTP parser and
 * request timeout or by Fastify's router: never thrown as an AppError, their status is HTTP's.
 * Known by their `code` (ERR_HTTP_REQUEST_TIMEOUT, HPE_*, FST_ERR_*); framework codes are never shown.
 */
export function transportError(code: unknown): HttpError {
  switch (code) {
    case 'ERR_HTTP_REQUEST_TIMEOUT':
      return toHttpError(new AppError('REQUEST_TIMEOUT', 'the request was not received in time (web.client_timeout); the connection is closed'));
    case 'HPE_HEADER_OVERFLOW':
      return toHttpError(new AppError('REQUEST_HEADERS_TOO_LARGE', 'the request headers are larger than 16 KiB'));
    case 'HPE_CHUNK_EXTENSIONS_OVERFLOW':
      return toHttpError(new AppError('PAYLOAD_TOO_LARGE', 'the chunk extensions of the request body are too large'));
    case 'FST_ERR_BAD_URL':
      return toHttpError(AppError.invalid('the URL path is not valid (bad percent-encoding)'));
    case 'FST_ERR_MAX_PARAM_LENGTH':
      return toHttpError(new AppError('URI_TOO_LONG', `a segment of the URL path is longer than ${MAX_PATH_SEGMENT} characters`));
    case 'FST_ERR_ASYNC_CONSTRAINT':
      return toHttpError(AppError.internal());
    default:
      return toHttpError(AppError.invalid('the request is not valid HTTP'));
  }
}

/**
 * The `type` of OpenAI's error shape for a status: vLLM's names (BadRequestError, NotFoundError,
 * InternalServerError …, the `<Name>Error` of the status), the OpenAI SDK's for 401, 409, 429, and
 * the same pattern for the statuses vLLM does not answer. Error bodies and in-stream error events
 * take them from here alike, so the type always says what the code says.
 */
const OPENAI_TYPES: Record<number, string> = {
  400: 'BadRequestError',
  401: 'AuthenticationError',
  403: 'PermissionDeniedError',
  404: 'NotFoundError',
  405: 'MethodNotAllowedError',
  408: 'RequestTimeoutError',
  409: 'ConflictError',
  413: 'PayloadTooLargeError',
  414: 'URITooLongError',
  422: 'UnprocessableEntityError',
  429: 'RateLimitError',
  431: 'RequestHeaderFieldsTooLargeError',
  503: 'ServiceUnavailableError',
  504: 'TimeoutError',
};

export function openAiType(status: number): string {
  // 500, and 502 (vLLM failed: vLLM's own EngineDeadError is an InternalServerError too).
  return OPENAI_TYPES[status] ?? (status >= 500 ? 'InternalServerError' : 'BadRequestError');
}

/**
 * An error as vLLM answers it on its own routes, where that differs: a body that is not JSON is
 * FastAPI's request validation error there (validate_json_request), a 400, not a 415 (protocol A4).
 */
export function asVllmAnswers(err: HttpError): HttpError {
  if (err.status !== 415) return err;
  return { ...err, status: 400, message: "1 validation error:\n  Unsupported Media Type: Only 'application/json' is allowed", openAiType: 'Bad Request' };
}

/** The shapes an error body takes, by API: the simple envelope, OpenAI's, or a plain one. */
export type ErrorFlavor = 'simple' | 'openai' | 'plain';

export function errorBody(err: HttpError, flavor: ErrorFlavor, requestId: string | null): unknown {
  switch (flavor) {
    case 'simple':
      return {
        request_id: requestId,
        content: null,
        model: null,
        usage: null,
        finish_reason: null,
        error: { type: err.type, message: err.message },
      };
    case 'openai':
      return { error: { message: err.message, type: err.openAiType ?? openAiType(err.status), param: err.param, code: err.status } };
    case 'plain':
      return { error: { type: err.type, message: err.message } };
  }
}

/**
 * What a /v1/chat/completions body asks for: the simple API (`prompt`), OpenAI's chat
 * (`messages`), or neither or both — a 400 that says so.
 */
export function chatBodyKind(body: object): 'simple' | 'openai' | 'both' | 'neither' {
  const prompt = 'prompt' in body;
  const messages = 'messages' in body;
  return prompt ? (messages ? 'both' : 'simple') : messages ? 'openai' : 'neither';
}

/** A request target's path: what comes before its query (a split would cost a V8 runtime call per request). */
export function pathOf(url: string): string {
  const query = url.indexOf('?');
  return query === -1 ? url : url.slice(0, query);
}

/** A CORS preflight: answered without a key, as browsers send none with it. */
export function isPreflight(method: string, headers: IncomingHttpHeaders): boolean {
  return method === 'OPTIONS' && headers.origin !== undefined && headers['access-control-request-method'] !== undefined;
}

/**
 * A request target in origin form: an absolute URL's scheme and host dropped (`POST
 * http://host/v1/responses`, which a server must take, RFC 9112 §3.2.2), the rest as sent.
 */
export function originForm(url: string): string {
  if (url.charCodeAt(0) === 47 /* / */) return url;
  const rest = url.replace(/^[a-z][a-z\d+.-]*:\/\/[^/?#]*/i, '');
  return rest.charCodeAt(0) === 47 ? rest : `/${rest}`;
}

/**
 * The path a request target names, as the router reads it: origin form, no query, percent-escapes
 * decoded (`/v1/respons%65s` is /v1/responses). What is decided by the path (the error shape, the
 * route's kind) is decided on this, however the client spelled it.
 */
export function routePathOf(url: string): string {
  const path = pathOf(originForm(url));
  return path.includes('%') ? decodedPath(path) : path;
}

/**
 * A path with its percent-escapes decoded (`/%61dmin` is `/admin`). When some are malformed (a
 * URL the router refuses), the well-formed ones are still decoded, byte by byte: `/%61dmin/%zz`
 * is still an admin path.
 */
function decodedPath(path: string): string {
  try {
    return decodeURIComponent(path);
  } catch {
    return path.replace(/%[0-9a-f]{2}/gi, (escape) => String.fromCharCode(parseInt(escape.slice(1), 16)));
  }
}

/** The error shape of a route: the simple envelope (`/v1/chat/completions` too when its body has a `prompt`), OpenAI's, or plain. */
export function flavorOf(url: string, body: unknown): ErrorFlavor {
  return flavorOfRoute(routePathOf(url), body);
}

/** flavorOf for a path already read as routed (routePathOf): decoded once. */
export function flavorOfRoute(path: string, body: unknown): ErrorFlavor {
  if (path === '/chat/completions' || path === '/generate') return 'simple';
  if (path === '/v1/chat/completions' && typeof body === 'object' && body !== null && chatBodyKind(body) === 'simple') return 'simple';
  // The OpenAI routes, and vLLM's /tokenize and /detokenize, which answer in the same shape.
  if (path.startsWith('/v1/') || path === '/v1' || path === '/tokenize' || path === '/detokenize') return 'openai';
  return 'plain';
}

