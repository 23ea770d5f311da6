/**
 * Integration tests of the vLLM simulator: the compiled dist/tools/vllm-sim/main.js runs as a real
 * child process on a free port and is checked against /work/shared/vllm-protocol.md (start-up,
 * CLI, routes and shapes, SSE, errors, aborts, metrics, sleep, LoRA, API key, signals, process
 * tree, fault injection). Run `npm run build` first.
 */
import http from 'node:http';
import net from 'node:net';
import path from 'node:path';
import {
  ExitStatus,
  SimHandle,
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
  signalGroup,
  simBinDir,
  simMain,
  sleep,
  spawnProcess,
  startSim,
  waitUntil,
} from './harness';

jest.setTimeout(30_000);
afterAll(killAll);

const JSON_HEADERS = { 'content-type': 'application/json' };
/** The vLLM version the simulator reports. */
const VERSION = '0.27.0';

function chatBody(content: string, extra: Record<string, unknown> = {}): Record<string, unknown> {
  return { model: 'sim-model', messages: [{ role: 'user', content }], ...extra };
}

function words(n: number): string {
  return Array.from({ length: n }, (_, i) => `w${i}`).join(' ');
}

/** A sample of /metrics, e.g. metric(text, 'vllm:request_success_total', 'finished_reason="abort"'). */
function metric(text: string, name: string, labelPart = ''): number {
  const line = text
    .split('\n')
    .find((l) => l.startsWith(`${name}{`) && l.includes(labelPart));
  if (!line) throw new Error(`no sample ${name} ${labelPart}`);
  return Number(line.slice(line.lastIndexOf(' ') + 1));
}

async function metrics(sim: SimHandle): Promise<string> {
  return (await httpRequest(`${sim.baseUrl}/metrics`)).body;
}

function engineOf(sim: SimHandle): number {
  const pid = descendantsOf(sim.pid).find((p) => cmdline(p) === 'VLLM::EngineCore');
  if (pid === undefined) throw new Error('no VLLM::EngineCore child');
  return pid;
}

function runCli(args: string[]): Promise<{ status: ExitStatus; stderr: string }> {
  const handle = spawnProcess(process.execPath, [simMain, ...args]);
  return handle.waitForExit().then((status) => ({ status, stderr: handle.stderrLines.join('\n') }));
}

function escapeRe(text: string): string {
  return text.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
}

function parsedEvents(events: string[]): Array<Record<string, any>> {
  return events.filter((e) => e !== '[DONE]').map((e) => JSON.parse(e));
}

/** POSTs `body` and reads the answer to its end, or to its break: whether the body came whole. */
function readToEnd(url: string, body: unknown): Promise<{ raw: string; complete: boolean }> {
  return new Promise((resolve, reject) => {
    const req = http.request(url, { method: 'POST', headers: JSON_HEADERS }, (res) => {
      let raw = '';
      res.setEncoding('utf8');
      res.on('data', (chunk: string) => (raw += chunk));
      res.on('error', () => undefined); // 'aborted': told by `complete`
      res.on('close', () => resolve({ raw, complete: res.complete }));
    });
    req.on('error', reject);
    req.end(JSON.stringify(body));
  });
}

describe('start-up', () => {
  test('refuses connections while the model loads, then logs vLLM start-up lines and serves', async () => {
    const port = await freePort();
    const sim = await startSim({
      port,
      ready: false,
      env: { VLLM_SIM_LOAD_SECONDS: '1', VLLM_DISABLE_LOG_LOGO: '1' },
    });
    await sim.waitForLine(/Starting to load model sim-model/);
    expect(await probeConnect(port)).toBe('ECONNREFUSED');
    await sim.waitForLine(/INFO: {5}Application startup complete\./);
    const health = await httpRequest(`${sim.baseUrl}/health`);
    expect(health.status).toBe(200);

    const prefix = `(APIServer pid=${sim.pid}) `;
    // vLLM's format: `(APIServer pid=N) INFO MM-DD HH:MM:SS [file.py:line] message`.
    const record = (message: string): RegExp =>
      new RegExp(`^${escapeRe(prefix)}INFO \\d\\d-\\d\\d \\d\\d:\\d\\d:\\d\\d \\[[\\w.]+:\\d+\\] ${escapeRe(message)}$`);
    const stdout = sim.stdoutLines;
    const indexOf = (text: string): number => stdout.findIndex((l) => l.includes(text));
    expect(stdout).toContainEqual(expect.stringMatching(record(`vLLM server version ${VERSION}, serving model sim-model`)));
    expect(stdout).toContainEqual(
      expect.stringMatching(
        record(`non-default args: {'model_tag': 'sim-model', 'host': '127.0.0.1', 'port': ${port}, 'model': 'sim-model'}`),
      ),
    );
    expect(stdout).toContainEqual(expect.stringMatching(record("Supported tasks: ('generate',)")));
    expect(indexOf(`Starting vLLM server on http://127.0.0.1:${port}`)).toBeGreaterThan(indexOf('Supported tasks'));
    expect(indexOf('Available routes are:')).toBeGreaterThan(indexOf('Starting vLLM server'));
    expect(stdout).toContainEqual(expect.stringContaining('Route: /v1/chat/completions, Methods: POST'));
    // The /metrics Mount has no methods: only the instrumentator's GET route is listed.
    expect(stdout.filter((l) => l.includes('Route: /metrics')).map((l) => l.slice(l.indexOf('Route:')))).toEqual([
      'Route: /metrics, Methods: GET',
    ]);
    expect(stdout).toContainEqual(expect.stringMatching(/^\(EngineCore pid=\d+\) INFO .*Loading weights took/));
    // The access line comes through a pipe and may trail the response it logs: wait for it.
    await sim.waitForLine(new RegExp(`^\\(APIServer pid=${sim.pid}\\) INFO: {5}127\\.0\\.0\\.1:\\d+ - "GET /health HTTP/1\\.1" 200 OK$`));
    expect(sim.stderrLines).toEqual([
      `${prefix}INFO:     Started server process [${sim.pid}]`,
      `${prefix}INFO:     Waiting for application startup.`,
      `${prefix}INFO:     Application startup complete.`,
    ]);

    // Process tree: one EngineCore child in the API server's own process group.
    const engine = engineOf(sim);
    expect(groupPids(sim.pid).sort()).toEqual([sim.pid, engine].sort());
    expect((await sim.stop()).code).toBe(0);
  });

  test('prints the logo with version and model unless VLLM_DISABLE_LOG_LOGO=1', async () => {
    const sim = await startSim({ model: 'org/logo-model' });
    const logo = sim.stdoutLines.filter((l) => l.includes('[utils.py:'));
    expect(logo.some((l) => /█ {2}version \d+\.\d+\.\d+$/.test(l))).toBe(true);
    expect(logo.some((l) => l.endsWith('█  model   org/logo-model'))).toBe(true);
    await sim.stop();
  });

  test('fails at once with OSError Errno 98 when the port is taken', async () => {
    const port = await freePort();
    const blocker = net.createServer();
    await new Promise<void>((resolve) => blocker.listen(port, '127.0.0.1', resolve));
    try {
      const sim = await startSim({ port, ready: false });
      const status = await sim.waitForExit();
      expect(status.code).toBe(1);
      expect(sim.stderrLines.at(-1)).toBe(`(APIServer pid=${sim.pid}) OSError: [Errno 98] Address already in use`);
      expect(sim.stderrLines).toContain(`(APIServer pid=${sim.pid}) Traceback (most recent call last):`);
      expect(sim.output.some((l) => l.includes('EngineCore'))).toBe(false);
      await expectNoProcessLeft(sim.pid);
    } finally {
      blocker.close();
    }
  });

  test('fails at the port check on any bind error, before the model loads (OSError Errno 99)', async () => {
    // 192.0.2.1 (TEST-NET-1) is no address of this host: bind() fails, nothing ever listens.
    const sim = await startSim({ ready: false, args: ['--host', '192.0.2.1'], env: { VLLM_SIM_LOAD_SECONDS: '30' } });
    const status = await sim.waitForExit(5000);
    expect(status.code).toBe(1);
    expect(sim.stderrLines.at(-1)).toBe(`(APIServer pid=${sim.pid}) OSError: [Errno 99] Cannot assign requested address`);
    expect(sim.stderrLines).toContain(`(APIServer pid=${sim.pid}) Traceback (most recent call last):`);
    expect(sim.output.some((l) => l.includes('EngineCore'))).toBe(false);
    await expectNoProcessLeft(sim.pid);
  });

  test('the bin/vllm wrapper runs the simulator from PATH and keeps the PID', async () => {
    const port = await freePort();
    const handle = spawnProcess('vllm', ['serve', 'wrapped', '--port', String(port), '--host', '127.0.0.1'], {
      env: { PATH: `${simBinDir}${path.delimiter}${process.env.PATH}`, VLLM_SIM_LOAD_SECONDS: '0.1' },
    });
    const line = await handle.waitForLine(/Application startup complete/);
    expect(line.startsWith(`(APIServer pid=${handle.pid}) `)).toBe(true);
    handle.kill('SIGTERM');
    expect((await handle.waitForExit()).code).toBe(0);
    await expectNoProcessLeft(handle.pid);
  });
});

