import type { IncomingHttpHeaders } from 'node:http';
import { type AddressInfo, type Server, type Socket, createServer } from 'node:net';
import fc from 'fast-check';
import { AxiosError } from 'axios';
import { AppError } from '../domain/app-error';
import { toAppError } from './vllm.client';
import { type RelayRequest, type RelaySink, VLLMRelay } from './vllm.relay';

/** What vLLM (a scripted TCP server) saw: each request's raw bytes and the connection it came on. */
interface Seen {
  head: string;
  body: string;
  connection: number;
}

let server: Server;
let port: number;
let seen: Seen[];
/** Connections of this test's server that closed (a previous test's late closes count there). */
let closedConnections: number;
/** How the scripted vLLM answers a request. */
let answer: (socket: Socket, request: Seen) => void | Promise<void>;
let relay: VLLMRelay;

beforeEach(async () => {
  seen = [];
  closedConnections = 0;
  let connections = 0;
  const thisServer = (server = createServer((socket) => {
    const connection = ++connections;
    socket.setNoDelay(true);
    socket.on('close', () => {
      if (server === thisServer) closedConnections += 1;
    });
    socket.on('error', () => undefined);
    let buffered = Buffer.alloc(0);
    socket.on('data', (chunk) => {
      buffered = Buffer.concat([buffered, chunk]);
      for (;;) {
        const end = buffered.indexOf('\r\n\r\n');
        if (end === -1) return;
        const head = buffered.subarray(0, end).toString('latin1');
        const length = Number(/content-length: (\d+)/i.exec(head)?.[1] ?? 0);
        if (buffered.length < end + 4 + length) return;
        const request = { head, body: buffered.subarray(end + 4, end + 4 + length).toString('utf8'), connection };
        buffered = buffered.subarray(end + 4 + length);
        seen.push(request);
        void answer(socket, request);
      }
    });
  }));
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  port = (server.address() as AddressInfo).port;
  relay = new VLLMRelay(`http://127.0.0.1:${port}`, 10_000, () => 'sk-test');
});

afterEach(async () => {
  await relay.close();
  await new Promise((resolve) => server.close(resolve));
});

const POST: RelayRequest = { method: 'POST', path: '/v1/chat/completions', body: '{"messages":[]}', requestId: 'req-1' };
const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

/** A sink that records everything; `done` resolves at onEnd or onError. */
function recorder(onData?: (chunk: Buffer, resume: () => void) => boolean) {
  const log = { status: 0, headers: {} as IncomingHttpHeaders, body: Buffer.alloc(0), pieces: 0, ends: 0, errors: [] as AppError[] };
  let settle!: () => void;
  const done = new Promise<void>((resolve) => (settle = resolve));
  const sink: RelaySink = {
    onStart: (status, headers) => Object.assign(log, { status, headers }),
    onData: (chunk, request) => {
      log.pieces += 1;
      log.body = Buffer.concat([log.body, chunk]);
      return onData ? onData(chunk, () => request.resume()) : true;
    },
    onEnd: () => {
      log.ends += 1;
      settle();
    },
    onError: (error) => {
      log.errors.push(error);
      settle();
    },
  };
  return { log, sink, done };
}

async function send(req: RelayRequest = POST, onData?: (chunk: Buffer, resume: () => void) => boolean) {
  const r = recorder(onData);
  relay.send(req, r.sink);
  await r.done;
  await sleep(5); // anything after the end would show up here
  return r.log;
}

function chunked(pieces: string[], { extension = '', trailers = '' } = {}): string {
  const body = pieces.map((p) => `${Buffer.byteLength(p).toString(16)}${extension}\r\n${p}\r\n`).join('');
  return `HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n${body}0\r\n${trailers}\r\n`;
}

/** Writes `bytes` in pieces cut at `cuts`, a little apart, so the relay reads them separately. */
async function writeCut(socket: Socket, bytes: Buffer, cuts: number[]): Promise<void> {
  let from = 0;
  for (const cut of [...cuts, bytes.length]) {
    if (cut > from) socket.write(bytes.subarray(from, cut));
    from = Math.max(from, cut);
    await sleep(2);
  }
}

