import { type IncomingMessage, type Server, type ServerResponse, createServer } from 'node:http';
import { type AddressInfo, type Socket, connect } from 'node:net';
import { ChunkedBody } from './sse.writer';

const PIECES: Array<string | Buffer> = ['data: a\n\n', Buffer.from('data: bé\n\n'), '', Buffer.alloc(0), 'data: ünï\n\n'];
/** A stall limit for tests that do not cut anyone off. */
const STALL_MS = 5_000;
const BODY = 'data: a\n\ndata: bé\n\ndata: ünï\n\n';

let server: Server;
let port: number;
/** Per request (by URL): what the handler does with its response. */
let handle: (req: IncomingMessage, res: ServerResponse) => void;

beforeEach(async () => {
  server = createServer((req, res) => handle(req, res));
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  port = (server.address() as AddressInfo).port;
});

afterEach(async () => {
  server.closeAllConnections();
  await new Promise((resolve) => server.close(resolve));
});

/** Sends raw request bytes; resolves with every byte answered until the server closes or `until` matches. */
function raw(request: string, until: (text: string) => boolean): Promise<string> {
  return new Promise((resolve, reject) => {
    const socket = connect(port, '127.0.0.1', () => socket.write(request));
    let text = '';
    socket.on('data', (chunk) => {
      text += chunk.toString('utf8');
      if (until(text)) {
        socket.destroy();
        resolve(text);
      }
    });
    socket.on('end', () => resolve(text));
    socket.on('error', reject);
  });
}

/** The bodies of the chunked responses in `text`, decoded. */
function chunkedBodies(text: string): string[] {
  return text
    .split(/HTTP\/1\.1 200 OK\r\n/)
    .slice(1)
    .map((response) => {
      let rest = Buffer.from(response.slice(response.indexOf('\r\n\r\n') + 4));
      const body: Buffer[] = [];
      for (;;) {
        const eol = rest.indexOf('\r\n');
        const size = parseInt(rest.subarray(0, eol).toString('latin1'), 16);
        if (size === 0) break;
        body.push(rest.subarray(eol + 2, eol + 2 + size));
        expect(rest.subarray(eol + 2 + size, eol + 4 + size).toString()).toBe('\r\n');
        rest = rest.subarray(eol + 4 + size);
      }
      return Buffer.concat(body).toString('utf8');
    });
}

function writeAll(res: ServerResponse): void {
  res.writeHead(200, { 'content-type': 'text/event-stream' });
  const body = new ChunkedBody(res, STALL_MS);
  for (const piece of PIECES) body.write(piece);
  body.end();
}

