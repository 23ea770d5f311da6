import type { ServerResponse } from 'node:http';
import type { Socket } from 'node:net';
import type { FastifyReply } from 'fastify';
import { AppError } from '../domain/app-error';
import type { ChatDelta, TokenUsage } from '../domain/chat.entity';
import type { ChatStream } from '../application/chat.handler';
import { toHttpError } from './http-error';
import { noteError, outcomeOf } from './request-outcome';

/**
 * No Connection header: Node keeps the connection alive when the client lets it, and closes it
 * after the stream when the client asked (`Connection: close`, HTTP/1.0); an explicit
 * `keep-alive` would keep it open against the client's wish, until the keep-alive timeout.
 */
export const SSE_HEADERS = {
  'content-type': 'text/event-stream; charset=utf-8',
  'cache-control': 'no-cache',
  'x-accel-buffering': 'no', // tells nginx and friends not to buffer the stream
} as const;

const DONE = 'data: [DONE]\n\n';
const RESOLVED = Promise.resolve();

/**
 * A streamed response body, written piece by piece with backpressure and a stall limit.
 *
 * Once Node has sent the head, pieces are framed by hand (`<hex length>\r\n<piece>\r\n`) and
 * gathered into one string, written to the socket when the current callback is done (a
 * microtask): the events of one read of vLLM's socket leave in one syscall, a lone event at
 * once. `res.write` would frame each piece as three buffers, cork until the next tick and do its
 * own bookkeeping around them (README, "Performance"). Until the head is out, and whenever the
 * response is not chunked (an HTTP/1.0 client) or has no socket of its own yet (a pipelined
 * request waiting for the one before it), `res.write` does it. The response must be ended with
 * `end`, never `res.end`: it writes what is gathered, then lets `res.end` write the last chunk;
 * everything goes through the socket's one queue, in order.
 *
 * A client that takes nothing for the stall limit (web.client_timeout) while bytes wait for it —
 * during a wait for 'drain', or after the end — is cut off (StallCheck).
 */
export class ChunkedBody {
  private socket: Socket | null = null;
  /** Framed pieces not yet written: bytes as latin1 characters (Buffers) or text (strings). */
  private pending = '';
  private encoding: 'latin1' | 'utf8' = 'latin1';
  private readonly flushTask = () => this.flush();
  /** Made the first time the client falls behind (a wait for 'drain', or the end's last bytes). */
  private stall: StallCheck | null = null;
  /** The wait for 'drain' in progress: the emitter and listener, removed if the body ends first. */
  private drainWait: [NodeJS.EventEmitter, () => void] | null = null;

  /** `stallMs`: how long the client may take nothing (web.client_timeout). */
  constructor(
    private readonly res: ServerResponse,
    private readonly stallMs: number,
  ) {}

  /** Like res.write: false when the client cannot take more now. A Buffer is copied, never kept. */
  write(piece: Buffer | string): boolean {
    // After the end, bytes would land in the next response (or be an error on this one).
    if (this.res.writableEnded) return true;
    const socket = this.socket;
    if (socket === null) {
      const more = this.res.write(typeof piece === 'string' ? piece : Buffer.from(piece));
      // The head went out with this first piece (or is queued ahead of what follows).
      if (this.res.chunkedEncoding && this.res.socket !== null) this.socket = this.res.socket;
      return more;
    }
    if (piece.length === 0) return true; // an empty chunk would end the body
    const encoding = typeof piece === 'string' ? 'utf8' : 'latin1';
    if (encoding !== this.encoding) {
      this.flush();
      this.encoding = encoding;
    }
    if (this.pending === '') void RESOLVED.then(this.flushTask); // queueMicrotask would build an AsyncResource per call
    this.pending +=
      typeof piece === 'string'
        ? `${Buffer.byteLength(piece).toString(16)}\r\n${piece}\r\n`
        : `${piece.length.toString(16)}\r\n${piece.toString('latin1')}\r\n`;
    // A writer that keeps going while this returns true must meet the socket's backpressure: what
    // would fill the socket is written now, so that "no" comes with a 'drain' to wait for (only a
    // write the socket could not take sets it; the socket may take it all). The last piece, told
    // "more" while gathered, is watched by `end`.
    if (socket.writableLength + this.pending.length >= socket.writableHighWaterMark) this.flush();
    return !socket.writableNeedDrain;
  }

