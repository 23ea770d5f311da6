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
      autoLogging: {
        ignore: (req: IncomingMessage) => !logging.access_log_probes && PROBE_PATHS.has((req.url ?? '').split('?', 1)[0]),
      },
      // One line per request: id, method, url, status, duration, and tokens when known.
      customProps: (_req: IncomingMessage, res: ServerResponse) => {
        const outcome = res.tideOutcome;
        return outcome?.usage ? { tokens: { prompt: outcome.usage.prompt_tokens, completion: outcome.usage.completion_tokens } } : {};
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
