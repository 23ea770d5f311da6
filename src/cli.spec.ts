import { createServer, type Server } from 'node:http';
import { type AddressInfo, createServer as createTcpServer } from 'node:net';
import { EXIT, formatStatus, planCall, runCli } from './cli';

describe('planCall', () => {
  it('maps each command to its admin call', () => {
    expect(planCall(['status'], undefined)).toEqual({ method: 'GET', path: '/admin/status' });
    expect(planCall(['sleep'], '2')).toEqual({ method: 'POST', path: '/admin/sleep?level=2' });
    expect(planCall(['wake'], undefined)).toEqual({ method: 'POST', path: '/admin/wake_up' });
    expect(planCall(['restart'], undefined)).toEqual({ method: 'POST', path: '/admin/restart' });
    expect(planCall(['lora', 'load', 'a', '/p'], undefined)).toEqual({ method: 'POST', path: '/admin/lora', body: { name: 'a', path: '/p' } });
    expect(planCall(['lora', 'unload', 'a b'], undefined)).toEqual({ method: 'DELETE', path: '/admin/lora/a%20b' });
  });

  it('rejects unknown commands, wrong arity and bad levels', () => {
    expect(() => planCall(['nap'], undefined)).toThrow('unknown command');
    expect(() => planCall(['lora', 'load', 'a'], undefined)).toThrow('usage');
    expect(() => planCall(['sleep'], '4')).toThrow('--level');
    expect(() => planCall(['status'], '2')).toThrow('--level is an option of sleep only'); // not silently ignored
    expect(() => planCall([], undefined)).toThrow('command is required');
    // A dot segment would be dropped from the URL: `lora unload ..` would call /admin/.
    expect(() => planCall(['lora', 'unload', '..'], undefined)).toThrow('".." is no adapter name');
    expect(() => planCall(['lora', 'unload', '.'], undefined)).toThrow('no adapter name');
    // `--json serve`: serve is taken only first, where its own options follow.
    expect(() => planCall(['serve'], undefined)).toThrow('serve must come first');
  });
});

