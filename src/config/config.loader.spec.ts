import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import {
  ConfigError,
  ConfigProblem,
  loadConfig,
  parseConfig,
  resolveConfigPath,
  UsageError,
  USAGE,
} from './config.loader';
import { MAX_SECONDS } from './config.schema';

const MODEL = { vllm: { model_path: 'Qwen/Qwen3-0.6B' } };

/** Deep merge of plain objects, so a test names only the keys it is about. */
function withModel(raw: Record<string, unknown>): Record<string, unknown> {
  const vllm = { ...MODEL.vllm, ...((raw.vllm as object) ?? {}) };
  return { ...raw, vllm };
}

/** How a duration key reports a value out of its range. */
const SECONDS = '(seconds; about 24.8 days is the longest a Node.js timer can wait)';

function problemsOf(raw: unknown, env: NodeJS.ProcessEnv = {}): ConfigProblem[] {
  try {
    parseConfig(raw, env, 'test.yaml');
  } catch (error) {
    if (error instanceof ConfigError) return [...error.problems];
    throw error;
  }
  throw new Error('expected the configuration to be rejected');
}

/** `path: message` lines, as they appear in the report. */
/** The problems as reported, less the bad value each repeats (` (got …)`: tested on its own). */
function lines(raw: unknown, env: NodeJS.ProcessEnv = {}): string[] {
  return problemsOf(raw, env).map((p) => `${p.path}: ${withoutValue(p.message)}`);
}

function withoutValue(message: string): string {
  return message.replace(/ \(got .*\)$/, '');
}

describe('parseConfig defaults', () => {
  it('fills every key with its default when only model_path is given', () => {
    const config = parseConfig(MODEL);
    expect(JSON.parse(JSON.stringify(config))).toEqual({
      web: {
        bind_address: { host: '0.0.0.0', port: 10002 },
        body_limit: 1048576,
        drain_timeout: 30,
        max_concurrent_requests: 512,
        max_prompt_chars: 1000000,
        client_timeout: 30,
        cors_allowed_origins: ['*'],
      },
      vllm: {
        enabled: true,
        auto_start: true,
        engine: 'vllm',
        command: ['vllm', 'serve'],
        host: '127.0.0.1',
        port: 8000,
        model_name: 'Qwen/Qwen3-0.6B',
        model_path: 'Qwen/Qwen3-0.6B',
        max_tokens: 2048,
        temperature: 0.7,
        top_p: 0.9,
        timeout: 60,
        system_prompt: '你是一个有用的AI助手。',
        gpu_memory_utilization: 0.9,
        tensor_parallel_size: 1,
        max_num_seqs: 256,
        max_num_batched_tokens: 8192,
        max_model_len: 4096,
        dtype: 'auto',
        enable_prefix_caching: true,
        enable_chunked_prefill: true,
        extra_args: {},
        env: {},
        startup_timeout: 600,
        stop_timeout: 30,
        health_interval: 5,
        health_timeout: 3,
        health_failure_threshold: 3,
        restart: { enabled: true, max_restarts: 5, window: 600, backoff_initial: 1, backoff_max: 60 },
        state_dir: 'state',
        log_file: 'logs/vllm_8000.log',
        log_max_bytes: 10485760,
        log_backups: 3,
        sleep: { idle_seconds: 0, level: 1, wake_timeout: 120 },
        lora: { enabled: false, max_loras: 1, max_lora_rank: 16, modules: {} },
      },
      logging: { level: 'info', log_bodies: false, access_log_probes: false },
      auth: { api_keys: [], admin_api_keys: [], protect_metrics: false, keyVariables: [] },
    });
    expect(config.vllm.gpus).toBeUndefined();
  });

  it('returns a deeply frozen object', () => {
    const config = parseConfig(MODEL);
    expect(Object.isFrozen(config)).toBe(true);
    expect(Object.isFrozen(config.vllm.restart)).toBe(true);
    expect(Object.isFrozen(config.vllm.command)).toBe(true);
    expect(() => {
      (config.vllm as { port: number }).port = 1;
    }).toThrow(TypeError);
  });

  it('treats a key with an empty value as absent, so the default applies', () => {
    const config = parseConfig({ web: null, vllm: { model_path: 'm', port: null, restart: { window: null } } });
    expect(config.web.bind_address.port).toBe(10002);
    expect(config.vllm.port).toBe(8000);
    expect(config.vllm.restart.window).toBe(600);
  });

  it('defaults the command by engine', () => {
    expect(parseConfig(withModel({ vllm: { engine: 'sglang' } })).vllm.command).toEqual(['sglang', 'serve']);
    const custom = ['python', '-m', 'vllm.entrypoints.openai.api_server'];
    expect(parseConfig(withModel({ vllm: { command: custom } })).vllm.command).toEqual(custom);
  });

  it('defaults model_name to model_path and keeps an explicit one', () => {
    expect(parseConfig(MODEL).vllm.model_name).toBe('Qwen/Qwen3-0.6B');
    expect(parseConfig(withModel({ vllm: { model_name: 'qwen' } })).vllm.model_name).toBe('qwen');
  });

  it('defaults tensor_parallel_size to the number of gpus unless it is set', () => {
    expect(parseConfig(withModel({ vllm: { gpus: [2, 3] } })).vllm.tensor_parallel_size).toBe(2);
    expect(parseConfig(withModel({ vllm: { gpus: [2, 3], tensor_parallel_size: 1 } })).vllm.tensor_parallel_size).toBe(1);
    expect(parseConfig(withModel({ vllm: { tensor_parallel_size: 4 } })).vllm.tensor_parallel_size).toBe(4);
  });

  it('defaults max_concurrent_requests to twice max_num_seqs and keeps an explicit one', () => {
    expect(parseConfig(withModel({ vllm: { max_num_seqs: 10 } })).web.max_concurrent_requests).toBe(20);
    expect(parseConfig(withModel({ web: { max_concurrent_requests: 7 } })).web.max_concurrent_requests).toBe(7);
  });

  it('substitutes {port} in log_file, and keeps "" (no log file)', () => {
    expect(parseConfig(withModel({ vllm: { port: 9001, log_file: '/var/log/{port}/v_{port}.log' } })).vllm.log_file).toBe(
      '/var/log/9001/v_9001.log',
    );
    expect(parseConfig(withModel({ vllm: { log_file: '' } })).vllm.log_file).toBe('');
  });

  it('normalizes extra_args names and stringifies env values', () => {
    const config = parseConfig(
      withModel({ vllm: { extra_args: { '--enforce_eager': true, 'kv-cache-dtype': 'fp8' }, env: { A: 1, C: 'x', D: 'true' } } }),
    );
    expect(config.vllm.extra_args).toEqual({ 'enforce-eager': true, 'kv-cache-dtype': 'fp8' });
    expect(config.vllm.env).toEqual({ A: '1', C: 'x', D: 'true' });
  });

  it('refuses YAML booleans in env: vLLM reads some switches with bool(int()), others as "true"', () => {
    expect(lines(withModel({ vllm: { env: { VLLM_DISABLE_LOG_LOGO: true, VLLM_USE_MODELSCOPE: false } } }))).toEqual([
      'vllm.env.VLLM_DISABLE_LOG_LOGO: must be a string: quote it as the variable expects ("1"/"0" for most of vLLM\'s switches, or "true")',
      'vllm.env.VLLM_USE_MODELSCOPE: must be a string: quote it as the variable expects ("1"/"0" for most of vLLM\'s switches, or "false")',
    ]);
  });

  it('needs no model when vllm is disabled', () => {
    const config = parseConfig({ vllm: { enabled: false } });
    expect(config.vllm.model_name).toBe('');
  });

  it('accepts body_limit as bytes or with a kb/mb suffix', () => {
    expect(parseConfig(withModel({ web: { body_limit: '512kb' } })).web.body_limit).toBe(512 * 1024);
    expect(parseConfig(withModel({ web: { body_limit: '2MB' } })).web.body_limit).toBe(2 * 1024 * 1024);
    expect(parseConfig(withModel({ web: { body_limit: '4096' } })).web.body_limit).toBe(4096);
    expect(parseConfig(withModel({ web: { body_limit: 2048 } })).web.body_limit).toBe(2048);
  });

  it('accepts the SGLang engine with LoRA and sleep level 1', () => {
    const config = parseConfig(
      withModel({ vllm: { engine: 'sglang', lora: { enabled: true, modules: { sql: '/a' } }, sleep: { idle_seconds: 60, level: 1 } } }),
    );
    expect(config.vllm.engine).toBe('sglang');
  });

  it('refuses SGLang LoRA with no adapter at start unless its target modules are named (SGLang exits at startup otherwise)', () => {
    expect(lines(withModel({ vllm: { engine: 'sglang', lora: { enabled: true } } }))).toEqual([
      'vllm.lora.enabled: with engine sglang and no vllm.lora.modules needs vllm.extra_args.lora-target-modules (e.g. all): SGLang exits at startup without either',
    ]);
    for (const value of [false, [], '']) {
      expect(lines(withModel({ vllm: { engine: 'sglang', lora: { enabled: true }, extra_args: { 'lora-target-modules': value } } }))).toContain(
        'vllm.lora.enabled: with engine sglang and no vllm.lora.modules needs vllm.extra_args.lora-target-modules (e.g. all): SGLang exits at startup without either',
      );
    }
    for (const key of ['lora-target-modules', 'lora_target_modules']) {
      expect(() => parseConfig(withModel({ vllm: { engine: 'sglang', lora: { enabled: true }, extra_args: { [key]: 'all' } } }))).not.toThrow();
    }
  });
});

