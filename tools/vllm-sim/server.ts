/**
 * The simulator's HTTP API server on node:http: vLLM's routes (A2) with its status codes and
 * shapes, FastAPI/Starlette's 404/405/redirect behaviour, the API-key and CORS middlewares,
 * X-Request-Id headers and uvicorn's access log.
 */
import { createHash, randomBytes, randomUUID, timingSafeEqual } from 'node:crypto';
import http, { IncomingMessage, ServerResponse } from 'node:http';
import type { LoraAdapter, SimContext } from './context';
import {
  parseJsonBody,
  prepareGeneration,
  requireObject,
  resolveModel,
  runGeneration,
  sendError,
  sendJson,
} from './generation';
import type { SleepMode, SleepStatus } from './ipc';
import { METRICS_CONTENT_TYPE } from './metrics';
import { ApiError, modelCard, requestValidationError, tokenizeResponse } from './protocol';
import { VOCAB_SIZE } from './tokenizer';

/** Paths the API key guards (vllm/entrypoints/serve/middleware/authenticate.py). */
const GUARDED_PREFIXES = ['/v1', '/v2', '/inference', '/cohere'];
/** uvicorn keep-alive (VLLM_HTTP_TIMEOUT_KEEP_ALIVE). */
const KEEP_ALIVE_MS = Number(process.env.VLLM_HTTP_TIMEOUT_KEEP_ALIVE ?? 5) * 1000;
/** Starlette CORSMiddleware's answer to allow_methods=["*"] and its preflight max-age. */
const CORS_ALL_METHODS = 'DELETE, GET, HEAD, OPTIONS, PATCH, POST, PUT';
const CORS_MAX_AGE = '600';

type Handler = (req: IncomingMessage, res: ServerResponse, url: URL, body: Buffer) => void | Promise<void>;

interface Route {
  path: string;
  methods: string[];
  handler: Handler;
}

/** Which optional route groups are on (environment-driven in vLLM). */
export interface ServerFeatures {
  /** VLLM_SERVER_DEV_MODE=1: sleep/wake, collective_rpc, caches, server_info. */
  devMode: boolean;
  /** VLLM_ALLOW_RUNTIME_LORA_UPDATING=1|true: /v1/load_lora_adapter, /v1/unload_lora_adapter. */
  runtimeLora: boolean;
}

function sendEmpty(res: ServerResponse, status: number): void {
  res.writeHead(status, { 'content-length': 0 });
  res.end();
}

function sendText(res: ServerResponse, status: number, text: string, contentType?: string): void {
  const headers: http.OutgoingHttpHeaders = { 'content-length': Buffer.byteLength(text) };
  if (contentType) headers['content-type'] = contentType;
  res.writeHead(status, headers);
  res.end(text);
}

/** Starlette/FastAPI's own `{"detail": ...}` answers (404, 405) bypass vLLM's error envelope. */
function sendDetail(res: ServerResponse, status: number, detail: string, headers = {}): void {
  const payload = JSON.stringify({ detail });
  res.writeHead(status, {
    ...headers,
    'content-type': 'application/json',
    'content-length': Buffer.byteLength(payload),
  });
  res.end(payload);
}

function digest(text: string): Buffer {
  return createHash('sha256').update(text).digest();
}

export class SimServer {
  readonly http: http.Server;
  private readonly routes: Route[] = [];
  private readonly sockets = new Set<import('node:net').Socket>();

  constructor(
    private readonly ctx: SimContext,
    private readonly features: ServerFeatures,
  ) {
    this.registerRoutes();
    this.http = http.createServer((req, res) => this.onRequest(req, res));
    this.http.keepAliveTimeout = KEEP_ALIVE_MS;
    this.http.on('connection', (socket) => {
      this.sockets.add(socket);
      socket.once('close', () => this.sockets.delete(socket));
    });
  }

  // -------------------------------------------------------------------------------------------
  // Routes

  private route(path: string, methods: string[], handler: Handler): void {
    this.routes.push({ path, methods, handler });
  }

