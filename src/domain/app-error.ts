/**
 * The one error type of tide-vllm. Domain and infrastructure throw it with a code;
 * the web layer maps each code to an HTTP status in exactly one place (web/http-error.ts).
 */
export type ErrorCode =
  | 'INVALID_REQUEST' // the client's input is wrong (400)
  | 'UPSTREAM_REJECTED' // vLLM refused the input, e.g. a prompt too long (vLLM's 4xx status)
  | 'NOT_FOUND' // unknown route or resource (404)
  | 'METHOD_NOT_ALLOWED' // a route that takes other methods (405, with the ones it takes)
  | 'REQUEST_TIMEOUT' // the request was not received within web.client_timeout (408)
  | 'PAYLOAD_TOO_LARGE' // body over web.body_limit (413)
  | 'URI_TOO_LONG' // a path segment over 128 characters (414)
  | 'REQUEST_HEADERS_TOO_LARGE' // headers over 16 KiB (431)
  | 'UNSUPPORTED_MEDIA_TYPE' // body is not JSON (415)
  | 'UNAUTHORIZED' // missing or wrong API key (401)
  | 'FORBIDDEN' // a request the service never takes from this sender, key or not (403)
  | 'CONFLICT' // an admin action that the current state forbids (409)
  | 'OVERLOADED' // over web.max_concurrent_requests (429)
  | 'VLLM_DISABLED' // vllm.enabled is false (503)
  | 'VLLM_NOT_READY' // vLLM is starting, restarting, waking or unreachable (503)
  | 'VLLM_START_FAILED' // vLLM could not be brought up: its message is for the operator, and the service stops (503 were it ever answered)
  | 'SHUTTING_DOWN' // the service is draining (503)
  | 'UPSTREAM_TIMEOUT' // vllm.timeout passed (504)
  | 'UPSTREAM_ERROR' // vLLM failed or answered something unreadable (502)
  | 'CLIENT_GONE' // the client disconnected: what it waited for is aborted, nobody sees an answer (recorded as 499)
  | 'INTERNAL'; // a bug (500)

export interface AppErrorOptions {
  /** Seconds a client should wait before retrying (503/429). */
  retryAfter?: number;
  /** HTTP status vLLM answered with, for UPSTREAM_REJECTED. */
  upstreamStatus?: number;
  /** The request parameter at fault, when known (OpenAI's `param`). */
  param?: string | null;
  /** The methods the route takes, for METHOD_NOT_ALLOWED (the Allow header). */
  allow?: readonly string[];
  /**
   * A refusal by the service's state before anything was done (vLLM starting or restarting, the
   * service stopping): a request to retry, not a fault, so it is logged as a warning.
   */
  byState?: boolean;
  /**
   * Retrying cannot help: the service's own configuration is wrong (vLLM refused its key or its
   * model; vllm.enabled: false). Clients are told so (`x-should-retry: false`, which OpenAI's
   * SDKs honour: they retry any 5xx otherwise).
   */
  permanent?: boolean;
  cause?: unknown;
}

export class AppError extends Error {
  readonly retryAfter?: number;
  readonly upstreamStatus?: number;
  readonly param: string | null;
  readonly allow?: readonly string[];
  readonly byState: boolean;
  readonly permanent: boolean;

  constructor(
    readonly code: ErrorCode,
    message: string,
    options: AppErrorOptions = {},
  ) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause });
    this.name = 'AppError';
    this.retryAfter = options.retryAfter;
    this.upstreamStatus = options.upstreamStatus;
    this.param = options.param ?? null;
    this.allow = options.allow;
    this.byState = options.byState ?? false;
    this.permanent = options.permanent ?? false;
  }

  static invalid(message: string, param?: string): AppError {
    return new AppError('INVALID_REQUEST', message, { param });
  }

  /** A bug: the client is told only that the service log has the details. */
  static internal(): AppError {
    return new AppError('INTERNAL', 'internal error; the service log has the details');
  }
}
