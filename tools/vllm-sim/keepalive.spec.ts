import type { IncomingMessage, ServerResponse } from 'node:http';
import { connect, type Socket } from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { UvicornServer, sendJson } from './fastapi';

/** Short enough for a quick test; Node's own keep-alive would close it 1 s late. */
const KEEP_ALIVE_MS = 2_000;
/** Pauses well under the keep-alive time (over 3× shorter), however busy the machine. */
const PAUSE_MS = 600;

/** The shared uvicorn layer with a trivial app: JSON at once, or a stream of chunks on /stream. */
class TestServer extends UvicornServer {
  constructor(readonly socketPath: string) {
    super(KEEP_ALIVE_MS, { uvicorn: () => undefined, access: () => undefined });
  }

  listen(): Promise<void> {
    return this.listenOn(this.socketPath);
  }

  protected onRequest(req: IncomingMessage, res: ServerResponse): void {
    req.resume();
    if (req.url !== '/stream') return sendJson(res, 200, { ok: true });
    // Longer than the keep-alive time, with pauses shorter than it.
    res.writeHead(200, { 'content-type': 'text/event-stream' });
    let sent = 0;
    const timer = setInterval(() => {
      if (++sent < 5) return void res.write(`data: ${sent}\n\n`);
      clearInterval(timer);
      res.end('data: [DONE]\n\n');
    }, PAUSE_MS);
  }
}

/** A raw connection: each response's head and body as text, and when the server closed it. */
class Conn {
  private buffered = '';
  private waiter?: () => void;
  closedAt?: number;

  constructor(readonly socket: Socket) {
    socket.setEncoding('latin1');
    socket.on('data', (text: string) => {
      this.buffered += text;
      this.waiter?.();
    });
    socket.on('close', () => {
      this.closedAt = Date.now();
      this.waiter?.();
    });
  }

  static open(socketPath: string): Promise<Conn> {
    return new Promise((resolve, reject) => {
      const socket = connect(socketPath, () => resolve(new Conn(socket))).once('error', reject);
    });
  }

  /** Sends a request and reads its answer (content-length or chunked). */
  async exchange(request: string): Promise<{ head: string; body: string }> {
    this.socket.write(request);
    for (;;) {
      const end = this.buffered.indexOf('\r\n\r\n');
      if (end !== -1) {
        const head = this.buffered.slice(0, end);
        const rest = this.buffered.slice(end + 4);
        const chunked = /\r\ntransfer-encoding: chunked/i.test(head);
        const last = rest.indexOf('\r\n0\r\n\r\n');
        const bodyEnd = !chunked ? Number(/\r\ncontent-length: (\d+)/i.exec(head)?.[1] ?? 0) : last === -1 ? -1 : last + 7;
        if (bodyEnd !== -1 && rest.length >= bodyEnd) {
          this.buffered = rest.slice(bodyEnd);
          return { head, body: rest.slice(0, bodyEnd) };
        }
      }
      if (this.closedAt !== undefined) throw new Error(`closed before a whole answer: ${this.buffered}`);
      await new Promise<void>((resolve) => (this.waiter = resolve));
    }
  }

  closed(): Promise<void> {
    return this.closedAt !== undefined ? Promise.resolve() : new Promise((resolve) => this.socket.once('close', () => resolve()));
  }
}

const GET = (url: string, extra = ''): string => `GET ${url} HTTP/1.1\r\nhost: sim\r\n${extra}\r\n`;

describe("the simulator's uvicorn keep-alive", () => {
  let server: TestServer;
  let conns: Conn[];

  beforeEach(async () => {
    conns = [];
    server = new TestServer(path.join(os.tmpdir(), `vllm-sim-keepalive-${process.pid}-${Date.now()}.sock`));
    await server.listen();
  });

  afterEach(async () => {
    for (const c of conns) c.socket.destroy();
    await server.shutdown();
  });

  const open = async (): Promise<Conn> => {
    const c = await Conn.open(server.socketPath);
    conns.push(c);
    return c;
  };

  it('sends no Connection or Keep-Alive header on a kept HTTP/1.1 connection, as uvicorn', async () => {
    const c = await open();
    for (const url of ['/health', '/stream', '/health']) {
      const { head } = await c.exchange(GET(url));
      expect(head).toMatch(/^HTTP\/1\.1 200 OK\r\n/);
      expect(head).not.toMatch(/\r\n(connection|keep-alive):/i);
    }
    expect(c.closedAt).toBeUndefined(); // all three on one connection
  });

  it('closes a connection once idle for the keep-alive time, not 1 s later as Node would', async () => {
    const c = await open();
    await c.exchange(GET('/health'));
    const answeredAt = Date.now();
    await c.closed();
    const idle = c.closedAt! - answeredAt;
    expect(idle).toBeGreaterThanOrEqual(KEEP_ALIVE_MS - 20);
    expect(idle).toBeLessThan(KEEP_ALIVE_MS + 400);
  });

  it('keeps a connection that is never idle that long: requests, and a stream longer than the keep-alive time', async () => {
    const c = await open();
    for (let i = 0; i < 4; i++) {
      await c.exchange(GET('/health'));
      await sleep(PAUSE_MS);
    }
    const { body } = await c.exchange(GET('/stream'));
    expect(body).toContain('data: [DONE]');
    expect(c.closedAt).toBeUndefined();
    await c.exchange(GET('/health'));
  });

  it("still answers a client's Connection: close, and HTTP/1.0, with Connection: close and closes", async () => {
    for (const request of [GET('/health', 'connection: close\r\n'), 'GET /health HTTP/1.0\r\n\r\n']) {
      const c = await open();
      const { head } = await c.exchange(request);
      expect(head).toMatch(/\r\nconnection: close(\r\n|$)/i);
      expect(head).not.toMatch(/\r\nkeep-alive:/i);
      await c.closed();
    }
  });
});
