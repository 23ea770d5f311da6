import { type IncomingMessage, type Server, type ServerOptions, type ServerResponse, createServer } from 'node:http';
import { type AddressInfo, type Socket, connect } from 'node:net';
import { Counter, Histogram, Registry } from 'prom-client';
import fc from 'fast-check';
import type { VLLMServerManager } from '../infrastructure/vllm-server.manager';
import type { VLLMClient } from '../infrastructure/vllm.client';
import { Buckets, Metrics, expose } from './metrics';
import { TrafficGate } from './traffic.gate';

const BOUNDS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300];

describe('metrics kept as plain numbers', () => {
  it('expose the same text as prom-client for the same observations', async () => {
    const label = fc.constantFrom('/v1/chat/completions', '/chat/completions', 'unmatched');
    const observation = fc.record({ route: label, method: fc.constantFrom('GET', 'POST'), status: fc.constantFrom(200, 400, 499, 503), seconds: fc.oneof(fc.constantFrom(...BOUNDS), fc.double({ min: 0, max: 400, noNaN: true })) });
    await fc.assert(
      fc.asyncProperty(fc.array(observation, { maxLength: 40 }), async (observations) => {
        const theirs = new Registry();
        const counter = new Counter({ name: 'requests_total', help: 'h', labelNames: ['route', 'method', 'status'], registers: [theirs] });
        const histogram = new Histogram({ name: 'duration_seconds', help: 'h', labelNames: ['route', 'method'], buckets: BOUNDS, registers: [theirs] });
        const ours = new Registry();
        const counts = new Map<string, { labels: Record<string, string>; value: number }>();
        const series = new Map<string, { labels: Record<string, string>; buckets: Buckets }>();
        expose(ours, 'requests_total', 'h', 'counter', () => [...counts.values()]);
        expose(ours, 'duration_seconds', 'h', 'histogram', () => [...series.values()].flatMap((s) => s.buckets.values('duration_seconds', s.labels)));
        for (const { route, method, status, seconds } of observations) {
          counter.inc({ route, method, status: String(status) });
          histogram.observe({ route, method }, seconds);
          const key = `${route} ${method} ${status}`;
          const count = counts.get(key) ?? { labels: { route, method, status: String(status) }, value: 0 };
          count.value += 1;
          counts.set(key, count);
          const one = series.get(`${route} ${method}`) ?? { labels: { route, method }, buckets: new Buckets(BOUNDS) };
          one.buckets.observe(seconds);
          series.set(`${route} ${method}`, one);
        }
        expect(await ours.metrics()).toBe(await theirs.metrics());
      }),
      { numRuns: 100 },
    );
  });
});

describe('Metrics on real connections', () => {
  const servers: Server[] = [];
  const clients: Socket[] = [];

  afterEach(async () => {
    for (const client of clients.splice(0)) client.destroy();
    for (const server of servers.splice(0)) {
      server.closeAllConnections();
      await new Promise((resolve) => server.close(resolve));
    }
  });

  /** Metrics over a real server whose requests are tracked by URL, then answered by `handle`. */
  async function tracked(handle: (req: IncomingMessage, res: ServerResponse) => void, options: ServerOptions = {}) {
    const manager = { snapshot: () => ({ mode: 'disabled' }) } as unknown as VLLMServerManager;
    const metrics = new Metrics(manager, new TrafficGate(8), {} as VLLMClient);
    let closed = 0;
    const server = createServer(options, (req, res) => {
      metrics.track(req, res, req.url!, 'id');
      res.on('close', () => (closed += 1));
      handle(req, res);
    });
    servers.push(server);
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    const { port } = server.address() as AddressInfo;
    return {
      connect(request: string) {
        const client = connect(port, '127.0.0.1', () => client.write(request));
        clients.push(client);
        client.on('error', () => undefined);
        return client;
      },
      closed: () => closed,
      /** `route status` of every request recorded, with its count. */
      async statuses(): Promise<string[]> {
        const text = await metrics.registry.metrics();
        return [...text.matchAll(/^tide_http_requests_total\{route="([^"]+)",method="\w+",status="(\d+)"\} (\d+)$/gm)].map(([, route, status, n]) => `${route} ${status} ×${n}`).sort();
      },
    };
  }

  async function until(condition: () => boolean, timeoutMs = 3_000): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    while (!condition() && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 10));
  }

  const get = (path: string) => `GET ${path} HTTP/1.1\r\nHost: x\r\n\r\n`;

  it('records each pipelined request once when its client leaves: what was sent, or 499 for what never was', async () => {
    const service = await tracked((req, res) => {
      if (req.url === '/sent') res.writeHead(200).write('the head went out'); // holds the connection
      if (req.url === '/queued-answer') res.writeHead(201).end('never sent: queued behind /sent');
    });
    const client = service.connect(get('/sent') + get('/queued-answer') + get('/queued'));
    client.resume();
    await new Promise((resolve) => setTimeout(resolve, 100));
    client.destroy();
    await until(() => service.closed() === 3);
    await new Promise((resolve) => setTimeout(resolve, 50)); // none twice
    expect(await service.statuses()).toEqual(['/queued 499 ×1', '/queued-answer 499 ×1', '/sent 200 ×1']);
  });

  it("records the 408 the server sent to a client too slow sending its request, not 499; one that leaves is 499", async () => {
    // Node's own requestTimeout (web.client_timeout in the service), checked every 50 ms.
    const service = await tracked((req) => req.resume(), { requestTimeout: 300, connectionsCheckingInterval: 50 });
    const slow = service.connect('POST /slow HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"pro');
    let answer = '';
    slow.on('data', (chunk) => (answer += chunk.toString()));
    const leaving = service.connect('POST /leaving HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"pro');
    leaving.resume();
    await new Promise((resolve) => setTimeout(resolve, 100));
    leaving.destroy();
    await until(() => service.closed() === 2);
    expect(answer).toMatch(/^HTTP\/1\.1 408 /);
    expect(await service.statuses()).toEqual(['/leaving 499 ×1', '/slow 408 ×1']);
  });
});
