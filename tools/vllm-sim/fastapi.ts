/**
 * What both engines' API servers (vLLM mode and SGLang mode) get from FastAPI, pydantic,
 * Starlette and uvicorn: request bodies read and validated as FastAPI does, JSON/text/empty
 * answers, Starlette's routing answers (307 to the other slash form, `{"detail": ...}` 404/405),
 * uvicorn's access-log hook, listener and shutdown lines. The error bodies and messages are each
 * engine's own (protocol.ts, sglang/protocol.ts).
 */
import http, { IncomingMessage, ServerResponse } from 'node:http';
import type { ListenOptions, Socket } from 'node:net';

/** How often idle keep-alive connections are closed while the server shuts down. */
const IDLE_SWEEP_MS = 100;

// ---------------------------------------------------------------------------------------------
// Errors and answers

/** An error a route answers with `status` and `body()`; each engine's protocol.ts shapes the body. */
export abstract class HttpError extends Error {
  constructor(
    readonly status: number,
    readonly type: string,
    message: string,
    readonly param: string | null = null,
  ) {
    super(message);
  }

  abstract body(): unknown;
}

/** FastAPI's JSONResponse: compact JSON, `content-type: application/json`. */
/** uvicorn's path decoding (`urllib.parse.unquote`): %XX sequences are UTF-8 bytes, invalid ones U+FFFD. */
export function unquotePath(path: string): string {
  if (!path.includes('%')) return path;
  const bytes: number[] = [];
  for (let i = 0; i < path.length; i++) {
    const hex = path.slice(i + 1, i + 3);
    if (path[i] === '%' && /^[0-9A-Fa-f]{2}$/.test(hex)) {
      bytes.push(parseInt(hex, 16));
      i += 2;
    } else bytes.push(...Buffer.from(path[i]));
  }
  return Buffer.from(bytes).toString('utf8');
}

export function sendJson(res: ServerResponse, status: number, body: unknown, onDone?: () => void): void {
  const payload = JSON.stringify(body);
  res.writeHead(status, {
    'content-type': 'application/json',
    'content-length': Buffer.byteLength(payload),
  });
  res.end(payload, onDone);
}

export function sendError(res: ServerResponse, error: HttpError): void {
  sendJson(res, error.status, error.body());
}

/** `Response(status_code=N)`: empty body, no content-type. */
export function sendEmpty(res: ServerResponse, status: number): void {
  res.writeHead(status, { 'content-length': 0 });
  res.end();
}

/** A text body; without `contentType` no content-type header, like `Response(content=str)`. */
export function sendText(res: ServerResponse, status: number, text: string, contentType?: string): void {
  const headers: http.OutgoingHttpHeaders = { 'content-length': Buffer.byteLength(text) };
  if (contentType) headers['content-type'] = contentType;
  res.writeHead(status, headers);
  res.end(text);
}

/**
 * An ASGI app's one-message body without Content-Length (prometheus_client's make_asgi_app sends
 * only Content-Type): uvicorn sends it chunked, and no body for HEAD.
 */
export function sendUnsized(res: ServerResponse, status: number, text: string, contentType: string): void {
  res.writeHead(status, { 'content-type': contentType });
  res.end(text);
}

/** Starlette/FastAPI's own `{"detail": ...}` answers (404, 405) bypass the engines' error bodies. */
function sendDetail(
  res: ServerResponse,
  status: number,
  detail: string,
  headers: http.OutgoingHttpHeaders = {},
): void {
  const payload = JSON.stringify({ detail });
  res.writeHead(status, {
    ...headers,
    'content-type': 'application/json',
    'content-length': Buffer.byteLength(payload),
  });
  res.end(payload);
}

// ---------------------------------------------------------------------------------------------
// Request bodies

/** One pydantic error entry as FastAPI's RequestValidationError carries it. */
export interface PydanticError {
  type: string;
  loc: (string | number)[];
  msg: string;
  input: unknown;
  ctx?: Record<string, unknown>;
}

/**
 * How an engine reports a bad body: its RequestValidationError and, if it checks the content
 * type, validate_json_request's error.
 */
export interface BodyErrors {
  requestValidationError(errors: PydanticError[]): Error;
  unsupportedMediaType?: () => Error;
}

