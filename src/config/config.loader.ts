// Reads the YAML file, substitutes ${VAR}, validates every key and resolves the derived
// defaults. Pure TypeScript (no @nestjs import) so main.ts can call it before Nest boots.
import { readFileSync } from 'node:fs';
import { resolve as resolvePath } from 'node:path';
import { plainToInstance } from 'class-transformer';
import { validateSync, ValidationError } from 'class-validator';
import * as yaml from 'js-yaml';
import {
  DEFAULT_COMMANDS,
  type Engine,
  type ExtraArgValue,
  isLoopback,
  isMapping,
  LORA_NAME,
  LORA_NAME_RULE,
  MANAGED_ENV,
  MANAGED_FLAGS,
  normalizeFlagName,
  TideConfig,
  VllmConfig,
} from './config.schema';

const DEFAULT_CONFIG_PATH = 'conf/tide-vllm.yaml';
const CONFIG_PATH_ENV = 'TIDE_VLLM_CONFIG';
/** SGLang answers /health after a generation that includes a 1 s sleep; a shorter probe always fails. */
const SGLANG_MIN_HEALTH_TIMEOUT = 2;
/** vllm.health_timeout when absent: vLLM's /health answers at once; SGLang's waits up to SGLANG_HEALTH_CHECK_TIMEOUT (20 s) for its generation, which queues behind a full batch. */
const DEFAULT_HEALTH_TIMEOUT = { vllm: 3, sglang: 20 } as const;

export const USAGE = `Usage: tide-vllm serve [-c PATH | --config PATH]   (npm start -- -c PATH; node dist/src/main.js -c PATH)

Options:
  -c, --config PATH   configuration file (default: $${CONFIG_PATH_ENV}, else ${DEFAULT_CONFIG_PATH})
  -h, --help          show this help and exit`;

export interface ConfigProblem {
  /** Dotted key path, `[i]` for list items, e.g. `vllm.restart.window`, `auth.api_keys[1]`. */
  path: string;
  message: string;
}

/** Any reason the configuration cannot be used. `problems` is empty for file-level failures. */
export class ConfigError extends Error {
  constructor(
    message: string,
    readonly problems: readonly ConfigProblem[] = [],
  ) {
    super(message);
    this.name = 'ConfigError';
  }
}

/** Bad command line. The message ends with USAGE. */
export class UsageError extends Error {
  constructor(problem: string) {
    super(`${problem}\n\n${USAGE}`);
    this.name = 'UsageError';
  }
}

/**
 * The config file named by `-c PATH`, `--config PATH` or `--config=PATH` (the last one wins),
 * else $TIDE_VLLM_CONFIG, else conf/tide-vllm.yaml. `argv` is `process.argv.slice(2)`.
 * `-h`/`--help` are accepted and ignored: printing USAGE is the caller's job.
 */
export function resolveConfigPath(argv: string[], env: NodeJS.ProcessEnv): string {
  let path: string | undefined;
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    if (arg === '-h' || arg === '--help') continue;
    if (arg === '-c' || arg === '--config') {
      const value = argv[i + 1];
      if (value === undefined || value === '' || value.startsWith('-')) throw new UsageError(`${arg} needs a file path`);
      path = value;
      i++;
    } else if (arg.startsWith('--config=')) {
      path = arg.slice('--config='.length);
      if (path === '') throw new UsageError('--config= needs a file path');
    } else {
      throw new UsageError(arg.startsWith('-') ? `unknown option ${arg}` : `unexpected argument ${arg}`);
    }
  }
  return path ?? (env[CONFIG_PATH_ENV] || DEFAULT_CONFIG_PATH);
}

export function loadConfig(path: string, env: NodeJS.ProcessEnv = process.env): TideConfig {
  const text = readConfigFile(path);
  let raw: unknown;
  try {
    // CORE_SCHEMA: YAML 1.2 scalars only, so `2024-01-01` stays a string and `yes` is not a boolean.
    raw = yaml.load(text, { schema: yaml.CORE_SCHEMA, filename: path });
  } catch (error) {
    if (!(error instanceof yaml.YAMLException)) throw error;
    // Some errors have no position (several documents in the file: "expected a single document").
    const mark = error.mark as yaml.YAMLException['mark'] | undefined;
    const where = mark ? ` at line ${mark.line + 1}, column ${mark.column + 1}` : '';
    throw new ConfigError(`Invalid YAML in ${path}${where}: ${error.reason}\n${mark?.snippet ?? ''}`.trimEnd());
  }
  return parseConfig(raw, env, path);
}

