// Turns the measured cases into bench/results.md: one table per scenario with ratios to the
// direct backend and to nginx, the issue's targets as PASS/MISS, and the profile summaries.
import type { LoadResult, Percentiles } from './loadgen';
import type { ProfileSummary } from './profile';

export type Kind = 'nonstream' | 'fast' | 'paced';
export type TargetName = 'direct' | 'nginx' | 'nginx-auto' | 'floor' | 'floor-raw' | 'relay' | 'relay-info' | 'simple';

export interface CaseResult {
  kind: Kind;
  concurrency: number;
  target: TargetName;
  result: LoadResult | null;
  failure?: string;
}

export interface RunInfo {
  date: string;
  node: string;
  cpu: string;
  cores: number;
  nginx: string | null;
  nginxSkipped: string | null;
  warmupMs: number;
  durationMs: number;
  /** Paced cases are measured this many times longer. */
  pacedWindowFactor: number;
  nonStreamTokens: number;
  fastTokens: number;
  pacedTokens: number;
  paceMs: number;
  quick: boolean;
  /** Times each case was measured (the median run is shown). */
  rounds: number;
  /** CPU used by other processes in the second before the run, % of one core. */
  loadAtStartPct: number;
  totalSeconds: number;
}

export interface ProfileReport {
  title: string;
  summary: ProfileSummary;
}

export const TARGET_LABELS: Record<TargetName, string> = {
  direct: 'direct (backend)',
  nginx: 'nginx, 1 worker',
  'nginx-auto': 'nginx, workers auto',
  floor: 'floor: bare node:http + undici',
  'floor-raw': 'raw floor: net sockets, HTTP by hand',
  relay: 'tide-vllm OpenAI relay',
  'relay-info': 'tide-vllm OpenAI relay, logging info',
  simple: 'tide-vllm simple API',
};

const fmtInt = (n: number) => (Number.isFinite(n) ? Math.round(n).toLocaleString('en-US') : '—');
const fmt = (n: number | null | undefined, digits: number) => (n === null || n === undefined || !Number.isFinite(n) ? '—' : n.toFixed(digits));
/** A percentile, "≥ x" when it is only a lower bound (streams still waiting for their first event at the end). */
const fmtP = (p: Percentiles, which: 'p50' | 'p99', digits = 2) => `${p[`${which}AtLeast`] ? '≥ ' : ''}${fmt(p[which], digits)}`;
const pct = (n: number | null) => (n === null || !Number.isFinite(n) ? '—' : `${Math.round(n * 100)}%`);

/** Throughput: requests/s for plain answers, events/s for streams. */
export function rate(c: CaseResult): number {
  const r = c.result;
  if (!r) return NaN;
  return ((c.kind === 'nonstream' ? r.completed : r.events) * 1000) / r.windowMs;
}

/** Proxy CPU per relayed request (plain) or event (streams), µs. */
export function cpuPerUnit(c: CaseResult): number | null {
  const r = c.result;
  if (!r || r.proxyCpuMs === null) return null;
  const units = c.kind === 'nonstream' ? r.completed : r.events;
  return units > 0 ? (r.proxyCpuMs * 1000) / units : null;
}

/** CPU per unit with the kernel's share: "60.2 (41% sys)". */
const cpuCell = (c: CaseResult, digits: number) => {
  const per = cpuPerUnit(c);
  const r = c.result!;
  if (per === null || !r.proxyCpuMs) return fmt(per, digits);
  return `${fmt(per, digits)} (${Math.round((100 * (r.proxySysMs ?? 0)) / r.proxyCpuMs)}% sys)`;
};
const cpuPct = (ms: number | null, r: LoadResult) => (ms === null ? '—' : `${Math.round((100 * ms) / r.windowMs)}%`);
/** CPU used by processes other than the proxy, the backend and the load generator: noise. */
export const otherCpuMs = (r: LoadResult) => Math.max(0, r.machineCpuMs - (r.proxyCpuMs ?? 0) - r.backendCpuMs - r.loadgenCpuMs);
const rssMb = (r: LoadResult) =>
  r.proxyPeakRssKb === null ? '—' : `${fmt((r.proxyStartRssKb ?? NaN) / 1024, 0)} → ${fmt(r.proxyPeakRssKb / 1024, 0)}`;

export class Results {
  constructor(readonly cases: CaseResult[]) {}

