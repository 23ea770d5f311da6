/**
 * An argparse-compatible parser for vLLM's `serve` command line (vllm/utils/argparse_utils.py
 * FlexibleArgumentParser + vllm/entrypoints/openai/cli_args.py + vllm/engine/arg_utils.py):
 * `--a-b`/`--a_b`, `--x v`/`--x=v`, unique-prefix abbreviations, BooleanOptionalAction's `--no-x`,
 * nargs `+`, choices, argparse's error texts and exit statuses.
 */
import { PyFloat, PyRaw, pyRepr, pyStr } from './python-format';

/** Model used when none is given (vllm/config/model.py). */
export const DEFAULT_MODEL = 'Qwen/Qwen3-0.6B';
/** The simulated model's context length when --max-model-len is not set (or auto / -1). */
export const DEFAULT_MAX_MODEL_LEN = 4096;
/** vLLM's max_num_seqs default for a small device (get_batch_defaults). */
export const DEFAULT_MAX_NUM_SEQS = 256;

const DTYPE_CHOICES = ['auto', 'bfloat16', 'float', 'float16', 'float32', 'half'] as const;
const UVICORN_LOG_LEVELS = ['critical', 'error', 'warning', 'info', 'debug', 'trace'] as const;
const MAX_LORA_RANKS = [1, 8, 16, 32, 64, 128, 256, 320, 512] as const;

export type Kind =
  | 'str'
  | 'int'
  | 'float'
  | 'bool' // argparse.BooleanOptionalAction: --x and --no-x
  | 'store_true'
  | 'human_int'
  | 'human_int_or_auto'
  | 'json'
  | 'lora';

export interface FlagSpec {
  dest: string;
  /** Option strings in registration order (extra flags such as -tp first, as vLLM adds them). */
  flags: string[];
  kind: Kind;
  default: unknown;
  /** `+`: one or more values; `*`: zero or more (SGLang's list flags). */
  nargs?: '+' | '*';
  choices?: readonly (string | number)[];
  append?: boolean;
}

function flag(
  dest: string,
  kind: Kind,
  defaultValue: unknown,
  extra: Partial<Omit<FlagSpec, 'dest' | 'kind' | 'default'>> & { short?: string } = {},
): FlagSpec {
  const long = `--${dest.replace(/_/g, '-')}`;
  const flags = extra.short ? [extra.short, long] : [long];
  if (kind === 'bool') flags.push(`--no-${dest.replace(/_/g, '-')}`);
  return { dest, kind, default: defaultValue, flags, ...extra };
}

/**
 * The flags the simulator accepts, in the order vLLM registers them (serve-level, then
 * FrontendArgs, then EngineArgs/AsyncEngineArgs), which is also the order of `non-default args`.
 * Flags the simulator does not act on are still accepted so a real launch command works.
 */
