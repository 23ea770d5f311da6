import type { IncomingHttpHeaders } from 'node:http';
import { connect, type Socket } from 'node:net';
import { Logger } from '@nestjs/common';
import { AppError } from '../domain/app-error';
import type { TraceContext } from '../domain/chat.entity';
import { VLLM_IDLE_CONNECTION_MS, unreachableError, vllmUnavailable } from './vllm.client';

/**
 * A connection is reused only this long before the idle limit vLLM's `Keep-Alive: timeout=N`
 * names (uvicorn sends none; a proxy in front of a manual-mode vLLM may): Node's agent keeps the
 * same margin, so a request is not sent on a connection the server is closing.
 */
const KEEP_ALIVE_MARGIN_MS = 1_000;
const RELAY_LOG = new Logger('VLLMRelay');
/** A response head larger than this is not vLLM's: the connection is dropped. */
const MAX_HEAD_BYTES = 64 * 1024;
/** A chunk larger than this (1 TiB) is not vLLM's. */
const MAX_CHUNK_BYTES = 2 ** 40;
/** Hex digits of a chunk size, leading zeros included. */
const MAX_SIZE_DIGITS = 16;
/**
 * The one buffer every connection reads into. Reads are handled one at a time, so a sink gets a
 * view of it, valid during onData only: a sink copies what it keeps.
 */
const READ_BUFFER = Buffer.allocUnsafe(64 * 1024);
/**
 * The sweep that enforces vllm.timeout runs every tenth of it, within these bounds. The
 * supervisor's hang check allows for the longest period (its `+ 1` s).
 */
const SWEEP_MIN_MS = 10;
const SWEEP_MAX_MS = 1_000;
/** TCP keep-alive probes on an idle connection to vLLM start after this long. */
const TCP_KEEPALIVE_DELAY_MS = 60_000;
/**
 * A request up to this many characters is kept until vLLM's answer begins, to be sent again
 * should the pooled connection it went out on turn out closed (Exchange.request); a longer one is not.
 */
const RESENDABLE_CHARS = 64 * 1024;
/**
 * Only a close this soon after the request was sent is taken for the keep-alive race (vLLM closed
 * the connection idle as the request left): later, vLLM may have taken the request and begun to
 * generate (a non-streamed answer's head comes only at its end), and it is not sent twice.
 */
const RESEND_WINDOW_MS = KEEP_ALIVE_MARGIN_MS;

/** A trace context as header lines of a request head (empty for none). */
export function traceLines(trace: TraceContext | null): string {
  if (trace === null) return '';
  return trace.tracestate === undefined ? `traceparent: ${trace.traceparent}\r\n` : `traceparent: ${trace.traceparent}\r\ntracestate: ${trace.tracestate}\r\n`;
}

export interface RelayRequest {
  method: 'GET' | 'POST';
  path: string;
  body?: string;
  requestId: string;
  /** Header lines to pass on as they are (the client's trace context), each ending in CRLF; checked by the caller. */
  headers?: string;
}

/** A request whose sink asked for a pause. */
export interface Resumable {
  /** Reading vLLM's answer goes on (at once if called before onData returned false). */
  resume(): void;
}

/** Where vLLM's answer goes, piece by piece, as it arrives. */
export interface RelaySink {
  onStart(status: number, headers: IncomingHttpHeaders): void;
  /**
   * `chunk` is valid during the call only (it is read into again): copy what you keep. Returns
   * false when the client cannot take more now; vLLM is then paused until `request.resume()`.
   * (A method, not a closure per request: see Exchange.)
   */
  onData(chunk: Buffer, request: Resumable): boolean;
  onEnd(): void;
  /** Before onStart: vLLM could not be reached or did not answer; after: the body failed midway. */
  onError(error: AppError): void;
}

/**
 * The hot path to vLLM: HTTP/1.1 over a pool of keep-alive connections, the answer handed to a
 * sink as it arrives, without parsing what vLLM says. It runs once per token-carrying event, so
 * its cost is the gateway's overhead. VLLMClient (axios) does everything else.
 *
 * Written for this one job rather than taken from undici: a socket read goes straight to the
 * parser (`onread`: no stream object, no per-read allocation by Node, no tick scheduled), and the
 * parser only frames the body (status line, headers, Content-Length or chunked). Against undici,
 * in the same minutes: −30% CPU per fast-streamed event, −18% per paced token (README,
 * "Performance").
 */
