/**
 * Simulator-only settings and fault injection, read from `VLLM_SIM_*` environment variables.
 * Real vLLM never reads these; tools/vllm-sim/README.md documents each one.
 */

export interface SimSettings {
  /** VLLM_SIM_LOAD_SECONDS: simulated model load; the port refuses connections meanwhile. */
  loadSeconds: number;
  /** VLLM_SIM_TTFT_MS: delay before the first token of each request. */
  ttftMs: number;
  /** VLLM_SIM_ITL_MS: delay between later tokens. */
  itlMs: number;
  /** VLLM_SIM_CRASH_ON_LOAD: the engine dies during load → RuntimeError, exit 1. */
  crashOnLoad: boolean;
  /** VLLM_SIM_CRASH_AFTER_REQUESTS=N: the whole server dies after N completed generations. */
  crashAfterRequests: number | null;
  /** VLLM_SIM_CRASH_MID_STREAM=K: the engine dies after K tokens of a streaming response. */
  crashMidStream: number | null;
  /** VLLM_SIM_CRASH_MID_STREAM_HARD: with CRASH_MID_STREAM, the whole process dies instead. */
  crashMidStreamHard: boolean;
  /** VLLM_SIM_IGNORE_SIGTERM: API server and engine ignore SIGTERM/SIGINT. */
  ignoreSigterm: boolean;
  /** VLLM_SIM_HANG: after load, accept connections but never answer. */
  hang: boolean;
  /** VLLM_SIM_HEALTH_DELAY_MS: /health and /ping answer this much later. */
  healthDelayMs: number;
  /** VLLM_SIM_FAIL_NTH_REQUEST=N: the Nth generation request fails with a 500. */
  failNthRequest: number | null;
  /** VLLM_SIM_ENGINE_EXIT_AFTER_MS: the engine dies this long after it is ready. */
  engineExitAfterMs: number | null;
  /**
   * VLLM_SIM_ENGINE_HANG_AFTER_TOKENS=K: the engine hangs once it has generated K tokens (a
   * kernel that never returns): it steps no more and answers nothing, while the API server's
   * /health stays 200 (vLLM's check_health only checks `errored`, A3) and its metrics freeze.
   */
  engineHangAfterTokens: number | null;
  /**
   * VLLM_SIM_CRASH_ON_LORA_LOAD_IF=FILE: while FILE exists, a LoRA load kills the server (an
   * EngineCore out of memory loading an adapter); the file is removed, so one launch dies.
   */
  crashOnLoraLoadIf: string | null;
  /** VLLM_SIM_WATCHDOG_SECONDS: the engine-death watchdog period (vLLM: 5 s). */
  watchdogSeconds: number;
  /** VLLM_SIM_ORPHAN_EXIT_S: an engine whose API server died exits after this long. */
  orphanExitSeconds: number;
}

const DEFAULTS = {
  loadSeconds: 0.5,
  ttftMs: 20,
  itlMs: 10,
  watchdogSeconds: 5,
  orphanExitSeconds: 600,
};

function truthy(value: string | undefined): boolean {
  return value !== undefined && ['1', 'true', 'yes'].includes(value.toLowerCase());
}

function number(value: string | undefined, fallback: number): number {
  const n = Number(value);
  return value === undefined || value === '' || !Number.isFinite(n) ? fallback : n;
}

function optionalPositive(value: string | undefined): number | null {
  const n = Number(value);
  return value === undefined || value === '' || !Number.isFinite(n) || n < 0 ? null : n;
}

export function readSimSettings(env: NodeJS.ProcessEnv = process.env): SimSettings {
  return {
    loadSeconds: number(env.VLLM_SIM_LOAD_SECONDS, DEFAULTS.loadSeconds),
    ttftMs: number(env.VLLM_SIM_TTFT_MS, DEFAULTS.ttftMs),
    itlMs: number(env.VLLM_SIM_ITL_MS, DEFAULTS.itlMs),
    crashOnLoad: truthy(env.VLLM_SIM_CRASH_ON_LOAD),
    crashAfterRequests: optionalPositive(env.VLLM_SIM_CRASH_AFTER_REQUESTS),
    crashMidStream: optionalPositive(env.VLLM_SIM_CRASH_MID_STREAM),
    crashMidStreamHard: truthy(env.VLLM_SIM_CRASH_MID_STREAM_HARD),
    ignoreSigterm: truthy(env.VLLM_SIM_IGNORE_SIGTERM),
    hang: truthy(env.VLLM_SIM_HANG),
    healthDelayMs: number(env.VLLM_SIM_HEALTH_DELAY_MS, 0),
    failNthRequest: optionalPositive(env.VLLM_SIM_FAIL_NTH_REQUEST),
    engineExitAfterMs: optionalPositive(env.VLLM_SIM_ENGINE_EXIT_AFTER_MS),
    engineHangAfterTokens: optionalPositive(env.VLLM_SIM_ENGINE_HANG_AFTER_TOKENS),
    crashOnLoraLoadIf: env.VLLM_SIM_CRASH_ON_LORA_LOAD_IF || null,
    watchdogSeconds: number(env.VLLM_SIM_WATCHDOG_SECONDS, DEFAULTS.watchdogSeconds),
    orphanExitSeconds: number(env.VLLM_SIM_ORPHAN_EXIT_S, DEFAULTS.orphanExitSeconds),
  };
}

/** The settings the engine process acts on, as EngineConfig carries them. */
export function engineSettings(
  settings: SimSettings,
): Pick<
  SimSettings,
  | 'loadSeconds'
  | 'ttftMs'
  | 'itlMs'
  | 'crashOnLoad'
  | 'engineExitAfterMs'
  | 'engineHangAfterTokens'
  | 'ignoreSigterm'
  | 'orphanExitSeconds'
> {
  return {
    loadSeconds: settings.loadSeconds,
    ttftMs: settings.ttftMs,
    itlMs: settings.itlMs,
    crashOnLoad: settings.crashOnLoad,
    engineExitAfterMs: settings.engineExitAfterMs,
    engineHangAfterTokens: settings.engineHangAfterTokens,
    ignoreSigterm: settings.ignoreSigterm,
    orphanExitSeconds: settings.orphanExitSeconds,
  };
}
