/**
 * POST /v1/responses (vllm/entrypoints/openai/responses): the OpenAI Responses API over the same
 * generation as chat. Its stream is named events, `event: <type>\ndata: <json>\n\n`
 * (api_router.py `_convert_stream_to_sse_events`), numbered by `sequence_number` from 0, ending
 * with `response.completed` — also when max_output_tokens cut the text (the response inside then
 * says `"status": "incomplete"`) — and no `data: [DONE]` (serving.py `responses_stream_generator`).
 * Text output only (simple_streaming_events.py): created, in_progress, then with the first text
 * output_item.added, content_part.added, output_text.delta…, output_text.done, content_part.done,
 * output_item.done; completed.
 */
import { randomBytes } from 'node:crypto';
import type { FinishReason } from './ipc';
import { ApiError, modelValidatorError } from './protocol';

/** A Responses request read into the chat generation's terms. */
export interface ResponsesInput {
  /** The conversation: `instructions` as the system message, then `input`. */
  messages: Array<{ role: string; content: unknown }>;
  /** max_output_tokens, or null (the rest of the context). */
  maxOutputTokens: number | null;
  instructions: string | null;
}

/** `input` (a string, or a list of messages with string or input_text content) and `instructions`. */
export function readResponsesInput(body: Record<string, unknown>): ResponsesInput {
  const { input } = body;
  const instructions = typeof body.instructions === 'string' ? body.instructions : null;
  const messages: Array<{ role: string; content: unknown }> = instructions === null ? [] : [{ role: 'system', content: instructions }];
  if (typeof input === 'string') messages.push({ role: 'user', content: input });
  else if (Array.isArray(input) && input.length > 0) {
    for (const item of input as Array<Record<string, unknown> | null>) {
      const content = item?.content;
      // input_text / output_text parts carry `text`, as chat's text parts do.
      const parts = Array.isArray(content)
        ? content.map((p) => ({ type: 'text', text: String((p as Record<string, unknown> | null)?.text ?? '') }))
        : content;
      messages.push({ role: String(item?.role ?? 'user'), content: parts });
    }
  } else {
    throw modelValidatorError('Field required', 'input', body);
  }
  const max = body.max_output_tokens;
  return { messages, maxOutputTokens: typeof max === 'number' ? max : null, instructions };
}

export function responseId(suffix: string): string {
  return `resp_${suffix}`;
}

/**
 * GET /v1/responses/{id} and POST /v1/responses/{id}/cancel: responses are kept only with
 * VLLM_ENABLE_RESPONSES_API_STORE=1 (off by default, not simulated), so none is ever found
 * (serving.py `_make_not_found_error`).
 */
export function responseNotFound(id: string): ApiError {
  return new ApiError(404, 'invalid_request_error', `Response with id '${id}' not found.`, 'response_id');
}

/** One response's state and its wire shapes. */
export class ResponsesShape {
  private sequence = 0;
  /** The message item and its text part were announced (with the first text). */
  private itemAdded = false;
  private readonly itemId = randomBytes(16).toString('hex');
  private readonly createdAt = Math.floor(Date.now() / 1000);

  constructor(
    private readonly id: string,
    private readonly model: string,
    private readonly input: ResponsesInput,
    private readonly temperature: number,
    private readonly topP: number,
  ) {}

  /** The ResponsesResponse object (protocol.py from_request), in its field order. */
  response(status: 'in_progress' | 'completed' | 'incomplete', text: string | null, usage: { input: number; output: number } | null): Record<string, unknown> {
    return {
      id: this.id,
      created_at: this.createdAt,
      incomplete_details: status === 'incomplete' ? { reason: 'max_output_tokens' } : null,
      instructions: this.input.instructions,
      metadata: null,
      model: this.model,
      object: 'response',
      output: text === null ? [] : [this.message(text, 'completed')],
      parallel_tool_calls: true,
      temperature: this.temperature,
      tool_choice: 'auto',
      tools: [],
      top_p: this.topP,
      background: false,
      max_output_tokens: this.input.maxOutputTokens,
      max_tool_calls: null,
      previous_response_id: null,
      prompt: null,
      reasoning: null,
      service_tier: 'auto',
      status,
      text: null,
      top_logprobs: null,
      truncation: 'disabled',
      usage:
        usage === null
          ? null
          : {
              input_tokens: usage.input,
              input_tokens_details: { cached_tokens: 0 },
              output_tokens: usage.output,
              output_tokens_details: { reasoning_tokens: 0 },
              total_tokens: usage.input + usage.output,
            },
      user: null,
    };
  }

  static status(reason: FinishReason | null): 'completed' | 'incomplete' {
    return reason === 'length' ? 'incomplete' : 'completed';
  }

  /** The stream's opening events: the response created and in progress. */
  opening(): string {
    const response = this.response('in_progress', null, null);
    return this.event('response.created', { response }) + this.event('response.in_progress', { response });
  }

  /** A piece of text; the first also announces the message item and its text part. Empty text sends nothing. */
  delta(text: string): string {
    if (text === '') return '';
    let events = '';
    if (!this.itemAdded) {
      this.itemAdded = true;
      events =
        this.event('response.output_item.added', { output_index: 0, item: { id: this.itemId, content: [], role: 'assistant', status: 'in_progress', type: 'message' } }) +
        this.event('response.content_part.added', { content_index: 0, item_id: this.itemId, output_index: 0, part: { annotations: [], text: '', type: 'output_text', logprobs: [] } });
    }
    return events + this.event('response.output_text.delta', { content_index: 0, delta: text, item_id: this.itemId, output_index: 0, logprobs: [] });
  }

  /**
   * The text's done events (if any text came), then `response.completed`: vLLM sends that event
   * whatever the status (`incomplete` when max_output_tokens cut the text).
   */
  closing(text: string, reason: FinishReason | null, usage: { input: number; output: number }): string {
    const status = ResponsesShape.status(reason);
    let events = '';
    if (this.itemAdded) {
      const part = { annotations: [], text, type: 'output_text', logprobs: null };
      events =
        this.event('response.output_text.done', { content_index: 0, item_id: this.itemId, logprobs: [], output_index: 0, text }) +
        this.event('response.content_part.done', { content_index: 0, item_id: this.itemId, output_index: 0, part }) +
        this.event('response.output_item.done', { item: this.message(text, 'completed'), output_index: 0 });
    }
    return events + this.event('response.completed', { response: this.response(status, text, usage) });
  }

  private message(text: string, status: string): Record<string, unknown> {
    return { id: this.itemId, content: [{ annotations: [], text, type: 'output_text', logprobs: null }], role: 'assistant', status, type: 'message' };
  }

  private event(type: string, fields: Record<string, unknown>): string {
    const data = { ...fields, sequence_number: this.sequence++, type };
    return `event: ${type}\ndata: ${JSON.stringify(data)}\n\n`;
  }
}
