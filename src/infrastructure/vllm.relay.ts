import type { IncomingHttpHeaders } from 'node:http';
import { type Dispatcher, Pool, errors as undiciErrors } from 'undici';
import { AppError } from '../domain/app-error';
import { RETRY_AFTER_SECONDS } from './vllm.client';

/** undici keeps idle sockets a little shorter than uvicorn's 5 s keep-alive, so none is reused as it closes. */
const KEEP_ALIVE_MS = 4_000;
/** Sockets to vLLM at most; well above any sane max_num_seqs, so the pool never queues. */
const MAX_CONNECTIONS = 1024;

/** Connection failures that mean vLLM is down or restarting, not that it failed the request. */
const UNREACHABLE = new Set(['ECONNREFUSED', 'ECONNRESET', 'EHOSTUNREACH', 'ENOTFOUND', 'UND_ERR_SOCKET']);

export interface RelayRequest {
  method: 'GET' | 'POST';
  path: string;
  body?: string;
  requestId: string;
}

/** Where vLLM's answer goes, piece by piece, as it arrives. */
export interface RelaySink {
  onStart(status: number, headers: IncomingHttpHeaders): void;
  /** Returns false when the client cannot take more now; vLLM is then paused until `resume()`. */
  onData(chunk: Buffer, resume: () => void): boolean;
  onEnd(): void;
  /** Before onStart: vLLM could not be reached or did not answer; after: the body failed midway. */
  onError(error: AppError): void;
}

/**
 * The hot path to vLLM: raw bytes over a pool of keep-alive connections (undici's dispatch API),
 * handed to a sink as they arrive — no stream objects, no async iteration, no parsing of what vLLM
 * answers. It runs once per token-carrying event, so its cost is the gateway's overhead.
 * VLLMClient (axios) does everything else.
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
      // vllm.timeout bounds the wait for vLLM's headers and every pause within its body.
      headersTimeout: timeoutMs,
      bodyTimeout: timeoutMs,
    });
  }

  /**
   * Sends the request; the sink hears of everything that follows, ending in exactly one onEnd or
   * onError. Returns `abort`, which ends the request to vLLM (the client left, or the drain ran
   * out) so vLLM stops generating; the sink then gets onError with that reason.
   */
  send(req: RelayRequest, sink: RelaySink): (reason: Error) => void {
    const headers: Record<string, string> = { 'x-request-id': req.requestId };
    if (req.body !== undefined) headers['content-type'] = 'application/json';
    const key = this.apiKey();
    if (key) headers.authorization = `Bearer ${key}`;

    let controller: Dispatcher.DispatchController | null = null;
    let abortedWith: Error | null = null;
    const handler: Dispatcher.DispatchHandler = {
      onRequestStart: (c) => {
        controller = c;
        if (abortedWith) c.abort(abortedWith);
      },
      onResponseStart: (_c, status, responseHeaders) => sink.onStart(status, responseHeaders),
      onResponseData: (c, chunk) => {
        if (!sink.onData(chunk, () => c.resume())) c.pause();
      },
      onResponseEnd: () => sink.onEnd(),
      onResponseError: (_c, err) => sink.onError(this.errorOf(err)),
    };
    this.pool.dispatch({ method: req.method, path: req.path, headers, body: req.body }, handler);
    return (reason) => {
      abortedWith ??= reason;
      controller?.abort(reason);
    };
  }

  /** What a relay failure means for the client; never an address or a stack. */
  errorOf(err: unknown): AppError {
    if (err instanceof AppError) return err; // an abort, with its reason
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
