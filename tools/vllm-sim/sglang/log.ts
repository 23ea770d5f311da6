/**
 * SGLang's log formats: `configure_logger` (`[%(asctime)s{prefix}] %(message)s`, the scheduler's
 * prefix is ` TP0`) on stdout, and uvicorn's formats as `set_uvicorn_logging_configs` rewrites
 * them (`[%(asctime)s] %(levelprefix)s %(message)s`; access lines on stdout, the rest on stderr),
 * both with datefmt `%Y-%m-%d %H:%M:%S` (python/sglang/srt/utils/common.py).
 */
import { LineSink, UVICORN_LEVEL_VALUE as LEVELS, accessLine, pad2 } from '../log';

/** `%Y-%m-%d %H:%M:%S` in local time. */
export function sglangTimestamp(date = new Date()): string {
  return (
    `${date.getFullYear()}-${pad2(date.getMonth() + 1)}-${pad2(date.getDate())} ` +
    `${pad2(date.getHours())}:${pad2(date.getMinutes())}:${pad2(date.getSeconds())}`
  );
}

export interface SglangLoggerOptions {
  stdout?: LineSink;
  stderr?: LineSink;
  /** ` TP0` for the scheduler, `` for the main process. */
  prefix?: string;
  /** --log-level (default info). */
  level?: string;
  /** --log-level-http (uvicorn's level; default: --log-level). */
  httpLevel?: string | null;
  /** --uvicorn-access-log-exclude-prefixes. */
  accessLogExcludePrefixes?: string[];
}

export class SglangLogger {
  private readonly out: LineSink;
  private readonly err: LineSink;
  private readonly prefix: string;
  private readonly level: number;
  private readonly httpLevel: number;
  private readonly excluded: string[];

  constructor(options: SglangLoggerOptions = {}) {
    this.out = options.stdout ?? process.stdout;
    this.err = options.stderr ?? process.stderr;
    this.prefix = options.prefix ?? '';
    this.level = LEVELS[(options.level ?? 'info').toLowerCase()] ?? LEVELS.info;
    this.httpLevel = LEVELS[(options.httpLevel ?? options.level ?? 'info').toLowerCase()] ?? this.level;
    this.excluded = options.accessLogExcludePrefixes ?? [];
  }

  /** One record; a multi-line message is printed as Python's logging prints it (header once). */
  private record(level: number, message: string): void {
    if (level < this.level) return;
    this.out.write(`[${sglangTimestamp()}${this.prefix}] ${message}\n`);
  }

  debug(message: string): void {
    this.record(LEVELS.debug, message);
  }

  info(message: string): void {
    this.record(LEVELS.info, message);
  }

  warning(message: string): void {
    this.record(LEVELS.warning, message);
  }

  error(message: string): void {
    this.record(LEVELS.error, message);
  }

  /** Raw lines on stderr (argparse output, interpreter tracebacks). */
  stderrLines(lines: string[]): void {
    this.err.write(lines.map((l) => `${l}\n`).join(''));
  }

  /** uvicorn's default logger (`uvicorn.error`) on stderr. */
  uvicorn(level: 'INFO' | 'WARNING' | 'ERROR', message: string): void {
    if (LEVELS[level.toLowerCase()] < this.httpLevel) return;
    this.err.write(`[${sglangTimestamp()}] ${`${level}:`.padEnd(9)} ${message}\n`);
  }

  /** uvicorn's access line on stdout: `[ts] INFO:     127.0.0.1:5555 - "GET / HTTP/1.1" 200 OK`. */
  access(client: string, method: string, path: string, httpVersion: string, status: number): void {
    if (LEVELS.info < this.httpLevel) return;
    const bare = path.split('?')[0];
    if (this.excluded.some((p) => p && bare.startsWith(p))) return;
    this.out.write(`[${sglangTimestamp()}] ${accessLine(client, method, path, httpVersion, status)}\n`);
  }
}
