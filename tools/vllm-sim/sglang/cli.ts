/**
 * `sglang serve` command line (python/sglang/cli/serve.py, python/sglang/srt/server_args.py):
 * a plain argparse.ArgumentParser(prog="sglang serve") — `--model-path` required, dashes only
 * (no `--a_b` spellings), store_true booleans without a `--no-` form, unique-prefix
 * abbreviations, `nargs="*"` lists, argparse's error texts and exit status 2. A positional first
 * argument becomes `--model-path`.
 */
import { ArgumentError, FlagSpec, Kind, ParseState, Parser, plain } from '../cli';
import { PyFloat, pyRepr } from '../python-format';

/** The simulated model's context length when --context-length is not given. */
export const SGLANG_DEFAULT_CONTEXT_LENGTH = 4096;
/** max_running_requests when SGLang would derive it from the KV cache ("auto"). */
export const SGLANG_DEFAULT_MAX_RUNNING_REQUESTS = 2048;
/** mem_fraction_static when SGLang would derive it from the GPU ("auto"). */
export const SGLANG_DEFAULT_MEM_FRACTION = 0.88;
/** chunked_prefill_size when SGLang would derive it from the GPU ("auto"). */
export const SGLANG_DEFAULT_CHUNKED_PREFILL = 8192;
/** The SGLang version the simulator reports (/server_info). */
export const SIM_SGLANG_VERSION = '0.5.12';

const PROG = 'sglang serve';
const DTYPE_CHOICES = ['auto', 'half', 'float16', 'bfloat16', 'float', 'float32'] as const;

function opt(dest: string, kind: Kind, defaultValue: unknown, extra: Partial<FlagSpec> = {}): FlagSpec {
  return { dest, kind, default: defaultValue, flags: [`--${dest.replace(/_/g, '-')}`], ...extra };
}

/**
 * A curated subset of ServerArgs, in registration order (also the order of the
 * `server_args=ServerArgs(...)` log line). Flags without a simulated effect are still accepted.
 */
const SPECS: FlagSpec[] = [
  opt('model_path', 'str', null, { flags: ['--model-path', '--model'] }),
  opt('tokenizer_path', 'str', null),
  opt('tokenizer_mode', 'str', 'auto'),
  opt('tokenizer_worker_num', 'int', 1),
  opt('skip_tokenizer_init', 'store_true', false),
  opt('load_format', 'str', 'auto'),
  opt('trust_remote_code', 'store_true', false),
  opt('context_length', 'human_int', null),
  opt('is_embedding', 'store_true', false),
  opt('revision', 'str', null),
  opt('config', 'str', null),
  opt('host', 'str', '127.0.0.1'),
  opt('port', 'int', 30000),
  opt('dtype', 'str', 'auto', { choices: DTYPE_CHOICES }),
  opt('quantization', 'str', null),
  opt('kv_cache_dtype', 'str', 'auto'),
  opt('mem_fraction_static', 'float', null),
  opt('max_running_requests', 'int', null),
  opt('max_queued_requests', 'int', null),
  opt('max_total_tokens', 'int', null),
  opt('chunked_prefill_size', 'int', null),
  opt('max_prefill_tokens', 'int', 16384),
  opt('schedule_policy', 'str', 'fcfs'),
  opt('page_size', 'int', null),
  opt('device', 'str', null),
  opt('tp_size', 'int', 1, { flags: ['--tp-size', '--tensor-parallel-size'] }),
  opt('pp_size', 'int', 1, { flags: ['--pp-size', '--pipeline-parallel-size'] }),
  opt('dp_size', 'int', 1, { flags: ['--dp-size', '--data-parallel-size'] }),
  opt('ep_size', 'int', 1, { flags: ['--ep-size', '--expert-parallel-size'] }),
  opt('stream_interval', 'int', 1),
  opt('random_seed', 'int', null),
  opt('watchdog_timeout', 'float', new PyFloat(300)),
  opt('served_model_name', 'str', null),
  opt('weight_version', 'str', 'default'),
  opt('chat_template', 'str', null),
  opt('completion_template', 'str', null),
  opt('reasoning_parser', 'str', null),
  opt('tool_call_parser', 'str', null),
  opt('log_level', 'str', 'info'),
  opt('log_level_http', 'str', null),
  opt('log_requests', 'store_true', false),
  opt('log_requests_level', 'int', 2),
  opt('uvicorn_access_log_exclude_prefixes', 'str', [], { nargs: '*' }),
  opt('show_time_cost', 'store_true', false),
  opt('enable_metrics', 'store_true', false),
  opt('enable_cache_report', 'store_true', false),
  opt('decode_log_interval', 'int', 40),
  opt('api_key', 'str', null),
  opt('admin_api_key', 'str', null),
  opt('allow_auto_truncate', 'store_true', false),
  opt('enable_lora', 'store_true', null),
  opt('max_lora_rank', 'int', null),
  opt('lora_target_modules', 'str', null, { nargs: '*' }),
  opt('lora_paths', 'str', null, { nargs: '*' }),
  opt('max_loaded_loras', 'int', null),
  opt('max_loras_per_batch', 'int', 8),
  opt('lora_backend', 'str', 'csgmv'),
  opt('attention_backend', 'str', null),
  opt('sampling_backend', 'str', null),
  opt('grammar_backend', 'str', null),
  opt('disable_radix_cache', 'store_true', false),
  opt('disable_cuda_graph', 'store_true', false),
  opt('cuda_graph_max_bs', 'int', null),
  opt('disable_overlap_schedule', 'store_true', false),
  opt('enable_mixed_chunk', 'store_true', false),
  opt('enable_dp_attention', 'store_true', false),
  opt('enable_torch_compile', 'store_true', false),
  opt('enable_memory_saver', 'store_true', false),
  opt('enable_weights_cpu_backup', 'store_true', false),
  opt('skip_server_warmup', 'store_true', false),
  opt('warmups', 'str', null),
  opt('nnodes', 'int', 1),
  opt('node_rank', 'int', 0),
  opt('dist_init_addr', 'str', null),
];

