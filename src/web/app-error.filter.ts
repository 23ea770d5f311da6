import { type IncomingMessage, STATUS_CODES, type ServerResponse } from 'node:http';
import type { Socket } from 'node:net';
import { type ArgumentsHost, Catch, type ExceptionFilter, HttpException, Logger } from '@nestjs/common';
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import { AppError } from '../domain/app-error';
import { newRequestId } from '../domain/chat.factory';
import {
  type ErrorFlavor,
  type HttpError,
  MAX_PATH_SEGMENT,
  NOT_JSON_TYPE,
  TOO_LARGE,
  asVllmAnswers,
  errorBody,
  errorType,
  flavorOf,
  isPreflight,
  pathOf,
  toHttpError,
  transportError,
} from './http-error';
import { bodyRequestId, relayedRequestId } from './logging';
import { noteError, outcomeOf } from './request-outcome';

/**
 * Fastify's own refusal of a body, by its code, as json-body words it: a type no parser takes.
 * (Every JSON body is read by json-body's readJson, which says the rest itself.)
 */
function bodyError(code: unknown): AppError | null {
  return code === 'FST_ERR_CTP_INVALID_MEDIA_TYPE' ? NOT_JSON_TYPE : null;
}

const log = new Logger('AppErrorFilter');

/** An exception nothing expected: the log gets its stack, the client a bare 500 (AppError.internal). */
export function logUnhandled(method: string | undefined, url: string | undefined, err: unknown, logger = log): void {
  logger.error(`unhandled error on ${method} ${url}: ${(err as Error)?.stack ?? String(err)}`);
}

/**
 * Turns every exception into an honest status and a body in the route's error shape.
 * Anything unexpected is a 500 that says nothing of the internals; the log gets the stack.
 */
@Catch()
export class AppErrorFilter implements ExceptionFilter {
  catch(exception: unknown, host: ArgumentsHost): void {
    const ctx = host.switchToHttp();
    const request = ctx.getRequest<FastifyRequest>();
    const reply = ctx.getResponse<FastifyReply>();
    const redirect = exception instanceof HttpException && exception.getStatus() === 404 ? slashRedirect(request) : null;
    if (redirect !== null) return void reply.code(307).header('location', redirect).send();
    void sendError(reply, this.toAppError(exception, request));
  }

  private toAppError(exception: unknown, request: FastifyRequest): AppError {
    if (exception instanceof AppError) {
      if (exception.code === 'INTERNAL') log.error(exception.stack);
      return exception;
    }
    const refused = bodyError((exception as { code?: unknown })?.code);
    if (refused !== null) return refused;
    if (exception instanceof HttpException) return fromHttpException(exception, request);
    logUnhandled(request.method, request.url, exception);
    return AppError.internal();
  }
}

/** Nest's and Fastify's own exceptions (a path no route has, a body type no parser takes …), in the project's codes. */
function fromHttpException(exception: HttpException, request: FastifyRequest): AppError {
  const status = exception.getStatus();
  switch (status) {
    case 404:
    case 405:
      return noRouteFor(request);
    case 413:
      return TOO_LARGE;
    case 415:
      return NOT_JSON_TYPE;
    default:
      return status >= 500 ? AppError.internal() : AppError.invalid(exception.message);
  }
}

/**
 * Where a path no route has, but would have without its trailing slash, is redirected (307, the
 * method and body kept), as vLLM's Starlette router does (`redirect_slashes`): `POST
 * /v1/chat/completions/` works with `curl -L` there, and here. The Location is relative (Starlette
 * writes the absolute URL it was called at; a relative one also holds behind a TLS proxy).
 */
export function slashRedirect(request: FastifyRequest): string | null {
  const [path, query] = splitUrl(request.url);
  if (path === '/' || !path.endsWith('/') || !readable(path)) return null;
  const target = path.slice(0, -1);
  if (target.startsWith('//')) return null; // a Location that would name another host
  if (!METHODS.some((method) => request.server.findRoute({ method, url: target }) !== null)) return null;
  return query === null ? target : `${target}?${query}`;
}

function splitUrl(url: string): [string, string | null] {
  const at = url.indexOf('?');
  return at === -1 ? [url, null] : [url.slice(0, at), url.slice(at + 1)];
}

/** Whether Fastify's router can match `path`: its percent-escapes decode, no segment is over MAX_PATH_SEGMENT. */
function readable(path: string): boolean {
  try {
    decodeURIComponent(path);
  } catch {
    return false;
  }
  return path.split('/').every((segment) => segment.length <= MAX_PATH_SEGMENT);
}

/** OPTIONS is left out: with CORS on, one route takes it on every path, for preflights only. */
const METHODS = ['GET', 'HEAD', 'POST', 'PUT', 'PATCH', 'DELETE'] as const;

/**
 * A request no route takes: a 405 with the methods the path takes (the Allow header, as vLLM's
 * FastAPI answers `GET /v1/chat/completions`), or a 404 for a path no route has — or that a
 * route took and found nothing at (a file under /docs/), or that the router could not read.
 */
