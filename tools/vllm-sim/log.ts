/**
 * vLLM-style logging (vllm/logger.py, vllm/utils/system_utils.py decorate_logs) and uvicorn's
 * console lines. Lines go to the process's real stdout/stderr, as vLLM's do.
 */
import { STATUS_CODES } from 'node:http';

export type LogLevel = 'DEBUG' | 'INFO' | 'WARNING' | 'ERROR' | 'CRITICAL';

const LEVEL_VALUE: Record<LogLevel, number> = {
  DEBUG: 10,
  INFO: 20,
  WARNING: 30,
  ERROR: 40,
  CRITICAL: 50,
};

/**
 * uvicorn's --log-level names and numbers (uvicorn/config.py LOG_LEVELS: Python's logging levels,
 * plus trace = 5); SGLang's --log-level uses the same names.
 */
export const UVICORN_LEVEL_VALUE: Record<string, number> = {
  critical: 50,
  error: 40,
  warning: 30,
  info: 20,
  debug: 10,
  trace: 5,
};

/** A stream the logger writes to; process.stdout/stderr satisfy it. */
export interface LineSink {
  write(chunk: string): unknown;
}

export function pad2(n: number): string {
  return String(n).padStart(2, '0');
}

/** `%m-%d %H:%M:%S` in local time, vLLM's datefmt. */
export function vllmTimestamp(date = new Date()): string {
  return (
    `${pad2(date.getMonth() + 1)}-${pad2(date.getDate())} ` +
    `${pad2(date.getHours())}:${pad2(date.getMinutes())}:${pad2(date.getSeconds())}`
  );
}

/** Writes text, inserting a `(Name pid=N) ` prefix at the start of every line (decorate_logs). */
class DecoratedStream {
  private atLineStart = true;
  prefix = '';

  constructor(private readonly sink: LineSink) {}

  write(text: string): void {
    if (!text) return;
    let out = '';
    for (const piece of text.split(/(?<=\n)/)) {
      if (this.atLineStart) out += this.prefix;
      out += piece;
      this.atLineStart = piece.endsWith('\n');
    }
    this.sink.write(out);
  }
}

export interface LoggerOptions {
  stdout?: LineSink;
  stderr?: LineSink;
  /** VLLM_LOGGING_LEVEL; defaults to the environment's value or INFO. */
  level?: LogLevel;
  /** uvicorn --log-level; lines below it (startup and access lines are INFO) are dropped. */
  uvicornLevel?: string;
}

/** Logger producing vLLM's format: `INFO 08-17 12:00:00 [file.py:123] message`. */
export class VllmLogger {
  private readonly out: DecoratedStream;
  private readonly err: DecoratedStream;
  private readonly level: number;
  uvicornLevel: number;

  constructor(options: LoggerOptions = {}) {
    this.out = new DecoratedStream(options.stdout ?? process.stdout);
    this.err = new DecoratedStream(options.stderr ?? process.stderr);
    const envLevel = (process.env.VLLM_LOGGING_LEVEL ?? '').toUpperCase() as LogLevel;
    this.level = LEVEL_VALUE[options.level ?? envLevel] ?? LEVEL_VALUE.INFO;
    this.uvicornLevel = UVICORN_LEVEL_VALUE[options.uvicornLevel ?? 'info'] ?? 20;
  }

  /** Prefixes every later stdout/stderr line with `(name pid=N) `, as decorate_logs does. */
  decorate(name: string, pid = process.pid): void {
    this.out.prefix = this.err.prefix = `(${name} pid=${pid}) `;
  }

  setUvicornLevel(name: string): void {
    this.uvicornLevel = UVICORN_LEVEL_VALUE[name] ?? this.uvicornLevel;
  }

  /**
   * Logs one record. Like vLLM's NewLineFormatter, every further line of a multi-line message
   * (or of the appended traceback) repeats the record's header after a `\r\n`.
   */
  log(level: LogLevel, fileinfo: string, message: string, traceback: string[] = []): void {
    if (LEVEL_VALUE[level] < this.level) return;
    const header = `${level} ${vllmTimestamp()} [${fileinfo}] `;
    const lines = [...message.split('\n'), ...traceback];
    this.out.write(header + lines.join(`\r\n${header}`) + '\n');
  }

  debug(fileinfo: string, message: string): void {
    this.log('DEBUG', fileinfo, message);
  }

  info(fileinfo: string, message: string): void {
    this.log('INFO', fileinfo, message);
  }

  warning(fileinfo: string, message: string): void {
    this.log('WARNING', fileinfo, message);
  }

  error(fileinfo: string, message: string, traceback: string[] = []): void {
    this.log('ERROR', fileinfo, message, traceback);
  }

  /** Raw lines on stderr (interpreter tracebacks, argparse output). */
  stderrLines(lines: string[]): void {
    this.err.write(lines.map((l) => l + '\n').join(''));
  }

  /** uvicorn's console format on stderr: `INFO:     message` (logger uvicorn.error). */
  uvicorn(level: 'INFO' | 'WARNING' | 'ERROR', message: string): void {
    if (UVICORN_LEVEL_VALUE[level.toLowerCase()] < this.uvicornLevel) return;
    this.err.write(`${`${level}:`.padEnd(9)} ${message}\n`);
  }

  /** uvicorn's access line on stdout: `INFO:     127.0.0.1:5555 - "GET / HTTP/1.1" 200 OK`. */
  access(client: string, method: string, path: string, httpVersion: string, status: number): void {
    if (UVICORN_LEVEL_VALUE.info < this.uvicornLevel) return;
    this.out.write(`${accessLine(client, method, path, httpVersion, status)}\n`);
  }
}

/** uvicorn's access line: `INFO:     127.0.0.1:5555 - "GET / HTTP/1.1" 200 OK`. */
export function accessLine(
  client: string,
  method: string,
  path: string,
  httpVersion: string,
  status: number,
): string {
  const phrase = STATUS_CODES[status] ?? '';
  return `INFO:     ${client} - "${method} ${path} HTTP/${httpVersion}" ${status} ${phrase}`;
}

/** Makes writes to a closed pipe harmless: an orphaned process must not die of EPIPE. */
export function ignorePipeErrors(): void {
  const swallow = (): void => undefined;
  process.stdout.on('error', swallow);
  process.stderr.on('error', swallow);
}