  find(kind: Kind, concurrency: number, target: TargetName): CaseResult | undefined {
    return this.cases.find((c) => c.kind === kind && c.concurrency === concurrency && c.target === target && c.result);
  }

  ratio(c: CaseResult, to: TargetName): number | null {
    const base = this.find(c.kind, c.concurrency, to);
    if (!base || !c.result) return null;
    const r = rate(c) / rate(base);
    return Number.isFinite(r) ? r : null;
  }

  concurrencies(kind: Kind): number[] {
    return [...new Set(this.cases.filter((c) => c.kind === kind).map((c) => c.concurrency))].sort((a, b) => a - b);
  }
}

function table(header: string[], rows: string[][]): string {
  const line = (cells: string[]) => `| ${cells.join(' | ')} |`;
  return [line(header), line(header.map((_h, i) => (i < 2 ? '---' : '---:'))), ...rows.map(line)].join('\n');
}

function failureRow(c: CaseResult, width: number): string[] {
  return [String(c.concurrency), TARGET_LABELS[c.target], `failed: ${c.failure ?? 'no result'}`, ...Array(width - 3).fill('')];
}

const RATIO_HEADERS = ['vs direct', 'vs nginx', 'vs floor'];

/** Where the CPU went, the proxy's memory, and the failures: the same columns in every table. */
function resourceCells(r: LoadResult): string[] {
  return [cpuPct(r.proxyCpuMs, r), cpuPct(r.backendCpuMs, r), cpuPct(r.loadgenCpuMs, r), cpuPct(otherCpuMs(r), r), rssMb(r), String(r.errors)];
}

/** Throughput relative to the direct backend, to nginx (the C reference) and to the Node floor. */
function ratioCells(res: Results, c: CaseResult): string[] {
  const references: TargetName[] = ['direct', 'nginx', 'floor'];
  return references.map((to) => (c.target === to || c.target === 'direct' || (to === 'floor' && (c.target.startsWith('nginx') || c.target === 'floor-raw')) ? '' : pct(res.ratio(c, to))));
}

/** The non-streaming and the fast-streaming tables: the same columns but for what "latency" is. */
function rateTable(res: Results, kind: 'nonstream' | 'fast'): string {
  const stream = kind === 'fast';
  const header = [
    stream ? 'streams' : 'conc.',
    'target',
    stream ? 'events/s' : 'req/s',
    stream ? 'TTFE p50 ms' : 'p50 ms',
    stream ? 'TTFE p99 ms' : 'p99 ms',
    stream ? 'proxy CPU µs/event' : 'proxy CPU µs/req',
    'proxy CPU',
    'backend CPU',
    'loadgen CPU',
    'other CPU',
    'proxy RSS MB start → peak',
    'errors',
    ...RATIO_HEADERS,
  ];
  const rows = res.cases
    .filter((c) => c.kind === kind)
    .map((c) => {
      const r = c.result;
      if (!r) return failureRow(c, header.length);
      return [
        String(c.concurrency),
        TARGET_LABELS[c.target],
        fmtInt(rate(c)),
        stream ? fmtP(r.ttfeMs, 'p50') : fmt(r.latencyMs.p50, 2),
        stream ? fmtP(r.ttfeMs, 'p99') : fmt(r.latencyMs.p99, 2),
        cpuCell(c, stream ? 2 : 1),
        ...resourceCells(r),
        ...ratioCells(res, c),
      ];
    });
  return table(header, rows);
}

/** Added p99 (TTFE or inter-event gap) of a paced case over the direct backend, ms. */
export function addedP99(res: Results, c: CaseResult, what: 'ttfeMs' | 'gapMs'): number | null {
  const base = res.find('paced', c.concurrency, 'direct');
  if (!base?.result || !c.result) return null;
  const [mine, direct] = [c.result[what].p99, base.result[what].p99];
  return mine === null || direct === null ? null : mine - direct; // a lower bound if mine is
}