/** Validates an already-parsed document (what loadConfig does after reading the YAML). */
export function parseConfig(raw: unknown, env: NodeJS.ProcessEnv = {}, sourceName = 'inline configuration'): TideConfig {
  if (raw === undefined || raw === null) raw = {};
  if (!isMapping(raw)) {
    throw report(sourceName, [
      { path: '(top level)', message: 'must be a mapping with the sections web, vllm, logging and auth' },
    ]);
  }
  const problems: ConfigProblem[] = [];
  const reservedKeys: ConfigProblem[] = [];
  const references: Reference[] = [];
  const emptied: Preparation['emptied'] = [];
  const prepared = prepare(raw, '', { env, problems, reserved: reservedKeys, references, values: 0, sourceName, emptied });
  const substitutionPaths = problems.map((problem) => problem.path);

  const config = plainToInstance(TideConfig, prepared);
  const errors = validateSync(config, { whitelist: true, forbidNonWhitelisted: true });
  for (const problem of flatten(errors, '', references)) {
    // An unset ${VAR} already explains why the value is wrong.
    if (!substitutionPaths.some((path) => overlaps(problem.path, path))) problems.push(problem);
  }
  problems.push(...unknownEmptyKeys(config, emptied, problems));
  problems.push(...crossFieldProblems(config, problems));
  // Reported last: a reserved key was dropped, so the rest of its map could still be checked.
  problems.push(...reservedKeys);
  if (problems.length > 0) throw report(sourceName, problems);
  const keyPaths = /^auth\.(api_keys|admin_api_keys)\b/;
  config.auth.keyVariables = [...new Set(references.filter((r) => keyPaths.test(r.path)).map((r) => r.name))];
  return deepFreeze(resolveDefaults(config));
}

function report(sourceName: string, problems: ConfigProblem[]): ConfigError {
  const lines = problems.map((problem) => `  - ${problem.path}: ${problem.message}`);
  return new ConfigError(`Invalid configuration in ${sourceName}:\n${lines.join('\n')}`, problems);
}

function readConfigFile(path: string): string {
  try {
    return readFileSync(path, 'utf8');
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === 'ENOENT') {
      throw new ConfigError(
        `Configuration file not found: ${path} (looked for ${resolvePath(path)}). ` +
          `Choose another file with -c PATH, --config PATH or the ${CONFIG_PATH_ENV} environment variable.`,
      );
    }
    throw new ConfigError(`Cannot read configuration file ${path}: ${(error as Error).message}`);
  }
}

// ---------------------------------------------------------------------------
// Preparation: empty values and ${VAR} substitution
// ---------------------------------------------------------------------------

/** Maps whose keys are user data: an empty value there is an error, not "use the default". */
const FREE_FORM_MAPS = new Set(['vllm.extra_args', 'vllm.env', 'vllm.lora.modules']);

/** Within a free-form map (an extra_args value's JSON too), a null is a value, not "use the default". */
function freeForm(path: string): boolean {
  for (const map of FREE_FORM_MAPS) if (path === map || path.startsWith(`${map}.`)) return true;
  return false;
}

/**
 * Keys that plainToInstance cannot copy: it crashes on `constructor`, silently drops any other
 * name of an Object.prototype member (`toString`, `valueOf`, …), and `__proto__` would set the
 * copy's prototype. No config key has such a name, and no free-form map may use one.
 */
const RESERVED_KEYS = new Set(Object.getOwnPropertyNames(Object.prototype));
const RESERVED_KEY_MESSAGE =
  'cannot be used as a key: it is reserved (a built-in name of JavaScript objects, like constructor, __proto__ and toString)';

/** A `${NAME}` and where it stands. */
interface Reference {
  path: string;
  name: string;
}

interface Preparation {
  env: NodeJS.ProcessEnv;
  problems: ConfigProblem[];
  /** Reserved keys, left out of the copy. */
  reserved: ConfigProblem[];
  /** Every `${NAME}` met. */
  references: Reference[];
  /** Values copied so far: YAML aliases can make a small file a huge tree. */
  values: number;
  sourceName: string;
  /** `key:` left empty (dropped, so the default applies): checked for being a known key after all. */
  emptied: Array<{ parent: string; key: string }>;
}

/**
 * Copies the tree, dropping `key:` with an empty (null) value so the default applies, and
 * substituting strings. Reserved keys are left out of the copy and reported in `reserved`.
 */
function prepare(value: unknown, path: string, run: Preparation): unknown {
  const { reserved } = run;
  if (++run.values > MAX_VALUES) {
    const message = `the file holds more than ${MAX_VALUES} values once its YAML aliases are expanded`;
    throw report(run.sourceName, [{ path: path || '(top level)', message }]);
  }
  if (typeof value === 'string') {
    // Every string may end up in vLLM's command line or environment, where a NUL cannot go.
    if (value.includes('\0')) run.problems.push({ path, message: 'must not contain a NUL character' });
    return substitute(value, path, run);
  }
  if (Array.isArray(value)) return value.map((item, i) => prepare(item, `${path}[${i}]`, run));
  if (!isMapping(value)) return value;
  const copy: Record<string, unknown> = {};
  for (const [key, item] of Object.entries(value)) {
    const itemPath = path ? `${path}.${key}` : key;
    if (RESERVED_KEYS.has(key)) {
      reserved.push({ path: itemPath, message: freeForm(path) ? RESERVED_KEY_MESSAGE : 'unknown key' });
    } else if (item !== null || freeForm(path)) {
      copy[key] = prepare(item, itemPath, run);
    } else {
      run.emptied.push({ parent: path, key });
    }
  }
  return copy;
}