const FLAG_SPECS: FlagSpec[] = [
  // make_arg_parser (cli_args.py)
  flag('headless', 'store_true', false),
  flag('api_server_count', 'int', null, { short: '-asc' }),
  flag('config', 'str', null),
  flag('grpc', 'store_true', false),
  // BaseFrontendArgs
  flag('lora_modules', 'lora', null, { nargs: '+' }),
  flag('chat_template', 'str', null),
  flag('chat_template_content_format', 'str', 'auto', { choices: ['auto', 'string', 'openai'] }),
  flag('trust_request_chat_template', 'bool', false),
  flag('default_chat_template_kwargs', 'json', null),
  flag('response_role', 'str', 'assistant'),
  flag('return_tokens_as_token_ids', 'bool', false),
  flag('enable_auto_tool_choice', 'bool', false),
  flag('exclude_tools_when_tool_choice_none', 'bool', false),
  flag('tool_call_parser', 'str', null),
  flag('tool_parser_plugin', 'str', ''),
  flag('tool_server', 'str', null),
  flag('log_config_file', 'str', null),
  flag('max_log_len', 'int', null),
  flag('enable_prompt_tokens_details', 'bool', false),
  flag('enable_per_request_metrics', 'bool', false),
  flag('enable_server_load_tracking', 'bool', false),
  flag('enable_force_include_usage', 'bool', false),
  flag('enable_tokenizer_info_endpoint', 'bool', false),
  flag('enable_log_outputs', 'bool', false),
  flag('log_error_stack', 'bool', false),
  flag('tokens_only', 'bool', false),
  flag('fingerprint_mode', 'str', 'full', { choices: ['full', 'hash', 'custom', 'none'] }),
  flag('fingerprint_value', 'str', null),
  // FrontendArgs
  flag('host', 'str', null),
  flag('port', 'int', 8000),
  flag('uds', 'str', null),
  flag('uvicorn_log_level', 'str', 'info', { choices: UVICORN_LOG_LEVELS }),
  flag('disable_uvicorn_access_log', 'bool', false),
  flag('disable_access_log_for_endpoints', 'str', null),
  flag('allow_credentials', 'bool', false),
  flag('allowed_origins', 'json', ['*']),
  flag('allowed_methods', 'json', ['*']),
  flag('allowed_headers', 'json', ['*']),
  flag('api_key', 'str', null, { nargs: '+' }),
  flag('ssl_keyfile', 'str', null),
  flag('ssl_certfile', 'str', null),
  flag('ssl_ca_certs', 'str', null),
  flag('enable_ssl_refresh', 'bool', false),
  flag('ssl_cert_reqs', 'int', 0),
  flag('root_path', 'str', null),
  flag('middleware', 'str', [], { append: true }),
  flag('enable_request_id_headers', 'bool', false),
  flag('disable_fastapi_docs', 'bool', false),
  flag('h11_max_incomplete_event_size', 'int', 4194304),
  flag('h11_max_header_count', 'int', 256),
  flag('enable_offline_docs', 'bool', false),
  // EngineArgs (vllm/engine/arg_utils.py)
  flag('model', 'str', DEFAULT_MODEL),
  flag('runner', 'str', 'auto'),
  flag('convert', 'str', 'auto'),
  flag('tokenizer', 'str', null),
  flag('tokenizer_mode', 'str', 'auto'),
  flag('trust_remote_code', 'bool', false),
  flag('download_dir', 'str', null),
  flag('load_format', 'str', 'auto'),
  flag('dtype', 'str', 'auto', { choices: DTYPE_CHOICES }),
  flag('seed', 'int', 0),
  flag('max_model_len', 'human_int_or_auto', null),
  flag('revision', 'str', null),
  flag('code_revision', 'str', null),
  flag('tokenizer_revision', 'str', null),
  flag('hf_token', 'str', null),
  flag('quantization', 'str', null, { short: '-q' }),
  flag('enforce_eager', 'bool', false),
  flag('max_logprobs', 'int', 20),
  flag('served_model_name', 'str', null, { nargs: '+' }),
  flag('generation_config', 'str', 'auto'),
  flag('override_generation_config', 'json', {}),
  flag('enable_sleep_mode', 'bool', false),
  flag('distributed_executor_backend', 'str', null),
  flag('pipeline_parallel_size', 'int', 1, { short: '-pp' }),
  flag('tensor_parallel_size', 'int', 1, { short: '-tp' }),
  flag('data_parallel_size', 'int', 1, { short: '-dp' }),
  flag('enable_expert_parallel', 'bool', false),
  flag('block_size', 'int', null),
  flag('gpu_memory_utilization', 'float', 0.92),
  flag('kv_cache_memory_bytes', 'human_int', null),
  flag('kv_cache_dtype', 'str', 'auto'),
  flag('enable_prefix_caching', 'bool', null),
  flag('cpu_offload_gb', 'float', 0),
  flag('max_num_batched_tokens', 'human_int', null),
  flag('max_num_seqs', 'int', null),
  flag('enable_chunked_prefill', 'bool', null),
  flag('async_scheduling', 'bool', null),
  flag('disable_log_stats', 'store_true', false),
  flag('enable_lora', 'bool', null),
  flag('max_loras', 'int', 1),
  flag('max_lora_rank', 'int', 16, { choices: MAX_LORA_RANKS }),
  flag('max_cpu_loras', 'int', null),
  flag('fully_sharded_loras', 'bool', false),
  // ObservabilityConfig
  flag('otlp_traces_endpoint', 'str', null),
  flag('collect_detailed_traces', 'str', null, { nargs: '+' }),
  flag('speculative_config', 'json', null),
  flag('compilation_config', 'json', null),
  flag('limit_mm_per_prompt', 'json', null),
  flag('reasoning_parser', 'str', ''),
  flag('enable_prompt_embeds', 'bool', false),
  flag('shutdown_timeout', 'int', 0),
  // AsyncEngineArgs
  flag('enable_log_requests', 'bool', false),
];

