/**
 * Integration tests of the simulator's SGLang mode (`main.js sglang serve ...`) against
 * /work/shared/vllm-protocol.md Part B: argparse, start-up and warm-up, /health, routes and
 * shapes, errors, API key, memory release/resume, LoRA, metrics, the process tree and SIGTERM.
 * Run `npm run build` first.
 */
import path from 'node:path';
import {
  ExitStatus,
  ProcessHandle,
  cmdline,
  descendantsOf,
  expectNoProcessLeft,
  freePort,
  groupPids,
  httpRequest,
  killAll,
  pidAlive,
  probeConnect,
  readSse,
  simBinDir,
  simMain,
  sleep,
  spawnProcess,
  waitUntil,
} from './harness';

jest.setTimeout(30_000);
afterAll(killAll);

const READY_LINE = /The server is fired up and ready to roll!/;
const TS = '\\[\\d{4}-\\d\\d-\\d\\d \\d\\d:\\d\\d:\\d\\d\\]';

interface Sgl extends ProcessHandle {
  port: number;
  url: string;
}

interface StartOptions {
  args?: string[];
  env?: NodeJS.ProcessEnv;
  ready?: boolean;
  port?: number;
}

/** `node main.js sglang serve --model-path sim-model --port P --host 127.0.0.1 ...`. */
async function startSgl(options: StartOptions = {}): Promise<Sgl> {
  const port = options.port ?? (await freePort());
  const handle = spawnProcess(
    process.execPath,
    [simMain, 'sglang', 'serve', '--model-path', 'sim-model', '--port', String(port), '--host', '127.0.0.1', ...(options.args ?? [])],
    { env: { VLLM_SIM_LOAD_SECONDS: '0.2', VLLM_SIM_TTFT_MS: '5', VLLM_SIM_ITL_MS: '2', ...options.env } },
  );
  const sgl = Object.assign(handle, { port, url: `http://127.0.0.1:${port}` });
  if (options.ready ?? true) {
    await Promise.race([
      handle.waitForLine(READY_LINE, 15_000),
      handle.waitForExit(15_000).then((s) => {
        throw new Error(`exited during start-up (${JSON.stringify(s)}):\n${handle.output.join('\n')}`);
      }),
    ]);
  }
  return sgl;
}

function runCli(args: string[]): Promise<{ status: ExitStatus; stderr: string }> {
  const handle = spawnProcess(process.execPath, [simMain, 'sglang', ...args]);
  return handle.waitForExit().then((status) => ({ status, stderr: handle.stderrLines.join('\n') }));
}

function chat(content: string, extra: Record<string, unknown> = {}): Record<string, unknown> {
  return { model: 'sim-model', messages: [{ role: 'user', content }], ...extra };
}

function words(n: number): string {
  return Array.from({ length: n }, (_, i) => `w${i}`).join(' ');
}

function json(body: string): any {
  return JSON.parse(body);
}

function children(sgl: Sgl): string[] {
  return descendantsOf(sgl.pid).map(cmdline).sort();
}

/** A named-event stream (`event: <type>` + `data: <json>`) as [type, data] pairs. */
function namedEvents(raw: string): Array<[string, any]> {
  return raw
    .split('\n\n')
    .filter(Boolean)
    .map((block) => {
      const lines = block.split('\n');
      const type = lines.find((l) => l.startsWith('event: '))?.slice('event: '.length) ?? '';
      return [type, JSON.parse(lines.find((l) => l.startsWith('data: '))?.slice('data: '.length) ?? 'null')];
    });
}

const NOT_AN_EMBEDDING_MODEL =
  'This model does not appear to be an embedding model by default. Please add `--is-embedding` when launching the server or try another model.';

describe('command line', () => {
  test('argparse errors exit 2 with `sglang serve: error:`; booleans have no --no- form', async () => {
    const [unknown, noForm, missing, choice] = await Promise.all([
      runCli(['serve', '--model-path', 'm', '--foo']),
      runCli(['serve', 'm', '--no-enable-metrics']),
      runCli(['serve', '--port', '30001']),
      runCli(['serve', 'm', '--dtype', 'fp8']),
    ]);
    expect(unknown.status.code).toBe(2);
    expect(unknown.stderr).toMatch(/^usage: sglang serve \[-h\] --model-path MODEL_PATH\n/);
    expect(unknown.stderr.split('\n').at(-1)).toBe('sglang serve: error: unrecognized arguments: --foo');
    expect(noForm.status.code).toBe(2);
    expect(noForm.stderr).toContain('sglang serve: error: unrecognized arguments: --no-enable-metrics');
    expect(missing.status.code).toBe(2);
    expect(missing.stderr).toContain('sglang serve: error: the following arguments are required: --model-path/--model');
    expect(choice.status.code).toBe(2);
    expect(choice.stderr).toContain("argument --dtype: invalid choice: 'fp8'");
  });
});

