import { isUtf8 } from 'node:buffer';
import type { IncomingMessage } from 'node:http';
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import secureJsonParse from 'secure-json-parse';
import { AppError } from '../domain/app-error';
import { sendError } from './app-error.filter';
import { NOT_JSON_TYPE, TOO_LARGE } from './http-error';
import type { RequestScope } from './traffic.gate';

const NOT_JSON = AppError.invalid('request body is not valid JSON');
const NOT_UTF8 = AppError.invalid('request body is not valid UTF-8 (JSON text must be)');
const PROTO_KEY = AppError.invalid('request body must not contain a "__proto__" key, nor a "constructor" object with a "prototype" key');
const EMPTY = AppError.invalid('request body is empty; a JSON object is expected');
const NOT_OBJECT = AppError.invalid('request body must be a JSON object');
const UNREADABLE = AppError.invalid('the request body could not be read');
const LENGTH_MISMATCH = AppError.invalid('Content-Length does not match the body');
/** As Fastify's own parser: a `__proto__` or `constructor.prototype` key is refused, not parsed. */
const PARSE_OPTIONS = { protoAction: 'error', constructorAction: 'error' } as const;

/**
 * A request OpenAiProxy admitted, measured and read before it left it to the Fastify routes:
 * the hooks take its id and scope instead of counting it again, and its body is not read twice.
 */
export interface HandedOver {
  body?: JsonBody;
  error?: AppError;
  requestId: string;
  scope: RequestScope;
}

declare module 'http' {
  interface IncomingMessage {
    tideHandedOver?: HandedOver;
  }
}

/**
 * A JSON body as read: its value, and its text as the client sent it (a relay forwards the text,
 * so that what JSON.stringify would change — a 64-bit seed, 1e400, -0 — reaches vLLM unchanged).
 * No body at all (no Content-Type either): value undefined, text ''.
 */
export interface JsonBody {
  value: unknown;
  text: string;
}

const NO_BODY: JsonBody = { value: undefined, text: '' };

type JsonRouteHandler = (request: FastifyRequest, reply: FastifyReply, body: JsonBody) => unknown;

/**
 * A POST route that reads its JSON body itself: the OpenAI routes, whose body OpenAiProxy may
 * have read already before handing the request over. Fastify's own parser also runs every body
 * through an AsyncResource whose bind() builds two deprecation wrappers on Node 20: with the
 * garbage that leaves, about 50 µs a request (README, "Performance"). So the body is read in the
 * route's preParsing hook (after every onRequest hook: metrics, auth, admission), which then
 * answers; Fastify's parser and handler never run. The rules are Fastify's: 415, 413 (before
 * reading when Content-Length says so), 400 for a length mismatch, an empty body, bad JSON or
 * prototype poisoning (which says so: see parseJson). Whatever is left of a refused body is read
 * and dropped by Node (see sendError).
 */
export function registerJsonPost(fastify: FastifyInstance, path: string, bodyLimit: number, handle: JsonRouteHandler): void {
  fastify.post(
    path,
    {
      preParsing: (request, reply, payload, _next) => {
        // Read already when OpenAiProxy handed the request over.
        const read = request.raw.tideHandedOver;
        const body = read ? (read.error ? Promise.reject(read.error) : Promise.resolve(read.body ?? NO_BODY)) : readJson(request.raw, payload, bodyLimit);
        body
          .then(
            (parsed) => {
              request.body = parsed.value;
              return handle(request, reply, parsed);
            },
            (err: AppError) => sendError(reply, err),
          )
          .catch((err: unknown) => sendError(reply, err)); // a 500 that says nothing; the log has it
      },
    },
    () => {
      throw new Error(`${path}: answered in preParsing, the handler is never reached`);
    },
  );
}

/** The body, parsed and as sent; an AppError for anything Fastify's parser would refuse. */
export function readJson(req: IncomingMessage, payload: NodeJS.ReadableStream, limit: number): Promise<JsonBody> {
  const length = req.headers['content-length'];
  const declared = length === undefined ? NaN : Number(length);
  const type = req.headers['content-type'];
  if (type === undefined) {
    // No type: acceptable only for no body at all (the route then says what it expected).
    if (declared === 0 || (Number.isNaN(declared) && req.headers['transfer-encoding'] === undefined)) return Promise.resolve(NO_BODY);
    return Promise.reject(NOT_JSON_TYPE);
  }
  if (!isJsonType(type)) return Promise.reject(NOT_JSON_TYPE);
  if (declared > limit) return Promise.reject(TOO_LARGE);
  return new Promise((resolve, reject) => {
    // The listeners stay: once settled, the promise ignores what follows, and only `data` is
    // guarded (a refused body is not kept). Removing four listeners cost more than the rest here.
    const chunks = new BodyChunks();
    let received = 0;
    payload.on('data', (chunk: Buffer) => {
      if (received > limit) return;
      received += chunk.length;
      if (received > limit) return reject(TOO_LARGE);
      chunks.push(chunk);
    });
    payload.on('end', () => {
      if (received > limit) return;
      if (!Number.isNaN(declared) && received !== declared) return reject(LENGTH_MISMATCH);
      if (received === 0) return resolve(NO_BODY); // as with no type: a route that needs a body says so (notAnObject)
      try {
        resolve(parseBody(chunks.whole(received), req));
      } catch (err) {
        reject(err as AppError);
      }
    });
    // An error, or a close before the end: the client left (or timed out) while sending.
    const failed = () => reject(UNREADABLE);
    payload.on('error', failed);
    payload.on('close', failed);
  });
}