const REFERENCE = /^([A-Za-z_][A-Za-z0-9_]*)(?::-([\s\S]*))?$/;

/** More values than any real configuration holds, far fewer than an alias bomb makes (10^8 from 500 bytes). */
const MAX_VALUES = 100_000;

/**
 * `${NAME}` → the variable (error when unset); `${NAME:-default}` → the variable, or `default`
 * when it is unset or empty (as in sh); `$${` → a literal `${`. The first `}` ends a reference.
 * On error the original text is kept.
 */
function substitute(text: string, path: string, { env, problems, references }: Preparation): string {
  let result = '';
  let failed = false;
  let i = 0;
  while (i < text.length) {
    if (text.startsWith('$${', i)) {
      result += '${';
      i += 3;
    } else if (text.startsWith('${', i)) {
      const end = text.indexOf('}', i + 2);
      if (end < 0) {
        problems.push({ path, message: 'has "${" without a closing "}" (write "$${" for a literal "${")' });
        return text;
      }
      const reference = text.slice(i + 2, end);
      const match = REFERENCE.exec(reference);
      const value = match ? env[match[1]] : undefined;
      if (match) references.push({ path, name: match[1] });
      if (!match) {
        problems.push({ path, message: `"\${${reference}}" is not a valid reference; write \${NAME} or \${NAME:-default}` });
        failed = true;
      } else if (match[2] !== undefined) {
        result += value === undefined || value === '' ? match[2] : value;
      } else if (value === undefined) {
        const name = match[1];
        problems.push({ path, message: `environment variable ${name} is not set (write \${${name}:-default} to give a default)` });
        failed = true;
      } else {
        result += value;
      }
      i = end + 1;
    } else {
      result += text[i];
      i++;
    }
  }
  return failed ? text : result;
}

// ---------------------------------------------------------------------------
// Validation
// ---------------------------------------------------------------------------

/** Keys whose values are or may hold secrets (keys, an engine's env or flags: HF_TOKEN, --hf-token): never repeated in a message. */
const SECRET_PATH = /^(?:auth\b|vllm\.api_key$|vllm\.env\b|vllm\.extra_args\b)/;
/** Longest value repeated in a message. */
const SHOWN_VALUE_CHARS = 80;

/** ` (got "80x" from ${PORT})`: the bad value as read, when it is a scalar and no secret. */
function gotValue(path: string, value: unknown, references: readonly Reference[]): string {
  if (SECRET_PATH.test(path) || !['string', 'number', 'boolean'].includes(typeof value)) return '';
  let shown = JSON.stringify(value);
  if (shown.length > SHOWN_VALUE_CHARS) shown = `${shown.slice(0, SHOWN_VALUE_CHARS - 1)}…`;
  const names = references.filter((reference) => reference.path === path).map((reference) => `\${${reference.name}}`);
  return ` (got ${shown}${names.length > 0 ? ` from ${names.join(', ')}` : ''})`;
}

function flatten(errors: ValidationError[], parent: string, references: readonly Reference[]): ConfigProblem[] {
  const problems: ConfigProblem[] = [];
  for (const error of errors) {
    const path = parent ? `${parent}.${error.property}` : error.property;
    const constraints = error.constraints ?? {};
    if ('whitelistValidation' in constraints) {
      problems.push({ path, message: isMapping(error.target) && error.target.constructor !== Object ? unknownKeyMessage(error.property, error.target) : 'unknown key' });
      continue;
    }
    // Sections also carry the `mapping` rule, whose message explains a failed nested validation better.
    const messages = Object.entries(constraints)
      .filter(([type]) => type !== 'nestedValidation')
      .map(([, message]) => message);
    const got = gotValue(path, error.value, references);
    if (messages.length > 0) problems.push(...messages.map((message) => ({ path, message: message + got })));
    else problems.push(...flatten(error.children ?? [], path, references));
  }
  return problems;
}

/**
 * Keys left empty (`max_num_seq:`) that no section has: dropped before validation so that the
 * default applies, they would otherwise pass unnoticed, misspelt. Those under a key already
 * reported (an unknown section) are not repeated.
 */
function unknownEmptyKeys(config: TideConfig, emptied: Preparation['emptied'], known: ConfigProblem[]): ConfigProblem[] {
  const problems: ConfigProblem[] = [];
  for (const { parent, key } of emptied) {
    const path = parent ? `${parent}.${key}` : key;
    if (known.some((problem) => overlaps(problem.path, path))) continue;
    let section: unknown = config;
    for (const name of parent ? parent.split('.') : []) section = isMapping(section) && Object.hasOwn(section, name) ? section[name] : undefined;
    if (isMapping(section) && !Object.hasOwn(section, key)) problems.push({ path, message: unknownKeyMessage(key, section) });
  }
  return problems;
}

