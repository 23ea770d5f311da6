import { Controller, Get, Header, Injectable } from '@nestjs/common';
import { ApiExcludeController } from '@nestjs/swagger';
import type { IncomingMessage, ServerResponse } from 'node:http';
import type { FastifyInstance } from 'fastify';
import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from 'prom-client';
import { type ServerState, VLLMServerManager } from '../infrastructure/vllm-server.manager';
import { VLLMClient } from '../infrastructure/vllm.client';
import { TrafficGate } from './traffic.gate';
import type { AccessLog } from './logging';
import { outcomeOf } from './request-outcome';

const STATES: readonly ServerState[] = ['disabled', 'stopped', 'starting', 'ready', 'unreachable', 'restarting', 'sleeping', 'waking', 'stopping', 'failed'];
/** A scrape must not hang on vLLM: past this its part of the scrape is left out. */
const VLLM_SCRAPE_TIMEOUT_MS = 2_000;
const CONTENT_TYPE = 'text/plain; version=0.0.4; charset=utf-8';

/**
 * tide-vllm's Prometheus metrics. Names start with `tide_`, so they never clash with vLLM's
 * (`vllm:*`, and its Python `process_*`) in the combined scrape.
 */
@Injectable()
export class Metrics {
  readonly registry = new Registry();
  private readonly requests = new Counter({
    name: 'tide_http_requests_total',
    help: 'HTTP requests answered, by route, method and status',
    labelNames: ['route', 'method', 'status'] as const,
    registers: [this.registry],
  });
  private readonly duration = new Histogram({
    name: 'tide_http_request_duration_seconds',
    help: 'Time from request to the end of the response (streams: the whole stream)',
    labelNames: ['route', 'method'] as const,
    buckets: [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300],
    registers: [this.registry],
  });
  private readonly ttft = new Histogram({
    name: 'tide_stream_time_to_first_token_seconds',
    help: 'Time from request to the first streamed event',
    labelNames: ['route'] as const,
    buckets: [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30],
    registers: [this.registry],
  });
  private readonly promptTokens = new Counter({
    name: 'tide_prompt_tokens_total',
    help: 'Prompt tokens of answered requests whose usage the gateway saw',
    registers: [this.registry],
  });
  private readonly completionTokens = new Counter({
    name: 'tide_completion_tokens_total',
    help: 'Completion tokens of answered requests whose usage the gateway saw',
    registers: [this.registry],
  });
  private readonly requestChildren = new Map<string, ReturnType<Metrics['requests']['labels']>>();
  private readonly durationChildren = new Map<string, ReturnType<Metrics['duration']['labels']>>();
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
    const { registry } = this;
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
        for (const state of STATES) this.set({ state }, state === current ? 1 : 0);
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
    fromSnapshot('tide_vllm_sleeps_total', 'Times vLLM was put to sleep', () => manager.snapshot().sleeps);
    fromSnapshot('tide_vllm_wakeups_total', 'Times vLLM was woken up', () => manager.snapshot().wakeups);
    fromSnapshot('tide_requests_rejected_overload_total', 'Requests refused with 429 (web.max_concurrent_requests)', () => gate.rejectedForOverload);
  }

  /** Records every response when it ends, hijacked streams included, and writes its access line. */
  register(fastify: FastifyInstance, accessLog: AccessLog): void {
    this.accessLog = accessLog;
    fastify.addHook('onRequest', (request, reply, done) => {
      // A request OpenAiProxy handed over is measured already.
      if (!request.raw.tideHandedOver) this.track(request.raw, reply.raw, request.routeOptions.url ?? 'unmatched', request.id);
      done();
    });
  }

  /** Measures one request from now until its response closes; the answer carries its id. */
  track(req: IncomingMessage, res: ServerResponse, route: string, requestId: string): void {
    const started = performance.now();
    outcomeOf(res).route = route;
    res.setHeader('x-request-id', requestId); // every answer carries it; routes may override
    res.once('close', () => {
      const method = req.method ?? 'GET';
      const outcome = res.tideOutcome;
      const status = res.headersSent ? res.statusCode : 499; // 499: the client left before an answer
      const ms = performance.now() - started;
      this.series(route, method, status).inc();
      this.timer(route, method).observe(ms / 1000);
      this.accessLog?.record(req, requestId, status, ms, outcome);
      if (!outcome) return;
      if (outcome.firstEventAt !== undefined) this.ttft.observe({ route }, (outcome.firstEventAt - started) / 1000);
      if (outcome.usage) {
        this.promptTokens.inc(outcome.usage.prompt_tokens);
        this.completionTokens.inc(outcome.usage.completion_tokens);
      }
      if (outcome.errorType) this.errors.inc({ type: outcome.errorType });
    });
  }

  /** Label children are cached: prom-client would hash the label set on every request otherwise. */
  private series(route: string, method: string, status: number) {
    const key = `${route} ${method} ${status}`;
    let child = this.requestChildren.get(key);
    if (!child) this.requestChildren.set(key, (child = this.requests.labels(route, method, String(status))));
    return child;
  }

  private timer(route: string, method: string) {
    const key = `${route} ${method}`;
    let child = this.durationChildren.get(key);
    if (!child) this.durationChildren.set(key, (child = this.duration.labels(route, method)));
    return child;
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
