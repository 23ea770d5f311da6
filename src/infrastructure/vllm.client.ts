import { Agent, type ClientRequest } from 'node:http';
import type { Duplex } from 'node:stream';
import axios, { AxiosError, type AxiosInstance, type AxiosResponse } from 'axios';
import { AppError } from '../domain/app-error';
import type { TraceContext } from '../domain/chat.entity';

/**
 * How long a keep-alive connection to vLLM may stay idle: a little less than uvicorn's 5 s
 * (VLLM_HTTP_TIMEOUT_KEEP_ALIVE), which uvicorn does not announce in a Keep-Alive header, so no
 * connection is reused just as uvicorn closes it (ECONNRESET).
 */
export const VLLM_IDLE_CONNECTION_MS = 4_000;

/**
 * The idle limit for a vLLM whose uvicorn keeps idle connections `VLLM_HTTP_TIMEOUT_KEEP_ALIVE`
 * seconds (vllm.env; validated there as whole seconds ≥ 1): a second less, or half of one second.
 */
export function idleConnectionMs(env: Readonly<Record<string, string>>): number {
  const seconds = Number(env.VLLM_HTTP_TIMEOUT_KEEP_ALIVE);
  if (!(seconds >= 1)) return VLLM_IDLE_CONNECTION_MS; // unset: uvicorn's default 5 s
  return seconds >= 2 ? (seconds - 1) * 1000 : 500;
}

interface CallOptions {
  requestId?: string;
  signal?: AbortSignal;
  /** Overrides vllm.timeout for this call (probes and admin calls are shorter). */
  timeoutMs?: number;
  /** The caller's trace context, passed on as traceparent and tracestate. */
  trace?: TraceContext | null;
}

interface VllmErrorBody {
  message: string;
  type: string;
  param: string | null;
  code: number | string;
}

/**
 * Talks to one vLLM (or SGLang) server over HTTP with axios: keep-alive connections,
 * every call time-boxed, every failure turned into an AppError with an honest code.
 */
export class VLLMClient {
  private readonly http: AxiosInstance;
  private readonly agent: IdleClosingAgent;
  private engineKey: string | undefined;

  /** @param idleMs how long a keep-alive connection may stay idle (idleConnectionMs) */
  constructor(
    readonly baseUrl: string,
    private readonly timeoutMs: number,
    idleMs = VLLM_IDLE_CONNECTION_MS,
  ) {
    this.agent = new IdleClosingAgent(idleMs);
    this.http = axios.create({
      baseURL: baseUrl,
      httpAgent: this.agent,
      maxRedirects: 0, // vLLM never redirects; following costs time and would hide a misconfiguration
      proxy: false, // an HTTP_PROXY in the environment must never catch loopback traffic to vLLM
      validateStatus: () => true,
      transitional: { clarifyTimeoutError: true, silentJSONParsing: true, forcedJSONParsing: true },
    });
  }

  /** The key vLLM was started with (auto-start with auth on); undefined for none. */
  setApiKey(key: string | undefined): void {
    this.engineKey = key;
  }

  get apiKey(): string | undefined {
    return this.engineKey;
  }

  private authHeaders(): Record<string, string> {
    return this.engineKey ? { authorization: `Bearer ${this.engineKey}` } : {};
  }

  /** POST a JSON body and return the parsed JSON answer of a 2xx; throws AppError otherwise. */
  async postJson<T>(path: string, body: unknown, options: CallOptions = {}): Promise<T> {
    const res = await this.request<unknown>('POST', path, body, options, 'json');
    return expectJson<T>(res);
  }

  async getJson<T>(path: string, options: CallOptions = {}): Promise<T> {
    return expectJson<T>(await this.request<unknown>('GET', path, undefined, options, 'json'));
  }

  /** As getJson, but null when vLLM has no such route (a 404: dev routes without VLLM_SERVER_DEV_MODE). */
  async getJsonIfRouted<T>(path: string, options: CallOptions = {}): Promise<T | null> {
    const res = await this.request<unknown>('GET', path, undefined, options, 'json');
    return res.status === 404 ? null : expectJson<T>(res);
  }

  /** A call whose 2xx body does not matter (vLLM's /sleep, /wake_up answer empty bodies). */
  async call(method: 'GET' | 'POST', path: string, body?: unknown, options: CallOptions = {}): Promise<void> {
    const res = await this.request<unknown>(method, path, body, options, 'json');
    if (!succeeded(res.status)) throw upstreamStatusError(res.status, res.data);
  }

  /** GET a text body (vLLM's /metrics). */
  async getText(path: string, options: CallOptions = {}): Promise<string> {
    const res = await this.request<string>('GET', path, undefined, options, 'text');
    if (!succeeded(res.status)) throw upstreamStatusError(res.status, null);
    return res.data;
  }

  /** GET a path and report only the status; network failures become AppErrors. */
  async status(path: string, options: CallOptions = {}): Promise<number> {
    return (await this.request<unknown>('GET', path, undefined, options, 'text')).status;
  }

