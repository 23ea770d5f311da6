import { createHash, timingSafeEqual } from 'node:crypto';
import type { IncomingHttpHeaders } from 'node:http';
import { Logger } from '@nestjs/common';
import type { FastifyInstance, FastifyRequest } from 'fastify';
import { type AuthConfig, isLoopback } from '../config/config.schema';
import { AppError } from '../domain/app-error';
import { sendError } from './app-error.filter';
import { isPreflight, routePathOf } from './http-error';

/** Always reachable without a key: Kubernetes probes and the API description. */
const NO_KEY_PATHS = new Set(['/health', '/ready', '/openapi.json', '/docs']);

/** Compares keys in constant time: equal-length SHA-256 digests, never the keys themselves. */
class KeySet {
  private readonly digests: Buffer[];

  constructor(keys: readonly string[]) {
    this.digests = keys.map(digest);
  }

  get empty(): boolean {
    return this.digests.length === 0;
  }

  has(key: string): boolean {
    const candidate = digest(key);
    let found = false;
    for (const d of this.digests) found = timingSafeEqual(d, candidate) || found; // no early exit
    return found;
  }
}

function digest(key: string): Buffer {
  return createHash('sha256').update(key).digest();
}

/** The admin API's paths (as routed or decoded): the admin key's, never open to other origins. */
export function isAdminPath(path: string): boolean {
  return path === '/admin' || path.startsWith('/admin/');
}

/**
 * The path a request was routed by: its route's pattern, as Fastify matched it after decoding the
 * URL. Never the raw URL for a decision: `/%61dmin/status` is routed to `/admin/status`. A request
 * no route takes (a 404 or 405), or the catch-all preflight route, has its path decoded, so that it
 * is judged as the routes are.
 */
export function routedPath(request: FastifyRequest): string {
  const route = request.routeOptions.url;
  // The CORS preflight route takes every path ('*'): the request's own path is what was asked for.
  return route !== undefined && route !== '*' ? route : routePathOf(request.url);
}

/** The key a client sent: `Authorization: Bearer KEY` (scheme in any case) or `x-api-key: KEY`. */
function presentedKey(headers: IncomingHttpHeaders): string | null {
  const auth = headers.authorization;
  if (typeof auth === 'string') {
    const match = /^bearer\s+(\S+)\s*$/i.exec(auth);
    if (match) return match[1];
  }
  const apiKey = headers['x-api-key'];
  return typeof apiKey === 'string' && apiKey !== '' ? apiKey : null;
}

/**
 * Why an admin request is refused as coming from a web page of another origin, or null: the
 * browser says so (Sec-Fetch-Site), or its Origin is not the host it was sent to. curl and the
 * CLI send neither header; Swagger UI at /docs is same-origin.
 */
export function crossSiteAdmin(path: string, headers: IncomingHttpHeaders): AppError | null {
  if (!isAdminPath(path)) return null;
  const site = headers['sec-fetch-site'];
  const origin = headers.origin;
  const foreign =
    site !== undefined ? site !== 'same-origin' && site !== 'none' : origin !== undefined && originHost(origin) !== headers.host?.toLowerCase();
  if (!foreign) return null;
  return new AppError('FORBIDDEN', `the admin API takes no requests from web pages of another origin${origin ? ` (Origin: ${origin})` : ''}`);
}

/** The host[:port] of an Origin header, lower case; null for "null" or one that is not a URL. */
function originHost(origin: string): string | null {
  try {
    return new URL(origin).host.toLowerCase() || null;
  } catch {
    return null;
  }
}

/**
 * API keys (auth.api_keys) guard every route but the probes; admin keys (auth.admin_api_keys,
 * else the API keys) guard /admin; /metrics is open unless auth.protect_metrics.
 */
export class ApiKeys {
  private readonly apiKeys: KeySet;
  private readonly adminKeys: KeySet;

  constructor(private readonly auth: AuthConfig) {
    this.apiKeys = new KeySet(auth.api_keys);
    this.adminKeys = new KeySet(auth.admin_api_keys.length > 0 ? auth.admin_api_keys : auth.api_keys);
  }

  get none(): boolean {
    return this.apiKeys.empty && this.adminKeys.empty;
  }

  /** Why the request is refused (401), or null when it may proceed. `path`: as routed (routedPath). */
  refusal(method: string, path: string, headers: IncomingHttpHeaders): AppError | null {
    if (this.none) return null;
    if (NO_KEY_PATHS.has(path) || path.startsWith('/docs/') || isPreflight(method, headers)) return null;
    if (path === '/metrics' && !this.auth.protect_metrics) return null;
    // /metrics (protect_metrics) takes an API key, or the admin key when only admin keys are set.
    const admin = isAdminPath(path) || (path === '/metrics' && this.apiKeys.empty);
    const keys = admin ? this.adminKeys : this.apiKeys;
    if (keys.empty) return null;
    const key = presentedKey(headers);
    if (key !== null && keys.has(key)) return null;
    // Without admin keys the API keys open the admin API too: then it is an API key that is wanted.
    if (admin && this.auth.admin_api_keys.length > 0) {
      return new AppError('UNAUTHORIZED', key === null ? 'an admin key is required (auth.admin_api_keys; Authorization: Bearer KEY)' : 'this key is not an admin key');
    }
    return new AppError('UNAUTHORIZED', key === null ? 'an API key is required (Authorization: Bearer KEY)' : 'the API key is not valid');
  }

  register(fastify: FastifyInstance, bindHost: string): void {
    // Keys or not: a browser sends no preflight for a body-less POST, so without this any web page
    // the operator opens could restart vLLM or put it to sleep.
    // A preflight the CORS route takes (CORS on) is left to it: it refuses one for /admin as
    // Starlette refuses an origin it does not allow (400 "Disallowed CORS origin").
    fastify.addHook('onRequest', (request, reply, done) => {
      const toCors = request.routeOptions.url === '*' && isPreflight(request.method, request.headers);
      const refusal = toCors ? null : crossSiteAdmin(routedPath(request), request.headers);
      if (refusal) return void sendError(reply, refusal);
      done();
    });
    if (this.none) {
      if (!isLoopback(bindHost)) {
        new Logger('Auth').warn(
          `no API keys are configured (auth.api_keys) and the service listens on ${bindHost}: anyone who can reach it can use the model and the admin API`,
        );
      }
      return;
    }
    fastify.addHook('onRequest', (request, reply, done) => {
      const refusal = this.refusal(request.method, routedPath(request), request.headers);
      if (!refusal) return done();
      void reply.header('www-authenticate', 'Bearer');
      sendError(reply, refusal);
    });
  }
}
