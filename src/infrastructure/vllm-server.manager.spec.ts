import { engineProgress } from './vllm-server.manager';

describe('engineProgress (what the hang check reads of vLLM’s /metrics)', () => {
  const metrics = (running: number, waiting: number, prompt: number, generation: number, engine = '0') =>
    [
      '# HELP vllm:num_requests_running Number of requests in model execution batches.',
      '# TYPE vllm:num_requests_running gauge',
      `vllm:num_requests_running{engine="${engine}",model_name="m"} ${running}`,
      `vllm:num_requests_waiting{engine="${engine}",model_name="m"} ${waiting}`,
      `vllm:num_requests_waiting_by_reason{engine="${engine}",model_name="m",reason="capacity"} 9`,
      `vllm:prompt_tokens_total{engine="${engine}",model_name="m"} ${prompt}`,
      `vllm:prompt_tokens_created{engine="${engine}",model_name="m"} 1.7e+09`,
      `vllm:generation_tokens_total{engine="${engine}",model_name="m"} ${generation}`,
      `vllm:request_generation_tokens_sum{engine="${engine}",model_name="m"} 5.0`,
    ].join('\n');

  it('sums work in an engine and tokens it processed, engine by engine (data parallel: one hung rank must show)', () => {
    expect(engineProgress(metrics(2, 1, 30, 12.0))).toEqual(new Map([['0', { busy: 3, tokens: 42 }]]));
    expect(engineProgress(`${metrics(1, 0, 10, 5)}\n${metrics(0, 4, 7, 1, '1')}\n`)).toEqual(
      new Map([
        ['0', { busy: 1, tokens: 15 }],
        ['1', { busy: 4, tokens: 8 }],
      ]),
    );
  });

  it('is null when a series is missing (vLLM run with --disable-log-stats keeps none)', () => {
    expect(engineProgress('')).toBeNull();
    expect(engineProgress(metrics(1, 0, 1, 1).replace(/^vllm:generation_tokens_total.*$/m, ''))).toBeNull();
  });
});