/** Python's json.loads accepts NaN/Infinity literals; JSON.parse does not. */
export function parseJsonLikePython(text: string): unknown {
  try {
    return JSON.parse(text);
  } catch (error) {
    const marker = '\u0000py:';
    let replaced = '';
    let inString = false;
    for (let i = 0; i < text.length; i += 1) {
      const ch = text[i];
      if (inString) {
        replaced += ch;
        if (ch === '\\') replaced += text[++i] ?? '';
        else if (ch === '"') inString = false;
        continue;
      }
      if (ch === '"') inString = true;
      const literal = ['-Infinity', 'Infinity', 'NaN'].find((l) => text.startsWith(l, i));
      if (literal) {
        replaced += JSON.stringify(marker + literal);
        i += literal.length - 1;
      } else replaced += ch;
    }
    if (replaced === text) throw error;
    const values: Record<string, number> = { '-Infinity': -Infinity, Infinity, NaN };
    return JSON.parse(replaced, (_k, v) =>
      typeof v === 'string' && v.startsWith(marker) ? values[v.slice(marker.length)] : v,
    );
  }
}

/**
 * Reads a JSON body the way FastAPI does: content-type check, empty body, then json.loads of
 * Starlette's body bytes — which decodes them as `utf-8-sig` when they start with a UTF-8 BOM
 * (json.detect_encoding), so a leading BOM is skipped.
 */
export function readJsonBody(req: IncomingMessage, raw: Buffer, errors: BodyErrors): unknown {
  const mediaType = (req.headers['content-type'] ?? '').toLowerCase().split(';')[0].trim();
  if (errors.unsupportedMediaType && mediaType !== 'application/json') {
    throw errors.unsupportedMediaType();
  }
  if (raw.length === 0) {
    const missing: PydanticError = { type: 'missing', loc: ['body'], msg: 'Field required', input: null };
    throw errors.requestValidationError([missing]);
  }
  // `if body_bytes:` came first: a body of a BOM alone is a JSON decode error at 0, not a missing one.
  const bom = raw.length >= 3 && raw[0] === 0xef && raw[1] === 0xbb && raw[2] === 0xbf;
  const text = raw.toString('utf8', bom ? 3 : 0);
  try {
    return parseJsonLikePython(text);
  } catch (error) {
    const pos = Number(/position (\d+)/.exec(String((error as Error).message))?.[1] ?? 0);
    const extra = /non-whitespace character after JSON/.test(String((error as Error).message));
    throw errors.requestValidationError([
      {
        type: 'json_invalid',
        loc: ['body', pos],
        msg: 'JSON decode error',
        input: {},
        ctx: { error: extra ? 'Extra data' : 'Expecting value' },
      },
    ]);
  }
}

/** The body must be a JSON object for the request model. */
export function requireObject(body: unknown, errors: BodyErrors): Record<string, unknown> {
  if (body === null || typeof body !== 'object' || Array.isArray(body)) {
    throw errors.requestValidationError([
      {
        type: 'model_attributes_type',
        loc: ['body'],
        msg: 'Input should be a valid dictionary or object to extract fields from',
        input: body,
      },
    ]);
  }
  return body as Record<string, unknown>;
}

export type FieldKind = 'float' | 'int' | 'bool' | 'str' | 'list' | 'object';

const BOOL_STRINGS: Record<string, boolean> = {
  true: true, false: false, '1': true, '0': false, yes: true, no: false, on: true, off: false,
  t: true, f: false, y: true, n: false,
};

export type Coerced = { ok: true; value: unknown } | { ok: false; error: PydanticError };

const INVALID_FLOAT = 'Input should be a valid number, unable to parse string as a number';
const FRACTIONAL_INT = 'Input should be a valid integer, got a number with a fractional part';
const INVALID_INT = 'Input should be a valid integer, unable to parse string as an integer';

/** Pydantic v2 lax-mode validation of one field: the coerced value, or the error entry. */
export function coerce(kind: FieldKind, field: string, value: unknown): Coerced {
  const ok = (v: unknown): Coerced => ({ ok: true, value: v });
  const fail = (type: string, msg: string): Coerced => ({
    ok: false,
    error: { type, loc: ['body', field], msg, input: value },
  });
  switch (kind) {
    case 'float': {
      if (typeof value === 'number') return ok(value);
      if (typeof value !== 'string') return fail('float_type', 'Input should be a valid number');
      const n = Number(value.trim());
      return value.trim() !== '' && !Number.isNaN(n) ? ok(n) : fail('float_parsing', INVALID_FLOAT);
    }
    case 'int':
      if (typeof value === 'number') {
        return Number.isInteger(value) ? ok(value) : fail('int_from_float', FRACTIONAL_INT);
      }
      if (typeof value === 'string') {
        const isInt = /^\s*[+-]?\d+\s*$/.test(value);
        return isInt ? ok(Number(value)) : fail('int_parsing', INVALID_INT);
      }
      return fail('int_type', 'Input should be a valid integer');
    case 'bool':
      if (typeof value === 'boolean') return ok(value);
      if (value === 0 || value === 1) return ok(value === 1);
      if (typeof value === 'string' && value.toLowerCase() in BOOL_STRINGS) {
        return ok(BOOL_STRINGS[value.toLowerCase()]);
      }
      return typeof value === 'string'
        ? fail('bool_parsing', 'Input should be a valid boolean, unable to interpret input')
        : fail('bool_type', 'Input should be a valid boolean');
    case 'str':
      if (typeof value === 'string') return ok(value);
      return fail('string_type', 'Input should be a valid string');
    case 'list':
      return Array.isArray(value) ? ok(value) : fail('list_type', 'Input should be a valid list');
    case 'object':
      return value !== null && typeof value === 'object' && !Array.isArray(value)
        ? ok(value)
        : fail('model_type', 'Input should be a valid dictionary or instance of StreamOptions');
  }
}

