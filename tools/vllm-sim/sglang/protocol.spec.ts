import {
  badRequestError,
  chatChunk,
  chatResponse,
  classifyResponse,
  embeddingResponse,
  flatError,
  modelCard,
  modelNotFoundBody,
  requestValidationError,
  rerankItem,
  responsesError,
  scoringResponse,
  servingError,
  sglUsage,
  streamErrorEvent,
  unsupportedMediaType,
} from './protocol';
import { SglangMetrics } from './metrics';
import { SglangLogger } from './log';
import type { SglContext } from './context';
import { EMBEDDING_DIM, simEmbedding, simLabelProbs } from './pooling';
import { SglResponses } from './responses';

describe('SGLang wire shapes', () => {
  it('model cards have owned_by sglang and no permission array', () => {
    expect(Object.keys(modelCard('m', 'm', null, 4096, 1))).toEqual([
      'id', 'object', 'created', 'owned_by', 'root', 'parent', 'max_model_len',
    ]);
    expect(modelCard('a', '/p/a', 'm', null, 1)).toEqual({
      id: 'a', object: 'model', created: 1, owned_by: 'sglang', root: '/p/a', parent: 'm', max_model_len: null,
    });
    expect(modelNotFoundBody('x')).toEqual({
      error: { message: "The model 'x' does not exist", type: 'invalid_request_error', param: 'model', code: 'model_not_found' },
    });
  });

  it('chat answers and chunks follow pydantic field order', () => {
    const head = { id: 'chatcmpl-1', created: 5, model: 'default' };
    const body = chatResponse(head, [{ index: 0, text: 'hi', finishReason: 'stop', matchedStop: 151645 }], sglUsage(3, 2), 'default');
    expect(JSON.stringify(body)).toBe(
      '{"id":"chatcmpl-1","object":"chat.completion","created":5,"model":"default","choices":[{"index":0,' +
        '"message":{"role":"assistant","content":"hi","reasoning_content":null,"tool_calls":null},"logprobs":null,' +
        '"finish_reason":"stop","matched_stop":151645}],"usage":{"prompt_tokens":3,"total_tokens":5,' +
        '"completion_tokens":2,"prompt_tokens_details":null,"reasoning_tokens":0},"metadata":{"weight_version":"default"}}',
    );
    const finish = chatChunk(head, 0, {}, 'length', null);
    expect(finish.choices).toEqual([
      {
        index: 0,
        delta: { role: null, content: null, reasoning_content: null, tool_calls: null },
        logprobs: null,
        finish_reason: 'length',
        matched_stop: null,
      },
    ]);
    expect(finish.usage).toBeNull();
  });

  it('errors are flat; stream errors use json.dumps spacing', () => {
    expect(flatError('bad', 'BadRequest', 400)).toEqual({
      object: 'error', message: 'bad', type: 'BadRequest', param: null, code: 400,
    });
    // A ValueError is type "BadRequest" (SGLang's create_error_response), not vLLM's "BadRequestError".
    expect([badRequestError('bad').status, badRequestError('bad').body()]).toEqual([
      400,
      { object: 'error', message: 'bad', type: 'BadRequest', param: null, code: 400 },
    ]);
    expect(streamErrorEvent(flatError('The request queue is full.', 'SERVICE_UNAVAILABLE', 503))).toBe(
      'data: {"error": {"object": "error", "message": "The request queue is full.", "type": "SERVICE_UNAVAILABLE", ' +
        '"param": null, "code": 503}}\n\n',
    );
  });

  it('validation errors are 400 "Bad Request" with FastAPI text and the error list', () => {
    const e = requestValidationError([{ type: 'missing', loc: ['body', 'messages'], msg: 'Field required', input: { model: 'm' } }]);
    expect(e.status).toBe(400);
    expect(e.body().type).toBe('Bad Request');
    expect(e.message).toBe(
      "1 validation error:\n  {'type': 'missing', 'loc': ('body', 'messages'), 'msg': 'Field required', 'input': {'model': 'm'}}\n" +
        " [{'type': 'missing', 'loc': ('body', 'messages'), 'msg': 'Field required', 'input': {'model': 'm'}}]",
    );
    expect(unsupportedMediaType().message).toContain("'loc': ['header', 'content-type']");
  });
});

