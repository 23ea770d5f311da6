import type { ServerResponse } from 'node:http';
import type { Socket } from 'node:net';
import { Injectable, Logger } from '@nestjs/common';
import type { FastifyInstance, FastifyRequest } from 'fastify';
import { AppError } from '../domain/app-error';
import { sendError } from './app-error.filter';
import { CLIENT_GONE, isPreflight } from './http-error';
import { isAdminPath, routedPath } from './auth.hook';

/** Seconds an overloaded client is told to wait (Retry-After on a 429): slots free up fast. */
const OVERLOAD_RETRY_AFTER_S = 1;

/** Paths that are never refused: probes, metrics and docs must answer during drain and overload. */
const UNGATED_PATHS = new Set(['/health', '/ready', '/metrics', '/openapi.json', '/docs']);

/**
 * One request in flight: how to abort what it waits for (the client left, or the drain time ran
 * out), and how to cut its stream. Costs nothing until something subscribes.
 */
export class RequestScope {
  /** Set by a stream writer: ends its stream with an error event when the drain time is up (the scope is aborted after). */
  cut: ((error: AppError) => void) | null = null;
  /** Its end counts as activity for the idle sleep (not so a request that needs no engine: a model list). */
  activity = true;
  /** Its neighbours among the requests in flight (TrafficGate's list). */
  prev: RequestScope | null = null;
  next: RequestScope | null = null;
  private reason: AppError | null = null;
  private controller: AbortController | null = null;
  private listeners: Array<(reason: AppError) => void> | null = null;

  /** An AbortSignal for APIs that take one (axios), made on first use. */
  get signal(): AbortSignal {
    if (!this.controller) {
      this.controller = new AbortController();
      if (this.reason) this.controller.abort(this.reason);
    }
    return this.controller.signal;
  }

  get aborted(): boolean {
    return this.reason !== null;
  }

  /** Why it was aborted (null while it was not). */
  get abortReason(): AppError | null {
    return this.reason;
  }

  /** Runs `fn` once when the request is aborted (at once if it already was). */
  onAbort(fn: (reason: AppError) => void): void {
    if (this.reason) return fn(this.reason);
    (this.listeners ??= []).push(fn);
  }

  abort(reason: AppError): void {
    if (this.reason) return;
    this.reason = reason;
    this.controller?.abort(reason);
    for (const fn of this.listeners ?? []) fn(reason);
  }
}

declare module 'fastify' {
  interface FastifyRequest {
    tideScope?: RequestScope;
  }
}

/**
 * Admits API requests: counts those in flight, refuses with 429 past web.max_concurrent_requests,
 * refuses with 503 once the service drains, and lets shutdown wait for (or cut) what is in flight.
 */
@Injectable()
export class TrafficGate {
  private readonly log = new Logger(TrafficGate.name);
  /**
   * The requests in flight, as a linked list through their scopes. Not a Set: V8 rebuilds a Set's
   * table every few dozen adds and deletes, and an old table that dies after being promoted keeps
   * the requests it held alive through the next scavenges. They are promoted in turn, with all
   * they reference, and the heap settles into promoting half of what the relay allocates: twice
   * the CPU per request (README, "Performance").
   */
  private first: RequestScope | null = null;
  private count = 0;
  private draining = false;
  private idleWaiters: Array<() => void> = [];
  /** Counted by the metrics: requests refused for overload. */
  rejectedForOverload = 0;
  /** Called whenever an admitted request ends (the supervisor counts idle time from there). */
  onSettled: (scope: RequestScope) => void = () => undefined;

  constructor(private readonly maxConcurrent: number) {}

  get inFlight(): number {
    return this.count;
  }

  /** The requests in flight that count as activity (not a model list while vLLM sleeps: RequestScope.activity). */
  get activeInFlight(): number {
    let active = 0;
    for (let scope = this.first; scope; scope = scope.next) if (scope.activity) active += 1;
    return active;
  }

  get isDraining(): boolean {
    return this.draining;
  }

  register(fastify: FastifyInstance): void {
    fastify.addHook('onRequest', (request, reply, done) => {
      const path = routedPath(request);
      // Probes, docs, operator actions, CORS preflights and requests no route takes (a 404 or 405:
      // a load balancer's `GET /`, a browser's /favicon.ico) are neither counted (they are not
      // traffic: they must not keep vLLM awake) nor refused.
      const unrouted = request.routeOptions.url === undefined;
      if (unrouted || UNGATED_PATHS.has(path) || path.startsWith('/docs/') || isAdminPath(path) || isPreflight(request.method, request.headers)) return done();
      const handedOver = request.raw.tideHandedOver;
      if (handedOver) {
        request.tideScope = handedOver.scope; // admitted already (OpenAiProxy)
        return done();
      }
      const refusal = this.refusal();
      if (refusal) {
        if (refusal.code === 'OVERLOADED') this.rejectedForOverload += 1;
        return void sendError(reply, refusal);
      }
      request.tideScope = this.admit(reply.raw);
      done();
    });
  }

