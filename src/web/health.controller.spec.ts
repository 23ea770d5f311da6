import { HealthIndicatorService } from '@nestjs/terminus';
import type { ServerState, VLLMServerManager } from '../infrastructure/vllm-server.manager';
import { VllmHealthIndicator, healthStatusOf } from './health.controller';

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
});
