import type { IncomingMessage } from 'node:http';
import { PassThrough } from 'node:stream';
import { gzipSync } from 'node:zlib';
import { AppError } from '../domain/app-error';
import { BodyChunks, type JsonBody, fastifyJsonParser, readJson } from './json-body';

const LIMIT = 64;

/** The body (parsed, and as sent) of a request whose body arrives in `chunks`; headers as given (lower case, as Node has them). */
function readBody(headers: Record<string, string>, chunks: Array<string | Buffer>): Promise<JsonBody> {
  const payload = new PassThrough();
  const result = readJson({ headers } as unknown as IncomingMessage, payload, LIMIT);
  for (const chunk of chunks) payload.write(chunk);
  payload.end();
  return result;
}

const read = (headers: Record<string, string>, chunks: Array<string | Buffer>): Promise<unknown> => readBody(headers, chunks).then((body) => body.value);

async function refusal(headers: Record<string, string>, chunks: Array<string | Buffer>): Promise<[string, string]> {
  const err = await read(headers, chunks).then(
    () => null,
    (e: unknown) => e,
  );
  if (!(err instanceof AppError)) throw new Error(`expected an AppError, got ${String(err)}`);
  return [err.code, err.message];
}

const json = (body: string, extra: Record<string, string> = {}) => ({ 'content-type': 'application/json', 'content-length': String(Buffer.byteLength(body)), ...extra });

