/**
 * Access control, hostile input and overload, against the real service: keys on every route,
 * thousands of generated malformed bodies, slow and oversized clients, the concurrency limit,
 * and metrics that match a known sequence of requests exactly.
 */
import { readFileSync } from 'node:fs';
import { Agent, request as httpRaw } from 'node:http';
import { connect } from 'node:net';
import * as fc from 'fast-check';
import { runCli } from '../src/cli';
import { type Service, post, startService, stopAllServices } from './service';
import { httpRequest, killAll, readSse, sleep, waitUntil } from './harness';

afterAll(async () => {
  await stopAllServices();
  await killAll();
});

const API_KEY = 'test-api-key-123';
const ADMIN_KEY = 'test-admin-key-456';

/** Every API route with a body that would succeed given the right key. */
const API_ROUTES: Array<[string, string, unknown]> = [
  ['POST', '/chat/completions', { prompt: 'hi' }],
  ['POST', '/v1/chat/completions', { messages: [{ role: 'user', content: 'hi' }] }],
  ['POST', '/v1/chat/completions', { prompt: 'hi' }],
  ['POST', '/v1/completions', { prompt: 'hi', max_tokens: 2 }],
  ['GET', '/v1/models', undefined],
  ['POST', '/generate', { prompt: 'hi' }],
  ['POST', '/tokenize', { prompt: 'hi' }],
  ['POST', '/detokenize', { tokens: [1, 2] }],
];

