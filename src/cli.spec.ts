import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
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
    expect(() => planCall([], undefined)).toThrow('command is required');
  });
});

describe('runCli against a service', () => {
  let server: Server;
  let url: string;
  const seen: Array<{ method?: string; url?: string; auth?: string }> = [];

  beforeAll(async () => {
    server = createServer((req, res) => {
      seen.push({ method: req.method, url: req.url, auth: req.headers.authorization });
      if (req.url === '/admin/status') {
        res.setHeader('content-type', 'application/json');
        res.end(JSON.stringify({ status: 'healthy', state: 'ready', pid: 42, sleeping: false, lora_adapters: {}, argv: ['vllm', 'serve', 'm'] }));
      } else {
        res.statusCode = 409;
        res.end(JSON.stringify({ error: { type: 'conflict', message: 'vLLM is not asleep (ready)' } }));
      }
    });
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    url = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
  });
  afterAll(() => new Promise<void>((resolve) => server.close(() => resolve())));

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

  it("exits 1 with the service's message when it refuses", async () => {
    const r = await run(['wake', '--url', url]);
    expect(r.code).toBe(EXIT.refused);
    expect(r.err).toContain('409: vLLM is not asleep (ready)');
  });

  it('exits 3 when the service cannot be reached, 2 on a usage error', async () => {
    expect((await run(['status', '--url', 'http://127.0.0.1:1'])).code).toBe(EXIT.unreachable);
    expect((await run(['frobnicate'])).code).toBe(EXIT.usage);
    expect((await run(['status', '--bogus'])).code).toBe(EXIT.usage);
  });

  it('formats a sleeping engine with its level', () => {
    expect(formatStatus({ state: 'sleeping', sleeping: true, sleep_level: 2 })).toMatch(/^sleeping\s+yes \(level 2\)$/m);
  });
});