export class VLLMRelay {
  private readonly host: string;
  private readonly port: number;
  /** The request line's end and Host header, the same for every request. */
  private readonly hostLine: string;
  /** Most recently used last: reused first, so the others age out. */
  private readonly idle: Connection[] = [];
  private readonly connections = new Set<Connection>();
  private readonly sweeper: NodeJS.Timeout;
  private closed = false;

  /**
   * @param apiKey the key vLLM was started with, read at each call (it changes per start)
   * @param keepAliveMs how long a connection may stay idle (tests shorten it)
   */
  constructor(
    baseUrl: string,
    private readonly timeoutMs: number,
    private readonly apiKey: () => string | undefined = () => undefined,
    private readonly keepAliveMs = VLLM_IDLE_CONNECTION_MS,
  ) {
    const url = new URL(baseUrl);
    if (url.protocol !== 'http:') throw new Error(`the relay speaks plain HTTP to vLLM, not ${url.protocol} (${baseUrl})`);
    this.host = url.hostname.replace(/^\[(.*)\]$/, '$1');
    this.port = Number(url.port || 80);
    this.hostLine = ` HTTP/1.1\r\nhost: ${url.host}\r\n`;
    // vllm.timeout bounds the wait for vLLM's head and every pause within its body: checked by
    // one timer for all requests, not one timer per request (re-armed at each event).
    const period = Math.min(SWEEP_MAX_MS, Math.max(SWEEP_MIN_MS, Math.floor(timeoutMs / 10)));
    this.sweeper = setInterval(() => this.sweep(), period).unref();
  }

  /**
   * Sends the request; the sink hears of everything that follows, ending in exactly one onEnd or
   * onError. Returns `abort`, which ends the request to vLLM (the client left, or the drain ran
   * out) by closing its connection, so vLLM stops generating; the sink then gets onError with
   * that reason.
   */
  send(req: RelayRequest, sink: RelaySink): (reason: Error) => void {
    if (this.closed) {
      process.nextTick(() => safely(() => sink.onError(notReachable())));
      return () => undefined;
    }
    const request = this.head(req) + (req.body ?? '');
    const exchange = new Exchange(sink);
    this.acquire().start(exchange, request);
    return (reason) => exchange.connection?.abort(exchange, reason);
  }

  /**
   * Sends `exchange` once more, on a new connection: the pooled one it went out on was closed
   * before a byte of an answer came, within RESEND_WINDOW_MS of the request (vLLM closed it idle
   * as the request left, or after an answer that said nothing of closing): the keep-alive race.
   */
  resend(exchange: Exchange, request: string): void {
    if (this.closed) return void safely(() => exchange.sink.onError(notReachable()));
    RELAY_LOG.debug('a pooled connection to vLLM closed as a request went out on it: sent again on a new one');
    this.open().start(exchange, request);
  }

  /** What a relay failure means for the client; never an address or a stack. */
  errorOf(err: unknown): AppError {
    if (err instanceof AppError) return err; // an abort, with its reason
    const code = (err as NodeJS.ErrnoException)?.code;
    return (code !== undefined && unreachableError(code)) || new AppError('UPSTREAM_ERROR', 'vLLM failed to answer');
  }

  /** Closes every connection: requests in flight fail. */
  async close(): Promise<void> {
    this.closed = true;
    clearInterval(this.sweeper);
    const closing = [...this.connections].map((c) => c.destroy());
    await Promise.all(closing);
  }

  /** Connections call these. */
  release(connection: Connection): void {
    connection.idleSince = performance.now();
    this.idle.push(connection);
  }

  /** How long `connection` may stay idle: the relay's limit, or less if vLLM said so. */
  idleLimit(connection: Connection): number {
    return Math.min(this.keepAliveMs, connection.serverIdleMs);
  }

  forget(connection: Connection): void {
    this.connections.delete(connection);
    const at = this.idle.indexOf(connection);
    if (at !== -1) this.idle.splice(at, 1);
  }

  private acquire(): Connection {
    const now = performance.now();
    for (let c = this.idle.pop(); c !== undefined; c = this.idle.pop()) {
      if (c.usable() && now - c.idleSince < this.idleLimit(c)) return c;
      void c.destroy(); // closed by vLLM, or idle too long: vLLM may be closing it right now
    }
    return this.open();
  }