/** A body's pieces below this size are gathered into blocks (BodyChunks). */
const SMALL_PIECE_BYTES = 4096;
const BLOCK_BYTES = 16384;

/**
 * A body's pieces as they come. A body sent in tiny pieces (chunked, one byte a chunk) would
 * otherwise cost a Buffer object of some 200 bytes of heap per byte of body, up to web.body_limit
 * per request: a megabyte's body, 200 MB. After the first piece (a body's only one, usually: kept
 * as it is), small pieces are copied into a block of BLOCK_BYTES; a large piece, or a full block,
 * ends the small ones gathered so far, which are kept as one buffer (a copy of their own size
 * when they fill less than half the block, which is then used again). So however pieces of both
 * sizes alternate, a body costs at most about twice its bytes.
 */
export class BodyChunks {
  private readonly pieces: Buffer[] = [];
  private block: Buffer | null = null;
  private used = 0;

  push(chunk: Buffer): void {
    if (this.pieces.length === 0 || chunk.length >= SMALL_PIECE_BYTES) {
      this.seal();
      this.pieces.push(chunk);
      return;
    }
    if (this.used + chunk.length > BLOCK_BYTES) this.seal();
    this.block ??= Buffer.allocUnsafe(BLOCK_BYTES);
    chunk.copy(this.block, this.used);
    this.used += chunk.length;
  }

  /** Buffers held (a measure of what the body costs beyond its bytes). */
  get held(): number {
    return this.pieces.length + (this.block === null ? 0 : 1);
  }

  /** The body's bytes, `length` of them. */
  whole(length: number): Buffer {
    this.seal();
    this.block = null;
    return this.pieces.length === 1 ? this.pieces[0] : Buffer.concat(this.pieces, length);
  }

  /** The small pieces gathered so far become one piece. */
  private seal(): void {
    if (this.block === null || this.used === 0) return;
    if (this.used * 2 < BLOCK_BYTES) {
      this.pieces.push(Buffer.from(this.block.subarray(0, this.used))); // the block is used again
    } else {
      this.pieces.push(this.block.subarray(0, this.used));
      this.block = null;
    }
    this.used = 0;
  }
}

/**
 * The body's bytes parsed, or why not. Neither tide-vllm nor vLLM decodes a compressed body
 * (`Content-Encoding: gzip`…): when one fails as "not UTF-8" or "not JSON", the refusal says
 * it was compressed. A plain body under such a header is taken, as vLLM takes it.
 */
function parseBody(bytes: Buffer, req: IncomingMessage): JsonBody {
  try {
    const text = jsonText(bytes);
    return { value: parseJson(text), text };
  } catch (err) {
    const encoding = req.headers['content-encoding'];
    if (err === PROTO_KEY || encoding === undefined || encoding.trim().toLowerCase() === 'identity') throw err;
    throw AppError.invalid(`request body must not be compressed (Content-Encoding: ${encoding}); send it as plain JSON`);
  }
}

/**
 * A body's bytes as JSON text, without a leading BOM (vLLM's json.loads of the body's bytes skips
 * one too, decoding them as utf-8-sig, and what is relayed is this text). Bytes
 * that are not UTF-8 are refused (400, as vLLM's FastAPI refuses them), never turned into U+FFFD
 * and passed on as if the client had sent that.
 */
function jsonText(bytes: Buffer): string {
  if (!isUtf8(bytes)) throw NOT_UTF8;
  const text = bytes.toString('utf8');
  return text.charCodeAt(0) === 0xfeff ? text.slice(1) : text;
}

/** The JSON text parsed, or an AppError: not JSON, or JSON with a prototype-poisoning key. */
function parseJson(text: string): unknown {
  try {
    return secureJsonParse.parse(text, undefined, PARSE_OPTIONS);
  } catch {
    // Valid JSON refused for a key: say so, not "not valid JSON" (parsed again only on this path).
    try {
      JSON.parse(text);
    } catch {
      throw NOT_JSON;
    }
    throw PROTO_KEY;
  }
}

/** A JSON object: not null, not a list. */
export function isObject(value: unknown): value is Record<string, unknown> {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

/** Why a route that takes a JSON object refuses `value`: no body at all, or another JSON value. */
export function notAnObject(value: unknown): AppError {
  return value === undefined ? EMPTY : NOT_OBJECT;
}

/**
 * Fastify's JSON parser for the routes it parses bodies for (the simple API, admin): the body
 * read as readJson reads it (web.body_limit, the declared length, small pieces gathered: Fastify's
 * own reader keeps every piece as it comes), with its messages (Fastify's says "not valid JSON"
 * for a prototype key too). An empty body is no body, as without a Content-Type: the OpenAI SDKs
 * send `application/json` on body-less POSTs (the Python one on `responses.cancel`); a route that
 * needs one says so.
 */
export function fastifyJsonParser(bodyLimit: number) {
  return (request: FastifyRequest, payload: IncomingMessage, done: (err: Error | null, body?: unknown) => void): void => {
    readJson(request.raw, payload, bodyLimit).then(
      (body) => done(null, body.value),
      (err: AppError) => done(err),
    );
  };
}

/** `application/json`, any parameters, any case: what Fastify's JSON parser takes. */
function isJsonType(header: string): boolean {
  const semi = header.indexOf(';');
  const media = (semi === -1 ? header : header.slice(0, semi)).trim().toLowerCase();
  return media === 'application/json';
}