/** "unknown key", with the section's key nearest in spelling when one is close (`max_num_seq` → `max_num_seqs`). */
function unknownKeyMessage(key: string, section: object): string {
  const keys = Object.keys(new (section.constructor as new () => object)());
  let best: string | undefined;
  let bestDistance = Math.max(2, Math.floor(key.length / 4)) + 1;
  for (const candidate of keys) {
    const distance = editDistance(key.toLowerCase(), candidate);
    if (distance < bestDistance) [best, bestDistance] = [candidate, distance];
  }
  return best === undefined ? 'unknown key' : `unknown key (did you mean ${best}?)`;
}

/** Levenshtein distance (insertions, deletions, substitutions). */
function editDistance(a: string, b: string): number {
  let previous = Array.from({ length: b.length + 1 }, (_, j) => j);
  for (let i = 1; i <= a.length; i++) {
    const current = [i];
    for (let j = 1; j <= b.length; j++) {
      current[j] = Math.min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (a[i - 1] === b[j - 1] ? 0 : 1));
    }
    previous = current;
  }
  return previous[b.length];
}

/** True when one path is the other, or contains it. */
function overlaps(a: string, b: string): boolean {
  const within = (inner: string, outer: string) =>
    inner === outer || inner.startsWith(`${outer}.`) || inner.startsWith(`${outer}[`);
  return within(a, b) || within(b, a);
}

/** Addresses that, connected to, reach this machine (Linux takes them as a local address). */
const WILDCARD_HOSTS: ReadonlySet<string> = new Set(['0.0.0.0', '::', '0:0:0:0:0:0:0:0']);

/** vllm.max_tokens when absent (at most half of max_model_len). */
const DEFAULT_MAX_TOKENS = 2048;
const ENV_NAME = /^[A-Za-z_][A-Za-z0-9_]*$/;
/** Lower case only: argparse matches flags case-sensitively, so `Seed` would be an unknown flag. */
const FLAG_NAME = /^[a-z0-9][a-z0-9_-]*$/;

