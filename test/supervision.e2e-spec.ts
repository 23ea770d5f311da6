/**
 * Supervision in production conditions, against the real service and the simulator: sleep and
 * wake, restarts, graceful shutdown, orphans after kill -9, LoRA, the admin API and the CLI.
 */
import { existsSync, mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { connect } from 'node:net';
import { join } from 'node:path';
import { type Service, accessLine, count, logged, post, startService, stopAllServices, vllmLog } from './service';
import { expectNoProcessLeft, groupPids, killAll, pidAlive, readSse, signalGroup, repoRoot, simMain, sleep, spawnProcess, waitUntil } from './harness';

afterEach(stopAllServices);
afterAll(killAll);

/** Waits until vLLM's log holds one more /health probe line than now (the log has caught up). */
async function afterNextProbe(svc: Service): Promise<void> {
  const probe = '"GET /health HTTP/1.1"';
  const seen = count(vllmLog(svc), probe);
  await waitUntil(() => count(vllmLog(svc), probe) > seen, 5_000, 25, "a later probe in vLLM's log");
}

/**
 * Sends SIGTERM and waits until the service has taken it (it logs that it shuts down: needs
 * logging.level info), then 1.5 s more: a repeat within a second of it (main.ts) would be taken
 * for the same signal delivered twice, however late the service got to the first one.
 */
async function firstSigterm(svc: Service): Promise<void> {
  svc.proc.kill('SIGTERM');
  await waitUntil(() => svc.proc.output.some((l) => l.includes('shutting down (SIGTERM received')), 5_000, 20, 'the first SIGTERM taken');
  await sleep(1_500);
}

/** Resolves once `svc` reports `n` requests in flight on /metrics. */
/** A promise resolved by the first SSE event, and the onEvent callback for readSse that resolves it. */
function firstEvent(): { started: Promise<void>; onEvent: () => void } {
  let resolve!: () => void;
  const started = new Promise<void>((r) => (resolve = r));
  return { started, onEvent: () => resolve() };
}

async function status(svc: Service): Promise<Record<string, unknown>> {
  return (await svc.json('/admin/status')).body;
}

async function chatOk(svc: Service, prompt = 'wake me'): Promise<string> {
  const res = await svc.json<{ content: string }>('/chat/completions', post({ prompt }));
  expect(res.status).toBe(200);
  return res.body.content;
}

describe('sleep when idle, wake on demand', () => {
  it('level 1: idle → asleep; /health sleeping, /ready 200; concurrent requests share one wake-up', async () => {
    const svc = await startService({ config: { vllm: { sleep: { idle_seconds: 0.5, level: 1 } } } });
    expect((await status(svc)).argv).toContain('--enable-sleep-mode');
    await svc.waitForHealth('sleeping', 5_000);
    expect((await svc.request('/ready')).status).toBe(200);
    // /health says sleeping from the moment the sleep is asked for; it is counted once vLLM is asleep.
    await waitUntil(async () => (await status(svc)).sleeps === 1, 5_000, 20, 'the sleep counted');
    expect(await status(svc)).toMatchObject({ sleeping: true, sleep_level: 1, sleeps: 1 });
    await logged(svc, 'POST /sleep?level=1');
    // Asleep, the process runs on: /health gives its uptime, as /admin/status does.
    expect((await svc.health()).vllm_uptime_seconds).toEqual(expect.any(Number));

    // The OpenAI relay waits for the same wake-up (OpenAiProxy hands it to the Fastify route).
    const relayed = svc.json<{ choices: Array<{ message: { content: string } }> }>('/v1/chat/completions', post({ messages: [{ role: 'user', content: 'f x' }] }));
    const answers = await Promise.all(['a', 'b', 'c', 'd', 'e'].map((p) => chatOk(svc, `${p} x`)));
    expect(answers).toEqual(['a x', 'b x', 'c x', 'd x', 'e x']);
    expect((await relayed).body.choices[0].message.content).toBe('f x');
    await logged(svc, '"POST /wake_up HTTP/1.1" 200');
    expect(await status(svc)).toMatchObject({ sleeping: false, wakeups: 1 });
    // vLLM's log is written in order: once a probe answered after the wake-up is in it, a second
    // wake-up sent for any of these requests would be too.
    await afterNextProbe(svc);
    expect(count(vllmLog(svc), 'POST /wake_up')).toBe(1);
    const metrics = (await svc.request('/metrics')).body;
    expect(metrics).toMatch(/^tide_vllm_sleeps_total 1$/m);
    expect(metrics).toMatch(/^tide_vllm_wakeups_total 1$/m);
  });

  it('asleep at level 1, the model list and tokenizing are answered without a wake-up; polling them keeps no vLLM awake', async () => {
    const svc = await startService({ config: { vllm: { sleep: { idle_seconds: 1.5, level: 1 } } } });
    // Polled every 200 ms from the start (as Open WebUI, LiteLLM or an SDK's models.list may): vLLM falls asleep all the same.
    let polling = true;
    const polls = (async () => {
      const statuses = new Set<number>();
      while (polling) {
        statuses.add((await svc.request('/v1/models')).status);
        await sleep(200);
      }
      return statuses;
    })();
    await svc.waitForHealth('sleeping', 8_000);
    await waitUntil(async () => (await status(svc)).sleeps === 1, 5_000, 20, 'the sleep counted');
    polling = false;
    expect([...(await polls)]).toEqual([200]);
    // Asleep, vLLM's API server answers them itself (A9): no wake-up.
    const models = await svc.json<{ data: Array<{ id: string }> }>('/v1/models');
    expect([models.status, models.body.data.map((m) => m.id)]).toEqual([200, ['sim-model']]);
    for (const path of ['/tokenize', '/tokeniz%65']) { // however the path is spelled
      const tokens = await svc.json<{ count: number }>(path, post({ prompt: 'one two three' }));
      expect([path, tokens.status, tokens.body.count]).toEqual([path, 200, expect.any(Number)]);
    }
    expect(await status(svc)).toMatchObject({ state: 'sleeping', wakeups: 0 });
    expect(count(vllmLog(svc), 'POST /wake_up')).toBe(0);
    // A generation wakes it.
    expect(await chatOk(svc, 'a b')).toBe('a b');
    expect(await status(svc)).toMatchObject({ state: 'ready', wakeups: 1 });
  });

  it("an operator's sleep that outlasts vllm.timeout aborts what still runs: the simple API's stream says so, never ends as if whole", async () => {
    const svc = await startService({ config: { vllm: { timeout: 2, sleep: { idle_seconds: 300, level: 1 } } }, env: { VLLM_SIM_ITL_MS: '200' } });
    const first = firstEvent();
    const stream = readSse(`${svc.url}/chat/completions`, { prompt: 'w '.repeat(100), stream: true }, { onEvent: first.onEvent });
    await first.started; // generating: about 20 s to go
    const asleep = svc.request('/admin/sleep', { method: 'POST' });
    const cut = await stream; // vLLM drains for vllm.timeout (mode=wait), then aborts (mode=abort)
    expect(cut.events.at(-1)).toBe('[DONE]');
    expect(JSON.parse(cut.events.at(-2)!)).toMatchObject({ content: null, error: { type: 'vllm_not_ready', message: expect.stringContaining('vLLM aborted the generation') } });
    expect(cut.events.some((e) => e.includes('"finish_reason":"abort"'))).toBe(false);
    expect((await asleep).status).toBe(200);
  });

  it('level 2 with LoRA enabled starts with a warning naming the vLLM bug that breaks its wake-up', async () => {
    const warning = 'vllm.sleep.level 2 with vllm.lora.enabled';
    const svc = await startService({ config: { vllm: { sleep: { idle_seconds: 300, level: 2 }, lora: { enabled: true } } } });
    expect(svc.proc.output.filter((l) => l.includes(warning) && l.includes('"level":40') && l.includes('vllm-project/vllm#39934'))).toHaveLength(1);
    const level1 = await startService({ config: { vllm: { sleep: { idle_seconds: 300, level: 1 }, lora: { enabled: true } } } });
    expect(level1.proc.output.filter((l) => l.includes(warning))).toEqual([]);
  });

  it('idle time counts from the last answer, not from its request, and lasts idle_seconds', async () => {
    const svc = await startService({ config: { vllm: { sleep: { idle_seconds: 2, level: 1 } } }, env: { VLLM_SIM_ITL_MS: '30' } });
    const body = { messages: [{ role: 'user', content: 'one two three' }], stream: true, max_tokens: 100, ignore_eos: true };
    const done = await readSse(`${svc.url}/v1/chat/completions`, body); // about 3 s
    expect(done.events.at(-1)).toBe('[DONE]');
    const ended = Date.now();
    await sleep(1_200);
    // Over 4 s after the request came (idle checks run every second), 1.2 s after its answer ended: awake.
    expect(Date.now() - ended).toBeLessThan(1_900); // (else the check below says nothing)
    expect(await status(svc)).toMatchObject({ state: 'ready', sleeps: 0 });
    await svc.waitForHealth('sleeping', 5_000);
  });

  it('requests no route takes (a load balancer\'s GET /, /favicon.ico) do not keep vLLM awake', async () => {
    const svc = await startService({ config: { vllm: { sleep: { idle_seconds: 1, level: 1 } } } });
    const started = Date.now();
    // One every 300 ms: were they traffic, vLLM would never be idle for 1 s.
    while ((await svc.health()).status !== 'sleeping') {
      expect(Date.now() - started).toBeLessThan(6_000);
      for (const path of ['/', '/favicon.ico']) expect((await svc.request(path)).status).toBe(404);
      await sleep(300);
    }
  });

  it('level 2: wakes weights, reloads them, then the KV cache', async () => {
    const svc = await startService({ config: { vllm: { sleep: { idle_seconds: 0.3, level: 2 } } } });
    await svc.waitForHealth('sleeping', 5_000);
    // Weights reloaded: vLLM answers from them (the simulator says when they were left discarded).
    expect(await chatOk(svc, 'wake me')).toBe('wake me');
    await logged(svc, 'POST /wake_up?tags=kv_cache');
    const log = vllmLog(svc);
    const order = ['POST /wake_up?tags=weights', 'POST /collective_rpc', 'POST /wake_up?tags=kv_cache'].map((s) => log.indexOf(s));
    expect(order.every((i) => i > 0)).toBe(true);
    expect([...order].sort((a, b) => a - b)).toEqual(order);
  });

  it.each([3, 1])('level %i: the idle sleep never cuts a request in flight; it waits until none is', async (level) => {
    const svc = await startService({
      config: { vllm: { timeout: 10, sleep: { idle_seconds: 0.3, level } } },
      env: { VLLM_SIM_ITL_MS: '100' },
    });
    // Idle from the start: asleep first, so the stream below is what wakes it.
    await waitUntil(async () => (await status(svc)).sleeps === 1, 5_000, 20, 'the first idle sleep');
    const first = firstEvent();
    const body = { messages: [{ role: 'user', content: 'one two three' }], stream: true, max_tokens: 20, ignore_eos: true };
    const stream = readSse(`${svc.url}/v1/chat/completions`, body, { onEvent: first.onEvent }); // about 2 s, far over idle_seconds
    await first.started;
    await svc.waitInFlight(1);
    const during = await status(svc);
    expect(during).toMatchObject({ state: 'ready', sleeping: false, sleeps: 1, wakeups: 1 });
    const done = await stream;
    // Ends whole: a finish_reason, no error event, and vLLM neither slept nor was stopped meanwhile.
    expect(done.status).toBe(200);
    expect(done.events.at(-1)).toBe('[DONE]');
    const chunks = done.events.slice(0, -1).map((e) => JSON.parse(e) as { error?: unknown; choices: Array<{ finish_reason: string | null; delta?: { content?: string } }> });
    expect(chunks.filter((c) => c.error !== undefined)).toEqual([]);
    expect(chunks.find((c) => c.choices[0]?.finish_reason)?.choices[0].finish_reason).toBe('length');
    expect(chunks.filter((c) => c.choices[0]?.delta?.content).length).toBe(20);
    expect(await status(svc)).toMatchObject({ pid: during.pid, sleeps: 1 });
    expect(count(vllmLog(svc), level === 3 ? 'POST /sleep' : 'POST /sleep?level=1')).toBe(level === 3 ? 0 : 1);
    // Idle again once it has ended: asleep.
    await waitUntil(async () => (await status(svc)).sleeps === 2, 5_000, 20, 'the idle sleep after the stream');
    expect(await status(svc)).toMatchObject({ state: 'sleeping', sleep_level: level });
  });

  it('level 3: stops the process, and the next request starts it again', async () => {
    const svc = await startService({ config: { vllm: { sleep: { idle_seconds: 0.3, level: 3 } } } });
    const firstPid = (await svc.vllmPid()) as number;
    await svc.waitForHealth('sleeping', 5_000);
    await expectNoProcessLeft(firstPid, 5_000);
    expect(await svc.vllmPid()).toBeNull();
    expect(await chatOk(svc, 'back again')).toBe('back again');
    const pid = await svc.vllmPid();
    expect(pid).not.toBeNull();
    expect(pid).not.toBe(firstPid);
  });
});

describe('a sleep tide-vllm did not ask for (a POST to vLLM\'s own, unguarded /sleep)', () => {
  /** A POST straight to the vLLM that tide-vllm started, as anyone on the machine can send it. */
  async function sleepBehindTheBack(svc: Service, query: string): Promise<void> {
    const res = await fetch(`http://127.0.0.1:${svc.vllmPort}/sleep?${query}`, { method: 'POST' });
    expect(res.status).toBe(200);
  }

  it('level 1: noticed as sleeping (vLLM\'s /health stays 200); the next request wakes it with /wake_up', async () => {
    const svc = await startService({ config: { vllm: { sleep: { idle_seconds: 300, level: 1 } } } });
    await sleepBehindTheBack(svc, 'level=1');
    await svc.waitForHealth('sleeping', 5_000);
    expect(await status(svc)).toMatchObject({ state: 'sleeping', sleep_level: 1, sleeps: 0 });
    expect(svc.proc.output.join('\n')).toContain('put to sleep outside tide-vllm');
    expect(await chatOk(svc, 'awake again')).toBe('awake again');
    await logged(svc, '"POST /wake_up HTTP/1.1" 200');
    expect(await status(svc)).toMatchObject({ state: 'ready', sleeping: false, wakeups: 1 });
  });

  it('level 2 (weights discarded): the wake-up reloads the weights, whatever level tide-vllm is configured for', async () => {
    const svc = await startService({ config: { vllm: { sleep: { idle_seconds: 300, level: 1 } } } });
    await sleepBehindTheBack(svc, 'level=2');
    await svc.waitForHealth('sleeping', 5_000);
    expect(await status(svc)).toMatchObject({ sleep_level: 2 });
    expect(await chatOk(svc, 'reloaded')).toBe('reloaded');
    await logged(svc, 'POST /wake_up?tags=kv_cache');
    expect(vllmLog(svc)).toContain('POST /collective_rpc');
  });

  it('level 0 (scheduling paused, no memory given up; none of vLLM\'s sleep-state series is 1): woken with a plain /wake_up, no weight reload', async () => {
    const svc = await startService({ config: { vllm: { sleep: { idle_seconds: 300, level: 1 } } } });
    await sleepBehindTheBack(svc, 'level=0');
    await svc.waitForHealth('sleeping', 5_000);
    expect(await status(svc)).toMatchObject({ state: 'sleeping', sleep_level: 1 });
    expect(await chatOk(svc, 'resumed')).toBe('resumed');
    await logged(svc, '"POST /wake_up HTTP/1.1" 200');
    expect(vllmLog(svc)).not.toContain('POST /collective_rpc');
  });

  it("and a wake-up it did not ask for (vLLM's own /wake_up) is noticed too: ready again, no wake-up of its own", async () => {
    const svc = await startService({ config: { vllm: { sleep: { idle_seconds: 300, level: 1 } } } });
    expect((await svc.json('/admin/sleep?level=1', { method: 'POST' })).status).toBe(200);
    const res = await fetch(`http://127.0.0.1:${svc.vllmPort}/wake_up`, { method: 'POST' });
    expect(res.status).toBe(200);
    await svc.waitForHealth('healthy', 5_000);
    expect(await status(svc)).toMatchObject({ state: 'ready', sleeping: false, sleep_level: null, wakeups: 0 });
    expect(await chatOk(svc, 'still awake')).toBe('still awake');
    expect(count(vllmLog(svc), 'POST /wake_up')).toBe(1); // only the outside one
  });

  it('a request sent just as vLLM fell asleep, queued in vLLM, is answered: it does not wait for vllm.timeout', async () => {
    const svc = await startService({ config: { vllm: { timeout: 20, health_interval: 1, sleep: { idle_seconds: 300, level: 1 } } } });
    await sleepBehindTheBack(svc, 'level=1');
    const t0 = Date.now();
    expect(await chatOk(svc, 'queued')).toBe('queued');
    expect(Date.now() - t0).toBeLessThan(10_000); // vllm.timeout is 20 s
    expect(await status(svc)).toMatchObject({ state: 'ready', wakeups: 1 });
  });
});

describe('sleep with generations in flight', () => {
  /** A relayed stream of `tokens` tokens (the simulator's ITL apart) and its finish_reason. */
  async function streamFinish(svc: Service, tokens: number, onEvent?: () => void): Promise<string | null | undefined> {
    const body = { messages: [{ role: 'user', content: 'one two three' }], stream: true, max_tokens: tokens, ignore_eos: true };
    const done = await readSse(`${svc.url}/v1/chat/completions`, body, { onEvent });
    expect(done.events.at(-1)).toBe('[DONE]');
    return done.events
      .slice(0, -1)
      .map((e) => JSON.parse(e) as { choices: Array<{ finish_reason: string | null }> })
      .find((e) => e.choices[0]?.finish_reason)?.choices[0].finish_reason;
  }

  it("an operator's sleep waits for a generation in flight longer than sleep.wake_timeout, then vLLM sleeps and wakes", async () => {
    const svc = await startService({
      config: { vllm: { timeout: 10, sleep: { idle_seconds: 300, level: 1, wake_timeout: 0.5 } } },
      env: { VLLM_SIM_ITL_MS: '20' },
    });
    const first = firstEvent();
    const stream = streamFinish(svc, 60, first.onEvent); // about 1.2 s
    await first.started; // generating in vLLM
    const slept = await svc.json('/admin/sleep?level=1', { method: 'POST' });
    expect(slept.status).toBe(200);
    expect(slept.body).toMatchObject({ state: 'sleeping', sleep_level: 1, sleeps: 1 });
    expect(await stream).toBe('length'); // finished, not cut
    expect(await chatOk(svc, 'awake again')).toBe('awake again');
    expect(await status(svc)).toMatchObject({ state: 'ready', sleeping: false, wakeups: 1 });
  });

  it('past vllm.timeout the generations still running are aborted and vLLM sleeps; it is never taken for awake', async () => {
    const svc = await startService({
      config: { vllm: { timeout: 1, sleep: { idle_seconds: 300, level: 1, wake_timeout: 2 } } },
      env: { VLLM_SIM_ITL_MS: '20' },
    });
    const first = firstEvent();
    const stream = streamFinish(svc, 200, first.onEvent); // about 4 s
    await first.started; // generating in vLLM
    const t0 = Date.now();
    const slept = await svc.json('/admin/sleep?level=1', { method: 'POST' });
    expect(slept.status).toBe(200);
    expect(slept.body).toMatchObject({ state: 'sleeping', sleeps: 1 });
    expect(Date.now() - t0).toBeLessThan(2_500);
    expect(await stream).toBe('abort');
    await logged(svc, 'POST /sleep?level=1&mode=abort');
    expect(await chatOk(svc, 'awake again')).toBe('awake again');
    await logged(svc, '"POST /wake_up HTTP/1.1" 200');
  });

  it("an operator's restart lets generations in flight finish first (new requests get 503 meanwhile), up to web.drain_timeout", async () => {
    const svc = await startService({ config: { web: { drain_timeout: 30 } }, env: { VLLM_SIM_ITL_MS: '20' } });
    const before = (await svc.vllmPid()) as number;
    const first = firstEvent();
    const stream = streamFinish(svc, 60, first.onEvent); // about 1.2 s
    await first.started; // generating in vLLM
    const restarting = svc.json<{ state: string; restarts: number; pid: number }>('/admin/restart', { method: 'POST' });
    await waitUntil(async () => (await status(svc)).state === 'restarting', 2_000, 20, 'restarting');
    const refused = await svc.request('/chat/completions', post({ prompt: 'late' }));
    expect([refused.status, JSON.parse(refused.body).error]).toEqual([503, expect.objectContaining({ type: 'vllm_not_ready', message: "vLLM is restarting at an operator's request" })]);
    expect(await svc.vllmPid()).toBe(before); // still the old vLLM, finishing the stream
    expect(await stream).toBe('length'); // whole, not aborted
    const restarted = await restarting;
    expect([restarted.status, restarted.body.state, restarted.body.restarts]).toEqual([200, 'ready', 1]);
    expect(restarted.body.pid).not.toBe(before);
    await expectNoProcessLeft(before, 2_000);
  });

  it("past web.drain_timeout, an operator's restart ends what still runs saying so, never as complete: streams on both APIs with an error event, a request still sending its body with a 503", async () => {
    const svc = await startService({ config: { web: { drain_timeout: 0.5 } }, env: { VLLM_SIM_ITL_MS: '100' } });
    const message = "vLLM was restarted at an operator's request before the answer was complete";
    const starts = [firstEvent(), firstEvent(), firstEvent()];
    const long = { stream: true, max_tokens: 100, ignore_eos: true };
    const streams = [
      readSse(`${svc.url}/chat/completions`, { prompt: 'w '.repeat(100), stream: true }, { onEvent: starts[0].onEvent }),
      readSse(`${svc.url}/v1/chat/completions`, { messages: [{ role: 'user', content: 'hi' }], ...long }, { onEvent: starts[1].onEvent }),
      readSse(`${svc.url}/v1/responses`, { input: 'w '.repeat(100), stream: true, max_output_tokens: 100 }, { onEvent: starts[2].onEvent }),
    ];
    await Promise.all(starts.map((s) => s.started)); // generating in vLLM
    // Requests whose bodies are still coming when the drain runs out (OpenAI's shape, and the simple API's on the same route).
    const bodies = [
      JSON.stringify({ messages: [{ role: 'user', content: 'late' }], max_tokens: 2, request_id: 'late-openai' }),
      JSON.stringify({ prompt: 'late', request_id: 'late-simple' }),
    ];
    const uploads = bodies.map((body) => {
      const socket = connect(svc.port, '127.0.0.1');
      const upload = { socket, answer: '' };
      socket.on('data', (chunk: Buffer) => (upload.answer += chunk.toString()));
      socket.write(`POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\ncontent-length: ${body.length}\r\n\r\n${body.slice(0, 10)}`);
      return upload;
    });
    await svc.waitInFlight(5);
    const restarted = await svc.json('/admin/restart', { method: 'POST' });
    expect(restarted.status).toBe(200);
    uploads.forEach((upload, i) => upload.socket.write(bodies[i].slice(10)));
    const answers = await Promise.all(
      uploads.map(async (upload) => {
        await waitUntil(() => /\r\n\r\n\{.*\}$/s.test(upload.answer), 3_000, 20, 'the answer to a request that was sending its body');
        upload.socket.destroy();
        const [head, body] = upload.answer.split('\r\n\r\n');
        return { status: head.split('\r\n')[0], id: /\r\nx-request-id: ([^\r]*)/i.exec(head)?.[1], error: JSON.parse(body).error };
      }),
    );
    expect(answers).toEqual([
      { status: 'HTTP/1.1 503 Service Unavailable', id: 'late-openai', error: expect.objectContaining({ message: expect.stringContaining('restart'), code: 503 }) },
      { status: 'HTTP/1.1 503 Service Unavailable', id: 'late-simple', error: expect.objectContaining({ type: 'vllm_not_ready', message: expect.stringContaining('restart') }) },
    ]);
    const [simple, relayed, responses] = await Promise.all(streams);
    expect(simple.events.at(-1)).toBe('[DONE]');
    expect(JSON.parse(simple.events.at(-2) as string).error).toMatchObject({ type: 'vllm_not_ready', message });
    expect(relayed.events.at(-1)).toBe('[DONE]');
    expect(JSON.parse(relayed.events.at(-2) as string).error).toMatchObject({ message, code: 503 });
    expect(JSON.parse(responses.events.at(-1) as string)).toMatchObject({ type: 'error', message, code: 'ServiceUnavailableError' });
    for (const cut of [simple, relayed]) expect(cut.events.some((e) => e.includes('"finish_reason":"abort"'))).toBe(false);
    expect(responses.events.some((e) => e.includes('response.completed'))).toBe(false);
    // Counted as the restart's cut, not as vLLM failing.
    const errors = (await svc.request('/metrics')).body.split('\n').filter((l) => l.startsWith('tide_errors_total{'));
    expect(errors.filter((l) => l.includes('upstream_error'))).toEqual([]);
    await chatOk(svc);
  });

  it('a restart while vLLM is falling asleep wins: the sleep answers 409, the state is ready and awake', async () => {
    const svc = await startService({
      config: { web: { drain_timeout: 1 }, vllm: { stop_timeout: 1, timeout: 20, sleep: { idle_seconds: 300, level: 1 } } },
      env: { VLLM_SIM_IGNORE_SIGTERM: '1', VLLM_SIM_ITL_MS: '40' }, // the restart SIGKILLs vLLM after stop_timeout
    });
    const body = { messages: [{ role: 'user', content: 'one two three' }], stream: true, max_tokens: 200, ignore_eos: true };
    const first = firstEvent();
    const stream = readSse(`${svc.url}/v1/chat/completions`, body, { onEvent: first.onEvent }); // about 8 s: the sleep waits for it
    await first.started; // generating in vLLM
    expect(await status(svc)).toMatchObject({ state: 'ready' });
    const sleeping = svc.json<{ error: { type: string; message: string } }>('/admin/sleep?level=1', { method: 'POST' });
    await waitUntil(async () => (await status(svc)).state === 'sleeping', 2_000, 20, 'falling asleep');
    const restarted = await svc.json('/admin/restart', { method: 'POST' });
    expect(restarted.status).toBe(200);
    const slept = await sleeping;
    expect(slept.status).toBe(409);
    expect(slept.body.error.message).toContain('the sleep was cut short: vLLM is restarting now');
    expect(await status(svc)).toMatchObject({ state: 'ready', sleeping: false, sleep_level: null, sleeps: 0, restarts: 1 });
    expect((await stream).status).toBe(200); // then cut after the restart's drain (web.drain_timeout)
    await chatOk(svc);
  });
});

describe('admin API', () => {
  it('status, sleep, wake_up and restart, with clear errors', async () => {
    const svc = await startService({ config: { vllm: { sleep: { idle_seconds: 300, level: 1 } } } });
    const s = await status(svc);
    expect(s).toMatchObject({ state: 'ready', mode: 'auto', engine: 'vllm', model: 'sim-model', restarts: 0, sleeping: false });
    expect(s.argv).toEqual(expect.arrayContaining(['serve', 'sim-model', '--port', String(svc.vllmPort)]));
    expect(s.log_file).toBe(join(svc.dir, 'logs', `vllm_${svc.vllmPort}.log`));

    expect((await svc.json('/admin/wake_up', { method: 'POST' })).status).toBe(409);
    expect((await svc.json('/admin/sleep?level=7', { method: 'POST' })).status).toBe(400);
    const slept = await svc.json('/admin/sleep?level=1', { method: 'POST' });
    expect(slept.status).toBe(200);
    expect(slept.body).toMatchObject({ state: 'sleeping', sleep_level: 1 });
    const again = await svc.json<{ error: { message: string } }>('/admin/sleep', { method: 'POST' });
    expect(again.status).toBe(409);
    expect(again.body.error.message).toContain('already asleep');
    expect((await svc.json('/admin/wake_up', { method: 'POST' })).body).toMatchObject({ state: 'ready' });

    const before = (await svc.vllmPid()) as number;
    const restarted = await svc.json('/admin/restart', { method: 'POST' });
    expect(restarted.status).toBe(200);
    expect(restarted.body).toMatchObject({ state: 'ready', restarts: 1 });
    expect(restarted.body.pid).not.toBe(before);
    await expectNoProcessLeft(before, 2_000);
    await chatOk(svc);
  });

  it('sleep levels 1 and 2 need the engine sleep mode; LoRA needs vllm.lora.enabled', async () => {
    const svc = await startService();
    const sleep1 = await svc.json<{ error: { message: string } }>('/admin/sleep?level=1', { method: 'POST' });
    expect(sleep1.status).toBe(409);
    expect(sleep1.body.error.message).toContain("needs the engine's sleep mode");
    const lora = await svc.json<{ error: { message: string } }>('/admin/lora', post({ name: 'a', path: '/p' }));
    expect(lora.status).toBe(409);
    expect(lora.body.error.message).toContain('vllm.lora.enabled');
  });

  it('LoRA: load → listed on /v1/models → usable as model → unload', async () => {
    const svc = await startService({ config: { vllm: { lora: { enabled: true } } } });
    // Not under the served model's name: a request naming it is for the base model.
    const shadow = await svc.json<{ error: { message: string } }>('/admin/lora', post({ name: 'sim-model', path: '/adapters/x' }));
    expect([shadow.status, shadow.body.error.message]).toEqual([400, 'an adapter cannot take the served model\'s name "sim-model" (vllm.model_name)']);
    expect((await svc.json('/admin/lora', post({ name: 'sql', path: '/adapters/sql' }))).status).toBe(200);
    const models = await svc.json<{ data: Array<{ id: string; parent: string | null }> }>('/v1/models');
    expect(models.body.data.map((m) => [m.id, m.parent])).toEqual([
      ['sim-model', null],
      ['sql', 'sim-model'],
    ]);
    const chat = await svc.json<{ model: string }>('/v1/chat/completions', post({ model: 'sql', messages: [{ role: 'user', content: 'hi' }] }));
    expect(chat.status).toBe(200);
    expect(chat.body.model).toBe('sql');
    expect((await status(svc)).lora_adapters).toEqual({ sql: '/adapters/sql' });
    // Loaded again after a restart: vLLM serves it, not only /admin/status lists it.
    expect((await svc.json('/admin/restart', { method: 'POST' })).status).toBe(200);
    const reloaded = await svc.json<{ data: Array<{ id: string }> }>('/v1/models');
    expect(reloaded.body.data.map((m) => m.id)).toEqual(['sim-model', 'sql']);
    expect((await svc.json('/v1/chat/completions', post({ model: 'sql', messages: [{ role: 'user', content: 'hi' }] }))).status).toBe(200);

    const dup = await svc.json<{ error: { message: string } }>('/admin/lora', post({ name: 'sql', path: '/adapters/sql' }));
    expect(dup.status).toBe(400);
    expect(dup.body.error.message).toContain('already been loaded');
    expect((await svc.request('/admin/lora/sql', { method: 'DELETE' })).status).toBe(200);
    const gone = await svc.json<{ error: { type: string; message: string } }>('/admin/lora/sql', { method: 'DELETE' });
    expect([gone.status, gone.body.error.type]).toEqual([404, 'not_found']); // the admin API's own, not a rejected relay
    expect(gone.body.error.message).toContain("'sql' cannot be found");
    const after = await svc.json<{ data: Array<{ id: string }> }>('/v1/models');
    expect(after.body.data.map((m) => m.id)).toEqual(['sim-model']);

    // The longest name a load takes (128 characters) can be unloaded too.
    const long = `a${'b'.repeat(127)}`;
    expect((await svc.json('/admin/lora', post({ name: long, path: '/adapters/long' }))).status).toBe(200);
    const unloaded = await svc.json<{ unloaded: string }>(`/admin/lora/${long}`, { method: 'DELETE' });
    expect([unloaded.status, unloaded.body.unloaded]).toEqual([200, long]);
    for (const name of [`${long}c`, 'org/sql', '-x']) {
      const refused = await svc.json<{ error: { message: string } }>('/admin/lora', post({ name, path: '/adapters/x' }));
      expect([name, refused.status, refused.body.error.message]).toEqual([
        name,
        400,
        'name must be 1 to 128 letters, digits, ".", "_" or "-", the first a letter or digit',
      ]);
    }
  });

  it('LoRA: adapters of vllm.lora.modules are in /admin/status with their paths, beside those loaded at run time', async () => {
    const svc = await startService({ config: { vllm: { lora: { enabled: true, modules: { base: '/adapters/base' } } } } });
    const models = await svc.json<{ data: Array<{ id: string }> }>('/v1/models');
    expect(models.body.data.map((m) => m.id)).toEqual(['sim-model', 'base']);
    expect((await status(svc)).lora_adapters).toEqual({ base: '/adapters/base' });
    const loaded = await svc.json('/admin/lora', post({ name: 'sql', path: '/adapters/sql' }));
    expect(loaded.body.lora_adapters).toEqual({ base: '/adapters/base', sql: '/adapters/sql' });
    expect((await status(svc)).lora_adapters).toEqual({ base: '/adapters/base', sql: '/adapters/sql' });
    const unloaded = await svc.json('/admin/lora/sql', { method: 'DELETE' });
    expect(unloaded.body.lora_adapters).toEqual({ base: '/adapters/base' });
    // A restart loads the configured one again: it stays listed.
    expect((await svc.json('/admin/restart', { method: 'POST' })).body.lora_adapters).toEqual({ base: '/adapters/base' });
  });

  it('LoRA: a vLLM that dies loading the adapters again (out of memory) fails that start, and the next one loads them all, in order', async () => {
    const armed = join(mkdtempSync(join(tmpdir(), 'tide-lora-')), 'crash-next-load');
    const svc = await startService({
      config: { vllm: { lora: { enabled: true }, restart: { backoff_initial: 0.5, backoff_max: 0.5 } } },
      env: { VLLM_SIM_CRASH_ON_LORA_LOAD_IF: armed },
    });
    for (const name of ['a', 'b', 'c']) expect((await svc.json('/admin/lora', post({ name, path: `/adapters/${name}` }))).status).toBe(200);
    writeFileSync(armed, ''); // the next launch dies at its first load
    expect((await svc.json('/admin/restart', { method: 'POST' })).status).toBe(502);
    await svc.waitForHealth('healthy', 15_000); // restarted after that failure
    const models = await svc.json<{ data: Array<{ id: string }> }>('/v1/models');
    expect(models.body.data.map((m) => m.id)).toEqual(['sim-model', 'a', 'b', 'c']);
    expect((await status(svc)).lora_adapters).toEqual({ a: '/adapters/a', b: '/adapters/b', c: '/adapters/c' });
  });
});

describe('the CLI against a running service', () => {
  /** The package's bin entries, run as programs (as npx and npm's bin links run them), not through node. */
  const bin = (JSON.parse(readFileSync(join(repoRoot, 'package.json'), 'utf8')) as { bin: Record<string, string> }).bin;
  function cli(svc: Service, ...args: string[]) {
    const proc = spawnProcess(join(repoRoot, bin['tide-vllm']), [...args, '--url', svc.url]);
    return proc.waitForExit(60_000).then((exit) => ({ code: exit.code, out: proc.stdoutLines.join('\n'), err: proc.stderrLines.join('\n') }));
  }

  it('status, sleep, wake, restart, lora load and unload, with trustworthy exit codes', async () => {
    const svc = await startService({ config: { vllm: { sleep: { idle_seconds: 300, level: 1 }, lora: { enabled: true } } } });
    const st = await cli(svc, 'status');
    expect(st.code).toBe(0);
    expect(st.out).toMatch(/^state\s+ready$/m);
    expect((await cli(svc, 'sleep', '--level', '1')).out).toMatch(/^sleeping\s+yes \(level 1\)$/m);
    const twice = await cli(svc, 'sleep');
    expect(twice.code).toBe(1);
    expect(twice.err).toContain('409: vLLM is already asleep');
    expect((await cli(svc, 'wake')).code).toBe(0);
    expect((await cli(svc, 'lora', 'load', 'ad1', '/adapters/one')).out).toContain('loaded: ad1');
    expect((await cli(svc, 'lora', 'unload', 'ad1')).code).toBe(0);
    expect((await cli(svc, 'lora', 'unload', 'ad1')).code).toBe(1);
    const restart = await cli(svc, 'restart');
    expect(restart.code).toBe(0);
    expect(restart.out).toMatch(/^restarts\s+1$/m);
    expect((await cli(svc, 'bogus')).code).toBe(2);
  });

  it('status lists the adapters of vllm.lora.modules; a restart that outlasts --timeout is no "unreachable" (exit 1)', async () => {
    const svc = await startService({
      config: { vllm: { lora: { enabled: true, modules: { base: '/adapters/base' } } } },
      env: { VLLM_SIM_LOAD_SECONDS: '2' },
    });
    expect((await cli(svc, 'status')).out).toMatch(/^lora\s+base \(\/adapters\/base\)$/m);
    const restart = await cli(svc, 'restart', '--timeout', '0.5');
    expect(restart.code).toBe(1);
    expect(restart.err).toContain('within 0.5 s (--timeout); it took the request and may still be carrying it out');
    expect(restart.err).not.toContain('cannot reach');
    // The restart goes on without the CLI.
    await waitUntil(async () => (await status(svc)).restarts === 1 && (await status(svc)).state === 'ready', 10_000, 50, 'the restart done');
  });

  it("the simulator's bin runs too", async () => {
    const sim = spawnProcess(join(repoRoot, bin['vllm-sim']), ['--help']);
    expect((await sim.waitForExit(10_000)).code).toBe(0);
    expect(sim.output.join('\n')).toContain('usage:');
  });
});

describe('crash recovery', () => {
  it('a crash is visible as restarting, then the service serves again; the restart is counted in tide_vllm_restarts_total', async () => {
    const svc = await startService({
      config: { vllm: { restart: { backoff_initial: 0.5, backoff_max: 0.5 } } },
      env: { VLLM_SIM_CRASH_AFTER_REQUESTS: '1', VLLM_SIM_LOAD_SECONDS: '1.5' },
    });
    const restarts = async () => /^tide_vllm_restarts_total (\d+)$/m.exec((await svc.request('/metrics')).body)?.[1];
    expect(await restarts()).toBe('0');
    await chatOk(svc);
    await svc.waitForHealth('restarting', 5_000);
    // The crashed process is gone: no pid, no uptime, until the restart starts another.
    expect(await status(svc)).toMatchObject({ state: 'restarting', pid: null, uptime_seconds: null });
    expect((await svc.request('/ready')).status).toBe(503);
    const during = await svc.request('/chat/completions', post({ prompt: 'x' }));
    expect(during.status).toBe(503);
    expect(during.headers['retry-after']).toBeDefined();
    // A refusal by the supervisor's state is a warning in the access log (pino 40), not an error: the crash was logged once.
    expect(await accessLine(svc, '/chat/completions')).toMatchObject({ level: 40, status: 503, error: 'vllm_not_ready', error_message: 'vLLM is restarting after a failure' });
    // The model loads again: still the restart to /health and to a request, not a first start.
    await waitUntil(async () => (await status(svc)).state === 'starting', 5_000, 20, 'the relaunch');
    expect(await svc.health()).toMatchObject({ status: 'restarting', state: 'starting' });
    const loading = await svc.request('/chat/completions', post({ prompt: 'x' }));
    expect([loading.status, JSON.parse(loading.body).error.message]).toEqual([503, 'vLLM is restarting after a failure; the model is loading again']);
    await svc.waitForHealth('healthy', 10_000);
    expect((await status(svc)).last_error).toMatch(/unexpectedly/);
    expect(await restarts()).toBe('1'); // counted in the metrics
  });

  it('a crash while asleep spends no restart: it sleeps on as at level 3 (no GPU memory taken back), and the next request starts it', async () => {
    const svc = await startService({ config: { vllm: { sleep: { idle_seconds: 300, level: 1 } } } });
    const slept = await svc.json<{ pid: number }>('/admin/sleep?level=1', { method: 'POST' });
    expect(slept.body).toMatchObject({ state: 'sleeping', sleep_level: 1 });
    signalGroup(slept.body.pid, 'SIGKILL');
    await waitUntil(async () => (await status(svc)).sleep_level === 3, 5_000, 20, 'the crash noticed');
    expect(await status(svc)).toMatchObject({ state: 'sleeping', sleeping: true, pid: null, restarts: 0, died_asleep: 1 });
    expect((await svc.request('/metrics')).body).toMatch(/^tide_vllm_died_asleep_total 1$/m);
    await sleep(500); // no restart comes
    expect(await status(svc)).toMatchObject({ state: 'sleeping', pid: null, restarts: 0 });
    await chatOk(svc); // started, as after a level-3 sleep
    expect(await status(svc)).toMatchObject({ state: 'ready', sleeping: false, sleep_level: null, restarts: 0 });
    expect(await svc.vllmPid()).not.toBe(slept.body.pid);
  });

  it('a crash while vLLM falls asleep: the request waiting to wake it gets "restarting", not "not reachable"', async () => {
    // A launcher that leads the group and runs vLLM's API server as its child: its death is the crash,
    // and it comes before the /sleep fails (when both die at once, which tide-vllm sees first is chance).
    const command = ['/bin/sh', '-c', '"$0" "$@" & wait', process.execPath, simMain, 'serve'];
    const svc = await startService({
      config: { vllm: { command, sleep: { idle_seconds: 300, level: 1 }, restart: { backoff_initial: 2, backoff_max: 2 } } },
    });
    const pid = (await svc.vllmPid()) as number;
    signalGroup(pid, 'SIGSTOP'); // vLLM takes the /sleep and never answers it: the sleep stays in progress
    const slept = svc.json('/admin/sleep?level=1', { method: 'POST' });
    await waitUntil(async () => (await status(svc)).state === 'sleeping', 5_000, 20, 'falling asleep');
    const relayed = svc.json<{ error: { message: string } }>('/v1/chat/completions', post({ messages: [{ role: 'user', content: 'wake me' }] }));
    // In flight: waiting for the sleep to end, to wake vLLM (each scrape waits out vLLM's silent /metrics).
    await waitUntil(async () => /^tide_requests_in_flight 1$/m.test((await svc.request('/metrics')).body), 15_000, 20, 'the request in flight');
    process.kill(pid, 'SIGKILL'); // the crash
    await waitUntil(async () => (await status(svc)).state === 'restarting', 5_000, 20, 'restarting');
    signalGroup(pid, 'SIGKILL'); // the rest of the group: the /sleep fails
    const refused = await relayed;
    expect(refused.status).toBe(503);
    expect(refused.res.headers['retry-after']).toBe('5');
    expect(refused.body.error.message).toBe('vLLM is restarting after a failure');
    expect((await slept).status).toBe(409);
    await svc.waitForHealth('healthy', 10_000);
    await chatOk(svc);
  });

  it('vLLM killed while it waits to fall asleep (its /sleep fails before its exit is seen): a crash, not a death asleep; /admin/sleep 409', async () => {
    const svc = await startService({
      config: { vllm: { sleep: { idle_seconds: 300, level: 1 }, restart: { backoff_initial: 0.5, backoff_max: 0.5 } } },
      env: { VLLM_SIM_ITL_MS: '100' },
    });
    const pid = (await svc.vllmPid()) as number;
    const stream = readSse(`${svc.url}/v1/chat/completions`, { messages: [{ role: 'user', content: 'a b c' }], stream: true, max_tokens: 40, ignore_eos: true });
    await sleep(300);
    const slept = svc.json<{ error: { message: string } }>('/admin/sleep?level=1', { method: 'POST' }); // mode=wait: waits for the stream
    await waitUntil(async () => (await status(svc)).state === 'sleeping', 5_000, 20, 'falling asleep');
    await sleep(200);
    signalGroup(pid, 'SIGKILL');
    const refused = await slept;
    expect([refused.status, refused.body.error.message]).toEqual([409, 'the sleep was cut short: vLLM is restarting now (it was restarted, or failed, meanwhile)']);
    expect((await stream).events.at(-1)).toBe('[DONE]');
    expect(await status(svc)).toMatchObject({ restarts: 1, died_asleep: 0, sleep_level: null });
    await svc.waitForHealth('healthy', 10_000);
    await chatOk(svc);
  });

  it('a hung engine (/health still 200, no token for vllm.timeout with requests in it) is restarted; requests waiting in it are told', async () => {
    const svc = await startService({
      config: { vllm: { timeout: 2, health_interval: 0.3, restart: { backoff_initial: 0.5, backoff_max: 0.5 } } },
      env: { VLLM_SIM_ENGINE_HANG_AFTER_TOKENS: '5' }, // per engine: the restarted one hangs after 5 tokens too
    });
    const vllmPid = (await svc.vllmPid()) as number;
    const stream = readSse(`${svc.url}/v1/chat/completions`, { messages: [{ role: 'user', content: 'a b c d e f g h i j' }], stream: true });
    const plain = svc.request('/chat/completions', post({ prompt: 'k l m n o p' }));
    // Before the restart, /health stays healthy: only the engine's metrics show it.
    await sleep(1_000);
    expect(await svc.health()).toMatchObject({ status: 'healthy' });
    await svc.waitForHealth('restarting', 8_000);
    expect((await status(svc)).last_error).toMatch(/^vLLM's engine processed no token for \d+ s \(vllm.timeout = 2 s\) with 2 requests in it: it is hung, though \/health answers$/);
    // The requests waiting in it failed at vllm.timeout: an error event, a 504; none hangs.
    const cut = await stream;
    expect(cut.events.at(-1)).toBe('[DONE]');
    expect(JSON.parse(cut.events.at(-2)!).error.code).toBe(504);
    expect((await plain).status).toBe(504);
    await svc.waitForHealth('healthy', 10_000);
    expect(await svc.vllmPid()).not.toBe(vllmPid);
    await expectNoProcessLeft(vllmPid, 2_000);
    expect(await chatOk(svc, 'q r')).toBe('q r'); // 2 tokens: the new engine serves
    expect((await status(svc)).restarts).toBe(1);
  });

  it('a slow request is no hang: cut at vllm.timeout (a 504) and aborted in vLLM, it restarts nothing', async () => {
    const svc = await startService({ config: { vllm: { timeout: 2, health_interval: 0.3 } }, env: { VLLM_SIM_TTFT_MS: '6000' } });
    const slow = await svc.request('/chat/completions', post({ prompt: 'a long prefill' })); // no token for 6 s
    expect(slow.status).toBe(504);
    await sleep(3_000); // past vllm.timeout + health_interval + 1 s from the request's start, with probes reading /metrics
    expect(await status(svc)).toMatchObject({ state: 'ready', restarts: 0, last_error: null });
  });

  it('restarts exhausted: the service stops vLLM and exits 1', async () => {
    const svc = await startService({
      config: { vllm: { restart: { max_restarts: 0 } } },
      env: { VLLM_SIM_CRASH_AFTER_REQUESTS: '1' },
    });
    const vllmPid = (await svc.vllmPid()) as number;
    await chatOk(svc);
    const exit = await svc.proc.waitForExit(15_000);
    expect(exit.code).toBe(1);
    expect(svc.proc.output.join('\n')).toContain('will not be restarted');
    await expectNoProcessLeft(vllmPid, 2_000);
  });

  it('a wake-up that fails with no restart left tells the requests waiting for it that vLLM is not being restarted', async () => {
    const svc = await startService({
      config: { vllm: { sleep: { idle_seconds: 300, level: 3 }, restart: { max_restarts: 0 } } },
      env: { VLLM_SIM_LOAD_SECONDS: '1.5' },
    });
    await svc.json('/admin/sleep?level=3', { method: 'POST' });
    const waiting = svc.json<{ error: { message: string } }>('/v1/chat/completions', post({ messages: [{ role: 'user', content: 'wake me' }] }));
    await waitUntil(async () => (await status(svc)).state === 'waking' && (await svc.vllmPid()) !== null, 5_000, 20, 'waking');
    signalGroup((await svc.vllmPid()) as number, 'SIGKILL'); // during the model load
    const refused = await waiting;
    expect([refused.status, refused.body.error.message]).toEqual([503, 'vLLM has failed and is not being restarted']);
    expect((await svc.proc.waitForExit(15_000)).code).toBe(1);
  });
});

describe("vLLM's output", () => {
  it('the traceback vLLM prints as it dies of a stop tide-vllm asked for (here during its load) is a warning, not an error', async () => {
    const svc = await startService({ env: { VLLM_SIM_LOAD_SECONDS: '5' }, waitFor: null });
    await waitUntil(() => vllmLog(svc).includes('Starting to load model'), 10_000, 25, 'vLLM loading the model'); // 5 s to go
    svc.proc.kill('SIGTERM');
    expect((await svc.proc.waitForExit(10_000)).code).toBe(0);
    const levelOf = (text: string) => svc.proc.output.filter((l) => l.includes(text)).map((l) => (JSON.parse(l) as { level: number }).level);
    expect(levelOf('KeyboardInterrupt: terminated')).toEqual([40]);
    expect(levelOf('Traceback (most recent call last)')).toEqual([40]);
  });

  it("goes to the log and the log file; the access lines of tide-vllm's own probes only to the file", async () => {
    const svc = await startService({ config: { logging: { level: 'info' } } });
    const probes = '"GET /health HTTP/1.1" 200';
    await waitUntil(() => count(vllmLog(svc), probes) >= 4, 3_000, 25, `4 × ${probes} in vLLM's log`); // health_interval is 0.25 s here
    await chatOk(svc);
    await logged(svc, '"POST /v1/chat/completions HTTP/1.1" 200');
    // The log line is written beside the file's (pino's stream, then the pipe to this test): a moment later, maybe.
    const inLog = () => svc.proc.output.join('\n').includes('POST /v1/chat/completions HTTP/1.1'); // (as JSON: the quotes are escaped)
    await waitUntil(inLog, 3_000, 25, "vLLM's access line in the service's log");
    // No process warning of Node's (a deprecated option, a listener leak) in an operator's log.
    expect(svc.proc.output.filter((l) => /^\(node:\d+\) /.test(l))).toEqual([]);
    expect(svc.proc.output.filter((l) => l.includes('GET /health HTTP/1.1'))).toEqual([]);
  });

  it('with access_log_probes every probe is access-logged, and a /ready answering 503 while vLLM loads as a warning, not an error', async () => {
    const svc = await startService({ config: { logging: { level: 'info', access_log_probes: true } }, env: { VLLM_SIM_LOAD_SECONDS: '2' }, waitFor: null });
    await waitUntil(async () => (await svc.request('/ready').catch(() => ({ status: 0 }))).status === 503, 5_000, 50, '/ready 503 while loading');
    const line = await accessLine(svc, '/ready');
    expect([line.status, line.level]).toEqual([503, 40]);
    // The other probes have their lines too.
    for (const probe of ['/health', '/metrics']) {
      const { status } = await svc.request(probe);
      expect(await accessLine(svc, probe)).toMatchObject({ method: 'GET', url: probe, status });
    }
  });

  it("at the level vLLM gave each line: its ERROR and the traceback after it at error, so alerts on the service's errors see vLLM's", async () => {
    const svc = await startService({ config: { logging: { level: 'info' } }, env: { VLLM_SIM_ENGINE_EXIT_AFTER_MS: '300' } });
    const vllmLines = () => svc.proc.output.map((l) => JSON.parse(l) as { level: number; context?: string; msg: string }).filter((l) => l.context === 'vllm');
    await waitUntil(() => vllmLines().some((l) => l.msg.includes('EngineCore encountered a fatal error.')), 5_000, 25, "vLLM's fatal error in the log");
    const lines = vllmLines();
    const fatal = lines.findIndex((l) => l.msg.includes('EngineCore encountered a fatal error.'));
    expect(lines[fatal].level).toBe(50);
    expect(lines[fatal + 1].level).toBe(50); // its traceback
    expect(lines.find((l) => / INFO \d\d-\d\d /.test(l.msg))?.level).toBe(30);
  });
});

describe('graceful shutdown', () => {
  it('SIGTERM lets a stream in flight finish, refuses new requests, stops vLLM, exits 0', async () => {
    const svc = await startService({ env: { VLLM_SIM_ITL_MS: '100' } });
    const vllmPid = (await svc.vllmPid()) as number;
    const first = firstEvent();
    const stream = readSse(`${svc.url}/v1/chat/completions`, { messages: [{ role: 'user', content: 'a b c d e f g h' }], stream: true }, { onEvent: first.onEvent });
    await first.started; // generating in vLLM
    svc.proc.kill('SIGTERM');
    await waitUntil(async () => (await svc.request('/ready').catch(() => ({ status: 0 }))).status === 503, 2_000, 20, '/ready 503');
    // Still live (a liveness probe must not restart a draining service), and saying that it stops.
    const health = await svc.request('/health');
    expect([health.status, JSON.parse(health.body)]).toEqual([200, expect.objectContaining({ status: 'stopping', state: 'draining', vllm_healthy: true })]);
    const refused = await svc.request('/chat/completions', post({ prompt: 'late' }));
    expect(refused.status).toBe(503);
    expect(JSON.parse(refused.body).error.type).toBe('shutting_down');
    // A refusal while stopping is expected, not a fault: its access line is a warning (pino 40), with why.
    expect(await accessLine(svc, '/chat/completions')).toMatchObject({ level: 40, status: 503, error: 'shutting_down', error_message: expect.stringContaining('shutting down') });
    // The stream is finishing on vLLM: an operator's restart or sleep must not take it away now.
    for (const action of ['/admin/restart', '/admin/sleep']) {
      const answer = await svc.request(action, { method: 'POST' });
      expect([action, answer.status, JSON.parse(answer.body).error.type]).toEqual([action, 503, 'shutting_down']);
    }
    const status = await svc.request('/admin/status'); // looking is fine, and says what /health says
    expect([status.status, JSON.parse(status.body)]).toEqual([200, expect.objectContaining({ status: 'stopping', state: 'draining' })]);
    const done = await stream;
    expect(done.events[done.events.length - 1]).toBe('[DONE]');
    expect(done.events.some((e) => e.includes('"finish_reason":"stop"'))).toBe(true);
    expect((await svc.proc.waitForExit(10_000)).code).toBe(0);
    await expectNoProcessLeft(vllmPid, 1_000);
  });

  it('`npm run start` passes a SIGTERM sent to npm alone on to the service, which stops vLLM and exits', async () => {
    const svc = await startService({ launcher: 'npm-start' });
    const vllmPid = (await svc.vllmPid()) as number;
    expect(svc.processes().length).toBeGreaterThanOrEqual(2); // the service and vLLM, at least
    process.kill(svc.proc.pid, 'SIGTERM'); // as a supervisor that signals the main pid only
    await waitUntil(() => svc.processes().length === 0, 10_000, 50, 'every process of the service gone');
    await expectNoProcessLeft(vllmPid, 1_000);
  });

  // npx runs the service under a shell that passes no signal on (and outlives npm killed with
  // SIGKILL), and npm killed with SIGKILL passes none at all: the service notices that npm is gone
  // and stops, and stops vLLM.
  it.each([
    ['npx', 'SIGTERM'],
    ['npx', 'SIGKILL'],
    ['npm-start', 'SIGKILL'],
  ] as const)('run by %s, the service stops vLLM and exits once npm is gone (%s to npm alone)', async (launcher, signal) => {
    const svc = await startService({ launcher });
    const vllmPid = (await svc.vllmPid()) as number;
    process.kill(svc.proc.pid, signal);
    await waitUntil(() => svc.processes().length === 0, 10_000, 50, 'every process of the service gone');
    await expectNoProcessLeft(vllmPid, 1_000);
  });

  it('past web.drain_timeout, streams are cut with an error event; a second signal skips the drain', async () => {
    const svc = await startService({ config: { web: { drain_timeout: 0.5 } }, env: { VLLM_SIM_ITL_MS: '200' } });
    const first = firstEvent();
    const stream = readSse(`${svc.url}/chat/completions`, { prompt: 'w '.repeat(100), stream: true }, { onEvent: first.onEvent });
    await first.started; // generating in vLLM
    svc.proc.kill('SIGTERM');
    const cut = await stream;
    expect(cut.events[cut.events.length - 1]).toBe('[DONE]');
    expect(JSON.parse(cut.events[cut.events.length - 2]).error.type).toBe('shutting_down');
    expect((await svc.proc.waitForExit(10_000)).code).toBe(0);

    const svc2 = await startService({ config: { web: { drain_timeout: 30 }, logging: { level: 'info' } }, env: { VLLM_SIM_ITL_MS: '200' } });
    const first2 = firstEvent();
    const stream2 = readSse(`${svc2.url}/chat/completions`, { prompt: 'w '.repeat(100), stream: true }, { onEvent: first2.onEvent });
    await first2.started; // generating in vLLM
    const t0 = Date.now();
    await firstSigterm(svc2);
    svc2.proc.kill('SIGTERM');
    expect((await stream2).events.slice(-1)).toEqual(['[DONE]']);
    expect((await svc2.proc.waitForExit(10_000)).code).toBe(0);
    expect(Date.now() - t0).toBeLessThan(8_000); // far from the 30 s drain
  });

  it('SIGTERM during a level-3 sleep waits for the engine group that sleep is stopping (SIGKILL after stop_timeout), then exits', async () => {
    const svc = await startService({
      config: { vllm: { stop_timeout: 3, sleep: { idle_seconds: 2, level: 3 } } },
      env: { VLLM_SIM_IGNORE_SIGTERM: '1' }, // the sleep's SIGTERM is ignored: vLLM's group lives on through stop_timeout
    });
    const vllmPid = (await svc.vllmPid()) as number;
    await waitUntil(async () => (await status(svc)).state === 'sleeping', 10_000, 20, 'falling asleep when idle');
    svc.proc.kill('SIGTERM');
    expect((await svc.proc.waitForExit(15_000)).code).toBe(0);
    await expectNoProcessLeft(vllmPid, 2_000); // once tide-vllm has exited, nothing else would stop it
    expect(existsSync(join(svc.dir, 'state', `vllm-${svc.vllmPort}.json`))).toBe(false); // no orphan recorded: none left
  });

  it('a second signal also ends the requests waiting for a wake-up (a level-3 wake is a model load), and the service exits', async () => {
    const svc = await startService({
      config: { web: { drain_timeout: 30 }, vllm: { sleep: { idle_seconds: 300, level: 3, wake_timeout: 60 } }, logging: { level: 'info' } },
      env: { VLLM_SIM_LOAD_SECONDS: '6' },
    });
    expect((await svc.json('/admin/sleep?level=3', { method: 'POST' })).status).toBe(200);
    const waiting = Promise.all([
      svc.request('/chat/completions', post({ prompt: 'wake me' })),
      readSse(`${svc.url}/v1/chat/completions`, { messages: [{ role: 'user', content: 'wake me' }], stream: true }),
    ]);
    await svc.waitInFlight(2); // both waiting for the wake-up: vLLM loads for 6 s
    await firstSigterm(svc);
    svc.proc.kill('SIGTERM');
    const t0 = Date.now();
    const [plain, stream] = await waiting;
    expect(Date.now() - t0).toBeLessThan(2_500); // not after the load (4.8 s more), nor at the 30 s drain
    expect([plain.status, JSON.parse(plain.body).error.type]).toEqual([503, 'shutting_down']);
    expect([stream.status, JSON.parse(stream.raw).error.type]).toEqual([503, 'ServiceUnavailableError']); // OpenAI's shape on /v1
    expect((await svc.proc.waitForExit(10_000)).code).toBe(0);
  });
});

describe('no orphans after kill -9', () => {
  it('the next start stops the engine group left behind, and says so', async () => {
    const first = await startService();
    const orphanPid = (await first.vllmPid()) as number;
    first.proc.kill('SIGKILL'); // the service only: vLLM leads its own group and survives
    await first.proc.waitForExit(5_000);
    expect(pidAlive(orphanPid)).toBe(true);

    const second = await startService({
      config: { vllm: { port: first.vllmPort, state_dir: join(first.dir, 'state') }, logging: { level: 'info' } },
    });
    expect(second.proc.output.join('\n')).toContain(`stopping vLLM process group ${orphanPid} left running by an earlier tide-vllm`);
    expect(groupPids(orphanPid)).toEqual([]);
    await chatOk(second);
  });

  it("a second tide-vllm with the same state_dir and vllm.port refuses to start; the first one's vLLM serves on", async () => {
    const first = await startService();
    const vllmPid = (await first.vllmPid()) as number;
    const second = await startService({ config: { vllm: { port: first.vllmPort, state_dir: join(first.dir, 'state') } }, waitFor: null });
    expect((await second.proc.waitForExit(15_000)).code).toBe(1);
    expect(second.proc.output.join('\n')).toContain(`vllm.port ${first.vllmPort} is supervised by another tide-vllm (pid ${first.proc.pid}`);
    await sleep(500); // the first one's probes, had its vLLM been stopped
    expect(await status(first)).toMatchObject({ state: 'ready', pid: vllmPid, restarts: 0 });
    await chatOk(first);
  });

  it('a second tide-vllm is refused while the first sleeps at level 3 (no vLLM runs); the first wakes on the port', async () => {
    const first = await startService({ config: { vllm: { sleep: { idle_seconds: 1, level: 3 } } } });
    await waitUntil(async () => (await status(first)).state === 'sleeping', 10_000, 20, 'falling asleep when idle');
    expect(await first.vllmPid()).toBeNull(); // level 3 stops the engine: nothing holds the port now
    const second = await startService({ config: { vllm: { port: first.vllmPort, state_dir: join(first.dir, 'state') } }, waitFor: null });
    expect((await second.proc.waitForExit(15_000)).code).toBe(1);
    const output = second.proc.output.join('\n');
    expect(output).toContain(`vllm.port ${first.vllmPort} is supervised by another tide-vllm (pid ${first.proc.pid}`);
    expect(output).toContain('whose vLLM is not running now (asleep at level 3');
    await chatOk(first); // wakes it: the port is free for it
    expect(await status(first)).toMatchObject({ state: 'ready', restarts: 0 });
  });
});
