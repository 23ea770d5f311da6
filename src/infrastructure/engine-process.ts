import type { ChildProcess } from 'node:child_process';
import { createInterface } from 'node:readline';
import type { Logger } from '@nestjs/common';
import { type LaunchSpec, secretValues } from './engine-args';
import type { RotatingLog } from './rotating-log';

/**
 * uvicorn's access line for one of tide-vllm's own probes (health, sleep state, metrics scrape):
 * one every health_interval, so it goes to debug and the log file, not to the log or the tail of
 * output kept for error messages, where it would crowd out what vLLM said before it failed.
 */
const PROBE_ACCESS_LINE = /"GET \/(?:health|is_sleeping|metrics)(?:\?\S*)? HTTP\/1\.[01]" 200\b/;
/** Lines of vLLM output kept for error messages. */
const OUTPUT_TAIL_LINES = 50;

type OutputLevel = 'debug' | 'log' | 'warn' | 'error';
const OUTPUT_LEVELS: Readonly<Record<string, OutputLevel>> = { DEBUG: 'debug', INFO: 'log', WARNING: 'warn', ERROR: 'error', CRITICAL: 'error' };
/** The `(APIServer pid=N) ` prefix vLLM writes before each line of a process (A1). */
const PROCESS_PREFIX = /^\([^)]*\) /;
/**
 * The level word of a line: vLLM's logger (`LEVEL MM-DD hh:mm:ss [file:line] …`), uvicorn's
 * (`LEVEL:    …`), or SGLang's (`[date time TP0] LEVEL: …` for its uvicorn lines).
 */
const LEVEL_WORD = /^(?:\[[^\]]*\] )?(DEBUG|INFO|WARNING|ERROR|CRITICAL)[ :]/;
/** Python's warnings module: `path.py:63: UserWarning: …`. */
const PYTHON_WARNING = /^\S+:\d+: \w*Warning: /;
/** A line of a traceback after its first: indented frames and code, the chained-exception notes, the exception itself. */
const TRACEBACK_LINE = /^(?:\s|During handling of the above exception|The above exception was the direct cause|[\w.]+(?:Error|Exception|Exit|Interrupt)\b)/;

/**
 * The log level of a line of engine output, given the level of the line before: the one vLLM (or
 * uvicorn, or SGLang) gave it; `error` for an uncaught exception's `Traceback`; `warn` for a
 * Python warning; the line before's for the rest of a traceback; else info (SGLang's own lines,
 * a progress bar).
 */
export function outputLevel(line: string, previous: OutputLevel = 'log'): OutputLevel {
  const text = line.replace(PROCESS_PREFIX, '');
  const word = LEVEL_WORD.exec(text);
  if (word) return OUTPUT_LEVELS[word[1]];
  if (text.startsWith('Traceback (most recent call last):')) return 'error';
  if (PYTHON_WARNING.test(text)) return 'warn';
  return TRACEBACK_LINE.test(text) ? previous : 'log';
}

/** One spawned vLLM process group: its output, its tail, its exit. */
export class EngineProcess {
  readonly tail: string[] = [];
  /** The level of its last line: the rest of a traceback is logged at it (outputLevel). */
  private level: OutputLevel = 'log';
  /** Keys on its command line, hidden in what it prints (secretValues). */
  private readonly secrets: string[];
  /**
   * tide-vllm signalled it while it ran (a stop, a restart, a level-3 sleep): the tracebacks it
   * prints as it dies of that (KeyboardInterrupt, a cancelled load) are expected, logged as
   * warnings, not errors that page someone. A crash's own output is not: it exited first.
   */
  signalled = false;
  /** Its whole group was found gone (terminated): it is never signalled again. */
  groupGone = false;
  readonly exited: Promise<{ code: number | null; signal: NodeJS.Signals | null; error?: NodeJS.ErrnoException }>;
  exitInfo: { code: number | null; signal: NodeJS.Signals | null; error?: NodeJS.ErrnoException } | null = null;

  constructor(
    readonly child: ChildProcess,
    readonly spec: LaunchSpec,
    private readonly log: Logger,
    private readonly file: RotatingLog | null,
  ) {
    this.secrets = secretValues(spec.args);
    this.exited = new Promise((resolve) => {
      child.once('error', (error: NodeJS.ErrnoException) => {
        // Spawn failures (ENOENT, EACCES) emit 'error' and never 'exit'.
        if (child.pid === undefined) resolve((this.exitInfo = { code: null, signal: null, error }));
      });
      child.once('exit', (code, signal) => resolve((this.exitInfo = { code, signal })));
    });
    for (const stream of [child.stdout, child.stderr]) {
      if (!stream) continue;
      createInterface({ input: stream, crlfDelay: Infinity }).on('line', (line) => this.onLine(line));
    }
  }

  get pid(): number | undefined {
    return this.child.pid;
  }

  /** Resolves when it has exited, or after `ms` (its exit handlers, such as onExit, have run by then). */
  async exitWithin(ms: number): Promise<void> {
    let timer: NodeJS.Timeout | undefined;
    await Promise.race([this.exited, new Promise((resolve) => (timer = setTimeout(resolve, ms)))]);
    clearTimeout(timer);
  }

  private onLine(output: string): void {
    let line = output;
    for (const secret of this.secrets) if (line.includes(secret)) line = line.replaceAll(secret, '***');
    this.file?.write(line);
    if (PROBE_ACCESS_LINE.test(line)) return void this.log.debug(line);
    this.tail.push(line);
    if (this.tail.length > OUTPUT_TAIL_LINES) this.tail.shift();
    this.level = outputLevel(line, this.level);
    this.log[this.signalled && this.level === 'error' ? 'warn' : this.level](line);
  }

  describeExit(): string {
    const info = this.exitInfo;
    if (!info) return 'is still running';
    if (info.signal) return `was killed by signal ${info.signal}`;
    return `exited with code ${info.code}`;
  }

  tailText(): string {
    return this.tail.length === 0 ? '(no output)' : this.tail.join('\n');
  }
}
