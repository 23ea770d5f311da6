/**
 * Connections against the real service: pipelined requests whose client leaves, a client too slow
 * sending its request, and a client that asks for its connection to be closed after a stream.
 */
import { type Socket, connect } from 'node:net';
import { type Service, post, startService, stopAllServices } from './service';
import { killAll, sleep, waitUntil } from './harness';

afterAll(async () => {
  await stopAllServices();
  await killAll();
});

/** A raw connection to the service; every byte it receives is kept. */
function rawConnection(svc: Service): { socket: Socket; received: () => string; closed: Promise<number> } {
  const socket = connect(svc.port, '127.0.0.1');
  socket.on('error', () => undefined);
  let text = '';
  socket.on('data', (chunk: Buffer) => (text += chunk.toString('utf8')));
  const closed = new Promise<number>((resolve) => socket.on('close', () => resolve(Date.now())));
  return { socket, received: () => text, closed };
}

function postRequest(path: string, body: unknown, headers = ''): string {
  const json = JSON.stringify(body);
  return `POST ${path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: ${Buffer.byteLength(json)}\r\n${headers}\r\n${json}`;
}

/** The value of one exposition line of /metrics (vLLM's lines carry extra labels), 0 when absent. */
async function metric(svc: Service, prefix: string, ...labels: string[]): Promise<number> {
  const text = (await svc.request('/metrics')).body;
  const line = text.split('\n').find((l) => l.startsWith(prefix) && labels.every((label) => l.includes(label)));
  return line ? Number(line.split(' ').pop()) : 0;
}

const WORDS = 'one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen nineteen twenty';

describe('pipelined requests whose client leaves', () => {
  it('free their slots, abort their generations in vLLM and are recorded, so nothing waits for them', async () => {
    // Each answer takes 20 tokens × 200 ms: they are all still being generated when the client leaves.
    const svc = await startService({ config: { web: { max_concurrent_requests: 4, drain_timeout: 30 }, logging: { level: 'info' } }, env: { VLLM_SIM_ITL_MS: '200' } });
    const aborted = await metric(svc, 'vllm:request_success_total{', 'finished_reason="abort"');
    const client = rawConnection(svc);
    const chat = { messages: [{ role: 'user', content: WORDS }], max_tokens: 20 };
    // The first holds the connection; the others (the relay and the simple API, streamed or not)
    // wait behind it for their turn, which never comes.
    client.socket.write(
      postRequest('/v1/chat/completions', { ...chat, stream: true }) +
        postRequest('/v1/chat/completions', chat) +
        postRequest('/chat/completions', { prompt: WORDS, max_tokens: 20, stream: true }) +
        postRequest('/v1/completions', { prompt: WORDS, max_tokens: 20, stream: true }),
    );
    await waitUntil(async () => (await metric(svc, 'vllm:num_requests_running{')) === 4, 5_000, 50, 'four requests generating in vLLM');
    client.socket.destroy();
    await waitUntil(async () => (await metric(svc, 'tide_requests_in_flight ')) === 0, 2_000, 50, 'nothing in flight');
    await waitUntil(async () => (await metric(svc, 'vllm:request_success_total{', 'finished_reason="abort"')) === aborted + 4, 2_000, 50, 'four aborts in vLLM');
    expect(await metric(svc, 'vllm:num_requests_running{')).toBe(0);
    // Recorded once each: the stream that was under way with its status, the others as 499.
    expect(await metric(svc, 'tide_http_requests_total{', 'route="/v1/chat/completions"', 'status="200"')).toBe(1);
    expect(await metric(svc, 'tide_http_requests_total{', 'route="/v1/chat/completions"', 'status="499"')).toBe(1);
    expect(await metric(svc, 'tide_http_requests_total{', 'route="/chat/completions"', 'status="499"')).toBe(1);
    expect(await metric(svc, 'tide_http_requests_total{', 'route="/v1/completions"', 'status="499"')).toBe(1);
    const access = svc.proc.stdoutLines.filter((l) => l.includes('"request completed"') && l.includes('"method":"POST"'));
    expect(access).toHaveLength(4);
    // Their slots are free: four requests at once are all admitted.
    const answers = await Promise.all([1, 2, 3, 4].map(() => svc.request('/v1/chat/completions', post({ messages: [{ role: 'user', content: 'hi' }], max_tokens: 1 }))));
    expect(answers.map((a) => a.status)).toEqual([200, 200, 200, 200]);
    // A drain has nothing to wait for.
    const t0 = Date.now();
    expect(await svc.stop()).toEqual({ code: 0, signal: null });
    expect(Date.now() - t0).toBeLessThan(10_000); // not web.drain_timeout (30 s)
  });
});

