// The YAML configuration as typed classes. Property names are the YAML keys (snake_case).
// Each property carries exactly one validation rule with a hand-written message, so a
// report reads `vllm.port: must be an integer from 1 to 65535`. Rules that span several
// keys live in config.loader.ts. No @nestjs import: this runs before Nest boots.
import 'reflect-metadata';
import { Transform, Type } from 'class-transformer';
import { IsOptional, ValidateBy, ValidateNested } from 'class-validator';

const ENGINES = ['vllm', 'sglang'] as const;
export type Engine = (typeof ENGINES)[number];

/** `--dtype` choices. vLLM (A8) and SGLang (Part B) accept the same six values. */
const DTYPES = ['auto', 'bfloat16', 'float', 'float16', 'float32', 'half'] as const;
export type Dtype = (typeof DTYPES)[number];

export const LOG_LEVELS = ['trace', 'debug', 'info', 'warn', 'error', 'fatal', 'silent'] as const;
export type LogLevel = (typeof LOG_LEVELS)[number];

/** 1 and 2 are the engine's own sleep levels; 3 stops the engine process and restarts it on demand. */
export const SLEEP_LEVELS = [1, 2, 3] as const;
export type SleepLevel = (typeof SLEEP_LEVELS)[number];

/**
 * A LoRA adapter's name, in vllm.lora.modules and POST /admin/lora alike: it is a URL path segment
 * (DELETE /admin/lora/{name}, at most the router's 128 characters) and a word of --lora-modules name=path.
 */
export const LORA_NAME = /^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$/;
export const LORA_NAME_RULE = '1 to 128 letters, digits, ".", "_" or "-", the first a letter or digit';
/** `--max-lora-rank` choices of vLLM (A8). */
const LORA_RANKS = [1, 8, 16, 32, 64, 128, 256, 320, 512] as const;

export const DEFAULT_COMMANDS: Readonly<Record<Engine, readonly string[]>> = {
  vllm: ['vllm', 'serve'],
  sglang: ['sglang', 'serve'],
};

/** A mapping goes to the engine as one JSON argument (`speculative-config: {method: ngram}`). */
export type ExtraArgValue = string | number | boolean | Array<string | number> | Record<string, unknown>;

/** `--max_loras`, `max_loras` and `max-loras` all name the flag `max-loras`. */
export function normalizeFlagName(key: string): string {
  return key.replace(/^--/, '').replace(/_/g, '-');
}

// ---------------------------------------------------------------------------
// Value conversions (applied by plainToInstance before validation). They let
// `port: ${PORT:-8000}` work: substitution yields the string "8000".
// ---------------------------------------------------------------------------

