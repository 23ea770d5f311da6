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
 * Sends a simple-API stream: one event per content delta, a final event with finish_reason and
 * usage, then `data: [DONE]`. Errors before the first event become a normal JSON error (thrown);
 * errors later end the stream with an error event and `[DONE]`, never a silent truncation.
 */
export async function sendChatStream(reply: FastifyReply, stream: ChatStream): Promise<void> {
  const iterator = stream.deltas[Symbol.asyncIterator]();
  const first = await iterator.next(); // throws (→ JSON error) while nothing is sent yet
  reply.hijack();
  const res = reply.raw;
  res.writeHead(200, { ...SSE_HEADERS, 'x-request-id': stream.requestId });
  const outcome = outcomeOf(res);
  outcome.firstEventAt = performance.now();
  outcome.requestId = stream.requestId;
  const id = JSON.stringify(stream.requestId);
  let finish: ChatDelta | null = null;
  let ended = false;
  const end = (error?: AppError) => {
    if (ended) return;
    ended = true;
    if (error) {
      res.write(errorEvent(id, error));
      outcome.errorType = toHttpError(error).type;
    }
    else if (finish) res.write(finalEvent(id, finish.finishReason, null, finish.model));
    res.end(DONE);
  };
  if (reply.request.tideScope) reply.request.tideScope.cut = (error) => {
    end(error);
    void iterator.return?.();
  };
  try {
    for (let step = first; !step.done; step = await iterator.next()) {
      if (ended) break;
      const delta = step.value;
      if (delta.usage) {
        outcome.usage = delta.usage;
        res.write(finalEvent(id, delta.finishReason ?? finish?.finishReason ?? null, delta.usage, delta.model));
        finish = null;
      } else if (delta.finishReason) {
        if (delta.content) write(res, id, delta.content);
        finish = delta;
      } else {
        write(res, id, delta.content);
      }
    }
    end();
  } catch (err) {
    end(err instanceof AppError ? err : new AppError('UPSTREAM_ERROR', 'the stream failed'));
  }
}

function write(res: ServerResponse, id: string, content: string): void {
  res.write(`data: {"request_id":${id},"content":${JSON.stringify(content)},"finish_reason":null}\n\n`);
}

function finalEvent(id: string, finishReason: string | null, usage: TokenUsage | null, model: string): string {
  return `data: {"request_id":${id},"content":"","finish_reason":${JSON.stringify(finishReason)},"model":${JSON.stringify(model)},"usage":${JSON.stringify(usage)}}\n\n`;
}

function errorEvent(id: string, error: AppError): string {
  const http = toHttpError(error);
  return `data: {"request_id":${id},"content":null,"finish_reason":null,"error":${JSON.stringify({ type: http.type, message: http.message })}}\n\n`;
}