  private open(): Connection {
    const connection = new Connection(this, this.host, this.port);
    this.connections.add(connection);
    return connection;
  }

  private head(req: RelayRequest): string {
    const key = this.apiKey();
    // Both come checked (a request id's characters, the key's), but a line break must never reach a head.
    if (/[\r\n]/.test(req.requestId + req.path + (key ?? ''))) throw new Error('refusing to send a line break in a request head to vLLM');
    let head = `${req.method} ${req.path}${this.hostLine}x-request-id: ${req.requestId}\r\n`;
    if (key) head += `authorization: Bearer ${key}\r\n`;
    if (req.headers) head += req.headers;
    if (req.body !== undefined) head += `content-type: application/json\r\ncontent-length: ${Buffer.byteLength(req.body)}\r\n`;
    return head + '\r\n';
  }

  private sweep(): void {
    const now = performance.now();
    for (const connection of this.connections) connection.check(now, this.timeoutMs, this.idleLimit(connection));
  }
}

/**
 * One request and its answer. It is what sinks resume, through a method: a closure made per
 * request for it (capturing the request) sent V8's young generation into promoting about half of
 * every scavenge, at about 1.5× the CPU per request: the failure described for TrafficGate's list.
 */
class Exchange implements Resumable {
  paused = false;
  /** Something arrived since the last sweep. */
  active = true;
  /** When the last sweep saw activity (or the request was sent). */
  since = performance.now();
  /** What was read but not yet handed over when the sink asked for a pause. */
  backlog: Buffer | null = null;
  /** The connection closed while paused: noticed once the backlog is handed over. */
  closed = false;
  /** The sink called `resume` while taking a piece, before it could return false. */
  resumedEarly = false;
  /** Set when sent: the connection it was sent on, and when (performance.now()). */
  connection: Connection | null = null;
  sentAt = 0;
  /**
   * The request as sent on a reused connection, until vLLM's answer begins: to be sent again
   * should that connection turn out closed (VLLMRelay.resend). Null otherwise: on a new
   * connection (its failure is vLLM's), once sent again, or longer than RESENDABLE_CHARS.
   */
  request: string | null = null;
  constructor(readonly sink: RelaySink) {}

  /** Resumes this request, never a later one on the same connection. */
  resume(): void {
    this.connection?.onResume(this);
  }
}

enum Framing {
  Head,
  Length,
  /** No length and not chunked: the body ends when vLLM closes the connection. */
  UntilClose,
  ChunkSize,
  /** Whitespace after a chunk size: an extension or the line's end must follow. */
  ChunkSizeSpace,
  ChunkExtension,
  ChunkSizeLf,
  ChunkData,
  ChunkDataCr,
  ChunkDataLf,
  Trailers,
}

/** A keep-alive HTTP/1.1 connection to vLLM, one exchange at a time. */
class Connection {
  idleSince = 0;
  /** How long vLLM keeps this connection idle, less the margin (its last `Keep-Alive: timeout=N`). */
  serverIdleMs = Infinity;
  private readonly socket: Socket;
  private exchange: Exchange | null = null;
  private framing = Framing.Head;
  /** The response head read so far, in the pieces it came in (joined once whole: see readHead). */
  private readonly headParts: string[] = [];
  private headLength = 0;
  /** The head's last characters (up to 3): a blank line may straddle two reads. */
  private headTail = '';
  /** Body bytes left (Length) or bytes of the current chunk left (ChunkData). */
  private remaining = 0;
  private sizeDigits = 0;
  /** Characters of the trailer line being read. */
  private lineLength = 0;
  /**
   * Bytes of chunk extensions and trailers since the last chunk's data: capped as a head is
   * (MAX_HEAD_BYTES), so a server sending an endless extension cannot hold the request forever
   * (vllm.timeout measures only silence).
   */
  private framingBytes = 0;
  private keepAlive = true;
  /** A 1xx came: vLLM has answered something. */
  private interim = false;
  /** Reading is stopped (a sink asked for a pause): resumed before the connection is reused. */
  private readStopped = false;
  /** vLLM took the connection: closed before an answer, it dropped the request in it. */
  private connected = false;
  /** It carried an answer already: back from the pool, it may have been closed meanwhile. */
  private reused = false;

