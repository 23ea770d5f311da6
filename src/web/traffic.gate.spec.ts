import { EventEmitter } from 'node:events';
import { type IncomingMessage, type Server, type ServerResponse, createServer } from 'node:http';
import { type AddressInfo, type Socket, connect } from 'node:net';
import fc from 'fast-check';
import type { AppError } from '../domain/app-error';
import { TrafficGate } from './traffic.gate';

/** A response that closes when told, finished (answered) or not (the client left). */
function response(): ServerResponse & { close(finished: boolean): void } {
  const res = new EventEmitter() as ServerResponse & { close(finished: boolean): void };
  res.close = (finished) => {
    Object.assign(res, { writableFinished: finished });
    res.emit('close');
  };
  return res;
}

describe('TrafficGate', () => {
  it('counts what is in flight whatever order requests end in, refuses past the limit, and cuts exactly the rest', () => {
    fc.assert(
      fc.property(fc.array(fc.nat(), { minLength: 1, maxLength: 30 }), fc.nat(), (picks, keep) => {
        const gate = new TrafficGate(picks.length);
        const open = picks.map((_, i) => ({ i, res: response() }));
        const cut: number[] = [];
        for (const { i, res } of open) gate.admit(res).onAbort(() => cut.push(i));
        expect(gate.inFlight).toBe(picks.length);
        expect(gate.refusal()?.code).toBe('OVERLOADED');
        let settled = 0;
        gate.onSettled = () => (settled += 1);
        const ending = picks.slice(0, picks.length - (keep % (picks.length + 1)));
        for (const pick of ending) {
          const [{ res }] = open.splice(pick % open.length, 1);
          res.close(true);
          expect(gate.inFlight).toBe(open.length);
        }
        expect(settled).toBe(ending.length);
        if (open.length < picks.length) expect(gate.refusal()).toBeNull();
        gate.cutAll();
        expect(cut.sort((a, b) => a - b)).toEqual(open.map(({ i }) => i).sort((a, b) => a - b));
      }),
    );
  });

  it('counts as active only the requests in flight that are activity (not a model list vLLM answers asleep)', () => {
    const gate = new TrafficGate(8);
    const [chat, models, other] = [response(), response(), response()];
    gate.admit(chat);
    gate.admit(models).activity = false;
    gate.admit(other);
    expect([gate.inFlight, gate.activeInFlight]).toEqual([3, 2]);
    chat.close(true);
    other.close(true);
    expect([gate.inFlight, gate.activeInFlight]).toEqual([1, 0]);
  });

  it('aborts a request whose client left, not one that was answered', () => {
    const gate = new TrafficGate(8);
    const [left, answered] = [response(), response()];
    const reasons: string[] = [];
    gate.admit(left).onAbort((reason) => reasons.push(`left: ${reason.message}`));
    gate.admit(answered).onAbort((reason) => reasons.push(`answered: ${reason.message}`));
    left.close(false);
    answered.close(true);
    expect(reasons).toEqual(['left: client went away']);
  });

  it('cuts every request still in flight at the end of the drain, streams and plain ones', async () => {
    const gate = new TrafficGate(8);
    const all = Array.from({ length: 5 }, () => response());
    const cut: string[] = [];
    all.forEach((res, i) => {
      const scope = gate.admit(res);
      if (i % 2 === 0) scope.cut = (error: AppError) => cut.push(`stream ${i}: ${error.code}`);
      else scope.onAbort((error) => cut.push(`plain ${i}: ${error.code}`));
    });
    all[2].close(true); // ended before the drain ran out
    gate.startDraining();
    expect(gate.refusal()?.code).toBe('SHUTTING_DOWN');
    expect(await gate.waitIdle(20)).toBe(4);
    gate.cutAll();
    expect(cut.sort()).toEqual(['plain 1: SHUTTING_DOWN', 'plain 3: SHUTTING_DOWN', 'stream 0: SHUTTING_DOWN', 'stream 4: SHUTTING_DOWN']);
    const idle = gate.waitIdle(5_000);
    for (const res of all) res.close(true);
    expect(await idle).toBe(0);
  });
});

/** Real servers and connections of a test, closed after it whatever happens. */
const servers: Server[] = [];
const clients: Socket[] = [];

afterEach(async () => {
  for (const client of clients.splice(0)) client.destroy();
  for (const server of servers.splice(0)) {
    server.closeAllConnections();
    await new Promise((resolve) => server.close(resolve));
  }
});