/** A static LoRA adapter from --lora-modules. */
export interface LoraModule {
  name: string;
  path: string;
  base_model_name: string | null;
}

/** The parsed, resolved configuration the simulator runs with. */
export interface ServeArgs {
  /** `serve` (vllm serve) or `api_server` (python -m vllm.entrypoints.openai.api_server). */
  entrypoint: 'serve' | 'api_server';
  model: string;
  servedModelNames: string[];
  host: string | null;
  port: number;
  uds: string | null;
  rootPath: string;
  maxModelLen: number;
  maxNumSeqs: number;
  tensorParallelSize: number;
  pipelineParallelSize: number;
  dataParallelSize: number;
  gpuMemoryUtilization: number;
  apiKeys: string[];
  loraModules: LoraModule[];
  enableLora: boolean;
  enableSleepMode: boolean;
  enableLogRequests: boolean;
  disableLogStats: boolean;
  enableForceIncludeUsage: boolean;
  enablePromptTokensDetails: boolean;
  enableRequestIdHeaders: boolean;
  enableServerLoadTracking: boolean;
  /** --otlp-traces-endpoint: tracing on (the simulator exports no spans). */
  otlpTracesEndpoint: string | null;
  disableFastapiDocs: boolean;
  disableUvicornAccessLog: boolean;
  disableAccessLogForEndpoints: string[];
  uvicornLogLevel: string;
  allowedOrigins: string[];
  allowedMethods: string[];
  allowedHeaders: string[];
  allowCredentials: boolean;
  shutdownTimeout: number;
  fingerprintMode: string;
  fingerprintValue: string | null;
  /** Python-style `non-default args: {...}` dict, api_key redacted. */
  nonDefaultArgs: string;
}

/** What the command line asks for: run the server, or exit after printing something. */
export type CliOutcome =
  | { kind: 'serve'; args: ServeArgs; warnings: CliWarning[] }
  | { kind: 'exit'; code: number; stdout: string; stderr: string; warnings: CliWarning[] };

/** A WARNING record logged before the server starts (before log decoration). */
export interface CliWarning {
  fileinfo: string;
  message: string;
}

const TOP_USAGE =
  'usage: vllm [-h] [-v] {chat,complete,serve,launch,bench,collect-env,run-batch} ...\n';
const SERVE_USAGE = 'usage: vllm serve [model_tag] [options]\n';
const API_SERVER_USAGE = 'usage: api_server.py [model_tag] [options]\n';
export const SIM_VLLM_VERSION = '0.27.0';

/** An argparse error: `prog: error: <message>`, exit status 2. */
export class ArgumentError extends Error {}

const NEGATIVE_NUMBER = /^-\d+$|^-\d*\.\d+$/;

function looksLikeOption(arg: string): boolean {
  return arg.startsWith('-') && arg.length > 1 && !NEGATIVE_NUMBER.test(arg);
}

/** argparse's name for an action in messages: its option strings joined with `/`. */
function actionName(spec: FlagSpec): string {
  return spec.flags.join('/');
}

/** vllm's human_readable_int: `8k` = 8000, `8K` = 8192, `25.6k` = 25600. */
export function humanReadableInt(raw: string): number {
  const value = raw.trim();
  const match = /^(\d+(?:\.\d+)?)([kKmMgGtT])$/.exec(value);
  if (match) {
    const [, number, suffix] = match;
    const decimal: Record<string, number> = { k: 1e3, m: 1e6, g: 1e9, t: 1e12 };
    if (suffix in decimal) return Math.trunc(Number(number) * decimal[suffix]);
    if (number.includes('.')) {
      throw new ArgumentError(
        `Decimals are not allowed with binary suffixes like ${suffix}. ` +
          `Did you mean to use ${number}${suffix.toLowerCase()} instead?`,
      );
    }
    const binary: Record<string, number> = { K: 2 ** 10, M: 2 ** 20, G: 2 ** 30, T: 2 ** 40 };
    return Number(number) * binary[suffix];
  }
  return parsePythonInt(value);
}

/** A value Python's int()/float() rejects; argparse names the type function in its message. */
class InvalidValue extends Error {}

function parsePythonInt(raw: string): number {
  const text = raw.trim().replace(/_/g, '');
  if (!/^[+-]?\d+$/.test(text)) throw new InvalidValue(raw);
  return Number(text);
}