describe('start-up, warm-up and /health', () => {
  test('refuses connections while loading, listens, answers 503 until the warm-up is done, then 200', async () => {
    const port = await freePort();
    const sgl = await startSgl({ port, ready: false, env: { VLLM_SIM_LOAD_SECONDS: '1' } });
    await sgl.waitForLine(/Load weight begin/);
    expect(await probeConnect(port)).toBe('ECONNREFUSED');
    const running = await sgl.waitForLine(/Uvicorn running on/);
    expect(running).toBe(
      running.slice(0, 22) + `INFO:     Uvicorn running on http://127.0.0.1:${port} (Press CTRL+C to quit)`,
    );
    expect(running).toMatch(new RegExp(`^${TS} INFO: {5}Uvicorn running`));
    expect(sgl.stderrLines).toContain(running);
    // Warm-up: listening, /v1/models answers, /health is 503 (server_status Starting).
    const [health, models] = await Promise.all([httpRequest(`${sgl.url}/health`), httpRequest(`${sgl.url}/v1/models`)]);
    expect(health.status).toBe(503);
    expect(health.body).toBe('');
    expect(models.status).toBe(200);
    expect((await httpRequest(`${sgl.url}/health_generate`)).status).toBe(503);
    await sgl.waitForLine(READY_LINE);
    const started = Date.now();
    const up = await httpRequest(`${sgl.url}/health`);
    expect(up.status).toBe(200);
    expect(up.body).toBe('');
    // The default /health runs a one-token generation and checks for output after a 1 s sleep.
    expect(Date.now() - started).toBeGreaterThanOrEqual(950);

    const out = sgl.stdoutLines.join('\n');
    expect(sgl.stdoutLines[0]).toMatch(new RegExp(`^${TS} server_args=ServerArgs\\(model_path='sim-model', `));
    const [warmup, ready] = [out.indexOf('Start of co-locate warmup ...'), out.indexOf('The server is fired up and ready to roll!')];
    expect([warmup >= 0, ready >= 0]).toEqual([true, true]);
    expect(warmup).toBeLessThan(ready);
    expect(out).toMatch(/INFO: {5}127\.0\.0\.1:\d+ - "POST \/generate HTTP\/1\.1" 200 OK/);
    expect(out).toMatch(/INFO: {5}127\.0\.0\.1:\d+ - "GET \/health HTTP\/1\.1" 503 Service Unavailable/);
    // Children: scheduler and detokenizer, in the launcher's process group.
    expect(children(sgl)).toEqual(['sglang::detokenizer', 'sglang::scheduler']);
    expect(groupPids(sgl.pid)).toHaveLength(3);
    sgl.kill('SIGKILL');
    await expectNoProcessLeft(sgl.pid);
  });

  test('the bin/sglang wrapper runs the SGLang mode from PATH and keeps the PID', async () => {
    const port = await freePort();
    const handle = spawnProcess('sglang', ['serve', 'wrapped', '--port', String(port), '--skip-server-warmup'], {
      env: { PATH: `${simBinDir}${path.delimiter}${process.env.PATH}`, VLLM_SIM_LOAD_SECONDS: '0.1' },
    });
    await handle.waitForLine(READY_LINE);
    // --host defaults to 127.0.0.1 and --skip-server-warmup makes /health 200 at once. The uvicorn
    // line comes on stderr, which may trail stdout: wait for it rather than expect it already there.
    await handle.waitForLine(new RegExp(`Uvicorn running on http://127\\.0\\.0\\.1:${port}`));
    const models = json((await httpRequest(`http://127.0.0.1:${port}/v1/models`)).body);
    expect(models.data[0].id).toBe('wrapped');
    expect(descendantsOf(handle.pid).every((p) => groupPids(handle.pid).includes(p))).toBe(true);
    handle.kill('SIGKILL');
    await expectNoProcessLeft(handle.pid);
  });
});

