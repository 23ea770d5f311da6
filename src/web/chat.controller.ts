import { Body, Controller, HttpCode, Post, Req, Res } from '@nestjs/common';
import { ConfigService } from '@nestjs/config';
import { ApiOperation, ApiTags } from '@nestjs/swagger';
import type { FastifyReply, FastifyRequest } from 'fastify';
import { ChatHandler, type ChatReply } from '../application/chat.handler';
import type { TideConfig } from '../config/config.schema';
import type { TraceContext } from '../domain/chat.entity';
import { ChatRequestDto, GenerateRequestDto } from './chat.dto';
import { traceContext } from './logging';
import { outcomeOf } from './request-outcome';
import { sendChatStream } from './sse.writer';
import { requestSignal } from './traffic.gate';

/** The simple envelope of a successful answer (noted for the metrics on the way). */
export function envelope(reply: ChatReply, res: FastifyReply) {
  const outcome = outcomeOf(res.raw);
  outcome.usage = reply.usage;
  outcome.requestId = reply.requestId;
  if (outcome.body !== undefined) outcome.completion = reply.content; // only with logging.log_bodies
  void res.header('x-request-id', reply.requestId);
  return {
    request_id: reply.requestId,
    content: reply.content,
    model: reply.model,
    usage: reply.usage,
    finish_reason: reply.finishReason,
    error: null,
  };
}

/**
 * A simple-API request's input with what the request adds to its body: its id settled (the
 * body's request_id, else the request's), and the client's trace context, which vLLM gets.
 * The access line names the id from here on, also when the client leaves before the answer.
 */
export function withRequestContext<T extends { request_id?: string }>(
  body: T,
  request: FastifyRequest,
  res: FastifyReply,
): T & { request_id: string; trace: TraceContext | null } {
  const requestId = body.request_id ?? request.id;
  outcomeOf(res.raw).requestId = requestId;
  return { ...body, request_id: requestId, trace: traceContext(request.headers) };
}

/**
 * The simple API. The reply is answered here (`@Res()`, not passthrough): a stream hijacks it,
 * and Nest sending the handler's result after that would make Fastify build an error to warn
 * that the reply was already sent, on every stream.
 */
@ApiTags('chat')
@Controller()
export class ChatController {
  /** web.client_timeout: how long a stream's client may read nothing before it is cut off. */
  private readonly stallMs: number;

  constructor(
    private readonly chat: ChatHandler,
    config: ConfigService<TideConfig, true>,
  ) {
    this.stallMs = config.get('web', { infer: true }).client_timeout * 1000;
  }

  @Post('chat/completions')
  @HttpCode(200)
  @ApiOperation({ summary: 'Answer a prompt (simple envelope; SSE with stream: true)' })
  async complete(@Body() body: ChatRequestDto, @Req() req: FastifyRequest, @Res() res: FastifyReply) {
    const input = withRequestContext(body, req, res);
    if (body.stream) return sendChatStream(res, this.chat.stream(input, requestSignal(req)), this.stallMs);
    return res.send(envelope(await this.chat.complete(input, requestSignal(req)), res));
  }

  @Post('generate')
  @HttpCode(200)
  @ApiOperation({ summary: 'Answer a prompt with earlier turns (system_info, history_input, history_output)' })
  async generate(@Body() body: GenerateRequestDto, @Req() req: FastifyRequest, @Res() res: FastifyReply) {
    const input = withRequestContext(body, req, res);
    if (body.stream) return sendChatStream(res, this.chat.generateStream(input, requestSignal(req)), this.stallMs);
    return res.send(envelope(await this.chat.generate(input, requestSignal(req)), res));
  }
}