describe('readJson', () => {
  it('parses a body that arrives in pieces, multi-byte characters split across them', async () => {
    const body = '{"prompt":"héllo ✓"}';
    const bytes = Buffer.from(body);
    const payload = new PassThrough();
    const result = readJson({ headers: json(body) } as unknown as IncomingMessage, payload, LIMIT);
    payload.write(bytes.subarray(0, 13)); // ends inside "é"
    payload.write(bytes.subarray(13, 19)); // ends inside "✓"
    payload.end(bytes.subarray(19));
    await expect(result).resolves.toEqual({ value: { prompt: 'héllo ✓' }, text: body });
  });

  it('keeps the text as sent (what JSON.stringify would change), without a byte-order mark', async () => {
    const body = '{"seed":9007199254740993, "max_tokens":1e400,"t":-0.0}';
    await expect(readBody(json(body), [body])).resolves.toEqual({ value: { seed: 9007199254740992, max_tokens: Infinity, t: -0 }, text: body });
    const bom = `\ufeff${body}`;
    await expect(readBody(json(bom), [bom])).resolves.toMatchObject({ text: body });
  });

  it('takes application/json with parameters and in any case', async () => {
    await expect(read(json('[1]', { 'content-type': 'Application/JSON; charset=utf-8' }), ['[1]'])).resolves.toEqual([1]);
  });

  it('gives undefined for no body, with or without a JSON type, so the route can say what it wanted', async () => {
    await expect(read({}, [])).resolves.toBeUndefined();
    await expect(read({ 'content-length': '0' }, [])).resolves.toBeUndefined();
    await expect(read(json(''), [])).resolves.toBeUndefined();
    await expect(read({ 'content-type': 'application/json', 'transfer-encoding': 'chunked' }, [])).resolves.toBeUndefined();
  });

  it('refuses what Fastify refuses, with the same statuses', async () => {
    expect(await refusal({ 'content-type': 'text/plain' }, ['hi'])).toEqual(['UNSUPPORTED_MEDIA_TYPE', expect.stringContaining('must be JSON')]);
    expect(await refusal({ 'content-length': '2' }, ['{}'])).toEqual(['UNSUPPORTED_MEDIA_TYPE', expect.any(String)]);
    expect(await refusal({ 'content-type': 'application/jsonx' }, ['{}'])).toEqual(['UNSUPPORTED_MEDIA_TYPE', expect.any(String)]);
    // Declared too large: refused before a byte is read.
    expect(await refusal(json('x', { 'content-length': String(LIMIT + 1) }), [])).toEqual(['PAYLOAD_TOO_LARGE', expect.stringContaining('web.body_limit')]);
    // Chunked, found too large while reading.
    const big = `{"p":"${'x'.repeat(LIMIT)}"}`;
    expect(await refusal({ 'content-type': 'application/json', 'transfer-encoding': 'chunked' }, [big.slice(0, 40), big.slice(40)])).toEqual([
      'PAYLOAD_TOO_LARGE',
      expect.any(String),
    ]);
    expect(await refusal(json('{}', { 'content-length': '5' }), ['{}'])).toEqual(['INVALID_REQUEST', 'Content-Length does not match the body']);
    expect(await refusal(json('{"a":'), ['{"a":'])).toEqual(['INVALID_REQUEST', 'request body is not valid JSON']);
  });

  it('refuses bytes that are not UTF-8 (Latin-1 "café"), rather than pass on U+FFFD as if the client had sent it', async () => {
    const latin1 = Buffer.from('{"prompt":"caf\xe9"}', 'latin1');
    expect(await refusal({ 'content-type': 'application/json' }, [latin1])).toEqual(['INVALID_REQUEST', 'request body is not valid UTF-8 (JSON text must be)']);
  });

  it('refuses a compressed body as such (neither tide-vllm nor vLLM decodes one), not as "not UTF-8"', async () => {
    const gzipped = gzipSync('{"prompt":"hi"}');
    expect(await refusal(json('', { 'content-length': String(gzipped.length), 'content-encoding': 'gzip' }), [gzipped])).toEqual([
      'INVALID_REQUEST',
      'request body must not be compressed (Content-Encoding: gzip); send it as plain JSON',
    ]);
    await expect(read(json('{}', { 'content-encoding': 'identity' }), ['{}'])).resolves.toEqual({});
    // A plain body under a stray header (`utf-8`, empty) is taken, as vLLM takes it: only what fails to parse is called compressed.
    for (const encoding of ['utf-8', '', 'gzip']) await expect(read(json('{"a":1}', { 'content-encoding': encoding }), ['{"a":1}'])).resolves.toEqual({ a: 1 });
    expect(await refusal(json('', { 'content-length': '2', 'content-encoding': 'gzip' }), ['{x'])).toEqual(['INVALID_REQUEST', expect.stringContaining('must not be compressed')]);
  });

  it('refuses prototype poisoning instead of parsing it, saying so (the JSON is valid)', async () => {
    for (const body of ['{"__proto__":{"x":1}}', '{"constructor":{"prototype":{"x":1}}}', '{"a":[{"\\u005f_proto__":1}]}']) {
      expect(await refusal(json(body), [body])).toEqual(['INVALID_REQUEST', expect.stringContaining('must not contain a "__proto__" key')]);
    }
    // The words themselves are fine as values.
    await expect(read(json('{"a":"__proto__"}'), ['{"a":"__proto__"}'])).resolves.toEqual({ a: '__proto__' });
  });

  it('reports a stream that fails as a body that could not be read', async () => {
    const payload = new PassThrough();
    const result = readJson({ headers: json('{}') } as unknown as IncomingMessage, payload, LIMIT);
    payload.destroy(new Error('aborted'));
    await expect(result).rejects.toMatchObject({ code: 'INVALID_REQUEST', message: 'the request body could not be read' });
  });
});

