/**
 * Manual mode (vllm.auto_start: false) in front of a vLLM someone else runs with --api-key:
 * vllm.api_key is the key tide-vllm sends on every call to it, and is never shown.
 */
import { type Service, post, startService, stopAllServices } from './service';
import { type SimHandle, killAll, readSse, startSim } from './harness';

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

function manual(vllm: Record<string, unknown> = {}, env: Record<string, string> = {}): Promise<Service> {
  // Debug logging: the key must not show up even there.
  const config = { vllm: { auto_start: false, model_name: 'sim-model', port: sim.port, ...vllm }, logging: { level: 'debug' } };
  return startService({ config, env });
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

    const status = await svc.request('/admin/status');
    expect(status.status).toBe(200);
    expect(status.body).not.toContain(KEY);
    expect((await svc.request('/health')).body).not.toContain(KEY);
    await svc.stop();
    expect(svc.proc.output.join('\n')).not.toContain(KEY);
  });

  it('without vllm.api_key, vLLM refuses tide-vllm as before: 502 on the simple API, its 401 relayed', async () => {
    const svc = await manual();
    expect((await svc.request('/ready')).status).toBe(200); // /health is not guarded by vLLM's key
    const simple = await svc.json<{ error: { message: string } }>('/chat/completions', post({ prompt: 'hi' }));
    expect(simple.status).toBe(502);
    expect(simple.body.error.message).toBe('vLLM refused the key tide-vllm sent (HTTP 401): set vllm.api_key to the key vLLM was started with');
    expect((await svc.request('/v1/models')).status).toBe(401);
  });

  it('refuses vllm.api_key with auto_start, naming the key, before it starts anything', async () => {
    const svc = await startService({ config: { vllm: { api_key: KEY } }, waitFor: null });
    expect((await svc.proc.waitForExit(10_000)).code).toBe(2);
    const output = svc.proc.output.join('\n');
    expect(output).toContain('vllm.api_key: is only for a vLLM you run yourself (vllm.auto_start: false)');
    expect(output).not.toContain(KEY);
  });
});
