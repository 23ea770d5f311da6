import { type IncomingHttpHeaders, type Server, createServer } from 'node:http';
import type { AddressInfo } from 'node:net';
import * as fc from 'fast-check';
import { AppError } from '../domain/app-error';
import type { ChatDelta, TraceContext } from '../domain/chat.entity';
import { ChatFactory } from '../domain/chat.factory';
import type { ChatSink } from '../domain/chat.repository';
import { VLLMChatRepository, plainContent } from './vllm-chat.repository';
import type { VLLMServerManager } from './vllm-server.manager';
import { VLLMClient, upstreamStatusError } from './vllm.client';
import { type RelayRequest, type RelaySink, VLLMRelay } from './vllm.relay';

/** For a sink that never asks for a pause. */
const NO_RESUME = { resume: () => undefined };

/** A content delta exactly as vLLM frames it (A5). */
function delta(content: string): string {
  return `{"id":"chatcmpl-x","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"content":${JSON.stringify(content)}},"logprobs":null,"finish_reason":null,"token_ids":null}]}`;
}

describe('plainContent (the fast path for content deltas)', () => {
  it('reads the text of an ordinary delta, escapes and all', () => {
    expect(plainContent(delta(' Paris'))).toBe(' Paris');
    expect(plainContent(delta('a "quoted" \\ back\nslash\t😀'))).toBe('a "quoted" \\ back\nslash\t😀');
    expect(plainContent(delta(''))).toBe('');
  });

  it('agrees with JSON.parse for any text', () => {
    fc.assert(
      fc.property(fc.string({ unit: 'binary' }), (text) => {
        const data = delta(text);
        expect(plainContent(data)).toBe((JSON.parse(data) as { choices: Array<{ delta: { content: string } }> }).choices[0].delta.content);
      }),
    );
  });

  it('declines everything that is not a lone content delta, so it is parsed in full', () => {
    const finish = delta('x').replace('"finish_reason":null', '"finish_reason":"stop"');
    const role = delta('').replace('"delta":{"content":""}', '"delta":{"role":"assistant","content":""}');
    const reasoning = delta('x').replace('"content":"x"}', '"content":"x","reasoning":null}');
    const twoChoices = delta('a').replace(']}', ',{"index":1,"delta":{"content":"b"},"finish_reason":null}]}');
    const usage = delta('a').replace(']}', '],"usage":{"prompt_tokens":1}}');
    for (const data of [finish, role, reasoning, twoChoices, usage, '{"error": {"message": "x"}}']) {
      expect(plainContent(data)).toBeNull();
    }
  });
});

/** vLLM's answer to a chat naming a model it does not serve (A: unknown model name). */
const MODEL_404 = '{"error":{"message":"The model `m` does not exist.","type":"NotFoundError","param":"model","code":404}}';

async function waitFor(done: () => boolean): Promise<void> {
  for (let i = 0; i < 100 && !done(); i++) await new Promise((resolve) => setImmediate(resolve));
}

