import type { IncomingMessage, ServerResponse } from 'node:http';
import type { FastifyInstance } from 'fastify';
import { noRouteFor, sendError } from './app-error.filter';
import { isAdminPath, routedPath } from './auth.hook';
import { isPreflight, routePathOf } from './http-error';

/** What Starlette's CORSMiddleware allows with vLLM's defaults (--allowed-methods, --allowed-headers: ["*"]). */
const ALLOWED_METHODS = 'DELETE, GET, HEAD, OPTIONS, PATCH, POST, PUT';
/** Seconds a browser may cache a preflight's answer (Starlette's default). */
const PREFLIGHT_MAX_AGE = '600';

/**
 * CORS as vLLM serves it (Starlette's CORSMiddleware, `--allowed-origins` default `["*"]`), so a
 * browser app that called vLLM calls tide-vllm unchanged: answers to an allowed origin carry
 * Access-Control-Allow-Origin, and preflights are answered before any key check or admission
 * (a browser sends none with them). No credentials: keys go in the Authorization header, which a
 * browser never adds by itself. Never for the admin API: no web page is to restart vLLM or load
 * adapters from the operator's browser, keys or not.
 */
export class Cors {
  private readonly any: boolean;
  /** Lower case: scheme and host are case-insensitive, and browsers send them in lower case. */
  private readonly origins: Set<string>;

  /** `origins`: web.cors_allowed_origins; "*" allows any, none turns CORS off. */
  constructor(origins: readonly string[]) {
    this.any = origins.includes('*');
    this.origins = new Set(origins.map((origin) => origin.toLowerCase()));
  }

  /** Marks the answer to `req` (on `path`, as routed) as readable by its origin, when that one is allowed. */
  apply(req: IncomingMessage, res: ServerResponse, path: string): void {
    const origin = req.headers.origin;
    if (origin === undefined || isAdminPath(path)) return;
    if (this.any) res.setHeader('access-control-allow-origin', '*');
    else if (this.origins.has(origin.toLowerCase())) {
      res.setHeader('access-control-allow-origin', origin);
      res.setHeader('vary', 'Origin');
    }
  }

  /** Every answer Fastify gives gets the header; preflights (OPTIONS, any path) are answered here. */
  register(fastify: FastifyInstance): void {
    if (!this.any && this.origins.size === 0) return;
    fastify.addHook('onRequest', (request, reply, done) => {
      this.apply(request.raw, reply.raw, routedPath(request));
      done();
    });
    fastify.options('*', async (request, reply) => {
      if (!isPreflight(request.method, request.headers)) return sendError(reply, noRouteFor(request));
      const { origin = '', 'access-control-request-headers': headers } = request.headers;
      if (isAdminPath(routePathOf(request.url)) || (!this.any && !this.origins.has(origin.toLowerCase()))) {
        return reply.code(400).type('text/plain').send('Disallowed CORS origin');
      }
      reply.header('access-control-allow-methods', ALLOWED_METHODS).header('access-control-max-age', PREFLIGHT_MAX_AGE);
      if (headers !== undefined) reply.header('access-control-allow-headers', headers);
      return reply.code(200).type('text/plain').send('OK');
    });
  }
}
