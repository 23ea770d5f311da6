/**
 * tide-vllm with `vllm.engine: sglang`, against the simulator's SGLang mode
 * (`main.js sglang serve ...`): start-up through SGLang's warm-up, SGLang's argv, the simple and
 * OpenAI APIs (embeddings and the Responses API included), relayed rejections, `sglang:*` metrics, sleep level 1 through
 * release/resume_memory_occupation, LoRA through /admin/lora, and SIGTERM of the whole group.
 */
import { type Service, logged, post, startService, stopAllServices, vllmLog as engineLog } from './service';
import { cmdline, descendantsOf, groupPids, killAll, pidAlive, readSse, requirePid, signalGroup, simMain, waitUntil } from './harness';

afterAll(async () => {
  await stopAllServices();
  await killAll();
});

jest.setTimeout(30_000);

const KEY = 'sglang-e2e-key';
const AUTH = { authorization: `Bearer ${KEY}` };

/** The simulator as SGLang. Its /health runs a generation and answers after >= 1 s: probes need time. */
const SGLANG = { engine: 'sglang', command: [process.execPath, simMain, 'sglang', 'serve'], health_interval: 0.5, health_timeout: 3 };

async function status(svc: Service): Promise<Record<string, any>> {
  return (await svc.json('/admin/status', { headers: AUTH })).body;
}