  private registerRoutes(): void {
    const { args } = this.ctx;
    if (!args.disableFastapiDocs) {
      this.route('/openapi.json', ['GET', 'HEAD'], (_q, res) => this.openapi(res));
      for (const page of ['/docs', '/docs/oauth2-redirect', '/redoc']) {
        this.route(page, ['GET', 'HEAD'], (_q, res) =>
          sendText(res, 200, `<!DOCTYPE html><html><head><title>FastAPI - ${page}</title></head></html>`, 'text/html; charset=utf-8'),
        );
      }
    }
    this.route('/health', ['GET'], (_q, res) => this.health(res));
    this.route('/load', ['GET'], (_q, res) =>
      sendJson(res, 200, { server_load: this.ctx.serverLoad }),
    );
    this.route('/ping', ['POST'], (_q, res) => this.health(res));
    this.route('/ping', ['GET'], (_q, res) => this.health(res));
    this.route('/version', ['GET'], (_q, res) => sendJson(res, 200, { version: this.ctx.version }));
    if (this.features.devMode) this.registerDevRoutes();
    this.route('/tokenize', ['POST'], (req, res, _u, body) => this.tokenize(req, res, body));
    this.route('/detokenize', ['POST'], (req, res, _u, body) => this.detokenize(req, res, body));
    this.route('/v1/models', ['GET'], (_q, res) => this.models(res));
    this.route('/invocations', ['POST'], (req, res, _u, body) => this.invocations(req, res, body));
    if (this.features.runtimeLora) {
      this.route('/v1/load_lora_adapter', ['POST'], (req, res, _u, body) => this.loadLora(req, res, body));
      this.route('/v1/unload_lora_adapter', ['POST'], (req, res, _u, body) =>
        this.unloadLora(req, res, body),
      );
    }
    this.route('/v1/chat/completions', ['POST'], (req, res, _u, body) =>
      this.generate('chat', req, res, body),
    );
    this.route('/v1/completions', ['POST'], (req, res, _u, body) =>
      this.generate('completion', req, res, body),
    );
    this.route('/metrics', ['GET'], (_q, res) => this.metrics(res));
  }

  private registerDevRoutes(): void {
    this.route('/sleep', ['POST'], (_q, res, url) => this.sleep(res, url));
    this.route('/wake_up', ['POST'], (_q, res, url) => this.wakeUp(res, url.searchParams.getAll('tags')));
    this.route('/is_sleeping', ['GET'], async (_q, res) => {
      const status = (await this.ctx.engine.call('is_sleeping')) as SleepStatus;
      sendJson(res, 200, { is_sleeping: status.isSleeping });
    });
    this.route('/pause', ['POST'], (_q, res, url) => this.sleep(res, url, 0));
    this.route('/resume', ['POST'], (_q, res) => this.wakeUp(res, ['scheduling']));
    this.route('/is_paused', ['GET'], async (_q, res) => {
      const status = (await this.ctx.engine.call('is_sleeping')) as SleepStatus;
      sendJson(res, 200, { is_paused: status.isSleeping });
    });
    for (const path of ['/reset_prefix_cache', '/reset_mm_cache', '/reset_encoder_cache']) {
      this.route(path, ['POST'], async (_q, res) => {
        await this.ctx.engine.call('reset_prefix_cache');
        sendEmpty(res, 200);
      });
    }
    this.route('/collective_rpc', ['POST'], (_q, res, _u, body) => this.collectiveRpc(res, body));
    this.route('/server_info', ['GET'], (_q, res) => this.serverInfo(res));
  }

  /** `Route: /path, Methods: GET` lines of `Available routes are:`. */
  routeLines(): string[] {
    const lines = this.routes.map((r) => `Route: ${r.path}, Methods: ${r.methods.join(', ')}`);
    return lines;
  }

  // -------------------------------------------------------------------------------------------
  // Request pipeline: access log, X-Request-Id, API key, CORS, routing

