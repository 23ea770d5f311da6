import { parseConfig } from '../config/config.loader';
import type { VllmConfig } from '../config/config.schema';
import { buildLaunchSpec, redactArgs, secretValues } from './engine-args';

function vllmSection(vllm: Record<string, unknown> = {}): VllmConfig {
  return parseConfig({ vllm: { model_path: 'Qwen/Qwen3-0.6B', ...vllm } }).vllm;
}

const VLLM_DEFAULT_FLAGS = [
  '--served-model-name', 'Qwen/Qwen3-0.6B',
  '--host', '127.0.0.1',
  '--port', '8000',
  '--gpu-memory-utilization', '0.9',
  '--tensor-parallel-size', '1',
  '--max-num-seqs', '256',
  '--max-num-batched-tokens', '8192',
  '--max-model-len', '4096',
  '--dtype', 'auto',
  '--enable-prefix-caching',
  '--enable-chunked-prefill',
];

/** The environment tide-vllm gives vLLM with the default config. */
const VLLM_ENV = { SPT_NOENV: '1', VLLM_ENGINE_READY_TIMEOUT_S: '600' };

const SGLANG_DEFAULT_FLAGS = [
  '--model-path', 'Qwen/Qwen3-0.6B',
  '--served-model-name', 'Qwen/Qwen3-0.6B',
  '--host', '127.0.0.1',
  '--port', '8000',
  '--mem-fraction-static', '0.9',
  '--tp-size', '1',
  '--max-running-requests', '256',
  '--max-prefill-tokens', '8192',
  '--context-length', '4096',
  '--dtype', 'auto',
];

