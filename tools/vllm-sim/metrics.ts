/**
 * The `vllm:*` Prometheus series of vllm/v1/metrics/loggers.py, rendered in the text format
 * prometheus_client's generate_latest produces (labels sorted, float values, `_total` for
 * counters, `_bucket`/`_count`/`_sum` for histograms, each family followed by its `_created`
 * samples as a separate `name_created` gauge family). Counts are real: every request the
 * simulator serves is recorded. The text-format pieces (floatToGoString, labelText, Histogram)
 * also write the SGLang mode's series (sglang/metrics.ts).
 */
import type { FinishReason, SleepState } from './ipc';
import { pyFloat } from './python-format';

/** prometheus_client.CONTENT_TYPE_LATEST. */
export const METRICS_CONTENT_TYPE = 'text/plain; version=0.0.4; charset=utf-8';

const FINISH_REASONS: FinishReason[] = ['stop', 'length', 'abort', 'error', 'repetition'];
const SLEEP_STATES: SleepState[] = ['awake', 'weights_offloaded', 'discard_all'];

const TTFT_BUCKETS = [
  0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
  20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];
const ITL_BUCKETS = [
  0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
  40.0, 80.0,
];
const REQUEST_LATENCY_BUCKETS = [
  0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
  480.0, 960.0, 1920.0, 7680.0,
];
const N_BUCKETS = [1, 2, 5, 10, 20];

/** vLLM's build_1_2_5_buckets: 1, 2, 5, 10, 20, 50, ... up to `max`. */
export function build125Buckets(max: number): number[] {
  const buckets: number[] = [];
  for (let exponent = 1; ; exponent *= 10) {
    for (const mantissa of [1, 2, 5]) {
      const value = mantissa * exponent;
      if (value > max) return buckets;
      buckets.push(value);
    }
  }
}

/** prometheus_client's floatToGoString. */
export function floatToGoString(value: number): string {
  if (value === Infinity) return '+Inf';
  if (value === -Infinity) return '-Inf';
  if (Number.isNaN(value)) return 'NaN';
  const s = pyFloat(value);
  const dot = s.indexOf('.');
  if (value > 0 && dot > 6 && !s.includes('e')) {
    const mantissa = `${s[0]}.${s.slice(1, dot)}${s.slice(dot + 1)}`.replace(/\.?0+$/, '');
    return `${mantissa}e+0${dot - 1}`;
  }
  return s;
}

/** Label names and values, in declaration order. */
export type Labels = Record<string, string>;

/** `{a="1",b="2"}`: prometheus_client's registry sorts the names, SGLang's output keeps their order. */
export function labelText(labels: Labels, sorted = true): string {
  const entries = Object.entries(labels);
  if (sorted) entries.sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0));
  if (!entries.length) return '';
  const escape = (v: string): string =>
    v.replace(/\\/g, '\\\\').replace(/\n/g, '\\n').replace(/"/g, '\\"');
  return `{${entries.map(([k, v]) => `${k}="${escape(v)}"`).join(',')}}`;
}

/**
 * How samples are written: prometheus_client's registry (vLLM) sorts label names and adds
 * `_created`; SGLang's MultiProcessCollector keeps declaration order and has no `_created`.
 */
export interface ExpositionStyle {
  sorted: boolean;
  created: number | null;
}

/**
 * generate_latest's `_created` samples: pulled out of their family and written after it as a
 * gauge family of their own, `# HELP name_created <the family's help>` and `# TYPE name_created
 * gauge` (name without `_total`), one sample per label set.
 */
function createdFamily(name: string, help: string, samples: Array<[Labels, number]>, sorted = true): string[] {
  const lines = [`# HELP ${name}_created ${help}`, `# TYPE ${name}_created gauge`];
  for (const [labels, created] of samples) {
    lines.push(`${name}_created${labelText(labels, sorted)} ${floatToGoString(created)}`);
  }
  return lines;
}

export class Histogram {
  private readonly counts: number[];
  private sum = 0;
  count = 0;

  constructor(
    readonly name: string,
    readonly help: string,
    private readonly bounds: number[],
  ) {
    this.counts = bounds.map(() => 0);
  }