  /** The served model ids on /v1/models. */
  async listModels(options: CallOptions = {}): Promise<string[]> {
    return (await this.modelCards(options)).map((card) => card.id);
  }

  /** The models vLLM serves, with the context length of each (`max_model_len` on its card, A3; null when absent). */
  async modelCards(options: CallOptions = {}): Promise<Array<{ id: string; maxModelLen: number | null }>> {
    const body = await this.getJson<{ data?: Array<{ id?: unknown; max_model_len?: unknown }> }>('/v1/models', options);
    if (!Array.isArray(body?.data)) throw new AppError('UPSTREAM_ERROR', 'vLLM answered /v1/models without a model list');
    return body.data.map((card) => ({ id: String(card.id), maxModelLen: typeof card.max_model_len === 'number' ? card.max_model_len : null }));
  }

  close(): void {
    this.agent.destroy();
  }

  private async request<T>(
    method: 'GET' | 'POST',
    path: string,
    body: unknown,
    options: CallOptions,
    responseType: 'json' | 'text',
  ): Promise<AxiosResponse<T>> {
    const timeoutMs = options.timeoutMs ?? this.timeoutMs;
    const headers: Record<string, string> = { ...this.authHeaders() };
    if (options.requestId) headers['x-request-id'] = options.requestId;
    if (options.trace) Object.assign(headers, options.trace);
    try {
      return await this.http.request<T>({
        method,
        url: path,
        data: body,
        headers,
        responseType,
        // axios' timeout is socket inactivity; the signal bounds the whole exchange.
        timeout: timeoutMs,
        signal: anySignal(options.signal, timeoutMs),
      });
    } catch (err) {
      throw toAppError(err, timeoutMs);
    }
  }
}

/**
 * A keep-alive agent that closes a connection once it has been free for `idleMs`. Agent's own
 * `timeout` option is a socket inactivity timeout that also runs while a new connection is being
 * made, where it fires axios' request timeout early; this timer only ever runs on a free socket.
 */
class IdleClosingAgent extends Agent {
  private readonly idleTimers = new WeakMap<Duplex, NodeJS.Timeout>();

  constructor(private readonly idleMs: number) {
    super({ keepAlive: true, maxSockets: Infinity, maxFreeSockets: 256 });
  }

  /** Called as a socket is put in the free pool; false (Node's own verdict) destroys it instead. */
  override keepSocketAlive(socket: Duplex): boolean {
    // @types/node declares void, but Node uses the answer: false destroys the socket.
    if ((super.keepSocketAlive(socket) as unknown) === false) return false;
    // One listener per socket, however often it is reused.
    if (!this.idleTimers.has(socket)) socket.once('close', () => clearTimeout(this.idleTimers.get(socket)));
    this.idleTimers.set(socket, setTimeout(() => socket.destroy(), this.idleMs).unref());
    return true;
  }

  override reuseSocket(socket: Duplex, request: ClientRequest): void {
    clearTimeout(this.idleTimers.get(socket));
    super.reuseSocket(socket, request);
  }
}

function anySignal(signal: AbortSignal | undefined, timeoutMs: number): AbortSignal {
  // Whole milliseconds only (a health_timeout of 2.01 s is 2009.9999999999998 ms); 0 would be no time at all.
  const timeout = AbortSignal.timeout(Math.max(1, Math.round(timeoutMs)));
  return signal ? AbortSignal.any([signal, timeout]) : timeout;
}

function expectJson<T>(res: AxiosResponse<unknown>): T {
  if (!succeeded(res.status)) throw upstreamStatusError(res.status, res.data);
  if (res.data === null || typeof res.data !== 'object') {
    throw new AppError('UPSTREAM_ERROR', 'vLLM answered with a body that is not JSON');
  }
  return res.data as T;
}

/** vLLM's error envelope (current nested form, or the flat form of old vLLM and SGLang), or SGLang's LoRA failure. */
export function readVllmError(body: unknown): VllmErrorBody | null {
  if (body === null || typeof body !== 'object') return null;
  const obj = body as Record<string, unknown>;
  // SGLang's LoRA routes: {"success": false, "error_message": "...", "loaded_adapters": {...}}
  if (obj.success === false && typeof obj.error_message === 'string') {
    return { message: obj.error_message, type: 'BadRequestError', param: null, code: 400 };
  }
  const inner = typeof obj.error === 'object' && obj.error !== null ? (obj.error as Record<string, unknown>) : obj;
  if (typeof inner.message !== 'string') return null;
  return {
    message: inner.message,
    type: typeof inner.type === 'string' ? inner.type : 'BadRequestError',
    param: typeof inner.param === 'string' ? inner.param : null,
    code: typeof inner.code === 'number' || typeof inner.code === 'string' ? inner.code : 400,
  };
}

/** vLLM's statuses about the client's input: its message is passed on with them (UPSTREAM_REJECTED). */
export const REJECTED_STATUSES: ReadonlySet<number> = new Set([400, 404, 413, 422]);

