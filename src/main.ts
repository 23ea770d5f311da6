import 'reflect-metadata';
import { Logger as NestLogger } from '@nestjs/common';
import { NestFactory } from '@nestjs/core';
import { FastifyAdapter, type NestFastifyApplication } from '@nestjs/platform-fastify';
import type { FastifyError, FastifyReply, FastifyRequest } from 'fastify';
import { type IncomingMessage, type RequestListener, createServer } from 'node:http';
import type { Socket } from 'node:net';
import { Logger } from 'nestjs-pino';
import { AppModule } from './app.module';
import { ConfigError, UsageError, USAGE, loadConfig, resolveConfigPath } from './config/config.loader';
import type { TideConfig } from './config/config.schema';
import { listenProblem } from './infrastructure/listen';
import { launcherWatch } from './infrastructure/process-group';
import { VLLMServerManager } from './infrastructure/vllm-server.manager';
import { VLLMRelay } from './infrastructure/vllm.relay';
import { answerClientError, sendFrameworkError } from './web/app-error.filter';
import { Cors } from './web/cors';
import { MAX_PATH_SEGMENT, originForm, routePathOf } from './web/http-error';
import { fastifyJsonParser } from './web/json-body';
import { flushLogs, requestIdFor, stopLoggingIfStdoutGone } from './web/logging';
import { Metrics } from './web/metrics';
import { setupOpenApi } from './web/openapi';
import { TrafficGate } from './web/traffic.gate';
import { OpenAiProxy } from './web/openai.proxy';

/** Exit codes: a bad configuration (2, nothing started) is told apart from a failure to start or serve (1). */
const EXIT_CONFIG = 2;
const EXIT_FAILURE = 1;
/** Longest wait for a request's headers: they are small, so a client slower than this is stalling. */
const HEADERS_TIMEOUT_MS = 10_000;
/** How often Node looks for clients past their timeouts. */
const TIMEOUT_CHECK_MS = 1_000;
/**
 * A signal this soon after the first is a copy of it, not a second request: one Ctrl-C under
 * `npm run start` reaches node twice (from the terminal, and forwarded by npm).
 */
const SAME_SIGNAL_MS = 1_000;
/** How often a service run by npm checks that npm is still there. */
const LAUNCHER_CHECK_MS = 500;
/** Longest wait at exit for the log lines still held to reach a stdout that takes them slowly (then they are dropped). */
const LOG_FLUSH_MS = 5_000;
/** How long an idle client connection is kept: longer than common load balancers' idle timeout (60 s). */
const KEEP_ALIVE_MS = 65_000;

function readConfig(): TideConfig {
  try {
    const argv = process.argv.slice(2);
    if (argv.includes('-h') || argv.includes('--help')) {
      process.stdout.write(USAGE + '\n');
      process.exit(0);
    }
    return loadConfig(resolveConfigPath(argv, process.env));
  } catch (err) {
    if (err instanceof ConfigError || err instanceof UsageError) {
      process.stderr.write(`tide-vllm: ${err.message}\n`);
      process.exit(EXIT_CONFIG);
    }
    throw err;
  }
}

/** What the http level needs of the Nest application, made after the server: set once Nest has made them. */
interface HttpLevel {
  proxy: OpenAiProxy | null;
  metrics: Metrics | null;
  cors: Cors | null;
}

/**
 * The Fastify adapter and its http server: timeouts, the OpenAI relay's common case answered before
 * Fastify, errors before routing in the project's shapes, JSON bodies read as the relay reads them.
 */