  constructor(
    private readonly relay: VLLMRelay,
    host: string,
    port: number,
  ) {
    this.socket = connect({ host, port, noDelay: true, keepAlive: true, keepAliveInitialDelay: TCP_KEEPALIVE_DELAY_MS, onread: { buffer: READ_BUFFER, callback: (n) => this.onRead(n) } });
    this.socket.on('error', (err) => this.onSocketError(err));
    this.socket.on('close', () => this.onClose());
    this.socket.once('connect', () => (this.connected = true));
  }

  usable(): boolean {
    return !this.socket.destroyed && this.socket.writable;
  }

  start(exchange: Exchange, request: string): void {
    this.exchange = exchange;
    // Kept for a second try on a reused connection, unless this is the second try.
    exchange.request = this.reused && exchange.connection === null && request.length <= RESENDABLE_CHARS ? request : null;
    if (exchange.request !== null) exchange.sentAt = performance.now(); // read only to judge a resend
    exchange.connection = this;
    this.framing = Framing.Head;
    this.clearHead();
    this.framingBytes = 0;
    this.keepAlive = true;
    this.interim = false;
    this.socket.write(request);
  }

  abort(exchange: Exchange, reason: Error): void {
    if (exchange !== this.exchange) return; // done already
    this.fail(this.relay.errorOf(reason));
  }

  /** Closes the connection; a request in flight fails with `reason`. */
  destroy(reason: AppError = notReachable()): Promise<void> {
    const closed = this.socket.closed ? Promise.resolve() : new Promise<void>((resolve) => this.socket.once('close', () => resolve()));
    if (this.exchange !== null) this.fail(reason);
    else this.socket.destroy();
    return closed;
  }

  /** The sweep: vllm.timeout for the request in flight, the keep-alive limit when idle. */
  check(now: number, timeoutMs: number, keepAliveMs: number): void {
    const exchange = this.exchange;
    if (exchange === null) {
      if (now - this.idleSince >= keepAliveMs) void this.destroy();
      return;
    }
    if (exchange.active || exchange.paused) {
      exchange.active = false;
      exchange.since = now;
    } else if (now - exchange.since >= timeoutMs) {
      this.fail(new AppError('UPSTREAM_TIMEOUT', `vLLM sent nothing for ${timeoutMs / 1000} s (vllm.timeout)`));
    }
  }

  private onRead(n: number): true {
    const exchange = this.exchange;
    if (exchange === null) {
      // Bytes nobody asked for: the connection is out of step, never to be reused.
      this.socket.destroy();
      return true;
    }
    exchange.active = true;
    this.consumeSafely(exchange, READ_BUFFER, n);
    return true;
  }

  /** A sink that throws must not take the process down (this runs in a socket callback): its request fails. */
  private consumeSafely(exchange: Exchange, data: Buffer, n: number): void {
    try {
      this.consume(exchange, data, 0, n);
    } catch (err) {
      logBug(err);
      if (this.exchange === exchange) this.fail(AppError.internal());
      else this.socket.destroy();
    }
  }

  onResume(exchange: Exchange): void {
    if (this.exchange !== exchange) return; // done: the connection may serve another request now
    if (!exchange.paused) {
      exchange.resumedEarly = true; // during onData, before it returned false
      return;
    }
    exchange.paused = false;
    exchange.active = true;
    const backlog = exchange.backlog;
    exchange.backlog = null;
    if (backlog !== null) this.consumeSafely(exchange, backlog, backlog.length);
    if (this.exchange !== exchange || exchange.paused) return;
    if (exchange.closed) this.onClose();
    else this.resumeReading();
  }

  private resumeReading(): void {
    if (!this.readStopped) return;
    this.readStopped = false;
    this.socket.resume();
  }

