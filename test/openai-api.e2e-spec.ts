/**
 * The OpenAI-compatible API through tide-vllm, driven by the official `openai` SDK and by raw
 * HTTP: relaying, streaming, cancellation and failures inside a stream.
 */
import { request } from 'node:http';
import { connect } from 'node:net';
import OpenAI from 'openai';
import { type Service, accessLine, count, logged, post, startService, stopAllServices, vllmLog } from './service';
import { httpRequest, killAll, readSse, sendPartial, sleep, waitUntil } from './harness';

afterAll(async () => {
  await stopAllServices();
  await killAll();
});

/** vLLM's own counter of requests that ended with `reason`, read through tide-vllm's /metrics. */
async function vllmFinished(svc: Service, reason: string): Promise<number> {
  const text = (await svc.request('/metrics')).body;
  const line = text.split('\n').find((l) => l.startsWith('vllm:request_success_total{') && l.includes(`finished_reason="${reason}"`));
  return line ? Number(line.split(' ').pop()) : 0;
}

async function vllmRunning(svc: Service): Promise<number> {
  const line = (await svc.request('/metrics')).body.split('\n').find((l) => l.startsWith('vllm:num_requests_running{'));
  return line ? Number(line.split(' ').pop()) : -1;
}

describe('with the openai SDK', () => {
  let svc: Service;
  let client: OpenAI;

  beforeAll(async () => {
    svc = await startService();
    client = new OpenAI({ baseURL: `${svc.url}/v1`, apiKey: 'unused', maxRetries: 0, timeout: 10_000 });
  });

  it('chat completions come back as vLLM sent them', async () => {
    const completion = await client.chat.completions.create({
      model: 'sim-model',
      messages: [{ role: 'user', content: 'alpha beta gamma' }],
      max_tokens: 2,
    });
    expect(completion.object).toBe('chat.completion');
    expect(completion.model).toBe('sim-model');
    expect(completion.choices[0].message.content).toBe('alpha beta');
    expect(completion.choices[0].finish_reason).toBe('length');
    expect(completion.usage?.completion_tokens).toBe(2);
  });

  it('streams chat chunks with include_usage, ending with a usage chunk', async () => {
    const stream = await client.chat.completions.create({
      model: 'sim-model',
      messages: [{ role: 'user', content: 'one two three four' }],
      stream: true,
      stream_options: { include_usage: true },
    });
    let text = '';
    let finish: string | null = null;
    let usage: OpenAI.CompletionUsage | undefined;
    for await (const chunk of stream) {
      text += chunk.choices[0]?.delta?.content ?? '';
      finish = chunk.choices[0]?.finish_reason ?? finish;
      usage = chunk.usage ?? usage;
    }
    expect(text).toBe('one two three four');
    expect(finish).toBe('stop');
    expect(usage?.completion_tokens).toBeGreaterThanOrEqual(4);
  });

  it('completions and models work', async () => {
    const completion = await client.completions.create({ model: 'sim-model', prompt: 'red green blue', max_tokens: 2 });
    expect(completion.object).toBe('text_completion');
    expect(completion.choices[0].text).toBe('red green');
    const models = await client.models.list();
    expect(models.data.map((m) => m.id)).toEqual(['sim-model']);
    // vLLM has no route for one model's card, for any method: a 404 (the SDK's NotFoundError), as without tide-vllm.
    for (const method of ['GET', 'POST', 'HEAD'] as const) {
      for (const path of ['/v1/models/sim-model', '/v1/models/org/sim-model/']) {
        const ours = await svc.request(path, { method });
        const vllms = await httpRequest(`http://127.0.0.1:${svc.vllmPort}${path}`, { method });
        expect([method, path, ours.status]).toEqual([method, path, vllms.status]);
        expect(ours.status).toBe(404);
      }
    }
    await expect(client.models.retrieve('sim-model')).rejects.toBeInstanceOf(OpenAI.NotFoundError);
  });

  it('the Responses API: a response, and a stream of named events that ends with response.completed (no [DONE])', async () => {
    const response = await client.responses.create({ model: 'sim-model', input: 'alpha beta gamma', max_output_tokens: 2 });
    expect([response.object, response.output_text, response.status, response.usage?.output_tokens]).toEqual(['response', 'alpha beta', 'incomplete', 2]);
    const stream = await client.responses.create({
      instructions: 'be brief',
      input: [{ role: 'user', content: [{ type: 'input_text', text: 'one two three' }] }],
      stream: true,
    } as OpenAI.Responses.ResponseCreateParamsStreaming); // no model: the served one
    const types: string[] = [];
    let text = '';
    for await (const event of stream) {
      types.push(event.type);
      if (event.type === 'response.output_text.delta') text += event.delta;
      if (event.type === 'response.completed') expect(event.response.model).toBe('sim-model');
    }
    expect(text).toBe('one two three');
    expect([types[0], types.at(-1)]).toEqual(['response.created', 'response.completed']);
    await expect(client.responses.create({ model: 'no-such-model', input: 'x' })).rejects.toBeInstanceOf(OpenAI.NotFoundError);
    const tooLong = client.responses.create({ input: 'x', max_output_tokens: 100_000 } as OpenAI.Responses.ResponseCreateParamsNonStreaming);
    await expect(tooLong).rejects.toBeInstanceOf(OpenAI.BadRequestError);
  });

  it("relays the Responses API's stored-response routes: vLLM keeps none by default, and its 404 comes back", async () => {
    for (const call of [client.responses.retrieve('resp_nothing'), client.responses.cancel('resp_nothing')]) {
      await expect(call).rejects.toBeInstanceOf(OpenAI.NotFoundError);
      await expect(call).rejects.toMatchObject({ status: 404, param: 'response_id', message: expect.stringContaining("Response with id 'resp_nothing' not found.") });
    }
    // The Python SDK sends its body-less POSTs with Content-Type: application/json: no body, not a 400.
    const python = await svc.request('/v1/responses/resp_nothing/cancel', { method: 'POST', body: '', headers: { 'content-type': 'application/json' } });
    expect([python.status, JSON.parse(python.body).error.param]).toEqual([404, 'response_id']);
  });

  it("vLLM's errors surface as the SDK's typed errors, counted as refusals by vLLM", async () => {
    const rejected = async () => Number(/^tide_errors_total\{type="upstream_rejected"\} (\d+)$/m.exec((await svc.request('/metrics')).body)?.[1] ?? 0);
    const before = await rejected();
    await expect(
      client.chat.completions.create({ model: 'no-such-model', messages: [{ role: 'user', content: 'x' }] }),
    ).rejects.toBeInstanceOf(OpenAI.NotFoundError);
    const bad = client.chat.completions.create({ model: 'sim-model', messages: [{ role: 'user', content: 'x' }], temperature: 5 });
    await expect(bad).rejects.toBeInstanceOf(OpenAI.BadRequestError);
    await expect(bad).rejects.toMatchObject({ status: 400, param: 'temperature' });
    await waitUntil(async () => (await rejected()) === before + 2, 3_000, 20, 'two refusals counted');
  });

  it('defaults the model to the served name when the body has none', async () => {
    const res = await svc.json<{ model: string }>('/v1/chat/completions', post({ messages: [{ role: 'user', content: 'hi' }] }));
    expect(res.status).toBe(200);
    expect(res.body.model).toBe('sim-model');
  });

  it("carries the request's id to vLLM and back as vLLM picks it, on both ways through (vLLM's id is chatcmpl-<id>)", async () => {
    for (const path of ['/v1/chat/completions', '/v1/chat/completions?trace=1']) {
      const res = await svc.json<{ id: string }>(path, post({ messages: [{ role: 'user', content: 'hi' }], request_id: `rid-${path.length}` }));
      expect([path, res.status, res.res.headers['x-request-id'], res.body.id]).toEqual([path, 200, `rid-${path.length}`, `chatcmpl-rid-${path.length}`]);
    }
    // Both an X-Request-Id and a body request_id: vLLM takes the header, and so does its id through tide-vllm.
    const both = { method: 'POST', body: { messages: [{ role: 'user', content: 'hi' }], max_tokens: 2, request_id: 'from-body' }, headers: { 'x-request-id': 'from-header' } } as const;
    for (const path of ['/v1/chat/completions', '/v1/chat/completions?trace=1']) {
      const ours = await svc.request(path, both); // one after the other: two requests of one id at once are not vLLM's to take
      const vllms = await httpRequest(`http://127.0.0.1:${svc.vllmPort}${path}`, both);
      expect([path, ours.headers['x-request-id'], JSON.parse(ours.body).id]).toEqual([path, 'from-header', JSON.parse(vllms.body).id]);
      expect(JSON.parse(vllms.body).id).toBe('chatcmpl-from-header');
    }
    // Ids with spaces inside, or long ones, are vLLM's ids too, as without tide-vllm.
    const long = `trace-${'7'.repeat(200)}`;
    for (const [headers, body] of [[{ 'x-request-id': 'req 42' }, {}], [{}, { request_id: long }]] as const) {
      const res = await svc.json<{ id: string }>('/v1/chat/completions', post({ messages: [{ role: 'user', content: 'hi' }], max_tokens: 2, ...body }, headers));
      const id = 'request_id' in body ? body.request_id : headers['x-request-id'];
      expect([res.res.headers['x-request-id'], res.body.id]).toEqual([id, `chatcmpl-${id}`]);
    }
    // No id given: one as vLLM would make it (16 hex digits), the answer's X-Request-Id too.
    for (const path of ['/v1/chat/completions', '/v1/chat/completions?trace=1']) {
      const fresh = await svc.json<{ id: string }>(path, post({ messages: [{ role: 'user', content: 'hi' }], max_tokens: 2 }));
      expect(fresh.body.id).toMatch(/^chatcmpl-[0-9a-f]{16}$/);
      expect(fresh.body.id).toBe(`chatcmpl-${String(fresh.res.headers['x-request-id'])}`);
    }
  });

  it('an X-Request-Id or body request_id that is not 1–1024 printable ASCII characters is replaced by a fresh id, which vLLM gets', async () => {
    const FRESH_ID = /^[0-9a-f]{16}$/;
    // Over 1024 characters, a control character (a tab: the one Node lets into a header), a byte
    // that is not ASCII (é, sent as latin1).
    const bad = ['x'.repeat(1025), 'req\t42', 'caf\u00e9'];
    const chat = { messages: [{ role: 'user', content: 'hi' }], max_tokens: 2 };
    for (const id of bad) {
      // As a header: on the relay before Fastify and through it (a query string), on the model list.
      for (const path of ['/v1/chat/completions', '/v1/chat/completions?trace=1']) {
        const res = await svc.json<{ id: string }>(path, post(chat, { 'x-request-id': id }));
        const answered = String(res.res.headers['x-request-id']);
        expect([path, id.length, res.status, answered]).toEqual([path, id.length, 200, expect.stringMatching(FRESH_ID)]);
        expect(res.body.id).toBe(`chatcmpl-${answered}`); // the id vLLM got
      }
      const models = await svc.request('/v1/models', { headers: { 'x-request-id': id } });
      expect([id.length, models.status, models.headers['x-request-id']]).toEqual([id.length, 200, expect.stringMatching(FRESH_ID)]);
      // As the body's request_id, with no header.
      for (const path of ['/v1/chat/completions', '/v1/chat/completions?trace=1']) {
        const res = await svc.json<{ id: string }>(path, post({ ...chat, request_id: id }));
        const answered = String(res.res.headers['x-request-id']);
        expect([path, id.length, res.status, answered]).toEqual([path, id.length, 200, expect.stringMatching(FRESH_ID)]);
        expect(res.body.id).toBe(`chatcmpl-${answered}`);
      }
      // A bad header is no id at all: the body's usable one is taken, as vLLM takes it.
      const both = await svc.json<{ id: string }>('/v1/chat/completions', post({ ...chat, request_id: 'body-ok' }, { 'x-request-id': id }));
      expect([id.length, both.res.headers['x-request-id'], both.body.id]).toEqual([id.length, 'body-ok', 'chatcmpl-body-ok']);
    }
    // The longest id is taken, as a header and in the body.
    const longest = 'y'.repeat(1024);
    const header = await svc.json<{ id: string }>('/v1/chat/completions', post(chat, { 'x-request-id': longest }));
    expect([header.res.headers['x-request-id'], header.body.id]).toEqual([longest, `chatcmpl-${longest}`]);
    const body = await svc.json<{ id: string }>('/v1/chat/completions', post({ ...chat, request_id: longest }));
    expect([body.res.headers['x-request-id'], body.body.id]).toEqual([longest, `chatcmpl-${longest}`]);
  });

  it('400 for a body with both prompt and messages, or neither', async () => {
    const both = await svc.json<{ error: { message: string; type: string } }>('/v1/chat/completions', post({ prompt: 'x', messages: [] }));
    expect(both.status).toBe(400);
    expect(both.body.error.message).toContain('not both');
    const neither = await svc.json<{ error: { message: string } }>('/v1/chat/completions', post({ model: 'sim-model' }));
    expect(neither.status).toBe(400);
    expect(neither.body.error.message).toContain('needs "messages"');
  });

  it('refuses bodies in OpenAI error shape: 413, not JSON (400 as vLLM), bad or empty JSON, prototype keys', async () => {
    const cases: Array<[string, Record<string, string>, string, number, string]> = [
      ['over the limit (Content-Length)', {}, JSON.stringify({ messages: [{ role: 'user', content: 'x'.repeat(1_100_000) }] }), 413, 'larger than the limit'],
      ['over the limit (chunked)', { 'transfer-encoding': 'chunked' }, JSON.stringify({ prompt: 'x'.repeat(1_100_000) }), 413, 'larger than the limit'],
      // vLLM's answer to a body that is not JSON: a 400 (FastAPI's validate_json_request), not a 415.
      ['not JSON', { 'content-type': 'text/plain' }, 'hello', 400, "Unsupported Media Type: Only 'application/json' is allowed"],
      ['a JSON type Fastify does not parse', { 'content-type': 'application/vnd.api+json' }, '{}', 400, 'Unsupported Media Type'],
      ['bad JSON', {}, '{"messages": [', 400, 'not valid JSON'],
      ['empty', {}, '', 400, 'body is empty'],
      ['empty, chunked', { 'transfer-encoding': 'chunked' }, '', 400, 'body is empty'],
      ['a prototype key', {}, '{"messages": [], "__proto__": {"admin": true}}', 400, 'must not contain a "__proto__" key'],
      ['an array', {}, '[1, 2]', 400, 'must be a JSON object'],
    ];
    for (const path of ['/v1/chat/completions', '/v1/completions']) {
      for (const [what, headers, body, status, message] of cases) {
        const res = await svc.request(path, { method: 'POST', body, headers: { 'content-type': 'application/json', ...headers } });
        const answer = JSON.parse(res.body) as { error: { message: string; code: number } };
        expect([path, what, res.status, answer.error.code]).toEqual([path, what, status, status]);
        expect(answer.error.message).toContain(message);
      }
    }
    // Exactly vLLM's answer (the simulator's, behind the service).
    const notJson = { method: 'POST', body: '{"messages":[]}', headers: { 'content-type': 'text/plain' } };
    const [ours, vllms] = await Promise.all([svc.request('/v1/chat/completions', notJson), httpRequest(`http://127.0.0.1:${svc.vllmPort}/v1/chat/completions`, notJson)]);
    expect([ours.status, JSON.parse(ours.body)]).toEqual([vllms.status, JSON.parse(vllms.body)]);
    // The refused bodies cost nothing downstream: the service still answers on the same footing.
    const ok = await svc.json<{ object: string }>('/v1/completions', post({ prompt: 'a b', max_tokens: 1 }));
    expect(ok.body.object).toBe('text_completion');
  });

  it("a URL the router cannot take is a 400 in OpenAI's shape with an X-Request-Id, not Fastify's body", async () => {
    const res = await svc.request('/v1/%ZZ', { headers: { 'x-request-id': 'bad-url-2' } });
    expect([res.status, res.headers['x-request-id']]).toEqual([400, 'bad-url-2']);
    expect(JSON.parse(res.body)).toEqual({ error: { message: expect.stringContaining('URL'), type: 'BadRequestError', param: null, code: 400 } });
    expect(res.body).not.toMatch(/FST_|statusCode/);
  });

  it('a trailing slash is redirected (307) and a HEAD on a GET route is a 405, as vLLM answers both', async () => {
    const direct = (path: string, options: Parameters<typeof httpRequest>[1]) => httpRequest(`http://127.0.0.1:${svc.vllmPort}${path}`, options);
    const chat = { method: 'POST', body: { messages: [{ role: 'user', content: 'hi' }], max_tokens: 2 } } as const;
    for (const [path, options, location] of [
      ['/v1/chat/completions/', chat, '/v1/chat/completions'],
      ['/v1/models/?a=1', { method: 'GET' }, '/v1/models?a=1'],
    ] as const) {
      const [ours, vllms] = await Promise.all([svc.request(path, options), direct(path, options)]);
      expect([path, ours.status, ours.headers.location, ours.body]).toEqual([path, 307, location, '']);
      expect([path, vllms.status, new URL(vllms.headers.location as string, 'http://x').pathname]).toEqual([path, 307, location.split('?')[0]]);
    }
    expect((await svc.request('/nope/')).status).toBe(404); // only to a route that exists
    for (const path of ['/v1/models', '/v1/responses/resp_x']) {
      const [ours, vllms] = await Promise.all([svc.request(path, { method: 'HEAD' }), direct(path, { method: 'HEAD' })]);
      expect([path, ours.status, ours.headers.allow]).toEqual([path, 405, 'GET']);
      expect([path, vllms.status, vllms.headers.allow]).toEqual([path, 405, 'GET']);
    }
  });

  it('a route spelled otherwise (percent-escapes, an absolute URL) is that route: its stream, error shape, request id and usage', async () => {
    const metric = async (re: RegExp) => Number(re.exec((await svc.request('/metrics')).body)?.[1] ?? 0);
    const upstreamErrors = () => metric(/^tide_errors_total\{type="upstream_error"\} (\d+)$/m);
    const errorsBefore = await upstreamErrors();
    // A Responses stream ends at response.completed: no chat stream's [DONE] is looked for, nor an error added.
    for (const path of ['/v1/respons%65s', '/%761/responses']) {
      const stream = await readSse(`${svc.url}${path}`, { input: 'a b', stream: true });
      expect([path, stream.status, JSON.parse(stream.events.at(-1)!).type, stream.events.includes('[DONE]')]).toEqual([path, 200, 'response.completed', false]);
    }
    // The absolute form a server must take (RFC 9112 §3.2.2): vLLM gets the origin form.
    const absolute = await new Promise<{ status: number; body: string }>((resolve, reject) => {
      const req = request({ host: '127.0.0.1', port: new URL(svc.url).port, method: 'POST', path: `http://127.0.0.1/v1/respons%65s`, headers: { 'content-type': 'application/json' } }, (res) => {
        let body = '';
        res.on('data', (chunk: Buffer) => (body += chunk));
        res.on('end', () => resolve({ status: res.statusCode ?? 0, body }));
      });
      req.on('error', reject);
      req.end(JSON.stringify({ input: 'a b', stream: true }));
    });
    expect([absolute.status, absolute.body.includes('response.completed'), absolute.body.includes('[DONE]')]).toEqual([200, true, false]);
    expect(await upstreamErrors()).toBe(errorsBefore);
    // Errors in the route's shape, with the id the route gives: the header's on the OpenAI routes.
    const headers = { 'content-type': 'application/json', 'x-request-id': 'hdr-id' };
    for (const path of ['/tokeniz%65', '/%761/chat/completions']) {
      const bad = await svc.request(path, { method: 'POST', body: '{"request_id": "body-id", x', headers });
      expect([path, bad.status, bad.headers['x-request-id'], JSON.parse(bad.body).error.type]).toEqual([path, 400, 'hdr-id', 'BadRequestError']);
    }
    const simple = await svc.request('/v1/chat/completion%73', { method: 'POST', body: { prompt: 'a', max_tokens: 0 } });
    expect([simple.status, JSON.parse(simple.body).error?.type]).toEqual([400, 'invalid_request']);
    // Usage of a plain answer is counted.
    const promptTokens = () => metric(/^tide_prompt_tokens_total (\d+)$/m);
    const before = await promptTokens();
    const completion = await svc.json<{ usage: { prompt_tokens: number } }>('/v1/completion%73', post({ prompt: 'a b c', max_tokens: 2 }));
    expect(completion.status).toBe(200);
    expect(await promptTokens()).toBe(before + completion.body.usage.prompt_tokens);
  });

  it('a path or method no route takes is answered by the route, not by its body: a bad or oversized body does not turn a 404, 405 or 307 into a 400 or 413', async () => {
    const bodies = { good: '{}', bad: '{x', big: `{"a":"${'a'.repeat(1_100_000)}"}` }; // big: over web.body_limit (1 MiB)
    for (const [path, status] of [['/v1/nope', 404], ['/nope', 404], ['/v1/models', 405], ['/v1/chat/completions/', 307]] as const) {
      for (const [kind, body] of Object.entries(bodies)) {
        const res = await svc.request(path, { method: 'POST', body, headers: { 'content-type': 'application/json' } });
        expect([path, kind, res.status]).toEqual([path, kind, status]);
      }
    }
    // An OPTIONS that is no CORS preflight alike (the preflight route takes every path).
    for (const [path, status] of [['/nope', 404], ['/v1/chat/completions', 405]] as const) {
      const res = await svc.request(path, { method: 'OPTIONS', body: '{x', headers: { 'content-type': 'application/json' } });
      expect([path, res.status]).toEqual([path, status]);
    }
    expect((await svc.request('/v1/models')).status).toBe(200); // the service (and its connections) serve on
  });

  it('a client that said Connection: close and is still uploading a refused body gets its answer (404, 413), not a broken pipe', async () => {
    /** Sends the head, then the body in 16 KiB steps as the socket takes them, and only then reads the answer (as Python's http.client). */
    const upload = (path: string, size: number) =>
      new Promise<string>((resolve) => {
        const socket = connect(Number(new URL(svc.url).port), '127.0.0.1');
        let answer = '';
        socket.pause();
        socket.on('error', (err: NodeJS.ErrnoException) => resolve(`error ${err.code}`));
        socket.on('close', () => resolve(answer.split('\r\n')[0]));
        const read = () => {
          socket.on('data', (chunk: Buffer) => (answer += chunk.toString('latin1')));
          socket.resume();
        };
        socket.write(`POST ${path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: ${size}\r\n\r\n`);
        const step = Buffer.alloc(16 * 1024, 0x20);
        let sent = 0;
        const more = (): void => {
          while (sent < size) {
            const piece = step.subarray(0, Math.min(step.length, size - sent));
            sent += piece.length;
            if (!socket.write(piece)) return void socket.once('drain', more);
          }
          read();
        };
        more();
      });
    expect(await upload('/nope', 8_000_000)).toBe('HTTP/1.1 404 Not Found');
    expect(await upload('/chat/completions', 8_000_000)).toBe('HTTP/1.1 413 Payload Too Large');
  });

  it('relays tokenize/detokenize, and the 404 of routes the model does not serve', async () => {
    const tok = await svc.json<{ count: number; tokens: number[] }>('/tokenize', post({ model: 'sim-model', prompt: 'a b c' }));
    expect(tok.status).toBe(200);
    expect(tok.body.count).toBe(tok.body.tokens.length);
    const detok = await svc.json<{ prompt: string }>('/detokenize', post({ model: 'sim-model', tokens: tok.body.tokens }));
    expect(detok.status).toBe(200);
    expect(detok.body.prompt).toContain('a b c');
    for (const path of ['/v1/embeddings', '/v1/rerank', '/v1/score']) {
      const res = await svc.request(path, post({ model: 'sim-model', input: 'x' }));
      expect([path, res.status, JSON.parse(res.body)]).toEqual([path, 404, { detail: 'Not Found' }]);
    }
    // SGLang's /v1 spellings are no routes of vLLM's: tide-vllm's own 404, nothing sent to vLLM.
    for (const path of ['/v1/tokenize', '/v1/detokenize', '/v1/classify']) {
      const res = await svc.request(path, post({ model: 'sim-model', prompt: 'a' }));
      expect([path, res.status, JSON.parse(res.body).error.message]).toEqual([path, 404, `no route for POST ${path}`]);
    }
  });

  it("vLLM's other routes are not relayed: tide-vllm's own 404, nothing sent to vLLM", async () => {
    const paths = ['/v1/messages', '/v1/audio/transcriptions', '/v1/audio/translations', '/invocations', '/pooling', '/classify', '/rerank', '/score', '/v2/rerank'];
    for (const path of paths) {
      const res = await svc.request(path, post({ model: 'sim-model', messages: [{ role: 'user', content: 'hi' }], max_tokens: 2 }));
      expect([path, res.status, JSON.parse(res.body).error?.message]).toEqual([path, 404, `no route for POST ${path}`]);
    }
    // vLLM itself would have answered one of them (SageMaker's /invocations takes a chat body).
    const direct = await httpRequest(`http://127.0.0.1:${svc.vllmPort}/invocations`, post({ messages: [{ role: 'user', content: 'hi' }], max_tokens: 2 }));
    expect(direct.status).toBe(200);
    // vLLM logs every request in order: once a later one is in its log, none of those came before it.
    const marker = '"GET /v1/models HTTP/1.1"';
    const seen = count(vllmLog(svc), marker);
    expect((await svc.request('/v1/models')).status).toBe(200);
    await waitUntil(() => count(vllmLog(svc), marker) > seen, 3_000, 25, "a later request in vLLM's log");
    const log = vllmLog(svc);
    expect(paths.filter((path) => log.includes(`"POST ${path} HTTP/1.1"`))).toEqual(['/invocations']); // the direct one alone
    expect(count(log, '"POST /invocations HTTP/1.1"')).toBe(1);
  });

  it('relays SSE unbuffered, with the headers that keep proxies from buffering', async () => {
    const res = await readSse(`${svc.url}/v1/chat/completions`, {
      messages: [{ role: 'user', content: 'a b' }],
      stream: true,
    });
    expect(res.status).toBe(200);
    expect(res.headers['content-type']).toBe('text/event-stream; charset=utf-8');
    expect(res.headers['x-accel-buffering']).toBe('no');
    expect(res.headers['cache-control']).toBe('no-cache');
    expect(res.headers['content-encoding']).toBeUndefined();
    expect(res.events[0]).toContain('"role":"assistant"');
    expect(res.events[res.events.length - 1]).toBe('[DONE]');
  });
});