export function noRouteFor(request: FastifyRequest): AppError {
  const path = pathOf(request.url);
  const notFound = new AppError('NOT_FOUND', `no route for ${request.method} ${path}`);
  // Fastify's router answers a bad percent-escape or an over-long segment with its error handler, not null.
  if (!readable(path)) return notFound;
  const allow = METHODS.filter((method) => request.server.findRoute({ method, url: path }) !== null);
  if (allow.length === 0 || allow.includes(request.method as (typeof METHODS)[number])) return notFound;
  return new AppError('METHOD_NOT_ALLOWED', `method ${request.method} is not allowed on ${path} (it takes ${allow.join(', ')})`, { allow });
}

/**
 * A request no route takes is answered as vLLM's router answers it, before a byte of its body is
 * read (a `preParsing` hook, after the key check): the 307 of a trailing slash, a 405 with `Allow`,
 * or a 404 — not the 400 or 413 that its body would get from the parser. So is an OPTIONS that
 * is no CORS preflight (the preflight route takes every path). What the client still sends is
 * read and dropped, as after a 413 (lingerThen).
 */
export function answerUnroutedEarly(fastify: FastifyInstance): void {
  fastify.addHook('preParsing', (request, reply, payload, done) => {
    const route = request.routeOptions.url;
    if (route !== undefined && !(route === '*' && !isPreflight(request.method, request.headers))) return done(null, payload);
    const answer = () => {
      const redirect = slashRedirect(request);
      if (redirect !== null) return void reply.code(307).header('location', redirect).send();
      void sendError(reply, noRouteFor(request));
    };
    const { 'content-length': length, 'transfer-encoding': chunked } = request.headers;
    if ((length !== undefined && length !== '0') || chunked !== undefined) lingerThen(request.raw, reply, answer);
    else answer();
  });
}

/**
 * Answers with `err` in the route's error shape (simple envelope, OpenAI's, or plain), through
 * the one code → status mapping. Anything that is not an AppError is a 500 that tells nothing.
 */
export function sendError(reply: FastifyReply, err: unknown): FastifyReply | undefined {
  if (reply.sent || reply.raw.headersSent) {
    if (!reply.raw.writableEnded) reply.raw.end();
    return undefined;
  }
  const request = reply.request;
  let error = err;
  if (!(error instanceof AppError)) {
    logUnhandled(request.method, request.url, err);
    error = AppError.internal();
  }
  return replyWith(reply, toHttpError(error as AppError));
}

/**
 * Fastify's `frameworkErrors`: a URL its router cannot take (bad percent-encoding, a path
 * parameter over 128 characters), answered in the route's shape rather than Fastify's.
 */
export function sendFrameworkError(error: Error & { code?: string }, reply: FastifyReply): void {
  const http = transportError(error.code);
  // A 500 says "the service log has the details": it must have them.
  if (http.status >= 500) log.error(`${error.code ?? 'framework error'} on ${reply.request.method} ${reply.request.url}: ${error.message}`);
  void replyWith(reply, http);
}

function replyWith(reply: FastifyReply, http: HttpError): FastifyReply {
  const request = reply.request;
  const answer = errorAnswer(reply.raw, http, flavorOf(request.url, request.body), requestIdOf(request));
  const send = () => void reply.code(answer.status).headers(answer.headers).send(answer.body);
  if (answer.status === 413) lingerThen(request.raw, reply, send);
  else send();
  return reply;
}

/**
 * Node's 'clientError' (as Fastify's clientErrorHandler): a request not received within
 * web.client_timeout (408), headers over 16 KiB (431), bytes that are not HTTP (400). Answered
 * in the project's shapes with `Connection: close`, and the connection closed, as Node does. A
 * request already under way (a 408 mid-body) is answered through its response: in its route's
 * shape, with its request id, recorded by the metrics and the access log. Before a request was
 * read its path is unknown: the plain shape, and a fresh id, in a warning (there is no access line).
 */
