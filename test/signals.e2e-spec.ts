/**
 * Stop signals against the real service and the simulator: the ones that end an interactive
 * session (SIGHUP, SIGQUIT) stop vLLM like SIGTERM does, and a signal repeated at once (one
 * Ctrl-C under `npm run start` reaches node twice) does not cut the drain short.
 */
import { connect } from 'node:net';
import { startService, stopAllServices } from './service';
import { expectNoProcessLeft, killAll, readSse, sleep } from './harness';

afterEach(stopAllServices);
afterAll(killAll);

describe('stop signals', () => {
  it.each(['SIGHUP', 'SIGQUIT'] as const)('%s stops vLLM and its process group, then exits 0', async (signal) => {
    const svc = await startService();
    const vllmPid = await svc.requireVllmPid();
    svc.proc.kill(signal);
    expect(await svc.proc.waitForExit(5_000)).toEqual({ code: 0, signal: null });
    await expectNoProcessLeft(vllmPid, 1_000);
  });

  it('a second SIGINT 50 ms after the first is the same Ctrl-C: the stream in flight still finishes', async () => {
    const svc = await startService({ env: { VLLM_SIM_ITL_MS: '100' } });
    const stream = readSse(`${svc.url}/v1/chat/completions`, { messages: [{ role: 'user', content: 'a b c d e f g h' }], stream: true });
    await svc.waitInFlight(1);
    svc.proc.kill('SIGINT');
    await sleep(50);
    svc.proc.kill('SIGINT');
    const done = await stream;
    expect(done.events[done.events.length - 1]).toBe('[DONE]');
    expect(done.events.some((e) => e.includes('"finish_reason":"stop"'))).toBe(true);
    expect(done.events.filter((e) => e.includes('"error"'))).toEqual([]);
    expect((await svc.proc.waitForExit(5_000)).code).toBe(0);
  });

  it('connections still open at the end of the drain (silent, or a request stalled mid-headers or mid-body) do not keep the service from exiting', async () => {
    const svc = await startService({ config: { web: { drain_timeout: 1 } } });
    const port = Number(new URL(svc.url).port);
    const sockets = ['', 'POST /chat/completions HTTP/1.1\r\nHost: x\r\n', 'POST /chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"prompt":'].map(
      (bytes) =>
        new Promise<{ closed: Promise<void> }>((resolve) => {
          const socket = connect(port, '127.0.0.1', () => {
            if (bytes) socket.write(bytes);
            resolve({ closed: new Promise((done) => socket.on('close', () => done())) });
          });
          socket.on('error', () => undefined);
        }),
    );
    const open = await Promise.all(sockets);
    await sleep(200); // read by the server
    svc.proc.kill('SIGTERM');
    // web.client_timeout (30 s) would never come: Node stops checking it once the server closes.
    expect(await svc.proc.waitForExit(15_000)).toEqual({ code: 0, signal: null });
    await Promise.all(open.map((s) => s.closed));
  });

  it('a stdout that takes nothing (a stalled log reader) does not keep the service from exiting once vLLM is stopped', async () => {
    const svc = await startService({ config: { logging: { level: 'info' }, web: { drain_timeout: 1 } } });
    const stdout = svc.proc.child.stdout!;
    stdout.pause(); // the pipe fills: log lines wait in the service
    try {
      // An access line per request: far more than the pipe holds.
      for (let i = 0; i < 20; i++) await Promise.all(Array.from({ length: 50 }, () => svc.request(`/nope-${'x'.repeat(100)}`)));
      const vllmPid = await svc.requireVllmPid();
      svc.proc.kill('SIGTERM');
      // The exit would wait for the write stuck in the reader's pipe for ever: once vLLM is
      // stopped, the lines left are dropped and the service ends itself (SIGKILL: exit() cannot).
      const status = await svc.proc.waitForExit(20_000);
      expect(status).toEqual({ code: null, signal: 'SIGKILL' });
      await expectNoProcessLeft(vllmPid, 1_000);
    } finally {
      stdout.resume();
    }
  });
});