describe('parseConfig report', () => {
  it('lists every problem in one message, each with its dotted path', () => {
    const raw = { web: { bind_address: { port: 0 } }, vllm: { port: 70000, foo: 1, dtype: 'fp4' } };
    expect(() => parseConfig(raw, {}, 'conf/x.yaml')).toThrow(
      new ConfigError(
        [
          'Invalid configuration in conf/x.yaml:',
          '  - web.bind_address.port: must be an integer from 1 to 65535 (got 0)',
          '  - vllm.foo: unknown key',
          '  - vllm.port: must be an integer from 1 to 65535 (got 70000)',
          '  - vllm.dtype: must be one of auto, bfloat16, float, float16, float32, half (got "fp4")',
          '  - vllm.model_path: is required when auto_start is true',
        ].join('\n'),
      ),
    );
  });

  it('repeats the bad value, and the variable it came from, but never a secret', () => {
    const raw = withModel({ vllm: { port: '${PORT}', dtype: 'x'.repeat(100), api_key: 'a b', extra_args: '--hf-token hf_secret' }, auth: { api_keys: ['c d'] } });
    expect(problemsOf({ ...MODEL, auth: '${KEY}' }, { KEY: 'sk-secret' }).map((p) => p.message)).toEqual(['must be a mapping of keys to values']);
    expect(problemsOf(raw, { PORT: '80x' }).map((p) => `${p.path}: ${p.message}`)).toEqual([
      'vllm.port: must be an integer from 1 to 65535 (got "80x" from ${PORT})',
      'vllm.api_key: must be a key of printable ASCII characters without spaces',
      `vllm.dtype: must be one of auto, bfloat16, float, float16, float32, half (got "${'x'.repeat(78)}…)`,
      'vllm.extra_args: must be a mapping of keys to values', // (an engine's flags may hold a token)
      'auth.api_keys: must be a list of keys of printable ASCII characters without spaces (an HTTP header carries them)',
    ]);
  });

  it('names a misspelt key, also one left empty, with the key nearest in spelling', () => {
    expect(lines(withModel({ vllm: { max_num_seq: null, restart: { windw: 5 } }, foo: null, web: { bind_adress: { port: 1 } } }))).toEqual([
      'web.bind_adress: unknown key (did you mean bind_address?)',
      'vllm.restart.windw: unknown key (did you mean window?)',
      'vllm.max_num_seq: unknown key (did you mean max_num_seqs?)',
      'foo: unknown key',
    ]);
    // Known keys left empty take their defaults.
    expect(parseConfig(withModel({ vllm: { port: null, sleep: null } })).vllm.port).toBe(8000);
  });

  it('rejects a top level that is not a mapping', () => {
    expect(lines([1, 2])).toEqual(['(top level): must be a mapping with the sections web, vllm, logging and auth']);
    expect(lines('text')).toEqual(['(top level): must be a mapping with the sections web, vllm, logging and auth']);
  });

  it.each([
    [{ nope: 1 }, 'nope: unknown key'],
    [{ web: { bind_address: { ip: 'x' } } }, 'web.bind_address.ip: unknown key'],
    [{ vllm: { restart: { tries: 1 } } }, 'vllm.restart.tries: unknown key'],
    [{ web: 3 }, 'web: must be a mapping of keys to values'],
    [{ web: [{}] }, 'web: must be a mapping of keys to values'],
    [{ vllm: { sleep: 'never' } }, 'vllm.sleep: must be a mapping of keys to values'],
  ])('reports structure: %j', (raw, expected) => {
    expect(lines(withModel(raw))).toEqual([expected]);
  });

  it.each([
    ['web.bind_address.host', { web: { bind_address: { host: 'a b' } } }, 'must be a host name or IP address (no spaces, slashes, brackets, #, ?, @ or % but an IPv6 zone; an IPv6 address without brackets, like ::1)'],
    ['web.bind_address.host', { web: { bind_address: { host: 'a%eth0' } } }, 'must be a host name or IP address (no spaces, slashes, brackets, #, ?, @ or % but an IPv6 zone; an IPv6 address without brackets, like ::1)'],
    ['vllm.host', { vllm: { host: 'fe80::1%eth0' } }, 'must be a host name or IP address (no spaces, slashes, brackets, #, ?, @ or %; an IPv6 address without brackets, like ::1)'],
    ['web.bind_address.port', { web: { bind_address: { port: 65536 } } }, 'must be an integer from 1 to 65535'],
    ['web.body_limit', { web: { body_limit: 1000 } }, 'must be an integer number of bytes of at least 1024, or a size such as "512kb" or "1mb"'],
    ['web.body_limit', { web: { body_limit: '1gb' } }, 'must be an integer number of bytes of at least 1024, or a size such as "512kb" or "1mb"'],
    ['web.drain_timeout', { web: { drain_timeout: -1 } }, `must be a number from 0 to 2147483 ${SECONDS}`],
    ['web.max_concurrent_requests', { web: { max_concurrent_requests: 0 } }, 'must be an integer of at least 1'],
    ['web.max_prompt_chars', { web: { max_prompt_chars: 1.5 } }, 'must be an integer of at least 1'],
    ['web.client_timeout', { web: { client_timeout: 0 } }, `must be a number greater than 0 and at most 2147483 ${SECONDS}`],
    ['web.cors_allowed_origins', { web: { cors_allowed_origins: ['https://app.example/'] } }, 'must be a list of origins such as "https://app.example.com" (scheme://host[:port], no path) or "*"'],
    ['web.cors_allowed_origins', { web: { cors_allowed_origins: '*' } }, 'must be a list of origins such as "https://app.example.com" (scheme://host[:port], no path) or "*"'],
    ['vllm.enabled', { vllm: { enabled: 'yes' } }, 'must be true or false'],
    ['vllm.auto_start', { vllm: { auto_start: 1 } }, 'must be true or false'],
    ['vllm.engine', { vllm: { engine: 'tgi' } }, 'must be one of vllm, sglang'],
    ['vllm.command', { vllm: { command: [] } }, 'must be a non-empty list of non-empty strings'],
    ['vllm.command', { vllm: { command: ['vllm', ''] } }, 'must be a non-empty list of non-empty strings'],
    ['vllm.command', { vllm: { command: 'vllm serve' } }, 'must be a non-empty list of non-empty strings'],
    ['vllm.host', { vllm: { host: '' } }, 'must be a host name or IP address (no spaces, slashes, brackets, #, ?, @ or %; an IPv6 address without brackets, like ::1)'],
    ['vllm.host', { vllm: { host: '[::1]' } }, 'must be a host name or IP address (no spaces, slashes, brackets, #, ?, @ or %; an IPv6 address without brackets, like ::1)'],
    ['vllm.host', { vllm: { host: 'a#b' } }, 'must be a host name or IP address (no spaces, slashes, brackets, #, ?, @ or %; an IPv6 address without brackets, like ::1)'],
    ['vllm.api_key', { vllm: { api_key: 'a b' } }, 'must be a key of printable ASCII characters without spaces'],
    ['vllm.api_key', { vllm: { api_key: 'clé' } }, 'must be a key of printable ASCII characters without spaces'],
    ['vllm.api_key', { vllm: { api_key: 12345 } }, 'must be a key of printable ASCII characters without spaces'],
    ['vllm.port', { vllm: { port: 'http' } }, 'must be an integer from 1 to 65535'],
    ['vllm.model_name', { vllm: { model_name: ' ' } }, 'must be a non-empty string'],
    ['vllm.model_path', { vllm: { model_path: '' } }, 'must be a non-empty string'],
    ['vllm.max_tokens', { vllm: { max_tokens: 0 } }, 'must be an integer of at least 1'],
    ['vllm.temperature', { vllm: { temperature: 2.5 } }, 'must be a number from 0 to 2'],
    ['vllm.top_p', { vllm: { top_p: 0 } }, 'must be a number greater than 0 and at most 1'],
    ['vllm.timeout', { vllm: { timeout: 0 } }, `must be a number greater than 0 and at most 2147483 ${SECONDS}`],
    ['vllm.system_prompt', { vllm: { system_prompt: 5 } }, 'must be a string'],
    ['vllm.gpu_memory_utilization', { vllm: { gpu_memory_utilization: 1.1 } }, 'must be a number greater than 0 and at most 1'],
    ['vllm.tensor_parallel_size', { vllm: { tensor_parallel_size: 0 } }, 'must be an integer of at least 1'],
    ['vllm.max_num_seqs', { vllm: { max_num_seqs: 0 } }, 'must be an integer of at least 1'],
    ['vllm.max_num_batched_tokens', { vllm: { max_num_batched_tokens: -5 } }, 'must be an integer of at least 1'],
    ['vllm.max_model_len', { vllm: { max_model_len: 'auto', max_tokens: 1 } }, 'must be an integer of at least 1'],
    ['vllm.enable_prefix_caching', { vllm: { enable_prefix_caching: 'no' } }, 'must be true or false'],
    ['vllm.enable_chunked_prefill', { vllm: { enable_chunked_prefill: 'off' } }, 'must be true or false'],
    ['vllm.extra_args', { vllm: { extra_args: 5 } }, 'must be a mapping of keys to values'],
    ['vllm.env', { vllm: { env: ['A=1'] } }, 'must be a mapping of keys to values'],
    ['vllm.startup_timeout', { vllm: { startup_timeout: 0 } }, `must be a number greater than 0 and at most 2147483 ${SECONDS}`],
    ['vllm.stop_timeout', { vllm: { stop_timeout: -0.5 } }, `must be a number from 0 to 2147483 ${SECONDS}`],
    ['vllm.health_interval', { vllm: { health_interval: 0 } }, `must be a number greater than 0 and at most 2147483 ${SECONDS}`],
    ['vllm.health_timeout', { vllm: { health_timeout: -1 } }, `must be a number greater than 0 and at most 2147483 ${SECONDS}`],
    ['vllm.health_failure_threshold', { vllm: { health_failure_threshold: 0 } }, 'must be an integer of at least 1'],
    ['vllm.restart.enabled', { vllm: { restart: { enabled: 'on' } } }, 'must be true or false'],
    ['vllm.restart.max_restarts', { vllm: { restart: { max_restarts: -1 } } }, 'must be an integer of at least 0'],
    ['vllm.restart.window', { vllm: { restart: { window: 0 } } }, `must be a number greater than 0 and at most 2147483 ${SECONDS}`],
    ['vllm.restart.backoff_initial', { vllm: { restart: { backoff_initial: 0 } } }, `must be a number greater than 0 and at most 2147483 ${SECONDS}`],
    ['vllm.restart.backoff_max', { vllm: { restart: { backoff_max: 0 } } }, `must be a number greater than 0 and at most 2147483 ${SECONDS}`],
    ['vllm.state_dir', { vllm: { state_dir: '' } }, 'must be a non-empty string'],
    ['vllm.log_file', { vllm: { log_file: false } }, 'must be a string'],
    ['vllm.log_max_bytes', { vllm: { log_max_bytes: -1 } }, 'must be an integer of at least 0'],
    ['vllm.log_backups', { vllm: { log_backups: 1.5 } }, 'must be an integer from 0 to 1000'],
    // A rotation renames every backup: 10^12 of them froze the service at the first rotation.
    ['vllm.log_backups', { vllm: { log_backups: 1001 } }, 'must be an integer from 0 to 1000'],
    // An integer to JavaScript, but "1e+21" on vLLM's command line.
    ['vllm.max_num_seqs', { vllm: { max_num_seqs: 1e21 } }, 'must be an integer of at least 1'],
    ['vllm.sleep.idle_seconds', { vllm: { sleep: { idle_seconds: -1 } } }, `must be a number from 0 to 2147483 ${SECONDS}`],
    ['vllm.sleep.level', { vllm: { sleep: { level: 0 } } }, 'must be one of 1, 2, 3'],
    ['vllm.sleep.wake_timeout', { vllm: { sleep: { wake_timeout: 0 } } }, `must be a number greater than 0 and at most 2147483 ${SECONDS}`],
    ['vllm.lora.enabled', { vllm: { lora: { enabled: 'true!' } } }, 'must be true or false'],
    ['vllm.lora.max_loras', { vllm: { lora: { max_loras: 0 } } }, 'must be an integer of at least 1'],
    ['vllm.lora.max_lora_rank', { vllm: { lora: { max_lora_rank: 4 } } }, 'must be one of 1, 8, 16, 32, 64, 128, 256, 320, 512'],
    ['vllm.lora.modules', { vllm: { lora: { modules: 'a=b' } } }, 'must be a mapping of keys to values'],
    ['vllm.gpus', { vllm: { gpus: [0, 0] } }, 'must be a non-empty list of distinct non-negative integers (GPU indices)'],
    ['vllm.gpus', { vllm: { gpus: [-1] } }, 'must be a non-empty list of distinct non-negative integers (GPU indices)'],
    ['vllm.gpus', { vllm: { gpus: [] } }, 'must be a non-empty list of distinct non-negative integers (GPU indices)'],
    ['logging.level', { logging: { level: 'verbose' } }, 'must be one of trace, debug, info, warn, error, fatal, silent'],
    ['logging.log_bodies', { logging: { log_bodies: 0 } }, 'must be true or false'],
    ['logging.access_log_probes', { logging: { access_log_probes: 'x' } }, 'must be true or false'],
    ['auth.api_keys', { auth: { api_keys: ['a b'] } }, 'must be a list of keys of printable ASCII characters without spaces (an HTTP header carries them)'],
    ['auth.api_keys', { auth: { api_keys: 'secret' } }, 'must be a list of keys of printable ASCII characters without spaces (an HTTP header carries them)'],
    ['auth.api_keys', { auth: { api_keys: ['ключ'] } }, 'must be a list of keys of printable ASCII characters without spaces (an HTTP header carries them)'],
    ['auth.admin_api_keys', { auth: { admin_api_keys: [1] } }, 'must be a list of keys of printable ASCII characters without spaces (an HTTP header carries them)'],
    ['auth.api_keys', { auth: { api_keys: [null] } }, 'must be a list of keys of printable ASCII characters without spaces (an HTTP header carries them)'],
    ['auth.protect_metrics', { auth: { protect_metrics: 'maybe' } }, 'must be true or false'],
  ])('%s: %j', (path, raw, message) => {
    expect(lines(withModel(raw))).toEqual([`${path}: ${message}`]);
  });
});