  /** Parses what vLLM sent, `data[p, n)`, handing body bytes to the sink as they come. */
  private consume(exchange: Exchange, data: Buffer, p: number, n: number): void {
    const sink = exchange.sink;
    while (p < n) {
      switch (this.framing) {
        case Framing.Head: {
          p = this.readHead(data, p, n);
          if (p < 0 || this.exchange !== exchange) return;
          continue;
        }
        case Framing.Length:
        case Framing.UntilClose:
        case Framing.ChunkData: {
          let take = n - p;
          if (this.framing !== Framing.UntilClose) {
            take = Math.min(this.remaining, take);
            this.remaining -= take;
            // Framing.Head again marks the end of the message below.
            if (this.remaining === 0) this.framing = this.framing === Framing.Length ? Framing.Head : Framing.ChunkDataCr;
          }
          const piece = data.subarray(p, p + take);
          p += take;
          exchange.resumedEarly = false;
          const more = sink.onData(piece, exchange);
          if (this.exchange !== exchange) return; // aborted by the sink
          if (this.framing === Framing.Head) return this.finish(exchange, p === n);
          if (!more && !exchange.resumedEarly) return this.pause(exchange, data, p, n);
          continue;
        }
        default: {
          const c = data[p++];
          if (!this.chunkFraming(c)) return this.fail(new AppError('UPSTREAM_ERROR', 'vLLM sent a malformed chunked body'));
          if ((this.framing as Framing) === Framing.Head) return this.finish(exchange, p === n); // the last chunk and trailers are in
        }
      }
    }
  }

  /** One byte of chunk framing (sizes, extensions, CRLFs, trailers); false when it is not valid there. */
  private chunkFraming(c: number): boolean {
    switch (this.framing) {
      case Framing.ChunkSize: {
        const digit = hexValue(c);
        if (digit >= 0) {
          // Leading zeros without end would keep the size at 0 for ever (16 hex digits: more than any chunk).
          if (++this.sizeDigits > MAX_SIZE_DIGITS) return false;
          this.remaining = this.remaining * 16 + digit;
          return this.remaining <= MAX_CHUNK_BYTES;
        }
        if (this.sizeDigits === 0) return false;
        return this.afterSize(c);
      }
      case Framing.ChunkSizeSpace:
        return ++this.framingBytes <= MAX_HEAD_BYTES && this.afterSize(c);
      case Framing.ChunkExtension:
        if (c === 13) this.framing = Framing.ChunkSizeLf;
        return c !== 10 && ++this.framingBytes <= MAX_HEAD_BYTES;
      case Framing.ChunkSizeLf:
        if (c !== 10) return false;
        this.sizeDigits = 0;
        this.lineLength = 0;
        if (this.remaining > 0) this.framingBytes = 0;
        this.framing = this.remaining === 0 ? Framing.Trailers : Framing.ChunkData;
        return true;
      case Framing.ChunkDataCr:
        this.framing = Framing.ChunkDataLf;
        return c === 13;
      case Framing.ChunkDataLf:
        this.framing = Framing.ChunkSize;
        return c === 10;
      case Framing.Trailers:
        // Trailer fields are read and dropped, up to the empty line that ends the message.
        if (++this.framingBytes > MAX_HEAD_BYTES) return false;
        if (c === 10) {
          if (this.lineLength === 0) this.framing = Framing.Head;
          this.lineLength = 0;
        } else if (c !== 13) this.lineLength += 1;
        return true;
      default:
        return false;
    }
  }

  /** After a chunk size's digits: whitespace, then an extension (`;`) or the line's end. */
  private afterSize(c: number): boolean {
    if (c === 13) this.framing = Framing.ChunkSizeLf;
    else if (c === 59) this.framing = Framing.ChunkExtension; // ;
    else if (c === 32 || c === 9) this.framing = Framing.ChunkSizeSpace; // SP HTAB
    else return false;
    return true;
  }

  private clearHead(): void {
    this.headParts.length = 0;
    this.headLength = 0;
    this.headTail = '';
  }