  observe(value: number): void {
    this.sum += value;
    this.count += 1;
    const idx = this.bounds.findIndex((b) => value <= b);
    if (idx !== -1) this.counts[idx] += 1;
  }

  render(labels: Labels, { sorted, created }: ExpositionStyle): string[] {
    const text = (l: Labels): string => labelText(l, sorted);
    const lines = [`# HELP ${this.name} ${this.help}`, `# TYPE ${this.name} histogram`];
    let cumulative = 0;
    this.bounds.forEach((bound, i) => {
      cumulative += this.counts[i];
      const le = { ...labels, le: floatToGoString(bound) };
      lines.push(`${this.name}_bucket${text(le)} ${floatToGoString(cumulative)}`);
    });
    lines.push(`${this.name}_bucket${text({ ...labels, le: '+Inf' })} ${floatToGoString(this.count)}`);
    lines.push(`${this.name}_count${text(labels)} ${floatToGoString(this.count)}`);
    lines.push(`${this.name}_sum${text(labels)} ${floatToGoString(this.sum)}`);
    if (created !== null) lines.push(...createdFamily(this.name, this.help, [[labels, created]], sorted));
    return lines;
  }
}

/** Per-request timings the server hands over when a request finishes. */
export interface FinishedRequestStats {
  reason: FinishReason;
  promptTokens: number;
  generationTokens: number;
  maxTokens: number;
  n: number;
  e2eSeconds: number;
  /** Null when the request never got scheduled (aborted while waiting). */
  queueSeconds: number | null;
}

export class SimMetrics {
  running = 0;
  waiting = 0;
  kvCacheUsage = 0;
  /** The series of vllm:engine_sleep_state at 1; null for none (a level-0 sleep). */
  sleepState: SleepState | null = 'awake';
  private promptTokens = 0;
  private generationTokens = 0;
  private readonly success = new Map<FinishReason, number>(FINISH_REASONS.map((r) => [r, 0]));
  private readonly created = Date.now() / 1000;
  private readonly labels: Labels;

  private readonly ttft = new Histogram(
    'vllm:time_to_first_token_seconds',
    'Histogram of time to first token in seconds.',
    TTFT_BUCKETS,
  );
  private readonly itl = new Histogram(
    'vllm:inter_token_latency_seconds',
    'Histogram of inter-token latency in seconds.',
    ITL_BUCKETS,
  );
  private readonly e2e = new Histogram(
    'vllm:e2e_request_latency_seconds',
    'Histogram of e2e request latency in seconds.',
    REQUEST_LATENCY_BUCKETS,
  );
  private readonly queueTime = new Histogram(
    'vllm:request_queue_time_seconds',
    'Histogram of time spent in WAITING phase for request.',
    REQUEST_LATENCY_BUCKETS,
  );
  private readonly requestPromptTokens: Histogram;
  private readonly requestGenerationTokens: Histogram;
  private readonly requestMaxTokens: Histogram;
  private readonly requestN = new Histogram(
    'vllm:request_params_n',
    'Histogram of the n request parameter.',
    N_BUCKETS,
  );

  constructor(
    modelName: string,
    maxModelLen: number,
    private readonly cacheConfig: Labels,
  ) {
    this.labels = { engine: '0', model_name: modelName };
    const tokenBuckets = build125Buckets(maxModelLen);
    this.requestPromptTokens = new Histogram(
      'vllm:request_prompt_tokens',
      'Number of prefill tokens processed.',
      tokenBuckets,
    );
    this.requestGenerationTokens = new Histogram(
      'vllm:request_generation_tokens',
      'Number of generation tokens processed.',
      tokenBuckets,
    );
    this.requestMaxTokens = new Histogram(
      'vllm:request_params_max_tokens',
      'Histogram of the max_tokens request parameter.',
      tokenBuckets,
    );
  }

  recordPrefill(promptTokens: number): void {
    this.promptTokens += promptTokens;
  }

  /** One decoding step produced `count` tokens (one per choice); latency since the previous. */
  recordTokens(count: number, secondsSincePrevious: number, first: boolean): void {
    this.generationTokens += count;
    (first ? this.ttft : this.itl).observe(secondsSincePrevious);
  }

