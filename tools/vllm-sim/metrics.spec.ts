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
});