  private onRequest(req: IncomingMessage, res: ServerResponse): void {
    if (this.ctx.settings.hang) return; // VLLM_SIM_HANG: connection accepted, never answered
    this.instrument(req, res);
    const url = new URL(req.url ?? '/', 'http://localhost');
    const chunks: Buffer[] = [];
    req.on('data', (chunk: Buffer) => chunks.push(chunk));
    req.on('end', () => {
      void this.dispatch(req, res, url, Buffer.concat(chunks)).catch((error: unknown) => {
        this.ctx.log.error('api_server.py:1201', `Unhandled error: ${String(error)}`);
        if (!res.headersSent) sendError(res, new ApiError(500, 'InternalServerError', String(error)));
        else res.end();
      });
    });
  }

  /** Access log at response start (uvicorn), `server` and `X-Request-Id` headers. */
  private instrument(req: IncomingMessage, res: ServerResponse): void {
    const { args, log } = this.ctx;
    res.setHeader('server', 'uvicorn');
    if (args.enableRequestIdHeaders) {
      const id = req.headers['x-request-id'];
      res.setHeader('X-Request-Id', typeof id === 'string' && id ? id : randomUUID().replace(/-/g, ''));
    }
    const path = (req.url ?? '/').split('?')[0];
    const silent =
      args.disableUvicornAccessLog || args.disableAccessLogForEndpoints.includes(path);
    const writeHead = res.writeHead.bind(res) as (...a: unknown[]) => ServerResponse;
    let logged = false;
    res.writeHead = ((status: number, ...rest: unknown[]) => {
      if (!logged && !silent) {
        logged = true;
        const address = (req.socket.remoteAddress ?? '').replace(/^::ffff:/, '');
        const client = req.socket.remotePort ? `${address}:${req.socket.remotePort}` : '-';
        log.access(client, req.method ?? 'GET', req.url ?? '/', req.httpVersion, status);
      }
      return writeHead(status, ...rest);
    }) as typeof res.writeHead;
  }

  private routePath(pathname: string): string {
    const root = this.ctx.args.rootPath;
    if (root && pathname.startsWith(root)) return pathname.slice(root.length) || '/';
    return pathname;
  }

  private async dispatch(req: IncomingMessage, res: ServerResponse, url: URL, body: Buffer): Promise<void> {
    const method = req.method ?? 'GET';
    const path = this.routePath(url.pathname);
    if (!this.authorized(req, method, path)) {
      sendJson(res, 401, { error: 'Unauthorized' });
      return;
    }
    if (this.cors(req, res, method)) return;
    const matching = this.routes.filter((r) => r.path === path);
    if (matching.length === 0) {
      // Starlette's redirect_slashes: /v1/models/ → 307 /v1/models (and the other way round).
      const alt = path.endsWith('/') ? path.slice(0, -1) : `${path}/`;
      if (this.routes.some((r) => r.path === alt) && path !== '/') {
        res.writeHead(307, { location: `${url.pathname.replace(path, alt)}${url.search}`, 'content-length': 0 });
        res.end();
        return;
      }
      sendDetail(res, 404, 'Not Found');
      return;
    }
    const route = matching.find((r) => r.methods.includes(method));
    if (!route) {
      const allow = [...new Set(matching.flatMap((r) => r.methods))].join(', ');
      sendDetail(res, 405, 'Method Not Allowed', { allow });
      return;
    }
    try {
      await route.handler(req, res, url, body);
    } catch (error) {
      if (!(error instanceof ApiError)) throw error;
      sendError(res, error);
    }
  }

  /** `--api-key`/VLLM_API_KEY: Bearer token on the guarded prefixes; OPTIONS passes. */
  private authorized(req: IncomingMessage, method: string, path: string): boolean {
    const keys = this.ctx.args.apiKeys;
    if (!keys.length || method === 'OPTIONS') return true;
    if (!GUARDED_PREFIXES.some((p) => path.startsWith(p))) return true;
    const header = req.headers.authorization ?? '';
    const space = header.indexOf(' ');
    const scheme = space === -1 ? header : header.slice(0, space);
    const token = space === -1 ? '' : header.slice(space + 1);
    if (scheme.toLowerCase() !== 'bearer') return false;
    const presented = digest(token);
    return keys.some((key) => timingSafeEqual(digest(key), presented));
  }