describe('ChunkedBody', () => {
  it('frames pieces by hand once the head is out, byte lengths and all; empty pieces write nothing', async () => {
    let resWrites = 0;
    handle = (_req, res) => {
      const write = res.write.bind(res) as (chunk: unknown) => boolean;
      res.write = ((chunk: unknown) => {
        resWrites += 1;
        return write(chunk);
      }) as typeof res.write;
      writeAll(res);
    };
    const text = await raw('GET / HTTP/1.1\r\nHost: x\r\n\r\n', (t) => t.endsWith('0\r\n\r\n'));
    expect(text).toContain('Transfer-Encoding: chunked');
    expect(text).toContain('\r\n\r\n9\r\ndata: a\n\n\r\nb\r\ndata: bé\n\n\r\nd\r\ndata: ünï\n\n\r\n0\r\n\r\n');
    expect(chunkedBodies(text)).toEqual([BODY]);
    expect(resWrites).toBe(1); // the first piece, with the head; the rest went straight to the socket
  });

  it('sends the pieces written in one callback in one socket write, when the callback is done', async () => {
    const writes: number[] = [];
    const flushed: number[] = [];
    handle = (_req, res) => {
      res.writeHead(200, { 'content-type': 'text/event-stream' });
      const body = new ChunkedBody(res, STALL_MS);
      body.write('data: head\n\n'); // through res.write, with the head
      setImmediate(() => {
        const socket = res.socket!;
        const write = socket.write.bind(socket) as (data: unknown, encoding?: BufferEncoding) => boolean;
        socket.write = ((data: unknown, encoding?: BufferEncoding) => {
          writes.push(Buffer.byteLength(data as string, encoding));
          return write(data, encoding);
        }) as typeof socket.write;
        const piece = Buffer.alloc(12);
        for (let i = 0; i < 50; i += 1) {
          const n = piece.write(`data: ${i}\n\n`);
          body.write(piece.subarray(0, n)); // one read's events, each copied: the caller reuses its buffer
        }
        piece.fill('x');
        flushed.push(writes.length); // nothing written yet
        queueMicrotask(() => {
          flushed.push(writes.length); // one write, once the callback was done
          body.write('data: é\n\n'); // text after bytes: what was gathered is written first
          body.write(Buffer.from('data: last\n\n'));
          flushed.push(writes.length);
          body.end(); // writes what is gathered, then the last chunk
          flushed.push(writes.length);
        });
      });
    };
    const text = await raw('GET / HTTP/1.1\r\nHost: x\r\n\r\n', (t) => t.endsWith('\r\n0\r\n\r\n'));
    const events = Array.from({ length: 50 }, (_, i) => `data: ${i}\n\n`).join('');
    expect(chunkedBodies(text)).toEqual([`data: head\n\n${events}data: é\n\ndata: last\n\n`]);
    expect(flushed).toEqual([0, 1, 2, 4]); // the end: what was gathered, then res.end's last chunk
  });

  it('a slow client gets every byte intact, text and bytes, however the socket queues them', async () => {
    const expected: string[] = [];
    handle = (_req, res) => {
      res.writeHead(200, { 'content-type': 'text/event-stream' });
      const body = new ChunkedBody(res, STALL_MS);
      body.write('data: head\n\n');
      expected.push('data: head\n\n');
      let batch = 0;
      const next = () => {
        if (batch === 2000) return body.end();
        // 1–3 pieces of up to ~6 KB per batch, each batch's bytes its own letter.
        const letter = String.fromCharCode(97 + (batch % 26));
        for (let i = 0; i <= batch % 3; i += 1) {
          const piece = `data: ${letter.repeat(((batch * 7919 + i * 104729) % 6000) + 1)}\n\n`;
          body.write(batch % 2 === 0 ? piece : Buffer.from(piece));
          expected.push(piece);
        }
        batch += 1;
        setImmediate(next);
      };
      setImmediate(next);
    };
    const text = await new Promise<string>((resolve, reject) => {
      let received = Buffer.alloc(0);
      const socket = connect(port, '127.0.0.1', () => socket.write('GET / HTTP/1.1\r\nHost: x\r\n\r\n'));
      socket.pause(); // the socket fills up, so writes wait in its queue
      setTimeout(() => socket.resume(), 200);
      socket.on('data', (chunk: Buffer) => {
        received = Buffer.concat([received, chunk]);
        if (received.subarray(-7).toString() === '\r\n0\r\n\r\n') socket.destroy();
      });
      socket.on('close', () => resolve(received.toString('latin1')));
      socket.on('error', reject);
    });
    expect(chunkedBodies(text)).toEqual([expected.join('')]);
  });

  it('copies a Buffer it is given, also the first one, which goes out with the head', async () => {
    handle = (_req, res) => {
      res.writeHead(200, { 'content-type': 'text/event-stream' });
      const body = new ChunkedBody(res, STALL_MS);
      const piece = Buffer.from('data: 1\n\n');
      body.write(piece);
      piece.write('data: 2\n\n'); // the caller's buffer is read into again
      body.write(piece);
      piece.fill('#');
      body.end();
    };
    const text = await raw('GET / HTTP/1.1\r\nHost: x\r\n\r\n', (t) => t.endsWith('\r\n0\r\n\r\n'));
    expect(chunkedBodies(text)).toEqual(['data: 1\n\ndata: 2\n\n']);
  });

  it('a writer paused by write() is always resumed: "no" comes only with a \'drain\' to come', async () => {
    // As the relay does: write until told "no", wait for the drain, go on — starting in the tick
    // that sent the head, while Node corks the socket.
    const piece = `data: ${'x'.repeat(1000)}\n\n`;
    handle = (_req, res) => {
      res.writeHead(200, { 'content-type': 'text/event-stream' });
      const body = new ChunkedBody(res, 5_000);
      let left = 300;
      const pump = () => {
        while (left > 0) {
          left -= 1;
          if (!body.write(piece)) return body.whenDrained(pump);
        }
        body.end();
      };
      pump();
    };
    const done = raw('GET / HTTP/1.1\r\nHost: x\r\n\r\n', (t) => t.endsWith('\r\n0\r\n\r\n'));
    const text = await Promise.race([done, new Promise<string>((resolve) => setTimeout(() => resolve('stalled'), 3_000))]);
    expect(text === 'stalled' ? text : chunkedBodies(text)[0].length).toBe(300 * piece.length);
  });

  it('flushes a large batch at once, so a writer looping while write() is true meets backpressure', async () => {
    let calls = 0;
    handle = (_req, res) => {
      res.writeHead(200, { 'content-type': 'text/event-stream' });
      const body = new ChunkedBody(res, STALL_MS);
      body.write('data: head\n\n');
      setImmediate(() => {
        const piece = Buffer.alloc(4096, 'y');
        while (body.write(piece)) calls += 1; // the client does not read: this must stop
        body.end();
      });
    };
    const socket = connect(port, '127.0.0.1', () => socket.write('GET / HTTP/1.1\r\nHost: x\r\n\r\n'));
    socket.pause();
    const deadline = Date.now() + 5_000;
    while (calls === 0 && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 20));
    socket.destroy();
    expect(calls).toBeGreaterThan(0);
    expect(calls).toBeLessThan(10_000); // bounded by the socket's buffers, not by memory
  });

  it('leaves an HTTP/1.0 answer unchunked, and ignores writes after its end', async () => {
    handle = (_req, res) => {
      writeAll(res);
      new ChunkedBody(res, STALL_MS).write('data: late\n\n'); // would be an unhandled write-after-end error
    };
    const text = await raw('GET / HTTP/1.0\r\n\r\n', () => false);
    expect(text).not.toContain('chunked');
    expect(text.slice(text.indexOf('\r\n\r\n') + 4)).toBe(BODY);
  });

  it('keeps pipelined answers apart: the second waits for the first', async () => {
    handle = (req, res) => {
      if (req.url === '/first') {
        // The second request is answered while this one is still writing.
        res.writeHead(200, { 'content-type': 'text/event-stream' });
        const body = new ChunkedBody(res, STALL_MS);
        body.write('data: 1\n\n');
        setTimeout(() => {
          body.write('data: 2\n\n');
          body.write('data: 3\n\n');
          body.end();
        }, 50);
        return;
      }
      writeAll(res);
    };
    const text = await raw('GET /first HTTP/1.1\r\nHost: x\r\n\r\nGET /second HTTP/1.1\r\nHost: x\r\n\r\n', (t) => t.split('\r\n0\r\n\r\n').length === 3);
    expect(chunkedBodies(text)).toEqual(['data: 1\n\ndata: 2\n\ndata: 3\n\n', BODY]);
  });

  it('closes the response of a client that half-closes and reads no more, rather than writing into nothing', async () => {
    let closed = false;
    let timer: NodeJS.Timeout | undefined;
    handle = (_req, res) => {
      res.writeHead(200, { 'content-type': 'text/event-stream' });
      const body = new ChunkedBody(res, STALL_MS);
      body.write('data: head\n\n');
      body.write(Buffer.alloc(4 * 1024 * 1024, 'x')); // more than the kernel buffers take: some stays queued here
      timer = setInterval(() => body.write(Buffer.from('data: more\n\n')), 5);
      res.on('close', () => {
        closed = true;
        clearInterval(timer);
      });
    };
    const socket = connect(port, '127.0.0.1', () => socket.write('GET / HTTP/1.1\r\nHost: x\r\n\r\n'));
    socket.on('error', () => undefined);
    socket.pause(); // reads nothing
    await new Promise((resolve) => setTimeout(resolve, 50));
    socket.end(); // FIN: Node ends the server's side of the connection
    const deadline = Date.now() + 2_000;
    while (!closed && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 10));
    clearInterval(timer);
    socket.destroy();
    expect(closed).toBe(true);
  });

  it('resumes once a slow client has read, and cuts off one that stops reading', async () => {
    const piece = Buffer.alloc(256 * 1024, 'x');
    const events: string[] = [];
    handle = (req, res) => {
      res.writeHead(200, { 'content-type': 'text/event-stream' });
      const body = new ChunkedBody(res, 300);
      res.on('close', () => events.push(`${req.url} closed`));
      const fill = () => {
        while (body.write(piece));
        events.push(`${req.url} full`);
        body.whenDrained(() => {
          events.push(`${req.url} resumed`);
          // The stuck client's kernel buffers take some; keep writing until they are full too.
          if (req.url === '/stuck') fill();
          else body.end();
        });
      };
      fill();
    };
    // A client that starts reading after 100 ms.
    const reader = new Promise<void>((resolve) => {
      const socket = connect(port, '127.0.0.1', () => socket.write('GET /slow HTTP/1.1\r\nHost: x\r\n\r\n'));
      socket.pause();
      setTimeout(() => socket.resume(), 100);
      socket.on('data', (chunk) => {
        if (chunk.toString('latin1').endsWith('0\r\n\r\n')) {
          socket.destroy();
          resolve();
        }
      });
    });
    await reader;
    expect(events.slice(0, 2)).toEqual(['/slow full', '/slow resumed']);
    // A client that never reads.
    const stuck = connect(port, '127.0.0.1', () => stuck.write('GET /stuck HTTP/1.1\r\nHost: x\r\n\r\n'));
    stuck.pause();
    const deadline = Date.now() + 5_000;
    while (!events.includes('/stuck closed') && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 20));
    stuck.destroy();
    const stuckEvents = events.filter((event) => event.startsWith('/stuck'));
    expect(stuckEvents.slice(-2)).toEqual(['/stuck full', '/stuck closed']);
  });

  /** A raw connection that sends `request` and reads nothing until told. */
  function paused(request: string): Socket {
    const socket = connect(port, '127.0.0.1', () => socket.write(request));
    socket.on('error', () => undefined);
    socket.pause();
    return socket;
  }

  async function until(condition: () => boolean, timeoutMs: number): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    while (!condition() && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 10));
  }

  /**
   * Writes `total` bytes as the relay does — 64 KiB pieces while write() says more, the next
   * after 'drain' — then ends; the head says chunked (hand-framed pieces) or a Content-Length.
   */
  function relayLike(res: ServerResponse, framing: 'chunked' | 'content-length', total: number, stallMs: number): void {
    res.writeHead(200, framing === 'chunked' ? { 'content-type': 'text/event-stream' } : { 'content-length': String(total) });
    const body = new ChunkedBody(res, stallMs);
    const piece = Buffer.alloc(64 * 1024, 'z');
    let sent = 0;
    const next = () => {
      while (sent < total) {
        const size = Math.min(piece.length, total - sent);
        sent += size;
        if (!body.write(piece.subarray(0, size)) && sent < total) return body.whenDrained(next);
      }
      body.end();
    };
    next();
  }

  it("a stream cut while it waits for 'drain' leaves no listener on the connection, which lives on for the next request", async () => {
    let before = -1;
    let waiting = -1;
    let after = -1;
    let resumed = false;
    handle = (_req, res) => {
      res.writeHead(200, { 'content-type': 'text/event-stream' });
      const body = new ChunkedBody(res, STALL_MS);
      body.write('data: head\n\n');
      const socket = res.socket!;
      before = socket.listenerCount('drain');
      while (body.write(Buffer.alloc(64 * 1024, 'x')));
      body.whenDrained(() => (resumed = true));
      waiting = socket.listenerCount('drain');
      body.end('data: cut\n\n'); // vLLM failed meanwhile: the stream ends with an error event
      after = socket.listenerCount('drain');
    };
    const client = paused('GET / HTTP/1.1\r\nHost: x\r\n\r\n');
    await until(() => after >= 0, 3_000);
    client.resume(); // the client reads it all: 'drain' comes, and must resume nothing
    await new Promise((resolve) => client.on('data', (d: Buffer) => d.includes('0\r\n\r\n') && resolve(undefined)));
    client.destroy();
    expect([waiting - before, after - before, resumed]).toEqual([1, 0, false]);
  });

  it('cuts off a client that takes nothing after the end, though its last piece was accepted', async () => {
    let endedAt = 0;
    let closedAt = 0;
    let lastAccepted: boolean | null = null;
    handle = (_req, res) => {
      res.writeHead(200, { 'content-type': 'text/event-stream' });
      const body = new ChunkedBody(res, 200);
      body.write('data: head\n\n');
      res.on('close', () => (closedAt = Date.now()));
      const piece = Buffer.alloc(4 * 1024, 'x');
      const next = () => {
        // Pieces the kernel takes at once, until its buffers are full; then a small last one, the end.
        if (res.socket!.writableLength === 0) {
          body.write(piece);
          return void setImmediate(next);
        }
        lastAccepted = body.write('data: last\n\n');
        body.end();
        endedAt = Date.now();
      };
      setImmediate(next);
    };
    const client = paused('GET / HTTP/1.1\r\nHost: x\r\n\r\n'); // reads nothing
    await until(() => closedAt > 0, 3_000);
    client.destroy();
    expect(lastAccepted).toBe(true); // no wait for 'drain', so nothing else watched the client
    expect(endedAt).toBeGreaterThan(0);
    expect(closedAt - endedAt).toBeGreaterThanOrEqual(190);
    expect(closedAt - endedAt).toBeLessThan(1_500);
  });

  it('says "no more" for the piece that fills the socket, not for the one after it', async () => {
    const answers: Array<[boolean, number]> = [];
    let mark = 0;
    handle = (_req, res) => {
      res.writeHead(200, { 'content-type': 'text/event-stream' });
      const body = new ChunkedBody(res, 1_000);
      body.write('data: head\n\n');
      const socket = res.socket!;
      mark = socket.writableHighWaterMark;
      const piece = Buffer.alloc(5 * 1024, 'p');
      let full = false;
      const next = () => {
        // Once the kernel takes no more, one piece per callback: what did write() say, and what
        // did the socket hold once the piece was flushed?
        full ||= socket.writableLength > 0;
        const more = body.write(piece);
        if (!full) return void setImmediate(next);
        setImmediate(() => {
          answers.push([more, socket.writableLength]);
          if (more) next();
          else res.destroy();
        });
      };
      setImmediate(next);
    };
    const client = paused('GET / HTTP/1.1\r\nHost: x\r\n\r\n');
    await until(() => answers.length > 0 && !answers[answers.length - 1][0], 3_000);
    client.destroy();
    expect(answers.length).toBeGreaterThan(0);
    for (const [more, held] of answers) expect([more, held < mark]).toEqual([more, more]);
  });

  it.each(['chunked', 'content-length'] as const)('a slow client that keeps reading gets every byte of a %s answer, however long after the end it takes', async (framing) => {
    const size = 12 * 1024 * 1024; // more than the kernel buffers hold: it takes the client a while
    let endedAt = 0;
    let finishedAt = 0;
    let closed = false;
    let waited = false;
    handle = (_req, res) => {
      res.writeHead(200, framing === 'chunked' ? { 'content-type': 'text/event-stream' } : { 'content-length': String(size + 12) });
      const body = new ChunkedBody(res, 1_000);
      res.on('finish', () => (finishedAt = Date.now()));
      res.on('close', () => (closed = true));
      body.write('data: head\n\n');
      setImmediate(() => {
        // A piece the client cannot take at once, so its writer waits for 'drain'; the end comes
        // meanwhile (vLLM's answer was complete), with what is left.
        waited = !body.write(Buffer.alloc(size - 2, 'z'));
        if (waited) body.whenDrained(() => undefined);
        body.write('\n\n');
        body.end();
        endedAt = Date.now();
      });
    };
    const client = paused('GET / HTTP/1.1\r\nHost: x\r\n\r\n');
    let first: Buffer | null = null; // the head and the first piece
    let received = 0;
    let tail = '';
    // At most 64 KiB every 10 ms: the kernel frees room for the server in bursts, a few a second.
    const reader = setInterval(() => {
      const chunk = (client.read(64 * 1024) ?? client.read()) as Buffer | null;
      if (chunk === null) return;
      first ??= chunk;
      received += chunk.length;
      tail = (tail + chunk.subarray(-16).toString('latin1')).slice(-16);
    }, 10);
    const head = () => (first === null ? 0 : first.indexOf('\r\n\r\n') + 4);
    // The body: 12 bytes, size - 2, then 2; chunked, each piece framed, then the last chunk.
    const expected = () => head() + (framing === 'chunked' ? `c\r\n\r\n${(size - 2).toString(16)}\r\n\r\n2\r\n\r\n0\r\n\r\n`.length : 0) + size + 12;
    await until(() => finishedAt > 0 || closed, 20_000);
    await until(() => received === expected(), 10_000);
    clearInterval(reader);
    client.destroy();
    expect(waited).toBe(true);
    expect(finishedAt - endedAt).toBeGreaterThan(1_000); // it took the client longer than the stall limit
    expect(received).toBe(expected()); // every byte
    expect(tail.endsWith(framing === 'chunked' ? 'zz\r\n2\r\n\n\n\r\n0\r\n\r\n' : 'zzz\n\n')).toBe(true);
  });

  it.each(['chunked', 'content-length'] as const)('cuts off a client that stops reading partway through a %s answer', async (framing) => {
    const total = 16 * 1024 * 1024;
    const log: string[] = [];
    let closedAt = 0;
    handle = (_req, res) => {
      relayLike(res, framing, total, 200);
      res.on('finish', () => log.push('finished'));
      res.on('close', () => {
        log.push('closed');
        closedAt = Date.now();
      });
    };
    const client = paused('GET / HTTP/1.1\r\nHost: x\r\n\r\n');
    let received = 0;
    client.on('data', (chunk: Buffer) => {
      received += chunk.length;
      if (received > 1024 * 1024) client.pause(); // and never again
    });
    client.resume();
    await until(() => closedAt > 0, 5_000);
    client.destroy();
    expect(log).toEqual(['closed']); // cut off, never finished
    expect(received).toBeLessThan(total);
  });

  it.each(['chunked', 'content-length'] as const)('cuts off a client that reads nothing of a %s answer after the stall limit, not twice it', async (framing) => {
    const stallMs = 1_000;
    let waitedAt = 0;
    let closedAt = 0;
    handle = (_req, res) => {
      res.writeHead(200, framing === 'chunked' ? { 'content-type': 'text/event-stream' } : { 'content-length': String(64 * 1024 * 1024) });
      const body = new ChunkedBody(res, stallMs);
      res.on('close', () => (closedAt = Date.now()));
      const piece = Buffer.alloc(64 * 1024, 'z');
      // Pieces as the writer would, until the kernel's buffers are full: the last wait for 'drain' never ends.
      const next = () => {
        while (body.write(piece));
        waitedAt = Date.now();
        body.whenDrained(next);
      };
      next();
    };
    const client = paused('GET / HTTP/1.1\r\nHost: x\r\n\r\n'); // reads nothing
    await until(() => closedAt > 0, 5_000);
    client.destroy();
    // Bytes the server queued after the check began are no progress of the client's.
    expect(closedAt - waitedAt).toBeGreaterThanOrEqual(stallMs - 50);
    expect(closedAt - waitedAt).toBeLessThan(1.7 * stallMs);
  });

  it('does not cut off an answer queued behind a stream that is still being generated', async () => {
    handle = (req, res) => {
      if (req.url === '/stream') {
        res.writeHead(200, { 'content-type': 'text/event-stream' });
        const body = new ChunkedBody(res, 200);
        let n = 0;
        const timer = setInterval(() => {
          body.write(`data: ${n}\n\n`);
          if (++n === 8) {
            clearInterval(timer);
            body.end();
          }
        }, 100); // 800 ms, four times the stall limit
        return;
      }
      // Pipelined behind the stream: its bytes wait for the connection. Its writer was told to
      // wait for 'drain', and ended: Node relays no 'drain' to an ended response.
      res.writeHead(200, { 'content-length': String(64 * 1024) });
      const body = new ChunkedBody(res, 200);
      if (!body.write(Buffer.alloc(64 * 1024, 'q'))) body.whenDrained(() => undefined);
      body.end();
    };
    const queuedBody = (text: string) => text.slice(text.lastIndexOf('\r\n\r\n') + 4);
    const text = await raw('GET /stream HTTP/1.1\r\nHost: x\r\n\r\nGET /queued HTTP/1.1\r\nHost: x\r\n\r\n', (t) => t.includes('\r\n0\r\n\r\n') && queuedBody(t).length === 64 * 1024);
    const [stream, queued] = text.split(/(?=HTTP\/1\.1 200 OK)/);
    expect(chunkedBodies(stream)).toEqual([Array.from({ length: 8 }, (_, i) => `data: ${i}\n\n`).join('')]);
    expect(queuedBody(queued) === 'q'.repeat(64 * 1024)).toBe(true);
  });
});