/** A real server whose requests `handle` answers (or not), and a raw connection to it. */
async function serve(handle: (req: IncomingMessage, res: ServerResponse) => void): Promise<{ connect(request?: string): Socket }> {
  const server = createServer(handle);
  servers.push(server);
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as AddressInfo;
  return {
    connect(request?: string) {
      const client = connect(port, '127.0.0.1', () => request && client.write(request));
      clients.push(client);
      client.on('error', () => undefined);
      return client;
    },
  };
}

async function until(condition: () => boolean, timeoutMs = 2_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!condition() && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 10));
}

const get = (path: string) => `GET ${path} HTTP/1.1\r\nHost: x\r\n\r\n`;

describe('TrafficGate on real connections', () => {
  it('frees the slots of pipelined requests whose client leaves, and aborts each of them once', async () => {
    const gate = new TrafficGate(8);
    let settled = 0;
    gate.onSettled = () => (settled += 1);
    const aborted: string[] = [];
    const closes = new Map<string, number>();
    const server = await serve((req, res) => {
      gate.admit(res).onAbort((reason) => aborted.push(`${req.url}: ${reason.message}`));
      res.on('close', () => closes.set(req.url!, (closes.get(req.url!) ?? 0) + 1));
      // The first holds the connection, answering slowly; the others wait behind it, one
      // answered already (its bytes queued), one with its head only, one not at all.
      if (req.url === '/1') res.writeHead(200).write('first');
      if (req.url === '/2') res.end('second');
      if (req.url === '/3') res.writeHead(200).write('third');
    });
    const client = server.connect(get('/1') + get('/2') + get('/3') + get('/4'));
    client.resume();
    await until(() => gate.inFlight === 4);
    expect(gate.inFlight).toBe(4);
    client.destroy();
    await until(() => gate.inFlight === 0);
    await new Promise((resolve) => setTimeout(resolve, 50)); // nothing settles twice
    expect(gate.inFlight).toBe(0);
    expect(settled).toBe(4);
    expect(aborted.sort()).toEqual(['/1', '/2', '/3', '/4'].map((path) => `${path}: client went away`));
    expect([...closes].sort()).toEqual([['/1', 1], ['/2', 1], ['/3', 1], ['/4', 1]]);
    expect(await gate.waitIdle(1_000)).toBe(0); // a drain does not wait for them
  });

  it('settles pipelined requests answered in order exactly once, and leaves no listener on the connection', async () => {
    const gate = new TrafficGate(64);
    let settled = 0;
    gate.onSettled = () => (settled += 1);
    const aborted: string[] = [];
    const warnings: string[] = [];
    const onWarning = (warning: Error) => warnings.push(warning.name);
    process.on('warning', onWarning);
    let socket: Socket | null = null;
    /** Node's own 'close' listeners while a response holds the connection. */
    let nodes = -1;
    const waiting: ServerResponse[] = [];
    const server = await serve((req, res) => {
      socket ??= req.socket;
      if (nodes === -1) nodes = req.socket.listenerCount('close');
      gate.admit(res).onAbort(() => aborted.push(req.url!));
      waiting.push(res);
    });
    const client = server.connect();
    let received = '';
    client.on('data', (chunk) => (received += chunk.toString()));
    const answered = () => received.split('HTTP/1.1 200 OK').length - 1;
    try {
      // Two rounds of 30 pipelined requests on one keep-alive connection: more than EventEmitter's
      // limit of 10 listeners, were there one per request.
      for (let round = 0; round < 2; round += 1) {
        client.write(Array.from({ length: 30 }, (_, i) => get(`/${round}-${i}`)).join(''));
        await until(() => waiting.length === 30);
        expect(waiting.length).toBe(30);
        expect(socket!.listenerCount('close')).toBeLessThanOrEqual(nodes + 1);
        for (const res of waiting.splice(0)) res.end('ok'); // in order: each waits for the one before
        await until(() => answered() === 30 * (round + 1));
      }
    } finally {
      process.off('warning', onWarning);
    }
    expect(answered()).toBe(60);
    await until(() => settled === 60);
    expect([settled, gate.inFlight, aborted]).toEqual([60, 0, []]);
    expect(socket!.listenerCount('close')).toBeLessThan(nodes); // Node's, less the answered response's
    expect(warnings).toEqual([]);
  });
});