describe('a body in pieces', () => {
  it('gathers small pieces after the first into blocks: a body sent a byte at a time holds few buffers, not one per byte', () => {
    const chunks = new BodyChunks();
    const text = `{"prompt":"${'x'.repeat(100_000)}"}`;
    for (const char of text) chunks.push(Buffer.from(char));
    expect(chunks.held).toBeLessThanOrEqual(Math.ceil(text.length / 16384) + 2);
    expect(chunks.whole(text.length).toString()).toBe(text);
  });

  it('keeps the first piece, and large ones, as they are, in order with the gathered ones', () => {
    const chunks = new BodyChunks();
    const pieces = [Buffer.from('a'.repeat(10)), Buffer.from('b'), Buffer.from('c'.repeat(5000)), Buffer.from('d'), Buffer.from('e')];
    for (const piece of pieces) chunks.push(piece);
    expect(chunks.held).toBe(4); // a…, b (copied out of the block), c…, then the block with d and e
    expect(chunks.whole(5013).toString()).toBe(Buffer.concat(pieces).toString());
    // Small and large pieces alternating: a small piece copied at its own size, not a block each.
    const alternating = new BodyChunks();
    let bytes = 0;
    let retained = 0;
    alternating.push(Buffer.from('{'));
    for (let i = 0; i < 200; i++) {
      for (const piece of [Buffer.from('x'), Buffer.alloc(4096, 'y')]) {
        alternating.push(piece);
        bytes += piece.length;
      }
    }
    // The memory the held pieces keep alive: each distinct ArrayBuffer under them (Node's 8 KiB pool slabs counted once).
    const arrays = new Set((alternating as unknown as { pieces: Buffer[] }).pieces.map((piece) => piece.buffer));
    for (const array of arrays) retained += array.byteLength;
    expect(retained).toBeLessThan(bytes * 1.1); // a 16 KiB block per small piece: about 5 times the bytes
    const one = new BodyChunks();
    one.push(pieces[0]);
    expect(one.whole(10)).toBe(pieces[0]); // a body in one piece is not copied
  });

  it('reads a JSON body sent a byte at a time', async () => {
    const body = JSON.stringify({ prompt: 'é'.repeat(20) });
    const bytes = [...Buffer.from(body)].map((byte) => Buffer.from([byte]));
    await expect(read({ 'content-type': 'application/json' }, bytes)).resolves.toEqual({ prompt: 'é'.repeat(20) });
  });
});

describe('fastifyJsonParser (the routes Fastify reads bodies for)', () => {
  const parse = (body: string | Buffer, headers: Record<string, string> = {}) =>
    new Promise<unknown>((resolve, reject) => {
      const payload = new PassThrough();
      const raw = { headers: { 'content-type': 'application/json', ...headers } };
      fastifyJsonParser(1024)({ raw } as never, payload as never, (err, parsed) => (err ? reject(err) : resolve(parsed)));
      payload.end(body);
    });

  it('parses JSON, takes an empty body for none, and refuses bad JSON and prototype keys with the messages of readJson', async () => {
    await expect(parse('{"prompt":"x"}')).resolves.toEqual({ prompt: 'x' });
    await expect(parse('')).resolves.toBeUndefined();
    await expect(parse('{"prompt":')).rejects.toMatchObject({ code: 'INVALID_REQUEST', message: 'request body is not valid JSON' });
    await expect(parse(Buffer.from('{"prompt":"caf\xe9"}', 'latin1'))).rejects.toMatchObject({ code: 'INVALID_REQUEST', message: expect.stringContaining('not valid UTF-8') });
    await expect(parse('\ufeff{"prompt":"x"}')).resolves.toEqual({ prompt: 'x' }); // a BOM, as readJson
    await expect(parse(gzipSync('{"prompt":"x"}'), { 'content-encoding': 'gzip' })).rejects.toMatchObject({ code: 'INVALID_REQUEST', message: expect.stringContaining('must not be compressed') });
    await expect(parse('{"prompt":"x"}', { 'content-encoding': 'utf-8' })).resolves.toEqual({ prompt: 'x' });
    // readJson's reading rules: the limit it is given (web.body_limit), the declared length.
    await expect(parse(JSON.stringify({ prompt: 'x'.repeat(2000) }))).rejects.toMatchObject({ code: 'PAYLOAD_TOO_LARGE' });
    await expect(parse('{"prompt":"x"}', { 'content-length': '99' })).rejects.toMatchObject({ code: 'INVALID_REQUEST', message: 'Content-Length does not match the body' });
    await expect(parse('{"prompt":"x","__proto__":{"a":1}}')).rejects.toMatchObject({
      code: 'INVALID_REQUEST',
      message: expect.stringContaining('must not contain a "__proto__" key'),
    });
  });
});