  /** Starlette CORSMiddleware (allow_origins etc. from the CLI); true if it answered. */
  private cors(req: IncomingMessage, res: ServerResponse, method: string): boolean {
    const origin = req.headers.origin;
    if (!origin) return false;
    const { allowedOrigins, allowedMethods, allowedHeaders, allowCredentials } = this.ctx.args;
    const anyOrigin = allowedOrigins.includes('*');
    if (!anyOrigin && !allowedOrigins.includes(origin)) return false;
    const allowOrigin = anyOrigin && !allowCredentials ? '*' : origin;
    if (method === 'OPTIONS' && req.headers['access-control-request-method']) {
      const headers: http.OutgoingHttpHeaders = {
        'access-control-allow-origin': allowOrigin,
        'access-control-allow-methods': allowedMethods.includes('*') ? CORS_ALL_METHODS : allowedMethods.join(', '),
        'access-control-max-age': CORS_MAX_AGE,
      };
      const requested = req.headers['access-control-request-headers'];
      if (allowedHeaders.includes('*') && requested) headers['access-control-allow-headers'] = requested;
      if (allowCredentials) headers['access-control-allow-credentials'] = 'true';
      for (const [k, v] of Object.entries(headers)) res.setHeader(k, v as string);
      sendText(res, 200, 'OK', 'text/plain; charset=utf-8');
      return true;
    }
    res.setHeader('access-control-allow-origin', allowOrigin);
    if (allowCredentials) res.setHeader('access-control-allow-credentials', 'true');
    return false;
  }

  // -------------------------------------------------------------------------------------------
  // Handlers

  private health(res: ServerResponse): void {
    const answer = (): void => sendEmpty(res, this.ctx.engine.dead ? 503 : 200);
    const delay = this.ctx.settings.healthDelayMs;
    if (delay > 0) setTimeout(answer, delay);
    else answer();
  }

  private models(res: ServerResponse): void {
    const { args, loras } = this.ctx;
    const created = Math.floor(Date.now() / 1000);
    const permissionId = (): string => `modelperm-${randomBytes(8).toString('hex')}`;
    const base = args.servedModelNames.map((name) =>
      modelCard({ id: name, created, root: args.model, parent: null, maxModelLen: args.maxModelLen, permissionId: permissionId() }),
    );
    const adapters = [...loras.values()].map((lora) =>
      modelCard({
        id: lora.name,
        created,
        root: lora.path,
        parent: lora.baseModelName ?? args.servedModelNames[0],
        maxModelLen: null,
        permissionId: permissionId(),
      }),
    );
    sendJson(res, 200, { object: 'list', data: [...base, ...adapters] });
  }

  private metrics(res: ServerResponse): void {
    const { metrics, running, kvCacheTokens } = this.ctx;
    let used = 0;
    for (const seq of running) used += seq.promptTokens + seq.emitted;
    metrics.kvCacheUsage = Math.min(1, used / kvCacheTokens);
    sendText(res, 200, metrics.render(), METRICS_CONTENT_TYPE);
  }

  private generate(kind: 'chat' | 'completion', req: IncomingMessage, res: ServerResponse, raw: Buffer): void {
    const body = parseJsonBody(req, raw);
    const headerId = req.headers['x-request-id'];
    const prepared = prepareGeneration(this.ctx, kind, body, typeof headerId === 'string' ? headerId : undefined);
    if (this.ctx.args.enableServerLoadTracking) {
      this.ctx.serverLoad += 1;
      res.once('close', () => (this.ctx.serverLoad -= 1));
    }
    runGeneration(this.ctx, prepared, res);
  }

  /** SageMaker /invocations: dispatches by body shape. */
  private invocations(req: IncomingMessage, res: ServerResponse, raw: Buffer): void {
    const body = requireObject(parseJsonBody(req, raw));
    if ('messages' in body) return this.generate('chat', req, res, raw);
    if ('prompt' in body) return this.generate('completion', req, res, raw);
    throw new ApiError(
      400,
      'BadRequestError',
      'Cannot find suitable handler for request. Expected one of: ChatCompletionRequest, CompletionRequest',
    );
  }

