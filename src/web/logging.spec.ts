import { traceHeaders } from './logging';

const PARENT = '00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01';

describe('traceHeaders', () => {
  it("passes a W3C traceparent on, with the client's tracestate", () => {
    expect(traceHeaders({ traceparent: PARENT })).toBe(`traceparent: ${PARENT}\r\n`);
    expect(traceHeaders({ traceparent: PARENT, tracestate: 'congo=t61rcWkgMzE, rojo=00f067aa0ba902b7' })).toBe(
      `traceparent: ${PARENT}\r\ntracestate: congo=t61rcWkgMzE, rojo=00f067aa0ba902b7\r\n`,
    );
    // A later version may carry more fields: passed on, as the spec asks of a version it does not know.
    expect(traceHeaders({ traceparent: `cc-${PARENT.slice(3)}-what-the-future-holds` })).toBe(`traceparent: cc-${PARENT.slice(3)}-what-the-future-holds\r\n`);
  });

  it('drops a malformed traceparent and the tracestate with it', () => {
    for (const traceparent of [
      PARENT.toUpperCase(), // lower-case hex only
      PARENT.slice(0, -3), // no flags
      `${PARENT} `,
      `${PARENT}\r\nx-injected: 1`,
      `${PARENT}-01`, // version 00 has exactly four fields
      `ff-${PARENT.slice(3)}`, // an invalid version
      `00-${'0'.repeat(32)}-${PARENT.slice(36)}`, // all-zero trace id
      `${PARENT.slice(0, 36)}${'0'.repeat(16)}-01`, // all-zero parent id
    ]) {
      expect([traceparent, traceHeaders({ traceparent, tracestate: 'a=1' })]).toEqual([traceparent, '']);
    }
    expect(traceHeaders({ tracestate: 'a=1' })).toBe('');
    expect(traceHeaders({})).toBe('');
  });

  it('drops a tracestate that could not be a header line, or is over the 512-character budget', () => {
    for (const tracestate of ['a=1\r\nx-injected: 1', 'a=\u00e9', 'a=1'.padEnd(513, '1'), '']) {
      expect([tracestate, traceHeaders({ traceparent: PARENT, tracestate })]).toEqual([tracestate, `traceparent: ${PARENT}\r\n`]);
    }
  });
});