describe('buildLaunchSpec for vLLM', () => {
  it('passes the model positionally to `vllm serve`, then every configured flag', () => {
    expect(buildLaunchSpec(vllmSection())).toEqual({
      command: 'vllm',
      args: ['serve', 'Qwen/Qwen3-0.6B', ...VLLM_DEFAULT_FLAGS],
      env: VLLM_ENV,
    });
  });

  it('passes --model to python -m vllm.entrypoints.openai.api_server, which ignores a positional model', () => {
    const spec = buildLaunchSpec(vllmSection({ command: ['/venv/bin/python', '-m', 'vllm.entrypoints.openai.api_server'] }));
    expect(spec.command).toBe('/venv/bin/python');
    expect(spec.args).toEqual(['-m', 'vllm.entrypoints.openai.api_server', '--model', 'Qwen/Qwen3-0.6B', ...VLLM_DEFAULT_FLAGS]);
  });

  it('uses the configured values and the --no- form for disabled features', () => {
    const spec = buildLaunchSpec(
      vllmSection({
        model_name: 'qwen',
        host: '0.0.0.0',
        port: 8100,
        gpu_memory_utilization: 0.5,
        tensor_parallel_size: 2,
        max_num_seqs: 8,
        max_num_batched_tokens: 32768, // without chunked prefill, vLLM wants a whole context per batch
        max_model_len: 32768,
        dtype: 'bfloat16',
        enable_prefix_caching: false,
        enable_chunked_prefill: false,
      }),
    );
    expect(spec.args).toEqual([
      'serve', 'Qwen/Qwen3-0.6B',
      '--served-model-name', 'qwen',
      '--host', '0.0.0.0',
      '--port', '8100',
      '--gpu-memory-utilization', '0.5',
      '--tensor-parallel-size', '2',
      '--max-num-seqs', '8',
      '--max-num-batched-tokens', '32768',
      '--max-model-len', '32768',
      '--dtype', 'bfloat16',
      '--no-enable-prefix-caching',
      '--no-enable-chunked-prefill',
    ]);
  });

  it('appends extra_args of each kind after the managed flags', () => {
    const spec = buildLaunchSpec(
      vllmSection({
        extra_args: {
          '--kv_cache_dtype': 'fp8',
          seed: 7,
          'enforce-eager': true,
          'trust-remote-code': false,
          disable_log_stats: false,
          'cuda-graph-sizes': [1, 2, 4],
          'speculative-config': { method: 'ngram', num_speculative_tokens: 5, prompt_lookup_min: null },
          'allowed-origins': '["http://a"]',
          'hf-revision': '', // an unset ${REVISION:-}
        },
      }),
    );
    expect(spec.args.slice(2 + VLLM_DEFAULT_FLAGS.length)).toEqual([
      '--kv-cache-dtype', 'fp8',
      '--seed', '7',
      '--enforce-eager',
      '--no-trust-remote-code',
      '--cuda-graph-sizes', '1', '2', '4',
      '--speculative-config', '{"method":"ngram","num_speculative_tokens":5,"prompt_lookup_min":null}',
      '--allowed-origins', '["http://a"]',
    ]);
  });

  it.each([1, 2])('enables sleep mode and the dev routes for idle sleep level %i', (level) => {
    const spec = buildLaunchSpec(vllmSection({ sleep: { idle_seconds: 300, level } }));
    expect(spec.args.slice(2 + VLLM_DEFAULT_FLAGS.length)).toEqual(['--enable-sleep-mode']);
    expect(spec.env).toEqual({ ...VLLM_ENV, VLLM_SERVER_DEV_MODE: '1' });
  });

  it('adds no sleep flag for level 3 (process stop) or when idle sleep is off', () => {
    expect(buildLaunchSpec(vllmSection({ sleep: { idle_seconds: 300, level: 3 } })).args).toHaveLength(2 + VLLM_DEFAULT_FLAGS.length);
    expect(buildLaunchSpec(vllmSection({ sleep: { idle_seconds: 0, level: 1 } })).env).toEqual(VLLM_ENV);
  });

  it('enables LoRA with static modules and runtime adapter loading', () => {
    const spec = buildLaunchSpec(
      vllmSection({ lora: { enabled: true, max_loras: 4, max_lora_rank: 64, modules: { sql: '/lora/sql', chat: 'org/chat-lora' } } }),
    );
    expect(spec.args.slice(2 + VLLM_DEFAULT_FLAGS.length)).toEqual([
      '--enable-lora', '--max-loras', '4', '--max-lora-rank', '64',
      '--lora-modules', 'sql=/lora/sql', 'chat=org/chat-lora',
    ]);
    expect(spec.env).toEqual({ ...VLLM_ENV, VLLM_ALLOW_RUNTIME_LORA_UPDATING: 'true' });
  });

  it('passes an adapter whose path holds "=" in JSON form, which vLLM reads whole (it splits name=path at every "=")', () => {
    const spec = buildLaunchSpec(vllmSection({ lora: { enabled: true, modules: { sql: '/lora/sql', lr: '/lora/lr=1e-4' } } }));
    const at = spec.args.indexOf('--lora-modules');
    expect(spec.args.slice(at, at + 3)).toEqual(['--lora-modules', 'sql=/lora/sql', '{"name":"lr","path":"/lora/lr=1e-4"}']);
  });

  it('omits --lora-modules when no adapter is listed', () => {
    const spec = buildLaunchSpec(vllmSection({ lora: { enabled: true } }));
    expect(spec.args.slice(2 + VLLM_DEFAULT_FLAGS.length)).toEqual(['--enable-lora', '--max-loras', '1', '--max-lora-rank', '16']);
  });

  it('pins gpus with CUDA_VISIBLE_DEVICES and sizes tensor parallelism from them', () => {
    const spec = buildLaunchSpec(vllmSection({ gpus: [2, 3] }));
    expect(spec.env).toEqual({ ...VLLM_ENV, CUDA_VISIBLE_DEVICES: '2,3' });
    expect(spec.args).toContainEqual('--tensor-parallel-size');
    expect(spec.args[spec.args.indexOf('--tensor-parallel-size') + 1]).toBe('2');
  });

  it('keeps an explicit tensor_parallel_size with gpus', () => {
    const spec = buildLaunchSpec(vllmSection({ gpus: [0, 1, 2, 3], tensor_parallel_size: 2 }));
    expect(spec.args[spec.args.indexOf('--tensor-parallel-size') + 1]).toBe('2');
  });

  it('passes the API key in VLLM_API_KEY, never in argv, which every local user can read', () => {
    const spec = buildLaunchSpec(vllmSection({ extra_args: { seed: 1 } }), { apiKey: 'sk-internal' });
    expect(spec.args.slice(2 + VLLM_DEFAULT_FLAGS.length)).toEqual(['--seed', '1']);
    expect(spec.args.join(' ')).not.toContain('sk-internal');
    expect(spec.env).toEqual({ ...VLLM_ENV, VLLM_API_KEY: 'sk-internal' });
  });

  it('returns vllm.env plus its own variables, never process.env', () => {
    const spec = buildLaunchSpec(vllmSection({ env: { HF_HUB_OFFLINE: 1 }, sleep: { idle_seconds: 60 }, gpus: [0] }));
    expect(spec.env).toEqual({ HF_HUB_OFFLINE: '1', ...VLLM_ENV, VLLM_SERVER_DEV_MODE: '1', CUDA_VISIBLE_DEVICES: '0' });
  });

  it("raises vLLM's own engine start-up limit to startup_timeout (whole seconds), unless vllm.env sets it", () => {
    expect(buildLaunchSpec(vllmSection({ startup_timeout: 900 })).env.VLLM_ENGINE_READY_TIMEOUT_S).toBe('900');
    expect(buildLaunchSpec(vllmSection({ startup_timeout: 120.5 })).env.VLLM_ENGINE_READY_TIMEOUT_S).toBe('121');
    const explicit = vllmSection({ startup_timeout: 900, env: { VLLM_ENGINE_READY_TIMEOUT_S: 1200 } });
    expect(buildLaunchSpec(explicit).env.VLLM_ENGINE_READY_TIMEOUT_S).toBe('1200');
    // Exported to tide-vllm (which vLLM inherits): the operator's value stands.
    process.env.VLLM_ENGINE_READY_TIMEOUT_S = '1800';
    try {
      expect(buildLaunchSpec(vllmSection({ startup_timeout: 900 })).env.VLLM_ENGINE_READY_TIMEOUT_S).toBeUndefined();
    } finally {
      delete process.env.VLLM_ENGINE_READY_TIMEOUT_S;
    }
  });

  it('refuses to build a launch without model_path', () => {
    const manual = parseConfig({ vllm: { auto_start: false, model_name: 'served' } }).vllm;
    expect(() => buildLaunchSpec(manual)).toThrow('vllm.model_path is not set');
  });
});