const NUMBER_TEXT = /^\s*[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?\s*$/;

function toNumber(value: unknown): unknown {
  return typeof value === 'string' && NUMBER_TEXT.test(value) ? Number(value) : value;
}

function toBoolean(value: unknown): unknown {
  if (typeof value !== 'string') return value;
  const text = value.trim().toLowerCase();
  return text === 'true' ? true : text === 'false' ? false : value;
}

const BYTE_UNITS: Record<string, number> = { '': 1, kb: 1024, mb: 1024 * 1024 };

function toBytes(value: unknown): unknown {
  if (typeof value !== 'string') return value;
  const match = /^\s*(\d+)\s*(kb|mb)?\s*$/i.exec(value);
  return match ? Number(match[1]) * BYTE_UNITS[(match[2] ?? '').toLowerCase()] : value;
}

const ToNumber = () => Transform(({ value }) => toNumber(value));
const ToBoolean = () => Transform(({ value }) => toBoolean(value));
const ToNumberList = () => Transform(({ value }) => (Array.isArray(value) ? value.map(toNumber) : value));
/** `${KEY:-}` yields "", which means "no key" rather than an empty key. */
const DropEmptyStrings = () =>
  Transform(({ value }) => (Array.isArray(value) ? value.filter((item) => item !== '') : value));

// ---------------------------------------------------------------------------
// Rules: one decorator each, with the message a user sees.
// ---------------------------------------------------------------------------

function rule(name: string, test: (value: unknown) => boolean, message: string): PropertyDecorator {
  return ValidateBy({ name, validator: { validate: (value: unknown) => test(value) } }, { message });
}

const isNumber = (value: unknown): value is number => typeof value === 'number' && Number.isFinite(value);
const isString = (value: unknown): value is string => typeof value === 'string';
/** What an `Authorization: Bearer` header can carry as a key: printable ASCII, no spaces. */
const PRINTABLE_ASCII = /^[\x21-\x7e]+$/;

/** A host name or address on this machine's loopback interface (IPv4-mapped and uncompressed IPv6 too). */
export function isLoopback(host: string): boolean {
  const lower = host.toLowerCase();
  return lower === 'localhost' || lower.startsWith('127.') || lower.startsWith('::ffff:127.') || /^(?:0{1,4}:){7}0{0,3}1$/.test(lower) || lower === '::1';
}

export const isMapping = (value: unknown): value is Record<string, unknown> =>
  typeof value === 'object' && value !== null && !Array.isArray(value);

function IntRange(min: number, max?: number): PropertyDecorator {
  const message =
    max === undefined ? `must be an integer of at least ${min}` : `must be an integer from ${min} to ${max}`;
  // Safe integers only: 1e21 is an integer to JavaScript, but reaches vLLM's command line as "1e+21".
  return rule('intRange', (v) => Number.isSafeInteger(v) && (v as number) >= min && (max === undefined || (v as number) <= max), message);
}

/** A number > `above` (or ≥ `atLeast`) and ≤ `atMost` when given. `why` explains the bounds in the message. */
function NumberRange(bounds: { above?: number; atLeast?: number; atMost?: number }, why?: string): PropertyDecorator {
  const { above, atLeast, atMost } = bounds;
  const lower = above !== undefined ? `greater than ${above}` : atLeast !== undefined ? `of at least ${atLeast}` : '';
  const range =
    atLeast !== undefined && atMost !== undefined
      ? `must be a number from ${atLeast} to ${atMost}`
      : `must be a number ${[lower, atMost !== undefined ? `at most ${atMost}` : ''].filter(Boolean).join(' and ')}`;
  const test = (v: unknown) =>
    isNumber(v) &&
    (above === undefined || v > above) &&
    (atLeast === undefined || v >= atLeast) &&
    (atMost === undefined || v <= atMost);
  return rule('numberRange', test, why === undefined ? range : `${range} (${why})`);
}

/**
 * Longest duration in seconds. Node timers hold at most 2^31 − 1 ms; a longer delay is cut to
 * 1 ms (TimeoutOverflowWarning), so `timeout: 2592000` would time every request out at once.
 */
export const MAX_SECONDS = 2_147_483;

/** The most rotated engine logs kept (vllm.log_backups). */
const MAX_LOG_BACKUPS = 1000;

/** A duration in seconds: a number above (or at least) a lower bound, and at most MAX_SECONDS. */
function Seconds(lower: { above: number } | { atLeast: number }): PropertyDecorator {
  return NumberRange({ ...lower, atMost: MAX_SECONDS }, 'seconds; about 24.8 days is the longest a Node.js timer can wait');
}

function OneOf(choices: readonly (string | number)[]): PropertyDecorator {
  return rule('oneOf', (v) => choices.includes(v as string | number), `must be one of ${choices.join(', ')}`);
}

const Bool = () => rule('bool', (v) => typeof v === 'boolean', 'must be true or false');
const Text = () => rule('text', isString, 'must be a string');
const NonEmptyText = () => rule('nonEmptyText', (v) => isString(v) && v.trim() !== '', 'must be a non-empty string');
/**
 * A host name or IP address, an IPv6 address without the brackets a URL puts around it. One to
 * listen on may be a link-local IPv6 address with its zone (`fe80::1%eth0`); vLLM's, which goes
 * into a URL, may not.
 */
const Host = (options: { zone: boolean }) =>
  rule(
    'host',
    (v) => isString(v) && (/^[^\s/\\[\]#?@%]+$/.test(v) || (options.zone && /^[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*%[\w.-]+$/.test(v))),
    `must be a host name or IP address (no spaces, slashes, brackets, #, ?, @ or %${options.zone ? ' but an IPv6 zone' : ''}; an IPv6 address without brackets, like ::1)`,
  );
/** A section (`web:`, `vllm.restart:` …) or a free-form map (`extra_args`, `env`, `lora.modules`). */
const Mapping = () => rule('mapping', isMapping, 'must be a mapping of keys to values');

function Section(cls: () => new () => object): PropertyDecorator {
  return (target, key) => {
    Type(cls)(target, key);
    ValidateNested()(target, key);
    Mapping()(target, key);
  };
}

// ---------------------------------------------------------------------------
// Sections
// ---------------------------------------------------------------------------

export class BindAddressConfig {
  @Host({ zone: true }) host = '0.0.0.0';
  @ToNumber() @IntRange(1, 65535) port = 10002;
}

export class WebConfig {
  @Section(() => BindAddressConfig) bind_address = new BindAddressConfig();

  /** Bytes. YAML may also say "512kb" or "1mb" (1 kb = 1024 bytes). */
  @Transform(({ value }) => toBytes(value))
  @rule(
    'bodyLimit',
    (v) => Number.isSafeInteger(v) && (v as number) >= 1024,
    'must be an integer number of bytes of at least 1024, or a size such as "512kb" or "1mb"',
  )
  body_limit = 1048576;

  /** Seconds to let in-flight requests finish on shutdown. */
  @ToNumber() @Seconds({ atLeast: 0 }) drain_timeout = 30;

  /** Resolved by the loader: 2 × vllm.max_num_seqs when absent. */
  @IsOptional() @ToNumber() @IntRange(1) max_concurrent_requests: number;

  @ToNumber() @IntRange(1) max_prompt_chars = 1_000_000;

  /** Seconds a client has to send a whole request (headers and body), and that a streaming client may read nothing; slower clients are cut off. */
  @ToNumber() @Seconds({ above: 0 }) client_timeout = 30;

  /** Origins browsers may call from (CORS), as vLLM's --allowed-origins: "*" for any; [] turns CORS off. */
  @rule(
    'corsOrigins',
    (v) => Array.isArray(v) && v.every((item) => isString(item) && (item === '*' || /^[a-z][a-z0-9+.-]*:\/\/[^\s/]+$/i.test(item))),
    'must be a list of origins such as "https://app.example.com" (scheme://host[:port], no path) or "*"',
  )
  cors_allowed_origins: string[] = ['*'];
}

export class RestartConfig {
  @ToBoolean() @Bool() enabled = true;
  /** Restarts allowed within `window` seconds before the engine is left failed. */
  @ToNumber() @IntRange(0) max_restarts = 5;
  @ToNumber() @Seconds({ above: 0 }) window = 600;
  @ToNumber() @Seconds({ above: 0 }) backoff_initial = 1;
  @ToNumber() @Seconds({ above: 0 }) backoff_max = 60;
}

export class SleepConfig {
  /** Idle seconds before the engine is put to sleep; 0 turns idle sleep off. */
  @ToNumber() @Seconds({ atLeast: 0 }) idle_seconds = 0;
  @ToNumber() @OneOf(SLEEP_LEVELS) level: SleepLevel = 1;
  @ToNumber() @Seconds({ above: 0 }) wake_timeout = 120;
}

export class LoraConfig {
  @ToBoolean() @Bool() enabled = false;
  @ToNumber() @IntRange(1) max_loras = 1;
  @ToNumber() @OneOf(LORA_RANKS) max_lora_rank = 16;
  /** Adapter name → path, loaded at startup. Entries are checked by the loader. */
  @Mapping() modules: Record<string, string> = {};
}

export class VllmConfig {
  @ToBoolean() @Bool() enabled = true;
  @ToBoolean() @Bool() auto_start = true;
  @OneOf(ENGINES) engine: Engine = 'vllm';

  /** Launcher argv. Resolved by the loader from `engine` when absent. */
  @IsOptional()
  @rule(
    'command',
    (v) => Array.isArray(v) && v.length > 0 && v.every((item) => isString(item) && item !== ''),
    'must be a non-empty list of non-empty strings',
  )
  command: string[];

  @Host({ zone: false }) host = '127.0.0.1';
  @ToNumber() @IntRange(1, 65535) port = 8000;
  /**
   * The key of a vLLM you run yourself (manual mode), sent as `Authorization: Bearer` on every
   * call to it. Auto-start refuses it (loader): the engine it starts gets a per-start key of its
   * own when auth is on.
   * "" (as from `${VAR:-}`) means none. Printable ASCII: it goes into an HTTP header as is.
   */
  @Transform(({ value }) => (value === '' ? undefined : value))
  @IsOptional()
  @rule('engineKey', (v) => isString(v) && PRINTABLE_ASCII.test(v), 'must be a key of printable ASCII characters without spaces')
  api_key?: string;
  /** Served model name. Resolved by the loader to model_path when absent. */
  @IsOptional() @NonEmptyText() model_name: string;
  @IsOptional() @NonEmptyText() model_path?: string;

  // Request defaults
  /** Resolved by the loader when absent: 2048, or half of max_model_len when that is smaller. */
  @IsOptional() @ToNumber() @IntRange(1) max_tokens: number;
  @ToNumber() @NumberRange({ atLeast: 0, atMost: 2 }) temperature = 0.7;
  @ToNumber() @NumberRange({ above: 0, atMost: 1 }) top_p = 0.9;
  /** Seconds per request. */
  @ToNumber() @Seconds({ above: 0 }) timeout = 60;
  @Text() system_prompt = '你是一个有用的AI助手。';

  // Engine flags
  @ToNumber() @NumberRange({ above: 0, atMost: 1 }) gpu_memory_utilization = 0.9;
  /** Resolved by the loader when absent: the number of `gpus`, else 1. */
  @IsOptional() @ToNumber() @IntRange(1) tensor_parallel_size: number;
  @ToNumber() @IntRange(1) max_num_seqs = 256;
  @ToNumber() @IntRange(1) max_num_batched_tokens = 8192;
  @ToNumber() @IntRange(1) max_model_len = 4096;
  @OneOf(DTYPES) dtype: Dtype = 'auto';
  @ToBoolean() @Bool() enable_prefix_caching = true;
  @ToBoolean() @Bool() enable_chunked_prefill = true;
  /** Flag name → value, passed through. Keys are normalized by the loader (see normalizeFlagName). */
  @Mapping() extra_args: Record<string, ExtraArgValue> = {};
  /** Extra environment for the engine process. Numbers are stringified by the loader; booleans are refused. */
  @Mapping() env: Record<string, string> = {};

  // Lifecycle (seconds)
  @ToNumber() @Seconds({ above: 0 }) startup_timeout = 600;
  @ToNumber() @Seconds({ atLeast: 0 }) stop_timeout = 30;
  @ToNumber() @Seconds({ above: 0 }) health_interval = 5;
  /** Resolved by the loader when absent: 3 s, 20 s with SGLang (its /health generates a token and waits that long for it). */
  @IsOptional() @ToNumber() @Seconds({ above: 0 }) health_timeout: number;
  @ToNumber() @IntRange(1) health_failure_threshold = 3;
  @Section(() => RestartConfig) restart = new RestartConfig();
  @NonEmptyText() state_dir = 'state';
  /** `{port}` is replaced by the loader; "" disables the engine log file. */
  @Text() log_file = 'logs/vllm_{port}.log';
  /** Rotate the engine log at this size; 0 never rotates. */
  @ToNumber() @IntRange(0) log_max_bytes = 10485760;
  /** Each rotation renames every backup: a bound keeps that a moment's work. */
  @ToNumber() @IntRange(0, MAX_LOG_BACKUPS) log_backups = 3;
  @Section(() => SleepConfig) sleep = new SleepConfig();
  @Section(() => LoraConfig) lora = new LoraConfig();

  @IsOptional()
  @ToNumberList()
  @rule(
    'gpus',
    (v) => Array.isArray(v) && v.length > 0 && v.every((i) => Number.isSafeInteger(i) && i >= 0) && new Set(v).size === v.length,
    'must be a non-empty list of distinct non-negative integers (GPU indices)',
  )
  gpus?: number[];
}

export class LoggingConfig {
  @OneOf(LOG_LEVELS) level: LogLevel = 'info';
  @ToBoolean() @Bool() log_bodies = false;
  /** Whether /health, /ready and /metrics requests are access-logged. */
  @ToBoolean() @Bool() access_log_probes = false;
}

const ApiKeyList = () =>
  rule(
    'apiKeys',
    (v) => Array.isArray(v) && v.every((key) => isString(key) && PRINTABLE_ASCII.test(key)),
    'must be a list of keys of printable ASCII characters without spaces (an HTTP header carries them)',
  );

export class AuthConfig {
  @DropEmptyStrings() @ApiKeyList() api_keys: string[] = [];
  @DropEmptyStrings() @ApiKeyList() admin_api_keys: string[] = [];
  @ToBoolean() @Bool() protect_metrics = false;
  /** Derived, not a key of the file: the environment variables that `${NAME}` put into the keys above. */
  declare keyVariables?: readonly string[];
}

export class TideConfig {
  @Section(() => WebConfig) web = new WebConfig();
  @Section(() => VllmConfig) vllm = new VllmConfig();
  @Section(() => LoggingConfig) logging = new LoggingConfig();
  @Section(() => AuthConfig) auth = new AuthConfig();
}

// ---------------------------------------------------------------------------
// Engine flags that config keys already set, or that would cut tide-vllm off from the engine.
// extra_args may not repeat them, nor abbreviate them (argparse accepts unique prefixes).
// The value says what to use instead: a config key, or a full sentence.
// ---------------------------------------------------------------------------

const API_KEY_NOTE = 'tide-vllm passes its own key to the engine; client keys go in auth.api_keys';
const PLAIN_HTTP_NOTE = 'tide-vllm speaks plain HTTP to the engine, which listens on loopback by default';
const CONFIG_FILE_NOTE = 'tide-vllm sets the engine flags; put them in vllm.extra_args, not in an engine config file';
const HELP_NOTE = 'the engine would print its help and exit instead of serving';

export const MANAGED_FLAGS: Readonly<Record<Engine, Readonly<Record<string, string>>>> = {
  vllm: {
    model: 'vllm.model_path',
    'served-model-name': 'vllm.model_name',
    host: 'vllm.host',
    port: 'vllm.port',
    'api-key': API_KEY_NOTE,
    'gpu-memory-utilization': 'vllm.gpu_memory_utilization',
    'tensor-parallel-size': 'vllm.tensor_parallel_size',
    tp: 'vllm.tensor_parallel_size',
    'max-num-seqs': 'vllm.max_num_seqs',
    'max-num-batched-tokens': 'vllm.max_num_batched_tokens',
    'max-model-len': 'vllm.max_model_len',
    dtype: 'vllm.dtype',
    'enable-prefix-caching': 'vllm.enable_prefix_caching',
    'enable-chunked-prefill': 'vllm.enable_chunked_prefill',
    'enable-sleep-mode': 'vllm.sleep',
    'enable-lora': 'vllm.lora.enabled',
    'max-loras': 'vllm.lora.max_loras',
    'max-lora-rank': 'vllm.lora.max_lora_rank',
    'lora-modules': 'vllm.lora.modules',
    uds: 'the engine must listen on vllm.host:vllm.port, where tide-vllm reaches it, not on a Unix socket',
    config: CONFIG_FILE_NOTE,
    'ssl-keyfile': PLAIN_HTTP_NOTE,
    'ssl-certfile': PLAIN_HTTP_NOTE,
    headless: 'it runs no API server, and tide-vllm fronts the API server',
    help: HELP_NOTE,
    'data-parallel-multi-port-external-lb':
      "it makes vLLM run a data-parallel supervisor that puts its engines in process groups of their own, which tide-vllm's stop and restart would leave running on the GPUs",
  },
  sglang: {
    'model-path': 'vllm.model_path',
    model: 'vllm.model_path',
    'served-model-name': 'vllm.model_name',
    host: 'vllm.host',
    port: 'vllm.port',
    'api-key': API_KEY_NOTE,
    'mem-fraction-static': 'vllm.gpu_memory_utilization',
    'tp-size': 'vllm.tensor_parallel_size',
    'tensor-parallel-size': 'vllm.tensor_parallel_size',
    tp: 'vllm.tensor_parallel_size',
    'max-running-requests': 'vllm.max_num_seqs',
    'max-prefill-tokens': 'vllm.max_num_batched_tokens',
    'context-length': 'vllm.max_model_len',
    dtype: 'vllm.dtype',
    'disable-radix-cache': 'vllm.enable_prefix_caching',
    'enable-memory-saver': 'vllm.sleep',
    'enable-weights-cpu-backup': 'vllm.sleep',
    'enable-lora': 'vllm.lora.enabled',
    'max-loras-per-batch': 'vllm.lora.max_loras',
    'max-lora-rank': 'vllm.lora.max_lora_rank',
    'lora-paths': 'vllm.lora.modules',
    'enable-metrics': 'tide-vllm always passes it so that /metrics exists',
    'admin-api-key': "tide-vllm calls the engine's sleep and LoRA routes without it; admin keys for tide-vllm go in auth.admin_api_keys",
    help: HELP_NOTE,
    config: CONFIG_FILE_NOTE,
    'ssl-keyfile': PLAIN_HTTP_NOTE,
    'ssl-certfile': PLAIN_HTTP_NOTE,
  },
};

/** Engine environment variables that vllm.env may not set, with the reason (as for MANAGED_FLAGS). */
export const MANAGED_ENV: Readonly<Record<Engine, Readonly<Record<string, string>>>> = {
  vllm: {
    VLLM_API_KEY: `vLLM reads it as --api-key; ${API_KEY_NOTE}`,
  },
  sglang: {},
};
