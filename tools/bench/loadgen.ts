// The load generator: a closed loop of `concurrency` requests in flight over keep-alive
// connections (undici Pool, dispatch handlers, no body streams), run in its own process.
// Forked by bench.ts with a LoadSpec as JSON in argv[2]; answers one LoadResult on IPC.
//
// Streams: events are counted by "\n\n" (no parsing); time to first event and the gaps between
// events are taken with performance.now() as chunks arrive. The proxy's CPU time and memory are
// read from /proc exactly at the start and end of the measured window.
import { Pool } from 'undici';
import type { Dispatcher } from 'undici';
import { CLOCK_TICKS_PER_SECOND, cpuTicks, machineBusyTicks, memory, type CpuTicks } from './proc-stats';

export interface LoadSpec {
  origin: string;
  path: string;
  body: string;
  stream: boolean;
  concurrency: number;
  warmupMs: number;
  durationMs: number;
  /** The first requests start evenly spread over this many ms (paced streams would otherwise start and end in lockstep). */
  rampMs: number;
  /** Record every inter-event gap (paced streams); fast streams only count. */
  recordGaps: boolean;
  /** The proxy's processes (CPU and memory are summed over them); empty for "direct". */
  proxyPids: number[];
  backendPids: number[];
}

/** null when there was no sample (JSON over IPC has no NaN). */
export interface Percentiles {
  p50: number | null;
  p99: number | null;
  count: number;
  /** Samples still open at the end of the window (a stream with no event yet): only a lower bound is known. */
  open?: number;
  /** p50 / p99 fell among the open samples: the value shown is a lower bound. */
  p50AtLeast?: boolean;
  p99AtLeast?: boolean;
}

export interface LoadResult {
  windowMs: number;
  /** Requests (or streams) completed within the window. */
  completed: number;
  /** Non-200 answers and failed requests within the window. */
  errors: number;
  firstError: string | null;
  /** SSE events received within the window. */
  events: number;
  latencyMs: Percentiles;
  ttfeMs: Percentiles;
  gapMs: Percentiles;
  proxyCpuMs: number | null;
  /** The part of proxyCpuMs spent in the kernel (stime). */
  proxySysMs: number | null;
  backendCpuMs: number;
  loadgenCpuMs: number;
  /** CPU time of every process on the machine (all cores) in the window. */
  machineCpuMs: number;
  /** The proxy's VmRSS before the first request, kB. */
  proxyStartRssKb: number | null;
  /** Peak of the proxy's VmRSS sampled every 100 ms from the first request to the end, kB. */
  proxyPeakRssKb: number | null;
  /** Monotonic clock (µs, same base as V8's profile timestamps) at the window's start and end. */
  windowStartUs: number;
  windowEndUs: number;
}

const SEP = Buffer.from('\n\n');
const NEWLINE = 0x0a;
const RSS_SAMPLE_MS = 100;

/** Float64Array-backed growable list: no boxing for tens of thousands of samples. */
class Samples {
  private data = new Float64Array(4096);
  length = 0;
  push(value: number): void {
    if (this.length === this.data.length) {
      const next = new Float64Array(this.data.length * 2);
      next.set(this.data);
      this.data = next;
    }
    this.data[this.length++] = value;
  }
  /** `open` are lower bounds (waits still running at the end); they sort after every real sample. */
  percentiles(open: number[] = []): Percentiles {
    const sorted = this.data.slice(0, this.length).sort();
    const n = sorted.length + open.length;
    const floor = open.length > 0 ? Math.min(...open) : 0;
    const index = (q: number) => Math.min(n - 1, Math.floor(q * n));
    const at = (q: number) => (n === 0 ? null : index(q) < sorted.length ? sorted[index(q)] : Math.max(floor, sorted[sorted.length - 1] ?? 0));
    const atLeast = (q: number) => n > 0 && index(q) >= sorted.length;
    return open.length === 0
      ? { p50: at(0.5), p99: at(0.99), count: n }
      : { p50: at(0.5), p99: at(0.99), count: n, open: open.length, p50AtLeast: atLeast(0.5), p99AtLeast: atLeast(0.99) };
  }
}

const monotonicUs = () => Number(process.hrtime.bigint() / 1000n);

