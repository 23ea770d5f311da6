import {
  badRequestError,
  chatChunk,
  chatResponse,
  flatError,
  modelCard,
  modelNotFoundBody,
  requestValidationError,
  sglUsage,
  streamErrorEvent,
  unsupportedMediaType,
} from './protocol';
import { SglangMetrics } from './metrics';
import { SglangLogger } from './log';

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
