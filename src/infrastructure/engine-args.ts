// Turns the validated `vllm:` section into the engine's argv and extra environment.
// Flag spellings follow /work/shared/vllm-protocol.md A8 (vLLM) and Part B (SGLang).
// The config loader has already rejected anything the chosen engine cannot express.
import { normalizeFlagName, type Engine, type ExtraArgValue, type VllmConfig } from '../config/config.schema';

export interface LaunchSpec {
  command: string;
  args: string[];
  /** Only the variables tide-vllm sets; the caller merges process.env underneath. */
  env: Record<string, string>;
}

interface LaunchOptions {
  /** Key the engine requires on its guarded routes: VLLM_API_KEY for vLLM, `--api-key` for SGLang. */
  apiKey?: string;
}

export function buildLaunchSpec(vllm: VllmConfig, opts: LaunchOptions = {}): LaunchSpec {
  if (!vllm.model_path) throw new Error('vllm.model_path is not set, so tide-vllm cannot start the engine');
  const [command, ...args] = vllm.command;
  // SPT_NOENV: vLLM's processes retitle themselves (VLLM::EngineCore…) with setproctitle, which
  // otherwise overwrites /proc/PID/environ, where the orphan check looks for its launch marker (A7).
  const env: Record<string, string> = { ...vllm.env, SPT_NOENV: '1' };
  if (vllm.gpus !== undefined) env.CUDA_VISIBLE_DEVICES = vllm.gpus.join(',');
  const engineArgs = vllm.engine === 'sglang' ? sglangArgs(vllm, opts) : vllmArgs(vllm, opts, env);
  return { command, args: [...args, ...engineArgs], env };
}

function vllmArgs(vllm: VllmConfig, opts: LaunchOptions, env: Record<string, string>): string[] {
  const model = vllm.model_path as string;
  // `vllm serve MODEL`; python -m vllm.entrypoints.openai.api_server ignores a positional model (A1).
  const args = vllm.command[vllm.command.length - 1] === 'serve' ? [model] : ['--model', model];
  args.push(
    '--served-model-name', vllm.model_name,
    '--host', vllm.host,
    '--port', String(vllm.port),
    '--gpu-memory-utilization', String(vllm.gpu_memory_utilization),
    '--tensor-parallel-size', String(tensorParallelSize(vllm)),
    '--max-num-seqs', String(vllm.max_num_seqs),
    '--max-num-batched-tokens', String(vllm.max_num_batched_tokens),
    '--max-model-len', String(vllm.max_model_len),
    '--dtype', vllm.dtype,
    vllm.enable_prefix_caching ? '--enable-prefix-caching' : '--no-enable-prefix-caching',
    vllm.enable_chunked_prefill ? '--enable-chunked-prefill' : '--no-enable-chunked-prefill',
  );
  if (usesEngineSleep(vllm)) {
    args.push('--enable-sleep-mode');
    env.VLLM_SERVER_DEV_MODE = '1'; // exposes /sleep, /wake_up, /is_sleeping (A9)
  }
  const { lora } = vllm;
  if (lora.enabled) {
    args.push('--enable-lora', '--max-loras', String(lora.max_loras), '--max-lora-rank', String(lora.max_lora_rank));
    // `name=path`, or JSON for a path holding "=" (vLLM splits the old form at every "=").
    const modules = Object.entries(lora.modules).map(([name, path]) => (path.includes('=') ? JSON.stringify({ name, path }) : `${name}=${path}`));
    if (modules.length > 0) args.push('--lora-modules', ...modules);
    env.VLLM_ALLOW_RUNTIME_LORA_UPDATING = 'true'; // enables /v1/load_lora_adapter (A11)
  }
  // vLLM gives up on a model still loading after this many seconds (default 600) and exits 1
  // (A1): without it, a startup_timeout above 600 s would never be reached. One set in vllm.env, or
  // in the environment tide-vllm passes on, is the operator's.
  if (process.env.VLLM_ENGINE_READY_TIMEOUT_S === undefined) env.VLLM_ENGINE_READY_TIMEOUT_S ??= String(Math.ceil(vllm.startup_timeout));
  // In the environment, not as --api-key: any local user can read a process's argv
  // (/proc/PID/cmdline), only its owner its environment. vLLM reads it when --api-key is absent (A4).
  if (opts.apiKey) env.VLLM_API_KEY = opts.apiKey;
  args.push(...extraArgs(vllm.extra_args, 'vllm'));
  return args;
}

/**
 * SGLang equivalents (Part B). max_num_batched_tokens maps to --max-prefill-tokens, SGLang's
 * token budget for one prefill batch (server_args.py: "The maximum number of tokens in a
 * prefill batch"); its default chunk size (--chunked-prefill-size) is left to SGLang.
 */