/**
 * The declared fields of a request model (null means "unset"): the body with coerced values, and
 * the errors for missing required fields and invalid values, in pydantic's order.
 */
export function coerceFields(
  body: Record<string, unknown>,
  fields: Record<string, FieldKind>,
  required: string[],
): { value: Record<string, unknown>; errors: PydanticError[] } {
  const errors: PydanticError[] = [];
  const value: Record<string, unknown> = { ...body };
  for (const name of required) {
    if (!(name in body)) {
      errors.push({ type: 'missing', loc: ['body', name], msg: 'Field required', input: body });
    }
  }
  for (const [name, kind] of Object.entries(fields)) {
    // null is "unset" for the Optional fields; a required field is never Optional (null fails its type).
    if (body[name] === undefined || (body[name] === null && !required.includes(name))) continue;
    const result = coerce(kind, name, body[name]);
    if (result.ok) value[name] = result.value;
    else errors.push(result.error);
  }
  return { value, errors };
}

// ---------------------------------------------------------------------------------------------
// Routing

/** One request as handlers see it: the body is already read. */
export interface Call {
  req: IncomingMessage;
  res: ServerResponse;
  url: URL;
  body: Buffer;
}

export interface Route<C extends Call> {
  path: string;
  /** A `{name:path}`-style route: the engine's `matches` decides what it covers. */
  prefix?: boolean;
  /**
   * A Starlette `Mount` of an ASGI app with path_regex `^{path}(?P<path>.*)$` (the /metrics
   * workaround of vLLM and SGLang): every path that starts with `path`, every method, no 307.
   * Not listed in `Available routes are:` nor in /openapi.json; `methods` is unused.
   */
  mount?: boolean;
  methods: string[];
  handler: (call: C) => void | Promise<void>;
}

function exactPath(route: { path: string }, path: string): boolean {
  return route.path === path;
}

/**
 * Starlette's routing once the middlewares let a request through: the matching route's handler
 * (an HttpError it throws becomes the engine's error body), else redirect_slashes' 307 to the
 * other slash form, 404, or 405 with `allow`.
 */
export async function routeRequest<C extends Call>(
  call: C,
  path: string,
  routes: Route<C>[],
  matches: (route: Route<C>, path: string) => boolean = exactPath,
): Promise<void> {
  const { req, res, url } = call;
  const method = req.method ?? 'GET';
  const matching = routes.filter((r) => (r.mount ? path.startsWith(r.path) : matches(r, path)));
  if (matching.length === 0) {
    // /v1/models/ → 307 /v1/models (and the other way round).
    const alt = path.endsWith('/') ? path.slice(0, -1) : `${path}/`;
    if (path !== '/' && routes.some((r) => !r.prefix && !r.mount && r.path === alt)) {
      const location = `${url.pathname.replace(path, alt)}${url.search}`;
      res.writeHead(307, { location, 'content-length': 0 });
      res.end();
      return;
    }
    sendDetail(res, 404, 'Not Found');
    return;
  }
  // Starlette takes the first full match (a Mount matches every method), else 405 for a partial one.
  const route = matching.find((r) => r.mount || r.methods.includes(method));
  if (!route) {
    const allow = [...new Set(matching.flatMap((r) => r.methods))].join(', ');
    sendDetail(res, 405, 'Method Not Allowed', { allow });
    return;
  }
  try {
    await route.handler(call);
  } catch (error) {
    if (!(error instanceof HttpError)) throw error;
    sendError(res, error);
  }
}

// ---------------------------------------------------------------------------------------------
// uvicorn

/** The two uvicorn outputs: its console lines (stderr) and its access lines. */
export interface UvicornLog {
  uvicorn(level: 'INFO' | 'WARNING' | 'ERROR', message: string): void;
  access(client: string, method: string, path: string, httpVersion: string, status: number): void;
}