describe('serving', () => {
  let main: Sgl; // shapes, errors, metrics
  let queue: Sgl; // one running request, one queued
  let auth: Sgl; // --api-key
  let saver: Sgl; // memory saver
  let lora: Sgl; // LoRA

  beforeAll(async () => {
    [main, queue, auth, saver, lora] = await Promise.all([
      startSgl({ args: ['--served-model-name', 'sim-model', '--context-length', '64', '--enable-metrics'] }),
      startSgl({ args: ['--max-running-requests', '1', '--max-queued-requests', '1'], env: { VLLM_SIM_ITL_MS: '40' } }),
      startSgl({ args: ['--api-key', 'sk-test', '--enable-metrics'] }),
      startSgl({ args: ['--enable-memory-saver', '--enable-weights-cpu-backup'] }),
      startSgl({ args: ['--lora-paths', 'static=/adapters/static', '--max-loras-per-batch', '4'] }),
    ]);
  });

  test('/v1/models and /v1/models/{model}: owned_by sglang, root = served name, no permission', async () => {
    const list = json((await httpRequest(`${main.url}/v1/models`)).body);
    expect(list).toEqual({
      object: 'list',
      data: [{ id: 'sim-model', object: 'model', created: expect.any(Number), owned_by: 'sglang', root: 'sim-model', parent: null, max_model_len: 64 }],
    });
    const one = await httpRequest(`${main.url}/v1/models/sim-model`);
    expect(json(one.body)).toMatchObject({ id: 'sim-model', owned_by: 'sglang', max_model_len: 64 });
    const missing = await httpRequest(`${main.url}/v1/models/other/model`);
    expect(missing.status).toBe(404);
    expect(json(missing.body)).toEqual({
      error: { message: "The model 'other/model' does not exist", type: 'invalid_request_error', param: 'model', code: 'model_not_found' },
    });
  });

  test('chat completions: the request model is echoed (not validated), SGLang ids and usage', async () => {
    const res = await httpRequest(`${main.url}/v1/chat/completions`, { body: chat('alpha beta gamma', { model: 'anything' }) });
    expect(res.status).toBe(200);
    expect(res.headers['content-type']).toBe('application/json');
    const body = json(res.body);
    expect(body.id).toMatch(/^chatcmpl-[0-9a-f]{32}$/);
    expect(body).toMatchObject({
      object: 'chat.completion',
      model: 'anything',
      choices: [
        {
          index: 0,
          message: { role: 'assistant', content: 'alpha beta gamma', reasoning_content: null, tool_calls: null },
          logprobs: null,
          finish_reason: 'stop',
          matched_stop: 151645,
        },
      ],
      usage: { prompt_tokens: 8, completion_tokens: 4, total_tokens: 12, prompt_tokens_details: null, reasoning_tokens: 0 },
      metadata: { weight_version: 'default' },
    });
    const noModel = json((await httpRequest(`${main.url}/v1/chat/completions`, { body: { messages: [{ role: 'user', content: 'x y' }], max_tokens: 1 } })).body);
    expect(noModel).toMatchObject({ model: 'default', choices: [{ finish_reason: 'length', matched_stop: null, message: { content: 'x' } }] });
  });

  test('chat streaming: role chunk, content deltas, a separate finish chunk, usage, [DONE]', async () => {
    const sse = await readSse(`${main.url}/v1/chat/completions`, chat('one two', { stream: true, stream_options: { include_usage: true } }));
    expect(sse.status).toBe(200);
    expect(sse.headers['content-type']).toBe('text/event-stream; charset=utf-8');
    expect(sse.events.at(-1)).toBe('[DONE]');
    const chunks = sse.events.slice(0, -1).map(json);
    expect(chunks.map((c) => c.choices[0]?.delta ?? null)).toEqual([
      { role: 'assistant', content: '', reasoning_content: null, tool_calls: null },
      { role: null, content: 'one', reasoning_content: null, tool_calls: null },
      { role: null, content: ' two', reasoning_content: null, tool_calls: null },
      { role: null, content: null, reasoning_content: null, tool_calls: null },
      null,
    ]);
    expect(chunks[3].choices[0]).toMatchObject({ finish_reason: 'stop', matched_stop: 151645 });
    expect(chunks[0]).toMatchObject({ object: 'chat.completion.chunk', model: 'sim-model', usage: null });
    expect(chunks[4]).toMatchObject({ choices: [], usage: { prompt_tokens: 7, completion_tokens: 3, total_tokens: 10 } });
    expect(new Set(chunks.map((c) => c.id)).size).toBe(1);
  });

  test('completions: JSON and a stream whose last chunk carries the finish reason', async () => {
    const res = json((await httpRequest(`${main.url}/v1/completions`, { body: { model: 'm', prompt: 'red green blue', max_tokens: 2 } })).body);
    expect(res.id).toMatch(/^cmpl-/);
    expect(res).toMatchObject({ object: 'text_completion', model: 'm', choices: [{ text: 'red green', finish_reason: 'length', matched_stop: null }] });
    const sse = await readSse(`${main.url}/v1/completions`, { prompt: 'red green', stream: true });
    const chunks = sse.events.slice(0, -1).map(json);
    expect(chunks.map((c) => [c.choices[0].text, c.choices[0].finish_reason])).toEqual([
      ['red', null],
      [' green', null],
      ['', 'stop'],
    ]);
    expect(sse.events.at(-1)).toBe('[DONE]');
  });

  test('errors: the flat shape, 400 "Bad Request" for validation, SGLang sampling rules, 404 detail', async () => {
    const missing = await httpRequest(`${main.url}/v1/chat/completions`, { body: { model: 'm' } });
    expect(missing.status).toBe(400);
    const missingBody = json(missing.body);
    expect(Object.keys(missingBody)).toEqual(['object', 'message', 'type', 'param', 'code']);
    expect(missingBody).toMatchObject({ object: 'error', type: 'Bad Request', param: null, code: 400 });
    expect(missingBody.message).toContain("'loc': ('body', 'messages'), 'msg': 'Field required'");

    const negative = await httpRequest(`${main.url}/v1/chat/completions`, { body: chat('x', { temperature: -1 }) });
    expect(negative.status).toBe(400);
    expect(json(negative.body)).toEqual({
      object: 'error',
      message: 'temperature must be a non-negative finite number, got -1.0.',
      type: 'BadRequest',
      param: null,
      code: 400,
    });
    // SGLang has no upper bound on temperature (vLLM rejects > 2).
    expect((await httpRequest(`${main.url}/v1/chat/completions`, { body: chat('x', { temperature: 5 }) })).status).toBe(200);
    // Errors found before the first token are plain JSON even for stream: true.
    const streamed = await httpRequest(`${main.url}/v1/chat/completions`, { body: chat('x', { top_p: 0, stream: true }) });
    expect(streamed.status).toBe(400);
    expect(streamed.headers['content-type']).toBe('application/json');
    expect(json(streamed.body).message).toBe('top_p must be in (0, 1], got 0.0.');

    const long = await httpRequest(`${main.url}/v1/chat/completions`, { body: chat(words(70)) });
    expect(json(long.body).message).toBe("The input (75 tokens) is longer than the model's context length (64 tokens).");
    const total = await httpRequest(`${main.url}/v1/chat/completions`, { body: chat('a b', { max_tokens: 60 }) });
    expect(json(total.body).message).toMatch(/^Requested token count exceeds the model's maximum context length of 64 tokens\. You requested a total of 67 tokens: 7 tokens from the input messages and 60 tokens for the completion\./);
    const tooLarge = await httpRequest(`${main.url}/v1/chat/completions`, { body: chat('a', { max_tokens: 100 }) });
    expect(json(tooLarge.body)).toMatchObject({ message: 'max_completion_tokens is too large: 100.This model supports at most 64 completion tokens.', type: 'BadRequestError' });
    const empty = await httpRequest(`${main.url}/v1/chat/completions`, { body: { model: 'm', messages: [] } });
    expect([empty.status, json(empty.body)]).toEqual([400, { object: 'error', message: 'Messages cannot be empty.', type: 'BadRequestError', param: null, code: 400 }]);
    const mediaType = await httpRequest(`${main.url}/v1/chat/completions`, { body: '{}', headers: { 'content-type': 'text/plain' } });
    expect(json(mediaType.body)).toMatchObject({ type: 'Bad Request', code: 400 });
    const notFound = await httpRequest(`${main.url}/v1/responses/x/y`);
    expect(notFound.status).toBe(404);
    expect(json(notFound.body)).toEqual({ detail: 'Not Found' });
  });

  test('pooling routes on a generation model: embeddings, classify, rerank and /encode refused; /v1/score answers', async () => {
    const refused = { object: 'error', message: NOT_AN_EMBEDDING_MODEL, type: 'BadRequestError', param: null, code: 400 };
    for (const [path, body] of [
      ['/v1/embeddings', { model: 'sim-model', input: 'hello world' }],
      ['/v1/embeddings', { input: ['a', 'b'], dimensions: 8 }],
      ['/v1/classify', { input: 'hello' }],
      ['/v1/rerank', { query: 'q', documents: ['a', 'b'] }],
    ] as const) {
      const res = await httpRequest(`${main.url}${path}`, { body });
      expect([path, res.status, res.headers['content-type'], json(res.body)]).toEqual([path, 400, 'application/json', refused]);
    }
    // The serving classes' own checks come first (create_error_response: "BadRequestError").
    const empty = await httpRequest(`${main.url}/v1/embeddings`, { body: { input: '  ' } });
    expect(json(empty.body)).toEqual({ ...refused, message: 'Input cannot be empty or whitespace only' });
    const noDocs = await httpRequest(`${main.url}/v1/rerank`, { body: { query: 'q', documents: [] } });
    expect(json(noDocs.body)).toEqual({ ...refused, message: 'Documents cannot be empty' });
    const missing = await httpRequest(`${main.url}/v1/embeddings`, { body: {} });
    expect(json(missing.body)).toMatchObject({ type: 'Bad Request', code: 400 });
    expect(json(missing.body).message).toContain("'loc': ('body', 'input'), 'msg': 'Field required'");
    // The native /encode answers its ValueError as {"error": {"message"}}.
    const encode = await httpRequest(`${main.url}/encode`, { body: { text: 'hello' } });
    expect([encode.status, json(encode.body)]).toEqual([400, { error: { message: NOT_AN_EMBEDDING_MODEL } }]);

    // /v1/score: each label's next-token probability after query + item.
    const scoreBody = { query: 'Is it sunny?', items: [' yes', ' no'], label_token_ids: [9693, 2152] };
    const score = await httpRequest(`${main.url}/v1/score`, { body: scoreBody });
    expect(score.status).toBe(200);
    const scored = json(score.body);
    expect(Object.keys(scored)).toEqual(['scores', 'pooled_hidden_states', 'model', 'usage', 'object']);
    expect(scored).toMatchObject({ pooled_hidden_states: null, model: 'default', object: 'scoring', usage: { prompt_tokens: 8, total_tokens: 8, completion_tokens: 0 } });
    expect(scored.scores).toHaveLength(2);
    for (const row of scored.scores) {
      expect(row).toHaveLength(2);
      expect(row.reduce((a: number, b: number) => a + b, 0)).toBeLessThan(1);
    }
    expect(json((await httpRequest(`${main.url}/v1/score`, { body: scoreBody })).body).scores).toEqual(scored.scores);
    const softmax = json((await httpRequest(`${main.url}/v1/score`, { body: { ...scoreBody, apply_softmax: true } })).body);
    expect(softmax.scores[0][0] + softmax.scores[0][1]).toBeCloseTo(1, 10);
    const noLabels = await httpRequest(`${main.url}/v1/score`, { body: { query: 'q', items: ['a'] } });
    expect([noLabels.status, json(noLabels.body)]).toEqual([
      400,
      { ...refused, message: 'label_token_ids is required for generation (CausalLM) models.' },
    ]);
  });

  test('/v1/responses: the response object, stored; SGLang\'s max_output_tokens − 2; nested errors', async () => {
    const res = await httpRequest(`${main.url}/v1/responses`, {
      body: { model: 'anything', input: 'alpha beta gamma', instructions: 'Be brief.', max_output_tokens: 10 },
    });
    expect([res.status, res.headers['content-type']]).toEqual([200, 'application/json']);
    const body = json(res.body);
    expect(body.id).toMatch(/^resp_[0-9a-f]{32}$/);
    expect(body).toMatchObject({
      object: 'response',
      model: 'anything',
      status: 'completed',
      output: [{ content: [{ annotations: [], text: 'alpha beta gamma', type: 'output_text', logprobs: null }], role: 'assistant', status: 'completed', type: 'message' }],
      // Chat's UsageInfo: system + user messages and the generation prompt; the EOS token counted.
      usage: { prompt_tokens: 13, total_tokens: 17, completion_tokens: 4, prompt_tokens_details: null, reasoning_tokens: 0 },
      instructions: 'Be brief.',
      max_output_tokens: 10,
      store: true,
      text: { format: { type: 'text' } },
      tools: [],
    });
    expect(body.output[0].id).toMatch(/^msg_[0-9a-f]{32}$/);
    // store (default true): GET /v1/responses/{id} returns it; a finished response cannot be cancelled.
    const stored = await httpRequest(`${main.url}/v1/responses/${body.id}`);
    expect([stored.status, json(stored.body)]).toEqual([200, body]);
    const cancel = await httpRequest(`${main.url}/v1/responses/${body.id}/cancel`, { method: 'POST' });
    expect([cancel.status, json(cancel.body)]).toEqual([
      400,
      { error: { message: 'Cannot cancel a synchronous response.', type: 'invalid_request_error', param: null, code: 400 } },
    ]);
    const unknown = await httpRequest(`${main.url}/v1/responses/resp_unknown`);
    expect([unknown.status, json(unknown.body)]).toEqual([
      404,
      { error: { message: "Response with id 'resp_unknown' not found.", type: 'invalid_request_error', param: 'response_id', code: 404 } },
    ]);
    // max_new_tokens = max_output_tokens - 2: 3 gives one token, and the status stays "completed".
    const cut = json((await httpRequest(`${main.url}/v1/responses`, { body: { model: 'm', input: 'one two three', max_output_tokens: 3 } })).body);
    expect([cut.status, cut.output[0].content[0].text, cut.usage.completion_tokens, cut.incomplete_details]).toEqual(['completed', 'one', 1, null]);
    // Without max_output_tokens: max(context - prompt, 512) - 2 = 510 new tokens, too many for 64.
    const tooLong = await httpRequest(`${main.url}/v1/responses`, { body: { model: 'm', input: 'x y' } });
    expect(tooLong.status).toBe(400);
    expect(json(tooLong.body).error).toMatchObject({ type: 'invalid_request_error', param: null, code: 400 });
    expect(json(tooLong.body).error.message).toMatch(/^Requested token count exceeds the model's maximum context length of 64 tokens\. You requested a total of 517 tokens: 7 tokens from the input messages and 510 tokens for the completion\./);
    // A body that is not an object: the nested envelope with "Bad Request"; no `input`: ResponsesRequest's uncaught 500.
    const notObject = await httpRequest(`${main.url}/v1/responses`, { body: [1] });
    expect([notObject.status, json(notObject.body).error.type, json(notObject.body).error.code]).toEqual([400, 'Bad Request', 400]);
    const noInput = await httpRequest(`${main.url}/v1/responses`, { body: { model: 'm' } });
    expect([noInput.status, noInput.body]).toEqual([500, 'Internal Server Error']);
  });

  test('/v1/responses streaming: named events from response.created to response.completed, no [DONE]', async () => {
    const sse = await readSse(`${main.url}/v1/responses`, { model: 'm', input: [{ role: 'user', content: [{ type: 'input_text', text: 'red green' }] }], max_output_tokens: 10, stream: true });
    expect(sse.status).toBe(200);
    expect(sse.headers['content-type']).toBe('text/event-stream; charset=utf-8');
    expect(sse.headers['cache-control']).toBe('no-cache');
    const events = namedEvents(sse.raw);
    expect(events.map(([type]) => type)).toEqual([
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
    expect(events.map(([type, data]) => [data.type === type, data.sequence_number])).toEqual(events.map((_, i) => [true, i]));
    expect(events.slice(4, 6).map(([, data]) => data.delta)).toEqual(['red', ' green']);
    expect(sse.raw).not.toContain('[DONE]');
    const completed = events[9][1].response;
    expect(completed).toMatchObject({
      status: 'completed',
      tools: [],
      output: [{ type: 'message', content: [{ text: 'red green' }] }],
      usage: { input_tokens: 7, input_tokens_details: { cached_tokens: 0 }, output_tokens: 3, output_tokens_details: { reasoning_tokens: 0 }, total_tokens: 10 },
    });
    expect(events[0][1].response).toMatchObject({ id: completed.id, status: 'in_progress', output: [], usage: null });
    // A tokenizer error (a negative temperature) arrives once the stream began: response.failed.
    const failed = await readSse(`${main.url}/v1/responses`, { model: 'm', input: 'x', max_output_tokens: 5, temperature: -1, stream: true });
    expect(namedEvents(failed.raw).map(([type, data]) => [type, data.response.status])).toEqual([
      ['response.created', 'in_progress'],
      ['response.in_progress', 'in_progress'],
      ['response.failed', 'failed'],
    ]);
  });

  test('a full waiting queue aborts with 503: an error event in a stream, a flat 503 otherwise', async () => {
    const first = httpRequest(`${queue.url}/v1/chat/completions`, { body: chat(words(10)) });
    const second = httpRequest(`${queue.url}/v1/chat/completions`, { body: chat(words(3)) });
    await waitUntil(async () => json((await httpRequest(`${queue.url}/get_load`)).body)[0].num_waiting_reqs === 1, 3000);
    const sse = await readSse(`${queue.url}/v1/chat/completions`, chat('late', { stream: true }));
    expect(sse.status).toBe(200);
    expect(sse.raw).toBe(
      'data: {"error": {"object": "error", "message": "The request queue is full.", "type": "SERVICE_UNAVAILABLE", "param": null, "code": 503}}\n\n' +
        'data: [DONE]\n\n',
    );
    const plain = await httpRequest(`${queue.url}/v1/chat/completions`, { body: chat('late') });
    expect(plain.status).toBe(503);
    expect(json(plain.body)).toEqual({ object: 'error', message: 'The request queue is full.', type: '503', param: null, code: 503 });
    expect([(await first).status, (await second).status]).toEqual([200, 200]);
  });

  test('/metrics: sglang:* series with model_name and engine_type labels', async () => {
    const res = await httpRequest(`${main.url}/metrics`);
    expect(res.status).toBe(200);
    const text = res.body;
    for (const name of ['sglang:num_running_reqs', 'sglang:num_queue_reqs', 'sglang:token_usage', 'sglang:gen_throughput', 'sglang:cache_hit_rate']) {
      expect(text).toContain(`${name}{model_name="sim-model",engine_type="unified",tp_rank="0",pp_rank="0",moe_ep_rank="0"}`);
    }
    for (const name of ['sglang:prompt_tokens_total', 'sglang:generation_tokens_total', 'sglang:num_requests_total', 'sglang:e2e_request_latency_seconds_count', 'sglang:time_to_first_token_seconds_count']) {
      expect(text).toMatch(new RegExp(`^${name}\\{model_name="sim-model",engine_type="unified"\\} \\d+\\.\\d+$`, 'm'));
    }
    expect(text).not.toContain('vllm:');
    // A Mount of make_asgi_app: every path under /metrics, every method, the body unsized (chunked).
    for (const other of [res, await httpRequest(`${main.url}/metrics/`), await httpRequest(`${main.url}/metrics`, { method: 'POST', body: {} })]) {
      expect([other.status, other.headers['transfer-encoding'], other.body.includes('# TYPE sglang:num_running_reqs gauge')]).toEqual([200, 'chunked', true]);
    }
    // Without --enable-metrics there is no /metrics route.
    expect((await httpRequest(`${queue.url}/metrics`)).status).toBe(404);
    // Native info routes.
    expect(json((await httpRequest(`${main.url}/model_info`)).body)).toMatchObject({ model_path: 'sim-model', is_generation: true });
    expect(json((await httpRequest(`${main.url}/server_info`)).body)).toMatchObject({ served_model_name: 'sim-model', context_length: 64 });
    // The native /generate (the warm-up uses it): text plus meta_info with SGLang's finish_reason.
    const generated = json((await httpRequest(`${main.url}/generate`, { body: { text: 'a b c', sampling_params: { max_new_tokens: 2 } } })).body);
    expect(generated).toMatchObject({
      text: 'a b',
      meta_info: { finish_reason: { type: 'length', length: 2 }, prompt_tokens: 3, completion_tokens: 2 },
    });
    const flushed = await httpRequest(`${main.url}/flush_cache`, { method: 'POST' });
    expect(flushed.status).toBe(200);
    expect(flushed.body.startsWith('Cache flushed.\n')).toBe(true);
  });

  test('--api-key guards every path but OPTIONS, /health* and /metrics*', async () => {
    const key = { authorization: 'Bearer sk-test' };
    for (const p of ['/v1/models', '/model_info', '/get_load', '/no/such/route', '/ping']) {
      const res = await httpRequest(`${auth.url}${p}`);
      expect([p, res.status, res.body]).toEqual([p, 401, '{"error":"Unauthorized"}']);
    }
    expect((await httpRequest(`${auth.url}/v1/models`, { headers: { authorization: 'Bearer wrong' } })).status).toBe(401);
    expect((await httpRequest(`${auth.url}/v1/models`, { headers: key })).status).toBe(200);
    expect((await httpRequest(`${auth.url}/health`)).status).toBe(200);
    expect((await httpRequest(`${auth.url}/metrics`)).status).toBe(200);
    const preflight = await httpRequest(`${auth.url}/v1/chat/completions`, {
      method: 'OPTIONS',
      headers: { origin: 'http://ui', 'access-control-request-method': 'POST' },
    });
    expect(preflight.status).toBe(200);
    expect(preflight.headers['access-control-allow-origin']).toBe('http://ui');
    const done = await httpRequest(`${auth.url}/v1/chat/completions`, { body: chat('ok'), headers: key });
    expect(json(done.body).choices[0].message.content).toBe('ok');
  });

  test('release/resume_memory_occupation: 200 null; requests wait while released; busy → 400', async () => {
    const noBody = await httpRequest(`${saver.url}/release_memory_occupation`, { method: 'POST' });
    expect(noBody.status).toBe(400);
    expect(json(noBody.body)).toMatchObject({ type: 'Bad Request', code: 400 });

    const released = await httpRequest(`${saver.url}/release_memory_occupation`, { body: {} });
    expect([released.status, released.body]).toEqual([200, 'null']);
    let answered = false;
    const waiting = httpRequest(`${saver.url}/v1/chat/completions`, { body: chat('after wake') }).then((r) => {
      answered = true;
      return r;
    });
    await sleep(400);
    expect(answered).toBe(false);
    const busy = await httpRequest(`${saver.url}/release_memory_occupation`, { body: { tags: ['kv_cache'] } });
    expect(busy.status).toBe(400);
    expect(json(busy.body)).toEqual({ error: { message: 'release_memory_occupation should be called only when server is idle.' } });
    const resumed = await httpRequest(`${saver.url}/resume_memory_occupation`, { body: { tags: ['weights', 'kv_cache'] } });
    expect([resumed.status, resumed.body]).toEqual([200, 'null']);
    expect(json((await waiting).body).choices[0].message.content).toBe('after wake');
  });

  test('LoRA: static --lora-paths, load/unload results, `base:adapter` selects an adapter', async () => {
    const cards = json((await httpRequest(`${lora.url}/v1/models`)).body).data;
    expect(cards[1]).toMatchObject({ id: 'static', root: '/adapters/static', parent: 'sim-model', max_model_len: null, owned_by: 'sglang' });

    const loaded = await httpRequest(`${lora.url}/load_lora_adapter`, { body: { lora_name: 'sql', lora_path: '/adapters/sql' } });
    expect(loaded.status).toBe(200);
    expect(json(loaded.body)).toEqual({
      success: true,
      error_message: null,
      loaded_adapters: { static: '/adapters/static', sql: '/adapters/sql' },
    });
    const again = await httpRequest(`${lora.url}/load_lora_adapter`, { body: { lora_name: 'sql', lora_path: '/x' } });
    expect(again.status).toBe(400);
    // A failure reports the adapters loaded all the same.
    expect(json(again.body)).toEqual({
      success: false,
      error_message: "LoRA with name sql already exists. Loaded LoRAs: dict_keys(['static', 'sql'])",
      loaded_adapters: { static: '/adapters/static', sql: '/adapters/sql' },
    });

    const used = json((await httpRequest(`${lora.url}/v1/chat/completions`, { body: chat('hi', { model: 'sim-model:sql' }) })).body);
    expect(used).toMatchObject({ model: 'sim-model:sql', choices: [{ message: { content: 'hi' } }] });
    const unknown = await httpRequest(`${lora.url}/v1/chat/completions`, { body: chat('hi', { model: 'sim-model:nope' }) });
    expect([unknown.status, json(unknown.body).type]).toEqual([400, 'BadRequest']);

    expect(json((await httpRequest(`${lora.url}/unload_lora_adapter`, { body: { lora_name: 'sql' } })).body)).toEqual({
      success: true,
      error_message: null,
      loaded_adapters: { static: '/adapters/static' },
    });
    const gone = await httpRequest(`${lora.url}/unload_lora_adapter`, { body: { lora_name: 'sql' } });
    expect([gone.status, json(gone.body)]).toEqual([
      400,
      {
        success: false,
        error_message: "LoRA with name sql does not exist. Loaded LoRAs: dict_keys(['static'])",
        loaded_adapters: { static: '/adapters/static' },
      },
    ]);
    // Without --enable-lora the load is refused with SGLang's result shape.
    const disabled = await httpRequest(`${main.url}/load_lora_adapter`, { body: { lora_name: 'a', lora_path: '/a' } });
    expect(disabled.status).toBe(400);
    expect(json(disabled.body)).toEqual({
      success: false,
      error_message: 'LoRA is not enabled. Please set `--enable-lora` to enable LoRA.',
      loaded_adapters: {},
    });
  });
});

describe('--is-embedding', () => {
  let emb: Sgl;

  beforeAll(async () => {
    emb = await startSgl({ args: ['--is-embedding', '--served-model-name', 'emb'] });
  });

  afterAll(async () => {
    emb.kill('SIGKILL');
    await expectNoProcessLeft(emb.pid);
  });

  test('warms up on /encode; /model_info says is_generation false', async () => {
    expect(emb.stdoutLines.join('\n')).toMatch(/INFO: {5}127\.0\.0\.1:\d+ - "POST \/encode HTTP\/1\.1" 200 OK/);
    expect(json((await httpRequest(`${emb.url}/model_info`)).body)).toMatchObject({ model_path: 'sim-model', is_generation: false });
    expect((await httpRequest(`${emb.url}/health`)).status).toBe(200);
  });

  test('/v1/embeddings: deterministic unit vectors per input, the model path as model, prompt usage', async () => {
    const res = await httpRequest(`${emb.url}/v1/embeddings`, { body: { model: 'emb', input: ['hello world', 'x'] } });
    expect(res.status).toBe(200);
    const body = json(res.body);
    expect(Object.keys(body)).toEqual(['data', 'model', 'object', 'usage']);
    expect(body).toMatchObject({
      model: 'sim-model',
      object: 'list',
      usage: { prompt_tokens: 3, total_tokens: 3, completion_tokens: 0, prompt_tokens_details: null, reasoning_tokens: 0 },
    });
    expect(body.data.map((d: any) => [Object.keys(d), d.index, d.object, d.embedding.length])).toEqual([
      [['embedding', 'index', 'object'], 0, 'embedding', 1024],
      [['embedding', 'index', 'object'], 1, 'embedding', 1024],
    ]);
    const norm = Math.sqrt(body.data[0].embedding.reduce((s: number, x: number) => s + x * x, 0));
    expect(norm).toBeCloseTo(1, 5);
    // The same prompt, as text or as its token ids, gives the same vector.
    const ids = json((await httpRequest(`${emb.url}/tokenize`, { body: { prompt: 'hello world' } })).body).tokens;
    const again = json((await httpRequest(`${emb.url}/v1/embeddings`, { body: { input: ids } })).body);
    expect(again.data[0].embedding).toEqual(body.data[0].embedding);
    const dims = await httpRequest(`${emb.url}/v1/embeddings`, { body: { input: 'a', dimensions: 8 } });
    expect([dims.status, json(dims.body).type, json(dims.body).message]).toEqual([
      400,
      'BadRequestError',
      "Model 'sim-model' does not support matryoshka representation, changing output dimensions will lead to poor results.",
    ]);
    // The native /encode: one {embedding, meta_info}, a list for a batch.
    const one = json((await httpRequest(`${emb.url}/encode`, { body: { text: 'hello world' } })).body);
    expect(one.embedding).toEqual(body.data[0].embedding);
    expect(one.meta_info).toMatchObject({ finish_reason: { type: 'length', length: 0 }, prompt_tokens: 2, weight_version: 'default' });
    expect(json((await httpRequest(`${emb.url}/encode`, { body: { text: ['a', 'b'] } })).body)).toHaveLength(2);
  });

  test('/v1/rerank, /v1/classify and /v1/score answer from the pooled outputs', async () => {
    const rerank = json((await httpRequest(`${emb.url}/v1/rerank`, { body: { query: 'q', documents: ['a', 'b', 'c'] } })).body);
    expect(rerank.map((r: any) => Object.keys(r))).toEqual(Array(3).fill(['score', 'document', 'index', 'meta_info']));
    expect([...rerank.map((r: any) => r.score)].sort((a, b) => b - a)).toEqual(rerank.map((r: any) => r.score));
    expect(rerank.map((r: any) => r.index).sort()).toEqual([0, 1, 2]);
    const top = json((await httpRequest(`${emb.url}/v1/rerank`, { body: { query: 'q', documents: ['a', 'b', 'c'], top_n: 1, return_documents: false } })).body);
    expect(top).toEqual([{ score: rerank[0].score, index: rerank[0].index, meta_info: expect.any(Object) }]);
    const classify = json((await httpRequest(`${emb.url}/v1/classify`, { body: { input: ['a', 'b'] } })).body);
    expect(classify).toMatchObject({ object: 'list', model: 'emb', usage: { prompt_tokens: 2, completion_tokens: 0 } });
    expect(classify.id).toMatch(/^classify-[0-9a-f]{32}$/);
    expect(classify.data.map((d: any) => Object.keys(d))).toEqual([
      ['index', 'label', 'probs', 'num_classes'],
      ['index', 'label', 'probs', 'num_classes'],
    ]);
    // No label_token_ids needed: an embedding model's score is its pooled output.
    const score = json((await httpRequest(`${emb.url}/v1/score`, { body: { query: 'q', items: ['a'] } })).body);
    expect([score.scores.length, score.scores[0].length, score.object]).toEqual([1, 1024, 'scoring']);
  });

  test('generation routes fail as SGLang fails on a pooled output without text', async () => {
    const completion = await httpRequest(`${emb.url}/v1/chat/completions`, { body: chat('hi') });
    expect([completion.status, json(completion.body)]).toEqual([
      500,
      { object: 'error', message: "Internal server error: 'text'", type: 'InternalServerError', param: null, code: 500 },
    ]);
    const responses = await httpRequest(`${emb.url}/v1/responses`, { body: { model: 'emb', input: 'hi' } });
    expect([responses.status, json(responses.body)]).toEqual([
      400,
      { error: { message: "'text'", type: 'invalid_request_error', param: null, code: 400 } },
    ]);
  });
});

describe('processes and signals', () => {
  test('the scheduler and detokenizer die at once when the main process is SIGKILLed', async () => {
    const sgl = await startSgl({ args: ['--tp-size', '2'], ready: true });
    const kids = descendantsOf(sgl.pid);
    expect(kids.map(cmdline).sort()).toEqual(['sglang::detokenizer', 'sglang::scheduler_TP0', 'sglang::scheduler_TP1']);
    expect(sgl.stdoutLines.some((l) => / TP0\] Load weight end\./.test(l))).toBe(true);
    process.kill(sgl.pid, 'SIGKILL');
    await sgl.waitForExit();
    await waitUntil(() => kids.every((p) => !pidAlive(p)), 1500, 20, 'children gone');
    expect(groupPids(sgl.pid)).toEqual([]);
  });

  test('SIGTERM: /health 503, in-flight requests drain, `Gracefully exiting...` logs, exit 0', async () => {
    const sgl = await startSgl({ env: { VLLM_SIM_ITL_MS: '100', VLLM_SIM_WATCHDOG_SECONDS: '1' } });
    const inFlight = httpRequest(`${sgl.url}/v1/chat/completions`, { body: chat(words(15)) });
    await waitUntil(async () => json((await httpRequest(`${sgl.url}/get_load`)).body)[0].num_reqs === 1, 3000);
    process.kill(sgl.pid, 'SIGTERM');
    await sgl.waitForLine(/SIGTERM received\. signum=None frame=None\. Draining requests and shutting down\.\.\./);
    const health = await httpRequest(`${sgl.url}/health`);
    expect(health.status).toBe(503);
    await sgl.waitForLine(/Gracefully exiting\.\.\. Remaining number of requests 1\. Remaining requests remaining_rids=\['chatcmpl-[0-9a-f]{32}'\]\./);
    const done = json((await inFlight).body);
    expect(done.choices[0]).toMatchObject({ finish_reason: 'stop', message: { content: words(15) } });
    const status = await sgl.waitForExit(8000);
    expect(status.code).toBe(0);
    expect(sgl.output).toContainEqual(expect.stringMatching(/Gracefully exiting\.\.\. Remaining number of requests 0\. Remaining requests remaining_rids=\[\]\./));
    expect(sgl.output).toContainEqual(expect.stringContaining('Health check request received during shutdown. Returning 503.'));
    await expectNoProcessLeft(sgl.pid);
  });

  test('SIGTERM to the whole group while idle: the children go at once, the server exits 0', async () => {
    const sgl = await startSgl({ env: { VLLM_SIM_WATCHDOG_SECONDS: '1' } });
    sgl.kill('SIGTERM');
    expect((await sgl.waitForExit(5000)).code).toBe(0);
    await expectNoProcessLeft(sgl.pid);
  });

  test('SIGTERM during model load ends the process by the signal; the children follow', async () => {
    const sgl = await startSgl({ ready: false, env: { VLLM_SIM_LOAD_SECONDS: '5' } });
    await sgl.waitForLine(/Load weight begin/);
    await waitUntil(() => descendantsOf(sgl.pid).length === 2, 2000);
    process.kill(sgl.pid, 'SIGTERM');
    expect((await sgl.waitForExit()).signal).toBe('SIGTERM');
    await expectNoProcessLeft(sgl.pid);
  });

  test('a scheduler killed from outside: admin calls answer at once (memory 400 with the error, the others a plain 500)', async () => {
    const sgl = await startSgl({ args: ['--enable-memory-saver'] });
    const scheduler = descendantsOf(sgl.pid).find((p) => cmdline(p) === 'sglang::scheduler') as number;
    process.kill(scheduler, 'SIGKILL'); // no SIGQUIT: the server lives on without it
    await sgl.waitForLine(/Child process unexpectedly failed with exitcode=/);
    const [release, resume, flush, pause] = await Promise.all([
      httpRequest(`${sgl.url}/release_memory_occupation`, { body: {}, timeoutMs: 3000 }),
      httpRequest(`${sgl.url}/resume_memory_occupation`, { body: {}, timeoutMs: 3000 }),
      httpRequest(`${sgl.url}/flush_cache`, { method: 'POST', timeoutMs: 3000 }),
      httpRequest(`${sgl.url}/pause_generation`, { method: 'POST', timeoutMs: 3000 }),
    ]);
    expect([release.status, json(release.body)]).toEqual([400, { error: { message: 'engine is dead' } }]);
    expect([resume.status, json(resume.body)]).toEqual([400, { error: { message: 'engine is dead' } }]);
    expect([flush.status, flush.body]).toEqual([500, 'Internal Server Error']);
    expect([pause.status, pause.body]).toEqual([500, 'Internal Server Error']);
    sgl.kill('SIGKILL');
    await expectNoProcessLeft(sgl.pid);
  });

  test('a scheduler failure (VLLM_SIM_CRASH_ON_LOAD) SIGQUITs the server, which kills the tree', async () => {
    const sgl = await startSgl({ ready: false, env: { VLLM_SIM_CRASH_ON_LOAD: '1' } });
    expect((await sgl.waitForExit()).signal).toBe('SIGKILL');
    const out = sgl.output.join('\n');
    expect(out).toContain('Scheduler hit an exception: Traceback (most recent call last):');
    expect(out).toContain('Received sigquit from a child process. It usually means the child failed.');
    await expectNoProcessLeft(sgl.pid);
  });

  test('VLLM_SIM_IGNORE_SIGTERM: the server and its children outlive SIGTERM; SIGKILL ends them', async () => {
    const sgl = await startSgl({ args: ['--skip-server-warmup'], env: { VLLM_SIM_IGNORE_SIGTERM: '1', VLLM_SIM_WATCHDOG_SECONDS: '1' } });
    sgl.kill('SIGTERM');
    await sleep(500);
    expect(groupPids(sgl.pid)).toHaveLength(3);
    sgl.kill('SIGKILL');
    await expectNoProcessLeft(sgl.pid);
  });

  test('VLLM_SIM_FAIL_NTH_REQUEST answers with SGLang\'s 500; VLLM_SIM_HEALTH_DELAY_MS delays /health', async () => {
    const sgl = await startSgl({ env: { VLLM_SIM_FAIL_NTH_REQUEST: '1', VLLM_SIM_HEALTH_DELAY_MS: '300' } });
    const started = Date.now();
    expect((await httpRequest(`${sgl.url}/health`)).status).toBe(200);
    expect(Date.now() - started).toBeGreaterThanOrEqual(1250);
    const res = await httpRequest(`${sgl.url}/v1/chat/completions`, { body: chat('x') });
    expect(res.status).toBe(500);
    expect(json(res.body)).toMatchObject({ object: 'error', type: 'InternalServerError', code: 500 });
    expect(json(res.body).message).toMatch(/^Internal server error: /);
    expect((await httpRequest(`${sgl.url}/v1/chat/completions`, { body: chat('x') })).status).toBe(200);
    sgl.kill('SIGKILL');
    await expectNoProcessLeft(sgl.pid);
  });
});