describe('command line errors', () => {
  test('unknown flags, bad values and a missing model exit like argparse and vLLM', async () => {
    const [unknown, removed, choice, notInt, noModel, badLora, toolChoice] = await Promise.all([
      runCli(['serve', 'm', '--foo']),
      runCli(['serve', 'm', '--disable-log-requests']),
      runCli(['serve', 'm', '--dtype', 'foo']),
      runCli(['serve', 'm', '--port', 'x']),
      runCli(['serve', '--port', '8000', '--served-model-name', 'foo']),
      runCli(['serve', 'm', '--lora-modules', '{bad']),
      runCli(['serve', 'm', '--enable-auto-tool-choice']),
    ]);
    expect(toolChoice.status.code).toBe(1);
    expect(toolChoice.stderr).toMatch(/^Traceback \(most recent call last\):\n/);
    expect(toolChoice.stderr.trimEnd().split('\n').at(-1)).toBe('TypeError: Error: --enable-auto-tool-choice requires --tool-call-parser');
    expect(unknown.status.code).toBe(2);
    expect(unknown.stderr).toMatch(/^usage: vllm .*\nvllm: error: unrecognized arguments: --foo$/);
    expect(removed.status.code).toBe(2);
    expect(removed.stderr).toContain('vllm: error: unrecognized arguments: --disable-log-requests');
    expect(choice.status.code).toBe(2);
    expect(choice.stderr).toContain(
      "vllm serve: error: argument --dtype: invalid choice: 'foo' (choose from auto, bfloat16, float, float16, float32, half)",
    );
    expect(notInt.status.code).toBe(2);
    expect(notInt.stderr).toContain("vllm serve: error: argument --port: invalid int value: 'x'");
    expect(noModel.status.code).toBe(1);
    expect(noModel.stderr).toMatch(/^Traceback \(most recent call last\):\n/);
    expect(noModel.stderr).toContain('ValueError: `model` should be provided as the first positional argument');
    expect(badLora.status.code).toBe(2);
    expect(badLora.stderr).toContain('vllm serve: error: Invalid JSON format for --lora-modules: {bad');
  });
});