/** Runs a type conversion; a rejected value reads `invalid <type> value: '<raw>'`. */
function typed<T>(typeName: string, raw: string, convert: () => T): T {
  try {
    return convert();
  } catch (e) {
    if (e instanceof InvalidValue) {
      throw new ArgumentError(`invalid ${typeName} value: ${pyStr(raw)}`);
    }
    throw e;
  }
}

function convertValue(spec: FlagSpec, raw: string): unknown {
  let value: unknown;
  switch (spec.kind) {
    case 'int':
      value = typed('int', raw, () => parsePythonInt(raw));
      break;
    case 'float': {
      const text = raw.trim().toLowerCase();
      const special: Record<string, number> = { inf: Infinity, '-inf': -Infinity, nan: NaN };
      if (text in special) value = new PyFloat(special[text]);
      else if (/^[+-]?(\d+\.?\d*|\.\d+)(e[+-]?\d+)?$/.test(text)) value = new PyFloat(Number(text));
      else throw new ArgumentError(`invalid float value: ${pyStr(raw)}`);
      break;
    }
    case 'human_int':
      value = typed('human_readable_int', raw, () => humanReadableInt(raw));
      break;
    case 'human_int_or_auto':
      value = typed('human_readable_int_or_auto', raw, () =>
        raw.trim() === '-1' || raw.trim().toLowerCase() === 'auto' ? -1 : humanReadableInt(raw),
      );
      break;
    case 'json':
      try {
        value = JSON.parse(raw);
      } catch {
        throw new ArgumentError(`invalid loads value: ${pyStr(raw)}`);
      }
      break;
    default:
      value = raw;
  }
  if (spec.choices) {
    const comparable = value instanceof PyFloat ? value.value : value;
    if (!spec.choices.includes(comparable as string | number)) {
      throw new ArgumentError(
        `invalid choice: ${pyRepr(value)} (choose from ${spec.choices.join(', ')})`,
      );
    }
  }
  return value;
}

/** LoRAParserAction: `name=path` (old format) or JSON `{"name","path","base_model_name"}`. */
function parseLoraModules(items: string[], fail: (message: string) => never): LoraModule[] {
  const modules: LoraModule[] = [];
  for (const item of items) {
    if (!item) continue;
    if (item.includes('=') && !item.includes(',')) {
      // LoRAParserAction: `name, path = item.split("=")`, an uncaught ValueError for a second "=".
      const parts = item.split('=');
      if (parts.length !== 2) throw new CliValueError('too many values to unpack (expected 2)');
      const [name, path] = parts;
      modules.push({ name, path, base_model_name: null });
      continue;
    }
    let parsed: unknown;
    try {
      parsed = JSON.parse(item);
    } catch {
      fail(`Invalid JSON format for --lora-modules: ${item}`);
    }
    const obj = parsed as Record<string, unknown>;
    if (typeof obj !== 'object' || obj === null || !obj.name || !obj.path) {
      fail(
        `Invalid fields for --lora-modules: ${item} - LoRAModulePath.__init__() missing ` +
          `required positional arguments`,
      );
    }
    modules.push({
      name: String(obj.name),
      path: String(obj.path),
      base_model_name: typeof obj.base_model_name === 'string' ? obj.base_model_name : null,
    });
  }
  return modules;
}

/** Flags the FlexibleArgumentParser pre-pass understands: `--a_b` → `--a-b` in the key. */
function normalizeUnderscores(arg: string): string {
  if (!arg.startsWith('--')) return arg;
  const eq = arg.indexOf('=');
  const key = eq === -1 ? arg : arg.slice(0, eq);
  const rest = eq === -1 ? '' : arg.slice(eq);
  const dot = key.indexOf('.');
  const head = dot === -1 ? key : key.slice(0, dot);
  const tail = dot === -1 ? '' : key.slice(dot);
  return head.replace(/_/g, '-') + tail + rest;
}

export interface ParseState {
  ns: Record<string, unknown>;
  positionals: string[];
  unrecognized: string[];
}

/** argparse's parse_known_args over a list of FlagSpecs (shared with the SGLang mode). */
export class Parser {
  private readonly optionMap = new Map<string, FlagSpec>();

  constructor(private readonly specs: FlagSpec[]) {
    for (const spec of specs) for (const f of spec.flags) this.optionMap.set(f, spec);
  }