function pacedTable(res: Results): string {
  const header = ['streams', 'target', 'events/s', 'TTFE p50 / p99 ms', 'gap p50 / p99 ms', '+TTFE p99 ms', '+gap p99 ms', 'proxy CPU µs/event', 'proxy CPU', 'backend CPU', 'loadgen CPU', 'other CPU', 'proxy RSS MB start → peak', 'errors'];
  const rows = res.cases
    .filter((c) => c.kind === 'paced')
    .map((c) => {
      const r = c.result;
      if (!r) return failureRow(c, header.length);
      const direct = c.target === 'direct';
      return [
        String(c.concurrency),
        TARGET_LABELS[c.target],
        fmtInt(rate(c)),
        `${fmtP(r.ttfeMs, 'p50')} / ${fmtP(r.ttfeMs, 'p99')}`,
        `${fmt(r.gapMs.p50, 2)} / ${fmt(r.gapMs.p99, 2)}`,
        direct ? '' : fmt(addedP99(res, c, 'ttfeMs'), 2),
        direct ? '' : fmt(addedP99(res, c, 'gapMs'), 2),
        cpuCell(c, 1),
        ...resourceCells(r),
      ];
    });
  return table(header, rows);
}

export interface TargetCheck {
  ok: boolean | null; // null: not measured in this run
  text: string;
}

/** The issue's targets (information, not an exit code). */
export function checkTargets(res: Results, memory: CaseResult[], nginxMissing: boolean): TargetCheck[] {
  const checks: TargetCheck[] = [];
  const notMeasured = (what: string, why = 'not measured in this run') => checks.push({ ok: null, text: `${what}: ${why}` });
  const noNginx = nginxMissing ? 'nginx is not installed' : 'not measured in this run';

  // Plain answers.
  const relay64 = res.find('nonstream', 64, 'relay');
  const ratio = relay64 ? res.ratio(relay64, 'nginx') : null;
  if (ratio === null) notMeasured('OpenAI relay non-stream req/s at c=64 ≥ 50% of nginx', relay64 ? noNginx : undefined);
  else checks.push({ ok: ratio >= 0.5, text: `OpenAI relay non-stream req/s at c=64 ≥ 50% of nginx: ${pct(ratio)} (${fmtInt(rate(relay64!))} vs ${fmtInt(rate(res.find('nonstream', 64, 'nginx')!))} req/s)` });
  for (const conc of res.concurrencies('nonstream')) {
    const c = res.find('nonstream', conc, 'relay');
    const cpu = c ? cpuPerUnit(c) : null;
    if (cpu !== null) checks.push({ ok: cpu <= 60, text: `OpenAI relay non-stream CPU per request ≤ 60 µs at c=${conc}: ${fmt(cpu, 1)} µs` });
  }
  if (!relay64) notMeasured('OpenAI relay non-stream CPU per request ≤ 60 µs');

  // Streams, tokens as fast as possible.
  for (const conc of res.concurrencies('fast')) {
    const c = res.find('fast', conc, 'relay');
    if (!c) continue;
    const r = res.ratio(c, 'nginx');
    if (r === null) notMeasured(`OpenAI relay fast stream events/s at ${conc} streams ≥ 50% of nginx`, noNginx);
    else checks.push({ ok: r >= 0.5, text: `OpenAI relay fast stream events/s at ${conc} streams ≥ 50% of nginx: ${pct(r)} (${fmtInt(rate(c))} vs ${fmtInt(rate(res.find('fast', conc, 'nginx')!))} events/s)` });
    const cpu = cpuPerUnit(c);
    if (cpu !== null) checks.push({ ok: cpu <= 3, text: `OpenAI relay fast stream CPU per event ≤ 3 µs at ${conc} streams: ${fmt(cpu, 2)} µs` });
  }
  for (const conc of res.concurrencies('fast')) {
    const c = res.find('fast', conc, 'simple');
    const cpu = c ? cpuPerUnit(c) : null;
    if (cpu !== null) checks.push({ ok: cpu <= 6, text: `simple API (re-framed) fast stream CPU per event ≤ 6 µs at ${conc} streams: ${fmt(cpu, 2)} µs` });
  }

  // Paced streams.
  for (const target of ['relay', 'simple'] as const) {
    for (const conc of res.concurrencies('paced')) {
      const c = res.find('paced', conc, target);
      if (!c) continue;
      const name = `${target === 'relay' ? 'OpenAI relay' : 'simple API'} paced, ${conc} streams`;
      const cpu = cpuPerUnit(c);
      if (cpu !== null) checks.push({ ok: cpu <= 30, text: `${name}: CPU per token ≤ 30 µs: ${fmt(cpu, 1)} µs` });
      const ttfe = addedP99(res, c, 'ttfeMs');
      const gap = addedP99(res, c, 'gapMs');
      if (ttfe === null || gap === null) notMeasured(`${name}: added p99 latency vs direct`, 'direct not measured');
      else {
        checks.push({ ok: ttfe <= 3, text: `${name}: TTFE p99 + ≤ 3 ms vs direct: ${fmt(ttfe, 2)} ms` });
        checks.push({ ok: gap <= 3, text: `${name}: per-token p99 + ≤ 3 ms vs direct: ${fmt(gap, 2)} ms` });
      }
    }
  }

  // Memory at 256 streams: the fresh-process cases when there are some.
  const pool = memory.some((c) => c.result) ? memory : res.cases;
  const at256 = pool.filter((c) => c.concurrency === 256 && c.kind !== 'nonstream' && (c.target === 'relay' || c.target === 'simple') && c.result?.proxyPeakRssKb);
  if (at256.length === 0) notMeasured('tide-vllm RSS < 150 MB at 256 concurrent streams');
  else {
    const worst = at256.reduce((a, b) => (a.result!.proxyPeakRssKb! >= b.result!.proxyPeakRssKb! ? a : b));
    const mb = worst.result!.proxyPeakRssKb! / 1024;
    checks.push({ ok: mb < 150, text: `tide-vllm RSS < 150 MB at 256 concurrent streams: peak ${fmt(mb, 0)} MB (${TARGET_LABELS[worst.target]}, ${worst.kind})` });
  }
  return checks;
}