describe('serving', () => {
  let main: SimHandle; // shapes, SSE, errors
  let slow: SimHandle; // aborts and metrics (slow tokens, request logging)
  let dev: SimHandle; // sleep mode and runtime LoRA
  let auth: SimHandle; // API key, request-id headers, forced usage

  beforeAll(async () => {
    [main, slow, dev, auth] = await Promise.all([
      startSim({
        model: 'org/sim-base',
        args: ['--served-model-name', 'sim-model', 'alias', '--max-model-len', '64'],
        env: { VLLM_SIM_TTFT_MS: '5', VLLM_SIM_ITL_MS: '2' },
      }),
      startSim({ args: ['--enable-log-requests'], env: { VLLM_SIM_TTFT_MS: '50', VLLM_SIM_ITL_MS: '100' } }),
      startSim({
        args: ['--enable-lora', '--enable-sleep-mode'],
        env: {
          VLLM_SERVER_DEV_MODE: '1',
          VLLM_ALLOW_RUNTIME_LORA_UPDATING: 'true',
          VLLM_SIM_TTFT_MS: '20',
          VLLM_SIM_ITL_MS: '50',
        },
      }),
      startSim({
        args: ['--api-key', 'k1', 'k2', '--enable-request-id-headers', '--enable-force-include-usage'],
        readyHeaders: { authorization: 'Bearer k1' },
      }),
    ]);
  });

  afterAll(async () => {
    await Promise.all([main, slow, dev, auth].filter(Boolean).map((s) => s.stop()));
  });

  test('requests that share an id run side by side (vLLM suffixes ids internally, PR #27987)', async () => {
    const same = { method: 'POST', body: chatBody('a b c', { max_tokens: 3 }), headers: { 'x-request-id': 'shared-id' }, timeoutMs: 5_000 };
    const answers = await Promise.all([1, 2, 3].map(() => httpRequest(`${main.baseUrl}/v1/chat/completions`, same)));
    expect(answers.map((r) => [r.status, JSON.parse(r.body).id])).toEqual([1, 2, 3].map(() => [200, 'chatcmpl-shared-id']));
  });

  test('health, ping, version and load answer like vLLM', async () => {
    const [health, pingGet, pingPost, version, load] = await Promise.all([
      httpRequest(`${main.baseUrl}/health`),
      httpRequest(`${main.baseUrl}/ping`),
      httpRequest(`${main.baseUrl}/ping`, { method: 'POST' }),
      httpRequest(`${main.baseUrl}/version`),
      httpRequest(`${main.baseUrl}/load`),
    ]);
    expect([health.status, health.body, health.headers['content-type']]).toEqual([200, '', undefined]);
    expect([pingGet.status, pingPost.status]).toEqual([200, 200]);
    expect(JSON.parse(version.body)).toEqual({ version: expect.stringMatching(/^\d+\.\d+\.\d+/) });
    expect(load.body).toBe('{"server_load":0}');
  });

  test('routes on the percent-decoded path, as uvicorn does', async () => {
    const res = await httpRequest(`${main.baseUrl}/v1/%6Dodels`);
    expect([res.status, JSON.parse(res.body).object]).toEqual([200, 'list']);
  });

  test('/v1/models lists one card per served name with vLLM field order', async () => {
    const res = await httpRequest(`${main.baseUrl}/v1/models`);
    expect(res.headers['content-type']).toBe('application/json');
    const list = JSON.parse(res.body);
    expect(Object.keys(list)).toEqual(['object', 'data']);
    expect(list.data.map((c: { id: string }) => c.id)).toEqual(['sim-model', 'alias']);
    const card = list.data[0];
    expect(Object.keys(card)).toEqual(['id', 'object', 'created', 'owned_by', 'root', 'parent', 'max_model_len', 'permission']);
    expect(card).toMatchObject({ object: 'model', owned_by: 'vllm', root: 'org/sim-base', parent: null, max_model_len: 64 });
    expect(Object.keys(card.permission[0])).toEqual([
      'id', 'object', 'created', 'allow_create_engine', 'allow_sampling', 'allow_logprobs',
      'allow_search_indices', 'allow_view', 'allow_fine_tuning', 'organization', 'group', 'is_blocking',
    ]);
    expect(card.permission[0].id).toMatch(/^modelperm-[0-9a-f]{16}$/);
  });

  test('unknown paths, wrong methods and pooling routes get FastAPI answers', async () => {
    const [unknown, wrongMethod, embeddings, rerank] = await Promise.all([
      httpRequest(`${main.baseUrl}/nope`),
      httpRequest(`${main.baseUrl}/v1/chat/completions`),
      httpRequest(`${main.baseUrl}/v1/embeddings`, { body: { input: 'x' } }),
      httpRequest(`${main.baseUrl}/v1/rerank`, { body: {} }),
    ]);
    expect([unknown.status, unknown.body]).toEqual([404, '{"detail":"Not Found"}']);
    expect([wrongMethod.status, wrongMethod.body]).toEqual([405, '{"detail":"Method Not Allowed"}']);
    expect([embeddings.status, embeddings.body]).toEqual([404, '{"detail":"Not Found"}']);
    expect(rerank.status).toBe(404);
  });

  test('a chat completion has vLLM shape and answers with the last user message', async () => {
    const res = await httpRequest(`${main.baseUrl}/v1/chat/completions`, {
      body: { model: 'alias', messages: [{ role: 'system', content: 'sys' }, { role: 'user', content: 'Hello big world' }] },
    });
    expect(res.status).toBe(200);
    expect(res.headers['x-request-id']).toBeUndefined();
    const body = JSON.parse(res.body);
    expect(Object.keys(body)).toEqual([
      'id', 'object', 'created', 'model', 'choices', 'service_tier', 'system_fingerprint', 'usage',
      'prompt_logprobs', 'prompt_token_ids', 'prompt_text', 'kv_transfer_params', 'ec_transfer_params', 'metrics',
    ]);
    expect(body.id).toMatch(/^chatcmpl-[0-9a-f]{16}$/);
    expect(body.model).toBe('sim-model');
    expect(body.system_fingerprint).toMatch(/^vllm-\d+\.\d+\.\d+-[0-9a-f]{8}$/);
    const choice = body.choices[0];
    expect(Object.keys(choice)).toEqual(['index', 'message', 'logprobs', 'finish_reason', 'stop_reason', 'token_ids', 'routed_experts']);
    expect(choice.message).toEqual({
      role: 'assistant', content: 'Hello big world', refusal: null, annotations: null, audio: null, function_call: null, reasoning: null,
    });
    expect(choice.finish_reason).toBe('stop');
    // 1 + 3 words, 3 tokens overhead per message, 2 for the generation prompt; 3 words + EOS out.
    expect(body.usage).toEqual({
      prompt_tokens: 12, total_tokens: 16, completion_tokens: 4, prompt_tokens_details: null, completion_tokens_details: null,
    });
    const tokenized = JSON.parse(
      (await httpRequest(`${main.baseUrl}/tokenize`, {
        body: { messages: [{ role: 'system', content: 'sys' }, { role: 'user', content: 'Hello big world' }] },
      })).body,
    );
    expect(tokenized.count).toBe(body.usage.prompt_tokens);
  });

  test('max_tokens cuts the answer with finish_reason length; X-Request-Id names the request', async () => {
    const res = await httpRequest(`${main.baseUrl}/v1/chat/completions`, {
      headers: { 'X-Request-Id': 'abc123' },
      body: chatBody('one two three four', { max_tokens: 2 }),
    });
    const body = JSON.parse(res.body);
    expect(body.id).toBe('chatcmpl-abc123');
    expect(body.choices[0].message.content).toBe('one two');
    expect(body.choices[0].finish_reason).toBe('length');
    expect(body.usage.completion_tokens).toBe(2);
  });

  test('a text completion has vLLM shape and defaults to 16 tokens', async () => {
    const res = await httpRequest(`${main.baseUrl}/v1/completions`, { body: { model: 'sim-model', prompt: words(20) } });
    const body = JSON.parse(res.body);
    expect(Object.keys(body)).toEqual([
      'id', 'object', 'created', 'model', 'choices', 'service_tier', 'system_fingerprint', 'usage',
      'kv_transfer_params', 'ec_transfer_params', 'metrics',
    ]);
    expect(body.id).toMatch(/^cmpl-[0-9a-f]{16}$/);
    expect(body.object).toBe('text_completion');
    expect(Object.keys(body.choices[0])).toEqual([
      'index', 'text', 'logprobs', 'finish_reason', 'stop_reason', 'token_ids', 'prompt_logprobs', 'prompt_token_ids', 'routed_experts',
    ]);
    expect(body.choices[0].text).toBe(words(16));
    expect(body.choices[0].finish_reason).toBe('length');
    expect(body.usage).toMatchObject({ prompt_tokens: 20, completion_tokens: 16, total_tokens: 36 });
  });

  test('tokenize and detokenize use vLLM shapes and agree with each other', async () => {
    const tok = await httpRequest(`${main.baseUrl}/tokenize`, { body: { prompt: 'alpha beta gamma' } });
    const body = JSON.parse(tok.body);
    expect(Object.keys(body)).toEqual(['count', 'max_model_len', 'tokens', 'token_strs']);
    expect(body).toMatchObject({ count: 3, max_model_len: 64, token_strs: null });
    const detok = await httpRequest(`${main.baseUrl}/detokenize`, { body: { tokens: body.tokens } });
    expect(detok.body).toBe('{"prompt":"alpha beta gamma"}');
    const strs = JSON.parse(
      (await httpRequest(`${main.baseUrl}/tokenize`, { body: { prompt: 'alpha beta', return_token_strs: true } })).body,
    );
    expect(strs.token_strs).toEqual(['alpha', ' beta']);
  });

  test('a chat stream has the role chunk, deltas, final chunk, usage chunk and [DONE]', async () => {
    const sse = await readSse(`${main.baseUrl}/v1/chat/completions`, chatBody('Hi there', { stream: true, stream_options: { include_usage: true } }));
    expect(sse.status).toBe(200);
    expect(sse.headers['content-type']).toBe('text/event-stream; charset=utf-8');
    expect(sse.raw.endsWith('data: [DONE]\n\n')).toBe(true);
    expect(sse.raw.split('\n\n').filter(Boolean).every((e) => e.startsWith('data: '))).toBe(true);
    expect(sse.events.at(-1)).toBe('[DONE]');
    const [role, d1, d2, final, usageChunk] = parsedEvents(sse.events);
    expect(parsedEvents(sse.events)).toHaveLength(5);
    const id = role.id;
    expect(role).toEqual({
      id, object: 'chat.completion.chunk', created: role.created, model: 'sim-model',
      choices: [{ index: 0, delta: { role: 'assistant', content: '' }, logprobs: null, finish_reason: null }],
      prompt_token_ids: null, prompt_text: null,
    });
    expect(Object.keys(role)).toEqual(['id', 'object', 'created', 'model', 'choices', 'prompt_token_ids', 'prompt_text']);
    expect(d1).toEqual({
      id, object: 'chat.completion.chunk', created: role.created, model: 'sim-model',
      choices: [{ index: 0, delta: { content: 'Hi' }, logprobs: null, finish_reason: null, token_ids: null }],
    });
    expect(d2.choices[0].delta).toEqual({ content: ' there' });
    expect(final.choices).toEqual([{ index: 0, delta: { content: '' }, logprobs: null, finish_reason: 'stop', stop_reason: null, token_ids: null }]);
    expect(final.system_fingerprint).toBeUndefined();
    expect(usageChunk).toEqual({
      id, object: 'chat.completion.chunk', created: role.created, model: 'sim-model', choices: [],
      usage: { prompt_tokens: 7, total_tokens: 10, completion_tokens: 3 }, system_fingerprint: expect.stringMatching(/^vllm-/),
    });
  });

  test('without a usage chunk the final chunk carries system_fingerprint; continuous usage on every chunk', async () => {
    const plain = parsedEvents((await readSse(`${main.baseUrl}/v1/chat/completions`, chatBody('a b', { stream: true }))).events);
    expect(plain.at(-1)?.choices[0].finish_reason).toBe('stop');
    expect(plain.at(-1)?.system_fingerprint).toMatch(/^vllm-/);
    expect(plain.every((c) => c.usage === undefined)).toBe(true);

    const continuous = parsedEvents(
      (await readSse(`${main.baseUrl}/v1/chat/completions`, chatBody('a b', {
        stream: true, stream_options: { include_usage: true, continuous_usage_stats: true },
      }))).events,
    );
    expect(continuous.map((c) => c.usage.completion_tokens)).toEqual([0, 1, 2, 3, 3]);
  });

  test('a completion stream sends text chunks, a final chunk and the usage chunk', async () => {
    const sse = await readSse(`${main.baseUrl}/v1/completions`, {
      prompt: 'x y z', max_tokens: 2, stream: true, stream_options: { include_usage: true },
    });
    const chunks = parsedEvents(sse.events);
    expect(chunks[0].choices).toEqual([
      { index: 0, text: 'x', logprobs: null, finish_reason: null, stop_reason: null, prompt_token_ids: null, token_ids: null },
    ]);
    expect(chunks[1].choices[0]).toMatchObject({ text: ' y', finish_reason: 'length' });
    expect(chunks[2]).toMatchObject({ object: 'text_completion', choices: [], usage: { prompt_tokens: 3, total_tokens: 5, completion_tokens: 2 } });
    expect(sse.events.at(-1)).toBe('[DONE]');
  });

  test('/v1/responses: the response object, and named events numbered from 0 that end with response.completed, no [DONE]', async () => {
    const res = await httpRequest(`${main.baseUrl}/v1/responses`, {
      body: { model: 'alias', input: 'Hello big world', instructions: 'sys', max_output_tokens: 2, top_p: 0.5 },
    });
    expect(res.status).toBe(200);
    const body = JSON.parse(res.body);
    expect(body.id).toMatch(/^resp_/);
    expect(body).toMatchObject({
      object: 'response', model: 'sim-model', status: 'incomplete', incomplete_details: { reason: 'max_output_tokens' },
      instructions: 'sys', max_output_tokens: 2, top_p: 0.5,
    });
    expect(body.output).toEqual([{
      id: expect.stringMatching(/^[0-9a-f]{32}$/), content: [{ annotations: [], text: 'Hello big', type: 'output_text', logprobs: null }],
      role: 'assistant', status: 'completed', type: 'message',
    }]);
    // The same prompt as chat's system + user messages: 12 tokens.
    expect(body.usage).toEqual({
      input_tokens: 12, input_tokens_details: { cached_tokens: 0 }, output_tokens: 2, output_tokens_details: { reasoning_tokens: 0 }, total_tokens: 14,
    });

    const sse = await readSse(`${main.baseUrl}/v1/responses`, { input: [{ role: 'user', content: [{ type: 'input_text', text: 'Hi there' }] }], stream: true });
    expect([sse.status, sse.headers['content-type']]).toEqual([200, 'text/event-stream; charset=utf-8']);
    const names = sse.raw.split('\n\n').filter(Boolean).map((block) => block.split('\n')[0]);
    const events = parsedEvents(sse.events);
    expect(names).toEqual(events.map((e) => `event: ${e.type}`));
    expect(events.map((e) => e.type)).toEqual([
      'response.created', 'response.in_progress', 'response.output_item.added', 'response.content_part.added',
      'response.output_text.delta', 'response.output_text.delta', 'response.output_text.done', 'response.content_part.done',
      'response.output_item.done', 'response.completed',
    ]);
    expect(events.map((e) => e.sequence_number)).toEqual(events.map((_, i) => i));
    expect(sse.raw).not.toContain('[DONE]');
    const [created, , added, , delta] = events;
    expect(created.response).toMatchObject({ status: 'in_progress', output: [], usage: null, model: 'sim-model' });
    expect(delta).toEqual({ content_index: 0, delta: 'Hi', item_id: added.item.id, output_index: 0, logprobs: [], sequence_number: 4, type: 'response.output_text.delta' });
    expect(events[5].delta).toBe(' there');
    expect(events.at(-1)?.response).toMatchObject({ status: 'completed', output: [{ content: [{ text: 'Hi there' }] }], usage: { input_tokens: 7, output_tokens: 3 } });

    // Cut by max_output_tokens: still response.completed, with the response incomplete.
    const cut = parsedEvents((await readSse(`${main.baseUrl}/v1/responses`, { input: 'a b c', max_output_tokens: 1, stream: true })).events);
    expect(cut.at(-1)).toMatchObject({ type: 'response.completed', response: { status: 'incomplete', incomplete_details: { reason: 'max_output_tokens' } } });

    const unknown = await httpRequest(`${main.baseUrl}/v1/responses`, { body: { model: 'nope', input: 'x' } });
    expect([unknown.status, JSON.parse(unknown.body)]).toEqual([404, { error: { message: 'The model `nope` does not exist.', type: 'NotFoundError', param: 'model', code: 404 } }]);
    // No response store (VLLM_ENABLE_RESPONSES_API_STORE is off): none is found, to retrieve or cancel.
    for (const [path, method] of [['/v1/responses/resp_abc', 'GET'], ['/v1/responses/resp_abc/cancel', 'POST']]) {
      const stored = await httpRequest(`${main.baseUrl}${path}`, { method });
      expect([path, stored.status, JSON.parse(stored.body)]).toEqual([
        path, 404, { error: { message: "Response with id 'resp_abc' not found.", type: 'invalid_request_error', param: 'response_id', code: 404 } },
      ]);
    }
  });

  test('a client that leaves a Responses stream aborts its generation', async () => {
    const before = await metrics(slow);
    const stream = await readSse(`${slow.baseUrl}/v1/responses`, { input: words(10), stream: true }, {
      headers: { 'X-Request-Id': 'gone-responses' },
      stopAfterEvents: 4,
    });
    expect(stream.disconnected).toBe(true);
    await slow.waitForLine(/Request resp_gone-responses aborted\./);
    await waitUntil(async () => {
      const text = await metrics(slow);
      return metric(text, 'vllm:request_success_total', 'finished_reason="abort"') === metric(before, 'vllm:request_success_total', 'finished_reason="abort"') + 1;
    }, 3000);
  });

  test('invalid requests get vLLM error envelopes and status codes', async () => {
    const post = (body: unknown, headers?: Record<string, string>) =>
      httpRequest(`${main.baseUrl}/v1/chat/completions`, { body, headers }).then((r) => ({ status: r.status, body: JSON.parse(r.body) }));
    const [negTemp, highTemp, infTemp, topP, zeroMax, bigMax, tooLong, tooLongWithMax, noMessages, textPlain, badJson, unknownModel, streamOpts, bom, bomAlone] =
      await Promise.all([
        post(chatBody('x', { temperature: -1 })),
        post(chatBody('x', { temperature: 3 })),
        post('{"messages":[{"role":"user","content":"x"}],"temperature":1e999}', JSON_HEADERS),
        post(chatBody('x', { top_p: 0 })),
        post(chatBody('x', { max_tokens: 0 })),
        post(chatBody('x', { max_tokens: 100 })),
        post(chatBody(words(70))),
        post(chatBody(words(55), { max_tokens: 10 })),
        post({ model: 'sim-model' }),
        post('{"messages":[]}', { 'content-type': 'text/plain' }),
        post('{"messages": [', JSON_HEADERS),
        post(chatBody('x', { model: 'foo' })),
        post(chatBody('x', { stream_options: { include_usage: true } })),
        // json.loads(bytes) decodes a body that starts with a UTF-8 BOM as utf-8-sig: taken.
        post(Buffer.concat([Buffer.from([0xef, 0xbb, 0xbf]), Buffer.from(JSON.stringify(chatBody('x')))]), JSON_HEADERS),
        post(Buffer.from([0xef, 0xbb, 0xbf]), JSON_HEADERS), // not empty (FastAPI's `if body_bytes:`), and no JSON
      ]);
    const bad = (message: string, param: string | null) => ({ status: 400, body: { error: { message, type: 'BadRequestError', param, code: 400 } } });
    expect(negTemp).toEqual(bad('temperature must be non-negative, got -1.0. (parameter=temperature, value=-1.0)', 'temperature'));
    expect(highTemp).toEqual(bad('temperature must be in [0, 2], got 3.0. (parameter=temperature, value=3.0)', 'temperature'));
    expect(infTemp).toEqual(bad('temperature must be a finite number, got inf. (parameter=temperature, value=inf)', 'temperature'));
    expect(topP).toEqual(bad('top_p must be in (0, 1], got 0.0. (parameter=top_p, value=0.0)', 'top_p'));
    expect(zeroMax).toEqual(bad('max_tokens must be at least 1, got 0. (parameter=max_tokens, value=0)', 'max_tokens'));
    expect(bigMax).toEqual(
      bad('max_tokens=100 cannot be greater than max_model_len=max_total_tokens=64. Please request fewer output tokens. (parameter=max_tokens, value=100)', 'max_tokens'),
    );
    expect(tooLong).toEqual(
      bad(
        "This model's maximum context length is 64 tokens. However, you requested 0 output tokens and your prompt contains 75 input tokens, " +
          'for a total of 75 tokens. Please reduce the length of the input prompt or the number of requested output tokens. (parameter=input_tokens, value=75)',
        'input_tokens',
      ),
    );
    expect(tooLongWithMax.body.error.message).toContain('you requested 10 output tokens and your prompt contains 60 input tokens, for a total of 70 tokens');
    expect(noMessages).toEqual({
      status: 400,
      body: {
        error: {
          message: "1 validation error:\n  {'type': 'missing', 'loc': 'body.messages', 'msg': 'Field required', 'input': '<dict of 1 items>'}",
          type: 'Bad Request', param: 'body.messages', code: 400,
        },
      },
    });
    // A required field that is null fails its type (pydantic: not Optional), as a 400, not a crash.
    expect((await post({ messages: null })).body.error).toEqual({
      message: "1 validation error:\n  {'type': 'list_type', 'loc': 'body.messages', 'msg': 'Input should be a valid list', 'input': 'None'}",
      type: 'Bad Request', param: 'body.messages', code: 400,
    });
    expect(textPlain).toEqual({
      status: 400,
      body: { error: { message: "1 validation error:\n  Unsupported Media Type: Only 'application/json' is allowed", type: 'Bad Request', param: null, code: 400 } },
    });
    expect(badJson.status).toBe(400);
    expect(badJson.body.error).toMatchObject({ type: 'Bad Request', message: expect.stringContaining("'msg': 'JSON decode error'") });
    expect(bom).toMatchObject({ status: 200, body: { object: 'chat.completion' } });
    expect(bomAlone.body.error).toMatchObject({ type: 'Bad Request', param: 'body.0', message: expect.stringContaining("'msg': 'JSON decode error'") });
    expect(unknownModel).toEqual({
      status: 404, body: { error: { message: 'The model `foo` does not exist.', type: 'NotFoundError', param: 'model', code: 404 } },
    });
    expect(streamOpts.status).toBe(400);
    expect(streamOpts.body.error).toMatchObject({ type: 'Bad Request', param: 'stream_options', message: expect.stringContaining('Stream options can only be defined when `stream=True`.') });
  });

  test('metrics use the Prometheus content type and vLLM series with model_name and engine labels', async () => {
    const res = await httpRequest(`${main.baseUrl}/metrics`);
    expect(res.headers['content-type']).toBe('text/plain; version=0.0.4; charset=utf-8');
    for (const series of [
      'vllm:num_requests_running{engine="0",model_name="sim-model"}',
      'vllm:num_requests_waiting{engine="0",model_name="sim-model"}',
      'vllm:engine_sleep_state{engine="0",model_name="sim-model",sleep_state="awake"} 1.0',
      'vllm:kv_cache_usage_perc{engine="0",model_name="sim-model"}',
      'vllm:prompt_tokens_total{engine="0",model_name="sim-model"}',
      'vllm:generation_tokens_total{engine="0",model_name="sim-model"}',
      'vllm:request_success_total{engine="0",finished_reason="stop",model_name="sim-model"}',
      'vllm:e2e_request_latency_seconds_bucket{engine="0",le="+Inf",model_name="sim-model"}',
      'vllm:e2e_request_latency_seconds_sum{engine="0",model_name="sim-model"}',
      'vllm:time_to_first_token_seconds_count{engine="0",model_name="sim-model"}',
    ]) {
      expect(res.body).toContain(series);
    }
  });

  test('/metrics is also a Mount: every path under it and every method get the registry (no 307, no 405)', async () => {
    const [exact, slash, sub, post, head] = await Promise.all([
      httpRequest(`${main.baseUrl}/metrics`),
      httpRequest(`${main.baseUrl}/metrics/`),
      httpRequest(`${main.baseUrl}/metrics/anything?x=1`),
      httpRequest(`${main.baseUrl}/metrics`, { method: 'POST', body: {} }),
      httpRequest(`${main.baseUrl}/metrics`, { method: 'HEAD' }),
    ]);
    // GET /metrics is the instrumentator's route (a sized Response); the rest reach make_asgi_app,
    // which sends only Content-Type, so uvicorn chunks the body.
    expect([exact.status, exact.headers['content-length']]).toEqual([200, String(Buffer.byteLength(exact.body))]);
    for (const res of [slash, sub, post]) {
      expect([res.status, res.headers['content-type'], res.headers['transfer-encoding']]).toEqual([
        200, 'text/plain; version=0.0.4; charset=utf-8', 'chunked',
      ]);
      expect(res.body).toContain('# TYPE vllm:request_success_total counter\n');
    }
    expect([head.status, head.body]).toEqual([200, '']);
  });

  test('a client disconnect aborts streaming and non-streaming requests and is counted', async () => {
    const before = await metrics(slow);
    const stream = await readSse(`${slow.baseUrl}/v1/chat/completions`, chatBody(words(10), { stream: true }), {
      headers: { 'X-Request-Id': 'gone-stream' },
      stopAfterEvents: 2,
    });
    expect(stream.disconnected).toBe(true);
    await slow.waitForLine(/Request chatcmpl-gone-stream aborted\./);
    await waitUntil(async () => metric(await metrics(slow), 'vllm:num_requests_running') === 0, 3000);
    const controller = new AbortController();
    const plain = httpRequest(`${slow.baseUrl}/v1/chat/completions`, {
      body: chatBody(words(10)),
      headers: { 'X-Request-Id': 'gone-plain' },
      signal: controller.signal,
    });
    await waitUntil(async () => metric(await metrics(slow), 'vllm:num_requests_running') === 1, 3000); // in the engine
    controller.abort();
    await expect(plain).rejects.toThrow();
    await slow.waitForLine(/Request chatcmpl-gone-plain aborted\./);
    await slow.waitForLine(/Aborted request\(s\) chatcmpl-gone-plain\./); // its own line, logged in its own time
    await waitUntil(async () => {
      const text = await metrics(slow);
      return (
        metric(text, 'vllm:request_success_total', 'finished_reason="abort"') ===
          metric(before, 'vllm:request_success_total', 'finished_reason="abort"') + 2 &&
        metric(text, 'vllm:num_requests_running') === 0
      );
    }, 3000);
  });

  test('metrics count tokens, finish reasons and latencies of served requests', async () => {
    const before = await metrics(slow);
    await Promise.all([
      httpRequest(`${slow.baseUrl}/v1/chat/completions`, { body: chatBody('a b') }), // 7 in, 3 out, stop
      httpRequest(`${slow.baseUrl}/v1/completions`, { body: { prompt: 'p q r s', max_tokens: 2 } }), // 4 in, 2 out, length
    ]);
    const after = await metrics(slow);
    const delta = (name: string, labels = '') => metric(after, name, labels) - metric(before, name, labels);
    expect(delta('vllm:prompt_tokens_total')).toBe(11);
    expect(delta('vllm:generation_tokens_total')).toBe(5);
    expect(delta('vllm:request_success_total', 'finished_reason="stop"')).toBe(1);
    expect(delta('vllm:request_success_total', 'finished_reason="length"')).toBe(1);
    expect(delta('vllm:e2e_request_latency_seconds_count')).toBe(2);
    expect(delta('vllm:time_to_first_token_seconds_count')).toBe(2);
    expect(delta('vllm:e2e_request_latency_seconds_sum')).toBeGreaterThan(0.2);
    expect(metric(after, 'vllm:num_requests_running')).toBe(0);
  });

  test('sleep pauses the engine; a request made while asleep waits until it is fully woken', async () => {
    const sleepRes = await httpRequest(`${dev.baseUrl}/sleep?level=1`, { method: 'POST' });
    expect([sleepRes.status, sleepRes.body]).toEqual([200, '']);
    expect((await httpRequest(`${dev.baseUrl}/is_sleeping`)).body).toBe('{"is_sleeping":true}');
    let text = await metrics(dev);
    expect(metric(text, 'vllm:engine_sleep_state', 'sleep_state="weights_offloaded"')).toBe(1);
    expect(metric(text, 'vllm:engine_sleep_state', 'sleep_state="awake"')).toBe(0);
    expect((await httpRequest(`${dev.baseUrl}/health`)).status).toBe(200);

    let settled = false;
    const pending = httpRequest(`${dev.baseUrl}/v1/chat/completions`, { body: chatBody('still here') }).finally(() => {
      settled = true;
    });
    await waitUntil(async () => metric(await metrics(dev), 'vllm:num_requests_waiting') === 1, 3000);
    await httpRequest(`${dev.baseUrl}/wake_up?tags=weights`, { method: 'POST' });
    await sleep(200);
    expect(settled).toBe(false);
    expect((await httpRequest(`${dev.baseUrl}/is_sleeping`)).body).toBe('{"is_sleeping":true}');
    // AsyncLLM.wake_up records "awake" after any wake-up, a partial one too (record_sleep_state(0, 0)).
    expect(metric(await metrics(dev), 'vllm:engine_sleep_state', 'sleep_state="awake"')).toBe(1);
    const wake = await httpRequest(`${dev.baseUrl}/wake_up?tags=kv_cache`, { method: 'POST' });
    expect([wake.status, wake.body]).toEqual([200, '']);
    const answer = JSON.parse((await pending).body);
    expect(answer.choices[0]).toMatchObject({ finish_reason: 'stop', message: { content: 'still here' } });
    expect((await httpRequest(`${dev.baseUrl}/is_sleeping`)).body).toBe('{"is_sleeping":false}');
    text = await metrics(dev);
    expect(metric(text, 'vllm:engine_sleep_state', 'sleep_state="awake"')).toBe(1);
  });

  test('sleep with mode=abort ends in-flight requests with finish_reason abort', async () => {
    const inFlight = httpRequest(`${dev.baseUrl}/v1/chat/completions`, { body: chatBody(words(20)) });
    await waitUntil(async () => metric(await metrics(dev), 'vllm:num_requests_running') === 1, 3000);
    await httpRequest(`${dev.baseUrl}/sleep?level=0&mode=abort`, { method: 'POST' });
    // record_sleep_state(1, 0): asleep, at neither level 1 nor 2, so none of the three series is 1.
    const asleep = await metrics(dev);
    for (const state of ['awake', 'weights_offloaded', 'discard_all']) expect([state, metric(asleep, 'vllm:engine_sleep_state', `sleep_state="${state}"`)]).toEqual([state, 0]);
    const res = await inFlight;
    expect(res.status).toBe(200);
    expect(JSON.parse(res.body).choices[0].finish_reason).toBe('abort');
    await httpRequest(`${dev.baseUrl}/wake_up`, { method: 'POST' });
    expect((await httpRequest(`${dev.baseUrl}/is_sleeping`)).body).toBe('{"is_sleeping":false}');
  });

  test('level 2 discards the weights: woken without reload_weights, vLLM generates garbage (with a 200)', async () => {
    const content = async () => JSON.parse((await httpRequest(`${dev.baseUrl}/v1/chat/completions`, { body: chatBody('one two') })).body).choices[0].message.content as string;
    expect(await content()).toBe('one two');
    await httpRequest(`${dev.baseUrl}/sleep?level=2`, { method: 'POST' });
    await httpRequest(`${dev.baseUrl}/wake_up`, { method: 'POST' });
    expect(await content()).toContain('garbage: weights discarded by sleep level 2');
    await httpRequest(`${dev.baseUrl}/collective_rpc`, { body: { method: 'reload_weights' } });
    expect(await content()).toBe('one two');
  });

  test('dev endpoints: collective_rpc, reset_prefix_cache, server_info', async () => {
    const [rpc, noMethod, reset, info] = await Promise.all([
      httpRequest(`${dev.baseUrl}/collective_rpc`, { body: { method: 'reload_weights' } }),
      httpRequest(`${dev.baseUrl}/collective_rpc`, { body: {} }),
      httpRequest(`${dev.baseUrl}/reset_prefix_cache`, { method: 'POST' }),
      httpRequest(`${dev.baseUrl}/server_info`),
    ]);
    expect([rpc.status, rpc.body]).toEqual([200, '{"results":[null]}']);
    expect(noMethod.status).toBe(400);
    // A method the workers lack fails in them, and the call with it.
    const unknown = await httpRequest(`${dev.baseUrl}/collective_rpc`, { body: { method: 'reload_weight' } });
    expect([unknown.status, JSON.parse(unknown.body).error.message]).toEqual([500, "Call to collective_rpc method failed: 'Worker' object has no attribute 'reload_weight'"]);
    expect([reset.status, reset.body]).toEqual([200, '']);
    expect(JSON.parse(info.body).vllm_config).toContain("model='sim-model'");
    // Without VLLM_SERVER_DEV_MODE the routes do not exist.
    expect((await httpRequest(`${main.baseUrl}/sleep`, { method: 'POST' })).status).toBe(404);
  });

  test('LoRA adapters load and unload at runtime and serve as models', async () => {
    const load = await httpRequest(`${dev.baseUrl}/v1/load_lora_adapter`, { body: { lora_name: 'ad1', lora_path: '/loras/ad1' } });
    expect([load.status, load.body]).toEqual([200, "Success: LoRA adapter 'ad1' added successfully."]);
    const cards = JSON.parse((await httpRequest(`${dev.baseUrl}/v1/models`)).body).data;
    expect(cards[1]).toMatchObject({ id: 'ad1', object: 'model', root: '/loras/ad1', parent: 'sim-model', max_model_len: null });
    const chat = JSON.parse((await httpRequest(`${dev.baseUrl}/v1/chat/completions`, { body: chatBody('x', { model: 'ad1' }) })).body);
    expect(chat.model).toBe('ad1');
    const again = await httpRequest(`${dev.baseUrl}/v1/load_lora_adapter`, { body: { lora_name: 'ad1', lora_path: '/loras/ad1' } });
    expect(again.status).toBe(400);
    expect(JSON.parse(again.body).error).toMatchObject({ type: 'InvalidUserInput', message: expect.stringContaining("'ad1' has already been loaded") });
    const unload = await httpRequest(`${dev.baseUrl}/v1/unload_lora_adapter`, { body: { lora_name: 'ad1' } });
    expect([unload.status, unload.body]).toEqual([200, "Success: LoRA adapter 'ad1' removed successfully."]);
    const missing = await httpRequest(`${dev.baseUrl}/v1/unload_lora_adapter`, { body: { lora_name: 'ad1' } });
    expect([missing.status, JSON.parse(missing.body)]).toEqual([
      404, { error: { message: "The lora adapter 'ad1' cannot be found.", type: 'NotFoundError', param: null, code: 404 } },
    ]);
    expect((await httpRequest(`${dev.baseUrl}/v1/chat/completions`, { body: chatBody('x', { model: 'ad1' }) })).status).toBe(404);
    // Without VLLM_ALLOW_RUNTIME_LORA_UPDATING the routes do not exist.
    expect((await httpRequest(`${main.baseUrl}/v1/load_lora_adapter`, { body: {} })).status).toBe(404);
  });

  test('--api-key guards /v1 paths only, with any of the keys', async () => {
    const get = (p: string, authorization?: string) =>
      httpRequest(`${auth.baseUrl}${p}`, { headers: authorization ? { authorization } : {} });
    const [none, wrong, k2, lower, health, metricsRes, tokenize, options] = await Promise.all([
      get('/v1/models'),
      get('/v1/models', 'Bearer nope'),
      get('/v1/models', 'Bearer k2'),
      get('/v1/models', 'bearer k1'),
      get('/health'),
      get('/metrics'),
      httpRequest(`${auth.baseUrl}/tokenize`, { body: { prompt: 'a' } }),
      httpRequest(`${auth.baseUrl}/v1/models`, { method: 'OPTIONS' }),
    ]);
    expect([none.status, none.body]).toEqual([401, '{"error":"Unauthorized"}']);
    expect(none.headers['www-authenticate']).toBeUndefined();
    expect(wrong.status).toBe(401);
    expect([k2.status, lower.status, health.status, metricsRes.status, tokenize.status]).toEqual([200, 200, 200, 200, 200]);
    expect(options.status).not.toBe(401);
  });

  test('--enable-request-id-headers echoes X-Request-Id; --enable-force-include-usage adds the usage chunk', async () => {
    const authz = { authorization: 'Bearer k1' };
    const echoed = await httpRequest(`${auth.baseUrl}/v1/chat/completions`, { headers: { ...authz, 'X-Request-Id': 'my-id' }, body: chatBody('a') });
    expect(echoed.headers['x-request-id']).toBe('my-id');
    expect(JSON.parse(echoed.body).id).toBe('chatcmpl-my-id');
    const generated = await httpRequest(`${auth.baseUrl}/health`);
    expect(generated.headers['x-request-id']).toMatch(/^[0-9a-f]{32}$/);
    const sse = await readSse(`${auth.baseUrl}/v1/chat/completions`, chatBody('a b', { stream: true }), { headers: authz });
    expect(parsedEvents(sse.events).at(-1)).toMatchObject({ choices: [], usage: { completion_tokens: 3 } });
  });
});