describe('VLLMChatRepository.complete (whole answers)', () => {
  const chat = new ChatFactory({ systemPrompt: '', maxTokens: 8, temperature: 1, topP: 1, maxModelLen: 64, maxPromptChars: 100 }, () => 'rid').fromPrompt({ prompt: 'hi' });
  const manager = { ensureServing: () => Promise.resolve() } as unknown as VLLMServerManager;

  it("vLLM's 404 (it does not serve vllm.model_name) is a 502 naming the key and what vLLM serves, not vLLM's refusal", async () => {
    const client = {
      postJson: () => Promise.reject(upstreamStatusError(404, JSON.parse(MODEL_404))),
      listModels: () => Promise.resolve(['sim-model']),
    } as unknown as VLLMClient;
    const repository = new VLLMChatRepository(client, {} as VLLMRelay, manager, 'm');
    await expect(repository.complete(chat, new AbortController().signal)).rejects.toMatchObject({
      code: 'UPSTREAM_ERROR',
      message: 'vLLM refused tide-vllm\'s model (HTTP 404): vllm.model_name is "m", but vLLM serves "sim-model"',
    });
  });

  it("other refusals stay vLLM's, with its message and status", async () => {
    const client = {
      postJson: () => Promise.reject(upstreamStatusError(400, { error: { message: 'temperature must be at most 2', param: 'temperature', code: 400 } })),
    } as unknown as VLLMClient;
    const repository = new VLLMChatRepository(client, {} as VLLMRelay, manager, 'm');
    await expect(repository.complete(chat, new AbortController().signal)).rejects.toMatchObject({ code: 'UPSTREAM_REJECTED', upstreamStatus: 400 });
  });

  it('an answer vLLM aborted itself (finish_reason "abort": a sleep or a shutdown cut it) is a 503 to retry, never a whole answer', async () => {
    const answer = (finish: string) => ({ model: 'm', choices: [{ index: 0, message: { role: 'assistant', content: 'half an' }, finish_reason: finish }], usage: { prompt_tokens: 1, completion_tokens: 2, total_tokens: 3 } });
    for (const [finish, outcome] of [
      ['abort', { rejects: { code: 'VLLM_NOT_READY', message: expect.stringContaining('vLLM aborted the generation') } }],
      ['length', { resolves: { content: 'half an', finishReason: 'length' } }],
    ] as const) {
      const client = { postJson: () => Promise.resolve(answer(finish)) } as unknown as VLLMClient;
      const done = new VLLMChatRepository(client, {} as VLLMRelay, manager, 'm').complete(chat, new AbortController().signal);
      if ('rejects' in outcome) await expect(done).rejects.toMatchObject(outcome.rejects);
      else await expect(done).resolves.toMatchObject(outcome.resolves);
    }
  });
});

