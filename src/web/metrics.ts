import { Controller, Get, Header, Injectable } from '@nestjs/common';
import { ApiExcludeController } from '@nestjs/swagger';
import type { IncomingMessage, ServerResponse } from 'node:http';
import type { FastifyInstance } from 'fastify';
import { Counter, Gauge, Registry, collectDefaultMetrics } from 'prom-client';
import { SERVER_STATES, VLLMServerManager } from '../infrastructure/vllm-server.manager';
import { VLLMClient } from '../infrastructure/vllm.client';
import { TrafficGate, closeWithConnection } from './traffic.gate';
import { errorType } from './http-error';
import type { AccessLog } from './logging';
import { outcomeOf } from './request-outcome';

/** The error type of a response whose client left (`client_gone`), as the one mapping names it. */
const CLIENT_GONE_TYPE = errorType('CLIENT_GONE');

/** A scrape must not hang on vLLM: past this its part of the scrape is left out. */
const VLLM_SCRAPE_TIMEOUT_MS = 2_000;
const CONTENT_TYPE = 'text/plain; version=0.0.4; charset=utf-8';
const DURATION_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300];
const TTFT_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30];

/**
 * tide-vllm's Prometheus metrics. Names start with `tide_`, so they never clash with vLLM's
 * (`vllm:*`, and its Python `process_*`) in the combined scrape.
 */
@Injectable()
export class Metrics {
  readonly registry = new Registry();
  /** Counts, durations and first-event times by route: plain numbers on the request path. */
  private readonly routes = new Map<string, RouteStats>();
  private promptTokens = 0;
  private completionTokens = 0;
  private accessLog: AccessLog | null = null;
  private readonly errors = new Counter({
    name: 'tide_errors_total',
    help: 'Error answers by type (upstream_timeout, upstream_error, vllm_not_ready, overloaded …)',
    labelNames: ['type'] as const,
    registers: [this.registry],
  });

  constructor(
    private readonly manager: VLLMServerManager,
    gate: TrafficGate,
    private readonly client: VLLMClient,
  ) {
    collectDefaultMetrics({ register: this.registry, prefix: 'tide_' });
    // Gauges named like counters (prom-client's legacy names): the same totals are the sums of
    // tide_nodejs_active_{handles,requests,resources} over their `type`.
    for (const gauge of ['handles', 'requests', 'resources']) this.registry.removeSingleMetric(`tide_nodejs_active_${gauge}_total`);
    const { registry, routes } = this;
    expose(registry, 'tide_http_requests_total', 'HTTP requests by route, method and status (499: the client left before an answer was sent)', 'counter', () =>
      [...routes.values()].flatMap((r) => [...r.methods.values()].flatMap((m) => [...m.statuses].map(([status, value]) => ({ labels: { route: r.route, method: m.method, status: String(status) }, value })))),
    );
    expose(registry, 'tide_http_request_duration_seconds', 'Time from request to the end of the response (streams: the whole stream)', 'histogram', () =>
      [...routes.values()].flatMap((r) => [...r.methods.values()].flatMap((m) => m.duration.values('tide_http_request_duration_seconds', { route: r.route, method: m.method }))),
    );
    expose(registry, 'tide_stream_time_to_first_token_seconds', 'Time from request to the first streamed event', 'histogram', () =>
      [...routes.values()].flatMap((r) => (r.ttft.count > 0 ? r.ttft.values('tide_stream_time_to_first_token_seconds', { route: r.route }) : [])),
    );
    new Gauge({
      name: 'tide_requests_in_flight',
      help: 'API requests being answered now',
      registers: [registry],
      collect() {
        this.set(gate.inFlight);
      },
    });
    new Gauge({
      name: 'tide_vllm_state',
      help: 'The supervisor state of vLLM: 1 for the current state, 0 for the others',
      labelNames: ['state'] as const,
      registers: [registry],
      collect() {
        const current = manager.currentState;
        for (const state of SERVER_STATES) this.set({ state }, state === current ? 1 : 0);
      },
    });
    const fromSnapshot = (name: string, help: string, read: () => number) =>
      new Counter({
        name,
        help,
        registers: [registry],
        collect() {
          this.reset();
          this.inc(read());
        },
      });
    fromSnapshot('tide_vllm_restarts_total', 'vLLM restarts (crashes, failed probes, operator restarts)', () => manager.snapshot().restarts);
    fromSnapshot('tide_vllm_died_asleep_total', 'Times vLLM died or hung asleep at level 1 or 2 (it then sleeps on as at level 3; no restart)', () => manager.snapshot().diedAsleep);
    fromSnapshot('tide_vllm_sleeps_total', 'Times vLLM was put to sleep', () => manager.snapshot().sleeps);
    fromSnapshot('tide_vllm_wakeups_total', 'Times vLLM was woken up', () => manager.snapshot().wakeups);
    fromSnapshot('tide_requests_rejected_overload_total', 'Requests refused with 429 (web.max_concurrent_requests)', () => gate.rejectedForOverload);
    fromSnapshot('tide_prompt_tokens_total', 'Prompt tokens of answered requests whose usage the gateway saw', () => this.promptTokens);
    fromSnapshot('tide_completion_tokens_total', 'Completion tokens of answered requests whose usage the gateway saw', () => this.completionTokens);
  }