describe('reserved keys', () => {
  const RESERVED = 'cannot be used as a key: it is reserved (a built-in name of JavaScript objects, like constructor, __proto__ and toString)';

  it('refuses object built-in names in free-form maps and sections, and still checks the rest', () => {
    // JSON.parse keeps "__proto__" as an own key, as js-yaml does; an object literal would not.
    const raw: unknown = JSON.parse(`{
      "vllm": {
        "model_path": "m",
        "extra_args": { "__proto__": { "port": 1 }, "toString": "x", "port": 2 },
        "env": { "valueOf": "1", "OK": "1" },
        "lora": { "enabled": true, "modules": { "hasOwnProperty": "/a" } },
        "restart": { "constructor": 1 }
      },
      "constructor": {}
    }`);
    expect(lines(raw)).toEqual([
      'vllm.extra_args.port: --port is set from vllm.port; use that key instead',
      `vllm.extra_args.__proto__: ${RESERVED}`,
      `vllm.extra_args.toString: ${RESERVED}`,
      `vllm.env.valueOf: ${RESERVED}`,
      `vllm.lora.modules.hasOwnProperty: ${RESERVED}`,
      'vllm.restart.constructor: unknown key',
      'constructor: unknown key',
    ]);
  });

  it('keeps "prototype", which is an ordinary key', () => {
    const config = parseConfig(withModel({ vllm: { extra_args: { prototype: 'x' }, env: { prototype: 'y' } } }));
    expect(config.vllm.extra_args).toEqual({ prototype: 'x' });
    expect(config.vllm.env).toEqual({ prototype: 'y' });
  });
});

it('takes a link-local IPv6 address with its zone to listen on, as Node does', () => {
  expect(parseConfig({ ...MODEL, web: { bind_address: { host: 'fe80::fc:ff:fe00:1%eth0' } } }).web.bind_address.host).toBe('fe80::fc:ff:fe00:1%eth0');
});

