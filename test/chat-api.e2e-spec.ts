/**
 * The simple chat API, /health and /ready over real HTTP, against the real service with the
 * simulator as its auto-started vLLM. Every status the API promises is provoked here.
 */
import { type Service, post, startService, stopAllServices } from './service';
import { existsSync, readFileSync } from 'node:fs';
import { type AddressInfo, createServer } from 'node:net';
import { join } from 'node:path';
import { killAll, sendPartial, startSim, waitUntil } from './harness';

const FRESH_ID = /^[0-9a-f]{16}$/; // as vLLM makes them

interface Envelope {
  request_id: string;
  content: string | null;
  model: string | null;
  usage: { prompt_tokens: number; completion_tokens: number; total_tokens: number } | null;
  finish_reason: string | null;
  error: { type: string; message: string } | null;
}

/** Every body the suite received, checked at the end for leaks. */
const bodies: string[] = [];

afterAll(async () => {
  await stopAllServices();
  await killAll();
});

describe('simple chat API (shared service)', () => {
  let svc: Service;

  beforeAll(async () => {
    svc = await startService();
  });

  async function chat(body: unknown, headers: Record<string, string> = {}, path = '/chat/completions') {
    const res = await svc.request(path, post(body, headers));
    bodies.push(res.body);
    return { status: res.status, headers: res.headers, body: JSON.parse(res.body) as Envelope };
  }

  it('answers a prompt in the simple envelope with usage and finish_reason', async () => {
    const { status, headers, body } = await chat({ prompt: 'tell me a story', max_tokens: 3 });
    expect(status).toBe(200);
    expect(body).toEqual({
      request_id: expect.stringMatching(FRESH_ID),
      content: 'tell me a',
      model: 'sim-model',
      usage: { prompt_tokens: expect.any(Number), completion_tokens: 3, total_tokens: expect.any(Number) },
      finish_reason: 'length',
      error: null,
    });
    expect(body.usage!.total_tokens).toBe(body.usage!.prompt_tokens + 3);
    expect(headers['x-request-id']).toBe(body.request_id);
  });

  it('uses the request_id given, and sends it to vLLM as X-Request-Id', async () => {
    const { body, headers } = await chat({ prompt: 'a b', request_id: 'my-id-1' });
    expect(body.request_id).toBe('my-id-1');
    expect(headers['x-request-id']).toBe('my-id-1');
    expect(body.finish_reason).toBe('stop');
    // Spaces inside, and the longest one taken.
    for (const id of ['req 42', 'x'.repeat(1024)]) {
      const taken = await chat({ prompt: 'a b', request_id: id });
      expect([taken.status, taken.body.request_id, taken.headers['x-request-id']]).toEqual([200, id, id]);
    }
  });

  it('takes the X-Request-Id header when the body has no request_id; one that is not 1–1024 printable ASCII characters is replaced by a fresh id', async () => {
    const given = await chat({ prompt: 'a b' }, { 'x-request-id': 'hdr-id-3' });
    expect([given.status, given.body.request_id, given.headers['x-request-id']]).toEqual([200, 'hdr-id-3', 'hdr-id-3']);
    // Over 1024 characters, a control character (a tab: the one Node lets into a header), a byte that is not ASCII (é, sent as latin1).
    for (const id of ['x'.repeat(1025), 'req\t42', 'caf\u00e9']) {
      for (const path of ['/chat/completions', '/v1/chat/completions']) {
        const res = await chat({ prompt: 'a b' }, { 'x-request-id': id }, path);
        expect([path, id.length, res.status, res.body.request_id]).toEqual([path, id.length, 200, expect.stringMatching(FRESH_ID)]);
        expect(res.headers['x-request-id']).toBe(res.body.request_id);
      }
    }
  });

  it('the request_id reaches vLLM: its request log names it, for a plain and a streamed request', async () => {
    const own = await startService({ config: { vllm: { extra_args: { 'enable-log-requests': true } } } });
    const plain = await own.request('/chat/completions', post({ prompt: 'a b', request_id: 'plain-id-7' }));
    expect(plain.status).toBe(200);
    const streamed = await own.request('/chat/completions', post({ prompt: 'a b', request_id: 'stream-id-8', stream: true }));
    expect(streamed.status).toBe(200);
    expect(streamed.headers['x-request-id']).toBe('stream-id-8');
    const log = () => {
      const file = join(own.dir, 'logs', `vllm_${own.vllmPort}.log`);
      return existsSync(file) ? readFileSync(file, 'utf8') : '';
    };
    // vLLM names a chat request chatcmpl-<X-Request-Id>; its lines reach the file through a pipe, a moment later.
    await waitUntil(() => log().includes('Received request chatcmpl-plain-id-7:') && log().includes('Received request chatcmpl-stream-id-8:'), 3_000, 25, "both ids in vLLM's request log");
    await own.stop();
  });

  it('without max_tokens, a prompt that leaves less room than vllm.max_tokens gets what fits, streamed or not; with it, vLLM\'s 400', async () => {
    // max_model_len 256 and vllm.max_tokens 32 here: a prompt of ~240 tokens leaves room for ~16.
    const tokensOf = async (words: number) => (await chat({ prompt: 'w '.repeat(words), max_tokens: 1 })).body.usage!.prompt_tokens;
    const [one, eleven] = [await tokensOf(1), await tokensOf(11)];
    const perWord = (eleven - one) / 10;
    const words = 1 + Math.floor((240 - one) / perWord);
    const prompt = 'w '.repeat(words);
    const promptTokens = one + (words - 1) * perWord;
    expect(promptTokens + 32).toBeGreaterThan(256); // the default would not fit…
    expect(promptTokens).toBeLessThan(256); // …the prompt alone does

    const plain = await chat({ prompt });
    expect([plain.status, plain.body.finish_reason, plain.body.usage]).toEqual([
      200,
      'length',
      { prompt_tokens: promptTokens, completion_tokens: 256 - promptTokens, total_tokens: 256 },
    ]);
    const streamed = await svc.request('/chat/completions', post({ prompt, stream: true }));
    expect(streamed.status).toBe(200);
    expect(streamed.body).toContain(`"usage":{"prompt_tokens":${promptTokens},"completion_tokens":${256 - promptTokens},"total_tokens":256}`);
    expect(streamed.body.trimEnd().endsWith('data: [DONE]')).toBe(true);

    const asked = await chat({ prompt, max_tokens: 32 });
    expect([asked.status, asked.body.error?.type]).toEqual([400, 'upstream_rejected']);
    expect(asked.body.error?.message).toContain("maximum context length is 256 tokens");
    // Too long by itself: refused again without max_tokens. The client, who asked for no length,
    // hears that the prompt leaves no room, not of the default max_tokens tide-vllm sent first.
    const longer = 'w '.repeat(words + Math.ceil(32 / perWord));
    const tooLong = await chat({ prompt: longer });
    expect([tooLong.status, tooLong.body.error?.type]).toEqual([400, 'upstream_rejected']);
    const noRoom = "the prompt leaves no room for an answer in the model's context (vllm.max_model_len), even without max_tokens. vLLM: This model's maximum context length is 256 tokens.";
    expect(tooLong.body.error?.message).toContain(noRoom);
    expect(tooLong.body.error?.message).not.toContain('you requested 32 output tokens');
    const tooLongStreamed = await svc.request('/chat/completions', post({ prompt: longer, stream: true }));
    expect(tooLongStreamed.status).toBe(400);
    expect(JSON.parse(tooLongStreamed.body).error.message).toBe(tooLong.body.error?.message);
  });

  it("without max_tokens, a prompt refused by vLLM's character pre-check (param input_text) for the default length is retried too", async () => {
    // vLLM refuses, before tokenizing, text over max_input_tokens × the tokenizer's max chars per
    // token (128 in the simulator): (256 − 32) × 128 = 28,672 characters with the default length,
    // 32,768 without. One 30,000-character word is 235 tokens of 128 characters.
    const prompt = 'x'.repeat(30_000);
    const asked = await chat({ prompt, max_tokens: 32 });
    expect([asked.status, asked.body.error?.message]).toEqual([400, expect.stringContaining('characters')]);
    const plain = await chat({ prompt });
    expect([plain.status, plain.body.error]).toEqual([200, null]);
    expect(plain.body.usage!.prompt_tokens + 32).toBeGreaterThan(256); // the default length would not have fitted
  });

  it('adds the configured system prompt: it counts in prompt_tokens unless turned off', async () => {
    const withDefault = await chat({ prompt: 'same words here' });
    const without = await chat({ prompt: 'same words here', system_prompt: '' });
    expect(withDefault.body.usage!.prompt_tokens).toBeGreaterThan(without.body.usage!.prompt_tokens);
  });

  it('serves the same contract on /v1/chat/completions when the body has a prompt', async () => {
    const { status, body } = await chat({ prompt: 'x y z', max_tokens: 2 }, {}, '/v1/chat/completions');
    expect(status).toBe(200);
    expect(body.content).toBe('x y');
    expect(body.finish_reason).toBe('length');
  });

  it('streams deltas with request_id, a final event with usage, then [DONE]', async () => {
    const res = await svc.request('/chat/completions', post({ prompt: 'one two three', stream: true, request_id: 's-1' }));
    expect(res.status).toBe(200);
    expect(res.headers['content-type']).toBe('text/event-stream; charset=utf-8');
    expect(res.headers['x-accel-buffering']).toBe('no');
    expect(res.headers['cache-control']).toBe('no-cache');
    const events = res.body.split('\n\n').filter(Boolean).map((e) => e.replace(/^data: /, ''));
    expect(events[events.length - 1]).toBe('[DONE]');
    const parsed = events.slice(0, -1).map((e) => JSON.parse(e) as Record<string, unknown>);
    expect(parsed.map((e) => e.content).join('')).toBe('one two three');
    expect(parsed.every((e) => e.request_id === 's-1')).toBe(true);
    const final = parsed[parsed.length - 1];
    const whole = await chat({ prompt: 'one two three' });
    expect(final).toMatchObject({ finish_reason: 'stop', model: 'sim-model', usage: whole.body.usage });
  });

  describe('400 for invalid input, naming each field', () => {
    it.each([
      [{}, 'prompt is required'],
      [{ prompt: '' }, 'prompt must not be empty'],
      [{ prompt: '   ' }, 'prompt must contain text, not only whitespace'],
      [{ prompt: 42 }, 'prompt must be a string'],
      [{ prompt: 'x', temperature: 2.5 }, 'temperature must be from 0 to 2'],
      [{ prompt: 'x', temperature: '0.5' }, 'temperature must be a number'],
      [{ prompt: 'x', top_p: 0 }, 'top_p must be a number greater than 0 and at most 1'],
      [{ prompt: 'x', top_p: 1.5 }, 'top_p must be a number greater than 0 and at most 1'],
      [{ prompt: 'x', max_tokens: 0 }, 'max_tokens must be at least 1'],
      [{ prompt: 'x', max_tokens: 1.5 }, 'max_tokens must be an integer'],
      [{ prompt: 'x', max_tokens: '5' }, 'max_tokens must be an integer'],
      [{ prompt: 'x', max_tokens: 257 }, 'max_tokens must be at most max_model_len (256), got 257'],
      [{ prompt: 'x', request_id: ' leading space' }, 'request_id must be 1 to 1024 printable ASCII characters, not starting or ending with a space'],
      [{ prompt: 'x', request_id: 'ünicode' }, 'request_id must be 1 to 1024 printable ASCII characters'],
      [{ prompt: 'x', request_id: 'x'.repeat(1025) }, 'request_id must be 1 to 1024 printable ASCII characters'],
      [{ prompt: 'x', stream: 'yes' }, 'stream must be true or false'],
      [{ prompt: 'x', promt: 'typo' }, 'unknown field "promt"'],
      [{ messages: [{ role: 'user', content: 'x' }] }, 'unknown field "messages" (the simple API takes "prompt"; an OpenAI chat body with "messages" goes to /v1/chat/completions)'],
      [{ prompt: 'x', constructor: 'x' }, 'unknown field "constructor"'],
      [{ prompt: 'x', toString: 1 }, 'unknown field "toString"'],
      [{ prompt: 'x', hasOwnProperty: 1 }, 'unknown field "hasOwnProperty"'],
      [[1, 2], 'request body must be a JSON object'],
    ])('%j → %s', async (body, message) => {
      const res = await chat(body);
      expect(res.status).toBe(400);
      expect(res.body.content).toBeNull();
      expect(res.body.error!.type).toBe('invalid_request');
      expect(res.body.error!.message).toContain(message);
    });

    it('names every offending field at once', async () => {
      const res = await chat({ temperature: 9, extra: 1 });
      expect(res.body.error!.message).toContain('prompt is required');
      expect(res.body.error!.message).toContain('temperature must be from 0 to 2');
      expect(res.body.error!.message).toContain('unknown field "extra"');
    });

    it('malformed JSON', async () => {
      const res = await svc.request('/chat/completions', { method: 'POST', body: '{"prompt": "x"', headers: { 'content-type': 'application/json' } });
      bodies.push(res.body);
      expect(res.status).toBe(400);
      expect(JSON.parse(res.body).error.message).toBe('request body is not valid JSON');
    });

    it('an empty body with a JSON type is no body: a route that needs one says it is empty, one that takes none runs', async () => {
      const json = { method: 'POST', body: '', headers: { 'content-type': 'application/json' } };
      for (const path of ['/chat/completions', '/generate']) {
        const res = await svc.request(path, json);
        bodies.push(res.body);
        expect([path, res.status, JSON.parse(res.body).error.message]).toEqual([path, 400, 'request body is empty; a JSON object is expected']);
      }
      // vLLM is awake: a wake-up is refused for that (409), not for its missing body.
      const wake = await svc.request('/admin/wake_up', json);
      expect([wake.status, JSON.parse(wake.body).error.message]).toEqual([409, expect.stringContaining('not asleep')]);
    });

    it('a "__proto__" key: the JSON is valid, the message says what is refused', async () => {
      const res = await svc.request('/chat/completions', { method: 'POST', body: '{"prompt":"x","__proto__":{"a":1}}', headers: { 'content-type': 'application/json' } });
      bodies.push(res.body);
      expect(res.status).toBe(400);
      expect(JSON.parse(res.body).error).toEqual({ type: 'invalid_request', message: expect.stringContaining('must not contain a "__proto__" key') });
    });
  });

  it('errors before routing keep their status, in our shape with an X-Request-Id: a bad URL (400), headers over 16 KiB (431)', async () => {
    const badUrl = await svc.request('/admin/lora/%ZZ', { method: 'DELETE', headers: { 'x-request-id': 'bad-url-1' } });
    bodies.push(badUrl.body);
    expect([badUrl.status, badUrl.headers['x-request-id']]).toEqual([400, 'bad-url-1']);
    expect(JSON.parse(badUrl.body)).toEqual({ error: { type: 'invalid_request', message: expect.stringContaining('URL') } });
    // Refused before a request was read: its path is unknown, so the plain shape, and a fresh id.
    const big = await svc.request('/chat/completions', { headers: { 'x-big': 'a'.repeat(20_000) } });
    bodies.push(big.body);
    expect([big.status, big.headers['x-request-id']]).toEqual([431, expect.stringMatching(FRESH_ID)]);
    expect(JSON.parse(big.body)).toEqual({ error: { type: 'request_headers_too_large', message: expect.any(String) } });
    for (const body of [badUrl.body, big.body]) expect(body).not.toMatch(/FST_|statusCode/);
  });

  it("400 with vLLM's own message when vLLM rejects the input (prompt too long)", async () => {
    const res = await chat({ prompt: 'word '.repeat(300), max_tokens: 10 });
    expect(res.status).toBe(400);
    expect(res.body.error!.type).toBe('upstream_rejected');
    expect(res.body.error!.message).toContain("This model's maximum context length is 256 tokens");
  });

  it('413 over the body limit, 415 for a body that is not JSON, 400 for one that is not UTF-8', async () => {
    const big = await svc.request('/chat/completions', post({ prompt: 'x'.repeat(1_100_000) }));
    bodies.push(big.body);
    expect(big.status).toBe(413);
    expect(JSON.parse(big.body).error.type).toBe('payload_too_large');
    for (const type of ['text/plain', 'application/x-www-form-urlencoded', 'application/xml']) {
      const res = await svc.request('/chat/completions', { method: 'POST', body: 'prompt=hi', headers: { 'content-type': type } });
      bodies.push(res.body);
      expect(res.status).toBe(415);
      expect(JSON.parse(res.body).error.type).toBe('unsupported_media_type');
    }
    // Bytes that are not UTF-8 (Latin-1 "café") are refused, on the simple API and the relay alike.
    const latin1 = { method: 'POST', body: Buffer.from('{"prompt":"caf\xe9","messages":[{"role":"user","content":"caf\xe9"}]}', 'latin1'), headers: { 'content-type': 'application/json' } };
    const simple = await svc.request('/chat/completions', latin1);
    bodies.push(simple.body);
    const relayed = await svc.request('/v1/completions', latin1);
    expect([simple.status, JSON.parse(simple.body).error.message]).toEqual([400, 'request body is not valid UTF-8 (JSON text must be)']);
    expect([relayed.status, JSON.parse(relayed.body).error]).toEqual([400, expect.objectContaining({ message: 'request body is not valid UTF-8 (JSON text must be)', type: 'BadRequestError' })]);
  });

  it('JSON 404 for unknown routes; 405 with Allow for a method the route does not take (as vLLM answers)', async () => {
    // A path no route has; one a route took and found nothing at; ones the router cannot read.
    for (const [method, path] of [['GET', '/nope'], ['GET', '/docs/nonexistent.js'], ['HEAD', '/docs/nonexistent.js'], ['PUT', '/v1/chat/%zz'], ['GET', `/admin/lora/${'x'.repeat(200)}`]]) {
      const res = await svc.request(path, { method });
      bodies.push(res.body);
      expect([method, path, res.status, res.headers.allow]).toEqual([method, path, 404, undefined]);
    }
    for (const [method, path, allow, body] of [
      ['POST', '/health', 'GET, HEAD', { error: { type: 'method_not_allowed', message: 'method POST is not allowed on /health (it takes GET, HEAD)' } }],
      ['DELETE', '/chat/completions', 'POST', { error: { type: 'method_not_allowed', message: 'method DELETE is not allowed on /chat/completions (it takes POST)' } }],
      ['GET', '/v1/chat/completions', 'POST', { error: { type: 'MethodNotAllowedError', message: 'method GET is not allowed on /v1/chat/completions (it takes POST)', param: null, code: 405 } }],
      ['GET', '/admin/lora/some-adapter', 'DELETE', { error: { type: 'method_not_allowed', message: 'method GET is not allowed on /admin/lora/some-adapter (it takes DELETE)' } }],
    ] as const) {
      const res = await svc.request(path, { method });
      bodies.push(res.body);
      expect([method, path, res.status, res.headers.allow]).toEqual([method, path, 405, allow]);
      expect(res.headers['content-type']).toMatch(/^application\/json/);
      expect(JSON.parse(res.body)).toMatchObject(body);
    }
  });

  it('describes the API at /openapi.json, generated from the DTOs, and serves Swagger UI at /docs', async () => {
    const spec = await svc.json<{ paths: Record<string, Record<string, unknown>>; components: { schemas: Record<string, { properties: Record<string, unknown>; required?: string[] }> } }>('/openapi.json');
    expect(spec.status).toBe(200);
    for (const path of ['/chat/completions', '/generate', '/health', '/ready', '/admin/status', '/admin/lora', '/v1/chat/completions', '/v1/models']) {
      expect(spec.body.paths).toHaveProperty([path]);
    }
    expect(spec.body.paths).not.toHaveProperty(['/v1/tokenize']); // SGLang's spelling: listed only with engine sglang
    const chat = spec.body.components.schemas.ChatRequestDto;
    expect(chat.required).toContain('prompt');
    expect(Object.keys(chat.properties).sort()).toEqual(['max_tokens', 'prompt', 'request_id', 'stream', 'system_prompt', 'temperature', 'top_p']);
    // The rules validation enforces, as the document states them.
    expect(chat).toMatchObject({ additionalProperties: false, properties: { max_tokens: { type: 'integer', minimum: 1 }, prompt: { minLength: 1 }, request_id: { minLength: 1, maxLength: 1024 } } });
    // Swagger UI's "Authorize" sends the key on every route but the probes'.
    const doc = spec.body as unknown as { info: { version: string }; security: unknown[]; paths: Record<string, Record<string, { security?: unknown[]; responses: Record<string, unknown> }>> };
    expect(doc.security).toEqual([{ bearer: [] }]);
    expect([doc.paths['/health'].get.security, doc.paths['/ready'].get.security]).toEqual([[], []]);
    expect(doc.info.version).toBe(JSON.parse(readFileSync(join(__dirname, '..', 'package.json'), 'utf8')).version);
    // The simple API's answer and errors: its envelope, JSON or a stream.
    const answer = doc.paths['/chat/completions'].post.responses['200'] as { content: Record<string, unknown> };
    expect(Object.keys(answer.content)).toEqual(['application/json', 'text/event-stream']);
    expect(doc.paths['/generate'].post.responses).toHaveProperty('default');
    // With or without a trailing slash, the page's relative assets (its scripts hold the spec) resolve.
    for (const page of ['/docs', '/docs/']) {
      const docs = await svc.request(page);
      expect(docs.status).toBe(200);
      expect(docs.headers['content-type']).toMatch(/^text\/html/);
      const assets = [...docs.body.matchAll(/(?:src|href)="\.\/([^"]+\.(?:js|css))"/g)].map((m) => new URL(m[1], `http://x${page}`).pathname);
      expect(assets).toContain('/docs/swagger-ui-init.js');
      for (const asset of assets) expect([asset, (await svc.request(asset)).status]).toEqual([asset, 200]);
    }
  });

  it('/health and /ready say healthy and ready', async () => {
    const health = await svc.json('/health');
    expect(health.status).toBe(200);
    expect(health.body).toMatchObject({ status: 'healthy', vllm_healthy: true, state: 'ready', model: 'sim-model', mode: 'auto' });
    const ready = await svc.json('/ready');
    expect(ready.status).toBe(200);
    expect(ready.body).toEqual({ ready: true, state: 'ready' });
  });
});