export function answerClientError(err: NodeJS.ErrnoException, socket: Socket, metrics?: { refusedUnread(type: string): void } | null): void {
  if (err.code === 'ECONNRESET' || !socket.writable) return void socket.destroy(err);
  const http = transportError(err.code);
  // The response in progress on the connection, if any (Node's own clientError answer reads it too),
  // and the request being received (Node's internals, as `_httpMessage`).
  const { _httpMessage: res, parser } = socket as Socket & { _httpMessage?: ServerResponse | null; parser?: { incoming?: IncomingMessage | null } | null };
  // A request answered already (refused before its body: 401, 404, 413…) whose body was still
  // coming: a second answer would be taken for the next request's. Closed without a word.
  if (!res && parser?.incoming && !parser.incoming.complete) return void socket.destroy(err);
  if (!res) {
    const requestId = newRequestId();
    // No request, so no access line: this one says what was refused, and to whom (not for a
    // connection that never sent a byte: a preconnect, or a port probe, refused nothing).
    if (socket.bytesRead > 0) {
      new Logger('HTTP').warn(`${http.status} ${http.type} (${err.code ?? 'parse error'}) before a request was read, from ${socket.remoteAddress ?? 'an unknown address'}; id ${requestId}`);
      metrics?.refusedUnread(http.type);
    }
    const body = JSON.stringify(errorBody(http, 'plain', requestId));
    socket.write(
      `HTTP/1.1 ${http.status} ${STATUS_CODES[http.status]}\r\ncontent-type: application/json; charset=utf-8\r\n` +
        `content-length: ${Buffer.byteLength(body)}\r\nx-request-id: ${requestId}\r\nconnection: close\r\n\r\n${body}`,
    );
    return void socket.destroy(err); // as Node: the answer is written at once, the client may still be sending
  }
  const req = res.req;
  // The client ended its side mid-request: it left (recorded as 499), nothing is answered. Or
  // the answer has begun (a 413 reading the rest of the body), or it is an earlier request's (this
  // one is pipelined behind it): nothing can be said in order.
  if (socket.readableEnded || res.headersSent || req.complete) return void socket.destroy(err);
  const id = res.getHeader('x-request-id'); // set by the metrics hook (Fastify routes)
  const requestId = outcomeOf(res).requestId ?? (typeof id === 'string' ? id : newRequestId());
  // Connection: close makes Node close the connection once the answer is out.
  writeHttpError(res, http, flavorOf(req.url ?? '/', undefined), requestId, { connection: 'close' });
}

/** An error's status, headers and body in the given shape, noted for the metrics and access log. */
function errorAnswer(res: ServerResponse, error: HttpError, flavor: ErrorFlavor, requestId: string) {
  const http = flavor === 'openai' ? asVllmAnswers(error) : error;
  noteError(res, http);
  outcomeOf(res).requestId = requestId;
  const headers: Record<string, string> = { 'x-request-id': requestId };
  if (http.retryAfter !== undefined) headers['retry-after'] = String(http.retryAfter);
  if (http.allow !== undefined) headers.allow = http.allow;
  // OpenAI's SDKs retry a 504 twice by default: a generation that outlasted vllm.timeout would
  // only outlast it again, each retry a whole generation wasted in vLLM. They honour this header,
  // also on an error that only a change of configuration mends (they retry every 5xx otherwise).
  if (http.type === UPSTREAM_TIMEOUT_TYPE || http.permanent) headers['x-should-retry'] = 'false';
  return { status: http.status, headers, body: errorBody(http, flavor, requestId) };
}

const UPSTREAM_TIMEOUT_TYPE = errorType('UPSTREAM_TIMEOUT');

/** How much of a refused body is still read and dropped (see lingerThen). */
const LINGER_BYTES = 16 * 1024 * 1024;

/**
 * Answers (`answer`) a request whose body is refused unread, or read only in part (a 413). The
 * client is usually still sending: closing at once resets the connection, and the client may
 * never read the answer; so, as nginx's lingering close, the rest of the body is read and dropped
 * — up to LINGER_BYTES, and within web.client_timeout (Node's request timeout). A body declared
 * larger than that gets `Connection: close` straight away. A client that asked to close
 * (`Connection: close`, HTTP/1.0) is answered once its body is in: Node closes such a connection
 * as soon as the answer is out, and one still uploading would see a broken pipe, not the answer.
 */
function lingerThen(req: IncomingMessage, reply: FastifyReply, answer: () => void): void {
  if (Number(req.headers['content-length']) > LINGER_BYTES) {
    void reply.header('connection', 'close');
    return answer();
  }
  reply.removeHeader('connection'); // Fastify's parser asks to close after a refused body
  let dropped = 0;
  req.on('data', (chunk: Buffer) => {
    dropped += chunk.length;
    if (dropped > LINGER_BYTES) req.socket.destroy();
  });
  req.resume();
  if (reply.raw.shouldKeepAlive || req.complete) return answer();
  req.once('end', answer);
}

/**
 * sendError for a response outside Fastify (the relay's fast path, hijacked replies): the same
 * status, headers and body. After the headers went out, it can only end the response.
 */
export function writeError(res: ServerResponse, err: AppError, flavor: ErrorFlavor, requestId: string): void {
  writeHttpError(res, toHttpError(err), flavor, requestId);
}

function writeHttpError(res: ServerResponse, http: HttpError, flavor: ErrorFlavor, requestId: string, extra: Record<string, string> = {}): void {
  if (res.headersSent) {
    if (!res.writableEnded) res.end();
    return;
  }
  const answer = errorAnswer(res, http, flavor, requestId);
  const body = JSON.stringify(answer.body);
  res
    .writeHead(answer.status, { ...answer.headers, ...extra, 'content-type': 'application/json; charset=utf-8', 'content-length': Buffer.byteLength(body) })
    .end(body);
}

/**
 * The id of a request's answer: on vLLM's routes as vLLM picks it (relayedRequestId), elsewhere
 * the body's request_id when it is a usable one, else the id Fastify gave the request.
 */
function requestIdOf(request: FastifyRequest): string {
  if (flavorOf(request.url, request.body) === 'openai') return relayedRequestId(request.headers, request.body, request.id);
  return bodyRequestId(request.body) ?? request.id;
}