describe('API keys', () => {
  let svc: Service;

  beforeAll(async () => {
    // The keys also in tide-vllm's environment, as `${TIDE_API_KEY}` in the configuration puts them there.
    svc = await startService({
      // API_KEY made of a variable (`test-${KEY_PART}`): KEY_PART must not reach vLLM either; a value that merely occurs in a key may.
      config: { auth: { api_keys: ['test-${KEY_PART}', 'second-key'], admin_api_keys: [ADMIN_KEY] } },
      env: { TIDE_API_KEY: API_KEY, TIDE_ADMIN_KEY: ADMIN_KEY, KEY_PART: API_KEY.slice('test-'.length), INNOCENT: 'api-key' },
    });
  });

  const call = (method: string, path: string, body: unknown, headers: Record<string, string> = {}) =>
    svc.request(path, { method, body, headers });

  it.each(API_ROUTES)('%s %s: 401 without a key or with a wrong one, 200 with a right one', async (method, path, body) => {
    const none = await call(method, path, body);
    expect(none.status).toBe(401);
    expect(none.headers['www-authenticate']).toBe('Bearer');
    const wrong = await call(method, path, body, { authorization: 'Bearer nope' });
    expect(wrong.status).toBe(401);
    const admin = await call(method, path, body, { authorization: `Bearer ${ADMIN_KEY}` });
    expect(admin.status).toBe(401); // an admin key is not an API key
    expect((await call(method, path, body, { authorization: `Bearer ${API_KEY}` })).status).toBe(200);
    expect((await call(method, path, body, { authorization: 'bearer second-key' })).status).toBe(200);
    expect((await call(method, path, body, { 'x-api-key': API_KEY })).status).toBe(200);
  });

  it('refuses in the simple envelope on the simple API and in OpenAI shape on /v1', async () => {
    const simple = JSON.parse((await call('POST', '/chat/completions', { prompt: 'x' })).body);
    expect(simple).toMatchObject({ content: null, error: { type: 'unauthorized', message: expect.stringContaining('API key is required') } });
    const openai = JSON.parse((await call('POST', '/v1/chat/completions', { messages: [] }, { authorization: 'Bearer bad' })).body);
    expect(openai).toEqual({ error: { message: 'the API key is not valid', type: 'AuthenticationError', param: null, code: 401 } });
  });

  it('admin routes take the admin key only, however their path is spelled', async () => {
    // Fastify decodes the path before routing: each spelling reaches the admin controller.
    for (const path of ['/admin/status', '/%61dmin/status', '/admin/%73tatus', '/%61%64%6D%69%6E/status']) {
      expect([path, (await call('GET', path, undefined)).status]).toEqual([path, 401]);
      expect([path, (await call('GET', path, undefined, { authorization: `Bearer ${API_KEY}` })).status]).toEqual([path, 401]);
      expect([path, (await call('GET', path, undefined, { authorization: `Bearer ${ADMIN_KEY}` })).status]).toEqual([path, 200]);
    }
    expect((await call('POST', '/%61dmin/sleep?level=1', undefined, { authorization: `Bearer ${API_KEY}` })).status).toBe(401);
    // A method no admin route takes is judged on the decoded path too: the admin key first, then the 405.
    expect((await call('GET', '/%61dmin/restart', undefined, { authorization: `Bearer ${API_KEY}` })).status).toBe(401);
    expect((await call('GET', '/%61dmin/restart', undefined, { authorization: `Bearer ${ADMIN_KEY}` })).status).toBe(405);
  });

  it('refuses admin requests from web pages of another origin, with the admin key or without (403)', async () => {
    const admin = { authorization: `Bearer ${ADMIN_KEY}` };
    const forged = await call('POST', '/admin/sleep?level=3', undefined, { ...admin, origin: 'http://evil.example' });
    expect([forged.status, JSON.parse(forged.body).error]).toEqual([
      403,
      { type: 'forbidden', message: 'the admin API takes no requests from web pages of another origin (Origin: http://evil.example)' },
    ]);
    expect((await call('POST', '/admin/restart', undefined, { 'sec-fetch-site': 'cross-site' })).status).toBe(403);
    expect((await call('GET', '/admin/status', undefined, admin)).body).toContain('"state":"ready"'); // never put to sleep
    const sameOrigin = await call('GET', '/admin/status', undefined, { ...admin, origin: `http://127.0.0.1:${svc.port}`, 'sec-fetch-site': 'same-origin' });
    expect(sameOrigin.status).toBe(200);
  });

  it('says on the admin API that it is an admin key that is missing, or that the key given is not one', async () => {
    const refusal = async (headers: Record<string, string>) => JSON.parse((await call('POST', '/admin/restart', undefined, headers)).body) as unknown;
    expect(await refusal({})).toEqual({ error: { type: 'unauthorized', message: 'an admin key is required (auth.admin_api_keys; Authorization: Bearer KEY)' } });
    for (const key of [API_KEY, 'nope']) {
      expect(await refusal({ authorization: `Bearer ${key}` })).toEqual({ error: { type: 'unauthorized', message: 'this key is not an admin key' } });
    }
    // The CLI passes the message on, and says where it takes its key.
    const cli = async (argv: string[], env: NodeJS.ProcessEnv) => {
      const err: string[] = [];
      const code = await runCli([...argv, '--url', svc.url], env, { out: () => undefined, err: (t) => err.push(t) });
      return { code, err: err.join('\n') };
    };
    const noKey = await cli(['status'], {});
    expect(noKey.code).toBe(1);
    expect(noKey.err).toContain('401: an admin key is required (auth.admin_api_keys; Authorization: Bearer KEY)');
    expect(noKey.err).toContain('pass --key KEY or set TIDE_VLLM_ADMIN_KEY');
    const clientKey = await cli(['status'], { TIDE_VLLM_ADMIN_KEY: API_KEY });
    expect(clientKey.err).toContain('401: this key is not an admin key');
    expect(clientKey.err).toContain('the key from TIDE_VLLM_ADMIN_KEY was refused');
    expect((await cli(['status', '--key', ADMIN_KEY], {})).code).toBe(0);
    expect((await cli(['health'], {})).code).toBe(0); // /health needs no key: Docker's HEALTHCHECK runs it
  });

  it('only a CORS preflight goes without a key: any other OPTIONS needs one, so no route is shown to a client without it', async () => {
    const preflight = await call('OPTIONS', '/admin/restart', undefined, { origin: 'https://a.example', 'access-control-request-method': 'POST' });
    expect(preflight.status).toBe(400); // answered (never for /admin), without a key
    expect(preflight.headers['access-control-allow-origin']).toBeUndefined(); // nor marked readable by the page
    for (const path of ['/admin/restart', '/v1/chat/completions', '/nope']) {
      expect([path, (await call('OPTIONS', path, undefined)).status]).toEqual([path, 401]);
    }
    const keyed = await call('OPTIONS', '/v1/chat/completions', undefined, { authorization: `Bearer ${API_KEY}` });
    expect([keyed.status, keyed.headers.allow]).toEqual([405, 'POST']);
  });

  it('/health, /ready, /metrics and the API docs stay open', async () => {
    for (const path of ['/health', '/ready', '/metrics', '/openapi.json', '/docs', '/docs/']) {
      expect([path, (await call('GET', path, undefined)).status]).toEqual([path, 200]);
    }
  });

  it('vLLM gets a fresh random key that only tide-vllm knows, in its environment, not its argv', async () => {
    const status = JSON.parse((await call('GET', '/admin/status', undefined, { authorization: `Bearer ${ADMIN_KEY}` })).body);
    expect(status.argv).not.toContain('--api-key');
    // argv is readable by every local user (/proc/PID/cmdline), the environment by the owner only.
    const cmdline = readFileSync(`/proc/${status.pid}/cmdline`, 'utf8').split('\0');
    expect(cmdline).not.toContain('--api-key');
    const environ = readFileSync(`/proc/${status.pid}/environ`, 'utf8').split('\0');
    const key = environ.find((v) => v.startsWith('VLLM_API_KEY='));
    expect(key).toMatch(/^VLLM_API_KEY=[0-9a-f]{48}$/);
    // tide-vllm's own keys stay with tide-vllm: no variable of vLLM's holds one.
    expect(environ.filter((v) => v.endsWith(`=${API_KEY}`) || v.endsWith(`=${ADMIN_KEY}`))).toEqual([]);
    expect(environ.filter((v) => v.startsWith('KEY_PART='))).toEqual([]);
    expect(environ).toContain('INNOCENT=api-key');
    expect(key).not.toContain(API_KEY);
    const direct = await httpRequest(`http://127.0.0.1:${svc.vllmPort}/v1/models`);
    expect(direct.status).toBe(401);
    const direct2 = await httpRequest(`http://127.0.0.1:${svc.vllmPort}/v1/models`, { headers: { authorization: `Bearer ${API_KEY}` } });
    expect(direct2.status).toBe(401);
  });
});