describe('VLLMChatRepository.stream (pushed deltas over the relay)', () => {
  interface Sent {
    body: Record<string, unknown>;
    sink: RelaySink;
    aborted: Error | null;
  }

  /** A relay that records what it was asked; the test plays vLLM through the captured sink. */
  function setup(writeResults: boolean[] = [], client = {} as VLLMClient) {
    const sent: Sent[] = [];
    const relay = {
      send(req: RelayRequest, sink: RelaySink) {
        const entry: Sent = { body: JSON.parse(req.body ?? '{}') as Record<string, unknown>, sink, aborted: null };
        sent.push(entry);
        return (reason: Error) => {
          entry.aborted = reason;
        };
      },
    } as unknown as VLLMRelay;
    const manager = { ensureServing: () => Promise.resolve() } as unknown as VLLMServerManager;
    const repository = new VLLMChatRepository(client, relay, manager, 'm');
    const got: { deltas: ChatDelta[]; ended: boolean; error: AppError | null; drains: number } = { deltas: [], ended: false, error: null, drains: 0 };
    const sink: ChatSink = {
      write: (d) => {
        got.deltas.push(d);
        return writeResults.shift() ?? true;
      },
      onDrain: () => void (got.drains += 1),
      end: () => void (got.ended = true),
      fail: (e) => void (got.error = e),
    };
    const chat = new ChatFactory({ systemPrompt: '', maxTokens: 8, temperature: 1, topP: 1, maxModelLen: 64, maxPromptChars: 100 }, () => 'rid').fromPrompt({ prompt: 'hi' });
    return { sent, got, start: async () => {
      repository.stream(chat, new AbortController().signal, sink);
      await new Promise((resolve) => setImmediate(resolve));
      return sent[0];
    } };
  }

  const finishEvent = '{"choices":[{"index":0,"delta":{"content":""},"finish_reason":"stop"}]}';
  const usageEvent = '{"choices":[],"usage":{"prompt_tokens":3,"total_tokens":5,"completion_tokens":2}}';
  const sse = (...events: string[]) => Buffer.from(events.map((e) => `data: ${e}\n\n`).join(''));

  it('asks for a stream with usage, and pushes content, finish and usage in order, split anywhere', async () => {
    const { got, start } = setup();
    const { body, sink } = await start();
    expect(body).toMatchObject({ model: 'm', stream: true, stream_options: { include_usage: true } });
    sink.onStart(200, { 'content-type': 'text/event-stream' });
    const bytes = sse(delta('é'), delta(' ✓'), finishEvent, usageEvent, '[DONE]');
    for (let i = 0; i < bytes.length; i += 7) sink.onData(bytes.subarray(i, i + 7), NO_RESUME); // splits multi-byte characters too
    expect(got.deltas.map((d) => [d.content, d.finishReason, d.usage?.completion_tokens ?? null])).toEqual([
      ['é', null, null],
      [' ✓', null, null],
      ['', 'stop', null],
      ['', 'stop', 2],
    ]);
    expect([got.ended, got.error]).toEqual([true, null]);
    sink.onEnd(); // vLLM's body ends after [DONE]: nothing more happens
    expect([got.ended, got.error]).toEqual([true, null]);
  });

  it('pauses vLLM while the client is full, and asks to be resumed', async () => {
    const { got, start } = setup([true, false]);
    const { sink } = await start();
    sink.onStart(200, {});
    expect(sink.onData(sse(delta('a')), NO_RESUME)).toBe(true);
    expect(sink.onData(sse(delta('b')), NO_RESUME)).toBe(false);
    expect(got.drains).toBe(1);
  });

  it("fails with vLLM's own message when it refuses the request", async () => {
    const { got, start } = setup();
    const { sink } = await start();
    sink.onStart(400, { 'content-type': 'application/json' });
    sink.onData(Buffer.from('{"error":{"message":"temperature must be at most 2","type":"BadRequestError","param":"temperature","code":400}}'), NO_RESUME);
    sink.onEnd();
    expect(got.error).toMatchObject({ code: 'UPSTREAM_REJECTED', message: 'temperature must be at most 2', upstreamStatus: 400 });
    expect(got.deltas).toEqual([]);
  });

  it("vLLM's 404 (it does not serve vllm.model_name) is the service's misconfiguration: a 502 naming the key and the models vLLM serves", async () => {
    const listed = () => Promise.resolve(['served-a', 'served-b']);
    const refused = () => Promise.reject(new AppError('UPSTREAM_ERROR', 'vLLM refused tide-vllm (HTTP 401)'));
    for (const [listModels, named] of [[listed, ', but vLLM serves "served-a", "served-b"'], [refused, '']] as const) {
      const client = { listModels } as unknown as VLLMClient;
      const { got, start } = setup([], client);
      const sent = await start();
      sent.sink.onStart(404, { 'content-type': 'application/json' });
      sent.sink.onData(Buffer.from(MODEL_404), NO_RESUME);
      sent.sink.onEnd();
      await waitFor(() => got.error !== null);
      expect(got.error).toMatchObject({ code: 'UPSTREAM_ERROR', message: `vLLM refused tide-vllm's model (HTTP 404): vllm.model_name is "m"${named}` });
      expect(got.deltas).toEqual([]);
    }
  });

  it('fails, once, on a truncation, an error event or a lost connection — and closes the request to vLLM', async () => {
    const cases: Array<[string, (sink: RelaySink) => void, string, string]> = [
      ['[DONE] without a finish', (s) => s.onData(sse(delta('a'), '[DONE]'), NO_RESUME), 'UPSTREAM_ERROR', 'ended the stream before'],
      ['the body ends early', (s) => (s.onData(sse(delta('a')), NO_RESUME), s.onEnd()), 'UPSTREAM_ERROR', 'closed the stream before'],
      ['an error event', (s) => s.onData(sse('{"error":{"message":"boom","type":"InternalServerError","code":500}}'), NO_RESUME), 'UPSTREAM_ERROR', 'InternalServerError'],
      // The input refused after the stream began (SGLang's ValueError, A5/Part B): vLLM's words, a 400 when nothing was sent yet.
      ['an error event refusing the input', (s) => s.onData(sse(delta('a'), '{"error":{"object":"error","message":"Requested token count exceeds the limit","type":"BadRequest","param":null,"code":400}}'), NO_RESUME), 'UPSTREAM_REJECTED', 'Requested token count exceeds the limit'],
      ['a flat error event with a 503 (SGLang\'s full queue)', (s) => s.onData(sse('{"object":"error","message":"queue full","type":"ServiceUnavailable","code":503,"error":"queue full"}'), NO_RESUME), 'VLLM_NOT_READY', 'retry'],
      ['an error event that names no status', (s) => s.onData(sse('{"error":{"message":"boom","type":"EngineDeadError"}}'), NO_RESUME), 'UPSTREAM_ERROR', 'EngineDeadError'],
      ['an event that is not JSON', (s) => s.onData(sse('{nope'), NO_RESUME), 'UPSTREAM_ERROR', 'not JSON'],
      // vLLM's own abort (a sleep or pause with mode=abort, a shutdown) ends the stream "whole", with [DONE]: a cut answer all the same.
      ['finish_reason "abort"', (s) => s.onData(sse(delta('a'), '{"choices":[{"index":0,"delta":{"content":""},"finish_reason":"abort"}]}', usageEvent, '[DONE]'), NO_RESUME), 'VLLM_NOT_READY', 'vLLM aborted the generation'],
      ['the connection lost mid-stream', (s) => s.onError(new AppError('UPSTREAM_ERROR', 'vLLM closed the connection before its answer was complete')), 'UPSTREAM_ERROR', 'closed the connection'],
      // A restart's cut (the drain ran out) keeps its own word: a 503 to retry, not a failure of vLLM.
      ['cut by a restart', (s) => s.onError(new AppError('VLLM_NOT_READY', "vLLM was restarted at an operator's request")), 'VLLM_NOT_READY', 'restarted'],
    ];
    for (const [what, play, code, message] of cases) {
      const { got, start } = setup();
      const sent = await start();
      sent.sink.onStart(200, {});
      play(sent.sink);
      sent.sink.onError(new AppError('UPSTREAM_ERROR', 'a second failure is ignored'));
      expect([what, got.error?.code, got.ended]).toEqual([what, code, false]);
      expect(got.error?.message).toContain(message);
      if (!['the connection lost mid-stream', 'cut by a restart'].includes(what)) expect(sent.aborted).toBe(got.error);
    }
  });

  it('a refused connection before any answer stays "not reachable" (503, retry)', async () => {
    const { got, start } = setup();
    const { sink } = await start();
    sink.onError(new AppError('VLLM_NOT_READY', 'vLLM is not reachable'));
    expect(got.error?.code).toBe('VLLM_NOT_READY');
  });
});

