#!/usr/bin/env node
/**
 * tide-vllm's operator CLI. `serve` runs the service; every other command talks to a running
 * service's admin API and prints a human-readable answer.
 *
 * Exit codes: 0 done; 1 the service refused or failed the action, or took the request and gave
 * no answer within --timeout (the action may still complete); 2 usage error; 3 the service
 * could not be reached (no connection).
 */
import { request as httpRequest } from 'node:http';
import { request as httpsRequest } from 'node:https';
import { parseArgs } from 'node:util';

const DEFAULT_URL = 'http://127.0.0.1:10002';
/** Seconds to wait for an answer: a restart can take minutes. */
const DEFAULT_TIMEOUT_S = 600;
/** Node's longest timer, in whole seconds (config.schema's MAX_SECONDS, not imported: the CLI loads nothing heavy). */
const MAX_TIMEOUT_S = 2_147_483;

const CLI_USAGE = `Usage: tide-vllm <command> [options]

Commands:
  serve [-c FILE]             run the service (default config $TIDE_VLLM_CONFIG, else
                              conf/tide-vllm.yaml)
  status                      show the state of vLLM
  health                      GET /health (needs no key): exit 0 while the service is live, 1 when
                              it answers unhealthy or not in time, 3 when it cannot be reached
  sleep [--level 1|2|3]       put vLLM to sleep (default: vllm.sleep.level)
  wake                        wake vLLM up
  restart                     restart vLLM and wait until the model is served
  lora load NAME PATH         load a LoRA adapter
  lora unload NAME            unload a LoRA adapter

Options:
  --url URL      the service (env TIDE_VLLM_URL; default ${DEFAULT_URL})
  --key KEY      admin API key (env TIDE_VLLM_ADMIN_KEY)
  --timeout S    seconds to wait for an answer (default ${DEFAULT_TIMEOUT_S}: a restart can take minutes)
  --json         print the raw JSON answer
  -h, --help     this text`;

export const EXIT = { ok: 0, refused: 1, usage: 2, unreachable: 3 } as const;

interface Output {
  out: (text: string) => void;
  err: (text: string) => void;
}

interface Call {
  method: 'GET' | 'POST' | 'DELETE';
  path: string;
  body?: unknown;
}

/** A command line the CLI cannot run; the caller adds CLI_USAGE (config.loader's UsageError embeds the service's usage). */
class CliUsageError extends Error {}

/** No answer came. `connected`: the service was reached (a TCP connection made) before that. */
class NoAnswer extends Error {
  constructor(
    readonly connected: boolean,
    readonly timedOut: boolean,
    message: string,
  ) {
    super(message);
  }
}

/**
 * One request over node:http(s), not fetch: fetch cannot tell a service that never took the
 * connection (unreachable) from one that took it and is still working (a restart that outlasts
 * --timeout), and the two mean different things to whoever reads the exit code.
 */
function send(url: URL, call: Call, key: string | undefined, timeoutMs: number): Promise<{ status: number; text: string }> {
  const body = call.body === undefined ? undefined : JSON.stringify(call.body);
  const headers: Record<string, string> = {
    ...(key ? { authorization: `Bearer ${key}` } : {}),
    ...(body !== undefined ? { 'content-type': 'application/json', 'content-length': String(Buffer.byteLength(body)) } : {}),
  };
  return new Promise((resolve, reject) => {
    let connected = false;
    let timedOut = false;
    const req = (url.protocol === 'https:' ? httpsRequest : httpRequest)(url, { method: call.method, headers, agent: false }, (res) => {
      let text = '';
      res.setEncoding('utf8');
      res.on('data', (chunk: string) => (text += chunk));
      res.on('end', () => {
        clearTimeout(timer);
        resolve({ status: res.statusCode ?? 0, text });
      });
      res.on('error', fail);
    });
    const timer = setTimeout(() => {
      timedOut = true;
      fail(new Error('timeout')); // settles now: a destroyed response need not emit an error
      req.destroy();
    }, timeoutMs);
    // Reached means the request could be sent: for https, once the TLS handshake is done.
    const ready = url.protocol === 'https:' ? 'secureConnect' : 'connect';
    req.on('socket', (socket) => socket.once(ready, () => (connected = true))); // agent: false, a new socket each time
    req.on('error', fail);
    req.end(body);
    function fail(err: NodeJS.ErrnoException): void {
      clearTimeout(timer);
      const why = !timedOut ? err.message : `${connected ? 'no answer' : 'no connection'} within ${timeoutMs / 1000} s`;
      reject(new NoAnswer(connected, timedOut, why));
    }
  });
}

/** The service's base URL, or a CliUsageError saying where the bad one came from. */
function serviceUrl(flag: string | undefined, env: NodeJS.ProcessEnv): string {
  const [raw, source] = flag !== undefined ? [flag, '--url'] : [env.TIDE_VLLM_URL || DEFAULT_URL, 'TIDE_VLLM_URL'];
  let url: URL | undefined;
  try {
    url = new URL(raw);
  } catch {
    // reported below
  }
  if (url?.protocol !== 'http:' && url?.protocol !== 'https:') {
    throw new CliUsageError(`${source} must be an http:// or https:// URL such as ${DEFAULT_URL}, not "${raw}"`);
  }
  return raw.replace(/\/+$/, '');
}

