import * as fc from 'fast-check';
import { SseParser } from './sse';

function parse(chunks: string[]): string[] {
  const parser = new SseParser();
  return chunks.flatMap((c) => parser.push(c));
}

describe('SseParser', () => {
  it("yields each event's data in order, [DONE] included", () => {
    expect(parse(['data: {"a":1}\n\ndata: {"b":2}\n\n', 'data: [DONE]\n\n'])).toEqual(['{"a":1}', '{"b":2}', '[DONE]']);
  });

  it('accepts CRLF framing and joins multi-line data', () => {
    expect(parse(['data: x\r\ndata: y\r\n\r\n'])).toEqual(['x\ny']);
    expect(parse(['data: x\r', '\n\r', '\ndata: z\r\n\r\n'])).toEqual(['x', 'z']);
  });

  it('accepts CR-only framing, an event complete as soon as its blank line came', () => {
    expect(parse(['data: a\r\rdata: [DONE]\r\r'])).toEqual(['a', '[DONE]']);
    expect(parse(['data: a\r', '\r'])).toEqual(['a']); // no wait for an LF that never comes
  });

  it('ignores comments and other fields, and yields an event only once its blank line came', () => {
    expect(parse([': ping\n\nevent: e\ndata: z\n\n', 'data: tail'])).toEqual(['z']);
  });

  it('takes an event that comes in thousands of reads whole, with the events around it', () => {
    const long = JSON.stringify({ t: 'x'.repeat(50_000) });
    const text = `data: {"i":0}\n\ndata: ${long}\n\ndata: [DONE]\n\n`;
    const pieces = text.match(/[\s\S]{1,7}/g) ?? [];
    expect(parse(pieces)).toEqual(['{"i":0}', long, '[DONE]']);
  });

  it('gives the same events however the bytes are split', () => {
    const events = ['{"i":0}', '{"t":"héllo\\nworld"}', '[DONE]'];
    for (const sep of ['\n', '\r\n', '\r']) {
      const text = events.map((e) => `data: ${e}${sep}${sep}`).join('');
      fc.assert(
        fc.property(fc.array(fc.integer({ min: 1, max: text.length - 1 }), { maxLength: 8 }), (cuts) => {
          const points = [...new Set(cuts)].sort((a, b) => a - b);
          const chunks = [0, ...points].map((start, i) => text.slice(start, points[i] ?? text.length));
          expect(parse(chunks)).toEqual(events);
        }),
      );
    }
  });
});