describe("VLLMChatRepository passes the caller's trace context on, whole answers and streams", () => {
  const trace = { traceparent: '00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01', tracestate: 'congo=t61rcWkgMzE' };
  const factory = new ChatFactory({ systemPrompt: '', maxTokens: 8, temperature: 1, topP: 1, maxModelLen: 64, maxPromptChars: 100 }, () => 'rid');
  const manager = { ensureServing: () => Promise.resolve() } as unknown as VLLMServerManager;
  let server: Server;
  let base: string;
  const seen: IncomingHttpHeaders[] = [];

  beforeAll(async () => {
    server = createServer((req, res) => {
      seen.push(req.headers);
      req.resume().on('end', () => {
        if (req.url !== '/v1/chat/completions') return void res.writeHead(404).end();
        // Streams get their one content event and [DONE]; whole answers one choice.
        if (seen.length % 2 === 0) return void res.writeHead(200, { 'content-type': 'text/event-stream' }).end(`data: ${delta('ok')}\n\ndata: ${delta('').replace('"finish_reason":null', '"finish_reason":"stop"')}\n\ndata: [DONE]\n\n`);
        res.writeHead(200, { 'content-type': 'application/json' }).end('{"model":"m","choices":[{"message":{"content":"ok"},"finish_reason":"stop"}],"usage":null}');
      });
    });
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    base = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
  });
  afterAll(async () => {
    server.closeAllConnections();
    await new Promise((resolve) => server.close(resolve));
  });

  it('sends traceparent and tracestate exactly as given, and none for a chat without them', async () => {
    const client = new VLLMClient(base, 10_000);
    const relay = new VLLMRelay(base, 10_000);
    const repository = new VLLMChatRepository(client, relay, manager, 'm');
    const streamed = (chat: ReturnType<ChatFactory['fromPrompt']>) =>
      new Promise<void>((resolve, reject) =>
        repository.stream(chat, new AbortController().signal, { write: () => true, onDrain: () => undefined, end: resolve, fail: reject }),
      );
    try {
      for (const given of [trace, { traceparent: trace.traceparent }, null] as Array<TraceContext | null>) {
        const chat = factory.fromPrompt({ prompt: 'hi', trace: given });
        await expect(repository.complete(chat, new AbortController().signal)).resolves.toMatchObject({ content: 'ok' });
        await streamed(chat);
        const [whole, stream] = seen.splice(0, 2).map((h) => [h.traceparent, h.tracestate]);
        expect([whole, stream]).toEqual([
          [given?.traceparent, given?.tracestate],
          [given?.traceparent, given?.tracestate],
        ]);
      }
    } finally {
      client.close();
      await relay.close();
    }
  });
});