/** Maps the command line to one admin API call. */
export function planCall(positionals: string[], level: string | undefined): Call {
  const [command, ...rest] = positionals;
  const expectArgs = (n: number, usage: string) => {
    if (rest.length !== n) throw new CliUsageError(`usage: tide-vllm ${usage}`);
  };
  if (level !== undefined && command !== 'sleep' && command !== undefined) throw new CliUsageError('--level is an option of sleep only');
  switch (command) {
    case 'status':
      expectArgs(0, 'status');
      return { method: 'GET', path: '/admin/status' };
    case 'health':
      expectArgs(0, 'health');
      return { method: 'GET', path: '/health' };
    case 'sleep':
      expectArgs(0, 'sleep [--level 1|2|3]');
      if (level !== undefined && !['1', '2', '3'].includes(level)) throw new CliUsageError('--level must be 1, 2 or 3');
      return { method: 'POST', path: `/admin/sleep${level ? `?level=${level}` : ''}` };
    case 'wake':
      expectArgs(0, 'wake');
      return { method: 'POST', path: '/admin/wake_up' };
    case 'restart':
      expectArgs(0, 'restart');
      return { method: 'POST', path: '/admin/restart' };
    case 'lora': {
      const [action, name, path] = rest;
      if (action === 'load' && rest.length === 3) return { method: 'POST', path: '/admin/lora', body: { name, path } };
      if (action === 'unload' && rest.length === 2) {
        // A dot segment is left as it is by encodeURIComponent, and the URL would drop it: `..` would ask /admin/.
        if (name === '.' || name === '..') throw new CliUsageError(`"${name}" is no adapter name`);
        return { method: 'DELETE', path: `/admin/lora/${encodeURIComponent(name)}` };
      }
      throw new CliUsageError('usage: tide-vllm lora load NAME PATH | tide-vllm lora unload NAME');
    }
    case 'serve':
      throw new CliUsageError('serve must come first, before any option: tide-vllm serve [-c FILE]');
    case undefined:
      throw new CliUsageError('a command is required');
    default:
      throw new CliUsageError(`unknown command "${command}"`);
  }
}

/**
 * `text` safe to print to a terminal: control characters other than newline and tab (ESC, BEL,
 * CSI's C1 form, DEL…) become `\u00NN`, a JSON escape too, so `--json` output stays JSON. What
 * the service answers carries text vLLM wrote (its last error, a model name, an adapter path),
 * and an escape sequence in it must not drive the operator's terminal (retitle it, rewrite what
 * it shows, hide a line).
 */
export function printable(text: string): string {
  return text.replace(/[\x00-\x08\x0b-\x1f\x7f-\x9f]/g, (c) => `\\u00${c.charCodeAt(0).toString(16).padStart(2, '0')}`);
}

/** A status answer as a few aligned lines. */
export function formatStatus(s: Record<string, unknown>): string {
  const rows: Array<[string, unknown]> = [
    ['status', s.status],
    ['state', s.state],
    ['mode', s.mode],
    ['engine', s.engine],
    ['model', s.model],
    ['pid', s.pid],
    ['uptime', s.uptime_seconds === null ? '-' : `${s.uptime_seconds} s`],
    ['restarts', s.restarts],
    ['sleeping', s.sleeping ? `yes (level ${s.sleep_level})` : 'no'],
    ['lora', Object.entries((s.lora_adapters as Record<string, unknown>) ?? {}).map(([name, path]) => `${name} (${String(path)})`).join(', ') || '-'],
    ['log file', s.log_file ?? '-'],
    ['last error', s.last_error ?? '-'],
    ['argv', Array.isArray(s.argv) ? s.argv.join(' ') : '-'],
  ];
  return rows.map(([k, v]) => `${k.padEnd(11)}${v === null || v === undefined ? '-' : String(v)}`).join('\n');
}

/** What to do about a 401 of the admin API: where the CLI takes its key, and which keys open it. */
function keyHint(source: '--key' | 'TIDE_VLLM_ADMIN_KEY' | null): string {
  const how = 'pass --key KEY or set TIDE_VLLM_ADMIN_KEY';
  if (source === null) return `tide-vllm: hint: the admin API needs a key (auth.admin_api_keys, else auth.api_keys): ${how}`;
  return `tide-vllm: hint: the key from ${source} was refused; for an admin key (auth.admin_api_keys, else auth.api_keys), ${how}`;
}

