import { HealthIndicatorService } from '@nestjs/terminus';
import type { ServerState, VLLMServerManager } from '../infrastructure/vllm-server.manager';
import { VllmHealthIndicator, healthStatusOf, serviceStatus } from './health.controller';

function indicatorIn(state: ServerState): VllmHealthIndicator {
  const manager = { snapshot: () => ({ state, mode: 'auto', model: 'm' }) } as unknown as VLLMServerManager;
  return new VllmHealthIndicator(new HealthIndicatorService(), manager);
}

describe('/health', () => {
  it('counts vLLM healthy while it serves: ready, asleep (a request wakes it) or waking, as its status word says', () => {
    const states: ServerState[] = ['ready', 'sleeping', 'waking', 'starting', 'restarting', 'unreachable', 'failed', 'stopping'];
    expect(states.map((state) => [state, healthStatusOf({ state, mode: 'auto' }), indicatorIn(state).check().vllm.status])).toEqual([
      ['ready', 'healthy', 'up'],
      ['sleeping', 'sleeping', 'up'],
      ['waking', 'sleeping', 'up'],
      ['starting', 'starting', 'down'],
      ['restarting', 'restarting', 'down'],
      ['unreachable', 'degraded', 'down'],
      ['failed', 'unhealthy', 'down'],
      ['stopping', 'stopping', 'down'],
    ]);
    // A restart's model load is still the restart (the state machine is `starting` then).
    expect(healthStatusOf({ state: 'starting', mode: 'auto', relaunching: true })).toBe('restarting');
  });

  it('says stopping (200) through a drain, also the one after vLLM failed for good, which keeps its state as the cause', () => {
    const during = (state: ServerState) => serviceStatus({ state, mode: 'auto', relaunching: false }, true);
    expect([during('ready'), during('stopping'), during('failed'), during('stopped')]).toEqual([
      { status: 'stopping', state: 'draining' },
      { status: 'stopping', state: 'stopping' },
      { status: 'stopping', state: 'failed' },
      { status: 'unhealthy', state: 'stopped' },
    ]);
    // Before the stop begins: vLLM gone for good is a 503.
    expect(serviceStatus({ state: 'failed', mode: 'auto', relaunching: false }, false)).toEqual({ status: 'unhealthy', state: 'failed' });
  });
});