  /** Like res.end, after what was written. */
  end(last?: string): void {
    if (this.drainWait !== null) {
      // Cut while waiting (vLLM failed, the drain ran out): nothing is to resume, and the
      // listener must not stay on a connection that lives on for the client's next request.
      this.drainWait[0].removeListener('drain', this.drainWait[1]);
      this.drainWait = null;
    }
    this.flush();
    const res = this.res;
    res.end(last);
    // 'finish' and 'close' come once the client has taken the last bytes: one that takes no more
    // must still be cut off, or its slot and connection are held forever.
    if (!res.writableFinished && !res.destroyed) this.watchStall();
  }

  /**
   * Calls `resume` once the client has taken what was written. A client that takes nothing for
   * `stallMs` (web.client_timeout) is cut off: its response is destroyed, which aborts the
   * request to vLLM — it must not hold a slot and a generation forever.
   */
  whenDrained(resume: () => void): void {
    this.watchStall();
    // A full socket emits 'drain' itself; the response only relays it for its own writes, and
    // not once it has ended (the stall check goes on then).
    const emitter = this.socket ?? this.res;
    const onDrain = () => {
      this.drainWait = null;
      this.stall?.rest();
      resume();
    };
    this.drainWait = [emitter, onDrain];
    emitter.once('drain', onDrain);
  }

  private watchStall(): void {
    if (this.stall !== null) this.stall.watch();
    else this.stall = new StallCheck(this.res, this.stallMs);
  }

  private flush(): void {
    const data = this.pending;
    if (data === '') return;
    this.pending = '';
    const socket = this.socket!;
    if (socket.destroyed) return;
    // The client half-closed, so Node ended our side: it is gone. Closing the socket closes the
    // response, which aborts the request to vLLM (as res.write's error would have).
    if (socket.writableEnded) return void socket.destroy();
    socket.write(data, this.encoding);
  }
}

/**
 * Cuts off a client that takes nothing of its answer for `stallMs` while bytes wait for it: its
 * response and connection are destroyed, which closes the response, aborts the request to vLLM
 * and frees its slot. Progress is what the kernel takes of the connection's socket writes, not
 * 'drain', which Node does not relay to a response that has ended: a slow client that keeps
 * reading is never cut off. A response queued behind another on its connection (pipelined) is not
 * stalled while the connection has nothing waiting: the answer before it is still coming.
 *
 * One per response, made the first time its client falls behind, with one timer re-armed for
 * every wait after it (a fast stream waits for 'drain' after every large batch).
 */
class StallCheck {
  private readonly connection: Socket | null;
  private readonly timer: NodeJS.Timeout;
  /** Bytes wait for the client: a wait for 'drain', or the end's last bytes. */
  private watching = true;
  /** Bytes of the connection the kernel had taken at the last look. */
  private sent = 0;

  constructor(
    private readonly res: ServerResponse,
    stallMs: number,
  ) {
    this.connection = res.socket ?? res.req?.socket ?? null;
    this.baseline();
    const timer = (this.timer = setTimeout(() => this.check(), stallMs).unref());
    res.on('close', () => clearTimeout(timer)); // the response is not kept for stallMs after it closed
  }

  /** Bytes wait for the client from now on (a check already under way goes on). */
  watch(): void {
    if (this.watching) return;
    this.watching = true;
    this.baseline();
    this.timer.refresh();
  }

  /**
   * What the kernel has taken, once the writes just made are handed over (Node's http corks a
   * response's writes until the next tick): the room its buffers had then is no progress of the
   * client's.
   */
  private baseline(): void {
    this.progressed();
    setImmediate(() => this.progressed());
  }

  /** The client took everything: nothing is checked until the next wait. */
  rest(): void {
    this.watching = false;
  }

  private check(): void {
    const { res, connection } = this;
    if (!this.watching || res.writableFinished || res.destroyed) return;
    if (connection !== null && !connection.destroyed && (this.progressed() || connection.writableLength === 0)) {
      this.timer.refresh();
      return;
    }
    res.destroy();
    connection?.destroy(); // also when the response is queued and has no socket of its own
  }