  /** Exact match, else argparse allow_abbrev: a unique prefix of a `--` option string. */
  private resolve(option: string): FlagSpec | undefined {
    const exact = this.optionMap.get(option);
    if (exact || !option.startsWith('--')) return exact;
    const matches = [...this.optionMap.keys()].filter((f) => f.startsWith(option));
    if (matches.length > 1) {
      throw new ArgumentError(`ambiguous option: ${option} could match ${matches.join(', ')}`);
    }
    return matches.length === 1 ? this.optionMap.get(matches[0]) : undefined;
  }

  parse(argv: string[]): ParseState {
    const ns: Record<string, unknown> = {};
    for (const spec of this.specs) ns[spec.dest] = spec.default;
    const state: ParseState = { ns, positionals: [], unrecognized: [] };
    let i = 0;
    while (i < argv.length) {
      const arg = argv[i];
      if (arg === '--') {
        state.positionals.push(...argv.slice(i + 1));
        break;
      }
      if (!looksLikeOption(arg)) {
        state.positionals.push(arg);
        i += 1;
        continue;
      }
      const eq = arg.indexOf('=');
      const option = eq === -1 ? arg : arg.slice(0, eq);
      const explicit = eq === -1 ? undefined : arg.slice(eq + 1);
      const spec = this.resolve(option);
      if (!spec) {
        state.unrecognized.push(arg);
        i += 1;
        continue;
      }
      const matched = spec.flags.find((f) => f.startsWith(option)) ?? option;
      i = this.consume(spec, matched, explicit, argv, i + 1, ns);
    }
    return state;
  }

  /** Applies one option; returns the index of the next unconsumed argument. */
  private consume(
    spec: FlagSpec,
    matched: string,
    explicit: string | undefined,
    argv: string[],
    next: number,
    ns: Record<string, unknown>,
  ): number {
    const fail = (message: string): never => {
      throw new ArgumentError(`argument ${actionName(spec)}: ${message}`);
    };
    if (spec.kind === 'bool' || spec.kind === 'store_true') {
      if (explicit !== undefined) fail(`ignored explicit argument ${pyStr(explicit)}`);
      ns[spec.dest] = !matched.startsWith('--no-');
      return next;
    }
    let values: string[];
    if (explicit !== undefined) {
      values = [explicit];
    } else {
      let end = next;
      const limit = spec.nargs ? argv.length : next + 1;
      while (end < limit && end < argv.length && !looksLikeOption(argv[end])) end += 1;
      values = argv.slice(next, end);
      if (values.length === 0 && spec.nargs !== '*') {
        fail(spec.nargs === '+' ? 'expected at least one argument' : 'expected one argument');
      }
      next = end;
    }
    if (spec.kind === 'lora') {
      ns[spec.dest] = parseLoraModules(values, (message) => {
        throw new ArgumentError(message);
      });
      return next;
    }
    const converted = values.map((v) => {
      try {
        return convertValue(spec, v);
      } catch (e) {
        return fail((e as Error).message);
      }
    });
    if (spec.append) ns[spec.dest] = [...(ns[spec.dest] as unknown[]), converted[0]];
    else ns[spec.dest] = spec.nargs ? converted : converted[0];
    return next;
  }
}

const serveParser = new Parser(FLAG_SPECS);

/** A parsed flag's value as JSON has it (a PyFloat as its number). */
export function plain(value: unknown): unknown {
  return value instanceof PyFloat ? value.value : value;
}

/** `non-default args: {...}` as get_non_default_args + redact_sensitive_args print it. */
function formatNonDefaultArgs(ns: Record<string, unknown>, modelTag: string | null): string {
  const diff: Record<string, unknown> = {};
  if (modelTag !== null) diff.model_tag = modelTag;
  for (const spec of FLAG_SPECS) {
    const value = ns[spec.dest];
    if (JSON.stringify(plain(value)) === JSON.stringify(plain(spec.default))) continue;
    if (spec.dest === 'api_key' || spec.dest === 'hf_token') diff[spec.dest] = '***';
    else if (spec.kind === 'lora') {
      diff[spec.dest] = (value as LoraModule[]).map(
        (m) =>
          new PyRaw(
            `LoRAModulePath(name=${pyStr(m.name)}, path=${pyStr(m.path)}, ` +
              `base_model_name=${pyRepr(m.base_model_name)})`,
          ),
      );
    } else diff[spec.dest] = value;
  }
  return pyRepr(diff);
}

