import { writeSync } from 'node:fs';
import type { IncomingHttpHeaders, IncomingMessage } from 'node:http';
import { setTimeout as sleep } from 'node:timers/promises';
import { type Params, PinoLogger } from 'nestjs-pino';
import { type DestinationStream, type Logger as Pino, destination } from 'pino';
import type { LoggingConfig, TideConfig } from '../config/config.schema';
import type { TraceContext } from '../domain/chat.entity';
import { newRequestId } from '../domain/chat.factory';
import { traceLines } from '../infrastructure/vllm.relay';
import type { RequestOutcome } from './request-outcome';
import { pathOf } from './http-error';

const PROBE_PATHS = new Set(['/health', '/ready', '/metrics']);

/**
 * The request id: the client's X-Request-Id when it is safe to echo, else a fresh id (16 hex digits, as vLLM makes them).
 * Fastify asks for it once per request (genReqId); OpenAiProxy asks before Fastify sees it.
 */
export function requestIdFor(req: IncomingMessage): string {
  const handedOver = req.tideHandedOver; // OpenAiProxy gave it one already
  if (handedOver) return handedOver.requestId;
  const header = req.headers['x-request-id'];
  return typeof header === 'string' && isRequestId(header) ? header : newRequestId();
}

/**
 * The id of a request relayed to vLLM, in vLLM's order: the client's X-Request-Id, else the
 * body's request_id, else `fallback` (a fresh one). vLLM gets it, so its ids (`chatcmpl-<id>`)
 * are what they would be without tide-vllm in between.
 */
export function relayedRequestId(headers: IncomingHttpHeaders, body: unknown, fallback: string): string {
  const header = headers['x-request-id'];
  return typeof header === 'string' && isRequestId(header) ? header : (bodyRequestId(body) ?? fallback);
}

/** A body's own request_id, when it is safe to echo. */
export function bodyRequestId(body: unknown): string | undefined {
  const fromBody = (body as { request_id?: unknown } | undefined)?.request_id;
  return typeof fromBody === 'string' && isRequestId(fromBody) ? fromBody : undefined;
}

/**
 * A request id that is safe to pass on and echo in a header: printable ASCII, spaces inside it
 * (a header value's ends are trimmed), at most 1024 characters. vLLM takes any id; this keeps all
 * a client is likely to send (`req 42`, a 200-character trace id) as vLLM would, and refuses only
 * what cannot go into a header, or would swell every log line.
 */
export const REQUEST_ID = /^[\x21-\x7e](?:[\x20-\x7e]{0,1022}[\x21-\x7e])?$/;
export const REQUEST_ID_RULE = '1 to 1024 printable ASCII characters, not starting or ending with a space';

function isRequestId(value: string): boolean {
  return REQUEST_ID.test(value);
}

/** W3C Trace Context: a traceparent's four fields (a version after `00` may add more). */
const TRACEPARENT = /^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}(-[\x21-\x7e]*)?$/;
const TRACEPARENT_00_LENGTH = 55;

function isTraceparent(value: string): boolean {
  if (!TRACEPARENT.test(value) || value.startsWith('ff-')) return false; // ff: an invalid version
  if (value.startsWith('00-') && value.length !== TRACEPARENT_00_LENGTH) return false;
  return !/^0+$/.test(value.slice(3, 35)) && !/^0+$/.test(value.slice(36, 52)); // all-zero ids are invalid
}

/** A tracestate list: visible ASCII, spaces and tabs, within the spec's 512-character budget. */
const TRACESTATE = /^[\x20-\x7e\t]{1,512}$/;

/**
 * The client's trace context, for vLLM (null without a valid traceparent), so vLLM's
 * OpenTelemetry spans (`--otlp-traces-endpoint`) join the client's trace as they would without
 * tide-vllm in between. A malformed traceparent is dropped, as the spec says, and tracestate with it.
 */
export function traceContext(headers: IncomingHttpHeaders): TraceContext | null {
  const parent = headers.traceparent;
  if (typeof parent !== 'string' || !isTraceparent(parent)) return null;
  const state = headers.tracestate; // Node joins repeated tracestate headers with ", ", as the spec allows
  return typeof state === 'string' && TRACESTATE.test(state) ? { traceparent: parent, tracestate: state } : { traceparent: parent };
}

/** traceContext as the relay's header lines (empty without one). */
export function traceHeaders(headers: IncomingHttpHeaders): string {
  return traceLines(traceContext(headers));
}

/**
 * nestjs-pino as the application logger. Its per-request pino-http middleware is left out
 * (`forRoutes: []`): it cost a quarter of a relayed request (two child loggers and an
 * AsyncLocalStorage scope each); AccessLog writes the one line per request instead.
 */
