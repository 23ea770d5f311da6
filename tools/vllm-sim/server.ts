/**
 * The simulator's HTTP API server on node:http: vLLM's routes (A2) with its status codes and
 * shapes, FastAPI/Starlette's 404/405/redirect behaviour, the API-key and CORS middlewares,
 * X-Request-Id headers and uvicorn's access log.
 */
import { createHash, randomBytes, randomUUID, timingSafeEqual } from 'node:crypto';
import type { IncomingHttpHeaders, IncomingMessage, ServerResponse } from 'node:http';
import type { SimContext } from './context';
import { existsSync, rmSync } from 'node:fs';
import { EngineCallError } from './engine-client';
import {
  Call,
  Route,
  UvicornServer,
  routeRequest,
  sendEmpty,
  sendError,
  sendJson,
  sendText,
  sendUnsized,
  unquotePath,
} from './fastapi';
import {
  GenerationKind,
  parseJsonBody,
  prepareGeneration,
  requireObject,
  resolveModel,
  runGeneration,
} from './generation';
import type { EngineMethod, SleepMode, SleepStatus } from './ipc';
import { METRICS_CONTENT_TYPE } from './metrics';
import { pyRepr } from './python-format';
import { responseNotFound } from './responses';
import {
  ApiError,
  badRequest,
  engineDeadError,
  internalServerError,
  missingFields,
  modelCard,
  tokenizeResponse,
} from './protocol';
import { VOCAB_SIZE } from './tokenizer';

/** Paths the API key guards (vllm/entrypoints/serve/middleware/authenticate.py). */
const GUARDED_PREFIXES = ['/v1', '/v2', '/inference', '/cohere'];
/** uvicorn keep-alive (VLLM_HTTP_TIMEOUT_KEEP_ALIVE, seconds). */
const KEEP_ALIVE_MS = Number(process.env.VLLM_HTTP_TIMEOUT_KEEP_ALIVE ?? 5) * 1000;
/** Starlette CORSMiddleware's answer to allow_methods=["*"] and its preflight max-age. */
const CORS_ALL_METHODS = 'DELETE, GET, HEAD, OPTIONS, PATCH, POST, PUT';
const CORS_MAX_AGE = '600';
/** FastAPI's documentation pages (off with --disable-fastapi-docs). */
const DOC_PAGES = ['/docs', '/docs/oauth2-redirect', '/redoc'];
/** The workers' methods that POST /collective_rpc runs here (any other fails, as in vLLM's workers). */
const WORKER_METHODS: ReadonlySet<string> = new Set(['reload_weights']);

export const LORA_NOT_ENABLED = 'LoRA is not enabled. Use --enable-lora to enable LoRA.';

type Handler = (call: Call) => void | Promise<void>;

/** Which optional route groups are on (environment-driven in vLLM). */
export interface ServerFeatures {
  /** VLLM_SERVER_DEV_MODE=1: sleep/wake, collective_rpc, caches, server_info. */
  devMode: boolean;
  /** VLLM_ALLOW_RUNTIME_LORA_UPDATING=1|true: /v1/load_lora_adapter, /v1/unload_lora_adapter. */
  runtimeLora: boolean;
}

/** Starlette's path matching: a `{name}` segment matches any one non-empty segment. */
function pathMatches(route: { path: string }, path: string): boolean {
  if (!route.path.includes('{')) return route.path === path;
  const wanted = route.path.split('/');
  const given = path.split('/');
  return wanted.length === given.length && wanted.every((w, i) => (w.startsWith('{') ? given[i] !== '' : w === given[i]));
}

function sha256(text: string): Buffer {
  return createHash('sha256').update(text).digest();
}

export class SimServer extends UvicornServer {
  private readonly routes: Route<Call>[] = [];
  private tracingWarned = false;

  constructor(
    private readonly ctx: SimContext,
    private readonly features: ServerFeatures,
  ) {
    super(KEEP_ALIVE_MS, ctx.log);
    this.registerRoutes();
  }

  // -------------------------------------------------------------------------------------------
  // Routes, in the order `Available routes are:` lists them

  private route(path: string, methods: string[], handler: Handler): void {
    this.routes.push({ path, methods, handler });
  }