describe('SGLang pooling routes: shapes and the simulated model', () => {
  it('embedding, classify and scoring answers follow pydantic field order; usage is UsageInfo', () => {
    expect(JSON.stringify(embeddingResponse([[0.6, 0.8]], '/models/m', 3))).toBe(
      '{"data":[{"embedding":[0.6,0.8],"index":0,"object":"embedding"}],"model":"/models/m","object":"list",' +
        '"usage":{"prompt_tokens":3,"total_tokens":3,"completion_tokens":0,"prompt_tokens_details":null,"reasoning_tokens":0}}',
    );
    expect(Object.keys(scoringResponse([[0.5]], 'default', 2))).toEqual(['scores', 'pooled_hidden_states', 'model', 'usage', 'object']);
    expect(scoringResponse([], 'default', 0)).toMatchObject({ scores: [], pooled_hidden_states: null, object: 'scoring' });
    expect(Object.keys(classifyResponse('classify-1', 5, 'm', [], 1))).toEqual(['id', 'object', 'created', 'model', 'data', 'usage']);
    // RerankResponse drops `document` when it is None (return_documents false).
    expect(Object.keys(rerankItem(0.5, 'doc', 0, null))).toEqual(['score', 'document', 'index', 'meta_info']);
    expect(rerankItem(0.5, null, 1, { id: 'x' })).toEqual({ score: 0.5, index: 1, meta_info: { id: 'x' } });
  });

  it('errors: a serving class\'s own create_error_response says "BadRequestError"; /v1/responses nests', () => {
    expect([servingError('Input cannot be empty').status, servingError('Input cannot be empty').body()]).toEqual([
      400,
      { object: 'error', message: 'Input cannot be empty', type: 'BadRequestError', param: null, code: 400 },
    ]);
    expect(responsesError('Response with id \'resp_x\' not found.', 404, 'invalid_request_error', 'response_id').body()).toEqual({
      error: { message: "Response with id 'resp_x' not found.", type: 'invalid_request_error', param: 'response_id', code: 404 },
    });
  });

  it('embeddings are deterministic, EMBEDDING_DIM float32 values of unit norm; label probabilities sum below 1', () => {
    const a = simEmbedding([1, 2, 3]);
    expect(a).toHaveLength(EMBEDDING_DIM);
    expect(simEmbedding([1, 2, 3])).toEqual(a);
    expect(simEmbedding([1, 2, 4])).not.toEqual(a);
    expect(Math.sqrt(a.reduce((s, x) => s + x * x, 0))).toBeCloseTo(1, 5);
    expect(a.every((x) => Math.fround(x) === x)).toBe(true);
    const probs = simLabelProbs([1, 2], [9693, 2152]);
    expect(probs).toEqual(simLabelProbs([1, 2], [9693, 2152]));
    expect(probs.every((p) => p > 0 && p < 1)).toBe(true);
    expect(probs.reduce((s, p) => s + p, 0)).toBeLessThan(1);
  });
});

describe('SGLang /v1/responses shapes', () => {
  const request = {
    id: 'resp_abc',
    model: 'm',
    instructions: null,
    maxOutputTokens: 10,
    temperature: null,
    topP: null,
    toolChoice: 'auto',
    tools: [],
    store: true,
    metadata: null,
    previousResponseId: null,
    reasoningEffort: null,
    truncation: 'disabled',
    user: null,
    stream: true,
  };
  const fakeCtx = (): SglContext => ({ responses: new Map() }) as unknown as SglContext;
  const events = (text: string): Array<{ event: string; data: any }> =>
    text
      .split('\n\n')
      .filter(Boolean)
      .map((block) => {
        const [eventLine, dataLine] = block.split('\n');
        return { event: eventLine.slice('event: '.length), data: JSON.parse(dataLine.slice('data: '.length)) };
      });

  it('the response object is ResponsesResponse.model_dump(): status completed, usage as UsageInfo, stored', () => {
    const ctx = fakeCtx();
    const shape = new SglResponses(ctx, request, [{ role: 'user', content: 'a b' }]);
    const { status, body } = shape.final('a b', { prompt: 7, completion: 3 });
    expect(status).toBe(200);
    expect(Object.keys(body as object)).toEqual([
      'id', 'object', 'created_at', 'model', 'output', 'status', 'usage', 'parallel_tool_calls', 'tool_choice', 'tools',
      'error', 'incomplete_details', 'instructions', 'max_output_tokens', 'previous_response_id', 'reasoning', 'store',
      'temperature', 'text', 'top_p', 'truncation', 'user', 'metadata',
    ]);
    expect(body).toMatchObject({
      id: 'resp_abc',
      status: 'completed',
      output: [{ content: [{ annotations: [], text: 'a b', type: 'output_text', logprobs: null }], role: 'assistant', status: 'completed', type: 'message' }],
      usage: sglUsage(7, 3),
      text: { format: { type: 'text' } },
      reasoning: { effort: null, summary: null },
      metadata: {},
    });
    expect((body as any).output[0].id).toMatch(/^msg_[0-9a-f]{32}$/);
    expect(ctx.responses.get('resp_abc')?.response).toBe(body);
    // Without a model, ResponsesResponse itself fails: a nested 400 with pydantic's text.
    const noModel = new SglResponses(fakeCtx(), { ...request, model: null }, []).final('x', { prompt: 1, completion: 1 });
    expect(noModel.status).toBe(400);
    expect((noModel.body as any).error.message).toMatch(/^1 validation error for ResponsesResponse\nmodel\n/);
  });

  it('the stream: named events numbered from 0, text events with the first text, completed with input/output tokens', () => {
    const shape = new SglResponses(fakeCtx(), request, []);
    const text = shape.opening() + shape.delta('a') + shape.delta('') + shape.delta(' b') + shape.closing({ prompt: 7, completion: 3 });
    const list = events(text);
    expect(list.map((e) => e.event)).toEqual([
      'response.created',
      'response.in_progress',
      'response.output_item.added',
      'response.content_part.added',
      'response.output_text.delta',
      'response.output_text.delta',
      'response.output_text.done',
      'response.content_part.done',
      'response.output_item.done',
      'response.completed',
    ]);
    expect(list.map((e) => e.data.sequence_number)).toEqual([0, 1, 2, 3, 4, 5, 6, 7, 8, 9]);
    expect(list.every((e) => e.data.type === e.event)).toBe(true);
    expect(list[0].data.response).toMatchObject({ status: 'in_progress', output: [], usage: null, text: null, tools: [] });
    expect(list[3].data.part).toEqual({ annotations: [], text: '', type: 'output_text', logprobs: null });
    expect(Object.keys(list[4].data)).toEqual(['content_index', 'delta', 'item_id', 'logprobs', 'output_index', 'sequence_number', 'type']);
    expect(list[6].data).toMatchObject({ text: 'a b', logprobs: [] });
    const completed = list[9].data.response;
    expect(completed).toMatchObject({ status: 'completed', output: [{ type: 'message', content: [{ text: 'a b' }] }] });
    expect(completed.usage).toEqual({
      input_tokens: 7,
      input_tokens_details: { cached_tokens: 0 },
      output_tokens: 3,
      output_tokens_details: { reasoning_tokens: 0 },
      total_tokens: 10,
    });
    // A stream that fails after it began ends with response.failed.
    const failed = events(new SglResponses(fakeCtx(), request, []).failed());
    expect(failed.map((e) => [e.event, e.data.sequence_number, e.data.response.status])).toEqual([['response.failed', 0, 'failed']]);
  });
});

