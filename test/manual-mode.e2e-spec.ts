/**
 * Manual mode (vllm.auto_start: false) in front of a vLLM someone else runs with --api-key:
 * vllm.api_key is the key tide-vllm sends on every call to it, and is never shown.
 */
import { createServer } from 'node:http';
import type { AddressInfo } from 'node:net';
import { type Service, post, startService, stopAllServices } from './service';
import { type SimHandle, httpRequest, killAll, readSse, sleep, startSim, waitUntil } from './harness';

const KEY = 'sk-manual-engine-key';

let sim: SimHandle;

beforeAll(async () => {
  sim = await startSim({ args: ['--api-key', KEY], readyHeaders: { authorization: `Bearer ${KEY}` } });
});
afterEach(stopAllServices);
afterAll(async () => {
  await sim?.stop();
  await killAll();
});

function manual(vllm: Record<string, unknown> = {}, env: Record<string, string> = {}, waitFor?: null): Promise<Service> {
  // Debug logging: the key must not show up even there.
  const config = { vllm: { auto_start: false, model_name: 'sim-model', port: sim.port, ...vllm }, logging: { level: 'debug' } };
  return startService({ config, env, waitFor });
}

/** /admin/status once the supervisor has judged the vLLM it watches unfit (manual mode: 'unreachable'). */
async function unfit(svc: Service): Promise<{ state: string; last_error: string }> {
  let body = { state: '', last_error: '' };
  await waitUntil(async () => {
    body = (await svc.json<typeof body>('/admin/status').catch(() => ({ body }))).body; // not listening yet
    return body.state === 'unreachable' && Boolean(body.last_error);
  }, 10_000, 50, 'state unreachable with a last_error');
  return body;
}

const chat = { messages: [{ role: 'user', content: 'keyed engine' }] };

describe('manual mode with a vLLM that requires a key', () => {
  it('with vllm.api_key (from the environment) the simple API, a relayed stream and /v1/models work; the key is never shown', async () => {
    const svc = await manual({ api_key: '${ENGINE_KEY}' }, { ENGINE_KEY: KEY });
    expect((await svc.request('/ready')).status).toBe(200);

    const simple = await svc.json<{ content: string }>('/chat/completions', post({ prompt: 'keyed engine' }));
    expect([simple.status, simple.body.content]).toEqual([200, 'keyed engine']);

    const stream = await readSse(`${svc.url}/v1/chat/completions`, { ...chat, stream: true });
    expect(stream.status).toBe(200);
    expect(stream.events.at(-1)).toBe('[DONE]');
    const text = stream.events
      .slice(0, -1)
      .map((e) => (JSON.parse(e) as { choices: Array<{ delta: { content?: string } }> }).choices[0]?.delta.content ?? '')
      .join('');
    expect(text).toBe('keyed engine');

    const models = await svc.json<{ data: Array<{ id: string }> }>('/v1/models');
    expect(models.status).toBe(200);
    expect(models.body.data.map((m) => m.id)).toEqual(['sim-model']);

    // What tide-vllm did not start, it neither restarts nor puts to sleep.
    for (const action of ['restart', 'sleep']) {
      const refused = await svc.json<{ error: { message: string } }>(`/admin/${action}`, { method: 'POST' });
      expect([action, refused.status, refused.body.error.message]).toEqual([action, 409, `${action} is only available when tide-vllm starts vLLM itself (vllm.auto_start: true)`]);
    }

    const status = await svc.request('/admin/status');
    expect(status.status).toBe(200);
    expect(status.body).not.toContain(KEY);
    expect((await svc.request('/health')).body).not.toContain(KEY);
    await svc.stop();
    expect(svc.proc.output.join('\n')).not.toContain(KEY);
  });

  it('without vllm.api_key it is not ready, though vLLM answers /health (unguarded), and says what to set', async () => {
    const svc = await manual({}, {}, null);
    expect((await unfit(svc)).last_error).toContain('vLLM refused tide-vllm (HTTP 401): vllm.api_key is not set');
    expect((await svc.json<{ status: string }>('/health')).body.status).toBe('degraded');
    expect((await svc.request('/ready')).status).toBe(503);
    await sleep(1_000); // four more probes
    // Manual mode still tries a vLLM it judged unfit (it may have been fixed since): vLLM's refusal, explained.
    const simple = await svc.json<{ error: { type: string; message: string } }>('/chat/completions', post({ prompt: 'hi' }));
    expect([simple.status, simple.body.error.type]).toEqual([502, 'upstream_error']);
    expect(simple.body.error.message).toContain('vllm.api_key is not set');
    // Only the configuration mends it: OpenAI's SDKs are told not to retry (they retry any 5xx otherwise).
    expect(simple.res.headers['x-should-retry']).toBe('false');
    // Not vLLM's 401 relayed: an SDK would take it for a refusal of its own key (AuthenticationError).
    for (const [method, path] of [['POST', '/v1/chat/completions'], ['GET', '/v1/models']] as const) {
      const relayed = await svc.json<{ error: { type: string; message: string; code: number } }>(path, method === 'POST' ? post(chat) : {});
      expect([path, relayed.status, relayed.body.error.type, relayed.body.error.code]).toEqual([path, 502, 'InternalServerError', 502]);
      expect(relayed.body.error.message).toContain('vllm.api_key is not set');
      expect(relayed.res.headers['x-should-retry']).toBe('false');
    }
    const warnings = svc.proc.output.filter((l) => l.includes('"level":40') && l.includes('vllm.api_key is not set'));
    expect(warnings.length).toBe(1); // warned once, not at every probe
  });

  it('with a model_name vLLM does not serve it is not ready, and names both', async () => {
    const svc = await manual({ api_key: KEY, model_name: 'other-model' }, {}, null);
    expect((await unfit(svc)).last_error).toContain('serves "sim-model", not vllm.model_name "other-model"');
    expect((await svc.request('/ready')).status).toBe(503);
  });

  it("a model_name vLLM does not serve is the service's misconfiguration on the simple API (502 naming both), and vLLM's 404 on a client's own model", async () => {
    const svc = await manual({ api_key: KEY, model_name: 'my-model' }, {}, null);
    await unfit(svc);
    const expected = 'vLLM refused tide-vllm\'s model (HTTP 404): vllm.model_name is "my-model", but vLLM serves "sim-model"';
    // The client named no model: vLLM's "The model `my-model` does not exist." (404) would blame it.
    const simple: Array<[string, Record<string, unknown>]> = [
      ['/chat/completions', { prompt: 'hi' }],
      ['/generate', { prompt: 'hi', history_input: ['a'], history_output: ['b'] }],
      ['/v1/chat/completions', { prompt: 'hi' }],
    ];
    for (const [path, body] of simple) {
      for (const stream of [false, true]) {
        const res = await svc.json<{ content: unknown; error: { type: string; message: string } }>(path, post({ ...body, stream }));
        expect([path, stream, res.status, res.body.content, res.body.error]).toEqual([path, stream, 502, null, { type: 'upstream_error', message: expected }]);
        expect(res.res.headers['x-should-retry']).toBe('false');
      }
    }
    // The OpenAI API with the client's own choice of model: vLLM's answer, relayed as it is.
    const relayed = await svc.json<{ error: { type: string; message: string; code: number } }>('/v1/chat/completions', post({ ...chat, model: 'my-model' }));
    expect([relayed.status, relayed.body.error.type, relayed.body.error.code]).toEqual([404, 'NotFoundError', 404]);
    expect(relayed.body.error.message).toBe('The model `my-model` does not exist.');
  });

  it('refuses vllm.api_key with auto_start, naming the key, before it starts anything', async () => {
    const svc = await startService({ config: { vllm: { api_key: KEY } }, waitFor: null });
    expect((await svc.proc.waitForExit(10_000)).code).toBe(2);
    const output = svc.proc.output.join('\n');
    expect(output).toContain('vllm.api_key: is only for a vLLM you run yourself (vllm.auto_start: false)');
    expect(output).not.toContain(KEY);
  });
});