describe('durations', () => {
  /** Every key in seconds. Most end up in a Node timer; restart.window and sleep.idle_seconds share the cap, for one rule. */
  const durations = {
    web: { drain_timeout: 0, client_timeout: 0 },
    vllm: {
      timeout: 0,
      startup_timeout: 0,
      stop_timeout: 0,
      health_interval: 0,
      health_timeout: 0,
      restart: { window: 0, backoff_initial: 0, backoff_max: 0 },
      sleep: { idle_seconds: 0, wake_timeout: 0 },
    },
  };
  /** `durations` with every key set to `seconds`. */
  const allSetTo = (seconds: number) => JSON.parse(JSON.stringify(durations), (_key, value) => (value === 0 ? seconds : value));

  it('caps every duration at the longest delay a Node timer can hold', () => {
    const longestTimerMs = 2 ** 31 - 1; // a longer setTimeout delay fires after 1 ms
    expect(MAX_SECONDS * 1000).toBeLessThanOrEqual(longestTimerMs);
    expect((MAX_SECONDS + 1) * 1000).toBeGreaterThan(longestTimerMs);
  });

  it('accepts every duration at the cap', () => {
    const config = parseConfig(withModel(allSetTo(MAX_SECONDS)));
    expect(JSON.parse(JSON.stringify(config))).toMatchObject(allSetTo(MAX_SECONDS));
  });

  it('refuses every duration above the cap, naming each key and the bound', () => {
    const above = `must be a number greater than 0 and at most 2147483 ${SECONDS}`;
    const from0 = `must be a number from 0 to 2147483 ${SECONDS}`;
    expect(lines(withModel(allSetTo(MAX_SECONDS + 1)))).toEqual([
      `web.drain_timeout: ${from0}`,
      `web.client_timeout: ${above}`,
      `vllm.timeout: ${above}`,
      `vllm.startup_timeout: ${above}`,
      `vllm.stop_timeout: ${from0}`,
      `vllm.health_interval: ${above}`,
      `vllm.health_timeout: ${above}`,
      `vllm.restart.window: ${above}`,
      `vllm.restart.backoff_initial: ${above}`,
      `vllm.restart.backoff_max: ${above}`,
      `vllm.sleep.idle_seconds: ${from0}`,
      `vllm.sleep.wake_timeout: ${above}`,
    ]);
  });

  it('refuses "30 days" for vllm.timeout, which would time every request out after 1 ms', () => {
    expect(lines(withModel({ vllm: { timeout: 2592000, sleep: { wake_timeout: '${WAKE}' } } }), { WAKE: '2592000' })).toEqual([
      `vllm.timeout: must be a number greater than 0 and at most 2147483 ${SECONDS}`,
      `vllm.sleep.wake_timeout: must be a number greater than 0 and at most 2147483 ${SECONDS}`,
    ]);
  });
});

describe('cross-field rules', () => {
  it('requires model_path when auto_start is true', () => {
    expect(lines({})).toEqual(['vllm.model_path: is required when auto_start is true']);
  });

  it('requires model_name or model_path in manual mode', () => {
    expect(lines({ vllm: { auto_start: false } })).toEqual([
      'vllm.model_name: is required when auto_start is false and vllm.model_path is not set (it is the served model name)',
    ]);
    expect(parseConfig({ vllm: { auto_start: false, model_name: 'served' } }).vllm.model_name).toBe('served');
    expect(parseConfig({ vllm: { auto_start: false, model_path: 'org/m' } }).vllm.model_name).toBe('org/m');
  });

  it('keeps max_tokens within max_model_len', () => {
    expect(lines(withModel({ vllm: { max_tokens: 5000 } }))).toEqual([
      'vllm.max_tokens: must not exceed vllm.max_model_len (4096)',
    ]);
    expect(() => parseConfig(withModel({ vllm: { max_tokens: 4096 } }))).not.toThrow();
    // Left out, it is 2048, or half the context when that is smaller: a short context needs no max_tokens,
    // and the default leaves room for a prompt.
    expect(parseConfig(withModel({ vllm: { max_model_len: 1024 } })).vllm.max_tokens).toBe(512);
    expect(parseConfig(withModel({ vllm: { max_model_len: 1 } })).vllm.max_tokens).toBe(1);
    expect(parseConfig(withModel({ vllm: { max_model_len: 8192 } })).vllm.max_tokens).toBe(2048);
  });

  it("refuses the batch budgets vLLM's scheduler refuses to start with, and leaves SGLang alone", () => {
    expect(lines(withModel({ vllm: { max_num_batched_tokens: 128 } }))).toEqual([
      'vllm.max_num_batched_tokens: is 128, smaller than vllm.max_num_seqs (256); vLLM refuses to start (each sequence of a batch takes at least one of its tokens)',
    ]);
    expect(lines(withModel({ vllm: { max_model_len: 32768, enable_chunked_prefill: false } }))).toEqual([
      'vllm.max_num_batched_tokens: is 8192, smaller than vllm.max_model_len (32768) with vllm.enable_chunked_prefill: false; ' +
        'vLLM refuses to start (a whole prompt must fit in one batch): raise it, lower vllm.max_model_len, or turn chunked prefill on',
    ]);
    expect(lines(withModel({ vllm: { max_num_batched_tokens: 128, enable_chunked_prefill: false } })).map((l) => l.split(';')[0])).toEqual([
      'vllm.max_num_batched_tokens: is 128, smaller than vllm.max_num_seqs (256)',
      'vllm.max_num_batched_tokens: is 128, smaller than vllm.max_model_len (4096) with vllm.enable_chunked_prefill: false',
    ]); // both at once, not one per round
    expect(() => parseConfig(withModel({ vllm: { max_model_len: 32768 } }))).not.toThrow(); // chunked prefill (the default) splits prompts
    expect(() => parseConfig(withModel({ vllm: { max_model_len: 32768, enable_chunked_prefill: false, max_num_batched_tokens: 32768 } }))).not.toThrow();
    expect(() => parseConfig(withModel({ vllm: { max_num_seqs: 16, max_num_batched_tokens: 16 } }))).not.toThrow();
    expect(() => parseConfig(withModel({ vllm: { engine: 'sglang', max_num_batched_tokens: 128 } }))).not.toThrow();
  });

  it('keeps backoff_max at least backoff_initial', () => {
    expect(lines(withModel({ vllm: { restart: { backoff_initial: 10, backoff_max: 5 } } }))).toEqual([
      'vllm.restart.backoff_max: must be at least vllm.restart.backoff_initial (10)',
    ]);
  });

  it('keeps tensor_parallel_size within the listed gpus', () => {
    expect(lines(withModel({ vllm: { gpus: [0, 1], tensor_parallel_size: 4 } }))).toEqual([
      'vllm.tensor_parallel_size: is 4 but vllm.gpus lists only 2 GPU(s)',
    ]);
  });

  it('refuses the gateway port for a local engine', () => {
    expect(lines(withModel({ vllm: { port: 10002 } }))).toEqual([
      'vllm.port: must differ from web.bind_address.port (10002): both listen on this machine',
    ]);
    // A vLLM run by hand elsewhere may use the same port number; on this machine it would be tide-vllm itself.
    expect(() => parseConfig({ vllm: { auto_start: false, model_name: 'm', host: 'vllm.internal', port: 10002 } })).not.toThrow();
    for (const host of ['127.0.0.1', 'localhost', '::1', '0:0:0:0:0:0:0:1', '::ffff:127.0.0.1', '0.0.0.0']) {
      expect(lines({ vllm: { auto_start: false, model_name: 'm', host, port: 10002 } })).toEqual([
        'vllm.port: is web.bind_address.port (10002) on this machine: tide-vllm would relay every request to itself',
      ]);
    }
    expect(lines({ web: { bind_address: { host: '10.0.0.5', port: 9000 } }, vllm: { auto_start: false, model_name: 'm', host: '10.0.0.5', port: 9000 } })).toEqual([
      'vllm.port: is web.bind_address.port (9000) on this machine: tide-vllm would relay every request to itself',
    ]);
  });

  it('refuses in manual mode the keys that only start an engine, instead of ignoring them', () => {
    const manual = { auto_start: false, model_name: 'm' };
    const why = 'needs vllm.auto_start: true: it is how tide-vllm starts the engine (give it to the vLLM you run yourself instead)';
    expect(lines({ vllm: { ...manual, gpus: [0], command: ['vllm', 'serve'], extra_args: { seed: 1 } } })).toEqual([
      `vllm.gpus: ${why}`,
      `vllm.extra_args: ${why}`,
    ]);
    // env stays: VLLM_HTTP_TIMEOUT_KEEP_ALIVE there tells tide-vllm the hand-run vLLM's keep-alive.
    // And extra_args that put nothing on a command line (an unset ${SEED:-}) are no engine flags.
    expect(() => parseConfig({ vllm: { ...manual, extra_args: { seed: '' }, env: { VLLM_HTTP_TIMEOUT_KEEP_ALIVE: '10' } } })).not.toThrow();
    // A SGLang run by hand has the LoRA flags its operator gave it.
    expect(() => parseConfig({ vllm: { ...manual, engine: 'sglang', lora: { enabled: true } } })).not.toThrow();
  });

  it('refuses sleep level 2 with SGLang, idle sleep or not (it is also /admin/sleep\'s default level)', () => {
    for (const idle_seconds of [30, 0]) {
      expect(lines(withModel({ vllm: { engine: 'sglang', sleep: { idle_seconds, level: 2 } } }))).toEqual([
        'vllm.sleep.level: SGLang cannot discard the weights and restore them on wake-up; use level 1 (weights kept in CPU memory) or 3 (stop the engine)',
      ]);
    }
    expect(() => parseConfig(withModel({ vllm: { engine: 'sglang', sleep: { idle_seconds: 30, level: 3 } } }))).not.toThrow();
    expect(() => parseConfig(withModel({ vllm: { sleep: { idle_seconds: 30, level: 2 } } }))).not.toThrow();
  });

  it("needs a health_timeout SGLang's slow /health fits in", () => {
    expect(lines(withModel({ vllm: { engine: 'sglang', health_timeout: 1 } }))).toEqual([
      "vllm.health_timeout: must be at least 2 with engine sglang: SGLang's /health runs a one-token generation and takes over 1 s",
    ]);
    expect(() => parseConfig(withModel({ vllm: { health_timeout: 1 } }))).not.toThrow();
  });

  it("gives SGLang's probe, when none is set, the 20 s SGLang itself gives its /health generation (vLLM's 3 s)", () => {
    expect(parseConfig(withModel({ vllm: { engine: 'sglang' } })).vllm.health_timeout).toBe(20);
    expect(parseConfig(withModel({})).vllm.health_timeout).toBe(3);
    expect(parseConfig(withModel({ vllm: { engine: 'sglang', health_timeout: 5 } })).vllm.health_timeout).toBe(5);
  });

  it('refuses an idle sleep for a vLLM it does not start (manual mode), where it would be ignored', () => {
    expect(lines({ vllm: { auto_start: false, model_name: 'm', sleep: { idle_seconds: 60 } } })).toEqual([
      'vllm.sleep.idle_seconds: needs vllm.auto_start: true: tide-vllm puts to sleep only a vLLM it started (it would be ignored)',
    ]);
    expect(() => parseConfig({ vllm: { auto_start: false, model_name: 'm', sleep: { idle_seconds: 0 } } })).not.toThrow();
  });

  it('refuses vllm.lora.modules for a vLLM it does not start (manual mode), where nothing would load them', () => {
    expect(lines({ vllm: { auto_start: false, model_name: 'm', lora: { enabled: true, modules: { sql: '/a' } } } })).toEqual([
      'vllm.lora.modules: needs vllm.auto_start: true: they are loaded when tide-vllm starts vLLM (start the vLLM you run with --lora-modules instead)',
    ]);
    expect(() => parseConfig({ vllm: { auto_start: false, model_name: 'm', lora: { enabled: true } } })).not.toThrow();
  });

  it('checks LoRA modules', () => {
    expect(lines(withModel({ vllm: { lora: { modules: { sql: '/a' } } } }))).toEqual([
      'vllm.lora.modules: needs vllm.lora.enabled: true',
    ]);
    expect(lines(withModel({ vllm: { lora: { enabled: true, modules: { 'a=b': '/a', ok: '', c: 'x,y', d: null, 'org/sql': '/a', 'sql-v2.1_x': '/a' } } } }))).toEqual([
      'vllm.lora.modules.a=b: is not a valid adapter name: 1 to 128 letters, digits, ".", "_" or "-", the first a letter or digit',
      'vllm.lora.modules.ok: must be a non-empty adapter path without ","',
      'vllm.lora.modules.c: must be a non-empty adapter path without ","',
      'vllm.lora.modules.d: must be a non-empty adapter path without ","',
      'vllm.lora.modules.org/sql: is not a valid adapter name: 1 to 128 letters, digits, ".", "_" or "-", the first a letter or digit',
    ]);
    // An adapter named like the served model (vllm.model_name, else vllm.model_path).
    expect(lines({ vllm: { model_path: 'base', lora: { enabled: true, modules: { base: '/a' } } } })).toEqual([
      "vllm.lora.modules.base: is the served model's name (vllm.model_name): a request naming it is for the base model",
    ]);
  });

  it('refuses a VLLM_SERVER_DEV_MODE that vLLM cannot read with int()', () => {
    expect(lines(withModel({ vllm: { env: { VLLM_SERVER_DEV_MODE: 'true' } } }))).toEqual([
      'vllm.env.VLLM_SERVER_DEV_MODE: must be "1" or "0": vLLM reads it with int()',
    ]);
    for (const value of ['1', '0', 1]) expect(() => parseConfig(withModel({ vllm: { env: { VLLM_SERVER_DEV_MODE: value } } }))).not.toThrow();
  });

  it('checks env names and values', () => {
    expect(lines(withModel({ vllm: { env: { '1BAD': 'x', 'A-B': 'x', OBJ: { a: 1 }, EMPTY: null } } }))).toEqual([
      'vllm.env.1BAD: is not a valid environment variable name (letters, digits and "_", not starting with a digit)',
      'vllm.env.A-B: is not a valid environment variable name (letters, digits and "_", not starting with a digit)',
      'vllm.env.OBJ: must be a string',
      'vllm.env.EMPTY: must be a string',
    ]);
    expect(lines(withModel({ vllm: { gpus: [0], env: { CUDA_VISIBLE_DEVICES: '1' } } }))).toEqual([
      'vllm.env.CUDA_VISIBLE_DEVICES: conflicts with vllm.gpus; set only one of them',
    ]);
  });

  it('takes VLLM_HTTP_TIMEOUT_KEEP_ALIVE in env as whole seconds ≥ 1 (vLLM reads it with int())', () => {
    expect(parseConfig(withModel({ vllm: { env: { VLLM_HTTP_TIMEOUT_KEEP_ALIVE: 2 } } })).vllm.env.VLLM_HTTP_TIMEOUT_KEEP_ALIVE).toBe('2');
    for (const bad of [0, 2.5, '-1', 'soon', '']) {
      expect(lines(withModel({ vllm: { env: { VLLM_HTTP_TIMEOUT_KEEP_ALIVE: bad } } }))).toEqual([
        'vllm.env.VLLM_HTTP_TIMEOUT_KEEP_ALIVE: must be a whole number of seconds, at least 1',
      ]);
    }
  });

  it('refuses VLLM_API_KEY in env for vLLM, as it refuses --api-key: vLLM would demand a key tide-vllm never sends', () => {
    expect(lines(withModel({ vllm: { env: { VLLM_API_KEY: 'leftover' } } }))).toEqual([
      'vllm.env.VLLM_API_KEY: VLLM_API_KEY is managed by tide-vllm (vLLM reads it as --api-key; tide-vllm passes its own key to the engine; client keys go in auth.api_keys)',
    ]);
    expect(parseConfig(withModel({ vllm: { engine: 'sglang', env: { VLLM_API_KEY: 'x' } } })).vllm.env).toEqual({ VLLM_API_KEY: 'x' });
  });

  it("takes vllm.api_key for a vLLM run by hand, from the environment, and never repeats it in a report", () => {
    const manual = { auto_start: false, model_name: 'm' };
    expect(parseConfig({ vllm: { ...manual, api_key: '${VLLM_KEY}' } }, { VLLM_KEY: 'sk-engine' }).vllm.api_key).toBe('sk-engine');
    // `${VAR:-}` that yields "" means no key, as in auth.api_keys.
    expect(parseConfig({ vllm: { ...manual, api_key: '${VLLM_KEY:-}' } }).vllm.api_key).toBeUndefined();
    expect(parseConfig(withModel({ vllm: { api_key: '${VLLM_KEY:-}' } })).vllm.api_key).toBeUndefined();
    expect(parseConfig({ vllm: { enabled: false, api_key: 'k' } }).vllm.api_key).toBe('k');
    expect(() => parseConfig({ vllm: { ...manual, api_key: 'top secret' } })).toThrow(
      expect.objectContaining({ message: expect.not.stringContaining('secret') }),
    );
  });

  it('refuses vllm.api_key with auto_start: the engine tide-vllm starts gets a key of its own', () => {
    expect(lines(withModel({ vllm: { api_key: 'sk-engine' } }))).toEqual([
      'vllm.api_key: is only for a vLLM you run yourself (vllm.auto_start: false); the engine tide-vllm starts gets a fresh random key of its own when auth is on',
    ]);
  });

  it('skips a cross-field rule whose keys are already invalid', () => {
    expect(lines(withModel({ vllm: { max_tokens: 'many', max_model_len: 10 } }))).toEqual([
      'vllm.max_tokens: must be an integer of at least 1',
    ]);
  });
});

