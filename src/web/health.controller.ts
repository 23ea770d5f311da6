import { Controller, Get, Injectable, Res } from '@nestjs/common';
import { ApiOperation, ApiTags } from '@nestjs/swagger';
import { HealthIndicatorService, type HealthIndicatorResult } from '@nestjs/terminus';
import type { FastifyReply } from 'fastify';
import { VLLMServerManager, isAsleep, type ServerSnapshot } from '../infrastructure/vllm-server.manager';
import { TrafficGate } from './traffic.gate';
import { outcomeOf } from './request-outcome';

type HealthStatus = 'healthy' | 'starting' | 'restarting' | 'degraded' | 'sleeping' | 'stopping' | 'disabled' | 'unhealthy';

/** /health's status word for each supervisor state (and mode). */
export function healthStatusOf(s: Pick<ServerSnapshot, 'state' | 'mode'> & { relaunching?: boolean }): HealthStatus {
  switch (s.state) {
    case 'ready':
      return 'healthy';
    case 'starting':
      if (s.mode === 'manual') return 'degraded';
      return s.relaunching ? 'restarting' : 'starting'; // a restart's model load is still the restart
    case 'unreachable':
      return 'degraded';
    case 'restarting':
      return 'restarting';
    case 'sleeping':
    case 'waking':
      return 'sleeping';
    case 'stopping':
      return 'stopping';
    case 'disabled':
      return 'disabled';
    case 'stopped':
    case 'failed':
      return 'unhealthy';
  }
}

/**
 * The status word and state that /health and /admin/status report: a drain (answers in flight
 * finish) is the service stopping, and still live, whatever vLLM's own state — also the drain
 * after vLLM failed for good (its state stays `failed`, the cause): a liveness probe failing then
 * would have Kubernetes restart the container in the middle of the drain.
 */
export function serviceStatus(s: Pick<ServerSnapshot, 'state' | 'mode' | 'relaunching'>, draining: boolean): { status: HealthStatus; state: string } {
  if (!draining || s.state === 'stopped') return { status: healthStatusOf(s), state: s.state };
  return { status: 'stopping', state: s.state === 'stopping' || s.state === 'failed' ? s.state : 'draining' };
}

/** vLLM's health as a terminus indicator, read from the supervisor's state: never waits on vLLM. */
@Injectable()
export class VllmHealthIndicator {
  constructor(
    private readonly indicators: HealthIndicatorService,
    private readonly manager: VLLMServerManager,
  ) {}

  check(): HealthIndicatorResult<'vllm'> {
    const snapshot = this.manager.snapshot();
    const indicator = this.indicators.check('vllm');
    const details = { state: snapshot.state, model: snapshot.model };
    // Asleep or waking, it serves: the next request wakes it, or waits for the wake-up under way.
    const serves = snapshot.state === 'ready' || isAsleep(snapshot.state);
    return serves ? indicator.up(details) : indicator.down(details);
  }
}

@ApiTags('health')
@Controller()
export class HealthController {
  constructor(
    private readonly indicator: VllmHealthIndicator,
    private readonly manager: VLLMServerManager,
    private readonly gate: TrafficGate,
  ) {}

  @Get('health')
  @ApiOperation({ summary: 'Liveness: 200 unless this service\'s vLLM is gone for good' })
  health(@Res({ passthrough: true }) res: FastifyReply) {
    const s = this.manager.snapshot();
    const { status, state } = serviceStatus(s, this.gate.isDraining);
    void res.status(status === 'unhealthy' ? 503 : 200);
    return {
      status,
      vllm_healthy: this.indicator.check().vllm.status === 'up',
      state,
      mode: s.mode,
      engine: s.engine,
      model: s.model,
      uptime_seconds: Math.round(process.uptime()),
      vllm_uptime_seconds: s.uptimeSeconds,
      restarts: s.restarts,
    };
  }

  @Get('ready')
  @ApiOperation({ summary: 'Readiness: 200 only while chat requests can be served' })
  ready(@Res({ passthrough: true }) res: FastifyReply) {
    const { state } = this.manager.snapshot();
    // A sleeping engine is ready: the next request wakes it.
    const ready = !this.gate.isDraining && (state === 'ready' || isAsleep(state));
    void res.status(ready ? 200 : 503);
    // Not ready is this probe's answer, not a failure: its access line (logging.access_log_probes) is a warning.
    if (!ready) outcomeOf(res.raw).refusedByState = true;
    return { ready, state: this.gate.isDraining ? 'draining' : state };
  }
}
