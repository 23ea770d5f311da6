import { type Server, createServer } from 'node:http';
import type { AddressInfo, Socket } from 'node:net';
import { setTimeout as sleep } from 'node:timers/promises';
import { AxiosError } from 'axios';
import { VLLM_IDLE_CONNECTION_MS, VLLMClient, connectionFailed, idleConnectionMs, readVllmError, toAppError, upstreamStatusError } from './vllm.client';
import { vllmBaseUrl } from './infrastructure.module';

describe('idleConnectionMs', () => {
  it("stays below uvicorn's keep-alive (VLLM_HTTP_TIMEOUT_KEEP_ALIVE in vllm.env, default 5 s)", () => {
    expect(idleConnectionMs({})).toBe(4_000);
    expect(idleConnectionMs({ VLLM_HTTP_TIMEOUT_KEEP_ALIVE: '5' })).toBe(4_000);
    expect(idleConnectionMs({ VLLM_HTTP_TIMEOUT_KEEP_ALIVE: '2' })).toBe(1_000);
    expect(idleConnectionMs({ VLLM_HTTP_TIMEOUT_KEEP_ALIVE: '1' })).toBe(500);
    expect(idleConnectionMs({ VLLM_HTTP_TIMEOUT_KEEP_ALIVE: '75' })).toBe(74_000);
  });
});

describe('readVllmError', () => {
  it("reads vLLM's current nested envelope", () => {
    expect(readVllmError({ error: { message: 'm', type: 'NotFoundError', param: 'model', code: 404 } })).toEqual({
      message: 'm',
      type: 'NotFoundError',
      param: 'model',
      code: 404,
    });
  });

  it('reads the flat envelope of old vLLM and SGLang', () => {
    expect(readVllmError({ object: 'error', message: 'm', type: 'BadRequest', param: null, code: 400 })?.message).toBe('m');
  });

  it("reads SGLang's LoRA failures", () => {
    expect(readVllmError({ success: false, error_message: 'LoRA adapter x is already loaded', loaded_adapters: {} })?.message).toBe(
      'LoRA adapter x is already loaded',
    );
    expect(readVllmError({ success: true, error_message: null })).toBeNull();
  });

  it('returns null for anything else', () => {
    expect(readVllmError('text')).toBeNull();
    expect(readVllmError({ error: 'Unauthorized' })).toBeNull();
  });
});

describe('upstreamStatusError', () => {
  it("passes vLLM's message on for client-input statuses", () => {
    const err = upstreamStatusError(400, { error: { message: 'prompt too long', type: 'BadRequestError', param: 'input_tokens', code: 400 } });
    expect([err.code, err.message, err.upstreamStatus, err.param]).toEqual(['UPSTREAM_REJECTED', 'prompt too long', 400, 'input_tokens']);
  });

  it('hides the details of server-side failures', () => {
    const err = upstreamStatusError(500, { error: { message: 'EngineCore at /opt/x.py failed', type: 'InternalServerError', param: null, code: 500 } });
    expect(err.code).toBe('UPSTREAM_ERROR');
    expect(err.message).not.toContain('/opt');
  });

  it('treats 503 as not ready, and 401 (our key) as an upstream failure', () => {
    expect(upstreamStatusError(503, null).code).toBe('VLLM_NOT_READY');
    expect(upstreamStatusError(401, { error: 'Unauthorized' }).code).toBe('UPSTREAM_ERROR');
  });
});

describe('toAppError', () => {
  it('maps refused connections to 503 and timeouts to 504', () => {
    expect(toAppError(new AxiosError('x', 'ECONNREFUSED'), 1000).code).toBe('VLLM_NOT_READY');
    expect(toAppError(new AxiosError('x', 'ETIMEDOUT'), 1000).code).toBe('UPSTREAM_TIMEOUT');
    expect(toAppError(new Error('boom'), 1000).code).toBe('UPSTREAM_ERROR');
  });

  it('tells a failed connection from an answer of vLLM\'s (connectionFailed): both may be 503s', () => {
    expect(connectionFailed(toAppError(new AxiosError('x', 'ECONNRESET'), 1000))).toBe(true);
    expect(connectionFailed(toAppError(new AxiosError('x', 'ECONNREFUSED'), 1000))).toBe(true);
    expect(connectionFailed(upstreamStatusError(503, { error: { message: 'busy' } }))).toBe(false);
    expect(connectionFailed(toAppError(new AxiosError('x', 'ETIMEDOUT'), 1000))).toBe(false);
  });
});

describe('vllmBaseUrl', () => {
  it('reaches a wildcard bind over loopback and brackets IPv6', () => {
    expect(vllmBaseUrl({ host: '0.0.0.0', port: 8000 })).toBe('http://127.0.0.1:8000');
    expect(vllmBaseUrl({ host: '::', port: 8000 })).toBe('http://[::1]:8000');
    expect(vllmBaseUrl({ host: '10.0.0.5', port: 9 })).toBe('http://10.0.0.5:9');
  });
});