  private registerRoutes(): void {
    if (!this.ctx.args.disableFastapiDocs) {
      this.route('/openapi.json', ['GET', 'HEAD'], ({ res }) => this.openapi(res));
      for (const page of DOC_PAGES) {
        const html = `<!DOCTYPE html><html><head><title>FastAPI - ${page}</title></head></html>`;
        this.route(page, ['GET', 'HEAD'], ({ res }) =>
          sendText(res, 200, html, 'text/html; charset=utf-8'),
        );
      }
    }
    this.route('/health', ['GET'], ({ res }) => this.health(res));
    this.route('/load', ['GET'], ({ res }) => sendJson(res, 200, { server_load: this.ctx.serverLoad }));
    this.route('/ping', ['POST'], ({ res }) => this.health(res));
    this.route('/ping', ['GET'], ({ res }) => this.health(res));
    this.route('/version', ['GET'], ({ res }) => sendJson(res, 200, { version: this.ctx.version }));
    if (this.features.devMode) this.registerDevRoutes();
    this.route('/tokenize', ['POST'], (call) => this.tokenize(call));
    this.route('/detokenize', ['POST'], (call) => this.detokenize(call));
    this.route('/v1/models', ['GET'], ({ res }) => this.models(res));
    this.route('/invocations', ['POST'], (call) => this.invocations(call));
    if (this.features.runtimeLora) {
      this.route('/v1/load_lora_adapter', ['POST'], (call) => this.loadLora(call));
      this.route('/v1/unload_lora_adapter', ['POST'], (call) => this.unloadLora(call));
    }
    this.route('/v1/chat/completions', ['POST'], (call) => this.generate('chat', call));
    this.route('/v1/completions', ['POST'], (call) => this.generate('completion', call));
    this.route('/v1/responses', ['POST'], (call) => this.generate('responses', call));
    this.route('/v1/responses/{response_id}', ['GET'], (call) => this.storedResponse(call));
    this.route('/v1/responses/{response_id}/cancel', ['POST'], (call) => this.storedResponse(call));
    // prometheus-fastapi-instrumentator's expose(), then the Mount of make_asgi_app(registry) that
    // answers every other method and every path under /metrics (attach_router).
    this.route('/metrics', ['GET'], ({ res }) => this.metrics(res, false));
    this.routes.push({ path: '/metrics', methods: [], mount: true, handler: ({ res }) => this.metrics(res, true) });
  }

  private registerDevRoutes(): void {
    const status = async (): Promise<SleepStatus> =>
      (await this.engineCall('is_sleeping')) as SleepStatus;
    this.route('/sleep', ['POST'], ({ res, url }) => this.sleep(res, url));
    this.route('/wake_up', ['POST'], ({ res, url }) =>
      this.wakeUp(res, url.searchParams.getAll('tags')),
    );
    this.route('/is_sleeping', ['GET'], async ({ res }) =>
      sendJson(res, 200, { is_sleeping: (await status()).isSleeping }),
    );
    // /pause and /resume (dev/rlhf) pause the scheduler only: a level-0 sleep.
    this.route('/pause', ['POST'], ({ res, url }) => this.sleep(res, url, 0));
    this.route('/resume', ['POST'], ({ res }) => this.wakeUp(res, ['scheduling']));
    this.route('/is_paused', ['GET'], async ({ res }) =>
      sendJson(res, 200, { is_paused: (await status()).isSleeping }),
    );
    for (const path of ['/reset_prefix_cache', '/reset_mm_cache', '/reset_encoder_cache']) {
      this.route(path, ['POST'], async ({ res }) => {
        await this.engineCall('reset_prefix_cache');
        sendEmpty(res, 200);
      });
    }
    this.route('/collective_rpc', ['POST'], ({ res, body }) => this.collectiveRpc(res, body));
    this.route('/server_info', ['GET'], ({ res }) => this.serverInfo(res));
  }

  /** The `Route: /path, Methods: GET` lines logged under `Available routes are:`. */
  routeLines(): string[] {
    return this.routes.filter((r) => !r.mount).map((r) => `Route: ${r.path}, Methods: ${r.methods.join(', ')}`);
  }

  // -------------------------------------------------------------------------------------------
  // Request pipeline: access log, X-Request-Id, API key, CORS, routing

  protected override onRequest(req: IncomingMessage, res: ServerResponse): void {
    if (this.ctx.settings.hang) return; // VLLM_SIM_HANG: connection accepted, never answered
    this.instrument(req, res);
    const url = new URL(req.url ?? '/', 'http://localhost');
    const chunks: Buffer[] = [];
    req.on('data', (chunk: Buffer) => chunks.push(chunk));
    req.on('end', () => {
      const call: Call = { req, res, url, body: Buffer.concat(chunks) };
      this.dispatch(call).catch((error: unknown) => {
        this.ctx.log.error('api_server.py:1201', `Unhandled error: ${String(error)}`);
        if (res.headersSent) res.end();
        else sendError(res, new ApiError(500, 'InternalServerError', String(error)));
      });
    });
  }