export function runLoad(spec: LoadSpec): Promise<LoadResult> {
  const pool = new Pool(spec.origin, {
    connections: spec.concurrency,
    pipelining: 1,
    keepAliveTimeout: 60_000,
    headersTimeout: 60_000,
    bodyTimeout: 60_000,
  });
  const body = Buffer.from(spec.body);
  const headers = { 'content-type': 'application/json' };
  const latency = new Samples();
  const ttfe = new Samples();
  const gaps = new Samples();

  let measuring = false;
  let stopped = false;
  let windowStart = Infinity;
  let completed = 0;
  let errors = 0;
  let firstError: string | null = null;
  let events = 0;
  /** Start times of streams with no event yet. */
  const awaitingFirst = new Set<{ started: number }>();

  const fail = (message: string) => {
    if (stopped) return;
    firstError ??= message;
    if (measuring) errors += 1;
  };

  /** One request; when it ends, the next one starts on the same slot. */
  const issue = () => {
    if (stopped) return;
    const started = performance.now();
    const waiting = { started };
    if (spec.stream) awaitingFirst.add(waiting);
    let status = 0;
    let lastEventAt = 0;
    let sawEvent = false;
    let endsWithNewline = false;
    let errorText = '';
    const handler: Dispatcher.DispatchHandler = {
      onRequestStart() {}, // its presence selects undici's non-legacy handler API
      onResponseStart(_controller, statusCode) {
        status = statusCode;
      },
      onResponseData(_controller, chunk) {
        if (status !== 200) {
          if (errorText.length < 300) errorText += chunk.toString('utf8');
          return;
        }
        if (!spec.stream) return;
        let n = endsWithNewline && chunk[0] === NEWLINE ? 1 : 0;
        for (let at = chunk.indexOf(SEP); at !== -1; at = chunk.indexOf(SEP, at + 2)) n += 1;
        endsWithNewline = chunk[chunk.length - 1] === NEWLINE;
        if (n === 0) return;
        const now = performance.now();
        if (measuring) events += n;
        const hadEvent = sawEvent;
        sawEvent = true;
        if (!hadEvent) awaitingFirst.delete(waiting);
        if (!hadEvent && measuring && started >= windowStart) ttfe.push(now - started);
        if (spec.recordGaps && measuring) {
          if (hadEvent) gaps.push(now - lastEventAt);
          for (let k = 1; k < n; k++) gaps.push(0); // events that arrived in the same chunk
        }
        lastEventAt = now;
      },
      onResponseEnd() {
        awaitingFirst.delete(waiting);
        if (stopped) return;
        if (status !== 200) fail(`HTTP ${status}: ${errorText.slice(0, 200)}`);
        else if (measuring) {
          completed += 1;
          if (!spec.stream && started >= windowStart) latency.push(performance.now() - started);
        }
        issue();
      },
      onResponseError(_controller, err) {
        awaitingFirst.delete(waiting);
        fail(err.message);
        if (!stopped) setTimeout(issue, 10); // do not spin on a dead target
      },
    };
    pool.dispatch({ origin: spec.origin, method: 'POST', path: spec.path, headers, body }, handler);
  };

  return new Promise((resolve) => {
    let peakRss = 0;
    const sampleRss = () => {
      if (spec.proxyPids.length > 0) peakRss = Math.max(peakRss, memory(spec.proxyPids).rssKb);
    };
    const rssTimer = setInterval(sampleRss, RSS_SAMPLE_MS);
    let proxyTicks: CpuTicks = { user: 0, system: 0 };
    let backendTicks: CpuTicks = { user: 0, system: 0 };
    let machineTicks = 0;
    let ownCpu = process.cpuUsage();
    let windowStartUs = 0;
    const startRss = spec.proxyPids.length > 0 ? memory(spec.proxyPids).rssKb : null;

    for (let i = 0; i < spec.concurrency; i++) {
      if (spec.rampMs > 0 && i > 0) setTimeout(issue, (i * spec.rampMs) / spec.concurrency);
      else issue();
    }

    setTimeout(() => {
      proxyTicks = cpuTicks(spec.proxyPids);
      backendTicks = cpuTicks(spec.backendPids);
      machineTicks = machineBusyTicks();
      ownCpu = process.cpuUsage();
      windowStartUs = monotonicUs();
      windowStart = performance.now();
      measuring = true;
      setTimeout(() => {
        const windowEnd = performance.now();
        const windowEndUs = monotonicUs();
        measuring = false;
        stopped = true;
        const openTtfe = [...awaitingFirst].filter((w) => w.started >= windowStart).map((w) => windowEnd - w.started);
        const tick = 1000 / CLOCK_TICKS_PER_SECOND;
        const proxyNow = cpuTicks(spec.proxyPids);
        const backendNow = cpuTicks(spec.backendPids);
        const hasProxy = spec.proxyPids.length > 0;
        const proxyCpuMs = hasProxy ? (proxyNow.user + proxyNow.system - proxyTicks.user - proxyTicks.system) * tick : null;
        const proxySysMs = hasProxy ? (proxyNow.system - proxyTicks.system) * tick : null;
        const backendCpuMs = (backendNow.user + backendNow.system - backendTicks.user - backendTicks.system) * tick;
        const machineCpuMs = (machineBusyTicks() - machineTicks) * tick;
        const own = process.cpuUsage(ownCpu);
        sampleRss();
        clearInterval(rssTimer);
        void pool.destroy().catch(() => undefined);
        resolve({
          windowMs: windowEnd - windowStart,
          completed,
          errors,
          firstError,
          events,
          latencyMs: latency.percentiles(),
          ttfeMs: ttfe.percentiles(openTtfe),
          gapMs: gaps.percentiles(),
          proxyCpuMs,
          proxySysMs,
          backendCpuMs,
          loadgenCpuMs: (own.user + own.system) / 1000,
          machineCpuMs,
          proxyStartRssKb: startRss,
          proxyPeakRssKb: spec.proxyPids.length > 0 ? peakRss : null,
          windowStartUs,
          windowEndUs,
        });
      }, spec.durationMs);
    }, spec.warmupMs);
  });
}

if (require.main === module) {
  const spec = JSON.parse(process.argv[2] ?? '') as LoadSpec;
  runLoad(spec).then(
    (result) => process.send?.(result, () => process.exit(0)) ?? process.stdout.write(JSON.stringify(result) + '\n'),
    (err: Error) => {
      process.stderr.write(`loadgen: ${err.stack ?? err.message}\n`);
      process.exit(1);
    },
  );
}
