/**
 * Python-compatible text formatting, so the simulator's logs and messages read exactly like
 * vLLM's: repr() of dicts/lists/strings, float repr, json.dumps with its default separators,
 * and interpreter tracebacks.
 */

/** A value that repr() must print as a Python float even when it is integral (1 → 1.0). */
export class PyFloat {
  constructor(readonly value: number) {}
}

/** A tuple: repr() prints `(a, b)` and `(a,)`. */
export class PyTuple {
  constructor(readonly items: readonly unknown[]) {}
}

/** Text that repr() prints verbatim (an object repr such as `LoRAModulePath(name='a', ...)`). */
export class PyRaw {
  constructor(readonly text: string) {}
}

/** Python's float repr: shortest round-trip digits, exponent form below 1e-4 and from 1e16. */
export function pyFloat(x: number): string {
  if (Number.isNaN(x)) return 'nan';
  if (x === Infinity) return 'inf';
  if (x === -Infinity) return '-inf';
  if (x === 0) return Object.is(x, -0) ? '-0.0' : '0.0';
  const [mantissa, expText] = Math.abs(x).toExponential().split('e');
  const exponent = Number(expText);
  const digits = mantissa.replace('.', '');
  const sign = x < 0 ? '-' : '';
  if (exponent >= -4 && exponent < 16) {
    if (exponent < 0) return `${sign}0.${'0'.repeat(-exponent - 1)}${digits}`;
    const intPart = digits.slice(0, exponent + 1).padEnd(exponent + 1, '0');
    const fracPart = digits.slice(exponent + 1);
    return `${sign}${intPart}.${fracPart || '0'}`;
  }
  const expSign = exponent < 0 ? '-' : '+';
  const expDigits = String(Math.abs(exponent)).padStart(2, '0');
  return `${sign}${mantissa}e${expSign}${expDigits}`;
}

/** Python's str repr: single quotes unless the text holds a single quote and no double quote. */
export function pyStr(s: string): string {
  const quote = s.includes("'") && !s.includes('"') ? '"' : "'";
  let out = quote;
  for (const ch of s) {
    const code = ch.codePointAt(0) ?? 0;
    if (ch === '\\') out += '\\\\';
    else if (ch === quote) out += `\\${quote}`;
    else if (ch === '\n') out += '\\n';
    else if (ch === '\r') out += '\\r';
    else if (ch === '\t') out += '\\t';
    else if (code < 0x20 || code === 0x7f) out += `\\x${code.toString(16).padStart(2, '0')}`;
    else out += ch;
  }
  return out + quote;
}

/** repr() of a JSON-like value, as Python prints the equivalent dict/list/str/int/bool/None. */
export function pyRepr(value: unknown): string {
  if (value === null || value === undefined) return 'None';
  if (value instanceof PyFloat) return pyFloat(value.value);
  if (value instanceof PyRaw) return value.text;
  if (value instanceof PyTuple) {
    const items = value.items.map(pyRepr);
    return items.length === 1 ? `(${items[0]},)` : `(${items.join(', ')})`;
  }
  if (typeof value === 'boolean') return value ? 'True' : 'False';
  if (typeof value === 'number') return Number.isInteger(value) ? String(value) : pyFloat(value);
  if (typeof value === 'string') return pyStr(value);
  if (Array.isArray(value)) return `[${value.map(pyRepr).join(', ')}]`;
  if (typeof value === 'object') {
    const entries = Object.entries(value as Record<string, unknown>).map(
      ([k, v]) => `${pyStr(k)}: ${pyRepr(v)}`,
    );
    return `{${entries.join(', ')}}`;
  }
  return String(value);
}

/** json.dumps(value) with Python's defaults: `", "` and `": "` separators, ensure_ascii. */
export function pyJsonDumps(value: unknown): string {
  if (value === null || value === undefined) return 'null';
  if (typeof value === 'boolean') return value ? 'true' : 'false';
  if (typeof value === 'number') return Number.isInteger(value) ? String(value) : pyFloat(value);
  if (typeof value === 'string') {
    return JSON.stringify(value).replace(
      /[\u007f-\uffff]/g,
      (c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, '0')}`,
    );
  }
  if (Array.isArray(value)) return `[${value.map(pyJsonDumps).join(', ')}]`;
  const entries = Object.entries(value as Record<string, unknown>).map(
    ([k, v]) => `${pyJsonDumps(k)}: ${pyJsonDumps(v)}`,
  );
  return `{${entries.join(', ')}}`;
}

/** One frame of a Python traceback: file, line, function, source line. */
export type PyFrame = readonly [file: string, line: number, func: string, source: string];

const SITE_PACKAGES = '/usr/local/lib/python3.12/dist-packages';

/** The frames every `vllm serve` traceback starts with (console script → CLI main). */
export const VLLM_CLI_FRAMES: readonly PyFrame[] = [
  ['/usr/local/bin/vllm', 10, '<module>', 'sys.exit(main())'],
  [`${SITE_PACKAGES}/vllm/entrypoints/cli/main.py`, 73, 'main', 'args.dispatch_function(args)'],
  [`${SITE_PACKAGES}/vllm/entrypoints/cli/serve.py`, 112, 'cmd', 'uvloop.run(run_server(args))'],
];

/** Builds `Traceback (most recent call last):` text, one string per output line. */
export function pyTraceback(frames: readonly PyFrame[], exception: string): string[] {
  const lines = ['Traceback (most recent call last):'];
  for (const [file, line, func, source] of frames) {
    const path = file.startsWith('/') ? file : `${SITE_PACKAGES}/${file}`;
    lines.push(`  File "${path}", line ${line}, in ${func}`, `    ${source}`);
  }
  lines.push(exception);
  return lines;
}

/** A socket error as Python raises it: exception class, errno and strerror. */
export interface PyOsError {
  exception: string;
  errno: number;
  strerror: string;
}

/** Node's socket error codes as Python on Linux reports them (bind and name resolution). */
const PY_OS_ERRORS: Record<string, PyOsError> = {
  EADDRINUSE: { exception: 'OSError', errno: 98, strerror: 'Address already in use' },
  EADDRNOTAVAIL: { exception: 'OSError', errno: 99, strerror: 'Cannot assign requested address' },
  EACCES: { exception: 'PermissionError', errno: 13, strerror: 'Permission denied' },
  ENOTFOUND: { exception: 'socket.gaierror', errno: -2, strerror: 'Name or service not known' },
};

/** How Python names a Node socket error (an unknown code keeps Node's errno and message). */
export function pyOsError(error: NodeJS.ErrnoException): PyOsError {
  const known = PY_OS_ERRORS[error.code ?? ''];
  if (known) return known;
  return { exception: 'OSError', errno: Math.abs(error.errno ?? 0), strerror: error.message };
}

/** The exception line: `OSError: [Errno 98] Address already in use`. */
export function pyOsErrorLine(error: PyOsError): string {
  return `${error.exception}: [Errno ${error.errno}] ${error.strerror}`;
}
