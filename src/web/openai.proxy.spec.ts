import { EventEmitter } from 'node:events';
import type { IncomingMessage, RequestListener, ServerResponse } from 'node:http';
import { PassThrough } from 'node:stream';
import fc from 'fast-check';
import { AuthConfig } from '../config/config.schema';
import { AppError } from '../domain/app-error';
import type { VLLMServerManager } from '../infrastructure/vllm-server.manager';
import type { RelayRequest, RelaySink, VLLMRelay } from '../infrastructure/vllm.relay';
import { ApiKeys } from './auth.hook';
import type { Metrics } from './metrics';
import { Cors } from './cors';
import { OpenAiProxy, needsEngine } from './openai.proxy';
import { outcomeOf } from './request-outcome';
import { TrafficGate } from './traffic.gate';

/** For a sink that never asks for a pause. */
const NO_RESUME = { resume: () => undefined };

const KEY = 'sk-test';
const STALL_MS = 40;

/** Just enough of a ServerResponse for the relay: what was written, and when it closed. */
class FakeResponse extends EventEmitter {
  statusCode = 200;
  headersSent = false;
  writableEnded = false;
  writableFinished = false;
  destroyed = false;
  /** What write() answers: false plays a client that reads nothing. */
  takesMore = true;
  readonly headers: Record<string, unknown> = {};
  readonly chunks: string[] = [];

  setHeader(name: string, value: unknown): void {
    this.headers[name] = value;
  }
  writeHead(status: number, headers: Record<string, unknown> = {}): this {
    this.statusCode = status;
    Object.assign(this.headers, headers);
    this.headersSent = true;
    return this;
  }
  write(chunk: string | Buffer): boolean {
    this.headersSent = true;
    this.chunks.push(String(chunk));
    return this.takesMore;
  }
  end(chunk?: string | Buffer): this {
    if (chunk !== undefined) this.chunks.push(String(chunk));
    this.writableEnded = this.writableFinished = true;
    this.emit('close');
    return this;
  }
  destroy(): this {
    if (this.destroyed) return this;
    this.destroyed = true;
    this.emit('close');
    return this;
  }
}

function request(method: string, url: string, body?: string, headers: Record<string, string> = {}) {
  const req = new PassThrough() as unknown as IncomingMessage & PassThrough;
  Object.assign(req, {
    method,
    url,
    headers: { authorization: `Bearer ${KEY}`, ...(body === undefined ? {} : { 'content-type': 'application/json', 'content-length': String(Buffer.byteLength(body)) }), ...headers },
  });
  return { req, send: () => (body === undefined ? req.end() : req.end(body)) };
}

function setup(options: { serving?: boolean; maxConcurrent?: number; level3?: boolean } = {}) {
  const sent: Array<{ request: RelayRequest; sink: RelaySink; aborted: Error | null }> = [];
  const relay = {
    send(relayed: RelayRequest, sink: RelaySink) {
      const entry = { request: relayed, sink, aborted: null as Error | null };
      sent.push(entry);
      return (reason: Error) => void (entry.aborted = reason);
    },
  } as unknown as VLLMRelay;
  const tracked: string[] = [];
  const metrics = { track: (_req: unknown, _res: unknown, route: string) => void tracked.push(route) } as unknown as Metrics;
  const gate = new TrafficGate(options.maxConcurrent ?? 4);
  /** `asleepInEngine`: asleep at level 1 or 2, where vLLM's API server answers what needs no engine. */
  const engine = { serving: options.serving ?? true, asleepInEngine: false };
  const manager = { servesNow: () => engine.serving, answersWithoutEngine: () => engine.serving || engine.asleepInEngine, engineFreeIsActivity: options.level3 ?? false, hasAdapter: () => false } as unknown as VLLMServerManager;
  const keys = new ApiKeys(Object.assign(new AuthConfig(), { api_keys: [KEY] }));
  const proxy = new OpenAiProxy({ relay, manager, metrics, gate, keys, cors: new Cors(['*']), model: 'served', engine: 'vllm', maxPromptChars: 100, bodyLimit: 1024, logBodies: false, clientTimeoutMs: STALL_MS });
  const handedOver: IncomingMessage[] = [];
  const fallback: RequestListener = (req) => void handedOver.push(req);
  const handle = (req: IncomingMessage, res: FakeResponse) => proxy.handle(req, res as unknown as ServerResponse, fallback);
  /** A request answered on the fast path, up to the relay call: its response and what vLLM was sent. A string body goes as it is. */
  const relayed = async (path: string, body: unknown) => {
    const { req, send } = request('POST', path, typeof body === 'string' ? body : JSON.stringify(body));
    const res = new FakeResponse();
    handle(req, res);
    send();
    await settle();
    return { res, vllm: sent[sent.length - 1] };
  };
  return { sent, tracked, gate, handedOver, handle, relayed, proxy, engine };
}

const settle = () => new Promise((resolve) => setImmediate(resolve));
const chat = JSON.stringify({ messages: [{ role: 'user', content: 'hi' }] });