describe('tide-vllm with engine sglang', () => {
  let svc: Service;
  let states: string[];

  beforeAll(async () => {
    svc = await startService({
      config: {
        vllm: {
          ...SGLANG,
          stop_timeout: 10,
          sleep: { idle_seconds: 300, level: 1 },
          lora: { enabled: true, max_loras: 2, modules: { static: '/adapters/static' } },
          extra_args: { 'log-requests': true }, // SGLang logs each request's lora_path
        },
        auth: { api_keys: [KEY] },
      },
      env: { VLLM_SIM_TTFT_MS: '5', VLLM_SIM_ITL_MS: '2', VLLM_SIM_WATCHDOG_SECONDS: '1' },
      waitFor: null,
    });
    // Watch /health while SGLang loads and warms up.
    states = [];
    await waitUntil(
      async () => {
        if (svc.proc.exited) throw new Error(`service exited:\n${svc.proc.output.join('\n')}`);
        const s = String((await svc.health().catch(() => ({ status: 'no answer' }))).status);
        if (states.at(-1) !== s) states.push(s);
        return s === 'healthy';
      },
      20_000,
      50,
      'healthy',
    );
  });

  it("becomes healthy only after SGLang's warm-up, with SGLang's flags in the argv", async () => {
    expect(states.filter((st) => st !== 'no answer')[0]).toBe('starting');
    expect(states.at(-1)).toBe('healthy');
    await logged(svc, 'The server is fired up and ready to roll!');
    const log = engineLog(svc);
    // While warming up SGLang listens and lists the model but answers /health with 503.
    expect(log).toMatch(/"GET \/v1\/models HTTP\/1\.1" 200 OK/);
    expect(log).toMatch(/"GET \/health HTTP\/1\.1" 503 Service Unavailable/);
    expect(log.indexOf('"GET /health HTTP/1.1" 503')).toBeLessThan(log.indexOf('The server is fired up and ready to roll!'));
    expect(log.indexOf('The server is fired up and ready to roll!')).toBeLessThan(log.indexOf('"GET /health HTTP/1.1" 200 OK'));

    const s = await status(svc);
    expect(s).toMatchObject({ engine: 'sglang', state: 'ready', model: 'sim-model' });
    const argv: string[] = s.argv;
    expect(argv.slice(0, 4)).toEqual([process.execPath, simMain, 'sglang', 'serve']);
    const flags = argv.slice(4).join(' ');
    expect(flags).toBe(
      `--model-path sim-model --served-model-name sim-model --host 127.0.0.1 --port ${svc.vllmPort} ` +
        '--mem-fraction-static 0.9 --tp-size 1 --max-running-requests 256 --max-prefill-tokens 8192 ' +
        '--context-length 256 --dtype auto --enable-memory-saver --enable-weights-cpu-backup ' +
        '--enable-lora --max-loras-per-batch 2 --max-lora-rank 16 --lora-paths static=/adapters/static ' +
        '--api-key *** --enable-metrics --log-requests',
    );
    // SGLang prints its arguments (server_args=ServerArgs(... api_key='…')): the per-start key is hidden there too.
    const key = /--api-key (\S+)/.exec(cmdline(s.pid))?.[1] ?? '';
    expect(key).toMatch(/^[0-9a-f]{48}$/);
    expect(log).toContain("api_key='***'");
    expect([log.includes(key), svc.proc.output.some((line) => line.includes(key))]).toEqual([false, false]);
    // SGLang's children run in the engine's process group.
    const kids = descendantsOf(s.pid).map(cmdline).sort();
    expect(kids).toEqual(['sglang::detokenizer', 'sglang::scheduler']);
  });

  it('answers the simple API, plain and streamed', async () => {
    const plain = await svc.json('/chat/completions', post({ prompt: 'alpha beta gamma', system_prompt: '' }, AUTH));
    expect(plain.status).toBe(200);
    expect(plain.body).toMatchObject({ content: 'alpha beta gamma', model: 'sim-model', finish_reason: 'stop', error: null });
    expect(plain.body.usage).toMatchObject({ completion_tokens: 4 });

    const sse = await readSse(`${svc.url}/chat/completions`, { prompt: 'one two three', stream: true }, { headers: AUTH });
    expect(sse.status).toBe(200);
    const text = sse.events
      .filter((e) => e !== '[DONE]')
      .map((e) => JSON.parse(e))
      .map((e) => e.content ?? e.delta ?? '')
      .join('');
    expect(text).toContain('one two three');
    expect(sse.events.at(-1)).toBe('[DONE]');
  });

  it("relays the OpenAI API as SGLang answers it (model echoed, SGLang's chunks)", async () => {
    const res = await svc.json('/v1/chat/completions', post({ model: 'sim-model', messages: [{ role: 'user', content: 'red green' }] }, AUTH));
    expect(res.status).toBe(200);
    expect(res.body).toMatchObject({
      object: 'chat.completion',
      model: 'sim-model',
      choices: [{ message: { content: 'red green' }, finish_reason: 'stop', matched_stop: 151645 }],
      metadata: { weight_version: 'default' },
    });
    const sse = await readSse(
      `${svc.url}/v1/chat/completions`,
      { messages: [{ role: 'user', content: 'x y' }], stream: true, stream_options: { include_usage: true } },
      { headers: AUTH },
    );
    expect(sse.status).toBe(200);
    expect(sse.events.at(-1)).toBe('[DONE]');
    const chunks = sse.events.slice(0, -1).map((e) => JSON.parse(e));
    expect(chunks[0].choices[0].delta).toMatchObject({ role: 'assistant', content: '' });
    expect(chunks.find((c) => c.choices[0]?.finish_reason)?.choices[0]).toMatchObject({ finish_reason: 'stop', delta: { content: null } });
    expect(chunks.at(-1)).toMatchObject({ choices: [], usage: { completion_tokens: 3 } });
    // The model defaults to vllm.model_name for callers that send none.
    expect(chunks[0].model).toBe('sim-model');
    // One model's card (the SDKs' models.retrieve), as SGLang serves it.
    const card = await svc.json('/v1/models/sim-model', { headers: AUTH });
    expect([card.status, card.body]).toEqual([200, expect.objectContaining({ id: 'sim-model', object: 'model', owned_by: 'sglang' })]);
    // A name with slashes (`{model:path}`: a Hugging Face id, as the Python SDK and curl send it) is SGLang's to answer too.
    for (const path of ['/v1/models/org/other-model', '/v1/models/org%2Fother-model']) {
      const other = await svc.json(path, { headers: AUTH });
      expect([path, other.status, other.body]).toEqual([path, 404, { error: expect.objectContaining({ message: "The model 'org/other-model' does not exist", code: 'model_not_found' }) }]);
    }
  });

  it("relays what SGLang rejects, in SGLang's flat error shape", async () => {
    const res = await svc.request('/v1/chat/completions', post({ messages: [{ role: 'user', content: 'x' }], temperature: -1 }, AUTH));
    expect(res.status).toBe(400);
    expect(JSON.parse(res.body)).toEqual({
      object: 'error',
      message: 'temperature must be a non-negative finite number, got -1.0.',
      type: 'BadRequest', // SGLang's own name for a ValueError (protocol, Errors (SGLang))
      param: null,
      code: 400,
    });
    const tokens = await svc.json('/tokenize', post({ prompt: 'a b c' }, AUTH));
    expect(tokens.body).toMatchObject({ count: 3, max_model_len: 256 });
  });

  it("relays SGLang's /v1/tokenize, /v1/detokenize and /v1/classify, and lists them (and /v1/models/{model}) in /openapi.json", async () => {
    const tokens = await svc.json<{ tokens: number[]; count: number }>('/v1/tokenize', post({ prompt: 'a b c' }, AUTH));
    expect([tokens.status, tokens.body]).toEqual([200, { tokens: expect.any(Array), count: 3, max_model_len: 256 }]);
    const text = await svc.json('/v1/detokenize', post({ tokens: tokens.body.tokens }, AUTH));
    expect([text.status, text.body]).toEqual([200, { text: 'a b c' }]);
    // A generation model refuses classification: SGLang's flat 400, relayed as it is.
    const classify = await svc.json('/v1/classify', post({ input: 'hello' }, AUTH));
    expect([classify.status, classify.body]).toEqual([400, expect.objectContaining({ object: 'error', type: 'BadRequestError', code: 400 })]);
    expect((await svc.request('/v1/tokenize', post({ prompt: 'a' }))).status).toBe(401); // behind the API key, as the other routes
    const spec = await svc.json<{ paths: Record<string, unknown> }>('/openapi.json');
    expect(Object.keys(spec.body.paths)).toEqual(expect.arrayContaining(['/v1/tokenize', '/v1/detokenize', '/v1/classify', '/v1/models/{model}']));
  });

  it('relays /v1/embeddings and /v1/responses as SGLang answers them (status and body)', async () => {
    // A generation model refuses embeddings: SGLang's flat 400, relayed as it is.
    const embeddings = await svc.request('/v1/embeddings', post({ input: 'hello world' }, AUTH));
    expect([embeddings.status, JSON.parse(embeddings.body)]).toEqual([
      400,
      {
        object: 'error',
        message:
          'This model does not appear to be an embedding model by default. Please add `--is-embedding` when launching the server or try another model.',
        type: 'BadRequestError',
        param: null,
        code: 400,
      },
    ]);
    // SGLang's Responses object (tide-vllm names the model for a caller that sends none).
    const res = await svc.json<Record<string, any>>('/v1/responses', post({ input: 'red green', max_output_tokens: 10 }, AUTH));
    expect(res.status).toBe(200);
    expect(res.body).toMatchObject({
      object: 'response',
      model: 'sim-model',
      status: 'completed',
      output: [{ type: 'message', content: [{ type: 'output_text', text: 'red green' }] }],
      usage: { prompt_tokens: 7, completion_tokens: 3, total_tokens: 10 },
    });
    expect(res.body.id).toMatch(/^resp_[0-9a-f]{32}$/);
    // Its stream: named events, whole, ending with response.completed.
    const sse = await readSse(`${svc.url}/v1/responses`, { input: 'x y', max_output_tokens: 10, stream: true }, { headers: AUTH });
    expect(sse.status).toBe(200);
    const types = [...sse.raw.matchAll(/^event: (\S+)$/gm)].map((m) => m[1]);
    expect(types[0]).toBe('response.created');
    expect(types.at(-1)).toBe('response.completed');
    expect(JSON.parse(sse.events.at(-1) as string).response).toMatchObject({ status: 'completed', usage: { input_tokens: 7, output_tokens: 3 } });
    // SGLang's max(context − prompt, 512) − 2 new tokens exceed a 256-token context: its nested 400, relayed.
    const tooLong = await svc.request('/v1/responses', post({ input: 'x y' }, AUTH));
    expect(tooLong.status).toBe(400);
    expect(JSON.parse(tooLong.body).error).toMatchObject({ type: 'invalid_request_error', code: 400 });
  });

  it('/metrics includes the sglang:* series next to tide_*', async () => {
    const text = (await svc.request('/metrics')).body;
    expect(text).toMatch(/^tide_http_requests_total\{/m);
    expect(text).toMatch(/^sglang:num_requests_total\{model_name="sim-model",engine_type="unified"\} \d+\.0$/m);
    expect(text).toMatch(/^sglang:num_running_reqs\{model_name="sim-model",/m);
    expect(text).toMatch(/^sglang:prompt_tokens_total\{/m);
  });

  it('sleep level 1 releases memory; the next request resumes it', async () => {
    const asleep = await svc.json('/admin/sleep', post(undefined, AUTH));
    expect(asleep.status).toBe(200);
    expect(asleep.body).toMatchObject({ state: 'sleeping', sleep_level: 1, sleeps: 1 });
    await logged(svc, '"POST /release_memory_occupation HTTP/1.1" 200 OK');
    const chat = await svc.json('/chat/completions', post({ prompt: 'wake up' }, AUTH));
    expect(chat.status).toBe(200);
    expect(chat.body.content).toBe('wake up');
    await logged(svc, '"POST /resume_memory_occupation HTTP/1.1" 200 OK');
    expect(await status(svc)).toMatchObject({ state: 'ready', sleeping: false, wakeups: 1 });
  });

  it('loads and unloads LoRA adapters through /admin/lora', async () => {
    const loaded = await svc.json('/admin/lora', post({ name: 'sql', path: '/adapters/sql' }, AUTH));
    expect(loaded.status).toBe(200);
    expect(loaded.body).toEqual({ loaded: 'sql', lora_adapters: { static: '/adapters/static', sql: '/adapters/sql' } });
    const models = await svc.json<{ data: Array<{ id: string; parent: string | null }> }>('/v1/models', { headers: AUTH });
    expect(models.body.data.map((m) => [m.id, m.parent])).toEqual([
      ['sim-model', null],
      ['static', 'sim-model'],
      ['sql', 'sim-model'],
    ]);
    // SGLang selects an adapter with `base:adapter`.
    const used = await svc.json('/v1/chat/completions', post({ model: 'sim-model:sql', messages: [{ role: 'user', content: 'select' }] }, AUTH));
    expect(used.body).toMatchObject({ model: 'sim-model:sql', choices: [{ message: { content: 'select' } }] });
    await logged(svc, '"POST /load_lora_adapter HTTP/1.1" 200 OK');
    // A load SGLang refuses (400 with success false) is an error for the caller too.
    const dup = await svc.json<{ error: { message: string } }>('/admin/lora', post({ name: 'static', path: '/elsewhere' }, AUTH));
    expect(dup.status).toBe(400);
    expect(dup.body.error.message).toContain('static');
    // Naming a loaded adapter as `model` selects it under SGLang too (tide-vllm adds lora_path).
    const named = await svc.json('/v1/chat/completions', post({ model: 'sql', messages: [{ role: 'user', content: 'by name' }] }, AUTH));
    expect(named.status).toBe(200);
    await logged(svc, "lora_path='sql')", 2); // the base:adapter request above, and this one

    const unloaded = await svc.json(`/admin/lora/sql`, { method: 'DELETE', headers: AUTH });
    expect(unloaded.status).toBe(200);
    expect(unloaded.body).toEqual({ unloaded: 'sql', lora_adapters: { static: '/adapters/static' } });
    await logged(svc, '"POST /unload_lora_adapter HTTP/1.1" 200 OK');
  });

  it('unloading an unknown adapter is a 404, a configured one a 409 that leaves it loaded', async () => {
    const unknown = await svc.json<{ error: { type: string; message: string } }>('/admin/lora/nope', { method: 'DELETE', headers: AUTH });
    expect(unknown.status).toBe(404);
    expect(unknown.body.error).toEqual({ type: 'not_found', message: "there is no LoRA adapter named 'nope'" });
    const configured = await svc.json<{ error: { message: string } }>('/admin/lora/static', { method: 'DELETE', headers: AUTH });
    expect(configured.status).toBe(409);
    expect(configured.body.error.message).toContain("'static' is configured in vllm.lora.modules");
    const models = await svc.json<{ data: Array<{ id: string }> }>('/v1/models', { headers: AUTH });
    expect(models.body.data.map((m) => m.id)).toContain('static');
    // Still an adapter tide-vllm selects by name (lora_path) under SGLang.
    const named = await svc.json('/v1/chat/completions', post({ model: 'static', messages: [{ role: 'user', content: 'still here' }] }, AUTH));
    expect(named.status).toBe(200);
    await logged(svc, "lora_path='static')");
  });

  it('a crash while asleep spends no restart: SGLang sleeps on as at level 3, and the next request starts it', async () => {
    const asleep = await svc.json('/admin/sleep', post(undefined, AUTH));
    expect(asleep.body).toMatchObject({ state: 'sleeping', sleep_level: 1 });
    const { pid, restarts } = await status(svc);
    signalGroup(requirePid(pid), 'SIGKILL');
    await waitUntil(async () => (await status(svc)).sleep_level === 3, 10_000, 50, 'the crash noticed');
    expect(await status(svc)).toMatchObject({ state: 'sleeping', pid: null, restarts });
    const chat = await svc.json('/chat/completions', post({ prompt: 'start again' }, AUTH));
    expect(chat.status).toBe(200);
    expect(chat.body.content).toBe('start again');
    const after = await status(svc);
    expect(after).toMatchObject({ state: 'ready', sleeping: false, sleep_level: null, restarts });
    expect(after.pid).not.toBe(pid);
  });

  it('SIGTERM stops the service and the whole SGLang process group', async () => {
    const { pid } = await status(svc);
    const kids = descendantsOf(pid);
    expect(kids).toHaveLength(2);
    const exit = await svc.stop(20_000);
    expect(exit.code).toBe(0);
    await waitUntil(() => groupPids(pid).length === 0 && !pidAlive(pid), 5_000, 50, 'SGLang group gone');
    expect(kids.some(pidAlive)).toBe(false);
    await logged(svc, 'SIGTERM received. signum=None frame=None. Draining requests and shutting down...');
    await logged(svc, 'Gracefully exiting... Remaining number of requests 0.');
  });
});

describe('tide-vllm with engine sglang, where SGLang differs from vLLM', () => {
  let svc: Service;

  beforeAll(async () => {
    svc = await startService({
      config: {
        vllm: {
          ...SGLANG,
          max_model_len: 256,
          max_tokens: 32,
          max_num_seqs: 1,
          sleep: { idle_seconds: 300, level: 1 },
          lora: { enabled: true, max_loras: 2, modules: { static: '/adapters/static' } },
          extra_args: { 'max-queued-requests': 1 },
        },
        web: { max_concurrent_requests: 10 },
      },
      env: { VLLM_SIM_TTFT_MS: '5', VLLM_SIM_ITL_MS: '20' },
    });
  });

  it('a model SGLang does not serve is refused as vLLM refuses it (SGLang answers any name with the base model)', async () => {
    const messages = [{ role: 'user', content: 'hi' }];
    for (const model of ['gpt-4o', 'sim-model:nope', 'nope']) {
      const res = await svc.json<{ error: { type: string; param: string; message: string } }>('/v1/chat/completions', post({ model, messages, max_tokens: 2 }));
      expect([model, res.status, res.body.error]).toEqual([model, 404, { type: 'NotFoundError', param: 'model', message: `The model \`${model}\` does not exist.`, code: 404 }]);
    }
    for (const model of ['sim-model', 'static', 'sim-model:static']) {
      expect([model, (await svc.json('/v1/chat/completions', post({ model, messages, max_tokens: 2 }))).status]).toEqual([model, 200]);
    }
  });

  it('a simple-API prompt that leaves the default max_tokens no room is answered with what fits (SGLang names no param)', async () => {
    const prompt = Array.from({ length: 235 }, (_, i) => `w${i}`).join(' '); // about 240 tokens of 256
    const res = await svc.json<{ finish_reason: string }>('/chat/completions', post({ prompt, system_prompt: '' }));
    expect(res.status).toBe(200);
  });

  it('an operator\'s sleep waits for the requests in SGLang to finish (it releases memory only when idle), else gives up awake (409)', async () => {
    const long = { messages: [{ role: 'user', content: 'a b c' }], stream: true, max_tokens: 40, ignore_eos: true }; // 0.8 s
    const first = readSse(`${svc.url}/v1/chat/completions`, long);
    await waitUntil(async () => /^sglang:num_running_reqs\{[^}]*\} 1(\.0)?$/m.test((await svc.request('/metrics')).body), 5_000, 10, 'running');
    const slept = await svc.json<{ state: string }>('/admin/sleep', { method: 'POST' });
    expect([slept.status, slept.body.state]).toEqual([200, 'sleeping']);
    expect((await first).events.at(-1)).toBe('[DONE]'); // whole
    expect((await svc.json('/admin/wake_up', { method: 'POST' })).status).toBe(200);
    // Requests still running after vllm.timeout: the sleep is given up, SGLang awake and serving.
    const impatient = await startService({
      config: { vllm: { ...SGLANG, timeout: 1, max_model_len: 256, sleep: { idle_seconds: 300, level: 1 } } },
      env: { VLLM_SIM_TTFT_MS: '5', VLLM_SIM_ITL_MS: '20' },
    });
    const stream = readSse(`${impatient.url}/v1/chat/completions`, { ...long, max_tokens: 120 }); // 2.4 s
    await waitUntil(async () => /^sglang:num_running_reqs\{[^}]*\} 1(\.0)?$/m.test((await impatient.request('/metrics')).body), 5_000, 10, 'running');
    const refused = await impatient.json<{ error: { type: string; message: string } }>('/admin/sleep', { method: 'POST' });
    expect([refused.status, refused.body.error.message]).toEqual([409, 'SGLang still had 1 request(s) running after 1 s (vllm.timeout): not put to sleep']);
    expect((await impatient.json<{ state: string }>('/admin/status')).body.state).toBe('ready');
    expect((await stream).events.at(-1)).toBe('[DONE]');
    // A restart while the sleep waits takes over: the sleep is a 409, and no release goes to SGLang.
    const again = readSse(`${impatient.url}/v1/chat/completions`, { ...long, max_tokens: 30 }); // 0.6 s
    await waitUntil(async () => /^sglang:num_running_reqs\{[^}]*\} 1(\.0)?$/m.test((await impatient.request('/metrics')).body), 5_000, 10, 'running');
    const sleeping = impatient.json('/admin/sleep', { method: 'POST' });
    await waitUntil(async () => (await impatient.json<{ state: string }>('/admin/status')).body.state === 'sleeping', 2_000, 10, 'falling asleep');
    const restarted = impatient.json('/admin/restart', { method: 'POST' });
    expect((await sleeping).status).toBe(409);
    expect((await restarted).status).toBe(200);
    await again;
    expect(engineLog(impatient)).not.toContain('/release_memory_occupation');
  });

  it("SGLang's full queue, said inside a stream, is a 503 to retry on the simple API, as before a stream", async () => {
    const busy = [1, 2].map(() => svc.json('/chat/completions', post({ prompt: 'x y z w', max_tokens: 50 }))); // one runs, one queues: 1 s each
    await waitUntil(async () => /^sglang:num_queue_reqs\{[^}]*\} 1(\.0)?$/m.test((await svc.request('/metrics')).body), 5_000, 10, 'a request queued');
    const streamed = await readSse(`${svc.url}/chat/completions`, { prompt: 'x y', stream: true });
    const plain = await svc.json<{ error: { type: string } }>('/chat/completions', post({ prompt: 'x y' }));
    await Promise.all(busy);
    expect([plain.status, plain.body.error.type]).toEqual([503, 'vllm_not_ready']);
    // Refused before any content: the answer is the 503 itself, not a stream.
    expect([streamed.status, JSON.parse(streamed.raw).error.type]).toEqual([503, 'vllm_not_ready']);
  });
});