/** Rules that involve more than one key. A rule is skipped when a key it reads is already invalid. */
function crossFieldProblems(config: TideConfig, known: ConfigProblem[]): ConfigProblem[] {
  const problems: ConfigProblem[] = [];
  const add = (path: string, message: string) => problems.push({ path, message });
  const valid = (...paths: string[]) => paths.every((path) => !known.some((problem) => overlaps(problem.path, path)));
  const { web, vllm } = config;

  if (valid('vllm.enabled', 'vllm.auto_start', 'vllm.model_path', 'vllm.model_name') && vllm.enabled) {
    if (vllm.auto_start && vllm.model_path === undefined) {
      add('vllm.model_path', 'is required when auto_start is true');
    } else if (vllm.model_path === undefined && vllm.model_name === undefined) {
      add('vllm.model_name', 'is required when auto_start is false and vllm.model_path is not set (it is the served model name)');
    }
  }
  if (valid('vllm.enabled', 'vllm.auto_start', 'vllm.sleep.idle_seconds') && vllm.enabled && !vllm.auto_start && vllm.sleep.idle_seconds > 0) {
    add('vllm.sleep.idle_seconds', 'needs vllm.auto_start: true: tide-vllm puts to sleep only a vLLM it started (it would be ignored)');
  }
  if (valid('vllm.enabled', 'vllm.auto_start', 'vllm.api_key') && vllm.enabled && vllm.auto_start && vllm.api_key !== undefined) {
    add(
      'vllm.api_key',
      'is only for a vLLM you run yourself (vllm.auto_start: false); the engine tide-vllm starts gets a fresh random key of its own when auth is on',
    );
  }
  if (valid('vllm.max_tokens', 'vllm.max_model_len') && vllm.max_tokens !== undefined && vllm.max_tokens > vllm.max_model_len) {
    add('vllm.max_tokens', `must not exceed vllm.max_model_len (${vllm.max_model_len})`);
  }
  // vLLM's SchedulerConfig.verify_max_model_len refuses to start with these (SGLang's names mean other things).
  if (vllm.engine === 'vllm' && valid('vllm.engine', 'vllm.max_num_batched_tokens', 'vllm.max_num_seqs', 'vllm.max_model_len', 'vllm.enable_chunked_prefill')) {
    if (vllm.max_num_batched_tokens < vllm.max_num_seqs) {
      add(
        'vllm.max_num_batched_tokens',
        `is ${vllm.max_num_batched_tokens}, smaller than vllm.max_num_seqs (${vllm.max_num_seqs}); vLLM refuses to start (each sequence of a batch takes at least one of its tokens)`,
      );
    }
    if (!vllm.enable_chunked_prefill && vllm.max_num_batched_tokens < vllm.max_model_len) {
      add(
        'vllm.max_num_batched_tokens',
        `is ${vllm.max_num_batched_tokens}, smaller than vllm.max_model_len (${vllm.max_model_len}) with vllm.enable_chunked_prefill: false; ` +
          'vLLM refuses to start (a whole prompt must fit in one batch): raise it, lower vllm.max_model_len, or turn chunked prefill on',
      );
    }
  }
  const { restart } = vllm;
  if (valid('vllm.restart.backoff_initial', 'vllm.restart.backoff_max') && restart.backoff_max < restart.backoff_initial) {
    add('vllm.restart.backoff_max', `must be at least vllm.restart.backoff_initial (${restart.backoff_initial})`);
  }
  if (
    valid('vllm.gpus', 'vllm.tensor_parallel_size') &&
    vllm.gpus !== undefined &&
    vllm.tensor_parallel_size !== undefined &&
    vllm.tensor_parallel_size > vllm.gpus.length
  ) {
    add('vllm.tensor_parallel_size', `is ${vllm.tensor_parallel_size} but vllm.gpus lists only ${vllm.gpus.length} GPU(s)`);
  }
  if (
    valid('vllm.enabled', 'vllm.auto_start', 'vllm.port', 'web.bind_address.port') &&
    vllm.enabled &&
    vllm.auto_start &&
    vllm.port === web.bind_address.port
  ) {
    add('vllm.port', `must differ from web.bind_address.port (${web.bind_address.port}): both listen on this machine`);
  }
  if (
    valid('vllm.enabled', 'vllm.auto_start', 'vllm.host', 'vllm.port', 'web.bind_address') &&
    vllm.enabled &&
    !vllm.auto_start &&
    vllm.port === web.bind_address.port &&
    (isLoopback(vllm.host) || WILDCARD_HOSTS.has(vllm.host) || vllm.host === web.bind_address.host)
  ) {
    add('vllm.port', `is web.bind_address.port (${web.bind_address.port}) on this machine: tide-vllm would relay every request to itself`);
  }
  if (valid('vllm.enabled', 'vllm.auto_start') && vllm.enabled && !vllm.auto_start) {
    // The engine's own settings, read only to start it: in manual mode they would be ignored
    // without a word. (vllm.command is left alone: one file may name the launcher for both modes.)
    const launchOnly: Array<[string, boolean]> = [
      ['vllm.gpus', vllm.gpus !== undefined],
      ['vllm.extra_args', isMapping(vllm.extra_args) && Object.values(vllm.extra_args).some(hasValue)],
    ];
    for (const [path, set] of launchOnly) {
      if (set && valid(path)) add(path, 'needs vllm.auto_start: true: it is how tide-vllm starts the engine (give it to the vLLM you run yourself instead)');
    }
  }
  if (
    // Also the level of POST /admin/sleep without one: refused even when tide-vllm never sleeps on its own.
    valid('vllm.engine', 'vllm.sleep.level') &&
    vllm.engine === 'sglang' &&
    vllm.sleep.level === 2
  ) {
    add(
      'vllm.sleep.level',
      'SGLang cannot discard the weights and restore them on wake-up; use level 1 (weights kept in CPU memory) or 3 (stop the engine)',
    );
  }
  if (valid('vllm.engine', 'vllm.health_timeout') && vllm.engine === 'sglang' && vllm.health_timeout < SGLANG_MIN_HEALTH_TIMEOUT) {
    add(
      'vllm.health_timeout',
      `must be at least ${SGLANG_MIN_HEALTH_TIMEOUT} with engine sglang: SGLang's /health runs a one-token generation and takes over 1 s`,
    );
  }
  if (
    valid('vllm.engine', 'vllm.lora.enabled', 'vllm.lora.modules', 'vllm.extra_args', 'vllm.auto_start') &&
    vllm.engine === 'sglang' &&
    vllm.auto_start && // a SGLang run by hand has the flags its operator gave it
    vllm.lora.enabled &&
    Object.keys(vllm.lora.modules).length === 0 &&
    !Object.entries(vllm.extra_args).some(([key, value]) => normalizeFlagName(key) === 'lora-target-modules' && hasValue(value))
  ) {
    add(
      'vllm.lora.enabled',
      'with engine sglang and no vllm.lora.modules needs vllm.extra_args.lora-target-modules (e.g. all): SGLang exits at startup without either',
    );
  }
  problems.push(...loraModuleProblems(vllm, valid), ...envProblems(vllm, valid));
  if (valid('vllm.extra_args', 'vllm.engine')) problems.push(...extraArgProblems(vllm, valid));
  return problems;
}

/** An extra_args value that puts something on the command line (false, null, "" and [] put nothing for SGLang). */
function hasValue(value: unknown): boolean {
  return value !== false && value !== null && value !== undefined && value !== '' && !(Array.isArray(value) && value.length === 0);
}