function createAdapter(config: TideConfig, late: HttpLevel): FastifyAdapter {
  // Node's server takes whole milliseconds only, and 0 would turn the timeout off.
  const clientTimeoutMs = Math.max(1, Math.round(config.web.client_timeout * 1000));
  const adapter = new FastifyAdapter({
    // The server is made here, so Fastify applies none of its timeout options: all are set on it.
    serverFactory: (fastify: RequestListener) => {
      const server = createServer(
        {
          // Node checks request and header timeouts every connectionsCheckingInterval (30 s by
          // default): check every second, so web.client_timeout holds to the second.
          connectionsCheckingInterval: TIMEOUT_CHECK_MS,
          // A client must send its whole request within web.client_timeout (slowloris defence).
          // This bounds receiving only: answers (streams, slow generations) take as long as they take.
          requestTimeout: clientTimeoutMs,
          headersTimeout: Math.min(clientTimeoutMs, HEADERS_TIMEOUT_MS),
        },
        (req, res) => {
          // The OpenAI relay's common case is answered here, before Fastify (see OpenAiProxy).
          if (!late.proxy?.handle(req, res, fastify)) fastify(req, res);
        },
      );
      // `Expect: 100-continue` (curl sends it for bodies over 1 MB): Node would invite the body at
      // once. One declared over web.body_limit is not invited: its 413 comes before any of it.
      server.on('checkContinue', (req, res) => {
        if (!(Number(req.headers['content-length']) > config.web.body_limit)) res.writeContinue();
        server.emit('request', req, res);
      });
      server.timeout = 0; // no idle cut-off while an answer is being generated
      server.keepAliveTimeout = KEEP_ALIVE_MS;
      return server;
    },
    bodyLimit: config.web.body_limit,
    routerOptions: { maxParamLength: MAX_PATH_SEGMENT },
    // No Nest middleware is used; middie would still run a hook on every request.
    skipMiddie: true,
    genReqId: requestIdFor,
    // An absolute URL (`POST http://host/v1/responses`, RFC 9112 §3.2.2) is routed, checked and
    // relayed as its origin form: the router's own stripping differs (case, a `?` in the authority).
    rewriteUrl: (req: IncomingMessage) => originForm(req.url ?? '/'),
    return503OnClosing: true,
    // At close the drain is over and vLLM stopped: a connection still open (idle, or a request
    // stalled mid-headers or mid-body, whose timeouts Node stops checking once the server closes)
    // must not keep the process alive; whatever was answered is in the kernel's hands by then.
    forceCloseConnections: true,
    // Errors before routing are answered in the project's error shapes, with an X-Request-Id, not
    // Fastify's (whose bodies carry its error codes): what Node's parser and request timeout
    // refuse (400, 408, 431), and URLs the router cannot take (400, 414), measured like the rest.
    clientErrorHandler: (err: NodeJS.ErrnoException, socket: Socket) => answerClientError(err, socket, late.metrics),
    frameworkErrors: (error: FastifyError, request: FastifyRequest, reply: FastifyReply) => {
      late.metrics?.track(request.raw, reply.raw, 'unmatched', request.id);
      late.cors?.apply(request.raw, reply.raw, routePathOf(request.url)); // before routing, so before the CORS hook
      sendFrameworkError(error, reply);
    },
  });
  // Only JSON bodies: Nest's form and Fastify's text/plain parsers would turn other bodies into a
  // misleading 400, where the honest answer is 415.
  adapter.getInstance().removeContentTypeParser('text/plain');
  // JSON bodies read as the OpenAI routes read them (web.body_limit, small pieces gathered), and
  // saying what is wrong with a prototype key (Fastify's parser says "not valid JSON").
  adapter.getInstance().removeContentTypeParser('application/json');
  adapter.getInstance().addContentTypeParser('application/json', fastifyJsonParser(config.web.body_limit));
  return adapter;
}