  recordFinished(stats: FinishedRequestStats): void {
    this.success.set(stats.reason, (this.success.get(stats.reason) ?? 0) + 1);
    this.e2e.observe(stats.e2eSeconds);
    if (stats.queueSeconds !== null) this.queueTime.observe(stats.queueSeconds);
    this.requestPromptTokens.observe(stats.promptTokens);
    this.requestGenerationTokens.observe(stats.generationTokens);
    this.requestMaxTokens.observe(stats.maxTokens);
    this.requestN.observe(stats.n);
  }

  /** Cumulative prompt and generation tokens, for the periodic stats log line. */
  tokenTotals(): { prompt: number; generation: number } {
    return { prompt: this.promptTokens, generation: this.generationTokens };
  }

  render(): string {
    const l = this.labels;
    const out: string[] = [];
    const gauge = (name: string, help: string, samples: Array<[Labels, number]>): void => {
      out.push(`# HELP ${name} ${help}`, `# TYPE ${name} gauge`);
      for (const [labels, value] of samples) {
        out.push(`${name}${labelText(labels)} ${floatToGoString(value)}`);
      }
    };
    const counter = (name: string, help: string, samples: Array<[Labels, number]>): void => {
      out.push(`# HELP ${name}_total ${help}`, `# TYPE ${name}_total counter`);
      for (const [labels, value] of samples) out.push(`${name}_total${labelText(labels)} ${floatToGoString(value)}`);
      out.push(...createdFamily(name, help, samples.map(([labels]) => [labels, this.created])));
    };

    gauge('vllm:num_requests_running', 'Number of requests in model execution batches.', [
      [l, this.running],
    ]);
    gauge('vllm:num_requests_waiting', 'Number of requests waiting to be processed.', [
      [l, this.waiting],
    ]);
    gauge(
      'vllm:num_requests_waiting_by_reason',
      'Number of requests waiting to be processed, by the reason they are waiting.',
      [
        [{ ...l, reason: 'capacity' }, this.waiting],
        [{ ...l, reason: 'deferred' }, 0],
      ],
    );
    gauge(
      'vllm:engine_sleep_state',
      'Engine sleep state; awake = 0 means engine is sleeping; awake = 1 means engine is ' +
        'awake; weights_offloaded = 1 means sleep level 1; discard_all = 1 means sleep level 2.',
      SLEEP_STATES.map((s) => [{ ...l, sleep_state: s }, this.sleepState === s ? 1 : 0]),
    );
    gauge('vllm:kv_cache_usage_perc', 'KV-cache usage. 1 means 100 percent usage.', [
      [l, this.kvCacheUsage],
    ]);
    counter(
      'vllm:prefix_cache_queries',
      'Prefix cache queries, in terms of number of queried tokens.',
      [[l, this.promptTokens]],
    );
    counter('vllm:prefix_cache_hits', 'Prefix cache hits, in terms of number of cached tokens.', [
      [l, 0],
    ]);
    counter('vllm:num_preemptions', 'Cumulative number of preemption from the engine.', [[l, 0]]);
    counter('vllm:prompt_tokens', 'Number of prefill tokens processed.', [[l, this.promptTokens]]);
    counter('vllm:generation_tokens', 'Number of generation tokens processed.', [
      [l, this.generationTokens],
    ]);
    counter(
      'vllm:request_success',
      'Count of successfully processed requests.',
      FINISH_REASONS.map((r) => [{ ...l, finished_reason: r }, this.success.get(r) ?? 0]),
    );
    for (const histogram of [
      this.requestPromptTokens,
      this.requestGenerationTokens,
      this.requestMaxTokens,
      this.requestN,
      this.ttft,
      this.itl,
      this.e2e,
      this.queueTime,
    ]) {
      out.push(...histogram.render(l, { sorted: true, created: this.created }));
    }
    gauge('vllm:cache_config_info', 'Information of the LLMEngine CacheConfig', [
      [{ ...this.cacheConfig, engine: '0' }, 1],
    ]);
    return out.join('\n') + '\n';
  }
}