  /**
   * Whether the kernel took some of the socket's writes since the last call: bytes handed to libuv
   * (`_bytesDispatched`) less libuv's write queue, which shrinks as the kernel takes a write in
   * bursts while the client reads (Node's own socket timeout checks that queue the same way).
   * Bytes the server queues meanwhile are no progress of the client's: what Node's http holds back
   * (it corks a response's writes until the next tick) or the stream buffers is not handed over
   * yet, and a write handed over adds to the queue what the kernel did not take at once.
   */
  private progressed(): boolean {
    const socket = this.connection as (Socket & { _bytesDispatched?: number; _handle?: { writeQueueSize?: number } | null }) | null;
    if (socket === null) return false;
    const sent = (socket._bytesDispatched ?? socket.bytesWritten) - (socket._handle?.writeQueueSize ?? 0);
    const progressed = sent > this.sent;
    this.sent = sent;
    return progressed;
  }
}

/**
 * Sends a simple-API stream: one event per content delta, a final event with finish_reason and
 * usage, then `data: [DONE]`. Resolves once the first event is out; an error before it rejects
 * (→ a normal JSON error, nothing sent yet); errors later end the stream with an error event and
 * `[DONE]`, never a silent truncation. A slow client pauses vLLM instead of buffering; one that
 * reads nothing for `stallMs` is cut off.
 */
export function sendChatStream(reply: FastifyReply, stream: ChatStream, stallMs: number): Promise<void> {
  return new Promise((started, failed) => {
    const res = reply.raw;
    const body = new ChunkedBody(res, stallMs);
    const outcome = outcomeOf(res);
    const id = JSON.stringify(stream.requestId);
    const scope = reply.request.tideScope;
    let begun = false;
    let ended = false;
    let finish: ChatDelta | null = null;
    const begin = () => {
      begun = true;
      reply.hijack();
      res.writeHead(200, { ...SSE_HEADERS, 'x-request-id': stream.requestId });
      outcome.firstEventAt = performance.now();
      outcome.requestId = stream.requestId;
      // The drain ran out: end the stream here (TrafficGate then aborts vLLM's generation).
      if (scope) scope.cut = end;
      started();
    };
    const end = (error?: AppError) => {
      if (ended) return;
      ended = true;
      if (error) {
        body.write(errorEvent(id, error));
        noteError(res, toHttpError(error));
      } else if (finish) body.write(finalEvent(id, finish.finishReason, finish.usage, finish.model));
      body.end(DONE);
    };
    stream.pipe({
      write(delta) {
        if (ended) return true;
        if (!begun) begin();
        if (delta.usage) {
          outcome.usage = delta.usage;
          // Held until vLLM's [DONE] (end): a stream that fails after it ends with the error alone.
          finish = { ...delta, finishReason: delta.finishReason ?? finish?.finishReason ?? null };
          return true;
        }
        // With logging.log_bodies, the access line gets the answer's text, as for a whole answer.
        if (outcome.body !== undefined && delta.content) outcome.completion = (outcome.completion ?? '') + delta.content;
        if (delta.finishReason) {
          finish = delta;
          return delta.content ? body.write(contentEvent(id, delta.content)) : true;
        }
        return body.write(contentEvent(id, delta.content));
      },
      onDrain(resume) {
        body.whenDrained(resume);
      },
      end() {
        if (!begun) begin();
        end();
      },
      fail(error) {
        if (!begun) return failed(error);
        end(error);
      },
    });
  });
}

function contentEvent(id: string, content: string): string {
  return `data: {"request_id":${id},"content":${JSON.stringify(content)},"finish_reason":null}\n\n`;
}

function finalEvent(id: string, finishReason: string | null, usage: TokenUsage | null, model: string): string {
  return `data: {"request_id":${id},"content":"","finish_reason":${JSON.stringify(finishReason)},"model":${JSON.stringify(model)},"usage":${JSON.stringify(usage)}}\n\n`;
}

function errorEvent(id: string, error: AppError): string {
  const http = toHttpError(error);
  return `data: {"request_id":${id},"content":null,"finish_reason":null,"error":${JSON.stringify({ type: http.type, message: http.message })}}\n\n`;
}