/**
 * Maps a non-2xx answer of vLLM. Only statuses about the client's input carry vLLM's message
 * on; anything else becomes a generic 502 so no internal detail leaks.
 */
export function upstreamStatusError(status: number, body: unknown): AppError {
  const vllmError = readVllmError(body);
  if (REJECTED_STATUSES.has(status) && vllmError) {
    return new AppError('UPSTREAM_REJECTED', vllmError.message, {
      upstreamStatus: status,
      param: vllmError.param,
    });
  }
  if (status === 503) {
    // vLLM not up to it (its engine dead, asleep), or SGLang's full queue (--max-queued-requests): to retry.
    return new AppError('VLLM_NOT_READY', 'vLLM cannot take the request now (HTTP 503: not ready, or its queue is full); retry');
  }
  if (status === 401) {
    // Only a vLLM run by hand can refuse: the one tide-vllm starts gets the key it sends.
    return new AppError('UPSTREAM_ERROR', 'vLLM refused tide-vllm (HTTP 401): vllm.api_key is not set to the key vLLM was started with', { permanent: true });
  }
  return new AppError('UPSTREAM_ERROR', `vLLM failed to answer (HTTP ${status})`);
}

/** Connection failures that mean vLLM is down or restarting (a 503 to retry), not that it failed the request. */
const UNREACHABLE_CODES: ReadonlySet<string> = new Set(['ECONNREFUSED', 'ECONNRESET', 'EHOSTUNREACH', 'ENETUNREACH', 'EPIPE', 'ENOTFOUND', 'EAI_AGAIN']);
/** Of those, the ones of a connection vLLM took and then dropped, the request in it. */
const DROPPED_CODES: ReadonlySet<string> = new Set(['ECONNRESET', 'EPIPE']);

/** The error for a socket error `code` that means vLLM cannot take the request; null for another code. */
export function unreachableError(code: string, cause?: unknown): AppError | null {
  return UNREACHABLE_CODES.has(code) ? vllmUnavailable(DROPPED_CODES.has(code), cause) : null;
}

/** The call failed at the connection (refused, reset, dropped): vLLM gave no answer of its own. */
export function connectionFailed(err: unknown): boolean {
  const code = ((err as Error | undefined)?.cause as NodeJS.ErrnoException | undefined)?.code;
  return code !== undefined && UNREACHABLE_CODES.has(code);
}

/**
 * vLLM cannot take the request (503, with Retry-After: a restart follows a crash): it refused the
 * connection, or (`dropped`) took it and closed it before answering — it stopped or crashed.
 */
export function vllmUnavailable(dropped: boolean, cause?: unknown): AppError {
  const message = dropped ? 'vLLM closed the connection before answering (it stopped or crashed)' : 'vLLM is not reachable';
  return new AppError('VLLM_NOT_READY', message, { cause });
}

/**
 * vLLM's own abort of a generation (`finish_reason: "abort"`, A5): it was put to sleep or pause
 * with mode=abort, or was shutting down. An answer cut short, never to pass for a whole one: a
 * 503 to retry (an error event mid-stream).
 */
export function abortedByVllm(): AppError {
  return new AppError('VLLM_NOT_READY', 'vLLM aborted the generation (it was being put to sleep, paused or stopped); retry');
}

/** Why a request was aborted: the AppError it was aborted with (the client left, the drain ran out). */
export function abortReason(signal: AbortSignal): AppError {
  return signal.reason instanceof AppError ? signal.reason : new AppError('UPSTREAM_ERROR', 'request to vLLM was cancelled');
}

const succeeded = (status: number): boolean => status >= 200 && status < 300;
const timedOut = (timeoutMs: number) => new AppError('UPSTREAM_TIMEOUT', `vLLM did not answer within ${timeoutMs / 1000} s`);

export function toAppError(err: unknown, timeoutMs: number): AppError {
  if (err instanceof AppError) return err;
  if (axios.isCancel(err) || (err instanceof Error && err.name === 'CanceledError')) {
    const signal = (err as AxiosError).config?.signal as AbortSignal | undefined;
    // Aborted on purpose with a reason (the drain ran out): that reason is the answer.
    if (signal?.reason instanceof AppError) return signal.reason;
    if (signal?.reason instanceof DOMException && signal.reason.name === 'TimeoutError') {
      return timedOut(timeoutMs);
    }
    return new AppError('UPSTREAM_ERROR', 'request to vLLM was cancelled', { cause: err });
  }
  const code = (err as AxiosError)?.code;
  if (code === 'ETIMEDOUT' || code === 'ECONNABORTED') {
    return timedOut(timeoutMs);
  }
  const unreachable = code === undefined ? null : unreachableError(code, err);
  if (unreachable) return unreachable;
  return new AppError('UPSTREAM_ERROR', 'vLLM failed to answer', { cause: err });
}

export function parseJsonOrNull(text: string): unknown {
  try {
    return JSON.parse(text);
  } catch {
    return null;
  }
}