describe('extra_args', () => {
  /** Problem lines, or [] when the configuration is accepted. */
  const linesOrNone = (raw: unknown): string[] => {
    try {
      parseConfig(raw);
      return [];
    } catch (error) {
      if (!(error instanceof ConfigError)) throw error;
      return error.problems.map((p) => `${p.path}: ${withoutValue(p.message)}`);
    }
  };
  const extra = (extra_args: unknown, engine = 'vllm') => linesOrNone(withModel({ vllm: { engine, extra_args } }));

  it('accepts strings, numbers, booleans, lists of strings/numbers and mappings', () => {
    const args = { 'kv-cache-dtype': 'fp8', seed: 1, 'enforce-eager': true, 'trust-remote-code': false, 'cuda-graph-sizes': ['1', 2], 'hf-overrides': { a: [1] } };
    expect(parseConfig(withModel({ vllm: { extra_args: args } })).vllm.extra_args).toEqual(args);
  });

  it('takes "true" and "false" (what ${VAR:-true} gives) for switches, as the typed keys do', () => {
    const raw = { vllm: { extra_args: { 'enforce-eager': '${EAGER:-true}', 'trust-remote-code': 'false', 'kv-cache-dtype': 'fp8' } } };
    expect(parseConfig(withModel(raw), {}).vllm.extra_args).toEqual({ 'enforce-eager': true, 'trust-remote-code': false, 'kv-cache-dtype': 'fp8' });
  });

  it.each([
    ['port', 'vllm.extra_args.port: --port is set from vllm.port; use that key instead'],
    ['--host', 'vllm.extra_args.--host: --host is set from vllm.host; use that key instead'],
    ['served_model_name', 'vllm.extra_args.served_model_name: --served-model-name is set from vllm.model_name; use that key instead'],
    ['model', 'vllm.extra_args.model: --model is set from vllm.model_path; use that key instead'],
    ['tensor-parallel-size', 'vllm.extra_args.tensor-parallel-size: --tensor-parallel-size is set from vllm.tensor_parallel_size; use that key instead'],
    ['no-enable-prefix-caching', 'vllm.extra_args.no-enable-prefix-caching: --no-enable-prefix-caching is set from vllm.enable_prefix_caching; use that key instead'],
    ['enable-sleep-mode', 'vllm.extra_args.enable-sleep-mode: --enable-sleep-mode is set from vllm.sleep; use that key instead'],
    ['lora-modules', 'vllm.extra_args.lora-modules: --lora-modules is set from vllm.lora.modules; use that key instead'],
    ['api-key', 'vllm.extra_args.api-key: --api-key is managed by tide-vllm (tide-vllm passes its own key to the engine; client keys go in auth.api_keys)'],
    ['disable-log-requests', 'vllm.extra_args.disable-log-requests: --disable-log-requests was removed from vLLM; request logging is off by default (enable-log-requests turns it on)'],
    ['uds', 'vllm.extra_args.uds: --uds is managed by tide-vllm (the engine must listen on vllm.host:vllm.port, where tide-vllm reaches it, not on a Unix socket)'],
    ['config', 'vllm.extra_args.config: --config is managed by tide-vllm (tide-vllm sets the engine flags; put them in vllm.extra_args, not in an engine config file)'],
    ['help', 'vllm.extra_args.help: --help is managed by tide-vllm (the engine would print its help and exit instead of serving)'],
    ['served-model', 'vllm.extra_args.served-model: --served-model abbreviates --served-model-name, which is set from vllm.model_name; use that key instead'],
    ['--max_model', 'vllm.extra_args.--max_model: --max-model abbreviates --max-model-len, which is set from vllm.max_model_len; use that key instead'],
    ['no-enable-prefix', 'vllm.extra_args.no-enable-prefix: --no-enable-prefix abbreviates --no-enable-prefix-caching, which is set from vllm.enable_prefix_caching; use that key instead'],
    ['lora-mod', 'vllm.extra_args.lora-mod: --lora-mod abbreviates --lora-modules, which is set from vllm.lora.modules; use that key instead'],
    ['api', 'vllm.extra_args.api: --api abbreviates --api-key, which is managed by tide-vllm (tide-vllm passes its own key to the engine; client keys go in auth.api_keys)'],
    ['ud', 'vllm.extra_args.ud: --ud abbreviates --uds, which is managed by tide-vllm (the engine must listen on vllm.host:vllm.port, where tide-vllm reaches it, not on a Unix socket)'],
    // vLLM's single-dash aliases would go as `--pp`, which its parser does not know.
    ['pp', "vllm.extra_args.pp: -pp is vLLM's short form of --pipeline-parallel-size; write the key as pipeline-parallel-size"],
    ['asc', "vllm.extra_args.asc: -asc is vLLM's short form of --api-server-count; write the key as api-server-count"],
    ['tp', "vllm.extra_args.tp: -tp is vLLM's short form of --tensor-parallel-size; set vllm.tensor_parallel_size"],
    ['ssl-keyfile', 'vllm.extra_args.ssl-keyfile: --ssl-keyfile is managed by tide-vllm (tide-vllm speaks plain HTTP to the engine, which listens on loopback by default)'],
    ['headless', 'vllm.extra_args.headless: --headless is managed by tide-vllm (it runs no API server, and tide-vllm fronts the API server)'],
    ['data_parallel_multi_port_external_lb', "vllm.extra_args.data_parallel_multi_port_external_lb: --data-parallel-multi-port-external-lb is managed by tide-vllm (it makes vLLM run a data-parallel supervisor that puts its engines in process groups of their own, which tide-vllm's stop and restart would leave running on the GPUs)"],
  ])('vLLM refuses %s', (key, expected) => {
    expect(extra({ [key]: true })).toEqual([expected]);
  });

  it.each([
    ['mem-fraction-static', 'vllm.extra_args.mem-fraction-static: --mem-fraction-static is set from vllm.gpu_memory_utilization; use that key instead'],
    ['tp_size', 'vllm.extra_args.tp_size: --tp-size is set from vllm.tensor_parallel_size; use that key instead'],
    ['context-length', 'vllm.extra_args.context-length: --context-length is set from vllm.max_model_len; use that key instead'],
    ['disable-radix-cache', 'vllm.extra_args.disable-radix-cache: --disable-radix-cache is set from vllm.enable_prefix_caching; use that key instead'],
    ['model-path', 'vllm.extra_args.model-path: --model-path is set from vllm.model_path; use that key instead'],
    ['enable-metrics', 'vllm.extra_args.enable-metrics: --enable-metrics is managed by tide-vllm (tide-vllm always passes it so that /metrics exists)'],
    ['admin-api-key', "vllm.extra_args.admin-api-key: --admin-api-key is managed by tide-vllm (tide-vllm calls the engine's sleep and LoRA routes without it; admin keys for tide-vllm go in auth.admin_api_keys)"],
    ['config', 'vllm.extra_args.config: --config is managed by tide-vllm (tide-vllm sets the engine flags; put them in vllm.extra_args, not in an engine config file)'],
    ['help', 'vllm.extra_args.help: --help is managed by tide-vllm (the engine would print its help and exit instead of serving)'],
    ['model-p', 'vllm.extra_args.model-p: --model-p abbreviates --model-path, which is set from vllm.model_path; use that key instead'],
    ['enable-metric', 'vllm.extra_args.enable-metric: --enable-metric abbreviates --enable-metrics, which is managed by tide-vllm (tide-vllm always passes it so that /metrics exists)'],
    ['ssl-certfile', 'vllm.extra_args.ssl-certfile: --ssl-certfile is managed by tide-vllm (tide-vllm speaks plain HTTP to the engine, which listens on loopback by default)'],
  ])('SGLang refuses %s', (key, expected) => {
    expect(extra({ [key]: true }, 'sglang')).toEqual([expected]);
  });

  it('accepts flags that only begin with the name of a managed flag', () => {
    expect(extra({ 'config-format': 'hf', 'enable-lora-bias': true, 'port-x': 1 })).toEqual([]);
    expect(extra({ 'enable-metrics-for-all-schedulers': true, 'max-loaded-loras': 2 }, 'sglang')).toEqual([]);
  });

  it('lets SGLang set --chunked-prefill-size unless chunked prefill is off', () => {
    expect(extra({ 'chunked-prefill-size': 4096 }, 'sglang')).toEqual([]);
    expect(linesOrNone(withModel({ vllm: { engine: 'sglang', enable_chunked_prefill: false, extra_args: { 'chunked-prefill-size': 4096 } } }))).toEqual([
      'vllm.extra_args.chunked-prefill-size: conflicts with vllm.enable_chunked_prefill: false, which passes --chunked-prefill-size -1',
    ]);
    expect(linesOrNone(withModel({ vllm: { engine: 'sglang', enable_chunked_prefill: false, extra_args: { 'chunked-prefill': 4096 } } }))).toEqual([
      'vllm.extra_args.chunked-prefill: conflicts with vllm.enable_chunked_prefill: false, which passes --chunked-prefill-size -1',
    ]);
  });

  it('checks names, duplicates and values', () => {
    expect(
      extra({ '-tp': 2, 'bad name': 1, 'max_num-x': 1, '--max-num-x': 2, 'x-a': [], 'x-b': [true], 'x-c': [1, ''], 'x-d': null }),
    ).toEqual([
      'vllm.extra_args.-tp: is not a valid flag name (lower-case letters, digits, "-" and "_", optionally after "--")',
      'vllm.extra_args.bad name: is not a valid flag name (lower-case letters, digits, "-" and "_", optionally after "--")',
      'vllm.extra_args.--max-num-x: is the same flag as vllm.extra_args.max_num-x',
      'vllm.extra_args.x-a: must not be an empty list',
      'vllm.extra_args.x-b: list items must be strings or numbers',
      'vllm.extra_args.x-c: list items must not be empty',
      'vllm.extra_args.x-d: must be a string, a number, true/false, a list of strings and numbers, or a mapping (passed as JSON)',
    ]);
  });

  it('refuses values the engine would read as flags of their own, and integers it would get as 1e+21', () => {
    expect(extra({ seed: [1, '--port', 9999], 'x-a': '--api-key=x', 'x-b': 1e21, 'x-c': -1, 'x-d': '-1.5', 'x-e': ['-2'] })).toEqual([
      'vllm.extra_args.seed: a list item starts with "-", so the engine would read it as a flag',
      'vllm.extra_args.x-a: the value starts with "-", so the engine would read it as a flag', // (not repeated: it may be a token)
      'vllm.extra_args.x-b: the value is past 2^53 − 1 (it would reach the engine as 1e+21 or the like)',
    ]);
  });

  it('keeps nulls inside a mapping value, which goes to the engine as JSON', () => {
    expect(extra({ 'speculative-config': { method: 'ngram', prompt_lookup_max: null } })).toEqual([]);
    expect(parseConfig(withModel({ vllm: { extra_args: { 'speculative-config': { method: 'ngram', prompt_lookup_max: null } } } })).vllm.extra_args).toEqual({
      'speculative-config': { method: 'ngram', prompt_lookup_max: null },
    });
  });

  it('refuses flag names with capitals, which argparse would not recognize', () => {
    expect(extra({ Seed: 1, '--Enforce_Eager': true })).toEqual([
      'vllm.extra_args.Seed: must be written in lower case (seed): engine flags are case-sensitive',
      'vllm.extra_args.--Enforce_Eager: must be written in lower case (enforce_eager): engine flags are case-sensitive',
    ]);
    expect(extra({ 'Tp-Size': 2 }, 'sglang')).toEqual([
      'vllm.extra_args.Tp-Size: must be written in lower case (tp-size): engine flags are case-sensitive',
    ]);
  });

  it.each([
    [{ enable_auto_tool_choice: true }, 'vllm.extra_args.enable_auto_tool_choice: needs vllm.extra_args.tool-call-parser as well; vLLM exits at startup without it'],
    [{ 'enable-log-outputs': true }, 'vllm.extra_args.enable-log-outputs: needs vllm.extra_args.enable-log-requests as well; vLLM exits at startup without it'],
    [{ 'enable-log-outputs': true, 'enable-log-requests': false }, 'vllm.extra_args.enable-log-outputs: needs vllm.extra_args.enable-log-requests as well; vLLM exits at startup without it'],
    [{ 'enable-per-request-metrics': true, disable_log_stats: true }, 'vllm.extra_args.enable-per-request-metrics: cannot be used with vllm.extra_args.disable_log_stats; vLLM exits at startup when both are set'],
  ])('refuses %j, on which vLLM exits at startup', (args, expected) => {
    expect(extra(args)).toEqual([expected]);
  });

  it('sees abbreviated flags in those pairs, and refuses a prefix of several flags (ambiguous to vLLM)', () => {
    expect(extra({ 'enable-auto-tool': true })).toEqual([
      'vllm.extra_args.enable-auto-tool: needs vllm.extra_args.tool-call-parser as well; vLLM exits at startup without it',
    ]);
    expect(extra({ 'enable-auto-tool': true, 'tool-call-p': 'hermes' })).toEqual([]);
    expect(extra({ 'enable-per-request': true, 'disable-log-st': true })).toEqual([
      'vllm.extra_args.enable-per-request: cannot be used with vllm.extra_args.disable-log-st; vLLM exits at startup when both are set',
    ]);
    expect(extra({ 'enable-log-outputs': true, 'enable-log-r': true })).toEqual([]);
    expect(extra({ 'enable-auto-tool-choice': true, tool: 'hermes' })).toEqual([
      'vllm.extra_args.tool: could be any of --tool-call-parser, --tool-parser-plugin, --tool-server; vLLM refuses an ambiguous abbreviation: write the flag in full',
      'vllm.extra_args.enable-auto-tool-choice: needs vllm.extra_args.tool-call-parser as well; vLLM exits at startup without it',
    ]);
  });

  it('accepts those flags in the combinations vLLM takes, and leaves SGLang alone', () => {
    expect(extra({ 'enable-auto-tool-choice': true, 'tool-call-parser': 'hermes' })).toEqual([]);
    expect(extra({ 'enable-log-outputs': true, 'enable-log-requests': true })).toEqual([]);
    expect(extra({ 'enable-per-request-metrics': true, 'disable-log-stats': false })).toEqual([]);
    expect(extra({ 'enable-auto-tool-choice': false })).toEqual([]);
    expect(extra({ 'enable-auto-tool-choice': true }, 'sglang')).toEqual([]);
  });

  describe('with LoRA on (tide-vllm sets VLLM_ALLOW_RUNTIME_LORA_UPDATING, which vLLM refuses with several API servers)', () => {
    const WHY = 'vllm.lora.enabled: true makes tide-vllm set VLLM_ALLOW_RUNTIME_LORA_UPDATING, which vLLM refuses with more than one API server';
    const lora = (extra_args: unknown, enabled = true) => linesOrNone(withModel({ vllm: { lora: { enabled }, extra_args } }));

    it('refuses api-server-count above 1', () => {
      expect(lora({ api_server_count: 2 })).toEqual([`vllm.extra_args.api_server_count: is 2, but ${WHY}`]);
      expect(lora({ 'api-server-count': '4', 'data-parallel-size': 4 })).toEqual([`vllm.extra_args.api-server-count: is 4, but ${WHY}`]);
    });

    it('refuses data-parallel-size above 1 unless api-server-count is 1 (it defaults to the data-parallel size)', () => {
      expect(lora({ 'data-parallel-size': 2 })).toEqual([
        `vllm.extra_args.data-parallel-size: is 2, which also starts 2 API servers unless vllm.extra_args.api-server-count is 1, but ${WHY}`,
      ]);
      expect(lora({ 'data-parallel-size': 2, 'api-server-count': 1 })).toEqual([]);
    });

    it('sees those flags through abbreviations, as vLLM does (a unique prefix of a long option)', () => {
      expect(lora({ 'api-server': 2 })).toEqual([`vllm.extra_args.api-server: is 2, but ${WHY}`]);
      expect(lora({ 'api-server': 1, 'data-parallel-size': 2 })).toEqual([]);
      expect(lora({ 'data-parallel-siz': 2, 'api-server-c': 1 })).toEqual([
        'vllm.extra_args.data-parallel-siz: could be any of --data-parallel-size, --data-parallel-size-local; vLLM refuses an ambiguous abbreviation: write the flag in full',
      ]);
      expect(lora({ 'api-server-count': 1, 'api-server': 2 })).toEqual([
        'vllm.extra_args.api-server: abbreviates --api-server-count, which vllm.extra_args.api-server-count sets already',
      ]);
      expect(lora({ 'data-parallel-size-local': 2 })).toEqual([]); // longer, another flag
    });

    it('takes any API server count without LoRA', () => {
      expect(lora({ 'api-server-count': 2, 'data-parallel-size': 2 }, false)).toEqual([]);
      expect(lora({ 'data-parallel-size': 2 }, false)).toEqual([]);
    });
  });
});