/** vllm.lora.modules: each entry a valid, non-conflicting adapter name and path. */
function loraModuleProblems(vllm: VllmConfig, valid: (...paths: string[]) => boolean): ConfigProblem[] {
  const problems: ConfigProblem[] = [];
  const add = (path: string, message: string) => problems.push({ path, message });
  if (valid('vllm.lora.modules')) {
    const modules = Object.entries(vllm.lora.modules);
    if (modules.length > 0 && valid('vllm.lora.enabled') && !vllm.lora.enabled) {
      add('vllm.lora.modules', 'needs vllm.lora.enabled: true');
    }
    if (modules.length > 0 && valid('vllm.enabled', 'vllm.auto_start') && vllm.enabled && !vllm.auto_start) {
      add('vllm.lora.modules', 'needs vllm.auto_start: true: they are loaded when tide-vllm starts vLLM (start the vLLM you run with --lora-modules instead)');
    }
    const served = vllm.model_name ?? vllm.model_path;
    for (const [name, path] of modules) {
      if (!LORA_NAME.test(name)) add(`vllm.lora.modules.${name}`, `is not a valid adapter name: ${LORA_NAME_RULE}`);
      if (name === served) add(`vllm.lora.modules.${name}`, 'is the served model\'s name (vllm.model_name): a request naming it is for the base model');
      if (typeof path !== 'string' || path.trim() === '' || path.includes(',')) {
        add(`vllm.lora.modules.${name}`, 'must be a non-empty adapter path without ","');
      }
    }
  }
  return problems;
}

/** vllm.env: names, value types, and the variables tide-vllm manages. */
function envProblems(vllm: VllmConfig, valid: (...paths: string[]) => boolean): ConfigProblem[] {
  const problems: ConfigProblem[] = [];
  const add = (path: string, message: string) => problems.push({ path, message });
  if (valid('vllm.env')) {
    const managed = valid('vllm.engine') ? MANAGED_ENV[vllm.engine] : {};
    for (const [name, value] of Object.entries(vllm.env as Record<string, unknown>)) {
      const path = `vllm.env.${name}`;
      if (!ENV_NAME.test(name)) add(path, 'is not a valid environment variable name (letters, digits and "_", not starting with a digit)');
      // vLLM reads some switches with bool(int()) ("1"), others as "true": a YAML boolean would be a guess.
      if (typeof value === 'boolean') add(path, `must be a string: quote it as the variable expects ("1"/"0" for most of vLLM's switches, or "${value}")`);
      else if (!['string', 'number'].includes(typeof value)) add(path, 'must be a string');
      if (name === 'CUDA_VISIBLE_DEVICES' && vllm.gpus !== undefined) add(path, 'conflicts with vllm.gpus; set only one of them');
      if (Object.hasOwn(managed, name)) add(path, `${name} is managed by tide-vllm (${managed[name]})`);
      // vLLM reads it with int(); tide-vllm closes idle connections to vLLM a little before it does.
      if (name === 'VLLM_HTTP_TIMEOUT_KEEP_ALIVE' && !/^\s*[1-9]\d{0,6}\s*$/.test(String(value))) add(path, 'must be a whole number of seconds, at least 1');
      // bool(int()): "true" makes vLLM fail with a ValueError once the model is loaded.
      if (name === 'VLLM_SERVER_DEV_MODE' && typeof value !== 'boolean' && !/^\s*[+-]?\d+\s*$/.test(String(value))) add(path, 'must be "1" or "0": vLLM reads it with int()');
    }
  }
  return problems;
}

function extraArgProblems(vllm: VllmConfig, valid: (...paths: string[]) => boolean): ConfigProblem[] {
  const problems: ConfigProblem[] = [];
  const add = (path: string, message: string) => problems.push({ path, message });
  const seen = new Map<string, string>();
  for (const [key, value] of Object.entries(vllm.extra_args as Record<string, unknown>)) {
    const path = `vllm.extra_args.${key}`;
    const bare = key.replace(/^--/, '');
    if (!FLAG_NAME.test(bare)) {
      const lower = bare.toLowerCase();
      add(
        path,
        FLAG_NAME.test(lower)
          ? `must be written in lower case (${lower}): engine flags are case-sensitive`
          : 'is not a valid flag name (lower-case letters, digits, "-" and "_", optionally after "--")',
      );
      continue;
    }
    const name = normalizeFlagName(key);
    const long = vllm.engine === 'vllm' ? SHORT_ALIASES.get(name) : undefined;
    if (long !== undefined) {
      // Passed as `--pp`, which vLLM's parser does not know: its aliases take one dash.
      const owner = managedFlag('vllm', long)?.owner;
      add(path, `-${name} is vLLM's short form of --${long}; ${owner?.startsWith('vllm.') ? `set ${owner}` : `write the key as ${long}`}`);
      continue;
    }
    const managed = managedFlag(vllm.engine, name);
    const earlier = seen.get(name);
    if (earlier !== undefined) add(path, `is the same flag as vllm.extra_args.${earlier}`);
    seen.set(name, key);

    if (managed !== undefined) {
      const { flag, owner } = managed;
      const subject = flag === name ? `--${name}` : `--${name} abbreviates --${flag}, which`;
      add(path, owner.startsWith('vllm.') ? `${subject} is set from ${owner}; use that key instead` : `${subject} is managed by tide-vllm (${owner})`);
    } else if (vllm.engine === 'vllm' && name === 'disable-log-requests') {
      add(path, '--disable-log-requests was removed from vLLM; request logging is off by default (enable-log-requests turns it on)');
    } else if (
      vllm.engine === 'sglang' &&
      'chunked-prefill-size'.startsWith(name) &&
      valid('vllm.enable_chunked_prefill') &&
      !vllm.enable_chunked_prefill
    ) {
      add(path, 'conflicts with vllm.enable_chunked_prefill: false, which passes --chunked-prefill-size -1');
    }

    if (Array.isArray(value)) {
      if (value.length === 0) add(path, 'must not be an empty list');
      else if (!value.every(isScalarArg)) add(path, 'list items must be strings or numbers');
      else if (value.some((item) => item === '')) add(path, 'list items must not be empty');
      else {
        const problem = value.map(argProblem).find((found) => found !== null);
        if (problem) add(path, `a list item ${problem}`);
      }
    } else if (isScalarArg(value)) {
      const problem = argProblem(value);
      if (problem !== null) add(path, `the value ${problem}`);
    } else if (typeof value !== 'boolean' && !isMapping(value)) {
      add(path, 'must be a string, a number, true/false, a list of strings and numbers, or a mapping (passed as JSON)');
    }
  }
  if (vllm.engine === 'vllm') problems.push(...vllmCombinationProblems(vllm, seen, valid));
  return problems;
}