describe('buildLaunchSpec for SGLang', () => {
  const sglang = (vllm: Record<string, unknown> = {}) => vllmSection({ engine: 'sglang', ...vllm });

  it('maps the settings to SGLang flags and always enables metrics', () => {
    expect(buildLaunchSpec(sglang())).toEqual({
      command: 'sglang',
      args: ['serve', ...SGLANG_DEFAULT_FLAGS, '--enable-metrics'],
      env: { SPT_NOENV: '1' },
    });
  });

  it('passes --model-path whatever the launcher', () => {
    const spec = buildLaunchSpec(sglang({ command: ['python3', '-m', 'sglang.launch_server'] }));
    expect(spec.command).toBe('python3');
    expect(spec.args).toEqual(['-m', 'sglang.launch_server', ...SGLANG_DEFAULT_FLAGS, '--enable-metrics']);
  });

  it('turns off chunked prefill and the radix cache', () => {
    const spec = buildLaunchSpec(sglang({ enable_chunked_prefill: false, enable_prefix_caching: false }));
    expect(spec.args.slice(1 + SGLANG_DEFAULT_FLAGS.length)).toEqual([
      '--chunked-prefill-size', '-1',
      '--disable-radix-cache',
      '--enable-metrics',
    ]);
  });

  it('enables the memory saver with a CPU weight backup for idle sleep level 1', () => {
    const spec = buildLaunchSpec(sglang({ sleep: { idle_seconds: 60, level: 1 } }));
    expect(spec.args.slice(1 + SGLANG_DEFAULT_FLAGS.length)).toEqual([
      '--enable-memory-saver', '--enable-weights-cpu-backup', '--enable-metrics',
    ]);
    expect(spec.env).toEqual({ SPT_NOENV: '1' });
  });

  it('adds no memory saver for level 3', () => {
    const spec = buildLaunchSpec(sglang({ sleep: { idle_seconds: 60, level: 3 } }));
    expect(spec.args.slice(1 + SGLANG_DEFAULT_FLAGS.length)).toEqual(['--enable-metrics']);
  });

  it('maps LoRA, the API key and gpus', () => {
    const spec = buildLaunchSpec(
      sglang({ lora: { enabled: true, max_loras: 2, max_lora_rank: 32, modules: { sql: '/lora/sql' } }, gpus: [1, 0] }),
      { apiKey: 'sk-x' },
    );
    expect(spec.args.slice(1 + SGLANG_DEFAULT_FLAGS.length)).toEqual([
      '--enable-lora', '--max-loras-per-batch', '2', '--max-lora-rank', '32',
      '--lora-paths', 'sql=/lora/sql',
      '--api-key', 'sk-x',
      '--enable-metrics',
    ]);
    expect(spec.args[spec.args.indexOf('--tp-size') + 1]).toBe('2');
    expect(spec.env).toEqual({ SPT_NOENV: '1', CUDA_VISIBLE_DEVICES: '1,0' });
  });

  it('passes extra_args, leaving out false booleans (SGLang has no --no- form)', () => {
    const spec = buildLaunchSpec(
      sglang({ extra_args: { trust_remote_code: true, 'enable-mixed-chunk': false, 'chunked-prefill-size': 4096, 'lora-target-modules': ['q_proj', 'v_proj'] } }),
    );
    expect(spec.args.slice(1 + SGLANG_DEFAULT_FLAGS.length)).toEqual([
      '--enable-metrics',
      '--trust-remote-code',
      '--chunked-prefill-size', '4096',
      '--lora-target-modules', 'q_proj', 'v_proj',
    ]);
  });
});