describe('${VAR} substitution', () => {
  it('substitutes variables and defaults anywhere, including inside lists', () => {
    const config = parseConfig(
      {
        vllm: { model_path: '${MODEL}', command: ['${VENV:-/opt/venv}/bin/vllm', 'serve'], system_prompt: 'a ${WHO:-} b' },
        auth: { api_keys: ['${KEY1}', 'k-${KEY2:-two}'] },
      },
      { MODEL: 'org/model', KEY1: 'one' },
    );
    expect(config.vllm.model_path).toBe('org/model');
    expect(config.vllm.command).toEqual(['/opt/venv/bin/vllm', 'serve']);
    expect(config.vllm.system_prompt).toBe('a  b');
    expect(config.auth.api_keys).toEqual(['one', 'k-two']);
    // The variables the keys were made of (kept from vLLM's environment), and only those.
    expect(config.auth.keyVariables).toEqual(['KEY1', 'KEY2']);
    const admin = parseConfig(withModel({ auth: { admin_api_keys: ['${A}-${B}', '${A}'] }, vllm: { host: '${H:-localhost}' } }), { A: 'aaaa', B: 'bbbb' });
    expect(admin.auth.keyVariables).toEqual(['A', 'B']);
  });

  it('uses the default when the variable is set but empty, as sh does', () => {
    expect(parseConfig(withModel({ vllm: { host: '${H:-localhost}' } }), { H: '' }).vllm.host).toBe('localhost');
  });

  it('keeps $${ as a literal ${', () => {
    expect(parseConfig(withModel({ vllm: { system_prompt: 'cost $${price} and $$ ${X}' } }), { X: 'x' }).vllm.system_prompt).toBe(
      'cost ${price} and $$ x',
    );
  });

  it('converts substituted numbers and booleans in numeric and boolean fields', () => {
    const config = parseConfig(
      withModel({
        web: { bind_address: { port: '${PORT:-9000}' } },
        vllm: { temperature: '${T}', enable_prefix_caching: '${PC}', gpus: ['${GPU:-1}', 2] },
      }),
      { T: '0.25', PC: 'FALSE' },
    );
    expect(config.web.bind_address.port).toBe(9000);
    expect(config.vllm.temperature).toBe(0.25);
    expect(config.vllm.enable_prefix_caching).toBe(false);
    expect(config.vllm.gpus).toEqual([1, 2]);
  });

  it('keeps numeric-looking strings in string fields', () => {
    expect(parseConfig(withModel({ vllm: { model_name: '${N}' } }), { N: '42' }).vllm.model_name).toBe('42');
  });

  it('drops API keys that substitute to the empty string', () => {
    const config = parseConfig({ ...MODEL, auth: { api_keys: ['${TIDE_API_KEY:-}'], admin_api_keys: ['${ADMIN:-}', 'a'] } });
    expect(config.auth.api_keys).toEqual([]);
    expect(config.auth.admin_api_keys).toEqual(['a']);
  });

  it('reports unset variables by key path, with every other problem', () => {
    expect(
      lines(withModel({ vllm: { port: '${PORT}', max_tokens: 0 }, auth: { api_keys: ['ok', '${K}'] } })),
    ).toEqual([
      'vllm.port: environment variable PORT is not set (write ${PORT:-default} to give a default)',
      'auth.api_keys[1]: environment variable K is not set (write ${K:-default} to give a default)',
      'vllm.max_tokens: must be an integer of at least 1',
    ]);
  });

  it('reports malformed references', () => {
    expect(lines(withModel({ vllm: { host: '${1X}', state_dir: 'a${B' } }))).toEqual([
      'vllm.host: "${1X}" is not a valid reference; write ${NAME} or ${NAME:-default}',
      'vllm.state_dir: has "${" without a closing "}" (write "$${" for a literal "${")',
    ]);
  });
});