/** A LoRA adapter from --lora-paths (`PATH`, `NAME=PATH` or a JSON object). */
export interface LoraPath {
  lora_name: string;
  lora_path: string;
  pinned: boolean;
}

/** The resolved configuration the SGLang mode runs with. */
export interface SglangArgs {
  modelPath: string;
  tokenizerPath: string;
  servedModelName: string;
  host: string;
  port: number;
  tpSize: number;
  ppSize: number;
  dpSize: number;
  memFractionStatic: number;
  contextLength: number;
  /** --is-embedding: the model embeds (/v1/embeddings, /encode …) and does not generate. */
  isEmbedding: boolean;
  maxRunningRequests: number;
  maxQueuedRequests: number | null;
  maxTotalTokens: number | null;
  chunkedPrefillSize: number;
  maxPrefillTokens: number;
  apiKey: string | null;
  adminApiKey: string | null;
  dtype: string;
  enableLora: boolean;
  loraPaths: LoraPath[];
  maxLorasPerBatch: number;
  maxLoraRank: number | null;
  maxLoadedLoras: number | null;
  enableMetrics: boolean;
  logLevel: string;
  logLevelHttp: string | null;
  logRequests: boolean;
  skipServerWarmup: boolean;
  enableMemorySaver: boolean;
  enableWeightsCpuBackup: boolean;
  disableRadixCache: boolean;
  accessLogExcludePrefixes: string[];
  weightVersion: string;
  /** Every ServerArgs field the simulator knows, resolved (for the log line and /server_info). */
  fields: Record<string, unknown>;
}

export type SglangCliOutcome =
  | { kind: 'serve'; args: SglangArgs }
  | { kind: 'exit'; code: number; stdout: string; stderr: string };

/** An exception argparse does not turn into `error:` (uncaught in SGLang: traceback, exit 1). */
export class SglangCliException extends Error {}

const parser = new Parser(SPECS);