function toServeArgs(
  ns: Record<string, unknown>,
  entrypoint: 'serve' | 'api_server',
  modelTag: string | null,
): ServeArgs {
  const str = (dest: string): string | null => (ns[dest] as string | null) ?? null;
  const num = (dest: string): number => plain(ns[dest]) as number;
  const bool = (dest: string): boolean => Boolean(ns[dest]);
  const model = str('model') ?? DEFAULT_MODEL;
  const envKey = process.env.VLLM_API_KEY;
  const cliKeys = (ns.api_key as string[] | null) ?? [];
  const maxModelLen = ns.max_model_len as number | null;
  return {
    entrypoint,
    model,
    servedModelNames: (ns.served_model_name as string[] | null) ?? [model],
    host: str('host'),
    port: num('port'),
    uds: str('uds'),
    rootPath: str('root_path') ?? '',
    maxModelLen: maxModelLen === null || maxModelLen === -1 ? DEFAULT_MAX_MODEL_LEN : maxModelLen,
    maxNumSeqs: (ns.max_num_seqs as number | null) ?? DEFAULT_MAX_NUM_SEQS,
    tensorParallelSize: num('tensor_parallel_size'),
    pipelineParallelSize: num('pipeline_parallel_size'),
    dataParallelSize: num('data_parallel_size'),
    gpuMemoryUtilization: num('gpu_memory_utilization'),
    apiKeys: (cliKeys.length ? cliKeys : [envKey ?? '']).filter((k) => k),
    loraModules: (ns.lora_modules as LoraModule[] | null) ?? [],
    enableLora: bool('enable_lora'),
    enableSleepMode: bool('enable_sleep_mode'),
    enableLogRequests: bool('enable_log_requests'),
    disableLogStats: bool('disable_log_stats'),
    enableForceIncludeUsage: bool('enable_force_include_usage'),
    enablePromptTokensDetails: bool('enable_prompt_tokens_details'),
    enableRequestIdHeaders: bool('enable_request_id_headers'),
    enableServerLoadTracking: bool('enable_server_load_tracking'),
    otlpTracesEndpoint: str('otlp_traces_endpoint'),
    disableFastapiDocs: bool('disable_fastapi_docs'),
    disableUvicornAccessLog: bool('disable_uvicorn_access_log'),
    disableAccessLogForEndpoints: (str('disable_access_log_for_endpoints') ?? '')
      .split(',')
      .map((p) => p.trim())
      .filter((p) => p),
    uvicornLogLevel: str('uvicorn_log_level') ?? 'info',
    allowedOrigins: ns.allowed_origins as string[],
    allowedMethods: ns.allowed_methods as string[],
    allowedHeaders: ns.allowed_headers as string[],
    allowCredentials: bool('allow_credentials'),
    shutdownTimeout: num('shutdown_timeout'),
    fingerprintMode: str('fingerprint_mode') ?? 'full',
    fingerprintValue: str('fingerprint_value'),
    nonDefaultArgs: formatNonDefaultArgs(ns, modelTag),
  };
}

const MODEL_DEPRECATION =
  'With `vllm serve`, you should provide the model as a positional argument or in a config ' +
  'file instead of via the `--model` option. The `--model` option will be removed in a ' +
  'future version.';

export const MISSING_MODEL_MESSAGE =
  '`model` should be provided as the first positional argument when using `vllm serve`. ' +
  'i.e. `vllm serve <model> --<arg> <value>`.';

/** Raised for the ValueError that FlexibleArgumentParser raises (uncaught → exit status 1). */
export class CliValueError extends Error {}
/** Where vLLM's validate_parsed_serve_args raises TypeError (after parsing, before anything runs). */
export class CliTypeError extends Error {}

/**
 * validate_parsed_serve_args (vllm/entrypoints/openai/cli_args.py): flag combinations vLLM refuses
 * with a TypeError. The first message is vLLM's; the other two follow its pattern.
 */