describe('resolveConfigPath', () => {
  it.each([
    [['-c', 'a.yaml'], 'a.yaml'],
    [['--config', 'b.yaml'], 'b.yaml'],
    [['--config=c.yaml'], 'c.yaml'],
    [['-c', 'a.yaml', '--config=d.yaml'], 'd.yaml'],
    [['--help', '-c', 'e.yaml'], 'e.yaml'],
  ])('%j → %s', (argv, expected) => {
    expect(resolveConfigPath(argv, { TIDE_VLLM_CONFIG: 'env.yaml' })).toBe(expected);
  });

  it('falls back to TIDE_VLLM_CONFIG, then conf/tide-vllm.yaml', () => {
    expect(resolveConfigPath([], { TIDE_VLLM_CONFIG: 'env.yaml' })).toBe('env.yaml');
    expect(resolveConfigPath([], { TIDE_VLLM_CONFIG: '' })).toBe('conf/tide-vllm.yaml');
    expect(resolveConfigPath(['-h'], {})).toBe('conf/tide-vllm.yaml');
  });

  it.each([
    [['--port', '1'], 'unknown option --port'],
    [['extra'], 'unexpected argument extra'],
    [['-c'], '-c needs a file path'],
    [['--config', '-h'], '--config needs a file path'],
    [['--config='], '--config= needs a file path'],
  ])('rejects %j', (argv, problem) => {
    expect(() => resolveConfigPath(argv, {})).toThrow(new UsageError(problem));
    expect(() => resolveConfigPath(argv, {})).toThrow(USAGE);
  });
});