describe('time to first token of relayed streams', () => {
  afterAll(stopAllServices);

  it('is measured to the first token, on a Responses stream too (not to response.created, sent before prefill), not to a later event', async () => {
    const svc = await startService({ env: { VLLM_SIM_TTFT_MS: '300', VLLM_SIM_ITL_MS: '300' } });
    await readSse(`${svc.url}/v1/chat/completions`, { messages: [{ role: 'user', content: 'a b c' }], stream: true });
    await readSse(`${svc.url}/v1/responses`, { input: 'a b', stream: true });
    const body = (await svc.request('/metrics')).body;
    const seconds = (series: string) => Number(new RegExp(`^${series.replace(/[{}]/g, '\\$&')} (\\S+)$`, 'm').exec(body)?.[1]);
    for (const route of ['/v1/chat/completions', '/v1/responses']) {
      const sum = seconds(`tide_stream_time_to_first_token_seconds_sum{route="${route}"}`);
      expect([route, sum >= 0.29]).toEqual([route, true]);
    }
    // Three tokens, 300 ms apart: the stream went on for at least 600 ms after its first token.
    const ttft = seconds('tide_stream_time_to_first_token_seconds_sum{route="/v1/chat/completions"}');
    const whole = seconds('tide_http_request_duration_seconds_sum{route="/v1/chat/completions",method="POST"}');
    expect(whole - ttft).toBeGreaterThanOrEqual(0.5);
  });
});

