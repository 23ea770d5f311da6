import { type AddressInfo, connect } from 'node:net';
import { type RequestListener, type Server, createServer } from 'node:http';
import { Logger } from '@nestjs/common';
import fastify from 'fastify';
import { answerClientError, sendFrameworkError } from './app-error.filter';

type Send = (raw: string, end?: boolean) => Promise<{ head: string[]; body: unknown }>;

const FRESH_ID = /^[0-9a-f]{16}$/; // as vLLM makes them

/** A server answering Node's clientError as the service does, its request timeout checked every 50 ms. */
async function serve(handler: RequestListener): Promise<{ server: Server; send: Send }> {
  const server = createServer({ requestTimeout: 300, headersTimeout: 300, connectionsCheckingInterval: 50 }, handler);
  server.on('clientError', answerClientError);
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as AddressInfo;
  /** Sends `raw` (then ends the client's side, with `end`); resolves with what came back once the server closed the connection. */
  const send: Send = (raw, end = false) =>
    new Promise((resolve) => {
      const socket = connect(port, '127.0.0.1');
      let received = '';
      socket.on('data', (d) => (received += d.toString()));
      socket.on('error', () => undefined);
      socket.on('close', () => {
        const [head, body] = received.split('\r\n\r\n');
        resolve({ head: head.split('\r\n').map((l) => l.toLowerCase()), body: body ? JSON.parse(body) : undefined });
      });
      socket.write(raw);
      if (end) socket.end();
    });
  return { server, send };
}

describe('answerClientError (Node clientError: 408, 431, 400)', () => {
  let server: Server;
  let send: Send;

  beforeAll(async () => {
    // As the metrics hook does on the Fastify routes: the request's id goes on its response first.
    ({ server, send } = await serve((req, res) => {
      res.setHeader('x-request-id', String(req.headers['x-request-id'] ?? 'given-id'));
      req.resume(); // reads the body, never answers: only the timeout does
    }));
  });
  afterAll(() => new Promise((resolve) => server.close(resolve)));

  const halfBody = (path: string) => `POST ${path} HTTP/1.1\r\nHost: x\r\nX-Request-Id: r-408\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"pro`;

  it("answers a request too slow sending its body with a 408 in its route's shape, with its id, and closes", async () => {
    const simple = await send(halfBody('/chat/completions'));
    expect(simple.head).toEqual(expect.arrayContaining(['http/1.1 408 request timeout', 'x-request-id: r-408', 'connection: close']));
    expect(simple.body).toMatchObject({ request_id: 'r-408', content: null, error: { type: 'request_timeout', message: expect.stringContaining('web.client_timeout') } });
    const openai = await send(halfBody('/v1/completions'));
    expect(openai.head).toEqual(expect.arrayContaining(['http/1.1 408 request timeout', 'x-request-id: r-408', 'connection: close']));
    expect(openai.body).toEqual({ error: { message: expect.stringContaining('web.client_timeout'), type: 'RequestTimeoutError', param: null, code: 408 } });
  });

  it('sends nothing to a client that ended its side mid-body: it left', async () => {
    expect(await send(halfBody('/chat/completions'), true)).toEqual({ head: [''], body: undefined });
  });

  it('answers before any request was read (headers too large, too slow, not HTTP) in the plain shape, with a fresh id', async () => {
    const cases: Array<[string, string, string]> = [
      [`GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: ${'a'.repeat(20_000)}\r\n\r\n`, 'http/1.1 431 request header fields too large', 'request_headers_too_large'],
      ['GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Half: ', 'http/1.1 408 request timeout', 'request_timeout'],
      ['NOT HTTP AT ALL\r\n\r\n', 'http/1.1 400 bad request', 'invalid_request'],
    ];
    const warn = jest.spyOn(Logger.prototype, 'warn').mockImplementation(() => undefined);
    try {
      for (const [raw, status, type] of cases) {
        warn.mockClear();
        const { head, body } = await send(raw);
        expect(head[0]).toBe(status);
        expect(head).toEqual(expect.arrayContaining(['content-type: application/json; charset=utf-8', 'connection: close']));
        const id = head.find((l) => l.startsWith('x-request-id: '))?.slice('x-request-id: '.length);
        expect(id).toMatch(FRESH_ID);
        expect(body).toEqual({ error: { type, message: expect.any(String) } });
        // No access line for what was never read: a warning instead, with the id the client got.
        expect(warn).toHaveBeenCalledTimes(1);
        expect(warn.mock.calls[0][0]).toEqual(expect.stringContaining(`${status.split(' ')[1]} ${type} (`));
        expect(warn.mock.calls[0][0]).toEqual(expect.stringContaining(`from 127.0.0.1; id ${id}`));
      }
      // A connection that never sent a byte is closed with a 408 as well, but refused nothing: no warning.
      warn.mockClear();
      expect((await send('')).head[0]).toBe('http/1.1 408 request timeout');
      expect(warn).not.toHaveBeenCalled();
    } finally {
      warn.mockRestore();
    }
  });
});

describe('sendFrameworkError (Fastify frameworkErrors)', () => {
  it("answers a URL the router cannot take in the route's shape, with an id, never Fastify's code", async () => {
    const app = fastify({ frameworkErrors: (error, _request, reply) => sendFrameworkError(error, reply), genReqId: () => 'id-1' });
    app.delete('/admin/lora/:name', () => 'never');
    app.get('/v1/models/:id', () => 'never');
    const openai = await app.inject({ method: 'GET', url: '/v1/models/%ZZ' });
    expect([openai.statusCode, openai.headers['x-request-id'], openai.json()]).toEqual([
      400,
      'id-1',
      { error: { message: expect.stringContaining('URL'), type: 'BadRequestError', param: null, code: 400 } },
    ]);
    const plain = await app.inject({ method: 'DELETE', url: '/admin/lora/%ZZ' });
    expect([plain.statusCode, plain.json()]).toEqual([400, { error: { type: 'invalid_request', message: expect.stringContaining('URL') } }]);
    const long = await app.inject({ method: 'DELETE', url: `/admin/lora/${'a'.repeat(101)}` });
    expect([long.statusCode, long.json()]).toEqual([414, { error: { type: 'uri_too_long', message: expect.any(String) } }]);
    for (const res of [openai, plain, long]) expect(res.body).not.toContain('FST_');
    await app.close();
  });

  it('logs the 500 of a failing async route constraint, whose answer points to the log', async () => {
    const app = fastify();
    app.get('/x', (_request, reply) => sendFrameworkError(Object.assign(new Error('the constraint strategy threw'), { code: 'FST_ERR_ASYNC_CONSTRAINT' }), reply));
    const error = jest.spyOn(Logger.prototype, 'error').mockImplementation(() => undefined);
    try {
      const res = await app.inject({ method: 'GET', url: '/x' });
      expect([res.statusCode, res.json().error.message]).toEqual([500, expect.stringContaining('the service log has the details')]);
      expect(error).toHaveBeenCalledWith('FST_ERR_ASYNC_CONSTRAINT on GET /x: the constraint strategy threw');
    } finally {
      error.mockRestore();
      await app.close();
    }
  });
});
