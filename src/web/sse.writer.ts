import type { ServerResponse } from 'node:http';
import type { FastifyReply } from 'fastify';
import { AppError } from '../domain/app-error';
import type { ChatDelta, TokenUsage } from '../domain/chat.entity';
import type { ChatStream } from '../application/chat.handler';
import { toHttpError } from './http-error';
import { outcomeOf } from './request-outcome';

export const SSE_HEADERS = {
  'content-type': 'text/event-stream; charset=utf-8',
  'cache-control': 'no-cache',
  'x-accel-buffering': 'no', // tells nginx and friends not to buffer the stream
  connection: 'keep-alive',
} as const;

const DONE = 'data: [DONE]\n\n';

/**
 * Calls `resume` once the client has taken what was written. A client that reads nothing for
 * `stallMs` (web.client_timeout) is cut off: its response is destroyed, which aborts the
 * request to vLLM — it must not hold a slot and a generation forever.
 */
export function whenDrained(res: ServerResponse, resume: () => void, stallMs: number): void {
  const timer = setTimeout(() => res.destroy(), stallMs).unref();
  res.once('drain', () => {
    clearTimeout(timer);
    resume();
  });
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
      // The drain ran out: end the stream here, and stop vLLM's generation.
      if (scope) scope.cut = (error) => {
        end(error);
        scope.abort(error);
      };
      started();
    };
    const end = (error?: AppError) => {
      if (ended) return;
      ended = true;
      if (error) {
        res.write(errorEvent(id, error));
        outcome.errorType = toHttpError(error).type;
      } else if (finish) res.write(finalEvent(id, finish.finishReason, null, finish.model));
      res.end(DONE);
    };
    stream.pipe({
      write(delta) {
        if (ended) return true;
        if (!begun) begin();
        if (delta.usage) {
          outcome.usage = delta.usage;
          const reason = delta.finishReason ?? finish?.finishReason ?? null;
          finish = null;
          return res.write(finalEvent(id, reason, delta.usage, delta.model));
        }
        if (delta.finishReason) {
          finish = delta;
          return delta.content ? write(res, id, delta.content) : true;
        }
        return write(res, id, delta.content);
      },
      onDrain(resume) {
        whenDrained(res, resume, stallMs);
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

function write(res: ServerResponse, id: string, content: string): boolean {
  return res.write(`data: {"request_id":${id},"content":${JSON.stringify(content)},"finish_reason":null}\n\n`);
}

function finalEvent(id: string, finishReason: string | null, usage: TokenUsage | null, model: string): string {
  return `data: {"request_id":${id},"content":"","finish_reason":${JSON.stringify(finishReason)},"model":${JSON.stringify(model)},"usage":${JSON.stringify(usage)}}\n\n`;
}

function errorEvent(id: string, error: AppError): string {
  const http = toHttpError(error);
  return `data: {"request_id":${id},"content":null,"finish_reason":null,"error":${JSON.stringify({ type: http.type, message: http.message })}}\n\n`;
}