  /** Records every response when it ends, hijacked streams included, and writes its access line. */
  register(fastify: FastifyInstance, accessLog: AccessLog): void {
    this.accessLog = accessLog;
    fastify.addHook('onRequest', (request, reply, done) => {
      reply.raw.setHeader('x-request-id', request.id); // every answer carries it; routes may override
      // A request OpenAiProxy handed over is measured already (its id is the one it was given).
      if (!request.raw.tideHandedOver) this.track(request.raw, reply.raw, request.routeOptions.url ?? 'unmatched', request.id);
      done();
    });
  }

  /**
   * Measures one request from now until its response closes (the caller sets X-Request-Id). Call
   * it when the request arrives (its connection is open then).
   */
  track(req: IncomingMessage, res: ServerResponse, route: string, requestId: string): void {
    const started = performance.now();
    outcomeOf(res).route = route;
    closeWithConnection(res);
    res.on('close', () => {
      const method = req.method ?? 'GET';
      const status = sentStatus(req, res);
      // A client that left mid-answer (a stream cut short keeps the 200 it was sent) is told apart
      // from a finished answer, unless the service ended it first and said why (a drain, a failure).
      if (!res.writableFinished && (status === 499 || res.headersSent) && res.tideOutcome?.errorType === undefined) outcomeOf(res).errorType = CLIENT_GONE_TYPE;
      const outcome = res.tideOutcome;
      const ms = performance.now() - started;
      const stats = this.statsOf(route);
      const byMethod = stats.method(method);
      byMethod.statuses.set(status, (byMethod.statuses.get(status) ?? 0) + 1);
      byMethod.duration.observe(ms / 1000);
      this.accessLog?.record(req, requestId, status, ms, outcome);
      if (!outcome) return;
      if (outcome.firstEventAt !== undefined) stats.ttft.observe((outcome.firstEventAt - started) / 1000);
      if (outcome.usage) {
        this.promptTokens += outcome.usage.prompt_tokens;
        this.completionTokens += outcome.usage.completion_tokens;
      }
      if (outcome.errorType) this.errors.inc({ type: outcome.errorType });
    });
  }

  /** An error answered before a request was read (a 431, a 408 while the head came, bytes that are no HTTP): no route, no access line. */
  refusedUnread(type: string): void {
    this.errors.inc({ type });
  }

  private statsOf(route: string): RouteStats {
    let stats = this.routes.get(route);
    if (!stats) this.routes.set(route, (stats = new RouteStats(route)));
    return stats;
  }

  /** Ours, then vLLM's own (bound to loopback, so Prometheus cannot reach it). */
  async scrape(): Promise<string> {
    const ours = await this.registry.metrics();
    if (this.manager.snapshot().mode === 'disabled') return ours;
    try {
      const theirs = await this.client.getText('/metrics', { timeoutMs: VLLM_SCRAPE_TIMEOUT_MS });
      return `${ours}\n${theirs}`;
    } catch {
      return `${ours}\n# vLLM's /metrics could not be read (vLLM is ${this.manager.currentState})\n`;
    }
  }
}