describe('CORS, as vLLM serves it (--allowed-origins)', () => {
  const preflight = (svc: Service, path: string, origin: string) =>
    svc.request(path, { method: 'OPTIONS', headers: { origin, 'access-control-request-method': 'POST', 'access-control-request-headers': 'authorization,content-type' } });

  it('any origin by default: preflights answered without a key, every answer readable, the relay before Fastify too', async () => {
    const svc = await startService({ config: { auth: { api_keys: [API_KEY] } } });
    const origin = 'https://app.example.com';
    for (const path of ['/v1/chat/completions', '/chat/completions']) {
      const answer = await preflight(svc, path, origin);
      expect([path, answer.status, answer.body]).toEqual([path, 200, 'OK']);
      expect(answer.headers).toMatchObject({ 'access-control-allow-origin': '*', 'access-control-allow-methods': expect.stringContaining('POST'), 'access-control-allow-headers': 'authorization,content-type' });
    }
    const auth = { origin, authorization: `Bearer ${API_KEY}` };
    const relayed = await svc.request('/v1/chat/completions', { method: 'POST', body: { messages: [{ role: 'user', content: 'hi' }] }, headers: auth });
    const simple = await svc.request('/chat/completions', { method: 'POST', body: { prompt: 'hi' }, headers: auth });
    const refused = await svc.request('/v1/models', { headers: { origin } });
    const health = await svc.request('/health', { headers: { origin } });
    expect([relayed, simple, refused, health].map((r) => [r.status, r.headers['access-control-allow-origin']])).toEqual([
      [200, '*'],
      [200, '*'],
      [401, '*'],
      [200, '*'],
    ]);
    expect((await svc.request('/v1/models', { headers: { authorization: `Bearer ${API_KEY}` } })).headers['access-control-allow-origin']).toBeUndefined(); // no Origin, no CORS
    // Never the admin API, however it is spelled: no web page is to restart vLLM or load adapters.
    for (const path of ['/admin/lora', '/%61dmin/restart']) {
      const refused = await preflight(svc, path, origin);
      expect([path, refused.status, refused.headers['access-control-allow-origin']]).toEqual([path, 400, undefined]);
    }
    expect((await svc.request('/admin/status', { headers: { origin } })).headers['access-control-allow-origin']).toBeUndefined();
    // A URL the router refuses (bad percent-encoding) is answered before routing: readable too, but never on the admin API.
    const badUrls = await Promise.all(['/v1/chat/%zz', '/%61dmin/lora/%zz'].map((path) => svc.request(path, { headers: { origin } })));
    expect(badUrls.map((r) => [r.status, r.headers['access-control-allow-origin']])).toEqual([
      [400, '*'],
      [400, undefined],
    ]);
    // No Origin: an OPTIONS request like any other, which takes a key.
    const notPreflight = await svc.request('/v1/models', { method: 'OPTIONS', headers: { authorization: `Bearer ${API_KEY}` } });
    expect([notPreflight.status, notPreflight.headers.allow]).toEqual([405, 'GET']); // as vLLM: its GET routes take no HEAD
    await svc.stop();
  });

  it('listed origins only: the origin echoed with Vary, others get no header and a refused preflight; [] turns CORS off', async () => {
    const svc = await startService({ config: { web: { cors_allowed_origins: ['https://A.example'] } } }); // scheme and host: any case
    const allowed = await svc.request('/v1/models', { headers: { origin: 'https://a.example' } });
    expect([allowed.headers['access-control-allow-origin'], allowed.headers.vary]).toEqual(['https://a.example', 'Origin']);
    expect((await svc.request('/v1/models', { headers: { origin: 'https://b.example' } })).headers['access-control-allow-origin']).toBeUndefined();
    expect((await preflight(svc, '/v1/models', 'https://a.example')).status).toBe(200);
    const other = await preflight(svc, '/v1/models', 'https://b.example');
    expect([other.status, other.body, other.headers['access-control-allow-origin']]).toEqual([400, 'Disallowed CORS origin', undefined]);
    await svc.stop();
    const off = await startService({ config: { web: { cors_allowed_origins: [] } } });
    expect((await off.request('/v1/models', { headers: { origin: 'https://a.example' } })).headers['access-control-allow-origin']).toBeUndefined();
    expect((await preflight(off, '/v1/models', 'https://a.example')).status).toBe(405); // no OPTIONS route at all
    expect((await preflight(off, '/admin/restart', 'https://a.example')).status).toBe(403); // nor a CORS route to leave /admin to
    await off.stop();
  });
});

describe('admin keys alone', () => {
  it('guard the admin API, however its path is spelled, leave the API open, and still give vLLM a key of its own', async () => {
    const svc = await startService({ config: { auth: { admin_api_keys: [ADMIN_KEY] } } });
    for (const path of ['/admin/status', '/%61dmin/status']) expect([path, (await svc.request(path)).status]).toEqual([path, 401]);
    expect(JSON.parse((await svc.request('/admin/status')).body).error.message).toBe('an admin key is required (auth.admin_api_keys; Authorization: Bearer KEY)');
    expect((await svc.request('/v1/models')).status).toBe(200);
    const status = JSON.parse((await svc.request('/admin/status', { headers: { authorization: `Bearer ${ADMIN_KEY}` } })).body);
    expect(readFileSync(`/proc/${status.pid}/environ`, 'utf8').split('\0')).toContainEqual(expect.stringMatching(/^VLLM_API_KEY=[0-9a-f]{48}$/));
    expect((await httpRequest(`http://127.0.0.1:${svc.vllmPort}/v1/models`)).status).toBe(401);
    await svc.stop();
  });
});