  private tokenize(req: IncomingMessage, res: ServerResponse, raw: Buffer): void {
    const body = requireObject(parseJsonBody(req, raw));
    const { tokenizer, args } = this.ctx;
    let tokens: number[];
    if (Array.isArray(body.messages)) {
      const messages = body.messages.map((m) => ({ role: String(m?.role ?? 'user'), content: m?.content }));
      tokens = tokenizer.encodeChat(messages, body.add_generation_prompt !== false);
    } else if (typeof body.prompt === 'string') {
      tokens = tokenizer.encode(body.prompt);
    } else {
      throw requestValidationError([{ type: 'missing', loc: ['body', 'prompt'], msg: 'Field required', input: body }]);
    }
    resolveModel(this.ctx, body.model);
    const strs = body.return_token_strs === true ? tokens.map((id) => tokenizer.pieceText(id)) : null;
    sendJson(res, 200, tokenizeResponse(tokens, args.maxModelLen, strs));
  }

  private detokenize(req: IncomingMessage, res: ServerResponse, raw: Buffer): void {
    const body = requireObject(parseJsonBody(req, raw));
    if (!Array.isArray(body.tokens)) {
      throw requestValidationError([{ type: 'missing', loc: ['body', 'tokens'], msg: 'Field required', input: body }]);
    }
    resolveModel(this.ctx, body.model);
    const tokens = body.tokens as number[];
    const bad = tokens.find((t) => !Number.isInteger(t) || t < 0 || t >= VOCAB_SIZE);
    if (bad !== undefined) {
      throw new ApiError(400, 'BadRequestError', `Token id ${bad} is out of vocabulary`);
    }
    sendJson(res, 200, { prompt: this.ctx.tokenizer.decode(tokens) });
  }

  private async sleep(res: ServerResponse, url: URL, forcedLevel?: number): Promise<void> {
    const levelText = url.searchParams.get('level') ?? '1';
    const level = forcedLevel ?? Number(levelText);
    if (!/^\s*[+-]?\d+\s*$/.test(levelText) && forcedLevel === undefined) {
      throw new ApiError(400, 'BadRequestError', `invalid literal for int() with base 10: '${levelText}'`);
    }
    const mode = (url.searchParams.get('mode') ?? 'abort') as SleepMode;
    if (!['abort', 'wait', 'keep'].includes(mode)) {
      throw new ApiError(400, 'BadRequestError', `Invalid mode: '${mode}'. Must be one of 'abort', 'wait', 'keep'.`);
    }
    this.ctx.log.info('api_router.py:42', `sleep the engine with level ${level}`);
    const status = (await this.ctx.engine.call('sleep', { level, mode })) as SleepStatus;
    this.ctx.metrics.sleepState = status.sleepState;
    sendEmpty(res, 200);
  }

  private async wakeUp(res: ServerResponse, tags: string[]): Promise<void> {
    this.ctx.log.info('api_router.py:58', `wake up the engine with tags: ${tags.length ? `[${tags.map((t) => `'${t}'`).join(', ')}]` : 'None'}`);
    const status = (await this.ctx.engine.call('wake_up', { tags })) as SleepStatus;
    this.ctx.metrics.sleepState = status.sleepState;
    sendEmpty(res, 200);
  }

  private async collectiveRpc(res: ServerResponse, raw: Buffer): Promise<void> {
    let body: Record<string, unknown>;
    try {
      body = JSON.parse(raw.toString('utf8') || '{}') as Record<string, unknown>;
    } catch {
      throw new ApiError(400, 'Bad Request', 'Invalid JSON body');
    }
    if (typeof body.method !== 'string') {
      throw new ApiError(400, 'Bad Request', "Missing 'method' in request body");
    }
    const results = await this.ctx.engine.call('collective_rpc', { method: body.method });
    sendJson(res, 200, { results });
  }

  private serverInfo(res: ServerResponse): void {
    const { args } = this.ctx;
    const config =
      `model_config=ModelConfig(model='${args.model}', max_model_len=${args.maxModelLen}), ` +
      `parallel_config=ParallelConfig(tensor_parallel_size=${args.tensorParallelSize}, ` +
      `pipeline_parallel_size=${args.pipelineParallelSize}), ` +
      `scheduler_config=SchedulerConfig(max_num_seqs=${args.maxNumSeqs})`;
    sendJson(res, 200, { vllm_config: config });
  }

