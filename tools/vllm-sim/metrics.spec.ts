import { SimMetrics, build125Buckets, floatToGoString } from './metrics';

describe('vllm-sim metrics', () => {
  it('formats values like prometheus_client floatToGoString', () => {
    expect(floatToGoString(0)).toBe('0.0');
    expect(floatToGoString(12)).toBe('12.0');
    expect(floatToGoString(Infinity)).toBe('+Inf');
    expect(floatToGoString(1755436850.123)).toBe('1.755436850123e+09');
  });

  it('builds 1-2-5 buckets up to the context length', () => {
    expect(build125Buckets(600)).toEqual([1, 2, 5, 10, 20, 50, 100, 200, 500]);
  });

  it('renders counters with _total/_created and sorted labels', () => {
    const m = new SimMetrics('m', 4096, { block_size: '16' });
    m.recordPrefill(7);
    m.recordFinished({
      reason: 'stop',
      promptTokens: 7,
      generationTokens: 3,
      maxTokens: 10,
      n: 1,
      e2eSeconds: 0.4,
      queueSeconds: 0,
    });
    const text = m.render();
    expect(text).toContain('# TYPE vllm:prompt_tokens_total counter\n');
    expect(text).toContain('vllm:prompt_tokens_total{engine="0",model_name="m"} 7.0\n');
    expect(text).toContain('vllm:request_success_total{engine="0",finished_reason="stop",model_name="m"} 1.0\n');
    expect(text).toContain('vllm:e2e_request_latency_seconds_bucket{engine="0",le="0.3",model_name="m"} 0.0\n');
    expect(text).toContain('vllm:e2e_request_latency_seconds_bucket{engine="0",le="0.5",model_name="m"} 1.0\n');
    expect(text).toContain('vllm:e2e_request_latency_seconds_count{engine="0",model_name="m"} 1.0\n');
    expect(text).toContain('vllm:engine_sleep_state{engine="0",model_name="m",sleep_state="awake"} 1.0\n');
  });

  it('writes _created samples after their family as a name_created gauge family, like generate_latest', () => {
    jest.spyOn(Date, 'now').mockReturnValue(1755436850123);
    const m = new SimMetrics('m', 4096, { block_size: '16' });
    jest.restoreAllMocks();
    const lines = m.render().split('\n');
    const from = (first: string, count: number): string[] => {
      const at = lines.indexOf(first);
      expect(at).toBeGreaterThanOrEqual(0);
      return lines.slice(at, at + count);
    };
    const labels = (reason: string): string => `{engine="0",finished_reason="${reason}",model_name="m"}`;
    const reasons = ['stop', 'length', 'abort', 'error', 'repetition'];
    expect(from('# HELP vllm:request_success_total Count of successfully processed requests.', 14)).toEqual([
      '# HELP vllm:request_success_total Count of successfully processed requests.',
      '# TYPE vllm:request_success_total counter',
      ...reasons.map((r) => `vllm:request_success_total${labels(r)} 0.0`),
      '# HELP vllm:request_success_created Count of successfully processed requests.',
      '# TYPE vllm:request_success_created gauge',
      ...reasons.map((r) => `vllm:request_success_created${labels(r)} 1.755436850123e+09`),
    ]);
    const n = from('# HELP vllm:request_params_n Histogram of the n request parameter.', 13);
    expect(n.slice(-6)).toEqual([
      'vllm:request_params_n_bucket{engine="0",le="+Inf",model_name="m"} 0.0',
      'vllm:request_params_n_count{engine="0",model_name="m"} 0.0',
      'vllm:request_params_n_sum{engine="0",model_name="m"} 0.0',
      '# HELP vllm:request_params_n_created Histogram of the n request parameter.',
      '# TYPE vllm:request_params_n_created gauge',
      'vllm:request_params_n_created{engine="0",model_name="m"} 1.755436850123e+09',
    ]);
    // Every sample belongs to the family its last # TYPE line names.
    let family = '';
    for (const line of lines.filter(Boolean)) {
      if (line.startsWith('# TYPE ')) family = line.split(' ')[2];
      else if (!line.startsWith('# HELP ')) expect([line, line.startsWith(family)]).toEqual([line, true]);
    }
  });
});