describe('statuses that need their own service', () => {
  afterEach(stopAllServices);

  it('while the model loads: /health 200 starting, /ready 503, chat 503 with Retry-After', async () => {
    const svc = await startService({ env: { VLLM_SIM_LOAD_SECONDS: '3' }, waitFor: 'starting' });
    expect(await svc.health()).toMatchObject({ status: 'starting', vllm_healthy: false });
    expect((await svc.request('/ready')).status).toBe(503);
    const res = await svc.request('/chat/completions', post({ prompt: 'hi' }));
    bodies.push(res.body);
    expect(res.status).toBe(503);
    expect(res.headers['retry-after']).toBe('5');
    expect(JSON.parse(res.body).error.type).toBe('vllm_not_ready');
    await svc.waitForHealth('healthy');
    expect((await svc.request('/ready')).status).toBe(200);
  });

  it('504 when vllm.timeout passes, 502 when vLLM fails the request', async () => {
    const slow = await startService({ config: { vllm: { timeout: 0.5 } }, env: { VLLM_SIM_TTFT_MS: '3000' } });
    const timedOut = await slow.request('/chat/completions', post({ prompt: 'hi' }));
    bodies.push(timedOut.body);
    expect(timedOut.status).toBe(504);
    expect(JSON.parse(timedOut.body).error.type).toBe('upstream_timeout');
    // An SDK would only try the same generation again, and time out again: it is told not to retry.
    const relayed = await slow.request('/v1/chat/completions', post({ messages: [{ role: 'user', content: 'hi' }] }));
    expect([timedOut.headers['x-should-retry'], relayed.status, relayed.headers['x-should-retry']]).toEqual(['false', 504, 'false']);
    await slow.stop();

    const failing = await startService({ env: { VLLM_SIM_FAIL_NTH_REQUEST: '1' } });
    const failed = await failing.request('/chat/completions', post({ prompt: 'hi' }));
    bodies.push(failed.body);
    expect(failed.status).toBe(502);
    expect(JSON.parse(failed.body).error).toEqual({ type: 'upstream_error', message: 'vLLM failed to answer (HTTP 500)' });
    const next = await failing.request('/chat/completions', post({ prompt: 'hi' }));
    expect(next.status).toBe(200);
  });

  it('408 for a request too slow sending its body: the simple envelope with its request id, then the connection closed', async () => {
    const svc = await startService({ config: { web: { client_timeout: 1 } } });
    const { head, body, closed } = await sendPartial(
      svc.port,
      'POST /chat/completions HTTP/1.1\r\nHost: x\r\nX-Request-Id: slow-1\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"pro',
    );
    expect(closed).toBe(true);
    bodies.push(body);
    expect(head).toEqual(expect.arrayContaining(['HTTP/1.1 408 Request Timeout', 'x-request-id: slow-1', 'connection: close']));
    expect(JSON.parse(body)).toMatchObject({ request_id: 'slow-1', content: null, error: { type: 'request_timeout', message: expect.stringContaining('web.client_timeout') } });
  });

  it('vllm.enabled false: chat answers 503 saying so, /health 200 disabled', async () => {
    const svc = await startService({ config: { vllm: { enabled: false } }, waitFor: 'disabled' });
    const res = await svc.request('/chat/completions', post({ prompt: 'hi' }));
    bodies.push(res.body);
    expect(res.status).toBe(503);
    expect(JSON.parse(res.body).error).toEqual({ type: 'vllm_disabled', message: 'vLLM is disabled in this service (vllm.enabled: false)' });
    expect(res.headers['retry-after']).toBeUndefined(); // for good: a client that honours it would retry forever
    expect(res.headers['x-should-retry']).toBe('false'); // OpenAI's SDKs retry any 5xx without it
    expect((await svc.request('/ready')).status).toBe(503);
  });

  it('manual mode: degraded while vLLM is unreachable, healthy once it answers; nothing spawned', async () => {
    const svc = await startService({
      config: { vllm: { auto_start: false, model_name: 'sim-model', health_failure_threshold: 1 } },
      waitFor: 'degraded',
    });
    expect(await svc.health()).toMatchObject({ status: 'degraded', vllm_healthy: false, mode: 'manual' });
    const down = await svc.request('/chat/completions', post({ prompt: 'hi' }));
    bodies.push(down.body);
    expect(down.status).toBe(503);
    expect(await svc.vllmPid()).toBeNull();

    const sim = await startSim({ port: svc.vllmPort });
    await svc.waitForHealth('healthy');
    const up = await svc.json<Envelope>('/chat/completions', post({ prompt: 'manual works' }));
    expect(up.status).toBe(200);
    expect(up.body.content).toBe('manual works');
    await sim.stop();
    await svc.waitForHealth('degraded');
    // Losing it is a warning; not having seen it yet at the start was not.
    const lost = () => svc.proc.output.filter((l) => l.includes('"level":40') && l.includes('does not answer /health'));
    await waitUntil(() => lost().length > 0, 5_000);
    expect(lost()).toHaveLength(1);
  });

  it('ends with exit code 1 and the reason when vLLM cannot start', async () => {
    const svc = await startService({ env: { VLLM_SIM_CRASH_ON_LOAD: '1' }, waitFor: null });
    const status = await svc.proc.waitForExit(20_000);
    expect(status.code).toBe(1);
    const log = svc.proc.output.join('\n');
    expect(log).toContain('Engine core initialization failed');
    expect(log).toContain('before serving model');
  });

  it('a web.bind_address it cannot listen on ends it with exit code 1 and one line saying why, before vLLM is started', async () => {
    const busy = createServer();
    await new Promise<void>((resolve) => busy.listen(0, '127.0.0.1', resolve));
    const busyPort = (busy.address() as AddressInfo).port;
    try {
      const cases: Array<[string, number, string]> = [
        ['127.0.0.1', busyPort, 'the port is already in use'],
        ['192.0.2.1', busyPort, 'the address is not on this machine'], // TEST-NET-1: on no machine
      ];
      for (const [host, port, why] of cases) {
        const svc = await startService({ config: { web: { bind_address: { host, port } } }, waitFor: null });
        expect([host, (await svc.proc.waitForExit(10_000)).code]).toEqual([host, 1]);
        expect(svc.proc.stderrLines).toEqual([`tide-vllm: cannot listen on ${host}:${port} (web.bind_address): ${why}`]);
        expect(svc.proc.stdoutLines.filter((l) => !l.includes('"level":30'))).toEqual([]); // no error logged besides
        expect(svc.processes()).toEqual([]); // no vLLM was started
      }
    } finally {
      busy.close();
    }
  });

  it('a bad configuration stops the service with exit code 2, naming every bad key, no stack trace', async () => {
    const svc = await startService({
      config: { vllm: { port: 70000, dtype: 'fp8', bogus: 1 }, web: { bind_address: { port: 'x' } } },
      waitFor: null,
    });
    const status = await svc.proc.waitForExit(10_000);
    expect(status.code).toBe(2);
    const err = svc.proc.stderrLines.join('\n');
    expect(err).toContain('vllm.port: must be an integer from 1 to 65535');
    expect(err).toContain('vllm.dtype: must be one of');
    expect(err).toContain('vllm.bogus');
    expect(err).toContain('web.bind_address.port');
    expect(err).not.toMatch(/\n\s+at /);
  });
});