  /** Response headers every answer gets, and uvicorn's access line when the response starts. */
  private instrument(req: IncomingMessage, res: ServerResponse): void {
    const { args } = this.ctx;
    res.setHeader('server', 'uvicorn');
    if (args.enableRequestIdHeaders) {
      const id = req.headers['x-request-id'];
      const value = typeof id === 'string' && id ? id : randomUUID().replace(/-/g, '');
      res.setHeader('X-Request-Id', value);
    }
    const path = (req.url ?? '/').split('?')[0];
    if (args.disableUvicornAccessLog || args.disableAccessLogForEndpoints.includes(path)) return;
    this.logAccess(req, res);
  }

  /** uvicorn percent-decodes the path; Starlette strips --root-path from it before routing. */
  private routePath(rawPath: string): string {
    const pathname = unquotePath(rawPath);
    const root = this.ctx.args.rootPath;
    if (root && pathname.startsWith(root)) return pathname.slice(root.length) || '/';
    return pathname;
  }

  private async dispatch(call: Call): Promise<void> {
    const { req, res, url } = call;
    const method = req.method ?? 'GET';
    const path = this.routePath(url.pathname);
    if (!this.authorized(req, method, path)) {
      sendJson(res, 401, { error: 'Unauthorized' });
      return;
    }
    if (this.cors(req, res, method)) return;
    await routeRequest(call, path, this.routes, pathMatches);
  }

  /** `--api-key`/VLLM_API_KEY: a Bearer token on the guarded prefixes; OPTIONS passes. */
  private authorized(req: IncomingMessage, method: string, path: string): boolean {
    const keys = this.ctx.args.apiKeys;
    if (!keys.length || method === 'OPTIONS') return true;
    if (!GUARDED_PREFIXES.some((p) => path.startsWith(p))) return true;
    const header = req.headers.authorization ?? '';
    const space = header.indexOf(' ');
    const scheme = space === -1 ? header : header.slice(0, space);
    if (scheme.toLowerCase() !== 'bearer') return false;
    const presented = sha256(header.slice(space + 1));
    return keys.some((key) => timingSafeEqual(sha256(key), presented));
  }