/** Flag pairs on which vLLM's validate_parsed_serve_args exits at startup (A8). */
const VLLM_FLAG_PAIRS: ReadonlyArray<{ flag: string; other: string; rule: 'needs' | 'excludes' }> = [
  { flag: 'enable-auto-tool-choice', other: 'tool-call-parser', rule: 'needs' },
  { flag: 'enable-log-outputs', other: 'enable-log-requests', rule: 'needs' },
  { flag: 'enable-per-request-metrics', other: 'disable-log-stats', rule: 'excludes' },
];

/**
 * extra_args that vLLM refuses to start with, alone or with other keys. `given` maps each
 * normalized flag name to the extra_args key that set it.
 */
function vllmCombinationProblems(
  vllm: VllmConfig,
  given: ReadonlyMap<string, string>,
  valid: (...paths: string[]) => boolean,
): ConfigProblem[] {
  const problems: ConfigProblem[] = [];
  const keys = withAbbreviations(given, CROSS_CHECKED_FLAGS, problems);
  const value = (flag: string): unknown => {
    const key = keys.get(flag);
    return key === undefined ? undefined : vllm.extra_args[key];
  };
  const isSet = (flag: string) => value(flag) !== undefined && value(flag) !== false;
  for (const { flag, other, rule } of VLLM_FLAG_PAIRS) {
    if (!isSet(flag) || isSet(other) === (rule === 'needs')) continue;
    problems.push({
      path: `vllm.extra_args.${keys.get(flag)}`,
      message:
        rule === 'needs'
          ? `needs vllm.extra_args.${other} as well; vLLM exits at startup without it`
          : `cannot be used with vllm.extra_args.${keys.get(other)}; vLLM exits at startup when both are set`,
    });
  }
  // The number of API servers defaults to the data-parallel size (A1).
  const servers = keys.has('api-server-count') ? 'api-server-count' : 'data-parallel-size';
  const count = Number(value(servers) ?? 1);
  if (valid('vllm.lora.enabled') && vllm.lora.enabled && count > 1) {
    const why =
      'vllm.lora.enabled: true makes tide-vllm set VLLM_ALLOW_RUNTIME_LORA_UPDATING, which vLLM refuses with more than one API server';
    problems.push({
      path: `vllm.extra_args.${keys.get(servers)}`,
      message:
        servers === 'api-server-count'
          ? `is ${count}, but ${why}`
          : `is ${count}, which also starts ${count} API servers unless vllm.extra_args.api-server-count is 1, but ${why}`,
    });
  }
  return problems;
}

const CROSS_CHECKED_FLAGS = [...new Set(VLLM_FLAG_PAIRS.flatMap(({ flag, other }) => [flag, other]).concat('api-server-count', 'data-parallel-size'))];

/** vLLM's single-dash aliases (protocol A8), which an extra_args key would pass with two dashes. */
const SHORT_ALIASES: ReadonlyMap<string, string> = new Map([
  ['tp', 'tensor-parallel-size'],
  ['pp', 'pipeline-parallel-size'],
  ['asc', 'api-server-count'],
]);

/** vLLM flags that share a beginning with those: a prefix of both is ambiguous to vLLM's argparse. */
const SIBLING_FLAGS = [
  'api-key',
  'tool-parser-plugin',
  'tool-server',
  'data-parallel-size-local',
  'data-parallel-rank',
  'data-parallel-start-rank',
  'data-parallel-address',
  'data-parallel-rpc-port',
  'data-parallel-backend',
  'data-parallel-hybrid-lb',
  'data-parallel-external-lb',
  'data-parallel-multi-port-external-lb',
  'disable-log-requests',
];