function sglangArgs(vllm: VllmConfig, opts: LaunchOptions): string[] {
  const args = [
    '--model-path', vllm.model_path as string,
    '--served-model-name', vllm.model_name,
    '--host', vllm.host,
    '--port', String(vllm.port),
    '--mem-fraction-static', String(vllm.gpu_memory_utilization),
    '--tp-size', String(tensorParallelSize(vllm)),
    '--max-running-requests', String(vllm.max_num_seqs),
    '--max-prefill-tokens', String(vllm.max_num_batched_tokens),
    '--context-length', String(vllm.max_model_len),
    '--dtype', vllm.dtype,
  ];
  if (!vllm.enable_chunked_prefill) args.push('--chunked-prefill-size', '-1');
  if (!vllm.enable_prefix_caching) args.push('--disable-radix-cache');
  if (usesEngineSleep(vllm)) {
    // release/resume_memory_occupation; level 1 keeps a CPU copy of the weights to restore on wake-up.
    args.push('--enable-memory-saver');
    if (vllm.sleep.level === 1) args.push('--enable-weights-cpu-backup');
  }
  const { lora } = vllm;
  if (lora.enabled) {
    args.push('--enable-lora', '--max-loras-per-batch', String(lora.max_loras), '--max-lora-rank', String(lora.max_lora_rank));
    const modules = loraPairs(lora.modules);
    if (modules.length > 0) args.push('--lora-paths', ...modules);
  }
  if (opts.apiKey) args.push('--api-key', opts.apiKey); // SGLang reads no key from its environment (Part B)
  args.push('--enable-metrics'); // SGLang mounts /metrics only with this flag
  args.push(...extraArgs(vllm.extra_args, 'sglang'));
  return args;
}

/** The loader resolves tensor_parallel_size; the fallback serves hand-built configs. */
function tensorParallelSize(vllm: VllmConfig): number {
  return vllm.tensor_parallel_size ?? vllm.gpus?.length ?? 1;
}

/** Sleep levels 1 and 2 use the engine's own sleep; level 3 stops the process instead. */
export function usesEngineSleep(vllm: VllmConfig): boolean {
  return vllm.sleep.idle_seconds > 0 && (vllm.sleep.level === 1 || vllm.sleep.level === 2);
}

function loraPairs(modules: Record<string, string>): string[] {
  return Object.entries(modules).map(([name, path]) => `${name}=${path}`);
}

/** vLLM booleans that are plain store_true, with no `--no-` form (A8). */
const VLLM_STORE_TRUE_FLAGS = new Set(['disable-log-stats']);

/**
 * `--name value`, `--name v1 v2` for lists, `--name {json}` for a mapping, `--name` for true,
 * nothing for "" (an unset `${VAR:-}`). For false, vLLM's
 * BooleanOptionalAction flags take `--no-name`; its few store_true flags and SGLang's booleans
 * (store_true only) have no such form, so false (their default) is left out.
 */
function extraArgs(extra: Record<string, ExtraArgValue>, engine: Engine): string[] {
  const args: string[] = [];
  for (const [key, value] of Object.entries(extra)) {
    const name = normalizeFlagName(key);
    if (value === true) args.push(`--${name}`);
    else if (value === false) {
      if (engine === 'vllm' && !VLLM_STORE_TRUE_FLAGS.has(name)) args.push(`--no-${name}`);
    } else if (value === '') continue; // `${SEED:-}` unset: the flag is left out
    else if (Array.isArray(value)) args.push(`--${name}`, ...value.map(String));
    else if (typeof value === 'object') args.push(`--${name}`, JSON.stringify(value));
    else args.push(`--${name}`, String(value));
  }
  return args;
}

/** Flags followed by a secret. `--hf-token` may also stand alone (nargs "?"). */
const SECRET_FLAGS: ReadonlyMap<string, 'always' | 'unless-flag'> = new Map([
  ['--api-key', 'always'],
  ['--admin-api-key', 'always'],
  ['--hf-token', 'unless-flag'],
]);

/** Hides secrets for logs and the status API: `--api-key KEY` → `--api-key ***`, also `--api-key=KEY`. */
export function redactArgs(args: string[]): string[] {
  return args.map((arg, i) => {
    const eq = arg.indexOf('=');
    if (arg.startsWith('--') && eq > 0 && SECRET_FLAGS.has(arg.slice(0, eq))) return `${arg.slice(0, eq)}=***`;
    const valueOf = i > 0 ? SECRET_FLAGS.get(args[i - 1]) : undefined;
    if (valueOf === 'always' || (valueOf === 'unless-flag' && !arg.startsWith('--'))) return '***';
    return arg;
  });
}

/**
 * The secret values among `args` (those redactArgs hides): an engine that prints its arguments
 * (SGLang's `server_args=ServerArgs(... api_key='…')`) must not put them in tide-vllm's logs either.
 */
export function secretValues(args: string[]): string[] {
  const shown = redactArgs(args);
  return args.flatMap((arg, i) => (shown[i] === arg ? [] : [shown[i] === '***' ? arg : arg.slice(arg.indexOf('=') + 1)])).filter((value) => value.length > 0);
}
