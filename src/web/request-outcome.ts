import type { ServerResponse } from 'node:http';
import type { TokenUsage } from '../domain/chat.entity';
import type { HttpError } from './http-error';

/** What a request leaves behind for the metrics and the access log, set by whoever answers it. */
export interface RequestOutcome {
  usage?: TokenUsage;
  /** When the first stream event went out (ms, performance.now()). */
  firstEventAt?: number;
  /** The error type of an error answer (`upstream_timeout` …). */
  errorType?: string;
  /** Why an answer failed on this side (a 5xx, or a stream cut midway by one), for the access log. */
  errorMessage?: string;
  /** The answer was a refusal by the service's state (HttpError's byState): a warning, not an error. */
  refusedByState?: boolean;
  /** The request id the answer carries (on the simple API a body's request_id wins over X-Request-Id; relayed, X-Request-Id wins, as in vLLM). */
  requestId?: string;
  /** The route pattern that matched (`/v1/chat/completions`), for the access log. */
  route?: string;
  /** Request body and answer text: only recorded with logging.log_bodies. */
  body?: unknown;
  completion?: string;
}

declare module 'http' {
  interface ServerResponse {
    tideOutcome?: RequestOutcome;
  }
}

/** The record of one response: called by the code that answers (errors, streams, usage). */
export function outcomeOf(res: ServerResponse): RequestOutcome {
  return (res.tideOutcome ??= {});
}

/** An error answer's type, and, when it failed on this side (a 5xx type), why: for the metrics and the access log. */
export function noteError(res: ServerResponse, http: HttpError): void {
  const outcome = outcomeOf(res);
  outcome.errorType = http.type;
  // A client's own mistake (or its leaving) is told by its type; what failed here, also by its message.
  if (http.status >= 500) outcome.errorMessage = http.message;
  if (http.byState) outcome.refusedByState = true;
}
