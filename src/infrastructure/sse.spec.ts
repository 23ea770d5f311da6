import { Readable } from 'node:stream';
import * as fc from 'fast-check';
import { sseData } from './sse';

async function collect(chunks: string[]): Promise<string[]> {
  const out: string[] = [];
  for await (const data of sseData(Readable.from(chunks.map((c) => Buffer.from(c))))) out.push(data);
  return out;
}

describe('sseData', () => {
  it("yields each event's data in order, [DONE] included", async () => {
    expect(await collect(['data: {"a":1}\n\ndata: {"b":2}\n\n', 'data: [DONE]\n\n'])).toEqual(['{"a":1}', '{"b":2}', '[DONE]']);
  });

  it('accepts CRLF framing and joins multi-line data', async () => {
    expect(await collect(['data: x\r\ndata: y\r\n\r\n'])).toEqual(['x\ny']);
  });

  it('ignores comments and other fields', async () => {
    expect(await collect([': ping\n\nevent: e\ndata: z\n\n'])).toEqual(['z']);
  });

  it('gives the same events however the bytes are split', async () => {
    const events = ['{"i":0}', '{"t":"héllo"}', '[DONE]'];
    const text = events.map((e) => `data: ${e}\n\n`).join('');
    await fc.assert(
      fc.asyncProperty(fc.array(fc.integer({ min: 1, max: text.length - 1 }), { maxLength: 6 }), async (cuts) => {
        const points = [...new Set(cuts)].sort((a, b) => a - b);
        const chunks = [0, ...points].map((start, i) => text.slice(start, points[i] ?? text.length));
        expect(await collect(chunks)).toEqual(events);
      }),
    );
  });
});

describe('sseData idle limit', () => {
  it('fails with StreamIdleError when the stream goes silent', async () => {
    const { PassThrough } = await import('node:stream');
    const { StreamIdleError } = await import('./sse');
    const stream = new PassThrough();
    stream.write('data: first\n\n');
    const seen: string[] = [];
    await expect(
      (async () => {
        for await (const data of sseData(stream, 50)) seen.push(data);
      })(),
    ).rejects.toBeInstanceOf(StreamIdleError);
    expect(seen).toEqual(['first']);
  });
});