function noiseWarning(info: RunInfo, res: Results): string[] {
  const worst = Math.max(0, ...res.cases.map((c) => (c.result ? (100 * otherCpuMs(c.result)) / c.result.windowMs : 0)));
  if (worst <= 20 && info.loadAtStartPct <= 20) return [];
  return [
    `- **Warning: other processes were busy (${info.loadAtStartPct}% of a core just before the run, up to ${Math.round(worst)}% during a case): the figures are disturbed; rerun on a quiet machine (\`--wait-quiet\` waits for one).**`,
  ];
}

function profileSection(p: ProfileReport): string {
  const s = p.summary;
  const rows = (list: ProfileSummary['functions']) => list.map((r) => [`${fmt(r.pct, 1)}%`, fmt(r.selfMs, 0), '`' + r.name.replace(/\|/g, '\\|') + '`']);
  const t = (head: string, list: ProfileSummary['functions'], kind = 'self') => {
    const line = (cells: string[]) => `| ${cells.join(' | ')} |`;
    return [line([`${kind} %`, `${kind} ms`, head]), line(['---:', '---:', '---']), ...rows(list).map(line)].join('\n');
  };
  return [
    `### ${p.title}`,
    '',
    `${fmt(s.busyMs, 0)} ms busy of ${fmt(s.windowMs, 0)} ms sampled${s.windowed ? ' in the measured window' : ' (whole process: the window did not match the profile clock)'}; percentages are of the busy time.`,
    '',
    t('function (file:line)', s.functions),
    '',
    t('file or package', s.files),
    '',
    'Inclusive time (self + callees) of package and application functions:',
    '',
    t('function (file:line)', s.inclusive, 'incl.'),
  ].join('\n');
}

function memoryTable(memory: CaseResult[]): string {
  const header = ['streams', 'target', 'events/s', 'RSS before MB', 'peak RSS MB', 'errors'];
  return table(
    header,
    memory.map((c) => {
      const r = c.result;
      if (!r) return failureRow(c, header.length);
      return [String(c.concurrency), TARGET_LABELS[c.target], fmtInt(rate(c)), fmt((r.proxyStartRssKb ?? NaN) / 1024, 0), fmt((r.proxyPeakRssKb ?? NaN) / 1024, 0), String(r.errors)];
    }),
  );
}