/** argparse's usage line for `sglang serve` (width 78, as under a pipe). */
export function usageText(): string {
  const parts: string[] = ['[-h]'];
  for (const spec of SPECS) {
    const flag = spec.flags[0];
    const metavar = spec.choices ? `{${spec.choices.join(',')}}` : spec.dest.toUpperCase();
    if (spec.kind === 'store_true') parts.push(`[${flag}]`);
    else if (spec.dest === 'model_path') parts.push(flag, metavar);
    else if (spec.nargs === '*') parts.push(`[${flag} [${metavar} ...]]`);
    else parts.push(`[${flag} ${metavar}]`);
  }
  const width = 78;
  const prefix = 'usage: ';
  const indent = ' '.repeat(prefix.length + PROG.length + 1);
  const lines: string[] = [];
  let line: string[] = [];
  let lineLen = prefix.length - 1;
  for (const part of [PROG, ...parts]) {
    if (lineLen + 1 + part.length > width && line.length) {
      lines.push(indent + line.join(' '));
      line = [];
      lineLen = indent.length - 1;
    }
    line.push(part);
    lineLen += part.length + 1;
  }
  if (line.length) lines.push(indent + line.join(' '));
  lines[0] = lines[0].slice(indent.length);
  return `${prefix}${lines.join('\n')}\n`;
}

function argparseError(message: string): SglangCliOutcome {
  return { kind: 'exit', code: 2, stdout: '', stderr: `${usageText()}${PROG}: error: ${message}\n` };
}

/** LoRAPathAction + ServerArgs: `PATH` (name = path), `NAME=PATH`, or JSON. */
function parseLoraPaths(items: string[]): LoraPath[] {
  return items.map((raw) => {
    const item = raw.trim();
    if (item.startsWith('{') && item.endsWith('}')) {
      let obj: Record<string, unknown>;
      try {
        obj = JSON.parse(item) as Record<string, unknown>;
      } catch (error) {
        throw new SglangCliException(`json.decoder.JSONDecodeError: ${(error as Error).message}`);
      }
      if (!('lora_path' in obj) || !('lora_name' in obj)) {
        throw new SglangCliException(
          `AssertionError: ${pyRepr(item)} looks like a JSON str, but it does not contain ` +
            `'lora_name' and 'lora_path' keys.`,
        );
      }
      return {
        lora_name: String(obj.lora_name),
        lora_path: String(obj.lora_path),
        pinned: obj.pinned === true,
      };
    }
    const eq = item.indexOf('=');
    if (eq !== -1) return { lora_name: item.slice(0, eq), lora_path: item.slice(eq + 1), pinned: false };
    return { lora_name: item, lora_path: item, pinned: false };
  });
}

function resolve(state: ParseState): SglangArgs {
  const ns = state.ns;
  const str = (dest: string): string | null => (ns[dest] as string | null) ?? null;
  const int = (dest: string): number | null => (plain(ns[dest]) as number | null) ?? null;
  const modelPath = str('model_path') as string;
  const loraPaths = parseLoraPaths((ns.lora_paths as string[] | null) ?? []);
  const memFraction = (plain(ns.mem_fraction_static) as number | null) ?? SGLANG_DEFAULT_MEM_FRACTION;
  const fields: Record<string, unknown> = { ...ns };
  fields.tokenizer_path = str('tokenizer_path') ?? modelPath;
  fields.served_model_name = str('served_model_name') ?? modelPath;
  fields.mem_fraction_static = new PyFloat(memFraction);
  fields.chunked_prefill_size = int('chunked_prefill_size') ?? SGLANG_DEFAULT_CHUNKED_PREFILL;
  fields.enable_lora = ns.enable_lora === true || loraPaths.length > 0 ? true : ns.enable_lora;
  // ServerArgs.check_lora_server_args: LoRA with no adapter at start must know its shapes.
  const targets = ns.lora_target_modules as string[] | null;
  if (fields.enable_lora === true && loraPaths.length === 0 && !(int('max_lora_rank') && targets && targets.length > 0)) {
    throw new SglangCliException(
      'AssertionError: When no initial --lora-paths is provided, you need to specify both --max-lora-rank and --lora-target-modules for LoRA initialization.',
    );
  }
  fields.lora_paths = ns.lora_paths === null ? null : loraPaths.map((l) => ({ ...l }));
  return {
    modelPath,
    tokenizerPath: fields.tokenizer_path as string,
    servedModelName: fields.served_model_name as string,
    host: str('host') ?? '127.0.0.1',
    port: int('port') as number,
    tpSize: int('tp_size') as number,
    ppSize: int('pp_size') as number,
    dpSize: int('dp_size') as number,
    memFractionStatic: memFraction,
    contextLength: int('context_length') ?? SGLANG_DEFAULT_CONTEXT_LENGTH,
    isEmbedding: ns.is_embedding === true,
    maxRunningRequests: int('max_running_requests') ?? SGLANG_DEFAULT_MAX_RUNNING_REQUESTS,
    maxQueuedRequests: int('max_queued_requests'),
    maxTotalTokens: int('max_total_tokens'),
    chunkedPrefillSize: fields.chunked_prefill_size as number,
    maxPrefillTokens: int('max_prefill_tokens') as number,
    apiKey: str('api_key'),
    adminApiKey: str('admin_api_key'),
    dtype: str('dtype') ?? 'auto',
    enableLora: fields.enable_lora === true,
    loraPaths,
    maxLorasPerBatch: int('max_loras_per_batch') as number,
    maxLoraRank: int('max_lora_rank'),
    maxLoadedLoras: int('max_loaded_loras'),
    enableMetrics: ns.enable_metrics === true,
    logLevel: str('log_level') ?? 'info',
    logLevelHttp: str('log_level_http'),
    logRequests: ns.log_requests === true,
    skipServerWarmup: ns.skip_server_warmup === true,
    enableMemorySaver: ns.enable_memory_saver === true,
    enableWeightsCpuBackup: ns.enable_weights_cpu_backup === true,
    disableRadixCache: ns.disable_radix_cache === true,
    accessLogExcludePrefixes: (ns.uvicorn_access_log_exclude_prefixes as string[]) ?? [],
    weightVersion: str('weight_version') ?? 'default',
    fields,
  };
}