describe('sglang:* metrics', () => {
  it('renders scheduler gauges always and tokenizer series once requests finished, without _created', () => {
    const m = new SglangMetrics('m', 1.5);
    const snapshot = { running: 1, queued: 2, usedTokens: 10, maxTotalTokens: 100, genThroughput: 0 };
    const before = m.render(snapshot);
    expect(before).toContain('sglang:num_running_reqs{model_name="m",engine_type="unified",tp_rank="0",pp_rank="0",moe_ep_rank="0"} 1.0');
    expect(before).toContain('sglang:num_queue_reqs{model_name="m",engine_type="unified",tp_rank="0",pp_rank="0",moe_ep_rank="0"} 2.0');
    expect(before).toContain('sglang:token_usage{model_name="m",engine_type="unified",tp_rank="0",pp_rank="0",moe_ep_rank="0"} 0.1');
    expect(before).not.toContain('sglang:num_requests_total');
    m.recordFirstToken(0.05);
    m.recordFinished(7, 3, 0.2);
    const after = m.render(snapshot);
    expect(after).toContain('# TYPE sglang:prompt_tokens counter');
    expect(after).toContain('sglang:prompt_tokens_total{model_name="m",engine_type="unified"} 7.0');
    expect(after).toContain('sglang:generation_tokens_total{model_name="m",engine_type="unified"} 3.0');
    expect(after).toContain('sglang:num_requests_total{model_name="m",engine_type="unified"} 1.0');
    expect(after).toContain('sglang:e2e_request_latency_seconds_bucket{model_name="m",engine_type="unified",le="0.4"} 1.0');
    expect(after).toContain('sglang:time_to_first_token_seconds_count{model_name="m",engine_type="unified"} 1.0');
    expect(after).not.toContain('_created');
  });
});

describe('SGLang log format', () => {
  it('writes `[YYYY-MM-DD HH:MM:SS PREFIX] message` and uvicorn lines with level prefixes', () => {
    const out: string[] = [];
    const err: string[] = [];
    const sink = (lines: string[]) => ({ write: (t: string) => lines.push(t) });
    const log = new SglangLogger({ stdout: sink(out), stderr: sink(err), prefix: ' TP0', accessLogExcludePrefixes: ['/metrics'] });
    log.info('hello');
    log.uvicorn('INFO', 'Uvicorn running on http://127.0.0.1:30000 (Press CTRL+C to quit)');
    log.access('127.0.0.1:5', 'GET', '/health', '1.1', 200);
    log.access('127.0.0.1:5', 'GET', '/metrics', '1.1', 200);
    expect(out[0]).toMatch(/^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d TP0\] hello\n$/);
    expect(err[0]).toMatch(/^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\] INFO: {5}Uvicorn running on http:\/\/127\.0\.0\.1:30000 \(Press CTRL\+C to quit\)\n$/);
    expect(out[1]).toMatch(/\] INFO: {5}127\.0\.0\.1:5 - "GET \/health HTTP\/1\.1" 200 OK\n$/);
    expect(out).toHaveLength(2);
  });
});