describe('OpenAiProxy (the relay before Fastify)', () => {
  it('hands a request over to the routes (which wait for vLLM) when vLLM stopped serving while its body came', async () => {
    const { sent, handedOver, handle, engine } = setup();
    const { req, send } = request('POST', '/v1/chat/completions', chat);
    expect(handle(req, new FakeResponse())).toBe(true); // admitted: vLLM served then
    engine.serving = false; // an operator's sleep, or a restart, during the upload
    send();
    await settle();
    expect([sent.length, handedOver]).toEqual([0, [req]]);
  });

  it('relays the model list and tokenizing to a vLLM asleep at level 1 or 2, as no activity; generations wait for Fastify (the wake-up)', async () => {
    const { sent, gate, handedOver, handle, engine } = setup({ serving: false });
    engine.asleepInEngine = true;
    const settled: boolean[] = [];
    gate.onSettled = (scope) => void settled.push(scope.activity);
    const models = request('GET', '/v1/models');
    const modelsRes = new FakeResponse();
    expect(handle(models.req, modelsRes)).toBe(true);
    const tokenize = request('POST', '/tokenize', JSON.stringify({ prompt: 'hi' }));
    const tokenizeRes = new FakeResponse();
    expect(handle(tokenize.req, tokenizeRes)).toBe(true);
    tokenize.send();
    await settle();
    expect(sent.map((x) => `${x.request.method} ${x.request.path}`)).toEqual(['GET /v1/models', 'POST /tokenize']);
    const chatRequest = request('POST', '/v1/chat/completions', chat);
    expect(handle(chatRequest.req, new FakeResponse())).toBe(false); // Fastify's routes wake vLLM for it
    expect(handedOver).toEqual([]);
    modelsRes.emit('close');
    tokenizeRes.emit('close');
    expect(settled).toEqual([false, false]); // a client polling the model list does not keep vLLM awake
    // With level-3 idle sleeps it does: asleep there, only a fresh start answers it (a reload per idle_seconds otherwise).
    const level3 = setup({ level3: true });
    level3.gate.onSettled = (scope) => void settled.push(scope.activity);
    const polled = new FakeResponse();
    expect(level3.handle(request('GET', '/v1/models').req, polled)).toBe(true);
    polled.emit('close');
    expect(settled).toEqual([false, false, true]);
  });

  it('needsEngine: only the model list and the tokenizer routes go without the engine', () => {
    expect(['GET /v1/models', 'GET /v1/models/org/m', 'POST /tokenize', 'POST /detokenize', 'POST /v1/tokenize', 'POST /v1/detokenize'].filter((r) => needsEngine(...(r.split(' ') as [string, string])))).toEqual([]);
    expect(['POST /v1/chat/completions', 'POST /v1/completions', 'POST /v1/embeddings', 'POST /v1/responses', 'GET /v1/responses/r1', 'POST /v1/models'].every((r) => needsEngine(...(r.split(' ') as [string, string])))).toBe(true);
  });

  it('answers the common case itself: admitted, measured, relayed with the model defaulted, Fastify never asked', async () => {
    const { sent, tracked, gate, handedOver, handle } = setup();
    const { req, send } = request('POST', '/v1/chat/completions', chat);
    const res = new FakeResponse();
    expect(handle(req, res)).toBe(true);
    send();
    await settle();
    expect(handedOver).toEqual([]);
    expect(tracked).toEqual(['/v1/chat/completions']);
    expect(gate.inFlight).toBe(1);
    expect(JSON.parse(sent[0].request.body ?? '')).toEqual({ messages: [{ role: 'user', content: 'hi' }], model: 'served' });
    sent[0].sink.onStart(200, { 'content-type': 'application/json', 'content-length': '2' });
    sent[0].sink.onData(Buffer.from('{}'), NO_RESUME);
    sent[0].sink.onEnd();
    expect([res.statusCode, res.headers['content-type'], res.chunks.join(''), gate.inFlight]).toEqual([200, 'application/json', '{}', 0]);
  });

  it("passes on a plain answer's content encoding, and a Retry-After on a 429 or 503, as vLLM (or a proxy before it) sent them", async () => {
    const { relayed } = setup();
    const answers: Array<[number, Record<string, string>]> = [
      [200, { 'content-type': 'application/json', 'content-encoding': 'gzip', 'content-length': '20', 'retry-after': '3' }],
      [503, { 'content-type': 'application/json', 'retry-after': '7' }],
      [429, { 'content-type': 'application/json', 'retry-after': '2' }],
    ];
    const seen = [];
    for (const [status, headers] of answers) {
      const { res, vllm } = await relayed('/v1/chat/completions', JSON.parse(chat));
      vllm.sink.onStart(status, headers);
      vllm.sink.onEnd();
      seen.push([res.statusCode, res.headers['content-encoding'], res.headers['retry-after']]);
    }
    expect(seen).toEqual([
      [200, 'gzip', undefined], // Retry-After means nothing on a 200
      [503, undefined, '7'],
      [429, undefined, '2'],
    ]);
  });

  it('sends vLLM the body as the client wrote it, numbers JSON.stringify would change intact, a missing model added at its end', async () => {
    const messages = '"messages":[{"role":"user","content":"hi"}]';
    for (const [sent, expected] of [
      [`{"model":"m",${messages},"seed":9007199254740993,"max_tokens":1e400,"temperature":-0.0}`, null],
      [`{ ${messages}, "seed": 18446744073709551615 }\n`, `{ ${messages}, "seed": 18446744073709551615 ,"model":"served"}\n`],
      [`{"model":null,${messages}}`, `{"model":null,${messages},"model":"served"}`],
      ['{"prompt":"a"}', '{"prompt":"a","model":"served"}'],
    ] as const) {
      const path = sent.includes('"prompt"') ? '/v1/completions' : '/v1/chat/completions';
      const { vllm } = await setup().relayed(path, sent);
      expect(vllm.request.body).toBe(expected ?? sent);
      expect(JSON.parse(vllm.request.body ?? '').model).toBe(expected === null ? 'm' : 'served'); // the last key wins, in Python's json too
    }
  });

  it("reads a Responses answer's usage (input_tokens, output_tokens) for the metrics", async () => {
    const { res, vllm } = await setup().relayed('/v1/responses', { input: 'hi' });
    const body =
      '{"id":"resp_1","object":"response","status":"completed","usage":{"input_tokens":7,"input_tokens_details":{"cached_tokens":0},"output_tokens":4,"output_tokens_details":{"reasoning_tokens":0},"total_tokens":11},"user":null}';
    vllm.sink.onStart(200, { 'content-type': 'application/json' });
    vllm.sink.onData(Buffer.from(body), NO_RESUME);
    vllm.sink.onEnd();
    expect(outcomeOf(res as unknown as ServerResponse).usage).toEqual({ prompt_tokens: 7, completion_tokens: 4, total_tokens: 11 });
    // vLLM's input_tokens_details may carry per-turn lists of any length before output_tokens.
    const turns = Array.from({ length: 200 }, (_, i) => i).join(',');
    const long = body.replace('{"cached_tokens":0}', `{"cached_tokens":0,"input_tokens_per_turn":[${turns}],"cached_tokens_per_turn":[${turns}]}`);
    const { res: res2, vllm: vllm2 } = await setup().relayed('/v1/responses', { input: 'hi' });
    vllm2.sink.onStart(200, { 'content-type': 'application/json' });
    vllm2.sink.onData(Buffer.from(long), NO_RESUME);
    vllm2.sink.onEnd();
    expect(outcomeOf(res2 as unknown as ServerResponse).usage).toEqual({ prompt_tokens: 7, completion_tokens: 4, total_tokens: 11 });
    // The same response read again, or cancelled, generated nothing: its usage is not counted twice.
    const { proxy, sent } = setup();
    for (const [method, path] of [
      ['GET', '/v1/responses/resp_1'],
      ['POST', '/v1/responses/resp_1/cancel'],
    ] as const) {
      const again = new FakeResponse();
      proxy.start(again as unknown as ServerResponse, undefined, { method, path, requestId: 'r' });
      const vllm = sent[sent.length - 1];
      vllm.sink.onStart(200, { 'content-type': 'application/json' });
      vllm.sink.onData(Buffer.from(body), NO_RESUME);
      vllm.sink.onEnd();
      expect([path, again.chunks.join(''), outcomeOf(again as unknown as ServerResponse).usage]).toEqual([path, body, undefined]);
    }
  });

  it("copies what it keeps of vLLM's pieces, which the relay reads into again: the body and its usage intact", async () => {
    const { res, vllm } = await setup().relayed('/v1/chat/completions', { messages: [{ role: 'user', content: 'hi' }] });
    const body = '{"id":"x","choices":[],"usage":{"prompt_tokens":3,"total_tokens":5,"completion_tokens":2}}';
    vllm.sink.onStart(200, { 'content-type': 'application/json' });
    const readBuffer = Buffer.alloc(body.length);
    for (const [from, to] of [
      [0, 40],
      [40, body.length],
    ]) {
      const n = readBuffer.write(body.slice(from, to));
      vllm.sink.onData(readBuffer.subarray(0, n), NO_RESUME);
      readBuffer.fill('#'); // the next read
    }
    vllm.sink.onEnd();
    expect([res.chunks.join(''), outcomeOf(res as unknown as ServerResponse).usage]).toEqual([body, { prompt_tokens: 3, completion_tokens: 2, total_tokens: 5 }]);
  });

  it("reads the usage vLLM puts before a long rest of its answer (prompt_logprobs, prompt_token_ids: A5), however it is cut into pieces", async () => {
    const usage = '"usage":{"prompt_tokens":4001,"total_tokens":4003,"completion_tokens":2}';
    const logprobs = Array.from({ length: 4000 }, (_, i) => `{"${i}":{"logprob":-1.5,"rank":1,"decoded_token":"t${i}"}}`).join(',');
    const body = `{"id":"x","choices":[{"index":0,"message":{"content":"ok"},"finish_reason":"stop"}],${usage},"prompt_logprobs":[null,${logprobs}],"prompt_token_ids":null}`;
    for (const size of [16384, 65536, 100, 70]) {
      const { res, vllm } = await setup().relayed('/v1/chat/completions', { messages: [{ role: 'user', content: 'hi' }], prompt_logprobs: 1 });
      vllm.sink.onStart(200, { 'content-type': 'application/json' });
      for (let at = 0; at < body.length; at += size) vllm.sink.onData(Buffer.from(body.slice(at, at + size)), NO_RESUME);
      vllm.sink.onEnd();
      expect([size, res.chunks.join('') === body, outcomeOf(res as unknown as ServerResponse).usage]).toEqual([
        size,
        true,
        { prompt_tokens: 4001, completion_tokens: 2, total_tokens: 4003 },
      ]);
    }
  });

  it("gives the access line vLLM's reason for a failure it reported: its status, its error event's words", async () => {
    const plain = await setup().relayed('/v1/chat/completions', { messages: [{ role: 'user', content: 'hi' }] });
    plain.vllm.sink.onStart(500, { 'content-type': 'application/json' });
    plain.vllm.sink.onData(Buffer.from('{"error":{"message":"EngineCore encountered an issue","type":"InternalServerError","param":null,"code":500}}'), NO_RESUME);
    plain.vllm.sink.onEnd();
    expect(outcomeOf(plain.res as unknown as ServerResponse)).toMatchObject({ errorType: 'upstream_error', errorMessage: 'vLLM answered HTTP 500' });
    const stream = await setup().relayed('/v1/chat/completions', { messages: [{ role: 'user', content: 'hi' }], stream: true });
    stream.vllm.sink.onStart(200, { 'content-type': 'text/event-stream; charset=utf-8' });
    stream.vllm.sink.onData(Buffer.from('data: {"error": {"object": "error", "message": "EngineCore encountered an issue", "type": "InternalServerError", "param": null, "code": 500}}\n\ndata: [DONE]\n\n'), NO_RESUME);
    stream.vllm.sink.onEnd();
    expect(outcomeOf(stream.res as unknown as ServerResponse)).toMatchObject({
      errorType: 'upstream_error',
      errorMessage: 'vLLM ended the stream with an error event: EngineCore encountered an issue',
    });
  });

  it("answers vLLM's failures in OpenAI's error shape, as vLLM would, on /v1 and on /tokenize and /detokenize", async () => {
    for (const [path, type] of [
      ['/v1/completions', 'ServiceUnavailableError'],
      ['/tokenize', 'ServiceUnavailableError'],
      ['/detokenize', 'ServiceUnavailableError'],
    ]) {
      const { res, vllm } = await setup().relayed(path, { prompt: 'a' });
      vllm.sink.onError(new AppError('VLLM_NOT_READY', 'vLLM is not reachable'));
      expect([path, res.statusCode, (JSON.parse(res.chunks.join('')) as { error: { type: string } }).error.type, res.headers['retry-after']]).toEqual([path, 503, type, '5']);
    }
  });

  it('leaves to Fastify, unread and uncounted, what it refuses or must wait for', async () => {
    const cases: Array<[string, ReturnType<typeof setup>, ReturnType<typeof request>]> = [
      ['no key', setup(), request('POST', '/v1/chat/completions', chat, { authorization: '' })],
      ['vLLM not serving (asleep, starting)', setup({ serving: false }), request('POST', '/v1/chat/completions', chat)],
      ['a query string', setup(), request('POST', '/v1/chat/completions?x=1', chat)],
      ['another route', setup(), request('POST', '/chat/completions', chat)],
      ['another method', setup(), request('PUT', '/v1/models')],
    ];
    const full = setup({ maxConcurrent: 1 });
    full.gate.admit(new FakeResponse() as unknown as ServerResponse);
    cases.push(['no room (429)', full, request('POST', '/v1/chat/completions', chat)]);
    const draining = setup();
    draining.gate.startDraining();
    cases.push(['draining (503)', draining, request('POST', '/v1/chat/completions', chat)]);
    for (const [what, env, { req }] of cases) {
      const before = env.gate.inFlight;
      expect([what, env.handle(req, new FakeResponse())]).toEqual([what, false]);
      expect([what, env.tracked, env.gate.inFlight, req.readableFlowing]).toEqual([what, [], before, null]);
    }
  });

  it('hands over, admitted and read, what only the Fastify routes answer: simple-API prompts, refused bodies', async () => {
    for (const [what, body, expected] of [
      ['a prompt', JSON.stringify({ prompt: 'hi' }), { body: { value: { prompt: 'hi' }, text: '{"prompt":"hi"}' } }],
      ['bad JSON', '{"messages": [', { error: expect.objectContaining({ code: 'INVALID_REQUEST' }) }],
      ['a prompt too long', JSON.stringify({ messages: [{ role: 'user', content: 'x'.repeat(101) }] }), { body: expect.any(Object) }],
    ] as const) {
      const { sent, tracked, gate, handedOver, handle } = setup();
      const { req, send } = request('POST', '/v1/chat/completions', body);
      expect(handle(req, new FakeResponse())).toBe(true);
      send();
      await settle();
      expect([what, handedOver.length, sent.length, tracked.length, gate.inFlight]).toEqual([what, 1, 0, 1, 1]);
      expect(handedOver[0].tideHandedOver).toMatchObject({ ...expected, requestId: expect.any(String), scope: expect.anything() });
    }
  });

  it('a client that leaves while sending is neither relayed nor handed over, and frees its slot', async () => {
    const { sent, gate, handedOver, handle } = setup();
    const { req } = request('POST', '/v1/chat/completions', chat);
    const res = new FakeResponse();
    handle(req, res);
    expect(gate.inFlight).toBe(1); // admitted before a byte of the body is read
    req.write('{"messages"');
    res.destroy(); // the connection closed
    req.destroy();
    await settle();
    expect([sent.length, handedOver.length, gate.inFlight]).toEqual([0, 0, 0]);
  });

  it('a client that reads nothing for web.client_timeout is cut off, which aborts the request to vLLM', async () => {
    const { gate, relayed } = setup();
    const { res, vllm } = await relayed('/v1/chat/completions', { messages: [{ role: 'user', content: 'hi' }], stream: true });
    vllm.sink.onStart(200, { 'content-type': 'text/event-stream' });
    res.takesMore = false;
    expect(vllm.sink.onData(Buffer.from('data: {}\n\n'), NO_RESUME)).toBe(false);
    await new Promise((resolve) => setTimeout(resolve, STALL_MS * 3));
    expect([res.destroyed, gate.inFlight, vllm.aborted?.message]).toEqual([true, 0, 'client went away']);
  });

  it('a client that takes its stream again in time is resumed, not cut off', async () => {
    const { relayed } = setup();
    const { res, vllm } = await relayed('/v1/completions', { prompt: 'a', stream: true });
    vllm.sink.onStart(200, { 'content-type': 'text/event-stream' });
    res.takesMore = false;
    let resumed = 0;
    vllm.sink.onData(Buffer.from('data: {}\n\n'), { resume: () => (resumed += 1) });
    res.emit('drain');
    await new Promise((resolve) => setTimeout(resolve, STALL_MS * 3));
    expect([resumed, res.destroyed, vllm.aborted]).toEqual([1, false, null]);
  });

  it("tells a stream by vLLM's content type, not by the body's stream flag (vLLM also streams for \"true\" or 1)", async () => {
    const { res, vllm } = await setup().relayed('/v1/chat/completions', { messages: [{ role: 'user', content: 'hi' }], stream: 'true' });
    vllm.sink.onStart(200, { 'content-type': 'text/event-stream; charset=utf-8' });
    vllm.sink.onData(Buffer.from('data: {"a":1}\n\n'), NO_RESUME);
    vllm.sink.onEnd(); // no [DONE]: a truncation, said so
    expect(res.headers['x-accel-buffering']).toBe('no');
    expect(res.chunks.join('')).toContain('"vLLM closed the stream before it was complete"');
  });

  it("times a relayed stream's first event at its first token, not at vLLM's head (sent before prefill)", async () => {
    const { res, vllm } = await setup().relayed('/v1/chat/completions', { messages: [{ role: 'user', content: 'hi' }], stream: true });
    const outcome = outcomeOf(res as unknown as ServerResponse);
    vllm.sink.onStart(200, { 'content-type': 'text/event-stream' });
    expect(outcome.firstEventAt).toBeUndefined();
    const before = performance.now();
    vllm.sink.onData(Buffer.from('data: {"a":1}\n\n'), NO_RESUME);
    const after = performance.now();
    const first = outcome.firstEventAt;
    expect(first).toBeGreaterThanOrEqual(before);
    expect(first).toBeLessThanOrEqual(after);
    // The events after it leave it where it is: a later one is no first event.
    await new Promise((resolve) => setTimeout(resolve, 5));
    vllm.sink.onData(Buffer.from('data: {"a":2}\n\n'), NO_RESUME);
    expect(outcome.firstEventAt).toBe(first);
  });

  it('records failed relayed answers as errors: a body that breaks midway, and a 5xx from vLLM', async () => {
    const broken = await setup().relayed('/v1/chat/completions', { messages: [{ role: 'user', content: 'hi' }] });
    broken.vllm.sink.onStart(200, { 'content-type': 'application/json', 'content-length': '1000' });
    broken.vllm.sink.onData(Buffer.from('{"id":"x",'), NO_RESUME);
    broken.vllm.sink.onError(new AppError('UPSTREAM_ERROR', 'vLLM closed the connection before its answer was complete'));
    expect([broken.res.destroyed, outcomeOf(broken.res as unknown as ServerResponse).errorType]).toEqual([true, 'upstream_error']);
    const failed = await setup().relayed('/v1/chat/completions', { messages: [{ role: 'user', content: 'hi' }] });
    failed.vllm.sink.onStart(500, { 'content-type': 'application/json' });
    failed.vllm.sink.onData(Buffer.from('{"error":{"message":"boom","type":"InternalServerError","param":null,"code":500}}'), NO_RESUME);
    failed.vllm.sink.onEnd();
    expect([failed.res.statusCode, outcomeOf(failed.res as unknown as ServerResponse).errorType]).toEqual([500, 'upstream_error']);
  });

  it("answers an error, not an empty reply, when vLLM's plain answer fails after its head and before its body", async () => {
    for (const error of [new AppError('UPSTREAM_ERROR', 'vLLM closed the connection before its answer was complete'), new AppError('UPSTREAM_TIMEOUT', 'vLLM sent nothing for 3 s (vllm.timeout)')]) {
      const { res, vllm } = await setup().relayed('/v1/chat/completions', { messages: [{ role: 'user', content: 'hi' }] });
      vllm.sink.onStart(200, { 'content-type': 'application/json', 'content-length': '50' });
      expect(res.headersSent).toBe(false); // held until the body's first byte
      vllm.sink.onError(error);
      const outcome = outcomeOf(res as unknown as ServerResponse);
      const body = JSON.parse(res.chunks.join('')) as { error: { message: string } };
      expect([res.statusCode, res.destroyed, body.error.message, outcome.errorType, outcome.errorMessage]).toEqual([
        error.code === 'UPSTREAM_TIMEOUT' ? 504 : 502,
        false,
        error.message,
        error.code.toLowerCase(),
        error.message,
      ]);
    }
    // Its head goes out with the first byte, or at its end for an empty body; a 204 carries no length.
    const { res, vllm } = await setup().relayed('/v1/chat/completions', { messages: [{ role: 'user', content: 'hi' }] });
    vllm.sink.onStart(200, { 'content-type': 'application/json', 'content-length': '2' });
    vllm.sink.onData(Buffer.from('{}'), NO_RESUME);
    vllm.sink.onEnd();
    expect([res.statusCode, res.headers['content-length'], res.chunks.join(''), res.writableEnded]).toEqual([200, '2', '{}', true]);
    const empty = await setup().relayed('/v1/chat/completions', { messages: [{ role: 'user', content: 'hi' }] });
    empty.vllm.sink.onStart(204, { 'content-length': '0' });
    empty.vllm.sink.onEnd();
    expect([empty.res.statusCode, 'content-length' in empty.res.headers, empty.res.writableEnded]).toEqual([204, false, true]);
  });

  it("records a stream that vLLM ended with its own error event (then [DONE]) as vLLM's failure, relayed as it is", async () => {
    const errorEvent = 'data: {"error": {"message": "EngineCore died", "type": "InternalServerError", "param": null, "code": 500}}\n\n';
    const stream = `data: {"a":1}\n\n${errorEvent}data: [DONE]\n\n`;
    const start = stream.indexOf(errorEvent);
    // The event in a chunk of its own, after a content event in one chunk, and its start cut by a read at every byte.
    const cuts = Array.from({ length: 15 }, (_, i) => [stream.slice(0, start + i), stream.slice(start + i)]);
    for (const chunks of [['data: {"a":1}\n\n', errorEvent, 'data: [DONE]\n\n'], [stream], ...cuts]) {
      const { res, vllm } = await setup().relayed('/v1/chat/completions', { messages: [{ role: 'user', content: 'hi' }], stream: true });
      vllm.sink.onStart(200, { 'content-type': 'text/event-stream' });
      for (const chunk of chunks) vllm.sink.onData(Buffer.from(chunk), NO_RESUME);
      vllm.sink.onEnd();
      const outcome = outcomeOf(res as unknown as ServerResponse);
      // vLLM's words when the event came whole in one read (the common case); cut across reads, the failure alone.
      const words = chunks.some((chunk) => chunk.includes(errorEvent.trimEnd())) ? ': EngineCore died' : '';
      expect([res.chunks.join(''), outcome.errorType, outcome.errorMessage]).toEqual([chunks.join(''), 'upstream_error', `vLLM ended the stream with an error event${words}`]);
    }
    // Content that merely talks about errors is no error event: its quotes are escaped.
    const { res, vllm } = await setup().relayed('/v1/chat/completions', { messages: [{ role: 'user', content: 'hi' }], stream: true });
    vllm.sink.onStart(200, { 'content-type': 'text/event-stream' });
    vllm.sink.onData(Buffer.from('data: {"choices":[{"delta":{"content":"data: {\\"error\\""}}]}\n\ndata: [DONE]\n\n'), NO_RESUME);
    vllm.sink.onEnd();
    expect(outcomeOf(res as unknown as ServerResponse).errorType).toBeUndefined();
    // A Responses stream that ends with response.failed: whole, and vLLM's failure.
    const responses = await setup().relayed('/v1/responses', { input: 'hi', stream: true });
    responses.vllm.sink.onStart(200, { 'content-type': 'text/event-stream' });
    responses.vllm.sink.onData(Buffer.from('event: response.created\ndata: {}\n\nevent: response.failed\ndata: {}\n\n'), NO_RESUME);
    responses.vllm.sink.onEnd();
    expect([responses.res.writableEnded, outcomeOf(responses.res as unknown as ServerResponse).errorType]).toEqual([true, 'upstream_error']);
  });

  it('relays an answer vLLM aborted itself (finish_reason "abort") as it is: byte for byte, the client reads the reason', async () => {
    const aborted = 'data: {"choices":[{"index":0,"delta":{"content":""},"finish_reason":"abort"}]}\n\ndata: [DONE]\n\n';
    const stream = await setup().relayed('/v1/chat/completions', { messages: [{ role: 'user', content: 'hi' }], stream: true });
    stream.vllm.sink.onStart(200, { 'content-type': 'text/event-stream' });
    stream.vllm.sink.onData(Buffer.from(aborted), NO_RESUME);
    stream.vllm.sink.onEnd();
    const whole = '{"choices":[{"index":0,"message":{"content":"ha"},"finish_reason":"abort"}],"usage":{"prompt_tokens":1,"total_tokens":3,"completion_tokens":2}}';
    const plain = await setup().relayed('/v1/chat/completions', { messages: [{ role: 'user', content: 'hi' }] });
    plain.vllm.sink.onStart(200, { 'content-type': 'application/json', 'content-length': String(whole.length) });
    plain.vllm.sink.onData(Buffer.from(whole), NO_RESUME);
    plain.vllm.sink.onEnd();
    for (const [{ res }, body] of [[stream, aborted], [plain, whole]] as const) {
      const outcome = outcomeOf(res as unknown as ServerResponse);
      expect([res.statusCode, res.chunks.join(''), outcome.errorType]).toEqual([200, body, undefined]);
    }
  });

  it('a stream that was whole ([DONE] came) ends as it was when the connection fails after it', async () => {
    const { res, vllm } = await setup().relayed('/v1/chat/completions', { messages: [{ role: 'user', content: 'hi' }], stream: true });
    vllm.sink.onStart(200, { 'content-type': 'text/event-stream' });
    vllm.sink.onData(Buffer.from('data: {"a":1}\n\ndata: [DONE]\n\n'), NO_RESUME);
    vllm.sink.onError(new AppError('UPSTREAM_ERROR', 'vLLM closed the connection before its answer was complete'));
    expect([res.chunks.join(''), res.writableEnded, outcomeOf(res as unknown as ServerResponse).errorType]).toEqual(['data: {"a":1}\n\ndata: [DONE]\n\n', true, undefined]);
  });

  it("ends a stream cut midway with an error event whose type names its code: 503 shutdown or restart, 504 timeout, 502 vLLM failed", async () => {
    const { relayed, gate } = setup();
    const restart = new AppError('VLLM_NOT_READY', "vLLM was restarted at an operator's request before the answer was complete");
    const cases: Array<[AppError | 'cutAll' | 'restart', string, number]> = [
      ['cutAll', 'ServiceUnavailableError', 503], // a second SIGTERM, or the drain ran out
      ['restart', 'ServiceUnavailableError', 503], // an operator's restart: to retry, not vLLM failing
      [new AppError('UPSTREAM_TIMEOUT', 'vLLM sent nothing for 1 s (vllm.timeout)'), 'TimeoutError', 504],
      [new AppError('UPSTREAM_ERROR', 'vLLM closed the connection before its answer was complete'), 'InternalServerError', 502],
    ];
    for (const [error, type, code] of cases) {
      const { res, vllm } = await relayed('/v1/chat/completions', { messages: [{ role: 'user', content: 'hi' }], stream: true });
      vllm.sink.onStart(200, { 'content-type': 'text/event-stream' });
      vllm.sink.onData(Buffer.from('data: {"a":1}\n\n'), NO_RESUME);
      if (error === 'cutAll') gate.cutAll('test');
      else if (error === 'restart') gate.cutAll('test', restart);
      else vllm.sink.onError(error); // the relay's timeout, or a lost connection
      const events = res.chunks.join('').split('\n\n');
      expect(events.slice(-3)).toEqual([expect.stringMatching(/^data: \{"error": \{"message": /), 'data: [DONE]', '']);
      expect([type, JSON.parse(events[events.length - 3].slice('data: '.length))]).toEqual([type, { error: { message: expect.any(String), type, param: null, code } }]);
    }
  });

  it("sends the body's request_id to vLLM and answers with it, so vLLM's ids match", async () => {
    const { res, vllm } = await setup().relayed('/v1/chat/completions', { messages: [{ role: 'user', content: 'hi' }], request_id: 'body-id-1' });
    vllm.sink.onStart(200, { 'content-type': 'application/json', 'content-length': '2' });
    vllm.sink.onData(Buffer.from('{}'), NO_RESUME);
    expect([vllm.request.requestId, res.headers['x-request-id'], outcomeOf(res as unknown as ServerResponse).requestId]).toEqual(['body-id-1', 'body-id-1', 'body-id-1']);
  });

  it('ends a relayed stream normally only when it ends with [DONE], however vLLM cut its chunks', async () => {
    const events = 'data: {"a":1}\n\ndata: {"b":"xyz"}\n\n'; // ASCII: the fake response records pieces as strings
    const whole = Buffer.from(`${events}data: [DONE]\n\n`);
    const { relayed } = setup({ maxConcurrent: 1000 });
    await fc.assert(
      fc.asyncProperty(fc.integer({ min: 1, max: whole.length }), fc.uniqueArray(fc.integer({ min: 1, max: whole.length - 1 }), { maxLength: 6 }), async (length, cuts) => {
        const { res, vllm } = await relayed('/v1/chat/completions', { messages: [{ role: 'user', content: 'hi' }], stream: true });
        vllm.sink.onStart(200, { 'content-type': 'text/event-stream' });
        const body = whole.subarray(0, length); // vLLM's stream, possibly truncated
        let from = 0;
        for (const cut of [...cuts.filter((c) => c < length).sort((a, b) => a - b), length]) {
          vllm.sink.onData(body.subarray(from, cut), NO_RESUME);
          from = cut;
        }
        vllm.sink.onEnd();
        const out = res.chunks.join('');
        if (length === whole.length) return void expect(out).toBe(whole.toString());
        // Truncated: vLLM's error event and [DONE] follow, after a blank line if an event was cut.
        const cutMidEvent = !body.toString().endsWith('\n\n');
        expect(out.startsWith(body.toString() + (cutMidEvent ? '\n\n' : '') + 'data: {"error": {"message": "vLLM closed the stream before it was complete"')).toBe(true);
        expect(out.endsWith('data: [DONE]\n\n')).toBe(true);
      }),
      { numRuns: 150 },
    );
  });
});

describe('OpenAiProxy on the Responses API (named events, no [DONE])', () => {
  const event = (type: string, fields: Record<string, unknown>, sequence: number) => `event: ${type}\ndata: ${JSON.stringify({ ...fields, sequence_number: sequence, type })}\n\n`;
  /** vLLM's stream of a two-token answer: created … completed, sequence numbers from 0. */
  const stream = [
    event('response.created', { response: { id: 'resp_1', status: 'in_progress' } }, 0),
    event('response.in_progress', { response: { id: 'resp_1', status: 'in_progress' } }, 1),
    event('response.output_item.added', { output_index: 0, item: { id: 'i', type: 'message' } }, 2),
    event('response.output_text.delta', { content_index: 0, delta: 'ab', item_id: 'i', output_index: 0 }, 3),
    event('response.output_text.done', { content_index: 0, item_id: 'i', output_index: 0, text: 'ab' }, 4),
    event('response.completed', { response: { id: 'resp_1', status: 'completed', output: [] } }, 5),
  ];
  const body = { input: [{ role: 'user', content: [{ type: 'input_text', text: 'hi' }] }], stream: true };

  it('ends a stream normally only when its last event is response.completed, however vLLM cut its chunks; otherwise with an error event numbered next', async () => {
    const whole = Buffer.from(stream.join(''));
    const { relayed } = setup({ maxConcurrent: 1000 });
    await fc.assert(
      fc.asyncProperty(fc.integer({ min: 1, max: whole.length }), fc.uniqueArray(fc.integer({ min: 1, max: whole.length - 1 }), { maxLength: 6 }), fc.boolean(), async (length, cuts, dropped) => {
        const { res, vllm } = await relayed('/v1/responses', body);
        vllm.sink.onStart(200, { 'content-type': 'text/event-stream; charset=utf-8' });
        const sent = whole.subarray(0, length); // vLLM's stream, possibly cut short
        let from = 0;
        for (const cut of [...cuts.filter((c) => c < length).sort((a, b) => a - b), length]) {
          vllm.sink.onData(sent.subarray(from, cut), NO_RESUME);
          from = cut;
        }
        // vLLM ends its body, or the connection breaks (how vLLM fails a Responses stream).
        if (dropped) vllm.sink.onError(new AppError('UPSTREAM_ERROR', 'vLLM closed the connection before its answer was complete'));
        else vllm.sink.onEnd();
        const out = res.chunks.join('');
        expect(out.includes('data: [DONE]')).toBe(false);
        if (length === whole.length) return void expect(out).toBe(whole.toString());
        const text = sent.toString();
        const cutMidEvent = !text.endsWith('\n\n');
        const relayedEvents = text.split('\n\n').length - 1;
        expect(out.startsWith(text + (cutMidEvent ? '\n\n' : '') + 'event: error\ndata: ')).toBe(true);
        const error = JSON.parse(out.slice(out.lastIndexOf('data: ') + 'data: '.length)) as Record<string, unknown>;
        const message = expect.stringMatching(/^vLLM closed the (stream|connection) before/);
        expect(error).toEqual({ type: 'error', code: 'InternalServerError', message, param: null, sequence_number: relayedEvents, error: { message, type: 'InternalServerError', param: null, code: 502 } });
        expect(out.endsWith('}\n\n')).toBe(true);
      }),
      { numRuns: 200 },
    );
  });

  it('a clean end after a non-terminal event is a truncation; response.incomplete, response.failed and error are ends', async () => {
    for (const [last, whole] of [
      ['response.output_text.done', false],
      ['response.incomplete', true],
      ['response.failed', true],
      ['error', true],
    ] as const) {
      const { res, vllm } = await setup().relayed('/v1/responses', body);
      vllm.sink.onStart(200, { 'content-type': 'text/event-stream' });
      const sent = stream.slice(0, 2).join('') + event(last, {}, 2);
      vllm.sink.onData(Buffer.from(sent), NO_RESUME);
      vllm.sink.onEnd();
      const out = res.chunks.join('');
      expect([last, out === sent]).toEqual([last, whole]);
      if (!whole) expect(out.slice(sent.length)).toMatch(/^event: error\ndata: \{"type":"error","code":"InternalServerError","message":"vLLM closed the stream before it was complete","param":null,"sequence_number":3,"error":\{.*\}\}\n\n$/);
    }
  });

  it('a stream cut by the service (drain, timeout) ends with an error event whose code names the cause', async () => {
    const { relayed, gate } = setup();
    const { res, vllm } = await relayed('/v1/responses', body);
    vllm.sink.onStart(200, { 'content-type': 'text/event-stream' });
    vllm.sink.onData(Buffer.from(stream.slice(0, 4).join('')), NO_RESUME);
    gate.cutAll('test');
    const last = res.chunks.join('').split('\n\n').at(-2) ?? '';
    expect(last.startsWith('event: error\ndata: ')).toBe(true);
    expect(JSON.parse(last.slice(last.indexOf('data: ') + 6))).toMatchObject({ type: 'error', code: 'ServiceUnavailableError', param: null, sequence_number: 4 });
  });

  it('counts input_text parts and instructions against web.max_prompt_chars (100 here)', async () => {
    const { sent, handedOver, relayed } = setup();
    await relayed('/v1/responses', { input: [{ role: 'user', content: [{ type: 'input_text', text: 'x'.repeat(60) }] }], instructions: 'y'.repeat(50) });
    expect([sent.length, handedOver.length]).toEqual([0, 1]); // refused: Fastify's route answers the 400
    await relayed('/v1/responses', { input: [{ role: 'user', content: [{ type: 'input_text', text: 'x'.repeat(60) }] }], instructions: 'y'.repeat(30) });
    expect(JSON.parse(sent[0].request.body ?? '')).toMatchObject({ model: 'served' });
  });

  it("counts tool definitions and earlier tool calls (their strings and keys) against web.max_prompt_chars (100 here)", async () => {
    const { sent, handedOver, relayed } = setup();
    const tool = { type: 'function', function: { name: 'f', parameters: { type: 'object', description: 'd'.repeat(50) } } }; // 106 characters
    const call = { id: 'c', type: 'function', function: { name: 'f', arguments: 'a'.repeat(70) } }; // 107 characters
    await relayed('/v1/chat/completions', { messages: [{ role: 'user', content: 'hi' }], tools: [tool] });
    await relayed('/v1/chat/completions', { messages: [{ role: 'user', content: 'hi' }, { role: 'assistant', tool_calls: [call] }] });
    expect([sent.length, handedOver.length]).toEqual([0, 2]); // refused: Fastify's route answers the 400
    await relayed('/v1/chat/completions', { messages: [{ role: 'user', content: 'hi' }], tools: [], tool_choice: 'none' });
    expect(sent.length).toBe(1);
  });

  it("counts what rerank and score compare against web.max_prompt_chars (100 here)", async () => {
    const { sent, handedOver, relayed } = setup();
    await relayed('/v1/rerank', { query: 'q'.repeat(40), documents: ['d'.repeat(40), 'd'.repeat(40)] });
    await relayed('/v1/score', { text_1: 'a'.repeat(60), text_2: ['b'.repeat(60)] });
    await relayed('/v1/score', { query: 'a'.repeat(40), items: ['b'.repeat(40), 'c'.repeat(40)] }); // SGLang's score
    expect([sent.length, handedOver.length]).toEqual([0, 3]);
    await relayed('/v1/rerank', { query: 'q'.repeat(40), documents: ['d'.repeat(30), 'd'.repeat(30)] });
    expect(sent.length).toBe(1);
  });
});