describe('manual mode with a vLLM whose context is shorter than vllm.max_model_len says', () => {
  it('a simple-API chat that leaves max_tokens to the default is answered, not refused for a max_tokens the client never sent', async () => {
    const short = await startSim({ args: ['--max-model-len', '1024'] });
    try {
      const svc = await startService({ config: { vllm: { auto_start: false, model_name: 'sim-model', port: short.port, max_model_len: 4096, max_tokens: 2048 } } });
      // Said once, at start: the configuration is wrong, and how to mend it.
      const warned = svc.proc.output.filter((l) => l.includes('"level":40') && l.includes('with a context of 1024 tokens, vllm.max_model_len says 4096: set vllm.max_model_len to 1024'));
      expect(warned).toHaveLength(1);
      const plain = await svc.json<{ content: string }>('/chat/completions', post({ prompt: 'short context' }));
      expect([plain.status, plain.body.content]).toEqual([200, 'short context']);
      const stream = await readSse(`${svc.url}/chat/completions`, { prompt: 'short context', stream: true });
      expect([stream.status, stream.events.at(-1)]).toEqual([200, '[DONE]']);
      // A max_tokens the client asked for is the client's: vLLM's refusal is relayed.
      const asked = await svc.json<{ error: { type: string; message: string } }>('/chat/completions', post({ prompt: 'short context', max_tokens: 2000 }));
      expect([asked.status, asked.body.error.message]).toEqual([400, expect.stringContaining('cannot be greater than max_model_len')]);
    } finally {
      await short.stop();
    }
  });
});

