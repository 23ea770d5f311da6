/**
 * SGLang's `sglang:*` Prometheus series (python/sglang/srt/observability/metrics_collector.py) as
 * prometheus_client's MultiProcessCollector renders them: no `_created` samples, labels in
 * declaration order, families only once something was recorded. Scheduler gauges carry
 * `model_name, engine_type, tp_rank, pp_rank, moe_ep_rank`; tokenizer series carry
 * `model_name, engine_type`.
 */
import { Histogram, ExpositionStyle, Labels, floatToGoString, labelText } from '../metrics';

export { METRICS_CONTENT_TYPE } from '../metrics';

/** MultiProcessCollector's output: labels in declaration order, no `_created` samples. */
const STYLE: ExpositionStyle = { sorted: false, created: null };

const TTFT_BUCKETS = [0.1, 0.2, 0.4, 0.6, 0.8, 1, 2, 4, 6, 8, 10, 20, 40, 60, 80, 100, 200, 400];
const E2E_BUCKETS = [
  0.1, 0.2, 0.4, 0.6, 0.8, 1, 2, 4, 6, 8, 10, 20, 40, 60, 80, 100, 200, 400, 600, 1200, 1800, 2400,
];
const ITL_BUCKETS = [
  0.002, 0.004, 0.006, 0.008, 0.01, 0.015, 0.02, 0.025, 0.03, 0.035, 0.04, 0.06, 0.08, 0.1, 0.2,
  0.4, 0.6, 0.8, 1.0, 2.0, 4.0, 6.0, 8.0,
];
const QUEUE_BUCKETS = [
  0.0, 0.1, 0.2, 0.5, 1, 2, 3, 4, 5, 10, 15, 20, 30, 40, 50, 60, 70, 80, 90, 100, 200, 300, 400,
  500, 600, 700, 800, 900, 1000, 1200, 1400, 1600, 1800, 2000, 2500, 3000,
];

/** The scheduler's state at scrape time. */
export interface SchedulerSnapshot {
  running: number;
  queued: number;
  usedTokens: number;
  maxTotalTokens: number;
  genThroughput: number;
}

export class SglangMetrics {
  private readonly schedulerLabels: Labels;
  private readonly tokenizerLabels: Labels;
  private promptTokens = 0;
  private generationTokens = 0;
  private requests = 0;
  private aborted = 0;
  private readonly ttft = new Histogram(
    'sglang:time_to_first_token_seconds',
    'Histogram of time to first token in seconds.',
    TTFT_BUCKETS,
  );
  private readonly itl = new Histogram(
    'sglang:inter_token_latency_seconds',
    'Histogram of inter-token latency in seconds.',
    ITL_BUCKETS,
  );
  private readonly e2e = new Histogram(
    'sglang:e2e_request_latency_seconds',
    'Histogram of End-to-end request latency in seconds',
    E2E_BUCKETS,
  );
  private readonly queueTime = new Histogram(
    'sglang:queue_time_seconds',
    'Histogram of queueing time in seconds.',
    QUEUE_BUCKETS,
  );

  constructor(
    modelName: string,
    private readonly startupSeconds: number,
  ) {
    this.tokenizerLabels = { model_name: modelName, engine_type: 'unified' };
    this.schedulerLabels = { ...this.tokenizerLabels, tp_rank: '0', pp_rank: '0', moe_ep_rank: '0' };
  }

  recordFirstToken(seconds: number): void {
    this.ttft.observe(seconds);
  }

  recordInterToken(seconds: number): void {
    this.itl.observe(seconds);
  }

  recordQueueTime(seconds: number): void {
    this.queueTime.observe(seconds);
  }

  /** observe_one_finished_request (aborted requests count separately). */
  recordFinished(promptTokens: number, generationTokens: number, e2eSeconds: number): void {
    this.promptTokens += promptTokens;
    this.generationTokens += generationTokens;
    this.requests += 1;
    this.e2e.observe(e2eSeconds);
  }

  recordAborted(): void {
    this.aborted += 1;
  }

  /** Totals for tests and the throughput log. */
  totals(): { prompt: number; generation: number; requests: number; aborted: number } {
    return { prompt: this.promptTokens, generation: this.generationTokens, requests: this.requests, aborted: this.aborted };
  }

  render(s: SchedulerSnapshot): string {
    const out: string[] = [];
    const gauge = (name: string, help: string, value: number): void => {
      out.push(`# HELP ${name} ${help}`, `# TYPE ${name} gauge`, `${name}${labelText(this.schedulerLabels, STYLE.sorted)} ${floatToGoString(value)}`);
    };
    const counter = (name: string, help: string, value: number): void => {
      out.push(
        `# HELP ${name} ${help}`,
        `# TYPE ${name} counter`,
        `${name}_total${labelText(this.tokenizerLabels, STYLE.sorted)} ${floatToGoString(value)}`,
      );
    };
    gauge('sglang:num_running_reqs', 'The number of running requests.', s.running);
    gauge('sglang:num_used_tokens', 'The number of used tokens.', s.usedTokens);
    gauge('sglang:token_usage', 'The token usage.', s.maxTotalTokens ? s.usedTokens / s.maxTotalTokens : 0);
    gauge('sglang:gen_throughput', 'The generation throughput (token/s).', s.genThroughput);
    gauge('sglang:num_queue_reqs', 'The number of requests in the waiting queue.', s.queued);
    gauge('sglang:num_grammar_queue_reqs', 'The number of requests in the grammar waiting queue.', 0);
    gauge('sglang:cache_hit_rate', 'The prefix cache hit rate.', 0);
    gauge('sglang:max_total_num_tokens', 'Maximum total number of tokens in the KV cache pool.', s.maxTotalTokens);
    gauge('sglang:engine_startup_time', 'The time taken for the engine to start up.', this.startupSeconds);
    if (this.queueTime.count) out.push(...this.queueTime.render(this.schedulerLabels, STYLE));
    if (this.requests) {
      counter('sglang:prompt_tokens', 'Number of prefill tokens processed.', this.promptTokens);
      counter('sglang:generation_tokens', 'Number of generation tokens processed.', this.generationTokens);
      counter('sglang:num_requests', 'Number of requests processed.', this.requests);
      out.push(...this.e2e.render(this.tokenizerLabels, STYLE));
    }
    if (this.aborted) counter('sglang:num_aborted_requests', 'Number of requests aborted.', this.aborted);
    if (this.ttft.count) out.push(...this.ttft.render(this.tokenizerLabels, STYLE));
    if (this.itl.count) out.push(...this.itl.render(this.tokenizerLabels, STYLE));
    return out.join('\n') + '\n';
  }
}