function validateParsedServeArgs(ns: Record<string, unknown>): void {
  if (ns.enable_auto_tool_choice && !ns.tool_call_parser) throw new CliTypeError('Error: --enable-auto-tool-choice requires --tool-call-parser');
  if (ns.enable_log_outputs && !ns.enable_log_requests) throw new CliTypeError('Error: --enable-log-outputs requires --enable-log-requests');
  if (ns.enable_per_request_metrics && ns.disable_log_stats) {
    throw new CliTypeError('Error: --enable-per-request-metrics cannot be used with --disable-log-stats');
  }
}

/**
 * Parses argv (without `node main.js`). `serve ...` behaves like `vllm serve`; anything else like
 * `python -m vllm.entrypoints.openai.api_server`, where a positional model is ignored.
 * Throws CliValueError where vLLM raises ValueError.
 */
export function parseCli(argvIn: string[]): CliOutcome {
  const warnings: CliWarning[] = [];
  let argv = [...argvIn];
  const entrypoint = argv[0] === 'serve' ? 'serve' : 'api_server';
  const prog = entrypoint === 'serve' ? 'vllm serve' : 'api_server.py';
  const usage = entrypoint === 'serve' ? SERVE_USAGE : API_SERVER_USAGE;
  const exit = (code: number, stdout: string, stderr: string): CliOutcome => ({
    kind: 'exit',
    code,
    stdout,
    stderr,
    warnings,
  });

  if (entrypoint === 'serve') {
    argv = argv.slice(1);
    const modelIdx = argv.findIndex((a) => /^--model(=.+|$)/.test(a));
    if (modelIdx !== -1) {
      warnings.push({ fileinfo: 'argparse_utils.py:254', message: MODEL_DEPRECATION });
      let modelTag: string;
      let restStart: number;
      if (argv[modelIdx] === '--model') {
        if (modelIdx + 1 >= argv.length || argv[modelIdx + 1].startsWith('-')) {
          return exit(2, '', `${TOP_USAGE}vllm: error: argument --model: expected one argument\n`);
        }
        modelTag = argv[modelIdx + 1];
        restStart = modelIdx + 2;
      } else {
        modelTag = argv[modelIdx].slice('--model='.length);
        restStart = modelIdx + 1;
      }
      argv = [modelTag, ...argv.slice(0, modelIdx), ...argv.slice(restStart)];
    }
    if (
      argv.length > 0 &&
      argv[0].startsWith('-') &&
      !argv.some((a) => /^--config(=.+|$)/.test(a)) &&
      argv.some((a) => /^--served[-_]model[-_]name(=.+|$)/.test(a))
    ) {
      throw new CliValueError(MISSING_MODEL_MESSAGE);
    }
  }
  if (argv[0] === '-v' || argv[0] === '--version') return exit(0, `${SIM_VLLM_VERSION}\n`, '');
  if (argv.some((a) => a === '-h' || a === '--help' || a.startsWith('--help='))) {
    return exit(0, `${usage}\nvLLM simulator: see tools/vllm-sim/README.md for the flags.\n`, '');
  }

  const normalized = argv.map(normalizeUnderscores);
  const seen = new Set<string>();
  const duplicates = new Set<string>();
  for (const a of normalized) {
    if (!a.startsWith('--') || a.includes('.')) continue;
    const name = a.split('=')[0];
    if (seen.has(name)) duplicates.add(name);
    seen.add(name);
  }
  if (duplicates.size) {
    warnings.push({
      fileinfo: 'argparse_utils.py:395',
      message: `Found duplicate keys ${[...duplicates].join(', ')}`,
    });
  }

  let state: ParseState;
  try {
    state = serveParser.parse(normalized);
  } catch (e) {
    if (!(e instanceof ArgumentError)) throw e;
    return exit(2, '', `${usage}${prog}: error: ${e.message}\n`);
  }
  // model_tag is nargs='?': one positional; any further ones are unrecognized.
  const [modelTag = null, ...extraPositionals] = state.positionals;
  const unrecognized = [...state.unrecognized, ...extraPositionals];
  if (unrecognized.length) {
    const topUsage = entrypoint === 'serve' ? TOP_USAGE : usage;
    const topProg = entrypoint === 'serve' ? 'vllm' : prog;
    return exit(2, '', `${topUsage}${topProg}: error: unrecognized arguments: ${unrecognized.join(' ')}\n`);
  }
  if (entrypoint === 'serve' && modelTag !== null) state.ns.model = modelTag;
  validateParsedServeArgs(state.ns);
  return { kind: 'serve', args: toServeArgs(state.ns, entrypoint, modelTag), warnings };
}