describe('redactArgs', () => {
  it('hides the value after --api-key and leaves everything else', () => {
    const args = ['serve', 'm', '--api-key', 'sk-secret', '--port', '8000'];
    expect(redactArgs(args)).toEqual(['serve', 'm', '--api-key', '***', '--port', '8000']);
    expect(args[3]).toBe('sk-secret');
  });

  it('hides --api-key=KEY, --admin-api-key and a --hf-token value', () => {
    expect(redactArgs(['--api-key=sk', '--admin-api-key', 'adm', '--hf-token', 'hf_x', '--hf-token', '--port', '1'])).toEqual([
      '--api-key=***', '--admin-api-key', '***', '--hf-token', '***', '--hf-token', '--port', '1',
    ]);
  });

  it('redacts a built SGLang launch (SGLang takes its key only as --api-key)', () => {
    const spec = buildLaunchSpec(vllmSection({ engine: 'sglang' }), { apiKey: 'sk-internal' });
    const redacted = redactArgs(spec.args);
    expect(spec.args[spec.args.indexOf('--api-key') + 1]).toBe('sk-internal');
    expect(redacted).not.toContain('sk-internal');
    expect(redacted[redacted.indexOf('--api-key') + 1]).toBe('***');
  });

  it('secretValues: the values it hides, for the lines an engine prints', () => {
    expect(secretValues(['--api-key=sk', '--admin-api-key', 'adm', '--hf-token', 'hf_x', '--hf-token', '--port', '1'])).toEqual(['sk', 'adm', 'hf_x']);
    expect(secretValues(['serve', 'm', '--port', '8000'])).toEqual([]);
  });
});