/**
 * `keys` (normalized flag name → extra_args key) plus each of `flags` that a key abbreviates:
 * vLLM's argparse takes any unique prefix of a long option (A8), so `api-server: 2` is
 * `--api-server-count 2`. Refused: a prefix that could be several flags (vLLM refuses it as
 * ambiguous), and an abbreviation of a flag also given in full (argparse keeps the last one).
 */
function withAbbreviations(
  keys: ReadonlyMap<string, string>,
  flags: readonly string[],
  problems: ConfigProblem[],
): ReadonlyMap<string, string> {
  const resolved = new Map(keys);
  for (const [name, key] of keys) {
    if (flags.includes(name) || SIBLING_FLAGS.includes(name) || managedFlag('vllm', name)) continue; // the managed ones are refused already
    const matches = flags.filter((flag) => flag.startsWith(name));
    if (matches.length === 0) continue;
    const all = [...matches, ...SIBLING_FLAGS.filter((flag) => flag.startsWith(name))];
    const path = `vllm.extra_args.${key}`;
    if (all.length > 1) {
      problems.push({ path, message: `could be any of ${all.map((f) => `--${f}`).join(', ')}; vLLM refuses an ambiguous abbreviation: write the flag in full` });
    } else if (resolved.has(matches[0])) {
      problems.push({ path, message: `abbreviates --${matches[0]}, which vllm.extra_args.${resolved.get(matches[0])} sets already` });
    } else {
      resolved.set(matches[0], key);
    }
  }
  return resolved;
}

/**
 * The managed flag (or its `--no-` form) that `name`, normalized and in lower case, sets: the
 * flag itself, or one it abbreviates, since the engines' argparse takes any unique prefix of a
 * long option (`--served-model` is `--served-model-name`; A8).
 */
function managedFlag(engine: Engine, name: string): { flag: string; owner: string } | undefined {
  const [no, base] = name.startsWith('no-') && name.length > 3 ? ['no-', name.slice(3)] : ['', name];
  const flags = Object.entries(MANAGED_FLAGS[engine]);
  const found = flags.find(([flag]) => flag === base) ?? flags.find(([flag]) => flag.startsWith(base));
  return found && { flag: no + found[0], owner: found[1] };
}

/**
 * Why a value cannot go on the engine's command line as it is, or null: one starting with "-"
 * (not a number) would be read as a flag of its own (`[1, "--port", 9999]` would move the engine
 * off the port tide-vllm watches); an integer past 2^53 − 1 would be written `1e+21`. The value
 * itself is not repeated: an engine flag may carry a token.
 */
function argProblem(value: string | number): string | null {
  if (typeof value === 'number') return Number.isInteger(value) && !Number.isSafeInteger(value) ? 'is past 2^53 − 1 (it would reach the engine as 1e+21 or the like)' : null;
  return value.startsWith('-') && !Number.isFinite(Number(value)) ? 'starts with "-", so the engine would read it as a flag' : null;
}

function isScalarArg(value: unknown): value is string | number {
  return typeof value === 'string' || (typeof value === 'number' && Number.isFinite(value));
}

// ---------------------------------------------------------------------------
// Derived defaults
// ---------------------------------------------------------------------------

function resolveDefaults(config: TideConfig): TideConfig {
  const { vllm, web } = config;
  vllm.command ??= [...DEFAULT_COMMANDS[vllm.engine]];
  vllm.model_name ??= vllm.model_path ?? '';
  vllm.tensor_parallel_size ??= vllm.gpus?.length ?? 1;
  // Not shorter than the engine's own verdict: a busy SGLang would be restarted for being busy.
  vllm.health_timeout ??= DEFAULT_HEALTH_TIMEOUT[vllm.engine];
  vllm.log_file = vllm.log_file.replaceAll('{port}', String(vllm.port));
  // "true"/"false" (what `${VAR:-true}` gives) are switches, as for typed keys: `--flag true` would be refused by the engine.
  const switchOf = (value: ExtraArgValue) => (value === 'true' ? true : value === 'false' ? false : value);
  vllm.extra_args = Object.fromEntries(Object.entries(vllm.extra_args).map(([key, value]) => [normalizeFlagName(key), switchOf(value)]));
  vllm.env = Object.fromEntries(Object.entries(vllm.env).map(([key, value]) => [key, String(value)]));
  web.max_concurrent_requests ??= 2 * vllm.max_num_seqs;
  // Half the context at most: a default as long as the context would leave no room for any prompt.
  vllm.max_tokens ??= Math.min(DEFAULT_MAX_TOKENS, Math.max(1, Math.floor(vllm.max_model_len / 2)));
  return config;
}

function deepFreeze<T>(value: T): T {
  if (typeof value === 'object' && value !== null && !Object.isFrozen(value)) {
    Object.freeze(value);
    for (const child of Object.values(value)) deepFreeze(child);
  }
  return value;
}