describe('loadConfig', () => {
  let dir: string;
  const write = (name: string, text: string) => {
    const path = join(dir, name);
    writeFileSync(path, text);
    return path;
  };
  beforeEach(() => {
    dir = mkdtempSync(join(tmpdir(), 'tide-config-'));
  });
  afterEach(() => rmSync(dir, { recursive: true, force: true }));

  it('loads the shipped conf/tide-vllm.yaml with no environment', () => {
    const config = loadConfig(join(__dirname, '../../conf/tide-vllm.yaml'), {});
    const defaults = JSON.parse(JSON.stringify(parseConfig(MODEL)));
    // The same as the defaults, but that its api_keys come from ${TIDE_API_KEY:-}: kept from vLLM's environment.
    expect(JSON.parse(JSON.stringify(config))).toEqual({ ...defaults, auth: { ...defaults.auth, keyVariables: ['TIDE_API_KEY'] } });
  });

  it('takes TIDE_API_KEY from the environment in the shipped file', () => {
    const config = loadConfig(join(__dirname, '../../conf/tide-vllm.yaml'), { TIDE_API_KEY: 'sk-1' });
    expect(config.auth.api_keys).toEqual(['sk-1']);
  });

  it('substitutes environment variables from the YAML', () => {
    const path = write('a.yaml', 'vllm:\n  model_path: m\n  port: ${PORT:-8000}\n  enable_chunked_prefill: ${CP:-true}\n');
    const config = loadConfig(path, { PORT: '8123', CP: 'false' });
    expect(config.vllm.port).toBe(8123);
    expect(config.vllm.enable_chunked_prefill).toBe(false);
    expect(config.vllm.log_file).toBe('logs/vllm_8123.log');
  });

  it('names a missing file and how to choose another', () => {
    const path = join(dir, 'none.yaml');
    expect(() => loadConfig(path, {})).toThrow(
      new ConfigError(
        `Configuration file not found: ${path} (looked for ${path}). ` +
          'Choose another file with -c PATH, --config PATH or the TIDE_VLLM_CONFIG environment variable.',
      ),
    );
  });

  it('reports an unreadable file', () => {
    const sub = join(dir, 'sub.yaml');
    mkdirSync(sub);
    expect(() => loadConfig(sub, {})).toThrow(`Cannot read configuration file ${sub}: EISDIR`);
  });

  it('reports bad YAML with line and column', () => {
    const path = write('bad.yaml', 'vllm:\n  model_path: m\n  port: [1\nweb: {}\n');
    expect(() => loadConfig(path, {})).toThrow(new RegExp(`^Invalid YAML in ${path} at line 4, column 1: `));
    const duplicate = write('dup.yaml', 'web: {}\nweb: {}\n');
    expect(() => loadConfig(duplicate, {})).toThrow(`Invalid YAML in ${duplicate} at line 2, column 1: duplicated mapping key`);
    // js-yaml gives this one no position: it was a TypeError, and exit 1.
    const several = write('docs.yaml', 'web: {}\n---\nvllm: {}\n');
    expect(() => loadConfig(several, {})).toThrow(new ConfigError(`Invalid YAML in ${several}: expected a single document in the stream, but found more`));
  });

  it('refuses a file whose aliases expand to a huge tree, at once', () => {
    // 500 bytes, 10^8 strings once expanded: it took minutes and gigabytes before.
    const levels = ['x0: &a0 [' + Array(10).fill('"s"').join(', ') + ']'];
    for (let i = 1; i < 8; i++) levels.push(`x${i}: &a${i} [` + Array(10).fill(`*a${i - 1}`).join(', ') + ']');
    const path = write('bomb.yaml', `vllm:\n  model_path: m\n  extra_args:\n${levels.map((l) => `    ${l}`).join('\n')}\n`);
    expect(() => loadConfig(path, {})).toThrow(/more than 100000 values once its YAML aliases are expanded/);
  });

  it('refuses NUL characters, which cannot go into a command line or environment, naming the key', () => {
    const path = write('nul.yaml', 'vllm:\n  model_path: m\n  model_name: "a\\0b"\n  env:\n    X: "a\\0b"\n');
    expect(() => loadConfig(path, {})).toThrow(
      `Invalid configuration in ${path}:\n  - vllm.model_name: must not contain a NUL character\n  - vllm.env.X: must not contain a NUL character`,
    );
  });

  it('names a misspelt key left empty in the file, which would otherwise pass unnoticed', () => {
    const path = write('empty-key.yaml', 'vllm:\n  model_path: m\n  max_num_seq:\n');
    expect(() => loadConfig(path, {})).toThrow(`Invalid configuration in ${path}:\n  - vllm.max_num_seq: unknown key (did you mean max_num_seqs?)`);
  });

  it('rejects a top level that is not a mapping', () => {
    const path = write('list.yaml', '- a\n- b\n');
    expect(() => loadConfig(path, {})).toThrow(
      `Invalid configuration in ${path}:\n  - (top level): must be a mapping with the sections web, vllm, logging and auth`,
    );
  });

  it('reads an empty file as all defaults (which still need a model)', () => {
    const path = write('empty.yaml', '# nothing\n');
    expect(() => loadConfig(path, {})).toThrow(
      `Invalid configuration in ${path}:\n  - vllm.model_path: is required when auto_start is true`,
    );
  });

  it.each([
    ['extra_args', 'vllm:\n  model_path: m\n  extra_args:\n    constructor: x\n', 'vllm.extra_args.constructor'],
    ['lora.modules', 'vllm:\n  model_path: m\n  lora:\n    enabled: true\n    modules:\n      constructor: /p\n', 'vllm.lora.modules.constructor'],
    ['env', 'vllm:\n  model_path: m\n  env:\n    constructor: x\n', 'vllm.env.constructor'],
    ['env (__proto__)', 'vllm:\n  model_path: m\n  env:\n    __proto__: x\n', 'vllm.env.__proto__'],
  ])('names a reserved key in %s instead of crashing', (_map, text, path) => {
    const file = write('reserved.yaml', text);
    expect(() => loadConfig(file, {})).toThrow(
      new ConfigError(
        `Invalid configuration in ${file}:\n  - ${path}: cannot be used as a key: it is reserved (a built-in name of JavaScript objects, like constructor, __proto__ and toString)`,
      ),
    );
  });

  it('does not read YAML 1.1 dates or yes/no', () => {
    const path = write('scalars.yaml', 'vllm:\n  model_path: 2024-01-01\n  enabled: yes\n');
    expect(() => loadConfig(path, {})).toThrow('vllm.enabled: must be true or false');
  });
});
