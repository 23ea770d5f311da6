// npm run bench -- [--quick] [--only=direct,nginx,relay,simple] [--no-profile] [--rounds=1]
//                  [--warmup=1] [--duration=3] [--wait-quiet=10] [--out=bench/results.md]
//
// Measures, in one run, the bench backend directly, nginx in front of it (when installed) and
// tide-vllm in front of it (the real dist/src/main.js, manual mode), then measures tide-vllm's
// memory at 256 streams in fresh processes and profiles it (node --cpu-prof).
// Writes bench/results.md and prints it. Exits 0 unless the benchmark itself broke: the targets
// are reported as PASS/MISS, for information.
import { fork, spawnSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { cpus, tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import type { LoadResult, LoadSpec } from './loadgen';
import { summarizeProfile } from './profile';
import { cpuModel, machineBusyTicks } from './proc-stats';
import { findNginx, MODEL, sleep, startBackend, startFloorRelay, startGateway, startNginx, type Backend, type Target } from './processes';
import { cpuPerUnit, otherCpuMs, rate, renderReport, Results, TARGET_LABELS, type CaseResult, type Kind, type ProfileReport, type TargetName } from './report';

const NON_STREAM_TOKENS = 16;
const FAST_TOKENS = 500;
const PACED_TOKENS = 50;
const PACE_MS = 20;
/**
 * Paced cases are measured this many times longer than the others: their p99s are judged against
 * a 3 ms target, and 3 s of 64 streams that last 1 s each start only ~190 of them (p99 would be
 * the second-worst first event). 3× gives ~580 first events at 64 streams, ~2,300 at 256.
 */
const PACED_WINDOW_FACTOR = 3;
/** Load run through a fresh tide-vllm before it is measured: V8 needs a few seconds of it to optimize the hot paths. */
const PREWARM_MS = 4000;
/** Pause between cases, so aborted streams of one case are gone before the next starts. */
const SETTLE_MS = 300;
/** Below this much CPU (% of one core) used by others, the machine counts as quiet. */
const QUIET_PCT = 20;
/** A case during which other processes used more than this (% of one core) is measured once more. */
const NOISY_PCT = 30;
/** Before each scenario, wait at most this long for other processes to go quiet (full runs). */
const DEFAULT_WAIT_QUIET_S = 10;
const GROUPS = ['direct', 'nginx', 'floor', 'relay', 'simple'] as const;
type Group = (typeof GROUPS)[number];
const GROUP_OF: Record<TargetName, Group> = { direct: 'direct', nginx: 'nginx', 'nginx-auto': 'nginx', floor: 'floor', 'floor-raw': 'floor', relay: 'relay', 'relay-info': 'relay', simple: 'simple' };

interface Options {
  quick: boolean;
  /** Seconds to wait at most for other processes to go quiet, before the run and before each scenario. */
  waitQuietS: number;
  only: Set<Group>;
  profile: boolean;
  warmupMs: number;
  durationMs: number;
  /** Each case is measured this many times, in alternating order within its scenario; the median run is kept. */
  rounds: number;
  out: string;
}

function parseOptions(argv: string[]): Options {
  const opts: Options = { quick: false, waitQuietS: DEFAULT_WAIT_QUIET_S, only: new Set(GROUPS), profile: true, warmupMs: 1000, durationMs: 3000, rounds: 1, out: join(__dirname, '..', '..', '..', 'bench', 'results.md') };
  let warmup: number | undefined;
  let duration: number | undefined;
  let waitQuietS: number | undefined;
  for (const arg of argv) {
    const [key, value] = arg.replace(/^--/, '').split('=', 2);
    if (key === 'quick') opts.quick = true;
    else if (key === 'no-profile') opts.profile = false;
    else if (key === 'only') {
      const groups = (value ?? '').split(',').filter(Boolean);
      const bad = groups.filter((g) => !(GROUPS as readonly string[]).includes(g));
      if (bad.length > 0 || groups.length === 0) throw new Error(`--only takes a comma-separated list of ${GROUPS.join(', ')}`);
      opts.only = new Set(groups as Group[]);
    } else if (key === 'warmup') warmup = Number(value) * 1000;
    else if (key === 'duration') duration = Number(value) * 1000;
    else if (key === 'out') opts.out = value ?? opts.out;
    else if (key === 'rounds') {
      opts.rounds = Number(value);
      if (!Number.isInteger(opts.rounds) || opts.rounds < 1) throw new Error('--rounds takes a whole number of at least 1');
    }
    else if (key === 'wait-quiet') waitQuietS = Number(value ?? 60);
    else if (key === 'help' || key === 'h') {
      process.stdout.write('usage: npm run bench -- [--quick] [--only=direct,nginx,relay,simple] [--no-profile] [--rounds=n] [--warmup=s] [--duration=s] [--wait-quiet[=s]] [--out=file]\n');
      process.exit(0);
    } else throw new Error(`unknown option ${arg} (try --help)`);
  }
  if (opts.quick) {
    opts.profile = false;
    opts.warmupMs = 500;
    opts.durationMs = 2000;
    opts.waitQuietS = 0;
  }
  opts.waitQuietS = waitQuietS ?? opts.waitQuietS;
  opts.warmupMs = warmup ?? opts.warmupMs;
  opts.durationMs = duration ?? opts.durationMs;
  if (!(opts.warmupMs >= 0 && opts.durationMs > 0)) throw new Error('--warmup and --duration take seconds');
  return opts;
}

/** The cases run under node --cpu-prof, one gateway, one profile, one window each. */
const PROFILED: ReadonlyArray<readonly [Kind, number, TargetName, string]> = [
  ['nonstream', 64, 'relay', 'OpenAI relay, non-streaming, c=64'],
  ['fast', 64, 'relay', 'OpenAI relay, streaming as fast as possible, 64 streams'],
  ['fast', 64, 'simple', 'simple API (re-framed), streaming as fast as possible, 64 streams'],
  ['paced', 256, 'relay', `OpenAI relay, paced ${PACE_MS} ms per token, 256 streams`],
];

interface Planned {
  kind: Kind;
  concurrency: number;
  target: TargetName;
}

/** The cases, grouped so that the targets of one scenario run back to back (drift hurts less). */
function plan(opts: Options, hasNginx: boolean): Planned[] {
  const cases: Planned[] = [];
  const add = (kind: Kind, concurrency: number, targets: TargetName[]) => {
    for (const target of targets) {
      if (!opts.only.has(GROUP_OF[target])) continue;
      if ((target === 'nginx' || target === 'nginx-auto') && !hasNginx) continue;
      cases.push({ kind, concurrency, target });
    }
  };
  if (opts.quick) {
    add('nonstream', 64, ['direct', 'nginx', 'floor', 'floor-raw', 'relay']);
    add('fast', 256, ['direct', 'nginx', 'floor', 'floor-raw', 'relay', 'simple']);
    add('paced', 256, ['direct', 'nginx', 'floor', 'floor-raw', 'relay', 'simple']);
    return cases;
  }
  add('nonstream', 16, ['direct', 'nginx', 'floor', 'relay']);
  add('nonstream', 64, ['direct', 'nginx', 'nginx-auto', 'floor', 'floor-raw', 'relay', 'relay-info']);
  add('nonstream', 256, ['direct', 'nginx', 'floor', 'relay']);
  add('fast', 64, ['direct', 'nginx', 'relay', 'simple']);
  add('fast', 256, ['direct', 'nginx', 'nginx-auto', 'floor', 'floor-raw', 'relay', 'simple']);
  add('paced', 64, ['direct', 'nginx', 'floor', 'relay', 'simple']);
  add('paced', 256, ['direct', 'nginx', 'floor', 'floor-raw', 'relay', 'simple']);
  return cases;
}

function requestFor(kind: Kind, target: TargetName): { path: string; body: string; stream: boolean } {
  const stream = kind !== 'nonstream';
  const tokens = kind === 'nonstream' ? NON_STREAM_TOKENS : kind === 'fast' ? FAST_TOKENS : PACED_TOKENS;
  if (target === 'simple') return { path: '/chat/completions', body: JSON.stringify({ prompt: 'hi', max_tokens: tokens, stream: true }), stream };
  return {
    path: '/v1/chat/completions',
    body: JSON.stringify({ model: MODEL, messages: [{ role: 'user', content: 'hi' }], max_tokens: tokens, stream }),
    stream,
  };
}

/** One case in a fresh load-generator process. */
function runLoadgen(spec: LoadSpec): Promise<LoadResult> {
  return new Promise((resolve, reject) => {
    const child = fork(join(__dirname, 'loadgen.js'), [JSON.stringify(spec)], { stdio: ['ignore', 'inherit', 'inherit', 'ipc'] });
    let result: LoadResult | null = null;
    const timer = setTimeout(() => child.kill('SIGKILL'), spec.warmupMs + spec.durationMs + 30_000);
    child.on('message', (msg: LoadResult) => (result = msg));
    child.on('exit', (code, signal) => {
      clearTimeout(timer);
      if (result) resolve(result);
      else reject(new Error(`the load generator exited (${signal ?? code}) without a result`));
    });
  });
}

/** Unmeasured load through a fresh tide-vllm (plain, relayed stream, simple-API stream) until its JIT has settled. */
async function prewarm(target: Target, backendPid: number, ms: number): Promise<void> {
  const parts: Array<[Kind, TargetName, number]> = [
    ['nonstream', 'relay', ms / 2],
    ['fast', 'relay', ms / 4],
    ['fast', 'simple', ms / 4],
  ];
  for (const [kind, name, durationMs] of parts) {
    const req = requestFor(kind, name);
    await runLoadgen({ origin: target.origin, ...req, concurrency: 32, rampMs: 0, warmupMs: 0, durationMs, recordGaps: false, proxyPids: [], backendPids: [backendPid] });
  }
}

/** The planned cases by scenario (kind and concurrency), in plan order. */
function scenarios(cases: Planned[]): Planned[][] {
  const groups: Planned[][] = [];
  for (const p of cases) {
    const last = groups[groups.length - 1];
    if (last && last[0].kind === p.kind && last[0].concurrency === p.concurrency) last.push(p);
    else groups.push([p]);
  }
  return groups;
}

/**
 * The median of a case's runs: by CPU per request or event (the targets' measure), or by
 * throughput where no proxy is measured (direct). A failed run counts only when all failed.
 */
function medianRun(runs: CaseResult[]): CaseResult {
  const ok = runs.filter((c) => c.result !== null);
  if (ok.length === 0) return runs[0];
  const key = (c: CaseResult) => cpuPerUnit(c) ?? -rate(c);
  const sorted = [...ok].sort((a, b) => key(a) - key(b));
  return sorted[Math.floor((sorted.length - 1) / 2)];
}

function say(line: string): void {
  process.stderr.write(line + '\n');
}

function brief(c: CaseResult): string {
  const r = c.result;
  if (!r) return `FAILED ${c.failure}`;
  const ms = (v: number | null, atLeast?: boolean) => (v === null ? '—' : `${atLeast ? '≥' : ''}${v.toFixed(2)}`);
  const n =
    c.kind === 'nonstream'
      ? `${Math.round((r.completed * 1000) / r.windowMs)} req/s p99 ${ms(r.latencyMs.p99)} ms`
      : `${Math.round((r.events * 1000) / r.windowMs)} events/s TTFE p99 ${ms(r.ttfeMs.p99, r.ttfeMs.p99AtLeast)} ms${c.kind === 'paced' ? ` gap p99 ${ms(r.gapMs.p99)} ms` : ''}`;
  const cpu = r.proxyCpuMs === null ? '' : ` proxy CPU ${Math.round((100 * r.proxyCpuMs) / r.windowMs)}%`;
  return `${n}${cpu}${r.errors ? ` errors ${r.errors} (${r.firstError})` : ''}`;
}

function nginxVersion(bin: string): string {
  const out = spawnSync(bin, ['-v'], { encoding: 'utf8' });
  return (out.stderr || out.stdout).trim().replace(/^nginx version:\s*/, '') || 'nginx';
}

/** CPU used by the whole machine over the next half second, % of one core. */
async function machineLoad(): Promise<number> {
  const before = machineBusyTicks();
  await sleep(500);
  return (machineBusyTicks() - before) * 2; // 100 ticks/s: ticks in 1 s = % of one core
}

/** Waits up to `seconds` for the machine to use under QUIET_PCT of one core; returns the last load seen. */
async function waitQuiet(seconds: number): Promise<number> {
  const deadline = Date.now() + seconds * 1000;
  let load = await machineLoad();
  let said = false;
  while (load > QUIET_PCT && Date.now() < deadline) {
    if (!said) say(`bench: other processes use ${load}% CPU; waiting up to ${seconds} s for quiet`);
    said = true;
    load = await machineLoad();
  }
  return load;
}

async function main(): Promise<void> {
  const started = Date.now();
  const opts = parseOptions(process.argv.slice(2));
  const loadAtStart = await waitQuiet(opts.waitQuietS);
  if (loadAtStart > QUIET_PCT) say(`bench: warning: other processes use ${loadAtStart}% of a core; figures will be disturbed`);
  const dir = mkdtempSync(join(tmpdir(), 'tide-bench-'));
  const nginxBin = findNginx();
  const wantNginx = opts.only.has('nginx');
  const nginxSkipped =
    nginxBin === null && wantNginx
      ? 'nginx is not installed, so its column is skipped. Install it with `sudo apt-get install -y nginx` (Debian/Ubuntu) and run again.'
      : null;
  if (nginxSkipped) say(`bench: ${nginxSkipped}`);
  const cases = plan(opts, nginxBin !== null);
  const needGateway = cases.some((c) => GROUP_OF[c.target] === 'relay' || c.target === 'simple') || (opts.profile && opts.only.has('relay'));
  const profiling = opts.profile && opts.only.has('relay');
  const memoryCases = opts.quick ? [] : (['relay', 'simple'] as const).filter((t) => opts.only.has(t));
  say(
    `bench: ${cases.length} cases of ${opts.warmupMs / 1000} + ${opts.durationMs / 1000} s` +
      `${memoryCases.length ? `, ${memoryCases.length} memory cases` : ''}${profiling ? `, ${PROFILED.length} profiled cases` : ''}; temp dir ${dir}`,
  );

  const targets = new Map<TargetName, Target>();
  const stops: Array<() => Promise<void>> = [];
  let backend: Backend | null = null;
  const results: CaseResult[] = [];
  const memory: CaseResult[] = [];
  const profiles: ProfileReport[] = [];
  try {
    backend = await startBackend();
    stops.push(backend.stop);
    targets.set('direct', backend);
    const backendPort = backend.port;
    const start = async (name: TargetName, make: () => Promise<Target>) => {
      if (!cases.some((c) => c.target === name)) return;
      const t = await make();
      stops.push(t.stop);
      targets.set(name, t);
    };
    if (nginxBin) {
      await start('nginx', () => startNginx({ bin: nginxBin, backendPort, dir, name: 'nginx', workers: '1' }));
      await start('nginx-auto', () => startNginx({ bin: nginxBin, backendPort, dir, name: 'nginx-auto', workers: 'auto' }));
    }
    for (const name of ['floor', 'floor-raw'] as const) {
      await start(name, () => startFloorRelay(backendPort, name === 'floor-raw'));
      const floor = targets.get(name);
      if (floor) await prewarm(floor, backend.pid, PREWARM_MS); // the same JIT warm-up as tide-vllm gets
    }
    if (needGateway) {
      const gateway = cases.some((c) => c.target === 'relay' || c.target === 'simple') ? await startGateway({ backendPort, dir, name: 'tide', logLevel: 'warn' }) : null;
      if (gateway) {
        stops.push(gateway.stop);
        targets.set('relay', gateway);
        targets.set('simple', gateway);
        await prewarm(gateway, backend.pid, PREWARM_MS);
      }
      // A second gateway, idle except for its own case, so info vs warn logging compare minutes apart at most.
      await start('relay-info', () => startGateway({ backendPort, dir, name: 'tide-info', logLevel: 'info' }));
      const info = targets.get('relay-info');
      if (info) await prewarm(info, backend.pid, PREWARM_MS);
    }

    const measure = async (p: Planned, target: Target): Promise<CaseResult> => {
      const req = requestFor(p.kind, p.target);
      // Paced streams start spread over one stream's length, so they do not start and end in lockstep.
      const rampMs = p.kind === 'paced' ? PACED_TOKENS * PACE_MS : 0;
      const spec: LoadSpec = {
        origin: target.origin,
        ...req,
        concurrency: p.concurrency,
        rampMs,
        warmupMs: Math.max(opts.warmupMs, rampMs + 200),
        durationMs: p.kind === 'paced' ? opts.durationMs * PACED_WINDOW_FACTOR : opts.durationMs,
        recordGaps: p.kind === 'paced',
        proxyPids: target.pids,
        backendPids: [backend!.pid],
      };
      try {
        return { ...p, result: await runLoadgen(spec) };
      } catch (err) {
        return { ...p, result: null, failure: (err as Error).message };
      } finally {
        await sleep(SETTLE_MS);
      }
    };

    const measureQuietly = async (p: Planned): Promise<CaseResult> => {
      let c = await measure(p, targets.get(p.target)!);
      const noise = (r: LoadResult) => Math.round((100 * otherCpuMs(r)) / r.windowMs);
      if (opts.waitQuietS > 0 && c.result && noise(c.result) > NOISY_PCT) {
        say(`  (other processes used ${noise(c.result)}% CPU during ${p.kind} ${p.concurrency} ${p.target}: measuring it again)`);
        await waitQuiet(opts.waitQuietS);
        const again = await measure(p, targets.get(p.target)!);
        if (again.result && noise(again.result) < noise(c.result)) c = again;
      }
      return c;
    };

    for (const group of scenarios(cases)) {
      await backend.setPace(group[0].kind === 'paced' ? PACE_MS : 0);
      if (opts.waitQuietS > 0) await waitQuiet(opts.waitQuietS);
      const runs = new Map<Planned, CaseResult[]>(group.map((p) => [p, []]));
      for (let round = 0; round < opts.rounds; round++) {
        // Alternating order, so that no target always runs first (or last) in the scenario's minutes.
        for (const p of round % 2 === 0 ? group : [...group].reverse()) {
          const c = await measureQuietly(p);
          runs.get(p)!.push(c);
          const label = opts.rounds > 1 ? ` (round ${round + 1}/${opts.rounds})` : '';
          say(`  ${p.kind.padEnd(9)} ${String(p.concurrency).padStart(3)}  ${TARGET_LABELS[p.target].padEnd(38)} ${brief(c)}${label}`);
        }
      }
      for (const p of group) results.push(medianRun(runs.get(p)!));
    }

    // RSS at 256 concurrent streams, each route in a fresh tide-vllm (no heap grown by earlier cases).
    if (memoryCases.length > 0) {
      await backend.setPace(PACE_MS);
      if (opts.waitQuietS > 0) await waitQuiet(opts.waitQuietS);
      for (const target of memoryCases) {
        const gateway = await startGateway({ backendPort, dir, name: `tide-mem-${target}`, logLevel: 'warn' });
        const c = await measure({ kind: 'paced', concurrency: 256, target }, gateway).finally(() => gateway.stop());
        memory.push(c);
        say(`  memory    256  ${TARGET_LABELS[target].padEnd(38)} ${brief(c)}`);
      }
    }

    if (profiling) {
      await backend.setPace(0);
      if (opts.waitQuietS > 0) await waitQuiet(opts.waitQuietS);
      const profDir = join(dir, 'cpu-prof');
      const gateway = await startGateway({ backendPort, dir, name: 'tide-prof', logLevel: 'warn', nodeArgs: ['--cpu-prof', `--cpu-prof-dir=${profDir}`] });
      await prewarm(gateway, backend.pid, PREWARM_MS);
      const windows: Array<{ title: string; c: CaseResult }> = [];
      for (const [kind, concurrency, target, title] of PROFILED) {
        if (!opts.only.has(GROUP_OF[target])) continue;
        await backend.setPace(kind === 'paced' ? PACE_MS : 0);
        const c = await measure({ kind, concurrency, target }, gateway);
        say(`  profiled  ${title}: ${brief(c)}`);
        windows.push({ title, c });
      }
      await gateway.stop();
      const file = readdirSync(profDir).find((f) => f.endsWith('.cpuprofile'));
      if (!file) throw new Error(`node --cpu-prof wrote no profile in ${profDir}`);
      for (const { title, c } of windows) {
        if (!c.result) continue;
        profiles.push({ title: `${title} (with the profiler on: ${brief(c)})`, summary: summarizeProfile(join(profDir, file), c.result.windowStartUs, c.result.windowEndUs) });
      }
    }
  } finally {
    for (const stop of stops.reverse()) await stop().catch(() => undefined);
  }

  const { markdown, checks } = renderReport(
    {
      date: new Date().toISOString(),
      node: process.version,
      cpu: cpuModel(),
      cores: cpus().length,
      nginx: nginxBin ? `nginx ${nginxVersion(nginxBin)}` : null,
      nginxSkipped,
      warmupMs: opts.warmupMs,
      durationMs: opts.durationMs,
      pacedWindowFactor: PACED_WINDOW_FACTOR,
      nonStreamTokens: NON_STREAM_TOKENS,
      fastTokens: FAST_TOKENS,
      pacedTokens: PACED_TOKENS,
      paceMs: PACE_MS,
      quick: opts.quick,
      rounds: opts.rounds,
      loadAtStartPct: loadAtStart,
      totalSeconds: (Date.now() - started) / 1000,
    },
    new Results(results),
    memory,
    profiles,
  );
  mkdirSync(dirname(opts.out), { recursive: true });
  writeFileSync(opts.out, markdown);
  process.stdout.write(markdown + '\n');
  say(`bench: wrote ${opts.out}; ${checks.filter((c) => c.ok === true).length} PASS, ${checks.filter((c) => c.ok === false).length} MISS`);
  rmSync(dir, { recursive: true, force: true });
  const failed = [...results, ...memory].filter((c) => !c.result);
  if (failed.length > 0) {
    say(`bench: ${failed.length} case(s) failed`);
    process.exitCode = 1;
  }
}

main().catch((err: Error) => {
  process.stderr.write(`bench: ${err.stack ?? err.message}\n`);
  process.exit(1);
});
