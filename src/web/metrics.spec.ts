import { Counter, Histogram, Registry } from 'prom-client';
import fc from 'fast-check';
import { Buckets, expose } from './metrics';

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