describe('VLLMClient keep-alive connections', () => {
  let server: Server;
  let client: VLLMClient;
  /** This test's connections: a previous test's late closes land in its own object. */
  let seen: { connections: number; closed: number };
  /** How long the server waits before answering. */
  let delayMs: number;

  beforeEach(async () => {
    const thisTest = (seen = { connections: 0, closed: 0 });
    delayMs = 0;
    // Like uvicorn, no Keep-Alive hint; unlike it, never closes an idle connection itself.
    server = createServer((_req, res) => {
      setTimeout(() => {
        res.removeHeader('connection');
        res.writeHead(200, { 'content-type': 'application/json' }).end('{"ok":true}');
      }, delayMs);
    });
    server.keepAliveTimeout = 0;
    server.on('connection', (socket) => {
      thisTest.connections += 1;
      socket.on('close', () => (thisTest.closed += 1));
    });
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    client = new VLLMClient(`http://127.0.0.1:${(server.address() as AddressInfo).port}`, 10_000);
  });

  afterEach(async () => {
    client.close();
    server.closeAllConnections();
    await new Promise((resolve) => server.close(resolve));
  });

  it('takes a timeout in seconds that is no whole number of milliseconds (health_timeout: 2.01 failed every probe)', async () => {
    const fractional = new VLLMClient(client.baseUrl, 8.05 * 1000); // 8049.999999999999 ms
    try {
      await expect(fractional.getJson('/health')).resolves.toEqual({ ok: true });
      await expect(client.getJson('/health', { timeoutMs: 2.01 * 1000 })).resolves.toEqual({ ok: true });
    } finally {
      fractional.close();
    }
  });

  it('closes a connection idle for 4 s, before uvicorn would, and makes a new one next time', async () => {
    expect(VLLM_IDLE_CONNECTION_MS).toBeLessThan(5_000);
    await expect(client.getJson('/health')).resolves.toEqual({ ok: true });
    await sleep(1_000);
    await client.getJson('/health'); // reused: 1 s of idling is well within the limit
    expect(seen).toEqual({ connections: 1, closed: 0 });
    await sleep(VLLM_IDLE_CONNECTION_MS + 500);
    expect(seen.closed).toBe(1); // closed by the client: this server never closes idle connections
    await expect(client.getJson('/health')).resolves.toEqual({ ok: true });
    expect(seen).toEqual({ connections: 2, closed: 1 });
  });

  it('with VLLM_HTTP_TIMEOUT_KEEP_ALIVE=2 in vllm.env, closes an idle connection after 1 s, before that uvicorn would', async () => {
    client.close();
    client = new VLLMClient(client.baseUrl, 10_000, idleConnectionMs({ VLLM_HTTP_TIMEOUT_KEEP_ALIVE: '2' }));
    await client.getJson('/health');
    await sleep(1_400);
    expect(seen.closed).toBe(1); // by the client: 4 s would have let uvicorn close it first, racing the next request
  });

  it('never cuts a call that takes longer than the idle limit, on a reused connection', async () => {
    await client.getJson('/health'); // the connection is free, its idle timer running...
    delayMs = VLLM_IDLE_CONNECTION_MS + 500; // ...and this call on it answers only after the limit
    const started = Date.now();
    await expect(client.postJson('/v1/chat/completions', {})).resolves.toEqual({ ok: true });
    expect(Date.now() - started).toBeGreaterThanOrEqual(delayMs - 50);
    expect(seen).toEqual({ connections: 1, closed: 0 });
  });
});

describe('VLLMClient against a uvicorn with VLLM_HTTP_TIMEOUT_KEEP_ALIVE=2', () => {
  let server: Server;

  beforeEach(async () => {
    // The race made deterministic: a connection idle for 2 s is one this uvicorn already closes,
    // so a request that still arrives on it is answered with a reset (its FIN crossed the request).
    const idleSince = new WeakMap<Socket, number>();
    server = createServer((req, res) => {
      const since = idleSince.get(req.socket);
      if (since !== undefined && Date.now() - since >= 2_000) return void req.socket.resetAndDestroy();
      res.removeHeader('connection');
      res.writeHead(200, { 'content-type': 'application/json' }).end('{"ok":true}', () => idleSince.set(req.socket, Date.now()));
    });
    server.keepAliveTimeout = 0;
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  });

  afterEach(async () => {
    server.closeAllConnections();
    await new Promise((resolve) => server.close(resolve));
  });

  it('a request after 2.2 s of idling succeeds with the derived idle limit, and is reset with the default 4 s', async () => {
    const baseUrl = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
    const derived = new VLLMClient(baseUrl, 10_000, idleConnectionMs({ VLLM_HTTP_TIMEOUT_KEEP_ALIVE: '2' }));
    const fixed = new VLLMClient(baseUrl, 10_000, VLLM_IDLE_CONNECTION_MS);
    try {
      await Promise.all([derived.getJson('/health'), fixed.getJson('/health')]);
      await sleep(2_200);
      await expect(derived.getJson('/health')).resolves.toEqual({ ok: true });
      await expect(fixed.getJson('/health')).rejects.toMatchObject({ code: 'VLLM_NOT_READY' }); // ECONNRESET
    } finally {
      derived.close();
      fixed.close();
    }
  });
});