export async function runCli(argv: string[], env: NodeJS.ProcessEnv, terminal: Output): Promise<number> {
  if (argv[0] === 'serve') {
    process.argv = [process.argv[0], process.argv[1], ...argv.slice(1)];
    await import('./main');
    return -1; // the service runs until it exits by itself
  }
  const io: Output = { out: (text) => terminal.out(printable(text)), err: (text) => terminal.err(printable(text)) };
  let parsed;
  try {
    parsed = parseArgs({
      args: argv,
      allowPositionals: true,
      options: {
        url: { type: 'string' },
        key: { type: 'string' },
        level: { type: 'string' },
        timeout: { type: 'string' },
        json: { type: 'boolean' },
        help: { type: 'boolean', short: 'h' },
      },
    });
  } catch (err) {
    io.err(`tide-vllm: ${(err as Error).message}\n\n${CLI_USAGE}`);
    return EXIT.usage;
  }
  const { values, positionals } = parsed;
  if (values.help) {
    io.out(CLI_USAGE);
    return EXIT.ok;
  }
  let call: Call;
  try {
    call = planCall(positionals, values.level);
  } catch (err) {
    if (!(err instanceof CliUsageError)) throw err;
    io.err(`tide-vllm: ${err.message}\n\n${CLI_USAGE}`);
    return EXIT.usage;
  }
  let base: string;
  try {
    base = serviceUrl(values.url, env);
  } catch (err) {
    io.err(`tide-vllm: ${(err as Error).message}`);
    return EXIT.usage;
  }
  if (values.key === '') {
    io.err('tide-vllm: --key needs a key (leave it out to send none)');
    return EXIT.usage;
  }
  const key = values.key ?? env.TIDE_VLLM_ADMIN_KEY;
  if (key && !/^[\x21-\x7e]+$/.test(key)) {
    io.err(`tide-vllm: ${values.key !== undefined ? '--key' : 'TIDE_VLLM_ADMIN_KEY'} must be printable ASCII without spaces (it goes into an HTTP header)`);
    return EXIT.usage;
  }
  const timeoutS = Number(values.timeout ?? DEFAULT_TIMEOUT_S);
  // Node timers hold at most 2^31 − 1 ms: a longer --timeout would fire at once. Decimal only (Number takes 0x10).
  if ((values.timeout !== undefined && !/^\d*\.?\d+$/.test(values.timeout)) || !Number.isFinite(timeoutS) || timeoutS <= 0 || timeoutS > MAX_TIMEOUT_S) {
    io.err(`tide-vllm: --timeout must be a positive number of seconds, at most ${MAX_TIMEOUT_S} (about 24.8 days)`);
    return EXIT.usage;
  }
  let res: { status: number; text: string };
  try {
    res = await send(new URL(base + call.path), call, key, timeoutS * 1000);
  } catch (err) {
    if (!(err instanceof NoAnswer)) throw err;
    if (!err.connected) {
      io.err(`tide-vllm: cannot reach the service at ${base}: ${err.message}`);
      return EXIT.unreachable;
    }
    // Reached, so the action may well be under way (a restart answers once the model is loaded).
    io.err(
      err.timedOut
        ? `tide-vllm: no answer from the service at ${base} within ${timeoutS} s (--timeout); it took the request and may ` +
            'still be carrying it out: check with `tide-vllm status`, or allow more time with --timeout'
        : `tide-vllm: the service at ${base} took the request but closed the connection without an answer (${err.message}); ` +
            'check with `tide-vllm status`',
    );
    return EXIT.refused;
  }
  const { text } = res;
  // The service answers JSON objects; anything else (not JSON, `null`, a list) is shown as the text it is.
  let body: Record<string, unknown> = {};
  let isObject = false;
  try {
    const parsed: unknown = JSON.parse(text);
    isObject = typeof parsed === 'object' && parsed !== null && !Array.isArray(parsed);
    if (isObject) body = parsed as Record<string, unknown>;
  } catch {
    // not JSON
  }
  if (call.path === '/health') {
    const line = `${String(body.status ?? `HTTP ${res.status}`)}${body.state ? ` (state ${String(body.state)})` : ''}`;
    if (values.json && isObject) io.out(JSON.stringify(body, null, 2)); // the answer as it is; the exit code says the rest
    else if (res.status === 200) io.out(line);
    else io.err(`tide-vllm: ${res.status}: ${line}`);
    return res.status === 200 ? EXIT.ok : EXIT.refused;
  }
  if (res.status < 200 || res.status >= 300) {
    const error = body.error as { message?: string } | undefined;
    io.err(`tide-vllm: ${res.status}: ${error?.message ?? text}`);
    if (res.status === 401) io.err(keyHint(values.key !== undefined ? '--key' : key ? 'TIDE_VLLM_ADMIN_KEY' : null));
    return EXIT.refused;
  }
  if (!isObject) io.out(text);
  else if (values.json) io.out(JSON.stringify(body, null, 2));
  else if ('state' in body) io.out(formatStatus(body));
  else io.out(Object.entries(body).map(([k, v]) => `${k}: ${typeof v === 'object' ? JSON.stringify(v) : String(v)}`).join('\n'));
  return EXIT.ok;
}

if (require.main === module) {
  void runCli(process.argv.slice(2), process.env, {
    out: (t) => process.stdout.write(t + '\n'),
    err: (t) => process.stderr.write(t + '\n'),
  }).then((code) => {
    if (code >= 0) process.exitCode = code;
  });
}