  private loadLora(req: IncomingMessage, res: ServerResponse, raw: Buffer): void {
    const body = requireObject(parseJsonBody(req, raw));
    const missing = ['lora_name', 'lora_path'].filter((f) => !(f in body));
    if (missing.length) {
      throw requestValidationError(
        missing.map((f) => ({ type: 'missing', loc: ['body', f], msg: 'Field required', input: body })),
      );
    }
    const name = String(body.lora_name ?? '');
    const path = String(body.lora_path ?? '');
    if (!name || !path) {
      throw new ApiError(400, 'InvalidUserInput', "Both 'lora_name' and 'lora_path' must be provided.");
    }
    if (this.ctx.loras.has(name) && body.load_inplace !== true) {
      throw new ApiError(
        400,
        'InvalidUserInput',
        `The lora adapter '${name}' has already been loaded. If you want to load the adapter in ` +
          `place, set 'load_inplace' to True.`,
      );
    }
    if (!this.ctx.args.enableLora) {
      throw new ApiError(500, 'InternalServerError', LORA_NOT_ENABLED);
    }
    const adapter: LoraAdapter = { name, path, baseModelName: null };
    this.ctx.loras.set(name, adapter);
    this.ctx.log.info('serving.py:211', `Loaded new LoRA adapter: name '${name}', path '${path}'`);
    sendText(res, 200, `Success: LoRA adapter '${name}' added successfully.`);
  }

  private unloadLora(req: IncomingMessage, res: ServerResponse, raw: Buffer): void {
    const body = requireObject(parseJsonBody(req, raw));
    if (!('lora_name' in body)) {
      throw requestValidationError([{ type: 'missing', loc: ['body', 'lora_name'], msg: 'Field required', input: body }]);
    }
    const name = String(body.lora_name ?? '');
    if (!name) {
      throw new ApiError(400, 'InvalidUserInput', "'lora_name' needs to be provided to unload a LoRA adapter.");
    }
    if (!this.ctx.loras.has(name)) {
      throw new ApiError(404, 'NotFoundError', `The lora adapter '${name}' cannot be found.`);
    }
    this.ctx.loras.delete(name);
    this.ctx.log.info('serving.py:238', `Removed LoRA adapter: name '${name}'`);
    sendText(res, 200, `Success: LoRA adapter '${name}' removed successfully.`);
  }

  private openapi(res: ServerResponse): void {
    const paths = Object.fromEntries(
      this.routes
        .filter((r) => !['/openapi.json', '/docs', '/docs/oauth2-redirect', '/redoc'].includes(r.path))
        .map((r) => [r.path, Object.fromEntries(r.methods.map((m) => [m.toLowerCase(), {}]))]),
    );
    sendJson(res, 200, { openapi: '3.1.0', info: { title: 'FastAPI', version: '0.1.0' }, paths });
  }

  // -------------------------------------------------------------------------------------------
  // Listener lifecycle

  /** Starts listening (TCP or --uds); rejects with the listen error (e.g. EADDRINUSE). */
  listen(): Promise<void> {
    const { host, port, uds } = this.ctx.args;
    return new Promise((resolve, reject) => {
      const onError = (error: Error): void => reject(error);
      this.http.once('error', onError);
      const done = (): void => {
        this.http.off('error', onError);
        resolve();
      };
      if (uds) this.http.listen(uds, done);
      else this.http.listen({ host: host ?? '0.0.0.0', port }, done);
    });
  }

  /** Open client connections (for uvicorn's "Waiting for connections to close"). */
  get openConnections(): number {
    return this.sockets.size;
  }

  /**
   * Closes the listener and waits for open connections to finish, closing idle keep-alive
   * connections as they become idle (uvicorn waits without a timeout).
   */
  close(): Promise<void> {
    return new Promise((resolve) => {
      this.http.close(() => resolve());
      this.http.closeIdleConnections();
      const sweep = setInterval(() => this.http.closeIdleConnections(), 100);
      this.http.once('close', () => clearInterval(sweep));
    });
  }
}

export const LORA_NOT_ENABLED = 'LoRA is not enabled. Use --enable-lora to enable LoRA.';