/**
 * The status the client was sent for a response that has closed, or 499 when it left before one.
 * A response that never got its connection (queued behind another, pipelined on it) sent nothing,
 * whatever head it was given. A request whose client took longer than web.client_timeout to send
 * it (the server's requestTimeout) never had a head of its own either: the server's clientError
 * handler (Fastify's, like Node's) wrote a 408 on the socket and destroyed the socket with the
 * timeout error — which is how it is told here. (A request cut for a parse error is left at 499:
 * the error Node reports when a client ends its connection mid-body is one of those, and a client
 * that left cannot be told from one that half-closed to read a 400.)
 */
function sentStatus(req: IncomingMessage, res: ServerResponse): number {
  if (res.socket === null && !res.writableFinished) return 499;
  if (res.headersSent) return res.statusCode;
  return (req.socket?.errored as NodeJS.ErrnoException | null | undefined)?.code === 'ERR_HTTP_REQUEST_TIMEOUT' ? 408 : 499;
}

/**
 * What the request path records of one route: counts by method and status, durations by method,
 * times to the first event. Plain numbers, turned into Prometheus series at scrape time:
 * prom-client's own metrics build and hash a key from the label values on every call, several µs
 * a request (README, "Performance"). The exposition is the same as prom-client's.
 */
class RouteStats {
  readonly methods = new Map<string, { method: string; statuses: Map<number, number>; duration: Buckets }>();
  readonly ttft = new Buckets(TTFT_BUCKETS);

  constructor(readonly route: string) {}

  method(method: string) {
    let stats = this.methods.get(method);
    if (!stats) this.methods.set(method, (stats = { method, statuses: new Map(), duration: new Buckets(DURATION_BUCKETS) }));
    return stats;
  }
}

/** One histogram series: observations per bucket (not cumulative), their sum and count. */
export class Buckets {
  private readonly counts: number[];
  sum = 0;
  count = 0;

  constructor(private readonly bounds: readonly number[]) {
    this.counts = bounds.map(() => 0);
  }

  observe(value: number): void {
    this.sum += value;
    this.count += 1;
    const i = this.bounds.findIndex((bound) => value <= bound);
    if (i !== -1) this.counts[i] += 1;
  }

  /** prom-client's values for this series: cumulative buckets, +Inf, _sum, _count. */
  values(name: string, labels: Record<string, string>): MetricValue[] {
    let cumulative = 0;
    const buckets = this.bounds.map((le, i) => ({ labels: { le }, sharedLabels: labels, value: (cumulative += this.counts[i]), metricName: `${name}_bucket` }));
    return [
      ...buckets,
      { labels: { le: '+Inf' }, sharedLabels: labels, value: this.count, metricName: `${name}_bucket` },
      { labels: {}, sharedLabels: labels, value: this.sum, metricName: `${name}_sum` },
      { labels: {}, sharedLabels: labels, value: this.count, metricName: `${name}_count` },
    ];
  }
}

interface MetricValue {
  labels: Record<string, string | number>;
  sharedLabels?: Record<string, string>;
  value: number;
  metricName?: string;
}

/** A metric whose values are read at scrape time; the registry formats it as its own. */
export function expose(registry: Registry, name: string, help: string, type: 'counter' | 'histogram', values: () => MetricValue[]): void {
  const metric = { name, help, type, get: () => Promise.resolve({ name, help, type, values: values(), aggregator: 'sum' }) };
  registry.registerMetric(metric as unknown as Parameters<Registry['registerMetric']>[0]);
}

@ApiExcludeController()
@Controller()
export class MetricsController {
  constructor(private readonly metrics: Metrics) {}

  @Get('metrics')
  @Header('content-type', CONTENT_TYPE)
  scrape(): Promise<string> {
    return this.metrics.scrape();
  }
}