describe('cancellation: a client that leaves aborts the generation in vLLM', () => {
  let svc: Service;

  beforeAll(async () => {
    svc = await startService({ env: { VLLM_SIM_ITL_MS: '100' } });
  });

  it('streaming (OpenAI relay and simple API)', async () => {
    const before = await vllmFinished(svc, 'abort');
    const relayed = await readSse(`${svc.url}/v1/chat/completions`, { messages: [{ role: 'user', content: 'w '.repeat(50) }], stream: true }, { stopAfterEvents: 3 });
    expect(relayed.disconnected).toBe(true);
    const simple = await readSse(`${svc.url}/chat/completions`, { prompt: 'w '.repeat(50), stream: true }, { stopAfterEvents: 2 });
    expect(simple.disconnected).toBe(true);
    await waitUntil(async () => (await vllmFinished(svc, 'abort')) === before + 2, 3_000, 50, 'two aborts in vLLM');
    expect(await vllmRunning(svc)).toBe(0);
    // They keep the 200 they were sent, and are counted as left by their client.
    const clientGone = async () => Number(/^tide_errors_total\{type="client_gone"\} (\d+)$/m.exec((await svc.request('/metrics')).body)?.[1] ?? 0);
    await waitUntil(async () => (await clientGone()) === 2, 3_000, 50, 'two streams counted as left by their client');
  });

  it('a Responses stream', async () => {
    const before = await vllmFinished(svc, 'abort');
    const relayed = await readSse(`${svc.url}/v1/responses`, { input: 'w '.repeat(50), stream: true }, { stopAfterEvents: 6 });
    expect(relayed.disconnected).toBe(true);
    await waitUntil(async () => (await vllmFinished(svc, 'abort')) === before + 1, 3_000, 50, 'an abort in vLLM');
    expect(await vllmRunning(svc)).toBe(0);
  });

  it('non-streaming (OpenAI relay and simple API)', async () => {
    const before = await vllmFinished(svc, 'abort');
    for (const [path, body] of [
      ['/v1/chat/completions', { messages: [{ role: 'user', content: 'w '.repeat(50) }] }],
      ['/chat/completions', { prompt: 'w '.repeat(50), request_id: 'gone-chat' }],
      ['/generate', { prompt: 'w '.repeat(50), request_id: 'gone-generate' }],
    ] as const) {
      const controller = new AbortController();
      const pending = httpRequest(svc.url + path, { method: 'POST', body, signal: controller.signal }).catch((e: Error) => e);
      await waitUntil(async () => (await vllmRunning(svc)) === 1, 3_000, 20, 'request running in vLLM');
      controller.abort();
      await pending;
    }
    await waitUntil(async () => (await vllmFinished(svc, 'abort')) === before + 3, 3_000, 50, 'three aborts in vLLM');
    expect(await vllmRunning(svc)).toBe(0);
    // A client that leaves is no bug of the service's: nothing is logged as an error (pino level 50).
    expect(svc.proc.output.filter((line) => line.includes('"level":50'))).toEqual([]);
    // Its access line names the request by the id the client gave it.
    for (const id of ['gone-chat', 'gone-generate']) {
      await waitUntil(() => svc.proc.output.some((line) => line.includes(`"request_id":"${id}"`) && line.includes('"error":"client_gone"')), 3_000, 20, `access line of ${id}`);
    }
  });
});

