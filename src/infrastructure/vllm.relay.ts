import type { IncomingHttpHeaders } from 'node:http';
import { Pool, errors as undiciErrors } from 'undici';
import { AppError } from '../domain/app-error';
import { RETRY_AFTER_SECONDS } from './vllm.client';

/** undici keeps idle sockets a little shorter than uvicorn's 5 s keep-alive, so none is reused as it closes. */
const KEEP_ALIVE_MS = 4_000;
/** Sockets to vLLM at most; well above any sane max_num_seqs, so the pool never queues. */
const MAX_CONNECTIONS = 1024;

/** Response headers of vLLM worth passing on; hop-by-hop and length headers are Node's business. */
const RELAYED_HEADERS = ['content-type', 'x-request-id'] as const;

/** Connection failures that mean vLLM is down or restarting, not that it failed the request. */
const UNREACHABLE = new Set(['ECONNREFUSED', 'ECONNRESET', 'EHOSTUNREACH', 'ENOTFOUND', 'UND_ERR_SOCKET']);

export interface RelayRequest {
  method: 'GET' | 'POST';
  path: string;
  body?: string;
  requestId: string;
  signal: AbortSignal;
}

export interface RelayResponse {
  status: number;
  headers: Record<string, string>;
  body: AsyncIterable<Buffer> & { destroy(err?: Error): unknown };
}

/**
 * The hot path to vLLM: raw bytes over a pool of keep-alive connections (undici), with no
 * parsing of what vLLM answers. VLLMClient (axios) does everything else; this does only relaying,
 * because it runs once per token-carrying event and its cost is the gateway's overhead.
 */
export class VLLMRelay {
  private readonly pool: Pool;

  /** @param apiKey the key vLLM was started with, read at each call (it changes per start) */
  constructor(
    baseUrl: string,
    private readonly timeoutMs: number,
    private readonly apiKey: () => string | undefined = () => undefined,
  ) {
    this.pool = new Pool(baseUrl, {
      connections: MAX_CONNECTIONS,
      keepAliveTimeout: KEEP_ALIVE_MS,
      keepAliveMaxTimeout: KEEP_ALIVE_MS,
      headersTimeout: timeoutMs,
      bodyTimeout: timeoutMs,
    });
  }

  /**
   * Sends the request and resolves with vLLM's status, headers and body stream. `vllm.timeout`
   * bounds the wait for the headers and every pause within the body (between two events).
   */
  async send(req: RelayRequest): Promise<RelayResponse> {
    const headers: Record<string, string> = { 'x-request-id': req.requestId };
    if (req.body !== undefined) headers['content-type'] = 'application/json';
    const key = this.apiKey();
    if (key) headers.authorization = `Bearer ${key}`;
    try {
      const res = await this.pool.request({
        method: req.method,
        path: req.path,
        headers,
        body: req.body,
        signal: req.signal,
      });
      return { status: res.statusCode, headers: pick(res.headers), body: res.body };
    } catch (err) {
      throw this.errorOf(err, req.signal);
    }
  }

  /** What a relay failure means for the client; never an address or a stack. */
  errorOf(err: unknown, signal: AbortSignal | undefined): AppError {
    if (err instanceof AppError) return err;
    if (signal?.aborted && signal.reason instanceof AppError) return signal.reason;
    if (err instanceof undiciErrors.HeadersTimeoutError || err instanceof undiciErrors.BodyTimeoutError) {
      return new AppError('UPSTREAM_TIMEOUT', `vLLM sent nothing for ${this.timeoutMs / 1000} s (vllm.timeout)`);
    }
    const code = (err as NodeJS.ErrnoException)?.code ?? (err as { cause?: NodeJS.ErrnoException })?.cause?.code;
    if (code !== undefined && UNREACHABLE.has(code)) {
      return new AppError('VLLM_NOT_READY', 'vLLM is not reachable', { retryAfter: RETRY_AFTER_SECONDS });
    }
    return new AppError('UPSTREAM_ERROR', 'vLLM failed to answer');
  }

  async close(): Promise<void> {
    await this.pool.destroy();
  }
}

function pick(headers: IncomingHttpHeaders): Record<string, string> {
  const out: Record<string, string> = {};
  for (const name of RELAYED_HEADERS) {
    const value = headers[name];
    if (typeof value === 'string') out[name] = value;
  }
  return out;
}