describe('protect_metrics', () => {
  it('puts /metrics behind the API key', async () => {
    const svc = await startService({ config: { auth: { api_keys: [API_KEY], protect_metrics: true } } });
    expect((await svc.request('/metrics')).status).toBe(401);
    expect((await svc.request('/%6Detrics')).status).toBe(401);
    expect((await svc.request('/metrics', { headers: { authorization: `Bearer ${API_KEY}` } })).status).toBe(200);
    expect((await svc.request('/health')).status).toBe(200);
    await svc.stop();
  });

  it('puts /metrics behind the admin key when only admin keys are set', async () => {
    const svc = await startService({ config: { auth: { admin_api_keys: [ADMIN_KEY], protect_metrics: true } } });
    expect((await svc.request('/metrics')).status).toBe(401);
    expect((await svc.request('/metrics', { headers: { authorization: `Bearer ${ADMIN_KEY}` } })).status).toBe(200);
    expect((await svc.request('/v1/models')).status).toBe(200); // the API stays open without API keys
    await svc.stop();
  });
});

describe('hostile input', () => {
  let svc: Service;

  beforeAll(async () => {
    svc = await startService({ config: { web: { client_timeout: 1 } } });
  });

  const POST_ROUTES = ['/chat/completions', '/v1/chat/completions', '/v1/completions', '/generate', '/tokenize', '/detokenize', '/admin/lora'];

  /** JSON values that are wrong in every way a client can get them wrong. */
  const anyJson = fc.oneof(
    fc.jsonValue(),
    fc.record({
      prompt: fc.oneof(fc.string(), fc.integer(), fc.constant(null), fc.array(fc.string())),
      temperature: fc.oneof(fc.double(), fc.string(), fc.constant(null)),
      top_p: fc.oneof(fc.double(), fc.boolean()),
      max_tokens: fc.oneof(fc.integer(), fc.double(), fc.string()),
      stream: fc.oneof(fc.boolean(), fc.string()),
      messages: fc.oneof(fc.jsonValue(), fc.array(fc.record({ role: fc.string(), content: fc.jsonValue() }))),
    }, { requiredKeys: [] }),
  );

  it('thousands of generated malformed bodies on every POST route get a 4xx JSON answer (or a 200), never a 5xx', async () => {
    let sent = 0;
    await fc.assert(
      fc.asyncProperty(fc.constantFrom(...POST_ROUTES), anyJson, fc.boolean(), async (path, value, asText) => {
        const body = asText ? JSON.stringify(value).slice(0, -1) || '{' : value; // sometimes truncated JSON
        const res = await svc.request(path, { method: 'POST', body: typeof body === 'string' ? body : JSON.stringify(body), headers: { 'content-type': 'application/json' } });
        sent += 1;
        expect(res.status).toBeLessThan(500);
        if (res.status !== 200 || !res.headers['content-type']?.startsWith('text/event-stream')) {
          expect(() => JSON.parse(res.body)).not.toThrow();
        }
        expect(res.body).not.toMatch(/\n\s+at |node_modules/);
      }),
      { numRuns: 2_100, seed: 20261121 },
    );
    expect(sent).toBeGreaterThanOrEqual(2_000);
    expect((await svc.request('/health')).status).toBe(200);
  }, 120_000);

  it('deeply nested JSON is a 4xx, and the service keeps serving', async () => {
    const deep = '{"prompt":' + '['.repeat(100_000) + ']'.repeat(100_000) + '}';
    const res = await svc.request('/chat/completions', { method: 'POST', body: deep, headers: { 'content-type': 'application/json' } });
    expect(res.status).toBeGreaterThanOrEqual(400);
    expect(res.status).toBeLessThan(500);
    expect((await svc.json('/chat/completions', post({ prompt: 'still here' }))).body).toMatchObject({ content: 'still here' });
  });

  it('oversized headers are refused with 431, counted in tide_errors_total though no request was read', async () => {
    const refused = async () => Number(/^tide_errors_total\{type="request_headers_too_large"\} (\d+)$/m.exec((await svc.request('/metrics')).body)?.[1] ?? 0);
    const before = await refused();
    const res = await svc.request('/health', { headers: { 'x-big': 'a'.repeat(20_000) } });
    expect(res.status).toBe(431);
    expect((await svc.request('/health')).status).toBe(200);
    expect(await refused()).toBe(before + 1);
    // (No gauge named like a counter: prom-client's *_total gauges of active handles are left out.)
    expect((await svc.request('/metrics')).body).not.toMatch(/^# TYPE tide_\S+_total gauge$/m);
  });

  it('a prompt over web.max_prompt_chars is a 400 on both APIs', async () => {
    const long = 'x'.repeat(1_000_001);
    const simple = await svc.json<{ error: { message: string } }>('/chat/completions', post({ prompt: long }));
    expect(simple.status).toBe(400);
    expect(simple.body.error.message).toContain('web.max_prompt_chars');
    const openai = await svc.json<{ error: { message: string; param: string } }>('/v1/chat/completions', post({ messages: [{ role: 'user', content: long }] }));
    expect(openai.status).toBe(400);
    expect(openai.body.error).toMatchObject({ param: 'messages', message: expect.stringContaining('web.max_prompt_chars') });
    // `param` names the route's own field (the SDKs show it).
    for (const [path, body, param] of [
      ['/v1/completions', { prompt: long }, 'prompt'],
      ['/v1/embeddings', { input: long }, 'input'],
      ['/v1/rerank', { query: 'q', documents: [long] }, null],
    ] as const) {
      const res = await svc.json<{ error: { param: string | null } }>(path, post(body));
      expect([path, res.status, res.body.error.param]).toEqual([path, 400, param]);
    }
  });

  it('a 413 for a body declared far too large closes the connection at once; a modest excess is read and dropped', async () => {
    // Its own service, whose web.client_timeout (10 s) is far from "at once".
    const own = await startService({ config: { web: { client_timeout: 10 } } });
    for (const path of ['/v1/chat/completions', '/chat/completions']) {
      const socket = connect(own.port, '127.0.0.1');
      socket.on('error', () => undefined);
      const received: Buffer[] = [];
      socket.on('data', (d) => received.push(d));
      const closed = new Promise<number>((resolve) => socket.on('close', () => resolve(Date.now())));
      socket.write(`POST ${path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 900000000\r\n\r\n{"prompt": "`);
      const at = await Promise.race([closed, sleep(5_000).then(() => 0)]);
      const answer = Buffer.concat(received).toString();
      expect([path, answer.split('\r\n')[0]]).toEqual([path, 'HTTP/1.1 413 Payload Too Large']);
      expect(answer).toMatch(/\r\nconnection: close\r\n/i);
      expect(at).toBeGreaterThan(0); // closed, not the 5 s fallback: not left to web.client_timeout (10 s)
    }
    // 1.1 MB against a 1 MB limit: the client can finish sending and read its 413 on a live connection.
    const agent = new Agent({ keepAlive: true });
    const answer = await new Promise<[number | undefined, string | undefined]>((resolve, reject) => {
      const req = httpRaw(`${own.url}/v1/chat/completions`, { method: 'POST', agent, headers: { 'content-type': 'application/json' } }, (res) => {
        res.resume();
        res.on('end', () => resolve([res.statusCode, res.headers.connection]));
      });
      req.on('error', reject);
      req.end(JSON.stringify({ messages: [{ role: 'user', content: 'x'.repeat(1_100_000) }] }));
    });
    agent.destroy();
    expect(answer).toEqual([413, 'keep-alive']);
    await own.stop();
  });

  it('Expect: 100-continue: a body declared over web.body_limit is answered 413 without being invited; a body within it is invited', async () => {
    const firstLine = async (length: number) => {
      const socket = connect(svc.port, '127.0.0.1');
      socket.on('error', () => undefined);
      const line = new Promise<string>((resolve) => socket.once('data', (d: Buffer) => resolve(d.toString().split('\r\n')[0])));
      socket.write(`POST /chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: ${length}\r\nExpect: 100-continue\r\n\r\n`);
      const answer = await Promise.race([line, sleep(3_000).then(() => 'no answer')]);
      socket.destroy();
      return answer;
    };
    expect(await firstLine(2_000_000)).toBe('HTTP/1.1 413 Payload Too Large'); // curl's 2 MB upload: nothing sent in vain
    expect(await firstLine(20)).toBe('HTTP/1.1 100 Continue');
  });

  it('keeps idle connections 65 s, longer than load balancers do, so none is reused as it closes', async () => {
    const agent = new Agent({ keepAlive: true });
    const keepAlive = await new Promise<string | undefined>((resolve, reject) => {
      httpRaw(`${svc.url}/health`, { agent }, (res) => {
        res.resume();
        res.on('end', () => resolve(String(res.headers['keep-alive'])));
      })
        .on('error', reject)
        .end();
    });
    agent.destroy();
    expect(keepAlive).toBe('timeout=65');
  });

  it('a request refused while its body still comes gets one answer: no 408 later, as if for a next request', async () => {
    const socket = connect(svc.port, '127.0.0.1');
    socket.on('error', () => undefined);
    const received: Buffer[] = [];
    socket.on('data', (d) => received.push(d));
    const closed = new Promise<boolean>((resolve) => socket.on('close', () => resolve(true)));
    // Refused at once for its type (vLLM's 400), before its body is read.
    socket.write('POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\nContent-Length: 1000\r\n\r\n{');
    for (let i = 0; i < 8 && !socket.destroyed; i++) {
      await sleep(300); // trickled past web.client_timeout (1 s)
      socket.write(' ');
    }
    expect(await Promise.race([closed, sleep(3_000).then(() => false)])).toBe(true);
    const statusLines = Buffer.concat(received).toString().match(/HTTP\/1\.1 \d{3} [^\r]*/g); // (an answer right after a body: no line break before it)
    expect(statusLines).toEqual(['HTTP/1.1 400 Bad Request']);
  });

  it('bodies sent a byte per chunk cost memory in proportion to their bytes, not one buffer per byte', async () => {
    const heap = async () => Number(/^tide_nodejs_heap_size_used_bytes (\S+)$/m.exec((await svc.request('/metrics')).body)?.[1]);
    const before = await heap();
    // 8 bodies of 150,000 one-byte chunks, never ended: held whole while they come (web.body_limit is 1 MiB).
    const oneByteChunks = Buffer.from('1\r\n \r\n'.repeat(150_000));
    const sockets = ['/v1/completions', '/chat/completions'].flatMap((path) =>
      Array.from({ length: 4 }, () => {
        const socket = connect(svc.port, '127.0.0.1');
        socket.on('error', () => undefined);
        socket.write(`POST ${path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n1\r\n{\r\n`);
        socket.write(oneByteChunks);
        return socket;
      }),
    );
    try {
      await sleep(700); // read (within web.client_timeout: 1 s)
      // A Buffer per chunk would hold about 200 bytes of heap per byte: some 240 MB here.
      expect((await heap()) - before).toBeLessThan(60 * 1024 * 1024);
    } finally {
      for (const socket of sockets) socket.destroy();
    }
    expect((await svc.request('/health')).status).toBe(200);
  });

  it('a slow client is cut off after web.client_timeout', async () => {
    const socket = connect(svc.port, '127.0.0.1');
    const closed = new Promise<number>((resolve) => socket.on('close', () => resolve(Date.now())));
    socket.on('error', () => undefined);
    const t0 = Date.now();
    socket.write('POST /chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"pro');
    const received: Buffer[] = [];
    socket.on('data', (d) => received.push(d));
    const at = await Promise.race([closed, sleep(5_000).then(() => 0)]);
    expect(at).toBeGreaterThan(0);
    expect(at - t0).toBeGreaterThanOrEqual(900);
    expect(at - t0).toBeLessThan(4_000);
    expect(Buffer.concat(received).toString()).toMatch(/^HTTP\/1.1 408/);
  });
});

describe('clients that leave or stall', () => {
  it('a client that drops or stalls its upload frees its slot: nothing stays in flight, nothing is refused after', async () => {
    const svc = await startService({ config: { web: { max_concurrent_requests: 4, client_timeout: 1 } } });
    const inFlight = async () => Number(/^tide_requests_in_flight (\d+)$/m.exec((await svc.request('/metrics')).body)?.[1]);
    const halfBody = (path: string) => `POST ${path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 200\r\n\r\n{"messages": [`;
    const sockets = ['/v1/chat/completions', '/v1/completions', '/chat/completions', '/v1/chat/completions'].map((path) => {
      const socket = connect(svc.port, '127.0.0.1');
      socket.on('error', () => undefined);
      socket.resume(); // read what the server sends (a 408 for the stalled one), so its close is seen
      socket.write(halfBody(path));
      return socket;
    });
    await sleep(200);
    for (const socket of sockets.slice(0, 3)) socket.destroy(); // three leave mid-body; the last one stalls until client_timeout
    const stalled = new Promise<void>((resolve) => sockets[3].on('close', () => resolve()));
    await Promise.race([stalled, sleep(4_000)]);
    expect(sockets[3].destroyed).toBe(true);
    await waitUntil(async () => (await inFlight()) === 0, 3_000);
    // A client that leaves is no bug of the service's, whoever reads its body (OpenAiProxy, Fastify's parser).
    expect(svc.proc.output.filter((line) => line.includes('"level":50'))).toEqual([]);
    expect(svc.proc.output.filter((line) => line.includes('"context":"access"') && line.includes('"status":499') && line.includes('"error":"client_gone"'))).toHaveLength(3);
    const answers = await Promise.all([1, 2, 3].map(() => svc.request('/v1/chat/completions', post({ messages: [{ role: 'user', content: 'still here' }] }))));
    expect(answers.map((a) => a.status)).toEqual([200, 200, 200]);
    expect((await svc.request('/metrics')).body).toMatch(/^tide_requests_rejected_overload_total 0$/m);
    await svc.stop();
  });
});

describe('overload', () => {
  it('past web.max_concurrent_requests: 429 with Retry-After, while requests within the limit succeed', async () => {
    const svc = await startService({ config: { web: { max_concurrent_requests: 2 } }, env: { VLLM_SIM_ITL_MS: '100' } });
    const slow = [1, 2].map(() => svc.request('/chat/completions', post({ prompt: 'a b c d e' })));
    await svc.waitInFlight(2);
    const extra = await Promise.all([1, 2, 3].map(() => svc.request('/v1/chat/completions', post({ messages: [{ role: 'user', content: 'x' }] }))));
    for (const res of extra) {
      expect(res.status).toBe(429);
      expect(res.headers['retry-after']).toBe('1');
      expect(JSON.parse(res.body).error).toMatchObject({ type: 'RateLimitError', code: 429 });
    }
    expect((await Promise.all(slow)).map((r) => r.status)).toEqual([200, 200]);
    expect((await svc.request('/health')).status).toBe(200); // probes are never refused
    expect((await svc.request('/metrics')).body).toMatch(/^tide_requests_rejected_overload_total 3$/m);
    await svc.stop();
  });
});

describe('metrics and access log', () => {
  it('with logging.log_bodies, the access line carries the body, and for the simple API the answer\'s text, streamed or not', async () => {
    const svc = await startService({ config: { logging: { level: 'info', log_bodies: true } } });
    await svc.json('/chat/completions', post({ prompt: 'whole answer', request_id: 'bodies-1' }));
    await readSse(`${svc.url}/chat/completions`, { prompt: 'streamed answer', request_id: 'bodies-2', stream: true });
    await svc.json('/v1/chat/completions', post({ messages: [{ role: 'user', content: 'relayed' }] }, { 'x-request-id': 'bodies-3' }));
    const line = async (id: string) => {
      await waitUntil(() => svc.proc.output.some((l) => l.includes('"context":"access"') && l.includes(`"request_id":"${id}"`)), 3_000, 20, `the access line of ${id}`);
      return JSON.parse(svc.proc.output.find((l) => l.includes('"context":"access"') && l.includes(`"request_id":"${id}"`))!) as { body: { prompt?: string }; completion?: string };
    };
    const [whole, streamed, relayed] = [await line('bodies-1'), await line('bodies-2'), await line('bodies-3')];
    expect([whole.body.prompt, whole.completion]).toEqual(['whole answer', 'whole answer']); // the simulator echoes
    expect([streamed.body.prompt, streamed.completion]).toEqual(['streamed answer', 'streamed answer']);
    expect([relayed.body, relayed.completion]).toEqual([{ messages: [{ role: 'user', content: 'relayed' }] }, undefined]);
  });

  it('reflect a known sequence of requests exactly; probes are not logged; prompts are not logged', async () => {
    const svc = await startService({ config: { logging: { level: 'info' } } });
    const a = await svc.json<{ usage: { prompt_tokens: number; completion_tokens: number } }>('/chat/completions', post({ prompt: 'secret words one', request_id: 'log-1' }));
    const b = await svc.json<{ usage: { prompt_tokens: number; completion_tokens: number } }>('/chat/completions', post({ prompt: 'two', max_tokens: 1 }));
    expect((await svc.request('/chat/completions', post({ prompt: 5 }))).status).toBe(400);
    expect((await svc.request('/nope')).status).toBe(404);
    expect((await svc.request('/chat/completions')).status).toBe(405); // a known path, another method
    const preflight = await svc.request('/v1/chat/completions', { method: 'OPTIONS', headers: { origin: 'https://app.example.com', 'access-control-request-method': 'POST' } });
    expect(preflight.status).toBe(200);
    for (const probe of ['/health', '/ready', '/metrics']) expect([probe, (await svc.request(probe)).status]).toEqual([probe, 200]);
    const s = await readSse(`${svc.url}/chat/completions`, { prompt: 'streamed here', stream: true, request_id: 'log-2' });
    const usage = JSON.parse(s.events[s.events.length - 2]).usage as { prompt_tokens: number; completion_tokens: number };

    const text = (await svc.request('/metrics')).body;
    const value = (re: RegExp) => Number(re.exec(text)?.[1]);
    expect(value(/^tide_http_requests_total\{route="\/chat\/completions",method="POST",status="200"\} (\d+)$/m)).toBe(3);
    expect(value(/^tide_http_requests_total\{route="\/chat\/completions",method="POST",status="400"\} (\d+)$/m)).toBe(1);
    expect(value(/^tide_http_requests_total\{route="unmatched",method="GET",status="404"\} (\d+)$/m)).toBe(1);
    // The route label: `unmatched` for a 405 too, `*` for a CORS preflight (never the path: no series per URL).
    expect(value(/^tide_http_requests_total\{route="unmatched",method="GET",status="405"\} (\d+)$/m)).toBe(1);
    expect(value(/^tide_http_requests_total\{route="\*",method="OPTIONS",status="200"\} (\d+)$/m)).toBe(1);
    expect(value(/^tide_prompt_tokens_total (\d+)$/m)).toBe(a.body.usage.prompt_tokens + b.body.usage.prompt_tokens + usage.prompt_tokens);
    expect(value(/^tide_completion_tokens_total (\d+)$/m)).toBe(a.body.usage.completion_tokens + b.body.usage.completion_tokens + usage.completion_tokens);
    expect(value(/^tide_stream_time_to_first_token_seconds_count\{route="\/chat\/completions"\} (\d+)$/m)).toBe(1);
    expect(value(/^tide_errors_total\{type="invalid_request"\} (\d+)$/m)).toBe(1);
    expect(text).toMatch(/^tide_vllm_state\{state="ready"\} 1$/m);
    // vLLM's own series, appended: a and the stream stopped, b hit max_tokens
    expect(text).toMatch(/^vllm:request_success_total\{.*finished_reason="stop".*\} 2(\.0)?$/m);
    expect(text).toMatch(/^vllm:request_success_total\{.*finished_reason="length".*\} 1(\.0)?$/m);

    // Access lines are written in order: once the stream's is in, those of the requests before it would be.
    await waitUntil(() => svc.proc.stdoutLines.some((l) => l.includes('"request completed"') && l.includes('"request_id":"log-2"')), 3_000, 20, "the stream's access line");
    const lines = svc.proc.stdoutLines.filter((l) => l.includes('"request completed"')).map((l) => JSON.parse(l) as Record<string, unknown>);
    const first = lines.find((l) => l.request_id === 'log-1');
    expect(first).toMatchObject({
      context: 'access',
      method: 'POST',
      route: '/chat/completions',
      status: 200,
      tokens: { prompt: a.body.usage.prompt_tokens, completion: a.body.usage.completion_tokens },
    });
    expect(typeof first?.duration_ms).toBe('number');
    expect(lines.find((l) => l.status === 400)).toMatchObject({ level: 40, error: 'invalid_request' });
    expect(lines.find((l) => l.method === 'GET' && l.url === '/chat/completions')).toMatchObject({ route: 'unmatched', status: 405 });
    expect(lines.find((l) => l.method === 'OPTIONS')).toMatchObject({ route: '*', url: '/v1/chat/completions', status: 200 });
    // No probe has an access line (logging.access_log_probes is off).
    expect(lines.filter((l) => ['/health', '/ready', '/metrics'].some((probe) => String(l.url).startsWith(probe)))).toEqual([]);
    expect(svc.proc.output.join('\n')).not.toContain('secret words');
    await svc.stop();
  });

  it('measure and log the OpenAI relay alike, whether answered before Fastify or handed to it', async () => {
    const svc = await startService({ config: { logging: { level: 'info' } } });
    const chat = { messages: [{ role: 'user', content: 'one two three' }], max_tokens: 2 };
    // Answered at the http level (OpenAiProxy): a plain answer, a stream, the model list.
    const plain = await svc.request('/v1/chat/completions', post(chat, { 'x-request-id': 'relay-1' }));
    expect(plain.status).toBe(200);
    expect(plain.headers['x-request-id']).toBe('relay-1');
    const usage = (JSON.parse(plain.body) as { usage: { prompt_tokens: number; completion_tokens: number } }).usage;
    const stream = await readSse(`${svc.url}/v1/chat/completions`, { ...chat, stream: true });
    expect(stream.events[stream.events.length - 1]).toBe('[DONE]');
    expect((await svc.request('/v1/models')).status).toBe(200);
    // Handed to Fastify: a query string, a body it refuses.
    const query = await svc.request('/v1/chat/completions?trace=1', post(chat, { 'x-request-id': 'relay-2' }));
    expect([query.status, query.headers['x-request-id']]).toEqual([200, 'relay-2']);
    expect((await svc.request('/v1/chat/completions', { method: 'POST', body: '{"messages": [', headers: { 'content-type': 'application/json' } })).status).toBe(400);

    const text = (await svc.request('/metrics')).body;
    const value = (re: RegExp) => Number(re.exec(text)?.[1]);
    expect(value(/^tide_http_requests_total\{route="\/v1\/chat\/completions",method="POST",status="200"\} (\d+)$/m)).toBe(3);
    expect(value(/^tide_http_requests_total\{route="\/v1\/chat\/completions",method="POST",status="400"\} (\d+)$/m)).toBe(1);
    expect(value(/^tide_http_requests_total\{route="\/v1\/models",method="GET",status="200"\} (\d+)$/m)).toBe(1);
    expect(value(/^tide_stream_time_to_first_token_seconds_count\{route="\/v1\/chat\/completions"\} (\d+)$/m)).toBe(1);
    expect(value(/^tide_prompt_tokens_total (\d+)$/m)).toBe(2 * usage.prompt_tokens); // plain answers; streams are not parsed
    expect(value(/^tide_errors_total\{type="invalid_request"\} (\d+)$/m)).toBe(1);

    const lines = svc.proc.stdoutLines.filter((l) => l.includes('"request completed"')).map((l) => JSON.parse(l) as Record<string, unknown>);
    for (const id of ['relay-1', 'relay-2']) {
      expect(lines.find((l) => l.request_id === id)).toMatchObject({
        context: 'access',
        method: 'POST',
        route: '/v1/chat/completions',
        status: 200,
        tokens: { prompt: usage.prompt_tokens, completion: usage.completion_tokens },
      });
    }
    expect(lines.filter((l) => l.route === '/v1/chat/completions')).toHaveLength(4);

    // Every answer carries the request id: a relayed stream, a body refused by Fastify.
    const streamed = await svc.request('/v1/chat/completions', post({ ...chat, stream: true }, { 'x-request-id': 'relay-3' }));
    expect([streamed.status, streamed.headers['content-type'], streamed.headers['x-request-id']]).toEqual([200, 'text/event-stream; charset=utf-8', 'relay-3']);
    const refused = await svc.request('/v1/chat/completions', { method: 'POST', body: '[]', headers: { 'content-type': 'application/json', 'x-request-id': 'relay-4' } });
    expect([refused.status, refused.headers['x-request-id']]).toEqual([400, 'relay-4']);
    await svc.stop();
  });

  it('a failed vLLM scrape never breaks ours', async () => {
    const svc = await startService({ config: { vllm: { auto_start: false, model_name: 'm' } }, waitFor: 'degraded' });
    const res = await svc.request('/metrics');
    expect(res.status).toBe(200);
    expect(res.headers['content-type']).toBe('text/plain; version=0.0.4; charset=utf-8');
    expect(res.body).toContain('tide_vllm_state{state="unreachable"} 1');
    expect(res.body).toContain("# vLLM's /metrics could not be read");
    await svc.stop();
  });
});