describe('failures inside a stream end it with an error event and [DONE]', () => {
  afterEach(stopAllServices);

  it('vLLM dying mid-stream (OpenAI relay)', async () => {
    const svc = await startService({ env: { VLLM_SIM_CRASH_MID_STREAM: '2', VLLM_SIM_CRASH_MID_STREAM_HARD: '1' } });
    const res = await readSse(`${svc.url}/v1/chat/completions`, { messages: [{ role: 'user', content: 'a b c d e f' }], stream: true });
    expect(res.status).toBe(200);
    expect(res.events[res.events.length - 1]).toBe('[DONE]');
    const error = JSON.parse(res.events[res.events.length - 2]) as { error: { type: string; code: number } };
    expect(error.error).toMatchObject({ type: 'InternalServerError', code: 502 });
    // vLLM's own format: json.dumps spacing
    expect(res.events[res.events.length - 2]).toMatch(/^\{"error": \{"message": /);
    expect(res.events.some((e) => e.includes('"finish_reason":"stop"'))).toBe(false);
    // Its access line keeps the 200 that was sent, but is an error's (pino level 50), with why.
    expect(await accessLine(svc, '/v1/chat/completions')).toMatchObject({
      level: 50,
      status: 200,
      error: 'upstream_error',
      error_message: 'vLLM closed the connection before its answer was complete',
    });
  });

  it('vLLM dying mid-stream (Responses API): an error event numbered after the events relayed, never response.completed', async () => {
    const svc = await startService({ env: { VLLM_SIM_CRASH_MID_STREAM: '2', VLLM_SIM_CRASH_MID_STREAM_HARD: '1' } });
    const res = await readSse(`${svc.url}/v1/responses`, { input: 'a b c d e f', stream: true });
    const events = res.events.map((e) => JSON.parse(e) as { type: string; sequence_number: number; code?: string });
    expect(events.map((e) => e.sequence_number)).toEqual(events.map((_, i) => i));
    const message = 'vLLM closed the connection before its answer was complete';
    expect(events.at(-1)).toEqual({ type: 'error', code: 'InternalServerError', message, param: null, sequence_number: events.length - 1, error: { message, type: 'InternalServerError', param: null, code: 502 } });
    expect(events.some((e) => e.type === 'response.output_text.delta')).toBe(true);
    expect(events.some((e) => e.type === 'response.completed')).toBe(false);
    expect(res.events).not.toContain('[DONE]');
  });

  it("vLLM failing a Responses stream midway (it drops the connection): the openai SDK's iteration throws, it does not end as if whole", async () => {
    const svc = await startService({ env: { VLLM_SIM_CRASH_MID_STREAM: '2' } });
    const client = new OpenAI({ baseURL: `${svc.url}/v1`, apiKey: 'unused', maxRetries: 0, timeout: 10_000 });
    const stream = await client.responses.create({ model: 'sim-model', input: 'a b c d e f', stream: true });
    const types: string[] = [];
    const iterate = async () => {
      for await (const event of stream) types.push(event.type);
    };
    const error = await iterate().then(() => null, (e: unknown) => e);
    expect(error).toBeInstanceOf(OpenAI.APIError);
    expect((error as Error).message).toContain('vLLM closed the connection before its answer was complete');
    expect(types).toContain('response.output_text.delta');
    expect(types).not.toContain('response.completed');
  });

  it('vLLM dying mid-stream (simple API)', async () => {
    const svc = await startService({ env: { VLLM_SIM_CRASH_MID_STREAM: '2', VLLM_SIM_CRASH_MID_STREAM_HARD: '1' } });
    const res = await readSse(`${svc.url}/chat/completions`, { prompt: 'a b c d e f', stream: true });
    expect(res.events[res.events.length - 1]).toBe('[DONE]');
    const last = JSON.parse(res.events[res.events.length - 2]) as { content: null; error: { type: string } };
    expect(last.content).toBeNull();
    expect(last.error.type).toBe('upstream_error');
    expect(await accessLine(svc, '/chat/completions')).toMatchObject({ level: 50, status: 200, error: 'upstream_error', error_message: expect.stringContaining('vLLM') });
  });

  it("a second SIGTERM cuts a stream: the event's type names its code (503), on both APIs", async () => {
    const svc = await startService({ config: { logging: { level: 'info' } }, env: { VLLM_SIM_ITL_MS: '200' } });
    const words = 'a b c d e f g h i j k l m n o p q r s t'; // 4 s of tokens
    const streams = [
      readSse(`${svc.url}/v1/chat/completions`, { messages: [{ role: 'user', content: words }], stream: true }),
      readSse(`${svc.url}/chat/completions`, { prompt: words, stream: true }),
    ];
    await svc.waitInFlight(2); // both under way
    svc.proc.kill('SIGTERM'); // drains
    await waitUntil(() => svc.proc.output.some((l) => l.includes('shutting down (SIGTERM received')), 5_000, 20, 'the first SIGTERM taken');
    await sleep(1_500); // a repeat within a second of it is the same signal delivered twice (npm's forwarded copy)
    svc.proc.kill('SIGTERM'); // skips the drain: what is in flight is cut
    const [openai, simple] = await Promise.all(streams);
    for (const res of [openai, simple]) expect(res.events[res.events.length - 1]).toBe('[DONE]');
    expect(JSON.parse(openai.events[openai.events.length - 2])).toEqual({
      error: { message: 'the service shut down before the answer was complete', type: 'ServiceUnavailableError', param: null, code: 503 },
    });
    expect(JSON.parse(simple.events[simple.events.length - 2]).error).toEqual({ type: 'shutting_down', message: 'the service shut down before the answer was complete' });
    expect(await svc.proc.waitForExit(15_000)).toEqual({ code: 0, signal: null });
  });

  it('vllm.timeout passing between two events', async () => {
    // 0.5 s timeout, cut off within 2 s, while the next event would come only after 6 s.
    const svc = await startService({ config: { vllm: { timeout: 0.5 } }, env: { VLLM_SIM_ITL_MS: '6000' } });
    for (const [path, body] of [
      ['/v1/chat/completions', { messages: [{ role: 'user', content: 'a b c' }], stream: true }],
      ['/chat/completions', { prompt: 'a b c', stream: true }],
    ] as const) {
      const t0 = Date.now();
      const res = await readSse(svc.url + path, body);
      expect(Date.now() - t0).toBeLessThan(2_000);
      expect(res.events[res.events.length - 1]).toBe('[DONE]');
      expect(res.events[res.events.length - 2]).toMatch(/timeout|did not answer|sent nothing/i);
    }
    await sleep(10);
  });
});

describe('a client too slow sending its request', () => {
  afterEach(stopAllServices);

  it("408 in OpenAI's shape with its request id, then the connection closed (the relay answered before Fastify)", async () => {
    const svc = await startService({ config: { web: { client_timeout: 1 } } });
    const { head, body, closed } = await sendPartial(
      svc.port,
      'POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Request-Id: slow-2\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"mess',
    );
    expect(closed).toBe(true);
    expect(head).toEqual(expect.arrayContaining(['HTTP/1.1 408 Request Timeout', 'x-request-id: slow-2', 'connection: close']));
    expect(JSON.parse(body)).toEqual({ error: { message: expect.stringContaining('web.client_timeout'), type: 'RequestTimeoutError', param: null, code: 408 } });
  });
});

describe("the client's W3C trace context", () => {
  // vLLM without --otlp-traces-endpoint warns, once, of a request that carries trace headers: proof they reached it.
  const warning = 'Received a request with trace context but tracing is disabled';
  const chat = { messages: [{ role: 'user', content: 'hi' }], max_tokens: 1 };
  const parent = '00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01';
  const paths = ['/v1/chat/completions', '/v1/chat/completions?trace=1']; // the relay's fast path, and Fastify's route

  it('is passed on to vLLM on both ways through; a malformed one is dropped', async () => {
    const svc = await startService();
    for (const path of paths) {
      const malformed: Record<string, string>[] = [{ traceparent: parent.toUpperCase(), tracestate: 'a=1' }, { traceparent: `${parent}-01` }, { tracestate: 'a=1' }];
      for (const headers of malformed) {
        const answered = count(vllmLog(svc), '"POST /v1/chat/completions');
        expect([path, headers, (await svc.request(path, post(chat, headers))).status]).toEqual([path, headers, 200]);
        // vLLM's access line comes after any warning it logged for the request, on the same stream.
        await waitUntil(() => count(vllmLog(svc), '"POST /v1/chat/completions') > answered, 3_000, 25, "the request's access line");
      }
    }
    expect(vllmLog(svc)).not.toContain(warning);
    for (const path of paths) {
      const fresh = path === paths[0] ? svc : await startService();
      expect((await fresh.request(path, post(chat, { traceparent: parent, tracestate: 'a=1' }))).status).toBe(200);
      await logged(fresh, warning);
    }
  });

  it('is passed on from the simple API and /generate too (tide-vllm writes those requests), whole and streamed', async () => {
    const ways: Array<[string, Record<string, unknown>]> = [
      ['/chat/completions', { prompt: 'hi', max_tokens: 1 }], // VLLMClient (axios)
      ['/chat/completions', { prompt: 'hi', max_tokens: 1, stream: true }], // the relay, re-framed
      ['/generate', { prompt: 'hi', history_input: ['a'], history_output: ['b'], max_tokens: 1 }],
    ];
    await Promise.all(
      ways.map(async ([path, body]) => {
        const fresh = await startService();
        expect((await fresh.request(path, post(body, { traceparent: parent, tracestate: 'a=1' }))).status).toBe(200);
        await logged(fresh, warning);
      }),
    );
  });
});

describe('/generate', () => {
  let svc: Service;

  beforeAll(async () => {
    svc = await startService();
  });

  it('answers a conversation built from history pairs, in the simple envelope', async () => {
    const res = await svc.json<{ content: string; finish_reason: string; usage: { prompt_tokens: number } }>(
      '/generate',
      post({ prompt: 'last question', system_info: 'sys', history_input: ['q1 words', 'q2'], history_output: ['a1', 'a2'] }),
    );
    expect(res.status).toBe(200);
    expect(res.body.content).toBe('last question');
    const short = await svc.json<{ usage: { prompt_tokens: number } }>('/generate', post({ prompt: 'last question', system_info: 'sys' }));
    expect(res.body.usage.prompt_tokens).toBeGreaterThan(short.body.usage.prompt_tokens);
  });

  it('streams like the simple API', async () => {
    const res = await readSse(`${svc.url}/generate`, { prompt: 'x y', stream: true, history_input: ['a'], history_output: ['b'] });
    expect(res.events[res.events.length - 1]).toBe('[DONE]');
    expect(res.events.slice(0, -1).map((e) => (JSON.parse(e) as { content: string }).content).join('')).toBe('x y');
  });

  it('400 when the history lists differ in length', async () => {
    const res = await svc.json<{ error: { message: string } }>('/generate', post({ prompt: 'x', history_input: ['a', 'b'], history_output: ['c'] }));
    expect(res.status).toBe(400);
    expect(res.body.error.message).toBe('history_input and history_output must have the same length (got 2 and 1)');
  });
});