describe('a client too slow sending its request', () => {
  it('is recorded with the 408 it was sent, on the relay answered before Fastify and on the Fastify routes', async () => {
    // 1.005 s is 1004.9999999999999 ms, which Node's server refused to start with: it takes whole milliseconds.
    const svc = await startService({ config: { web: { client_timeout: 1.005 }, logging: { level: 'info' } } });
    const halfBody = (path: string) => `POST ${path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"pro`;
    const slow = ['/v1/chat/completions', '/chat/completions'].map((path) => {
      const client = rawConnection(svc);
      client.socket.write(halfBody(path));
      return { path, client };
    });
    // One that leaves mid-body was sent nothing: 499.
    await svc.waitInFlight(2);
    const leaving = rawConnection(svc);
    leaving.socket.write(halfBody('/v1/chat/completions'));
    await svc.waitInFlight(3);
    leaving.socket.destroy();
    for (const { path, client } of slow) {
      await Promise.race([client.closed, sleep(4_000)]);
      expect([path, client.received().split('\r\n')[0]]).toEqual([path, 'HTTP/1.1 408 Request Timeout']);
    }
    await sleep(100);
    expect(await metric(svc, 'tide_http_requests_total{', 'route="/v1/chat/completions"', 'status="408"')).toBe(1);
    expect(await metric(svc, 'tide_http_requests_total{', 'route="/chat/completions"', 'status="408"')).toBe(1);
    expect(await metric(svc, 'tide_http_requests_total{', 'route="/v1/chat/completions"', 'status="499"')).toBe(1);
    const access = svc.proc.stdoutLines.filter((l) => l.includes('"request completed"') && l.includes('"method":"POST"')).map((l) => JSON.parse(l) as Record<string, unknown>);
    expect(access.map((l) => `${String(l.url)} ${String(l.status)} ${String(l.level)}`).sort()).toEqual([
      '/chat/completions 408 40',
      '/v1/chat/completions 408 40',
      '/v1/chat/completions 499 40',
    ]);
    await svc.stop();
  });
});

describe('a stream for a client that sent Connection: close', () => {
  let svc: Service;

  beforeAll(async () => {
    svc = await startService();
  });

  afterAll(() => svc.stop());

  it.each([
    ['/v1/chat/completions', { messages: [{ role: 'user', content: 'a b' }], max_tokens: 2, stream: true }],
    ['/chat/completions', { prompt: 'a b', max_tokens: 2, stream: true }],
  ])('%s: the connection is closed after the stream, not kept alive', async (path, body) => {
    const client = rawConnection(svc);
    client.socket.write(postRequest(path, body, 'Connection: close\r\n'));
    const closedAt = await Promise.race([client.closed, sleep(3_000).then(() => 0)]);
    const text = client.received();
    expect(text).toMatch(/^HTTP\/1\.1 200 OK\r\n/);
    expect(text).toMatch(/\r\nconnection: close\r\n/i);
    expect(text.endsWith('data: [DONE]\n\n\r\n0\r\n\r\n')).toBe(true);
    expect(closedAt).toBeGreaterThan(0); // closed by the server, well before its keep-alive timeout (65 s)
  });

  it.each([
    ['/v1/chat/completions', { messages: [{ role: 'user', content: 'a b' }], max_tokens: 2, stream: true }],
    ['/chat/completions', { prompt: 'a b', max_tokens: 2, stream: true }],
  ])('%s: without it, the connection is kept for the next request', async (path, body) => {
    const client = rawConnection(svc);
    client.socket.write(postRequest(path, body));
    await waitUntil(() => client.received().endsWith('\r\n0\r\n\r\n'), 3_000, 20, 'the stream');
    expect(client.received()).toMatch(/\r\nconnection: keep-alive\r\n/i);
    client.socket.write(postRequest(path, body));
    // The second answer's head may come before its stream has ended: wait for the end too.
    const second = () => client.received().split('HTTP/1.1 200 OK').length === 3 && client.received().endsWith('\r\n0\r\n\r\n');
    await waitUntil(second, 3_000, 20, 'a second, whole answer on the connection');
    expect(client.received().endsWith('data: [DONE]\n\n\r\n0\r\n\r\n')).toBe(true);
    client.socket.destroy();
  });
});