export function loggerOptions(config: TideConfig): Params {
  return {
    pinoHttp: [
      {
        level: config.logging.level,
        // Keys never reach the log.
        redact: ['req.headers.authorization', 'req.headers["x-api-key"]'],
      },
      stdoutStream(),
    ],
    forRoutes: [],
  };
}

/**
 * The most of the log held in memory while stdout takes it slower than it comes (a reader that
 * stalls): lines past it are dropped, rather than memory growing without bound.
 */
const LOG_BUFFER_BYTES = 16 * 1024 * 1024;
/** How often flushLogs looks whether the lines held have reached stdout. */
const FLUSH_POLL_MS = 20;

/** stdout as pino writes it by default, one stream for both of nestjs-pino's loggers; made once. */
let stdout: (ReturnType<typeof destination> & { _len?: number; _writing?: boolean }) | null = null;
/** stopLogging ran: nothing more is written, and nothing held is waited for. */
let loggingStopped = false;

function stdoutStream(): DestinationStream {
  if (stdout === null) {
    stdout = destination({ dest: 1, maxLength: LOG_BUFFER_BYTES });
    // pino swallows EPIPE only; any other failure (EIO from a terminal that hung up, ENOSPC) would
    // be an uncaught exception: a service that cannot log must still serve and stop cleanly.
    stdout.on('error', stopLogging);
  }
  return stdout;
}

/** Logging stops, as pino itself does on EPIPE: nothing more is written, or flushed at exit. */
function stopLogging(): void {
  loggingStopped = true;
  const nothing = () => undefined;
  if (stdout !== null) Object.assign(stdout, { write: nothing, flushSync: nothing, end: nothing, destroy: nothing });
}

/**
 * Waits, up to `timeoutMs`, for the log lines still held to reach stdout; what is left then is
 * dropped (pino's own flush at exit would wait for a reader that takes nothing for ever). False
 * when a write to stdout is still stuck then: it blocks a libuv thread, which an exit joins, so
 * the process could not exit.
 */
export async function flushLogs(timeoutMs: number): Promise<boolean> {
  const deadline = Date.now() + timeoutMs;
  while (stdout !== null && !loggingStopped && ((stdout._len ?? 0) > 0 || stdout._writing === true)) {
    if (Date.now() >= deadline) {
      const stuck = stdout._writing === true;
      stopLogging();
      return !stuck;
    }
    await sleep(FLUSH_POLL_MS);
  }
  return true;
}

/**
 * After a SIGHUP from a terminal that closed (the ssh session ended), every write to it fails
 * with EIO, and pino's flush at exit retries a failed write forever: tide-vllm would stop vLLM
 * and never exit. If stdout is such a terminal, logging stops before the shutdown logs anything.
 */
export function stopLoggingIfStdoutGone(): void {
  try {
    writeSync(1, ''); // fails (EIO) on a terminal that hung up
  } catch {
    stopLogging();
  }
}

/**
 * One JSON line per request: request_id, method, url, route, status, duration and tokens, and
 * for a failure the error's type (and, when it failed on this side, its message); never the
 * prompt or the answer unless logging.log_bodies. Probes are skipped unless
 * logging.access_log_probes. Nothing is built when the line's level is disabled.
 */
export class AccessLog {
  private logger: Pino | null = null;

  constructor(private readonly logging: LoggingConfig) {}

  record(req: IncomingMessage, requestId: string, status: number, ms: number, outcome: RequestOutcome | undefined): void {
    const logger = (this.logger ??= PinoLogger.root.child({ context: 'access' }));
    // A stream that failed midway keeps its 200, but is logged as the failure it is. A refusal by
    // the service's state (vLLM starting, restarting, the service stopping) is no fault: the state
    // change is logged once, and a busy service's every refusal at error would bury real faults.
    const failed = outcome?.refusedByState !== true && (status >= 500 || outcome?.errorMessage !== undefined);
    const level = failed ? 'error' : status >= 400 ? 'warn' : 'info';
    if (!logger.isLevelEnabled(level)) return;
    const url = req.url ?? '/';
    const path = pathOf(url);
    if (!this.logging.access_log_probes && PROBE_PATHS.has(path)) return;
    logger[level](
      {
        request_id: outcome?.requestId ?? requestId,
        method: req.method,
        url,
        route: outcome?.route,
        status,
        duration_ms: Math.round(ms * 10) / 10,
        ...(outcome?.usage ? { tokens: { prompt: outcome.usage.prompt_tokens, completion: outcome.usage.completion_tokens } } : {}),
        ...(outcome?.errorType ? { error: outcome.errorType } : {}),
        ...(outcome?.errorMessage ? { error_message: outcome.errorMessage } : {}),
        ...(this.logging.log_bodies ? { body: outcome?.body, completion: outcome?.completion } : {}),
      },
      'request completed',
    );
  }
}