/** `server_args=ServerArgs(model_path='m', ...)`, the dataclass repr SGLang logs at start-up. */
export function serverArgsRepr(args: SglangArgs): string {
  const inner = SPECS.map((s) => `${s.dest}=${pyRepr(args.fields[s.dest])}`).join(', ');
  return `ServerArgs(${inner})`;
}

/** The ServerArgs fields as JSON values (`dataclasses.asdict(server_args)` for /server_info). */
export function serverArgsJson(args: SglangArgs): Record<string, unknown> {
  return Object.fromEntries(SPECS.map((s) => [s.dest, plain(args.fields[s.dest])]));
}

/**
 * Parses the argv after `sglang` (`serve ...`). Throws SglangCliException for the errors SGLang
 * does not route through argparse's `error()`.
 */
export function parseSglangCli(argvIn: string[]): SglangCliOutcome {
  const [command, ...rest] = argvIn;
  if (command !== 'serve') {
    if (command === '-h' || command === '--help' || command === undefined) {
      const usage = 'usage: sglang [-h] {serve} ...\n';
      return command === undefined
        ? { kind: 'exit', code: 2, stdout: '', stderr: `${usage}sglang: error: the following arguments are required: command\n` }
        : { kind: 'exit', code: 0, stdout: `${usage}\nSGLang simulator: see tools/vllm-sim/README.md.\n`, stderr: '' };
    }
    return {
      kind: 'exit',
      code: 2,
      stdout: '',
      stderr: `usage: sglang [-h] {serve} ...\nsglang: error: argument command: invalid choice: ${pyRepr(command)} (choose from serve)\n`,
    };
  }
  let argv = rest;
  if (argv.some((a) => a === '-h' || a === '--help')) {
    return { kind: 'exit', code: 0, stdout: `${usageText()}\nSGLang simulator: see tools/vllm-sim/README.md for the flags.\n`, stderr: '' };
  }
  // cli/serve.py: a positional first argument is the model.
  if (argv.length > 0 && !argv[0].startsWith('-')) argv = ['--model-path', ...argv];
  let state: ParseState;
  try {
    state = parser.parse(argv);
  } catch (error) {
    if (!(error instanceof ArgumentError)) throw error;
    return argparseError(error.message);
  }
  // parse_known_args reports missing required arguments before parse_args rejects extras.
  if (!state.ns.model_path) {
    return argparseError('the following arguments are required: --model-path/--model');
  }
  const unrecognized = [...state.unrecognized, ...state.positionals];
  if (unrecognized.length) return argparseError(`unrecognized arguments: ${unrecognized.join(' ')}`);
  return { kind: 'serve', args: resolve(state) };
}