describe('error hygiene', () => {
  it('no error body carries a stack trace, a file path or an internal address', async () => {
    // Its own failures, so it holds when run alone; the bodies the other tests received come on top.
    const svc = await startService({ env: { VLLM_SIM_CRASH_MID_STREAM: '2' } });
    const own: Array<[string, number, string]> = [];
    const record = async (what: string, path: string, options: Parameters<Service['request']>[1]) => {
      const res = await svc.request(path, options);
      own.push([what, res.status, res.body]);
    };
    await record('bad JSON', '/chat/completions', { method: 'POST', body: '{"prompt": ', headers: { 'content-type': 'application/json' } });
    await record('bad JSON (relay)', '/v1/chat/completions', { method: 'POST', body: '{"messages": [', headers: { 'content-type': 'application/json' } });
    await record('unknown route', '/no/such/route', { method: 'GET' });
    await record('not JSON', '/chat/completions', { method: 'POST', body: 'prompt=hi', headers: { 'content-type': 'text/plain' } });
    await record('invalid body', '/chat/completions', post({ prompt: 42 }));
    await record('vLLM refusal', '/chat/completions', post({ prompt: 'too long', max_tokens: 100_000 }));
    await record('vLLM refusal (relay)', '/v1/chat/completions', post({ messages: [{ role: 'user', content: 'hi' }], max_tokens: 100_000 }));
    // Last: the engine dies two tokens into this stream (the service then restarts vLLM).
    await record('mid-stream failure', '/chat/completions', post({ prompt: 'a b c d e f', stream: true }));
    expect(own.map(([what, status]) => [what, status])).toEqual([
      ['bad JSON', 400],
      ['bad JSON (relay)', 400],
      ['unknown route', 404],
      ['not JSON', 415],
      ['invalid body', 400],
      ['vLLM refusal', 400],
      ['vLLM refusal (relay)', 400],
      ['mid-stream failure', 200],
    ]);
    expect(own.at(-1)?.[2]).toMatch(/"error":\{/); // the failure came in the stream
    for (const [what, , body] of own) {
      expect([what, body]).not.toEqual([what, expect.stringMatching(/\n\s+at |\.ts:\d+|\.js:\d+|node_modules|127\.0\.0\.1:\d+|ECONNREFUSED|\/work\/|\/tmp\//)]);
    }
    for (const body of bodies) {
      expect(body).not.toMatch(/\n\s+at |\.ts:\d+|\.js:\d+|node_modules|127\.0\.0\.1:\d+|ECONNREFUSED/);
    }
  });
});
