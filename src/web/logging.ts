import { randomUUID } from 'node:crypto';
import type { IncomingMessage, ServerResponse } from 'node:http';
import type { Params } from 'nestjs-pino';
import type { TideConfig } from '../config/config.schema';
import { isRequestId } from './app-error.filter';
import './request-outcome'; // declares ServerResponse.tideOutcome

const PROBE_PATHS = new Set(['/health', '/ready', '/metrics']);

/**
 * The request id: the client's X-Request-Id when it is safe to echo, else a fresh UUID.
 * Fastify and pino-http both ask for it; it is computed once per request.
 */
export function requestIdFor(req: IncomingMessage): string {
  const cached = (req as IncomingMessage & { tideRequestId?: string }).tideRequestId;
  if (cached) return cached;
  const header = req.headers['x-request-id'];
  const id = typeof header === 'string' && isRequestId(header) ? header : randomUUID();
  (req as IncomingMessage & { tideRequestId?: string }).tideRequestId = id;
  return id;
}

export function loggerOptions(config: TideConfig): Params {
  const { logging } = config;
  return {
    pinoHttp: {
      level: logging.level,
      genReqId: (req: IncomingMessage, res: ServerResponse) => {
        const id = requestIdFor(req);
        res.setHeader('x-request-id', id);
        return id;
      },
      // Per request (pino-http's autoLogging.ignore decides once for all): probes are silent unless asked for.
      customLogLevel: (req: IncomingMessage, res: ServerResponse, err?: Error) => {
        if (!logging.access_log_probes && PROBE_PATHS.has((req.url ?? '').split('?', 1)[0])) return 'silent';
        if (err || res.statusCode >= 500) return 'error';
        return res.statusCode >= 400 ? 'warn' : 'info';
      },
      // One line per request: id, method, url, status, duration, and tokens when known.
      customProps: (req: IncomingMessage, res: ServerResponse) => {
        const outcome = res.tideOutcome;
        if (!outcome) return {};
        return {
          request_id: outcome.requestId ?? requestIdFor(req),
          route: outcome.route,
          ...(outcome.usage ? { tokens: { prompt: outcome.usage.prompt_tokens, completion: outcome.usage.completion_tokens } } : {}),
          ...(outcome.errorType ? { error: outcome.errorType } : {}),
          ...(logging.log_bodies ? { body: outcome.body, completion: outcome.completion } : {}),
        };
      },
      // Keys never reach the log; bodies only with logging.log_bodies.
      redact: ['req.headers.authorization', 'req.headers["x-api-key"]'],
      serializers: {
        req: (req: { id: string; method: string; url: string }) => ({ id: req.id, method: req.method, url: req.url }),
        res: (res: { statusCode: number }) => ({ statusCode: res.statusCode }),
      },
    },
  };
}
