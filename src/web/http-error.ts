import { AppError, type ErrorCode } from '../domain/app-error';

export interface HttpError {
  status: number;
  /** Machine-readable type: snake case of the code (`invalid_request`, `vllm_not_ready` …). */
  type: string;
  message: string;
  param: string | null;
  retryAfter?: number;
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
    case 'NOT_FOUND':
      return 404;
    case 'CONFLICT':
      return 409;
    case 'PAYLOAD_TOO_LARGE':
      return 413;
    case 'UNSUPPORTED_MEDIA_TYPE':
      return 415;
    case 'OVERLOADED':
      return 429;
    case 'INTERNAL':
      return 500;
    case 'UPSTREAM_ERROR':
      return 502;
    case 'VLLM_DISABLED':
    case 'VLLM_NOT_READY':
    case 'SHUTTING_DOWN':
      return 503;
    case 'UPSTREAM_TIMEOUT':
      return 504;
    default: {
      const unreachable: never = code;
      throw new Error(`unmapped error code ${String(unreachable)}`);
    }
  }
}

/** What a client may see of an error: status, type, message — never a stack or an address. */
export function toHttpError(error: AppError): HttpError {
  const status = statusOf(error);
  const retryAfter = error.retryAfter ?? (status === 503 || status === 429 ? 5 : undefined);
  return { status, type: error.code.toLowerCase(), message: error.message, param: error.param, retryAfter };
}

/** OpenAI's (and vLLM's) type names, so SDKs raise their typed errors. */
function openAiType(status: number): string {
  switch (status) {
    case 400:
      return 'BadRequestError';
    case 401:
      return 'AuthenticationError';
    case 404:
      return 'NotFoundError';
    case 409:
      return 'ConflictError';
    case 413:
      return 'PayloadTooLargeError';
    case 415:
      return 'UnsupportedMediaTypeError';
    case 422:
      return 'UnprocessableEntityError';
    case 429:
      return 'RateLimitError';
    case 503:
      return 'ServiceUnavailableError';
    case 504:
      return 'TimeoutError';
    default:
      return status >= 500 ? 'InternalServerError' : 'BadRequestError';
  }
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
      return { error: { message: err.message, type: openAiType(err.status), param: err.param, code: err.status } };
    case 'plain':
      return { error: { type: err.type, message: err.message } };
  }
}

/** Simple-envelope routes; `/v1/chat/completions` is one too when its body has a `prompt`. */
export function flavorOf(url: string, body: unknown): ErrorFlavor {
  const path = url.split('?', 1)[0];
  const hasPrompt = typeof body === 'object' && body !== null && 'prompt' in body && !('messages' in body);
  if (path === '/chat/completions' || path === '/generate') return 'simple';
  if (path === '/v1/chat/completions' && hasPrompt) return 'simple';
  // The OpenAI routes, and vLLM's /tokenize and /detokenize, which answer in the same shape.
  if (path.startsWith('/v1/') || path === '/v1' || path === '/tokenize' || path === '/detokenize') return 'openai';
  return 'plain';
}

export { AppError };