async function bootstrap(): Promise<void> {
  // Taken first: npm killed while the service boots is then noticed too (its parent has changed since).
  const launcherThere = process.env.npm_command ? launcherWatch() : null;
  const config = readConfig();
  const late: HttpLevel = { proxy: null, metrics: null, cors: null };
  const adapter = createAdapter(config, late);
  const app = await NestFactory.create<NestFastifyApplication>(AppModule.forRoot(config), adapter, {
    bufferLogs: true,
    bodyParser: false,
  });
  app.useLogger(app.get(Logger));
  setupOpenApi(app, config.vllm.engine);
  const log = new NestLogger('tide-vllm');
  const manager = app.get(VLLMServerManager);
  const gate = app.get(TrafficGate);
  const relay = app.get(VLLMRelay);
  late.proxy = app.get(OpenAiProxy);
  late.metrics = app.get(Metrics);
  late.cors = app.get(Cors);

  let shuttingDown: Promise<void> | null = null;
  const shutdown = (reason: string, exitCode: number, drain: boolean): Promise<void> => {
    shuttingDown ??= (async () => {
      log.log(`shutting down (${reason})`);
      gate.startDraining();
      if (drain) {
        const left = await gate.waitIdle(config.web.drain_timeout * 1000);
        if (left > 0) gate.cutAll();
      } else {
        gate.cutAll('stopping without a drain');
      }
      // Nothing more goes to vLLM: close our connections first, so its shutdown need not wait on them.
      await relay.close();
      await manager.stop();
      await app.close();
      log.log(`stopped; exit code ${exitCode}`);
      // A write to a stdout that takes nothing holds a libuv thread, which exit() would wait for:
      // vLLM is stopped and every answer given, so the process ends at once instead.
      if (!(await flushLogs(LOG_FLUSH_MS))) process.kill(process.pid, 'SIGKILL');
      process.exit(exitCode);
    })();
    return shuttingDown;
  };

  // SIGHUP (the ssh or tmux session running tide-vllm closed) and SIGQUIT would otherwise end Node
  // at once, leaving vLLM, in a process group of its own, holding the GPU.
  let firstSignalAt: number | undefined;
  /** A request to stop (`what`: "SIGTERM received"): the first drains, a second one skips the drain. */
  const requestStop = (what: string): void => {
    const now = performance.now();
    if (firstSignalAt === undefined) {
      firstSignalAt = now;
      void shutdown(`${what}; draining for up to ${config.web.drain_timeout} s`, 0, true);
    } else if (now - firstSignalAt < SAME_SIGNAL_MS) {
      log.log(`${what} again within ${SAME_SIGNAL_MS} ms; taken as the same request to stop`);
    } else {
      // A second signal skips the drain: cut what is in flight and stop vLLM now.
      log.warn(`${what} again; skipping the drain`);
      gate.cutAll(`${what} again`);
    }
  };
  for (const signal of ['SIGTERM', 'SIGINT', 'SIGHUP', 'SIGQUIT'] as const) {
    process.on(signal, () => {
      if (signal === 'SIGHUP') stopLoggingIfStdoutGone();
      requestStop(`${signal} received`);
    });
  }
  // Run by npm (`npx tide-vllm serve`, `npm start`), the service stops as on SIGTERM once npm is
  // gone: npx puts a shell in between that passes no signal on (and outlives npm killed with
  // SIGKILL: the shell's parent is watched then), and a supervisor that kills npm alone (SIGKILL)
  // sends none at all. Either way vLLM would be left holding the GPU.
  if (launcherThere !== null) {
    const watch = setInterval(() => {
      if (launcherThere()) return;
      clearInterval(watch);
      if (firstSignalAt === undefined) requestStop('npm, which started tide-vllm, is gone'); // else stopping already
    }, LAUNCHER_CHECK_MS);
    watch.unref();
  }
  // A bug must not leave vLLM holding the GPU: log it, stop vLLM's group, exit non-zero.
  process.on('uncaughtException', (err) => {
    log.error(`uncaught exception: ${err.stack ?? err.message}`);
    void shutdown('uncaught exception', EXIT_FAILURE, false);
  });
  manager.onFatal((message) => {
    log.error(message);
    void shutdown('vLLM failed', EXIT_FAILURE, true);
  });

  // Listen first, so probes can tell "starting" from "dead" while the model loads. Through Fastify
  // rather than app.listen, whose failure Nest logs as an error of its own before it rejects.
  const { host, port } = config.web.bind_address;
  await app.init();
  try {
    await adapter.getInstance().listen({ host, port });
  } catch (err) {
    // Nothing is started yet (vLLM comes after this): one line, and out.
    process.stderr.write(`tide-vllm: cannot listen on ${host.includes(':') ? `[${host}]` : host}:${port} (web.bind_address): ${listenProblem(err as NodeJS.ErrnoException)}\n`);
    process.exit(EXIT_FAILURE);
  }
  app.flushLogs(); // Nest's start-up lines, held back (bufferLogs) until the service listens
  log.log(`listening on http://${host}:${port}`);
  manager.start().catch((err: Error) => {
    if (shuttingDown) return void log.log(err.message); // stopped while starting: expected, not an error
    log.error(err.message);
    void shutdown('vLLM could not be started', EXIT_FAILURE, false);
  });
}

void bootstrap().catch((err: Error) => {
  process.stderr.write(`tide-vllm: failed to start: ${err.message}\n`);
  process.exit(EXIT_FAILURE);
});
