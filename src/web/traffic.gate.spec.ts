import { EventEmitter } from 'node:events';
import type { ServerResponse } from 'node:http';
import fc from 'fast-check';
import type { AppError } from '../domain/app-error';
import { TrafficGate } from './traffic.gate';

/** A response that closes when told, finished (answered) or not (the client left). */
function response(): ServerResponse & { close(finished: boolean): void } {
  const res = new EventEmitter() as ServerResponse & { close(finished: boolean): void };
  res.close = (finished) => {
    Object.assign(res, { writableFinished: finished });
    res.emit('close');
  };
  return res;
}

describe('TrafficGate', () => {
  it('counts what is in flight whatever order requests end in, refuses past the limit, and cuts exactly the rest', () => {
    fc.assert(
      fc.property(fc.array(fc.nat(), { minLength: 1, maxLength: 30 }), fc.nat(), (picks, keep) => {
        const gate = new TrafficGate(picks.length);
        const open = picks.map((_, i) => ({ i, res: response() }));
        const cut: number[] = [];
        for (const { i, res } of open) gate.admit(res).onAbort(() => cut.push(i));
        expect(gate.inFlight).toBe(picks.length);
        expect(gate.refusal()?.code).toBe('OVERLOADED');
        let settled = 0;
        gate.onSettled = () => (settled += 1);
        const ending = picks.slice(0, picks.length - (keep % (picks.length + 1)));
        for (const pick of ending) {
          const [{ res }] = open.splice(pick % open.length, 1);
          res.close(true);
          expect(gate.inFlight).toBe(open.length);
        }
        expect(settled).toBe(ending.length);
        if (open.length < picks.length) expect(gate.refusal()).toBeNull();
        gate.cutAll();
        expect(cut.sort((a, b) => a - b)).toEqual(open.map(({ i }) => i).sort((a, b) => a - b));
      }),
    );
  });

  it('aborts a request whose client left, not one that was answered', () => {
    const gate = new TrafficGate(8);
    const [left, answered] = [response(), response()];
    const reasons: string[] = [];
    gate.admit(left).onAbort((reason) => reasons.push(`left: ${reason.message}`));
    gate.admit(answered).onAbort((reason) => reasons.push(`answered: ${reason.message}`));
    left.close(false);
    answered.close(true);
    expect(reasons).toEqual(['left: client went away']);
  });

  it('cuts every request still in flight at the end of the drain, streams and plain ones', async () => {
    const gate = new TrafficGate(8);
    const all = Array.from({ length: 5 }, () => response());
    const cut: string[] = [];
    all.forEach((res, i) => {
      const scope = gate.admit(res);
      if (i % 2 === 0) scope.cut = (error: AppError) => cut.push(`stream ${i}: ${error.code}`);
      else scope.onAbort((error) => cut.push(`plain ${i}: ${error.code}`));
    });
    all[2].close(true); // ended before the drain ran out
    gate.startDraining();
    expect(gate.refusal()?.code).toBe('SHUTTING_DOWN');
    expect(await gate.waitIdle(20)).toBe(4);
    gate.cutAll();
    expect(cut.sort()).toEqual(['plain 1: SHUTTING_DOWN', 'plain 3: SHUTTING_DOWN', 'stream 0: SHUTTING_DOWN', 'stream 4: SHUTTING_DOWN']);
    const idle = gate.waitIdle(5_000);
    for (const res of all) res.close(true);
    expect(await idle).toBe(0);
  });
});