describe('signals and process tree', () => {
  test('SIGTERM with --shutdown-timeout 0 aborts in-flight requests, stops the engine and exits 0', async () => {
    const sim = await startSim({ env: { VLLM_SIM_ITL_MS: '100' } });
    let firstDelta!: () => void;
    const gotDelta = new Promise<void>((resolve) => (firstDelta = resolve));
    const stream = readSse(`${sim.baseUrl}/v1/chat/completions`, chatBody(words(20), { stream: true }), {
      onEvent: (_d, i) => i === 1 && firstDelta(),
    });
    const plain = httpRequest(`${sim.baseUrl}/v1/chat/completions`, { body: chatBody(words(20)) });
    await gotDelta;
    process.kill(sim.pid, 'SIGTERM');
    const [sse, res] = await Promise.all([stream, plain]);
    const chunks = parsedEvents(sse.events);
    expect(chunks.at(-1)?.choices[0]).toMatchObject({ delta: { content: '' }, finish_reason: 'abort' });
    expect(sse.events.at(-1)).toBe('[DONE]');
    expect(res.status).toBe(200);
    expect(JSON.parse(res.body).choices[0].finish_reason).toBe('abort');
    expect((await sim.waitForExit()).code).toBe(0);
    const out = sim.output.join('\n');
    expect(out).toContain('[shutdown] API server: shutdown triggered');
    expect(out).toContain('[shutdown] API server: stopping engine client mode=abort timeout=0s');
    expect(out).toContain('[shutdown] EngineCore: aborting in-flight requests count=2');
    expect(out).toContain('[shutdown] API server: engine client stopped');
    expect(sim.stderrLines.at(-1)).toBe(`(APIServer pid=${sim.pid}) INFO:     Finished server process [${sim.pid}]`);
    await expectNoProcessLeft(sim.pid);
  });

  test('SIGTERM with --shutdown-timeout N drains in-flight requests; new ones abort; a second SIGTERM is ignored', async () => {
    const sim = await startSim({ args: ['--shutdown-timeout', '5'], env: { VLLM_SIM_ITL_MS: '60' } });
    const inFlight = httpRequest(`${sim.baseUrl}/v1/chat/completions`, { body: chatBody(words(12)) });
    await waitUntil(async () => metric(await metrics(sim), 'vllm:num_requests_running') === 1, 3000);
    const started = Date.now();
    sim.kill('SIGTERM'); // the whole group, as a supervisor does
    await sim.waitForLine(/draining in-flight requests count=1 timeout=5s/);
    sim.kill('SIGTERM');
    const late = await httpRequest(`${sim.baseUrl}/v1/chat/completions`, { body: chatBody('late request') });
    expect(JSON.parse(late.body).choices[0].finish_reason).toBe('abort');
    const done = JSON.parse((await inFlight).body);
    expect(done.choices[0]).toMatchObject({ finish_reason: 'stop', message: { content: words(12) } });
    expect((await sim.waitForExit()).code).toBe(0);
    expect(Date.now() - started).toBeLessThan(4000);
    expect(sim.output.filter((l) => l.includes('shutdown triggered'))).toHaveLength(1);
    expect(sim.output.join('\n')).toContain('stopping engine client mode=drain timeout=5s');
    await expectNoProcessLeft(sim.pid);
  });

  test('while it shuts down, utility calls fail with 500 "Server shutting down" instead of running', async () => {
    const sim = await startSim({ args: ['--shutdown-timeout', '5'], env: { VLLM_SERVER_DEV_MODE: '1', VLLM_SIM_ITL_MS: '60' } });
    const inFlight = httpRequest(`${sim.baseUrl}/v1/chat/completions`, { body: chatBody(words(12)) });
    await waitUntil(async () => metric(await metrics(sim), 'vllm:num_requests_running') === 1, 3000);
    process.kill(sim.pid, 'SIGTERM');
    await sim.waitForLine(/draining in-flight requests count=1 timeout=5s/);
    const shuttingDown = '{"error":{"message":"Server shutting down","type":"InternalServerError","param":null,"code":500}}';
    const [sleeping, slept] = await Promise.all([
      httpRequest(`${sim.baseUrl}/is_sleeping`, { timeoutMs: 3000 }),
      httpRequest(`${sim.baseUrl}/sleep?level=1`, { method: 'POST', timeoutMs: 3000 }),
    ]);
    expect([sleeping.status, sleeping.body]).toEqual([500, shuttingDown]);
    expect([slept.status, slept.body]).toEqual([500, shuttingDown]);
    expect(JSON.parse((await inFlight).body).choices[0].finish_reason).toBe('stop'); // the drain was not put to sleep
    expect((await sim.waitForExit()).code).toBe(0);
    await expectNoProcessLeft(sim.pid);
  });

  test('SIGKILL of the API server leaves the EngineCore running as an orphan in the same group', async () => {
    const sim = await startSim();
    const engine = engineOf(sim);
    process.kill(sim.pid, 'SIGKILL');
    await sim.waitForExit();
    await sleep(300);
    expect(pidAlive(engine)).toBe(true);
    expect(cmdline(engine)).toBe('VLLM::EngineCore');
    expect(groupPids(sim.pid)).toEqual([engine]);
    sim.kill('SIGKILL');
    await expectNoProcessLeft(sim.pid);
  });

  test('SIGTERM during model load ends like an uncaught KeyboardInterrupt and stops the engine', async () => {
    const sim = await startSim({ ready: false, env: { VLLM_SIM_LOAD_SECONDS: '5' } });
    await sim.waitForLine(/Starting to load model/);
    process.kill(sim.pid, 'SIGTERM');
    const status = await sim.waitForExit();
    expect(status.signal).toBe('SIGINT');
    expect(sim.stderrLines.at(-1)).toBe(`(APIServer pid=${sim.pid}) KeyboardInterrupt: terminated`);
    await expectNoProcessLeft(sim.pid);
  });

  test('tensor parallel workers run under the engine and go with it', async () => {
    const sim = await startSim({ args: ['-tp', '2'], env: { VLLM_SERVER_DEV_MODE: '1' } });
    const engine = engineOf(sim);
    const titles = descendantsOf(engine).map(cmdline).sort();
    expect(titles).toEqual(['VLLM::Worker_TP0', 'VLLM::Worker_TP1']);
    const rpc = await httpRequest(`${sim.baseUrl}/collective_rpc`, { body: { method: 'reload_weights' } });
    expect(rpc.body).toBe('{"results":[null,null]}');
    await sim.stop();
  });
});

