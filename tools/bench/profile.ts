// Summarizes a V8 .cpuprofile (node --cpu-prof): self time by function and by file or package,
// counted only over the samples of a time window (the measured load, not the boot).
import { readFileSync } from 'node:fs';

interface ProfileNode {
  id: number;
  callFrame: { functionName: string; url: string; lineNumber: number };
  children?: number[];
}

interface CpuProfile {
  nodes: ProfileNode[];
  startTime: number;
  endTime: number;
  samples: number[];
  timeDeltas: number[];
}

export interface ProfileRow {
  name: string;
  selfMs: number;
  /** Share of the busy (non-idle) time in the window, percent. */
  pct: number;
}

export interface ProfileSummary {
  /** Samples inside the window, ms; busy excludes (idle). */
  windowMs: number;
  busyMs: number;
  /** false when the window did not overlap the profile: every sample was counted. */
  windowed: boolean;
  functions: ProfileRow[];
  files: ProfileRow[];
  /** Inclusive (self + callees) time of package and application functions: who the cost is for. */
  inclusive: ProfileRow[];
}

/** Where a function lives, short: a package name, a node: module, or a path under dist/. */
export function sourceOf(url: string, functionName: string): string {
  if (url === '') return functionName.startsWith('(') ? functionName : '(native)';
  const pkg = /node_modules\/((?:@[^/]+\/)?[^/]+)\/(.*)$/.exec(url);
  if (pkg) return `${pkg[1]}`;
  if (url.startsWith('node:')) return url;
  const dist = /\/dist\/(.*)$/.exec(url);
  return dist ? dist[1] : url.replace(/^file:\/\//, '');
}

function nameOf(frame: ProfileNode['callFrame']): string {
  const { functionName, url, lineNumber } = frame;
  return url === '' ? functionName || '(anonymous)' : `${functionName || '(anonymous)'} ${shortUrl(url)}:${lineNumber + 1}`;
}

function shortUrl(url: string): string {
  const pkg = /node_modules\/((?:@[^/]+\/)?[^/]+)\/(.*)$/.exec(url);
  if (pkg) return `${pkg[1]}/${pkg[2]}`;
  const dist = /\/dist\/(.*)$/.exec(url);
  return dist ? dist[1] : url.replace(/^file:\/\//, '');
}

/**
 * Aggregates self time over the samples taken between startUs and endUs (monotonic µs, the clock
 * of the profile's timestamps); falls back to the whole profile when the window misses it.
 */
export function summarizeProfile(file: string, startUs: number, endUs: number, top = 20): ProfileSummary {
  const profile = JSON.parse(readFileSync(file, 'utf8')) as CpuProfile;
  const byId = new Map<number, ProfileNode>();
  for (const node of profile.nodes) byId.set(node.id, node);
  const windowed = profile.startTime < endUs && profile.endTime > startUs;
  const parentOf = new Map<number, number>();
  for (const node of profile.nodes) for (const child of node.children ?? []) parentOf.set(child, node.id);
  const selfUs = new Map<number, number>();
  const inclusiveUs = new Map<string, number>();
  let t = profile.startTime;
  for (let i = 0; i < profile.samples.length; i++) {
    t += profile.timeDeltas[i];
    if (windowed && (t < startUs || t > endUs)) continue;
    // A sample stands for the time until the next one.
    const span = profile.timeDeltas[i + 1] ?? 0;
    const leaf = profile.samples[i];
    selfUs.set(leaf, (selfUs.get(leaf) ?? 0) + span);
    if (byId.get(leaf)!.callFrame.functionName === '(idle)') continue;
    const seen = new Set<string>();
    for (let id: number | undefined = leaf; id !== undefined; id = parentOf.get(id)) {
      const frame = byId.get(id)!.callFrame;
      if (frame.url === '' || frame.url.startsWith('node:')) continue;
      const name = nameOf(frame);
      if (seen.has(name)) continue; // recursion counts once
      seen.add(name);
      inclusiveUs.set(name, (inclusiveUs.get(name) ?? 0) + span);
    }
  }
  const functions = new Map<string, number>();
  const files = new Map<string, number>();
  let totalUs = 0;
  let idleUs = 0;
  for (const [id, us] of selfUs) {
    const { functionName, url, lineNumber } = byId.get(id)!.callFrame;
    totalUs += us;
    if (functionName === '(idle)') {
      idleUs += us;
      continue;
    }
    const name = nameOf({ functionName, url, lineNumber });
    functions.set(name, (functions.get(name) ?? 0) + us);
    const source = sourceOf(url, functionName);
    files.set(source, (files.get(source) ?? 0) + us);
  }
  const busyUs = totalUs - idleUs;
  const rows = (map: Map<string, number>, n = top) =>
    [...map]
      .sort((a, b) => b[1] - a[1])
      .slice(0, n)
      .map(([name, us]) => ({ name, selfMs: us / 1000, pct: busyUs > 0 ? (100 * us) / busyUs : 0 }));
  return {
    windowMs: totalUs / 1000,
    busyMs: busyUs / 1000,
    windowed,
    functions: rows(functions),
    files: rows(files),
    inclusive: rows(inclusiveUs, 30),
  };
}