export function renderReport(info: RunInfo, res: Results, memory: CaseResult[], profiles: ProfileReport[]): { markdown: string; checks: TargetCheck[] } {
  const checks = checkTargets(res, memory, info.nginx === null);
  const mark = (c: TargetCheck) => (c.ok === null ? 'N/A ' : c.ok ? 'PASS' : 'MISS');
  const sections = [
    '# tide-vllm benchmark',
    '',
    `- Date: ${info.date}`,
    `- Node ${info.node}; CPU: ${info.cpu} × ${info.cores} cores; ${info.nginx ?? 'nginx: not installed'}`,
    `- ${info.quick ? 'Quick run (--quick). ' : ''}Each case: ${info.warmupMs / 1000} s warm-up (paced: ≥ 1.2 s, streams started spread over 1 s), then ${info.durationMs / 1000} s measured (paced: ${(info.durationMs * info.pacedWindowFactor) / 1000} s, so that p99 rests on hundreds of first events); ` +
      'each tide-vllm got 4 s of unmeasured load after it started (its JIT needs that: CPU per request falls ~4× over the first seconds); ' +
      `load generator, proxy and backend are separate processes sharing the same cores; all on 127.0.0.1. Whole run: ${Math.round(info.totalSeconds)} s.`,
    ...(info.rounds > 1
      ? [
          `- Each case was measured ${info.rounds} times (--rounds), the targets of a scenario in alternating order; the run shown is the median one by CPU per request or event (direct: by throughput).`,
        ]
      : []),
    '- **This machine drifts 15–30% over minutes: compare ratios within one run only, never absolute numbers across runs.**',
    `- CPU = utime+stime of the proxy's processes (/proc/<pid>/stat, 100 ticks/s) over the measured window, divided by requests or events received by the client; "proxy CPU" etc. are % of one core (the machine has ${info.cores * 100}%). ` +
      `"other CPU" = everything else on the machine (/proc/stat) in the window: noise (a case above 30% is measured once more after waiting for quiet, and the quieter run kept). RSS: VmRSS before the case → its peak (sampled every 100 ms).`,
    ...noiseWarning(info, res),
    ...(info.nginxSkipped ? [`- ${info.nginxSkipped}`] : []),
    '',
    `## Non-streaming: POST /v1/chat/completions (max_tokens ${info.nonStreamTokens}, a fixed ~700-byte answer)`,
    '',
    rateTable(res, 'nonstream'),
    '',
    `## Streaming, tokens written as fast as possible (${info.fastTokens} tokens per stream)`,
    '',
    'OpenAI relay: POST /v1/chat/completions with "stream": true (relayed byte for byte). Simple API: POST /chat/completions with {"prompt":"hi","stream":true} (parsed and re-framed). Events = SSE events received by the client, [DONE] included. TTFE here is mostly queueing behind the streams in flight; "≥ x": streams started in the window were still waiting for their first event at its end.',
    '',
    rateTable(res, 'fast'),
    '',
    `## Streaming, paced at ${info.paceMs} ms per token (${info.pacedTokens} tokens per stream)`,
    '',
    'gap = time between two events as seen by the client (per-token latency); "+" = added p99 vs direct in this run. TTFE "≥ x": streams started in the window were still waiting for their first event at its end.',
    '',
    pacedTable(res),
    '',
    ...(memory.length > 0
      ? [
          `## Memory: ${memory[0].concurrency} concurrent streams, each route in a fresh tide-vllm process (paced, ${info.pacedTokens} tokens)`,
          '',
          memoryTable(memory),
          '',
        ]
      : []),
    '## Targets (issue 4, item 8)',
    '',
    ...checks.map((c) => `- ${mark(c)} ${c.text}`),
    '',
  ];
  const logCase = res.find('nonstream', 64, 'relay-info');
  const warnCase = res.find('nonstream', 64, 'relay');
  if (logCase && warnCase) {
    const cost = (cpuPerUnit(logCase) ?? NaN) - (cpuPerUnit(warnCase) ?? NaN);
    sections.push(
      '## Access logging',
      '',
      `logging.level info (one access-log line per request) vs warn, OpenAI relay non-stream at c=64: ${fmtInt(rate(logCase))} vs ${fmtInt(rate(warnCase))} req/s (${pct(rate(logCase) / rate(warnCase))}); ` +
        `${fmt(cpuPerUnit(logCase), 1)} vs ${fmt(cpuPerUnit(warnCase), 1)} µs CPU per request (${cost >= 0 ? '+' : ''}${fmt(cost, 1)} µs).`,
      '',
    );
  }
  if (profiles.length > 0) {
    sections.push(
      '## CPU profiles of tide-vllm (node --cpu-prof)',
      '',
      'V8 samples the main thread by wall time while it is not idle, so a function that was descheduled (by the other processes on these 2 cores) is charged for the wait: ' +
        'syscalls that wake another process (writev to a loopback socket) look heavier than their CPU cost. GC helper threads are not in the profile.',
      '',
      ...profiles.flatMap((p) => [profileSection(p), '']));
  }
  return { markdown: sections.join('\n'), checks };
}