describe('manual mode in front of a vLLM that breaks off a stream after its usage chunk', () => {
  it('the simple API ends that stream with an error event and [DONE] alone: no final event that would pass it for a whole answer', async () => {
    const chunk = (body: object) => `data: ${JSON.stringify({ id: 'chatcmpl-x', object: 'chat.completion.chunk', created: 1, model: 'sim-model', ...body })}\n\n`;
    const vllm = createServer((req, res) => {
      if (req.url === '/v1/models') return res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify({ object: 'list', data: [{ id: 'sim-model', object: 'model', max_model_len: 4096 }] }));
      if (req.url !== '/v1/chat/completions') return res.writeHead(200).end(); // /health and the rest
      req.resume();
      res.writeHead(200, { 'content-type': 'text/event-stream; charset=utf-8' });
      res.write(chunk({ choices: [{ index: 0, delta: { content: 'Paris' }, logprobs: null, finish_reason: null }] }));
      res.write(chunk({ choices: [{ index: 0, delta: { content: '' }, logprobs: null, finish_reason: 'stop' }] }));
      res.write(chunk({ choices: [], usage: { prompt_tokens: 3, total_tokens: 4, completion_tokens: 1 } }));
      setTimeout(() => res.destroy(), 50); // no [DONE]: vLLM died
    });
    await new Promise<void>((resolve) => vllm.listen(0, '127.0.0.1', resolve));
    try {
      const port = (vllm.address() as AddressInfo).port;
      const svc = await startService({ config: { vllm: { auto_start: false, model_name: 'sim-model', port, max_model_len: 4096 } } });
      const stream = await readSse(`${svc.url}/chat/completions`, { prompt: 'capital', stream: true });
      const events = stream.events.slice(0, -1).map((e) => JSON.parse(e) as { content: string | null; finish_reason: string | null; error: { type: string } | null });
      expect(events.map((e) => [e.content, e.finish_reason, e.error?.type ?? null])).toEqual([
        ['Paris', null, null],
        [null, null, 'upstream_error'],
      ]);
      expect(stream.events.at(-1)).toBe('[DONE]');
    } finally {
      vllm.close();
    }
  });
});

describe('manual mode with LoRA, in front of a vLLM restarted by hand', () => {
  it('adapters loaded through tide-vllm are loaded again once that vLLM no longer lists them', async () => {
    const lora = { args: ['--enable-lora'], env: { VLLM_ALLOW_RUNTIME_LORA_UPDATING: 'true' } };
    let vllm = await startSim(lora);
    try {
      const svc = await startService({ config: { vllm: { auto_start: false, model_name: 'sim-model', port: vllm.port, health_interval: 0.25, lora: { enabled: true } } } });
      expect((await svc.json('/admin/lora', post({ name: 'sql', path: '/adapters/sql' }))).status).toBe(200);
      await vllm.stop();
      vllm = await startSim({ ...lora, port: vllm.port }); // restarted faster than tide-vllm may notice
      const listed = async (): Promise<string[]> => (await svc.json<{ data?: Array<{ id: string }> }>('/v1/models')).body.data?.map((m) => m.id) ?? [];
      await waitUntil(async () => (await listed().catch((): string[] => [])).includes('sql'), 10_000, 100, 'sql loaded again');
      expect(await listed()).toEqual(['sim-model', 'sql']);
      expect((await svc.json<{ model: string }>('/v1/chat/completions', post({ model: 'sql', messages: [{ role: 'user', content: 'hi' }], max_tokens: 2 }))).body.model).toBe('sql');
    } finally {
      await vllm.stop();
    }
  });
});

describe('manual mode with a vLLM put to sleep by hand', () => {
  it('is not ready while it sleeps: generations get a 503 at once (vLLM would hold them until vllm.timeout), the model list still goes through; awake, it serves again', async () => {
    const dev = await startSim({ args: ['--enable-sleep-mode'], env: { VLLM_SERVER_DEV_MODE: '1' } });
    try {
      const svc = await startService({ config: { vllm: { auto_start: false, model_name: 'sim-model', port: dev.port, health_interval: 0.2, timeout: 10 } } });
      expect(await svc.json('/chat/completions', post({ prompt: 'awake' }))).toMatchObject({ status: 200, body: { content: 'awake' } });
      expect((await httpRequest(`${dev.baseUrl}/sleep?level=1`, { method: 'POST' })).status).toBe(200);
      expect((await unfit(svc)).last_error).toContain('is asleep (put to sleep outside tide-vllm; a POST to its /wake_up wakes it)');
      expect((await svc.request('/ready')).status).toBe(503);
      const simple = await svc.json<{ error: { type: string } }>('/chat/completions', post({ prompt: 'asleep' }));
      expect([simple.status, simple.body.error.type, simple.res.headers['retry-after']]).toEqual([503, 'vllm_not_ready', '5']);
      const relayed = await svc.json<{ error: { message: string } }>('/v1/chat/completions', post(chat));
      expect([relayed.status, relayed.body.error.message]).toEqual([503, expect.stringContaining('is asleep')]);
      const models = await svc.json<{ data: Array<{ id: string }> }>('/v1/models'); // vLLM's API server answers it asleep (A9)
      expect([models.status, models.body.data.map((m) => m.id)]).toEqual([200, ['sim-model']]);
      expect((await httpRequest(`${dev.baseUrl}/wake_up`, { method: 'POST' })).status).toBe(200);
      await svc.waitForHealth('healthy', 10_000);
      expect(await svc.json('/chat/completions', post({ prompt: 'awake again' }))).toMatchObject({ status: 200, body: { content: 'awake again' } });
    } finally {
      await dev.stop();
    }
  });
});