describe('runCli against a service', () => {
  let server: Server;
  let url: string;
  const seen: Array<{ method?: string; url?: string; auth?: string }> = [];
  let health: { code: number; body: unknown } = { code: 200, body: { status: 'healthy', state: 'ready' } };
  let lastError: string | null = null;
  /** What /admin/status answers instead of the service's object, when set. */
  let statusText: string | null = null;

  beforeAll(async () => {
    server = createServer((req, res) => {
      seen.push({ method: req.method, url: req.url, auth: req.headers.authorization });
      if (req.headers.authorization === 'Bearer not-admin' || (req.url === '/admin/lora' && !req.headers.authorization)) {
        res.statusCode = 401;
        return void res.end(JSON.stringify({ error: { type: 'unauthorized', message: 'an admin key is required (auth.admin_api_keys; Authorization: Bearer KEY)' } }));
      }
      if (req.url === '/health') {
        res.statusCode = health.code;
        return void res.end(JSON.stringify(health.body));
      }
      if (req.url === '/admin/restart') return; // taken, never answered: a restart whose model loads for long
      if (req.url?.startsWith('/admin/sleep')) return void req.socket.destroy(); // taken, then dropped
      if (req.url === '/admin/status' && statusText !== null) return void res.end(statusText);
      if (req.url === '/admin/status') {
        res.setHeader('content-type', 'application/json');
        res.end(JSON.stringify({ status: 'healthy', state: 'ready', pid: 42, sleeping: false, lora_adapters: {}, last_error: lastError, argv: ['vllm', 'serve', 'm'] }));
      } else {
        res.statusCode = 409;
        res.end(JSON.stringify({ error: { type: 'conflict', message: 'vLLM is not asleep (ready)' } }));
      }
    });
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    url = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
  });
  afterAll(() => {
    server.closeAllConnections();
    return new Promise<void>((resolve) => server.close(() => resolve()));
  });

  function run(argv: string[], env: NodeJS.ProcessEnv = {}) {
    const out: string[] = [];
    const err: string[] = [];
    return runCli(argv, env, { out: (t) => out.push(t), err: (t) => err.push(t) }).then((code) => ({ code, out: out.join('\n'), err: err.join('\n') }));
  }

  it('prints the status and exits 0, sending the admin key', async () => {
    const r = await run(['status', '--url', url], { TIDE_VLLM_ADMIN_KEY: 'k' });
    expect(r.code).toBe(EXIT.ok);
    expect(r.out).toMatch(/^state\s+ready$/m);
    expect(r.out).toMatch(/^pid\s+42$/m);
    expect(seen[seen.length - 1]).toEqual({ method: 'GET', url: '/admin/status', auth: 'Bearer k' });
  });

  it('health: GET /health, exit 0 while the service is live, 1 when it says unhealthy, 3 when it is not there', async () => {
    const up = await run(['health', '--url', url]);
    expect(up).toMatchObject({ code: EXIT.ok, out: 'healthy (state ready)', err: '' });
    expect(seen[seen.length - 1]).toMatchObject({ method: 'GET', url: '/health' });
    expect(await run(['health', '--url', url, '--json'])).toMatchObject({ code: EXIT.ok, out: JSON.stringify({ status: 'healthy', state: 'ready' }, null, 2) });
    health = { code: 503, body: { status: 'unhealthy', state: 'failed' } };
    try {
      expect(await run(['health', '--url', url])).toMatchObject({ code: EXIT.refused, out: '', err: 'tide-vllm: 503: unhealthy (state failed)' });
      expect(await run(['health', '--url', url, '--json'])).toMatchObject({ code: EXIT.refused, out: JSON.stringify({ status: 'unhealthy', state: 'failed' }, null, 2), err: '' });
    } finally {
      health = { code: 200, body: { status: 'healthy', state: 'ready' } };
    }
    // Another server, answering JSON that is not an object: told by its status, not a TypeError with a stack.
    try {
      for (const body of [null, 5, 'x', [1]]) {
        health = { code: 200, body };
        expect(await run(['health', '--url', url])).toMatchObject({ code: EXIT.ok, out: 'HTTP 200' });
        health = { code: 503, body };
        expect(await run(['health', '--url', url])).toMatchObject({ code: EXIT.refused, err: 'tide-vllm: 503: HTTP 503' });
      }
    } finally {
      health = { code: 200, body: { status: 'healthy', state: 'ready' } };
    }
    // A 2xx that is no JSON object is shown as the text it is, in --json too.
    try {
      for (const text of ['[{"a":1}]', 'null', 'plain words']) {
        statusText = text;
        expect(await run(['status', '--url', url])).toMatchObject({ code: EXIT.ok, out: text });
        expect(await run(['status', '--url', url, '--json'])).toMatchObject({ code: EXIT.ok, out: text });
      }
    } finally {
      statusText = null;
    }
    expect((await run(['health', '--url', 'http://127.0.0.1:1'])).code).toBe(EXIT.unreachable);
    expect((await run(['health', 'now', '--url', url])).code).toBe(EXIT.usage);
  });

  it("prints no terminal control sequence the service's answer carries (text vLLM wrote), in text or --json", async () => {
    // An OSC that retitles the terminal, a CSI (C1 form) that clears it, a bell, a DEL.
    lastError = 'CUDA error\x1b]0;owned\x07 at step \x9b2J1\x7f';
    try {
      const text = await run(['status', '--url', url]);
      expect(text.out).toMatch(/^last error CUDA error\\u001b\]0;owned\\u0007 at step \\u009b2J1\\u007f$/m);
      const json = await run(['status', '--url', url, '--json']);
      expect(json.out).not.toMatch(/[\x00-\x08\x0b-\x1f\x7f-\x9f]/);
      expect((JSON.parse(json.out) as { last_error: string }).last_error).toBe(lastError); // still JSON, same text
    } finally {
      lastError = null;
    }
  });

  it("exits 1 with the service's message when it refuses", async () => {
    const r = await run(['wake', '--url', url]);
    expect(r.code).toBe(EXIT.refused);
    expect(r.err).toContain('409: vLLM is not asleep (ready)');
  });

  it('on a 401 says how to give the CLI its key: --key or TIDE_VLLM_ADMIN_KEY, naming the one that was refused', async () => {
    const none = await run(['lora', 'load', 'a', '/p', '--url', url]);
    expect(none.code).toBe(EXIT.refused);
    expect(none.err.split('\n')).toEqual([
      'tide-vllm: 401: an admin key is required (auth.admin_api_keys; Authorization: Bearer KEY)',
      'tide-vllm: hint: the admin API needs a key (auth.admin_api_keys, else auth.api_keys): pass --key KEY or set TIDE_VLLM_ADMIN_KEY',
    ]);
    const flag = await run(['status', '--url', url, '--key', 'not-admin'], { TIDE_VLLM_ADMIN_KEY: 'k' });
    expect(flag.err).toContain('hint: the key from --key was refused; for an admin key (auth.admin_api_keys, else auth.api_keys), pass --key KEY or set TIDE_VLLM_ADMIN_KEY');
    const env = await run(['status', '--url', url], { TIDE_VLLM_ADMIN_KEY: 'not-admin' });
    expect(env.err).toContain('hint: the key from TIDE_VLLM_ADMIN_KEY was refused');
    // Other refusals get no such hint.
    expect((await run(['wake', '--url', url])).err).not.toContain('hint');
  });

  it('exits 3 when the service cannot be reached, 2 on a usage error', async () => {
    const unreachable = await run(['status', '--url', 'http://127.0.0.1:1']);
    expect(unreachable.code).toBe(EXIT.unreachable);
    expect(unreachable.err).toBe('tide-vllm: cannot reach the service at http://127.0.0.1:1: connect ECONNREFUSED 127.0.0.1:1');
    expect((await run(['frobnicate'])).code).toBe(EXIT.usage);
    expect((await run(['status', '--bogus'])).code).toBe(EXIT.usage);
    expect((await run(['status', '--url', url, '--timeout', '0'])).code).toBe(EXIT.usage);
    expect((await run(['status', '--url', url, '--timeout', '3000000'])).code).toBe(EXIT.usage); // a Node timer would fire at once
    for (const timeout of ['0x10', '1e3', ' 5', '-1', '']) expect([timeout, (await run(['status', '--url', url, '--timeout', timeout])).code]).toEqual([timeout, EXIT.usage]);
    expect((await run(['status', '--url', url, '--timeout', '.5'])).code).toBe(EXIT.ok);
  });

  it('a --url or TIDE_VLLM_URL that is no http(s) URL is a usage error (2), not an unreachable service', async () => {
    const nonsense = await run(['status', '--url', 'nonsense']);
    expect(nonsense).toMatchObject({ code: EXIT.usage, err: expect.stringContaining('--url must be an http:// or https:// URL') });
    expect(nonsense.err).toContain('"nonsense"');
    expect((await run(['status', '--url', 'ftp://127.0.0.1:21'])).code).toBe(EXIT.usage);
    const fromEnv = await run(['status'], { TIDE_VLLM_URL: 'localhost:10002' });
    expect(fromEnv).toMatchObject({ code: EXIT.usage, err: expect.stringContaining('TIDE_VLLM_URL must be an http:// or https:// URL') });
  });

  it('a service that took the request but gave no answer within --timeout is not "unreachable": exit 1, saying so', async () => {
    const started = Date.now();
    const r = await run(['restart', '--url', url, '--timeout', '0.3']);
    expect(Date.now() - started).toBeLessThan(3_000);
    expect(r.code).toBe(EXIT.refused);
    expect(r.err).toContain(`no answer from the service at ${url} within 0.3 s (--timeout); it took the request and may still be carrying it out`);
    expect(r.err).not.toContain('cannot reach');
  });

  it('https: a connection whose TLS handshake fails is "unreachable" (3): the request was never sent', async () => {
    const plain = createTcpServer((socket) => socket.destroy()); // takes the TCP connection, never speaks TLS
    await new Promise<void>((resolve) => plain.listen(0, '127.0.0.1', resolve));
    const r = await run(['restart', '--url', `https://127.0.0.1:${(plain.address() as AddressInfo).port}`]);
    plain.close();
    expect(r.code).toBe(EXIT.unreachable);
    expect(r.err).toContain('cannot reach the service');
  });

  it('a key that cannot go into an HTTP header is a usage error (2), not a crash', async () => {
    const r = await run(['status', '--url', url], { TIDE_VLLM_ADMIN_KEY: 'k€' });
    expect(r).toMatchObject({ code: EXIT.usage, err: expect.stringContaining('TIDE_VLLM_ADMIN_KEY must be printable ASCII') });
    // An empty --key (an unset variable in a script) is said, not sent as no key and then blamed in the 401's hint.
    expect(await run(['status', '--url', url, '--key', ''])).toMatchObject({ code: EXIT.usage, err: expect.stringContaining('--key needs a key') });
  });

  it('a service that took the request and dropped it is not "unreachable" either', async () => {
    const r = await run(['sleep', '--url', url]);
    expect(r.code).toBe(EXIT.refused);
    expect(r.err).toContain('took the request but closed the connection without an answer');
  });

  it('lists LoRA adapters with their paths', () => {
    expect(formatStatus({ lora_adapters: { sql: '/adapters/sql', chat: '/a/chat' } })).toMatch(/^lora\s+sql \(\/adapters\/sql\), chat \(\/a\/chat\)$/m);
    expect(formatStatus({ lora_adapters: {} })).toMatch(/^lora\s+-$/m);
  });

  it('formats a sleeping engine with its level', () => {
    expect(formatStatus({ state: 'sleeping', sleeping: true, sleep_level: 2 })).toMatch(/^sleeping\s+yes \(level 2\)$/m);
  });
});