describe('fault injection (VLLM_SIM_*)', () => {
  const fast = { VLLM_SIM_WATCHDOG_SECONDS: '0.5' };

  test.concurrent('CRASH_ON_LOAD: engine dies during load, RuntimeError, exit 1', async () => {
    const sim = await startSim({ ready: false, env: { VLLM_SIM_CRASH_ON_LOAD: '1' } });
    expect((await sim.waitForExit()).code).toBe(1);
    expect(sim.stderrLines.at(-1)).toBe(
      `(APIServer pid=${sim.pid}) RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {'EngineCore': 1}`,
    );
    expect(sim.output.join('\n')).toMatch(/\(EngineCore pid=\d+\) ERROR .*EngineCore failed to start\./);
    await expectNoProcessLeft(sim.pid);
  });

  test.concurrent('VLLM_ENGINE_READY_TIMEOUT_S shorter than the load: TimeoutError, exit 1, the EngineCore left loading in the group', async () => {
    const sim = await startSim({ ready: false, env: { VLLM_SIM_LOAD_SECONDS: '5', VLLM_ENGINE_READY_TIMEOUT_S: '1' } });
    expect((await sim.waitForExit()).code).toBe(1);
    expect(sim.stderrLines.at(-1)).toBe(
      `(APIServer pid=${sim.pid}) TimeoutError: Timed out waiting for engine core processes to start. This is often caused by slow ` +
        'weight loading for large models. Waited 1s (configured by VLLM_ENGINE_READY_TIMEOUT_S). To increase the timeout, set the ' +
        'environment variable: VLLM_ENGINE_READY_TIMEOUT_S=<seconds>',
    );
    expect(groupPids(sim.pid)).not.toEqual([]); // what a supervisor must stop
    signalGroup(sim.pid, 'SIGKILL');
    await expectNoProcessLeft(sim.pid);
  });

  test.concurrent('VLLM_SERVER_DEV_MODE=true: the ValueError of int("true") once the model is loaded, exit 1, nothing left', async () => {
    const sim = await startSim({ ready: false, env: { VLLM_SERVER_DEV_MODE: 'true' } });
    expect((await sim.waitForExit()).code).toBe(1);
    expect(sim.stderrLines.at(-1)).toBe(`(APIServer pid=${sim.pid}) ValueError: invalid literal for int() with base 10: 'true'`);
    await expectNoProcessLeft(sim.pid);
  });

  test.concurrent('CRASH_AFTER_REQUESTS: the whole server dies after N completed requests', async () => {
    const sim = await startSim({ env: { VLLM_SIM_CRASH_AFTER_REQUESTS: '2' } });
    for (let i = 0; i < 2; i += 1) {
      expect((await httpRequest(`${sim.baseUrl}/v1/chat/completions`, { body: chatBody('ok') })).status).toBe(200);
    }
    const status = await sim.waitForExit();
    expect(status.code).not.toBe(0);
    await expect(httpRequest(`${sim.baseUrl}/health`)).rejects.toThrow();
    await expectNoProcessLeft(sim.pid);
  });

  test.concurrent('CRASH_MID_STREAM: in-stream error event, health 503, EngineDeadError, watchdog exit', async () => {
    const sim = await startSim({ env: { VLLM_SIM_CRASH_MID_STREAM: '2', VLLM_SIM_WATCHDOG_SECONDS: '2' } });
    const sse = await readSse(`${sim.baseUrl}/v1/chat/completions`, chatBody(words(10), { stream: true }));
    expect(sse.status).toBe(200);
    expect(sse.events.slice(-2)).toEqual([
      '{"error": {"message": "EngineCore encountered an issue. See stack trace (above) for the root cause.", "type": "InternalServerError", "param": null, "code": 500}}',
      '[DONE]',
    ]);
    expect((await httpRequest(`${sim.baseUrl}/health`)).status).toBe(503);
    const dead = await httpRequest(`${sim.baseUrl}/v1/chat/completions`, { body: chatBody('x') });
    expect([dead.status, dead.body]).toEqual([
      500,
      '{"error":{"message":"EngineCore encountered an issue. See stack trace (above) for the root cause.","type":"InternalServerError","param":null,"code":500}}',
    ]);
    expect((await sim.waitForExit(5000)).code).toBe(0);
    await expectNoProcessLeft(sim.pid);
  });

  test.concurrent('CRASH_MID_STREAM on a Responses stream: the connection breaks off mid-body, no error event', async () => {
    const sim = await startSim({ env: { VLLM_SIM_CRASH_MID_STREAM: '2', VLLM_SIM_WATCHDOG_SECONDS: '2' } });
    const res = await readToEnd(`${sim.baseUrl}/v1/responses`, { input: words(10), stream: true });
    expect(res.complete).toBe(false);
    expect(res.raw).toContain('event: response.output_text.delta');
    expect(res.raw).not.toMatch(/response\.completed|event: error|\[DONE\]/);
    expect((await sim.waitForExit(5000)).code).toBe(0);
    await expectNoProcessLeft(sim.pid);
  });

  test.concurrent('CRASH_MID_STREAM_HARD: the whole process dies mid-stream', async () => {
    const sim = await startSim({ env: { VLLM_SIM_CRASH_MID_STREAM: '2', VLLM_SIM_CRASH_MID_STREAM_HARD: '1' } });
    const events: string[] = [];
    const sse = await readSse(`${sim.baseUrl}/v1/chat/completions`, chatBody(words(10), { stream: true }), {
      onEvent: (data) => events.push(data),
    }).catch(() => null);
    expect(events.some((e) => /"delta":\{[^}]*"content":"[^"]/.test(e))).toBe(true); // text arrived before the break
    expect(sse?.events.includes('[DONE]') ?? false).toBe(false);
    expect(events).not.toContain('[DONE]');
    expect((await sim.waitForExit()).signal).toBe('SIGKILL');
    await expectNoProcessLeft(sim.pid);
  });

  test.concurrent('IGNORE_SIGTERM: only SIGKILL stops the server and engine', async () => {
    const sim = await startSim({ env: { VLLM_SIM_IGNORE_SIGTERM: '1' } });
    sim.kill('SIGTERM');
    await sleep(500);
    expect(sim.exited).toBe(false);
    expect(groupPids(sim.pid)).toHaveLength(2);
    expect((await httpRequest(`${sim.baseUrl}/health`)).status).toBe(200);
    sim.kill('SIGKILL');
    await expectNoProcessLeft(sim.pid);
  });

  test.concurrent('HANG: connections are accepted but never answered', async () => {
    const sim = await startSim({ ready: false, env: { VLLM_SIM_HANG: '1' } });
    await sim.waitForLine(/Application startup complete\./, 5000); // its own listener, not whatever else is on the port
    expect(await probeConnect(sim.port)).toBe('connected');
    await expect(httpRequest(`${sim.baseUrl}/health`, { timeoutMs: 500 })).rejects.toThrow('timeout');
    sim.kill('SIGKILL');
    await expectNoProcessLeft(sim.pid);
  });

  test.concurrent('HEALTH_DELAY_MS delays /health', async () => {
    const sim = await startSim({ env: { VLLM_SIM_HEALTH_DELAY_MS: '400' } });
    const t0 = Date.now();
    expect((await httpRequest(`${sim.baseUrl}/health`)).status).toBe(200);
    expect(Date.now() - t0).toBeGreaterThanOrEqual(380);
    await sim.stop();
  });

  test.concurrent('FAIL_NTH_REQUEST: the Nth generation request fails with a 500 envelope', async () => {
    const sim = await startSim({ env: { VLLM_SIM_FAIL_NTH_REQUEST: '2' } });
    const statuses: number[] = [];
    let failure = '';
    for (let i = 0; i < 3; i += 1) {
      const res = await httpRequest(`${sim.baseUrl}/v1/chat/completions`, { body: chatBody('x') });
      statuses.push(res.status);
      if (res.status === 500) failure = res.body;
    }
    expect(statuses).toEqual([200, 500, 200]);
    expect(failure).toBe('{"error":{"message":"Internal server error","type":"InternalServerError","param":null,"code":500}}');
    await sim.stop();
  });

  test.concurrent('TTFT_MS and ITL_MS pace the tokens', async () => {
    const sim = await startSim({ env: { VLLM_SIM_TTFT_MS: '300', VLLM_SIM_ITL_MS: '100' } });
    const t0 = Date.now();
    const times: number[] = [];
    await readSse(`${sim.baseUrl}/v1/chat/completions`, chatBody('a b c', { stream: true }), {
      onEvent: () => times.push(Date.now() - t0),
    });
    // Lower bounds from the request's start: token k cannot arrive before TTFT + (k - 1) × ITL.
    // (Gaps between arrivals are not asserted: a delayed event shortens the gap after it.)
    expect(times[1]).toBeGreaterThanOrEqual(280); // first delta after TTFT
    expect(times[2]).toBeGreaterThanOrEqual(380); // then one token per ITL
    expect(times[3]).toBeGreaterThanOrEqual(480);
    await sim.stop();
  });

  test.concurrent('ENGINE_EXIT_AFTER_MS: engine death turns health 503 and the server exits at the next watchdog check', async () => {
    // A 1 s watchdog period (vLLM: 5 s) against a 4 s bound: room for five simulators running at once.
    const sim = await startSim({ env: { VLLM_SIM_ENGINE_EXIT_AFTER_MS: '300', VLLM_SIM_WATCHDOG_SECONDS: '1' } });
    await sim.waitForLine(/Engine core proc EngineCore died unexpectedly/);
    const diedAt = Date.now();
    expect((await httpRequest(`${sim.baseUrl}/health`)).status).toBe(503);
    expect((await httpRequest(`${sim.baseUrl}/v1/completions`, { body: { prompt: 'x' } })).status).toBe(500);
    expect((await sim.waitForExit(7000)).code).toBe(0);
    expect(Date.now() - diedAt).toBeLessThan(4000);
    await expectNoProcessLeft(sim.pid);
  });

  test.concurrent('ORPHAN_EXIT_S: a simulator whose launcher died exits by itself', async () => {
    const port = await freePort();
    // The shell starts the simulator in the background and exits once it runs, orphaning it.
    const script = 'node "$0" serve m --port "$1" --host 127.0.0.1 & sleep 1.5';
    const launcher = spawnProcess('sh', ['-c', script, simMain, String(port)], {
      env: { VLLM_SIM_ORPHAN_EXIT_S: '0.5', VLLM_SIM_LOAD_SECONDS: '0.1' },
    });
    await launcher.waitForExit();
    expect(groupPids(launcher.pid).length).toBeGreaterThan(0);
    await expectNoProcessLeft(launcher.pid, 8000);
  });

  const ENGINE_DEAD =
    '{"error":{"message":"EngineCore encountered an issue. See stack trace (above) for the root cause.","type":"InternalServerError","param":null,"code":500}}';

  test.concurrent('engine death answers a utility call in flight with the EngineDeadError 500, and the watchdog still exits', async () => {
    const sim = await startSim({ env: { ...fast, VLLM_SERVER_DEV_MODE: '1', VLLM_SIM_ITL_MS: '200' } });
    const inFlight = httpRequest(`${sim.baseUrl}/v1/chat/completions`, { body: chatBody(words(20)) });
    await waitUntil(async () => metric(await metrics(sim), 'vllm:num_requests_running') === 1, 3000);
    // mode=wait: the engine holds the sleep until the running request ends, which it never does.
    const sleepCall = httpRequest(`${sim.baseUrl}/sleep?level=1&mode=wait`, { method: 'POST', timeoutMs: 5000 });
    await sim.waitForLine(/sleep the engine with level 1/);
    await sleep(100);
    process.kill(engineOf(sim), 'SIGKILL');
    const slept = await sleepCall;
    expect([slept.status, slept.body]).toEqual([500, ENGINE_DEAD]);
    expect([(await inFlight).status, (await inFlight).body]).toEqual([500, ENGINE_DEAD]);
    // No connection is left open for uvicorn's shutdown to wait on: the server exits with its engine.
    expect((await sim.waitForExit(5000)).code).toBe(0);
    await expectNoProcessLeft(sim.pid);
  });

  test.concurrent('a dead engine answers every utility call at once with the EngineDeadError 500', async () => {
    const sim = await startSim({ env: { VLLM_SERVER_DEV_MODE: '1', VLLM_KEEP_ALIVE_ON_ENGINE_DEATH: '1' } });
    process.kill(engineOf(sim), 'SIGKILL');
    await sim.waitForLine(/Engine core proc EngineCore died unexpectedly/);
    const post = (path: string, body?: unknown) => httpRequest(`${sim.baseUrl}${path}`, { method: 'POST', body, timeoutMs: 3000 });
    const answers = await Promise.all([
      post('/sleep?level=1'),
      post('/wake_up'),
      httpRequest(`${sim.baseUrl}/is_sleeping`, { timeoutMs: 3000 }),
      post('/collective_rpc', { method: 'reload_weights' }),
      post('/reset_prefix_cache'),
      post('/pause'),
      post('/resume'),
    ]);
    for (const res of answers) expect([res.status, res.body]).toEqual([500, ENGINE_DEAD]);
    expect((await httpRequest(`${sim.baseUrl}/health`)).status).toBe(503);
    sim.kill('SIGKILL');
    await expectNoProcessLeft(sim.pid);
  });

  test.concurrent('watchdog period is configurable for fast tests', async () => {
    const sim = await startSim({ env: { ...fast, VLLM_SIM_ENGINE_EXIT_AFTER_MS: '100' } });
    const status = await sim.waitForExit(3000);
    expect(status.code).toBe(0);
    await expectNoProcessLeft(sim.pid);
  });
});