  /** Reads the status line and headers; returns where the body starts, or -1 (wait for more, or failed). */
  private readHead(data: Buffer, p: number, n: number): number {
    // Only this read's text and the few characters before it are searched, and the pieces are
    // joined once the head is whole: a head that comes in many small reads costs linear time (a
    // string grown by += is copied whole at each search).
    const text = data.toString('latin1', p, n);
    const seam = this.headTail + text;
    const found = seam.indexOf('\r\n\r\n');
    const before = this.headLength;
    const end = found === -1 ? -1 : before - this.headTail.length + found; // in the whole head
    this.headParts.push(text);
    this.headLength += text.length;
    if (end === -1 || end > MAX_HEAD_BYTES) {
      if (this.headLength > MAX_HEAD_BYTES) this.fail(new AppError('UPSTREAM_ERROR', 'vLLM sent a response head that is too large'));
      // Lines ended by LF alone: never the end of a head this client reads (uvicorn ends them with CRLF).
      else if (seam.includes('\n\n')) this.fail(new AppError('UPSTREAM_ERROR', 'vLLM sent a malformed HTTP response'));
      else this.headTail = seam.slice(-3);
      return -1;
    }
    const bodyAt = p + end + 4 - before;
    const head = (this.headParts.length === 1 ? text : this.headParts.join('')).slice(0, end);
    this.clearHead();
    const parsed = parseHead(head);
    if (parsed === null) {
      this.fail(new AppError('UPSTREAM_ERROR', 'vLLM sent a malformed HTTP response'));
      return -1;
    }
    const { status, headers, http10 } = parsed;
    if (status < 200) {
      this.interim = true;
      return bodyAt; // 100 Continue, 103 Early Hints: the answer follows
    }
    const connection = headers.connection?.toLowerCase() ?? '';
    this.keepAlive = http10 ? connection.includes('keep-alive') : !connection.includes('close');
    const keepAlive = headers['keep-alive'];
    // Each answer says it anew, as Node's agent reads it (none: the relay's own limit).
    this.serverIdleMs = keepAlive === undefined ? Infinity : serverIdleMs(keepAlive);
    if (this.serverIdleMs === 0) this.keepAlive = false;
    const te = headers['transfer-encoding'];
    const cl = headers['content-length'];
    if (status === 204 || status === 304) {
      this.framing = Framing.Head; // no body, whatever the framing headers say (RFC 9112 6.3)
    } else if (te !== undefined) {
      // Both framings at once is how responses get smuggled: never relayed. Nor is anything but
      // chunked applied once, last.
      const codings = te.toLowerCase().split(',');
      if (cl !== undefined || codings.filter((coding) => coding.trim() === 'chunked').length !== 1 || codings[codings.length - 1].trim() !== 'chunked') {
        this.fail(new AppError('UPSTREAM_ERROR', 'vLLM sent a response with conflicting framing'));
        return -1;
      }
      if (http10) this.keepAlive = false; // RFC 9112 6.1
      this.framing = Framing.ChunkSize;
      this.remaining = 0;
      this.sizeDigits = 0;
    } else if (cl !== undefined) {
      if (!/^\d{1,15}$/.test(cl)) {
        this.fail(new AppError('UPSTREAM_ERROR', 'vLLM sent an invalid Content-Length'));
        return -1;
      }
      this.remaining = Number(cl);
      this.framing = this.remaining === 0 ? Framing.Head : Framing.Length;
    } else {
      this.framing = Framing.UntilClose;
      this.keepAlive = false;
    }
    const exchange = this.exchange!;
    exchange.request = null; // answered: never sent again
    exchange.sink.onStart(status, headers);
    if (this.exchange !== exchange) return -1; // aborted by the sink
    if (this.framing === Framing.Head) {
      this.finish(exchange, bodyAt === n);
      return -1;
    }
    return bodyAt;
  }

  /** The answer is complete: the connection goes back to the pool, unless it cannot be reused. */
  private finish(exchange: Exchange, nothingAfter: boolean): void {
    this.exchange = null;
    this.reused = true;
    if (this.keepAlive && nothingAfter && this.usable()) {
      this.resumeReading(); // paused on the last piece: the next request must be read
      this.relay.release(this);
    } else this.socket.destroy();
    safely(() => exchange.sink.onEnd());
  }

  private pause(exchange: Exchange, data: Buffer, p: number, n: number): void {
    exchange.paused = true;
    exchange.backlog = p < n ? Buffer.from(data.subarray(p, n)) : null; // a copy: the read buffer is read into again
    this.readStopped = true;
    this.socket.pause();
  }

  private fail(error: AppError): void {
    const exchange = this.exchange;
    this.socket.destroy();
    if (exchange === null) return;
    this.exchange = null;
    safely(() => exchange.sink.onError(error));
  }

  private onClose(): void {
    this.relay.forget(this);
    const exchange = this.exchange;
    if (exchange === null) return;
    if (exchange.paused) {
      exchange.closed = true; // what was read before the close is handed over first
      return;
    }
    if (this.framing === Framing.UntilClose) return this.finish(exchange, true);
    if (this.resendIfUnanswered(exchange)) return;
    this.fail(this.answerStarted() ? lostMidway() : vllmUnavailable(this.connected));
  }