/** uvicorn's side of an API server: the listener, open connections, access log and shutdown. */
export abstract class UvicornServer {
  private readonly http: http.Server;
  private readonly sockets = new Set<Socket>();
  /** Per connection: requests whose response has not finished, and the keep-alive timer. */
  private readonly connections = new WeakMap<Socket, { active: number; idle?: NodeJS.Timeout }>();

  /** @param keepAliveMs uvicorn's timeout_keep_alive: how long a connection may stay idle */
  constructor(
    private readonly keepAliveMs: number,
    private readonly uvicornLog: UvicornLog,
  ) {
    this.http = http.createServer((req, res) => {
      this.keepAlive(req, res);
      this.onRequest(req, res);
    });
    // Node's own keep-alive announces itself (`Keep-Alive: timeout=5`, which some clients honour)
    // and closes an idle connection 1 s after that; uvicorn does neither. keepAlive() does its job.
    this.http.keepAliveTimeout = 0;
    this.http.on('connection', (socket: Socket) => {
      this.sockets.add(socket);
      this.connections.set(socket, { active: 0 });
      socket.once('close', () => {
        this.sockets.delete(socket);
        clearTimeout(this.connections.get(socket)?.idle);
      });
    });
  }

  /**
   * uvicorn's keep-alive: no Connection or Keep-Alive header on a kept HTTP/1.1 connection (a
   * client's `Connection: close` and HTTP/1.0 keep Node's headers), and the connection closed
   * once idle for keepAliveMs after its last response, unless bytes of a next request arrived
   * meanwhile (uvicorn cancels the timer on any data received).
   */
  private keepAlive(req: IncomingMessage, res: ServerResponse): void {
    const socket = req.socket;
    const state = this.connections.get(socket);
    if (!state) return;
    if (res.shouldKeepAlive && req.httpVersion === '1.1') res.removeHeader('connection');
    clearTimeout(state.idle);
    state.active += 1;
    res.once('close', () => {
      state.active -= 1;
      if (state.active > 0 || socket.destroyed) return;
      const bytesRead = socket.bytesRead;
      state.idle = setTimeout(() => {
        if (state.active === 0 && socket.bytesRead === bytesRead) socket.destroy();
      }, this.keepAliveMs);
    });
  }

  protected abstract onRequest(req: IncomingMessage, res: ServerResponse): void;

  /** uvicorn's access line, logged when the response starts. */
  protected logAccess(req: IncomingMessage, res: ServerResponse): void {
    // Node's implicit headers also go through writeHead, so wrapping it sees every response.
    const writeHead = res.writeHead.bind(res) as (...a: unknown[]) => ServerResponse;
    let logged = false;
    res.writeHead = ((status: number, ...rest: unknown[]) => {
      if (!logged) {
        logged = true;
        const address = (req.socket.remoteAddress ?? '').replace(/^::ffff:/, '');
        const client = req.socket.remotePort ? `${address}:${req.socket.remotePort}` : '-';
        this.uvicornLog.access(client, req.method ?? 'GET', req.url ?? '/', req.httpVersion, status);
      }
      return writeHead(status, ...rest);
    }) as typeof res.writeHead;
  }

  /** Starts listening (TCP, or a unix socket path); rejects with the listen error (e.g. EADDRINUSE). */
  protected listenOn(target: ListenOptions | string): Promise<void> {
    return new Promise((resolve, reject) => {
      const onError = (error: Error): void => reject(error);
      this.http.once('error', onError);
      this.http.listen(target, () => {
        this.http.off('error', onError);
        resolve();
      });
    });
  }

  /**
   * uvicorn's shutdown: stop listening and wait for open connections to finish, closing
   * keep-alive connections as they become idle (uvicorn waits without a timeout), with its lines.
   */
  async shutdown(): Promise<void> {
    const log = this.uvicornLog;
    log.uvicorn('INFO', 'Shutting down');
    const closed = new Promise<void>((resolve) => {
      const sweep = setInterval(() => this.http.closeIdleConnections(), IDLE_SWEEP_MS);
      this.http.close(() => {
        clearInterval(sweep);
        resolve();
      });
      this.http.closeIdleConnections();
    });
    if (this.sockets.size > 0) {
      log.uvicorn('INFO', 'Waiting for connections to close. (CTRL+C to force quit)');
    }
    await closed;
    log.uvicorn('INFO', 'Waiting for application shutdown.');
    log.uvicorn('INFO', 'Application shutdown complete.');
    log.uvicorn('INFO', `Finished server process [${process.pid}]`);
  }
}