  /** Starlette's CORSMiddleware with --allowed-origins/methods/headers; true if it answered. */
  private cors(req: IncomingMessage, res: ServerResponse, method: string): boolean {
    const origin = req.headers.origin;
    if (!origin) return false;
    const { allowedOrigins, allowedMethods, allowedHeaders, allowCredentials } = this.ctx.args;
    const anyOrigin = allowedOrigins.includes('*');
    if (!anyOrigin && !allowedOrigins.includes(origin)) return false;
    res.setHeader('access-control-allow-origin', anyOrigin && !allowCredentials ? '*' : origin);
    if (allowCredentials) res.setHeader('access-control-allow-credentials', 'true');
    if (method !== 'OPTIONS' || !req.headers['access-control-request-method']) return false;
    const methods = allowedMethods.includes('*') ? CORS_ALL_METHODS : allowedMethods.join(', ');
    res.setHeader('access-control-allow-methods', methods);
    res.setHeader('access-control-max-age', CORS_MAX_AGE);
    const requested = req.headers['access-control-request-headers'];
    if (allowedHeaders.includes('*') && requested) {
      res.setHeader('access-control-allow-headers', requested);
    }
    sendText(res, 200, 'OK', 'text/plain; charset=utf-8');
    return true;
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
      modelCard({
        id: name,
        created,
        root: args.model,
        parent: null,
        maxModelLen: args.maxModelLen,
        permissionId: permissionId(),
      }),
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

  /** The registry's text; `asgi`: from the /metrics Mount, whose answer has no Content-Length. */
  private metrics(res: ServerResponse, asgi: boolean): void {
    const { metrics, running, kvCacheTokens } = this.ctx;
    let used = 0;
    for (const seq of running) used += seq.promptTokens + seq.emitted;
    metrics.kvCacheUsage = Math.min(1, used / kvCacheTokens);
    (asgi ? sendUnsized : sendText)(res, 200, metrics.render(), METRICS_CONTENT_TYPE);
  }

  private generate(kind: GenerationKind, { req, res, body }: Call): void {
    const parsed = parseJsonBody(req, body);
    const header = req.headers['x-request-id'];
    const headerId = typeof header === 'string' ? header : undefined;
    const prepared = prepareGeneration(this.ctx, kind, parsed, headerId);
    this.noteTraceContext(req.headers);
    if (this.ctx.args.enableServerLoadTracking) {
      this.ctx.serverLoad += 1;
      res.once('close', () => (this.ctx.serverLoad -= 1));
    }
    runGeneration(this.ctx, prepared, res);
  }

  /**
   * serving_engine.py `_get_trace_headers`: with tracing off, a request carrying W3C trace
   * headers gets a warning, once per process (tracing.py `log_tracing_disabled_warning`, @run_once).
   */
  private noteTraceContext(headers: IncomingHttpHeaders): void {
    if (this.ctx.args.otlpTracesEndpoint !== null || this.tracingWarned) return;
    if (headers.traceparent === undefined && headers.tracestate === undefined) return;
    this.tracingWarned = true;
    this.ctx.log.warning('tracing.py:134', 'Received a request with trace context but tracing is disabled');
  }

  /** A stored response, retrieved or cancelled: never found, as vLLM keeps none by default. */
  private storedResponse({ url }: Call): void {
    throw responseNotFound(this.routePath(url.pathname).split('/')[3]);
  }

  /** SageMaker /invocations: dispatches by the body's shape. */
  private invocations(call: Call): void {
    const body = requireObject(parseJsonBody(call.req, call.body));
    if ('messages' in body) return this.generate('chat', call);
    if ('prompt' in body) return this.generate('completion', call);
    throw badRequest(
      'Cannot find suitable handler for request. Expected one of: ChatCompletionRequest, ' +
        'CompletionRequest',
    );
  }

  private tokenize({ req, res, body: raw }: Call): void {
    const body = requireObject(parseJsonBody(req, raw));
    const { tokenizer, args } = this.ctx;
    let tokens: number[];
    if (Array.isArray(body.messages)) {
      const messages = (body.messages as Array<Record<string, unknown> | null>).map((m) => ({
        role: String(m?.role ?? 'user'),
        content: m?.content,
      }));
      tokens = tokenizer.encodeChat(messages, body.add_generation_prompt !== false);
    } else if (typeof body.prompt === 'string') {
      tokens = tokenizer.encode(body.prompt);
    } else {
      throw missingFields(body, 'prompt');
    }
    resolveModel(this.ctx, body.model);
    const strs = body.return_token_strs === true ? tokens.map((t) => tokenizer.pieceText(t)) : null;
    sendJson(res, 200, tokenizeResponse(tokens, args.maxModelLen, strs));
  }

  private detokenize({ req, res, body: raw }: Call): void {
    const body = requireObject(parseJsonBody(req, raw));
    if (!Array.isArray(body.tokens)) throw missingFields(body, 'tokens');
    resolveModel(this.ctx, body.model);
    const tokens = body.tokens as number[];
    const bad = tokens.find((t) => !Number.isInteger(t) || t < 0 || t >= VOCAB_SIZE);
    if (bad !== undefined) throw badRequest(`Token id ${bad} is out of vocabulary`);
    sendJson(res, 200, { prompt: this.ctx.tokenizer.decode(tokens) });
  }

  /**
   * A utility call of a dev route. It fails like vLLM's: a dead engine with EngineDeadError's 500,
   * one that is shutting down with the 500 of its failed call (`Server shutting down`).
   */
  private async engineCall(method: EngineMethod, args?: Record<string, unknown>): Promise<unknown> {
    try {
      return await this.ctx.engine.call(method, args);
    } catch (error) {
      if (!(error instanceof EngineCallError)) throw error;
      throw error.reason === 'dead' ? engineDeadError() : internalServerError(error.message);
    }
  }

  private async sleep(res: ServerResponse, url: URL, forcedLevel?: number): Promise<void> {
    const levelText = url.searchParams.get('level') ?? '1';
    if (forcedLevel === undefined && !/^\s*[+-]?\d+\s*$/.test(levelText)) {
      throw badRequest(`invalid literal for int() with base 10: '${levelText}'`);
    }
    const level = forcedLevel ?? Number(levelText);
    const mode = (url.searchParams.get('mode') ?? 'abort') as SleepMode;
    if (!['abort', 'wait', 'keep'].includes(mode)) {
      throw badRequest(`Invalid mode: '${mode}'. Must be one of 'abort', 'wait', 'keep'.`);
    }
    this.ctx.log.info('api_router.py:42', `sleep the engine with level ${level}`);
    await this.engineCall('sleep', { level, mode });
    // As AsyncLLM.sleep's record_sleep_state(1, level): level 0 (scheduling paused) sets none of the three.
    this.ctx.metrics.sleepState = level === 1 ? 'weights_offloaded' : level === 2 ? 'discard_all' : null;
    if (level === 2) this.ctx.weightsDiscarded = true;
    sendEmpty(res, 200);
  }

  private async wakeUp(res: ServerResponse, tags: string[]): Promise<void> {
    const shown = tags.length ? pyRepr(tags) : 'None';
    this.ctx.log.info('api_router.py:58', `wake up the engine with tags: ${shown}`);
    await this.engineCall('wake_up', { tags });
    // As AsyncLLM.wake_up's record_sleep_state(0, 0): "awake" after any wake-up, a partial one too.
    this.ctx.metrics.sleepState = 'awake';
    sendEmpty(res, 200);
  }

  private async collectiveRpc(res: ServerResponse, raw: Buffer): Promise<void> {
    let body: Record<string, unknown>;
    try {
      body = JSON.parse(raw.toString('utf8') || '{}') as Record<string, unknown>;
    } catch {
      throw new ApiError(400, 'Bad Request', 'Invalid JSON body');
    }
    if (typeof body?.method !== 'string') {
      throw new ApiError(400, 'Bad Request', "Missing 'method' in request body");
    }
    // A method the workers lack fails in each of them, and the call with it (vLLM's "Call to
    // collective_rpc method failed"). Of the workers' methods, the one a supervisor calls is simulated.
    if (!WORKER_METHODS.has(body.method)) throw internalServerError(`Call to collective_rpc method failed: 'Worker' object has no attribute '${body.method}'`);
    const results = await this.engineCall('collective_rpc', { method: body.method });
    if (body.method === 'reload_weights') this.ctx.weightsDiscarded = false;
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

  /** OpenAIServingModels.load_lora_adapter: 200 with a plain-text message. */
  private loadLora({ req, res, body: raw }: Call): void {
    const body = requireObject(parseJsonBody(req, raw));
    const missing = ['lora_name', 'lora_path'].filter((f) => !(f in body));
    if (missing.length) throw missingFields(body, ...missing);
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
    if (!this.ctx.args.enableLora) throw new ApiError(500, 'InternalServerError', LORA_NOT_ENABLED);
    const armed = this.ctx.settings.crashOnLoraLoadIf;
    if (armed !== null && existsSync(armed)) {
      rmSync(armed, { force: true });
      return this.ctx.crash(`VLLM_SIM_CRASH_ON_LORA_LOAD_IF: loading LoRA adapter '${name}'`, 'sigkill');
    }
    this.ctx.loras.set(name, { name, path, baseModelName: null });
    this.ctx.log.info('serving.py:211', `Loaded new LoRA adapter: name '${name}', path '${path}'`);
    sendText(res, 200, `Success: LoRA adapter '${name}' added successfully.`);
  }

  private unloadLora({ req, res, body: raw }: Call): void {
    const body = requireObject(parseJsonBody(req, raw));
    if (!('lora_name' in body)) throw missingFields(body, 'lora_name');
    const name = String(body.lora_name ?? '');
    if (!name) {
      const message = "'lora_name' needs to be provided to unload a LoRA adapter.";
      throw new ApiError(400, 'InvalidUserInput', message);
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
        .filter((r) => !r.mount && r.path !== '/openapi.json' && !DOC_PAGES.includes(r.path))
        .map((r) => [r.path, Object.fromEntries(r.methods.map((m) => [m.toLowerCase(), {}]))]),
    );
    sendJson(res, 200, { openapi: '3.1.0', info: { title: 'FastAPI', version: '0.1.0' }, paths });
  }

  // -------------------------------------------------------------------------------------------
  // Listener lifecycle

  /** Starts listening (TCP or --uds); rejects with the listen error (e.g. EADDRINUSE). */
  listen(): Promise<void> {
    const { host, port, uds } = this.ctx.args;
    return this.listenOn(uds || { host: host ?? '0.0.0.0', port });
  }
}