  /** Once vLLM began answering, a lost connection means vLLM failed: "not reachable" (503) would invite a retry. */
  private onSocketError(err: Error): void {
    const exchange = this.exchange;
    if (exchange !== null && !exchange.paused && this.resendIfUnanswered(exchange)) return;
    const error = this.relay.errorOf(err);
    this.fail(error.code === 'VLLM_NOT_READY' && this.exchange !== null && this.answerStarted() ? lostMidway() : error);
  }

  /** A reused connection closed before a byte of the answer, just after the request: it goes again on a new one (VLLMRelay.resend). */
  private resendIfUnanswered(exchange: Exchange): boolean {
    const request = exchange.request;
    if (request === null || this.answerStarted() || performance.now() - exchange.sentAt > RESEND_WINDOW_MS) return false;
    this.exchange = null;
    this.socket.destroy();
    exchange.since = performance.now();
    this.relay.resend(exchange, request);
    return true;
  }

  private answerStarted(): boolean {
    return this.framing !== Framing.Head || this.headLength > 0 || this.interim;
  }
}

function lostMidway(): AppError {
  return new AppError('UPSTREAM_ERROR', 'vLLM closed the connection before its answer was complete');
}

function notReachable(): AppError {
  return vllmUnavailable(false);
}

/** Runs a sink's callback from a socket or timer callback, where a throw would end the process. */
function safely(call: () => void): void {
  try {
    call();
  } catch (err) {
    logBug(err);
  }
}

function logBug(err: unknown): void {
  RELAY_LOG.error(`relaying vLLM's answer failed: ${(err as Error)?.stack ?? String(err)}`);
}

function hexValue(c: number): number {
  if (c >= 48 && c <= 57) return c - 48; // 0-9
  const lower = c | 32;
  return lower >= 97 && lower <= 102 ? lower - 87 : -1; // a-f, A-F
}

/** What a header field's value may not hold: a control character other than HTAB (obs-text is allowed). */
const INVALID_VALUE_CHAR = /[^\t\x20-\x7e\x80-\xff]/;

/** Fields of which Node's parser keeps the first and drops the others (joined, `text/event-stream, text/plain` would mean nothing). */
const SINGLE_VALUED: ReadonlySet<string> = new Set(['age', 'authorization', 'content-type', 'etag', 'expires', 'from', 'host', 'if-modified-since', 'if-unmodified-since', 'last-modified', 'location', 'max-forwards', 'proxy-authorization', 'referer', 'retry-after', 'server', 'user-agent']);

/** The idle time a `Keep-Alive` header allows, less the margin (0: do not reuse); Infinity when it names none. */
function serverIdleMs(keepAlive: string | string[]): number {
  const timeout = /(?:^|[,;\s])timeout\s*=\s*(\d+)/i.exec(String(keepAlive));
  return timeout === null ? Infinity : Math.max(0, Number(timeout[1]) * 1000 - KEEP_ALIVE_MARGIN_MS);
}

/** Status line and header fields of a response head (CRLF-separated, without the blank line). */
function parseHead(head: string): { status: number; headers: IncomingHttpHeaders; http10: boolean } | null {
  const lines = head.split('\r\n');
  const statusLine = /^HTTP\/1\.([01]) ([1-5]\d\d)(?: .*)?$/.exec(lines[0]);
  if (statusLine === null) return null;
  const headers: Record<string, string | string[]> = {};
  for (let i = 1; i < lines.length; i++) {
    const line = lines[i];
    const colon = line.indexOf(':');
    // No name, whitespace before the colon, or a folded line: not a valid field.
    if (colon <= 0 || line.charCodeAt(colon - 1) === 32 || line.charCodeAt(colon - 1) === 9 || line.charCodeAt(0) === 32 || line.charCodeAt(0) === 9) return null;
    const name = line.slice(0, colon).toLowerCase();
    const value = line.slice(colon + 1).trim();
    if (INVALID_VALUE_CHAR.test(value)) return null; // a control character (a lone CR or LF too), as Node's parser and writeHead refuse
    const seen = headers[name];
    if (name === 'set-cookie') headers[name] = [...((seen as string[] | undefined) ?? []), value];
    else if (seen === undefined) headers[name] = value;
    else if (name === 'content-length') {
      if (seen !== value) return null; // two different lengths
    } else if (!SINGLE_VALUED.has(name)) headers[name] = `${seen as string}, ${value}`; // else the first one stands, as in Node
  }
  return { status: Number(statusLine[2]), headers: headers as IncomingHttpHeaders, http10: statusLine[1] === '0' };
}