  /** Why a request would be refused now (503 while draining, 429 when full), or null. */
  refusal(): AppError | null {
    if (this.draining) return new AppError('SHUTTING_DOWN', 'the service is shutting down', { byState: true });
    if (this.count >= this.maxConcurrent) {
      return new AppError('OVERLOADED', `too many requests in flight (web.max_concurrent_requests = ${this.maxConcurrent}); retry shortly`, { retryAfter: OVERLOAD_RETRY_AFTER_S });
    }
    return null;
  }

  /**
   * Counts the request in flight until its response closes; a client that leaves first aborts it.
   * Call it when the request arrives (its connection is open then).
   */
  admit(res: ServerResponse): RequestScope {
    const scope = new RequestScope();
    this.add(scope);
    closeWithConnection(res);
    res.on('close', () => {
      if (!res.writableFinished) scope.abort(CLIENT_GONE);
      this.remove(scope);
      this.onSettled(scope);
      if (this.count === 0) this.wakeIdleWaiters();
    });
    return scope;
  }

  private add(scope: RequestScope): void {
    scope.next = this.first;
    if (this.first) this.first.prev = scope;
    this.first = scope;
    this.count += 1;
  }

  private remove(scope: RequestScope): void {
    if (scope.prev === null && this.first !== scope) return; // not in the list (any more)
    if (scope.prev) scope.prev.next = scope.next;
    else this.first = scope.next;
    if (scope.next) scope.next.prev = scope.prev;
    scope.prev = scope.next = null; // a finished request links to nothing
    this.count -= 1;
  }

  /** Refuse new requests from now on. */
  startDraining(): void {
    this.draining = true;
  }

  /** Resolves when nothing is in flight, or after `timeoutMs`; returns how many are still in flight. */
  async waitIdle(timeoutMs: number): Promise<number> {
    if (this.count > 0) {
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, timeoutMs);
        this.idleWaiters.push(() => {
          clearTimeout(timer);
          resolve();
        });
      });
    }
    return this.count;
  }

  /** Ends whatever is still in flight: streams get an error event, plain requests `error` (a 503). `why` is logged. */
  cutAll(why = 'the drain timeout passed', error = new AppError('SHUTTING_DOWN', 'the service shut down before the answer was complete')): void {
    if (this.count > 0) this.log.warn(`cutting ${this.count} request(s) still in flight: ${why}`);
    const inFlight: RequestScope[] = [];
    for (let scope = this.first; scope; scope = scope.next) inFlight.push(scope);
    for (const scope of inFlight) {
      scope.cut?.(error); // a stream ends with an error event first
      scope.abort(error); // and vLLM stops generating
    }
  }

  private wakeIdleWaiters(): void {
    const waiters = this.idleWaiters;
    this.idleWaiters = [];
    for (const wake of waiters) wake();
  }
}

/** Per connection: its responses still queued behind the one that holds it (see closeWithConnection). */
const queuedOn = new WeakMap<Socket, ServerResponse[]>();

/**
 * Makes `res` close when its connection closes, as Node closes the response that holds the
 * connection. Node does not close a response queued behind that one (a pipelined request, whose
 * answer waits for the answers before it): it never gets the socket, so it never emits 'close',
 * and whatever waits for that — the request's slot, the abort of its generation in vLLM, its
 * metrics and access line, the drain at shutdown — would wait forever. Such a response is
 * destroyed and closed when the connection closes. Costs nothing for the usual response, which
 * holds its connection from the start; one listener per connection however many are queued on it,
 * removed when the last of them gets the socket (keep-alive connections outlive their requests).
 * Call it when the request arrives; calling it again for the same response does nothing.
 */
export function closeWithConnection(res: ServerResponse): void {
  if (res.socket !== null) return; // it holds the connection: Node closes it
  const socket = res.req?.socket;
  if (!socket) return;
  let queued = queuedOn.get(socket);
  if (queued === undefined) {
    queuedOn.set(socket, (queued = []));
    socket.on('close', closeQueued);
  } else if (queued.includes(res)) {
    return;
  }
  queued.push(res);
  res.on('socket', dequeue);
}

/** A queued response got its connection (the answers before it are sent): Node closes it from now on. */
function dequeue(this: ServerResponse, socket: Socket): void {
  this.removeListener('socket', dequeue);
  const queued = queuedOn.get(socket) ?? [];
  const at = queued.indexOf(this);
  if (at === -1) return;
  queued.splice(at, 1);
  if (queued.length > 0) return;
  queuedOn.delete(socket);
  socket.removeListener('close', closeQueued);
}

/** The connection closed: the responses still queued on it will never be sent. */
function closeQueued(this: Socket): void {
  const queued = queuedOn.get(this) ?? [];
  queuedOn.delete(this);
  for (const res of queued) {
    res.removeListener('socket', dequeue);
    res.destroy(); // what is written to it from now on goes nowhere, without an error
    res.emit('close');
  }
}

/** The signal that aborts the upstream call: the client left, or the drain time ran out. */
export function requestSignal(request: FastifyRequest): AbortSignal {
  return request.tideScope?.signal ?? new AbortController().signal;
}