describe('a streaming client that stops reading', () => {
  // Answers far larger than the kernel's socket buffers, sent as fast as the simulator can: a
  // client that takes nothing makes tide-vllm wait for 'drain', which never comes.
  // The relay: 64 choices of many tokens each. The simple API: every token 128 control characters,
  // each 6 bytes once JSON-escaped (~770 bytes a token), and 12,000 of them.
  const bigPrompt = ('\u0001'.repeat(128) + ' ').repeat(12_000);
  it.each([
    ['/v1/chat/completions', { messages: [{ role: 'user', content: WORDS }], max_tokens: 40_000, n: 64, ignore_eos: true, stream: true }],
    ['/chat/completions', { prompt: bigPrompt, max_tokens: 12_000, stream: true }],
  ])('%s: is cut off after web.client_timeout, its generation aborted in vLLM and its slot freed', async (path, body) => {
    const svc = await startService({
      config: {
        web: { client_timeout: 1, body_limit: 16 * 1024 * 1024, max_prompt_chars: 4_000_000 },
        vllm: { max_model_len: 100_000, max_tokens: 12_000 },
      },
      env: { VLLM_SIM_ITL_MS: '0', VLLM_SIM_TTFT_MS: '0' },
    });
    const aborted = await metric(svc, 'vllm:request_success_total{', 'finished_reason="abort"');
    const client = rawConnection(svc);
    // Read the head, then nothing more: the socket is paused, the kernel's buffers fill up.
    client.socket.on('data', () => {
      if (client.received().includes('\r\n\r\n')) client.socket.pause();
    });
    client.socket.write(postRequest(path, body));
    await waitUntil(() => client.received().includes('\r\n\r\n'), 10_000, 20, 'the head of the answer');
    expect(client.received()).toMatch(/^HTTP\/1\.1 200 OK\r\n/);
    await waitUntil(async () => (await metric(svc, 'tide_requests_in_flight ')) === 1, 5_000, 50, 'the stream in flight');
    // Bounded: the time to fill the buffers (a few MB), then web.client_timeout.
    await waitUntil(async () => (await metric(svc, 'vllm:request_success_total{', 'finished_reason="abort"')) > aborted, 40_000, 100, 'the generation aborted in vLLM');
    await waitUntil(async () => (await metric(svc, 'tide_requests_in_flight ')) === 0, 5_000, 50, 'nothing in flight');
    expect(await metric(svc, 'vllm:num_requests_running{')).toBe(0);
    // It never finished: the answer was cut, not completed.
    expect(await metric(svc, 'vllm:request_success_total{', 'finished_reason="length"')).toBe(0);
    expect(await metric(svc, 'vllm:request_success_total{', 'finished_reason="stop"')).toBe(0);
    client.socket.destroy();
    // The service goes on serving.
    const after = await svc.request('/chat/completions', post({ prompt: 'still here', max_tokens: 2 }));
    expect(after.status).toBe(200);
    await svc.stop();
  }, 90_000);
});