describe('VLLMRelay', () => {
  it('sends one HTTP/1.1 request: request id, vLLM key, JSON body with its byte length', async () => {
    answer = (socket) => void socket.write('HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok');
    const log = await send({ ...POST, body: '{"content":"é"}' });
    expect(seen[0].head.split('\r\n')).toEqual([
      'POST /v1/chat/completions HTTP/1.1',
      `host: 127.0.0.1:${port}`,
      'x-request-id: req-1',
      'authorization: Bearer sk-test',
      'content-type: application/json',
      'content-length: 16',
    ]);
    expect(seen[0].body).toBe('{"content":"é"}');
    expect([log.status, log.headers['content-length'], log.body.toString(), log.ends]).toEqual([200, '2', 'ok', 1]);
    await send({ method: 'GET', path: '/v1/models', requestId: 'req-2' });
    expect(seen[1].head).not.toMatch(/content-length|content-type/);
    await send({ method: 'GET', path: '/v1/models', requestId: 'req-3', headers: 'traceparent: 00-ab-cd-01\r\ntracestate: a=1\r\n' });
    expect(seen[2].head.split('\r\n').slice(2)).toEqual(['x-request-id: req-3', 'authorization: Bearer sk-test', 'traceparent: 00-ab-cd-01', 'tracestate: a=1']);
  });

  it('hands over a chunked body exactly, wherever vLLM’s writes are cut', async () => {
    const pieces = ['data: {"a":"é"}\n\n', 'data: {"b":"ü"}\n\n', 'data: [DONE]\n\n'];
    const response = Buffer.from(chunked(pieces, { extension: ';x=1', trailers: 'x-trailer: t\r\n' }));
    // Every single cut, then random multi-cuts.
    for (let cut = 1; cut < response.length; cut += 1) {
      answer = (socket) => writeCut(socket, response, [cut]);
      const log = await send();
      expect([log.status, log.body.toString(), log.ends, log.errors]).toEqual([200, pieces.join(''), 1, []]);
    }
    await fc.assert(
      fc.asyncProperty(fc.uniqueArray(fc.integer({ min: 1, max: response.length - 1 }), { maxLength: 8 }), async (cuts) => {
        answer = (socket) => writeCut(socket, response, cuts.sort((a, b) => a - b));
        const log = await send();
        expect([log.body.toString(), log.ends, log.errors]).toEqual([pieces.join(''), 1, []]);
      }),
      { numRuns: 25 },
    );
    // All of it went over one connection, reused each time.
    expect(new Set(seen.map((s) => s.connection)).size).toBe(1);
  });

  it('refuses chunk extensions or trailers longer than a head may be, rather than read them for ever', async () => {
    const head = 'HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n';
    // Within the limit, extensions on every chunk and trailers are fine (counted per chunk).
    const fine = `${head}${'2;' + 'e'.repeat(40_000) + '\r\nab\r\n'}${'2;' + 'e'.repeat(40_000) + '\r\ncd\r\n'}0\r\nx: ${'t'.repeat(40_000)}\r\n\r\n`;
    answer = (socket) => void socket.write(fine);
    expect(await send()).toMatchObject({ status: 200, ends: 1, errors: [] });
    for (const endless of [`${head}5;${'e'.repeat(70_000)}`, `${head}0\r\n${'x: t\r\n'.repeat(12_000)}`]) {
      answer = (socket) => void socket.write(endless); // and the connection stays open, never ending it
      const log = await send();
      expect([log.ends, log.errors.map((e) => [e.code, e.message])]).toEqual([0, [['UPSTREAM_ERROR', 'vLLM sent a malformed chunked body']]]);
    }
  });

  it('reads Content-Length bodies, bodiless answers, and bodies that end with the connection', async () => {
    answer = (socket) => void socket.write('HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\ncontent-length: 13\r\n\r\n{"error":"x"}');
    let log = await send();
    expect([log.status, log.body.toString(), log.ends]).toEqual([404, '{"error":"x"}', 1]);
    answer = (socket) => void socket.write('HTTP/1.1 204 No Content\r\n\r\n');
    log = await send();
    expect([log.status, log.body.length, log.ends]).toEqual([204, 0, 1]);
    expect(new Set(seen.map((s) => s.connection)).size).toBe(1);
    answer = (socket) => {
      socket.write('HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nuntil ');
      setTimeout(() => socket.end('close'), 20);
    };
    log = await send();
    expect([log.status, log.body.toString(), log.ends, log.errors]).toEqual([200, 'until close', 1, []]);
    // That connection is gone: the next request opens another.
    answer = (socket) => void socket.write('HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n');
    await send();
    expect(seen[3].connection).not.toBe(seen[2].connection);
  });

  it('skips interim 1xx answers', async () => {
    answer = (socket) => void socket.write('HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </x>\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\nx');
    const log = await send();
    expect([log.status, log.body.toString(), log.ends]).toEqual([200, 'x', 1]);
  });

  it('closes a connection that vLLM closes, or that carries bytes after the answer, and reuses the others', async () => {
    answer = (socket) => void socket.write('HTTP/1.1 200 OK\r\ncontent-length: 1\r\nconnection: close\r\n\r\nx');
    await send();
    answer = (socket) => void socket.write('HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\nxEXTRA');
    await send();
    answer = (socket) => void socket.write('HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\nx');
    await send();
    await send();
    expect(seen.map((s) => s.connection)).toEqual([1, 2, 3, 3]);
    // vLLM closing an idle connection (its keep-alive ran out) is noticed: the next request gets a new one.
    answer = (socket) => {
      socket.write('HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\nx');
      setTimeout(() => socket.end(), 5);
    };
    await send();
    await sleep(30);
    const log = await send();
    expect([log.ends, log.errors]).toEqual([1, []]);
    expect(seen.map((s) => s.connection)).toEqual([1, 2, 3, 3, 3, 4]);
  });

  it.each([
    ['a status line that is not HTTP/1.x', 'HTTP/2 200\r\n\r\n'],
    ['a folded header', 'HTTP/1.1 200 OK\r\nx: a\r\n b\r\ncontent-length: 0\r\n\r\n'],
    ['both Content-Length and chunked', 'HTTP/1.1 200 OK\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n'],
    ['two different lengths', 'HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\nxx'],
    ['an invalid length', 'HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n'],
    ['a chunk size that is not hex', 'HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nhi\r\n0\r\n\r\n'],
    ['a chunk without its CRLF', 'HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nhiX\n0\r\n\r\n'],
    ['a chunk size beyond reason', 'HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n1000000000000\r\n'],
    ['a chunk size with a space inside', 'HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5 5\r\nhello\r\n0\r\n\r\n'],
    ['chunked applied twice', 'HTTP/1.1 200 OK\r\ntransfer-encoding: chunked, chunked\r\n\r\n0\r\n\r\n'],
    // Node's writeHead would throw on it when relayed; Node's own parser refuses it.
    ['a control character in a header value', 'HTTP/1.1 200 OK\r\ncontent-type: application/json\x01\r\ncontent-length: 2\r\n\r\n{}'],
    ['a lone LF inside a header line', 'HTTP/1.1 200 OK\r\nx: a\nb\r\ncontent-length: 2\r\n\r\n{}'],
    // Not waited on until vllm.timeout, as if vLLM had sent nothing.
    ['a head whose lines end with LF alone', 'HTTP/1.1 200 OK\ncontent-length: 2\n\n{}'],
  ])('refuses %s, and drops the connection', async (_what, response) => {
    answer = (socket) => void socket.write(response);
    const log = await send();
    expect(log.errors.map((e) => e.code)).toEqual(['UPSTREAM_ERROR']);
    expect(log.ends).toBe(0);
    await sleep(20);
    expect(closedConnections).toBe(1);
  });

  it.each([
    ['never ends', `HTTP/1.1 200 OK\r\nx: ${'a'.repeat(70_000)}`],
    ['ends beyond 64 KiB, in one piece', `HTTP/1.1 200 OK\r\nx: ${'a'.repeat(70_000)}\r\ncontent-length: 2\r\n\r\n{}`],
  ])('refuses a head that %s', async (_what, response) => {
    answer = (socket) => void socket.write(response);
    const log = await send();
    expect([log.errors.map((e) => e.message), log.status]).toEqual([['vLLM sent a response head that is too large'], 0]);
  });

  it('takes what Node takes in a head: obs-text and tabs in values, a head of almost 64 KiB', async () => {
    answer = (socket) => void socket.write(Buffer.from(`HTTP/1.1 200 OK\r\nx: \xe9\tt\r\ny: ${'a'.repeat(60_000)}\r\ncontent-length: 2\r\n\r\n{}`, 'latin1'));
    const log = await send();
    expect([log.errors, log.status, log.headers.x, log.body.toString()]).toEqual([[], 200, '\xe9\tt', '{}']);
  });

  it('reads repeated fields as Node does: the first Content-Type stands, others are joined', async () => {
    answer = (socket) => void socket.write('HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nContent-Type: text/plain\r\nvary: a\r\nvary: b\r\ncontent-length: 2\r\n\r\n{}');
    const log = await send();
    expect([log.errors, log.headers['content-type'], log.headers.vary]).toEqual([[], 'text/event-stream', 'a, b']);
  });

  it('calls every failure to reach vLLM a 503, as axios’ calls do (a DNS or network failure too); a dropped connection says so', () => {
    const errno = (code: string) => Object.assign(new Error(code), { code });
    for (const code of ['ECONNREFUSED', 'ECONNRESET', 'EHOSTUNREACH', 'ENETUNREACH', 'EPIPE', 'ENOTFOUND', 'EAI_AGAIN']) {
      const message = code === 'ECONNRESET' || code === 'EPIPE' ? 'vLLM closed the connection before answering (it stopped or crashed)' : 'vLLM is not reachable';
      expect([code, relay.errorOf(errno(code)).code, relay.errorOf(errno(code)).message]).toEqual([code, 'VLLM_NOT_READY', message]);
      expect([code, toAppError(new AxiosError('x', code), 1000).code, toAppError(new AxiosError('x', code), 1000).message]).toEqual([code, 'VLLM_NOT_READY', message]);
    }
    expect(relay.errorOf(errno('EPROTO')).code).toBe('UPSTREAM_ERROR');
  });

  it('tells "not reachable" (before an answer) from a failure midway', async () => {
    const refused = new VLLMRelay('http://127.0.0.1:1', 10_000);
    const r = recorder();
    refused.send(POST, r.sink);
    await r.done;
    await refused.close();
    expect(r.log.errors.map((e) => [e.code, e.message])).toEqual([['VLLM_NOT_READY', 'vLLM is not reachable']]);

    // Taken, then closed (or reset) without an answer: vLLM stopped or crashed with the request in it.
    // Still VLLM_NOT_READY (a 503: a restart follows), but not "not reachable".
    const dropped = ['VLLM_NOT_READY', 'vLLM closed the connection before answering (it stopped or crashed)'];
    answer = (socket) => void socket.destroy(); // closes without answering
    let log = await send();
    expect(log.errors.map((e) => [e.code, e.message])).toEqual([dropped]);
    answer = (socket) => void socket.resetAndDestroy();
    log = await send();
    expect(log.errors.map((e) => [e.code, e.message])).toEqual([dropped]);

    answer = (socket) => {
      socket.write('HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n');
      setTimeout(() => socket.destroy(), 20);
    };
    log = await send();
    expect([log.status, log.body.toString(), log.ends]).toEqual([200, 'hello', 0]);
    expect(log.errors.map((e) => e.code)).toEqual(['UPSTREAM_ERROR']);

    // Reset midway (vLLM killed): ECONNRESET, a socket error rather than a close, says the same.
    answer = (socket) => {
      socket.write('HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n');
      setTimeout(() => socket.resetAndDestroy(), 20);
    };
    log = await send();
    expect(log.errors.map((e) => [e.code, e.message])).toEqual([['UPSTREAM_ERROR', 'vLLM closed the connection before its answer was complete']]);
  });

  it('sends a request again, once, on a new connection when the pooled one it went out on closes before any answer', async () => {
    const OK = 'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}';
    // vLLM answers the first request of each connection, then closes the connection as the next one
    // arrives, unanswered: the keep-alive race (an idle close as a request leaves) made certain.
    const answered = new Set<number>();
    answer = (socket, request) => {
      if (answered.has(request.connection)) return void socket.destroy();
      answered.add(request.connection);
      socket.write(OK);
    };
    expect((await send()).status).toBe(200);
    const log = await send({ ...POST, body: '{"messages":["again"]}' });
    expect([log.status, log.body.toString(), log.errors]).toEqual([200, '{}', []]);
    expect(seen.map((r) => [r.connection, r.body])).toEqual([
      [1, '{"messages":[]}'],
      [1, '{"messages":["again"]}'], // dropped unread
      [2, '{"messages":["again"]}'], // sent again, whole
    ]);

    // Once only: a new connection that fails too is vLLM's failure (a 503, as before).
    answer = (socket, request) => {
      if (request.connection === 2 && !answered.has(99)) {
        answered.add(99);
        return void socket.destroy(); // connection 2 (pooled) closes at the next request…
      }
      socket.destroy(); // …and the new one too
    };
    const again = await send();
    expect(again.errors.map((e) => e.message)).toEqual(['vLLM closed the connection before answering (it stopped or crashed)']);
    expect(seen.length).toBe(5);
  });

  it('does not send again a request vLLM held for longer than the keep-alive race takes: it may have begun generating', async () => {
    const answered = new Set<number>();
    answer = (socket, request) => {
      if (answered.has(request.connection)) return void setTimeout(() => socket.destroy(), 1_200); // took it, then died
      answered.add(request.connection);
      socket.write('HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}');
    };
    await send();
    const log = await send();
    expect(log.errors.map((e) => [e.code, e.message])).toEqual([['VLLM_NOT_READY', 'vLLM closed the connection before answering (it stopped or crashed)']]);
    expect(seen.length).toBe(2); // sent once
  });

  it('refuses a chunk size of endless leading zeros', async () => {
    answer = (socket) => void socket.write(`HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n${'0'.repeat(17)}5\r\nhello\r\n0\r\n\r\n`);
    const log = await send();
    expect(log.errors.map((e) => e.message)).toEqual(['vLLM sent a malformed chunked body']);
  });

  it('does not send again a request vLLM began to answer, nor one too long to keep', async () => {
    const answered = new Set<number>();
    answer = (socket, request) => {
      if (!answered.has(request.connection)) {
        answered.add(request.connection);
        return void socket.write('HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}');
      }
      socket.write('HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n{"a"'); // begun, then dropped
      setTimeout(() => socket.destroy(), 10);
    };
    await send();
    const begun = await send();
    expect(begun.errors.map((e) => e.code)).toEqual(['UPSTREAM_ERROR']);
    expect(seen.length).toBe(2);

    answer = (socket, request) => {
      if (!answered.has(request.connection)) {
        answered.add(request.connection);
        return void socket.write('HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}');
      }
      socket.destroy();
    };
    await send();
    const long = await send({ ...POST, body: JSON.stringify({ messages: ['x'.repeat(70_000)] }) });
    expect(long.errors.map((e) => e.code)).toEqual(['VLLM_NOT_READY']);
    expect(seen.length).toBe(4); // not sent a second time
  });

  it('fails with UPSTREAM_TIMEOUT when vLLM is silent for vllm.timeout, before its head or between events', async () => {
    await relay.close();
    relay = new VLLMRelay(`http://127.0.0.1:${port}`, 1_000);
    answer = () => undefined; // never answers
    let log = await send();
    expect(log.errors.map((e) => [e.code, e.message])).toEqual([['UPSTREAM_TIMEOUT', 'vLLM sent nothing for 1 s (vllm.timeout)']]);
    // Events 200 ms apart keep it alive (for 2 s in all, twice the timeout); a silence of 2.5 s does not.
    answer = async (socket) => {
      socket.write('HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n');
      for (let i = 0; i < 10; i += 1) {
        socket.write('1\r\nx\r\n');
        await sleep(200);
      }
      await sleep(2_300);
      if (!socket.destroyed) socket.write('0\r\n\r\n');
    };
    log = await send();
    expect([log.body.toString(), log.errors.map((e) => e.code)]).toEqual(['x'.repeat(10), ['UPSTREAM_TIMEOUT']]);
    await sleep(20);
    expect(closedConnections).toBe(2); // both connections dropped, so vLLM stops
  });

  it('pauses vLLM while the sink cannot take more, then hands over the rest in order; no timeout while paused', async () => {
    await relay.close();
    relay = new VLLMRelay(`http://127.0.0.1:${port}`, 100);
    const events = Array.from({ length: 20 }, (_, i) => `data: ${i}\n\n`);
    const other = [`data: ${'x'.repeat(500)}\n\n`];
    // One write: the relay reads it in one go. Other requests, read while this one is paused, are
    // read into the same buffer: what is left of this one must have been kept apart.
    answer = (socket, request) => void socket.write(chunked(request.head.startsWith('POST /other') ? other : events));
    let resumeLater: (() => void) | null = null;
    let calls = 0;
    const r = recorder((_chunk, resume) => {
      calls += 1;
      if (calls % 5 !== 0) return true;
      resumeLater = resume;
      return false;
    });
    relay.send(POST, r.sink);
    for (let round = 1; round <= 3; round += 1) {
      await sleep(250); // longer than vllm.timeout: paused, nothing is timed
      expect([r.log.pieces, r.log.errors]).toEqual([5 * round, []]);
      expect((await send({ ...POST, path: '/other' })).body.toString()).toBe(other.join(''));
      resumeLater!();
    }
    await sleep(250);
    expect(r.log.pieces).toBe(20);
    resumeLater!();
    await r.done;
    expect([r.log.body.toString(), r.log.ends, r.log.errors]).toEqual([events.join(''), 1, []]);
  });

  it('abort ends the request to vLLM at once: the sink hears the reason, vLLM sees its connection close', async () => {
    answer = (socket) => void socket.write('HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n');
    const r = recorder();
    const abort = relay.send(POST, r.sink);
    while (r.log.pieces === 0) await sleep(5);
    const reason = new AppError('UPSTREAM_ERROR', 'the client left');
    abort(reason);
    abort(reason);
    await sleep(20);
    expect(r.log.errors).toEqual([reason]);
    expect(closedConnections).toBe(1);
    // An abort after the end changes nothing, even with the connection serving someone else.
    answer = (socket) => void socket.write('HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\nx');
    const first = recorder();
    const late = relay.send(POST, first.sink);
    await first.done;
    const second = recorder();
    relay.send(POST, second.sink);
    late(reason);
    await second.done;
    expect([first.log.errors, second.log.errors, second.log.ends]).toEqual([[], [], 1]);
  });

  it('fails the request, not the process, when a sink throws', async () => {
    answer = (socket) => void socket.write('HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\nx');
    const r = recorder(() => {
      throw new Error('a bug in a sink');
    });
    relay.send(POST, r.sink);
    await r.done;
    expect(r.log.errors.map((e) => e.code)).toEqual(['INTERNAL']);
    await sleep(20);
    expect(closedConnections).toBe(1);
  });

  it('reads the next request on a connection that was paused on the last piece of the one before', async () => {
    answer = (socket) => void socket.write(chunked(['data: 1\n\n', 'data: 2\n\n']));
    const later: { resume?: () => void } = {};
    const r = recorder((chunk, resume) => {
      if (!chunk.toString().includes('2')) return true;
      later.resume = resume; // the end of the body is still unread behind this piece
      return false;
    });
    relay.send(POST, r.sink);
    while (later.resume === undefined) await sleep(5);
    await sleep(20);
    expect(r.log.ends).toBe(0);
    later.resume();
    await r.done;
    const next = await send();
    expect([r.log.ends, next.ends, next.errors, next.body.toString()]).toEqual([1, 1, [], 'data: 1\n\ndata: 2\n\n']);
    expect(new Set(seen.map((x) => x.connection)).size).toBe(1);
  });

  it('a resume kept from an earlier request does not resume a later one on the same connection', async () => {
    answer = (socket) => void socket.write('HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\nx');
    let stale: (() => void) | null = null;
    await send(POST, (_chunk, resume) => {
      stale = resume; // asked for a pause on its last piece: the request ends anyway
      return false;
    });
    answer = (socket) => void socket.write(chunked(['a', 'b', 'c']));
    const later = recorder(() => false);
    relay.send(POST, later.sink);
    while (later.log.pieces === 0) await sleep(5);
    stale!();
    await sleep(30);
    expect([later.log.pieces, later.log.ends]).toEqual([1, 0]);
    expect(new Set(seen.map((x) => x.connection)).size).toBe(1);
  });

  it('takes a resume that comes before the sink returns false as "go on"', async () => {
    answer = (socket) => void socket.write(chunked(['a', 'b', 'c']));
    const log = await send(POST, (_chunk, resume) => {
      resume();
      return false;
    });
    expect([log.body.toString(), log.ends, log.errors]).toEqual(['abc', 1, []]);
  });

  it('ends 204 and 304 answers at their head, whatever their framing headers say', async () => {
    answer = (socket) => void socket.write('HTTP/1.1 304 Not Modified\r\ncontent-length: 120\r\n\r\n');
    let log = await send();
    expect([log.status, log.body.length, log.ends, log.errors]).toEqual([304, 0, 1, []]);
    answer = (socket) => void socket.write('HTTP/1.1 204 No Content\r\ntransfer-encoding: chunked\r\n\r\n');
    log = await send();
    expect([log.status, log.ends, log.errors]).toEqual([204, 1, []]);
    expect(new Set(seen.map((x) => x.connection)).size).toBe(1);
  });

  it('does not keep an HTTP/1.0 chunked answer’s connection, keep-alive or not', async () => {
    answer = (socket) => void socket.write('HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ntransfer-encoding: chunked\r\n\r\n1\r\nx\r\n0\r\n\r\n');
    await send();
    await send();
    expect(seen.map((x) => x.connection)).toEqual([1, 2]);
  });

  it('never reuses a connection idle for longer than the keep-alive limit', async () => {
    await relay.close();
    relay = new VLLMRelay(`http://127.0.0.1:${port}`, 10_000, undefined, 100); // the sweep runs once a second
    answer = (socket) => void socket.write('HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\nx');
    await send();
    await send();
    await sleep(150);
    const log = await send();
    expect([log.ends, log.errors]).toEqual([1, []]);
    expect(seen.map((x) => x.connection)).toEqual([1, 1, 2]);
  });

  it('reuses a connection only within the idle time vLLM names (Keep-Alive: timeout=N, less 1 s), as Node’s agent does', async () => {
    // timeout=2: reused for 1 s; timeout=1 (or 0): never reused; no timeout named: the relay's own limit.
    const keepAlive = ['timeout=2', 'timeout=2', 'max=100, timeout=1', 'timeout=0', 'max=5', 'max=5'];
    answer = (socket, request) => void socket.write(`HTTP/1.1 200 OK\r\nkeep-alive: ${keepAlive[seen.indexOf(request)]}\r\ncontent-length: 1\r\n\r\nx`);
    await send();
    await send(); // at once: reused
    await sleep(1_100);
    await send(); // idle past timeout=2 less the margin: a new connection; it says timeout=1
    await send(); // so this one is not reused; it says timeout=0
    await send(); // nor this one; it names no timeout
    await send(); // reused (within the relay's 4 s)
    expect(seen.map((x) => x.connection)).toEqual([1, 1, 2, 3, 4, 4]);
  });

  it('closing the relay fails what is in flight, paused or reading until close, never as a success', async () => {
    answer = (socket) => void socket.write('HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\r\n{"partial":');
    const untilClose = recorder();
    relay.send(POST, untilClose.sink);
    while (untilClose.log.pieces === 0) await sleep(5);
    answer = (socket) => void socket.write(chunked(['a', 'b']));
    const paused = recorder(() => false);
    relay.send(POST, paused.sink);
    while (paused.log.pieces === 0) await sleep(5);
    await relay.close();
    await Promise.all([untilClose.done, paused.done]);
    expect([untilClose.log.ends, untilClose.log.errors.map((e) => e.code)]).toEqual([0, ['VLLM_NOT_READY']]);
    expect([paused.log.ends, paused.log.errors.map((e) => e.code)]).toEqual([0, ['VLLM_NOT_READY']]);
  });

  it('a sink that throws in onEnd or onError does not take the process down either', async () => {
    answer = (socket) => void socket.end('HTTP/1.1 200 OK\r\n\r\nx'); // ends with the connection: onEnd from its close
    let ended = 0;
    relay.send(POST, { onStart: () => undefined, onData: () => true, onEnd: () => { ended += 1; throw new Error('a bug in onEnd'); }, onError: () => undefined });
    while (ended === 0) await sleep(5);
    answer = (socket) => void socket.destroy();
    let failed = 0;
    relay.send(POST, { onStart: () => undefined, onData: () => true, onEnd: () => undefined, onError: () => { failed += 1; throw new Error('a bug in onError'); } });
    while (failed === 0) await sleep(5);
    answer = (socket) => void socket.write('HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\nx');
    const log = await send();
    expect([ended, failed, log.ends]).toEqual([1, 1, 1]);
  });

  it('refuses requests once closed, asynchronously', async () => {
    await relay.close();
    const r = recorder();
    relay.send(POST, r.sink);
    expect(r.log.errors).toEqual([]);
    await r.done;
    expect(r.log.errors.map((e) => e.code)).toEqual(['VLLM_NOT_READY']);
  });
});
