/**
 * The SGLang mode's HTTP server (python/sglang/srt/entrypoints/http_server.py) on node:http:
 * its routes and answers, the API-key middleware (python/sglang/srt/utils/auth.py), Starlette's
 * CORS middleware as SGLang configures it, FastAPI's 404/405/307, and uvicorn's access log.
 */
import type { IncomingMessage, ServerResponse } from 'node:http';
import { timingSafeEqual, createHash } from 'node:crypto';
import { EngineCallError, type RequestListener } from '../engine-client';
import {
  Call as BaseCall,
  Route,
  UvicornServer,
  routeRequest,
  sendEmpty,
  sendJson,
  sendText,
  sendUnsized,
  unquotePath,
} from '../fastapi';
import { serverArgsJson, SIM_SGLANG_VERSION } from './cli';
import type { SglContext } from './context';
import { parseSglBody, prepareGenerate, prepareOpenAi, requireSglObject, runSglGeneration } from './generation';
import { METRICS_CONTENT_TYPE } from './metrics';
import { classifyRoute, embeddingsRoute, encodeRoute, rerankRoute, runPrefill, scoreRoute } from './pooling';
import {
  badRequestError,
  internalServerError,
  modelCard,
  modelNotFoundBody,
  nativeError,
  requestValidationError,
} from './protocol';
import { cancelResponse, prepareResponses, retrieveResponse, runResponses } from './responses';
import { pyRepr } from '../python-format';
import { VOCAB_SIZE } from '../tokenizer';

/** HEALTH_CHECK_TIMEOUT (SGLANG_HEALTH_CHECK_TIMEOUT, seconds). */
const HEALTH_CHECK_TIMEOUT_S = Number(process.env.SGLANG_HEALTH_CHECK_TIMEOUT ?? 20);
/** The health handler sleeps this long between checks for an output (asyncio.sleep(1)). */
const HEALTH_POLL_MS = 1000;
/** uvicorn's timeout_keep_alive=5 in launch_server. */
const KEEP_ALIVE_MS = 5000;
const CORS_ALL_METHODS = 'DELETE, GET, HEAD, OPTIONS, PATCH, POST, PUT';
const DOC_PAGES = ['/docs', '/docs/oauth2-redirect', '/redoc'];
const CACHE_FLUSHED =
  'Cache flushed.\nPlease check backend logs for more details. (When there are running or waiting ' +
  'requests, the operation will not be performed.)\n';
/** Endpoints marked @auth_level(AuthLevel.ADMIN_OPTIONAL). */
const ADMIN_OPTIONAL = new Set([
  '/flush_cache',
  '/release_memory_occupation',
  '/resume_memory_occupation',
  '/load_lora_adapter',
  '/unload_lora_adapter',
  '/pause_generation',
  '/continue_generation',
]);

interface Call extends BaseCall {
  path: string;
}

type Handler = (call: Call) => void | Promise<void>;

/** envs.SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION (default true). */
function healthGenerationEnabled(): boolean {
  const value = (process.env.SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION ?? 'true').toLowerCase();
  return value === 'true' || value === '1';
}

const templates = new Map<string, RegExp>();

/** Starlette's path regex of a route with `{name}` parameters (each one segment). */
function templateRegex(template: string): RegExp {
  let regex = templates.get(template);
  if (!regex) {
    const escaped = template.replace(/[.*+?^$()|[\]\\]/g, '\\$&').replace(/\{[^}]+\}/g, '[^/]+');
    regex = new RegExp(`^${escaped}$`);
    templates.set(template, regex);
  }
  return regex;
}

/** The `index`-th segment of a path (`/v1/responses/{id}` → index 2). */
function pathParam(path: string, index: number): string {
  return path.split('/').filter(Boolean)[index];
}

function hhmmss(ms: number): string {
  const d = new Date(ms);
  return [d.getHours(), d.getMinutes(), d.getSeconds()].map((n) => String(n).padStart(2, '0')).join(':');
}

function sameSecret(presented: string, expected: string): boolean {
  const digest = (t: string): Buffer => createHash('sha256').update(t).digest();
  return timingSafeEqual(digest(presented), digest(expected));
}

export class SglServer extends UvicornServer {
  private readonly routes: Route<Call>[] = [];
  private lastScrape = { at: Date.now(), generation: 0 };

  constructor(private readonly ctx: SglContext) {
    super(KEEP_ALIVE_MS, ctx.log);
    this.registerRoutes();
  }

  private route(path: string, methods: string[], handler: Handler, prefix = false): void {
    this.routes.push({ path, methods, handler, prefix });
  }

  private registerRoutes(): void {
    const { args } = this.ctx;
    this.route('/openapi.json', ['GET', 'HEAD'], ({ res }) => this.openapi(res));
    for (const page of DOC_PAGES) {
      const html = `<!DOCTYPE html><html><head><title>FastAPI - ${page}</title></head></html>`;
      this.route(page, ['GET', 'HEAD'], ({ res }) => sendText(res, 200, html, 'text/html; charset=utf-8'));
    }
    this.route('/health', ['GET'], (call) => this.health(call));
    this.route('/health_generate', ['GET'], (call) => this.health(call));
    this.route('/get_model_info', ['GET'], ({ res }) => {
      this.ctx.log.warning(
        "Endpoint '/get_model_info' is deprecated and will be removed in a future version. Please use '/model_info' instead.",
      );
      this.modelInfo(res);
    });
    this.route('/model_info', ['GET'], ({ res }) => this.modelInfo(res));
    this.route('/weight_version', ['GET'], ({ res }) => sendJson(res, 200, { weight_version: args.weightVersion }));
    this.route('/get_server_info', ['GET'], ({ res }) => {
      this.ctx.log.warning(
        "Endpoint '/get_server_info' is deprecated and will be removed in a future version. Please use '/server_info' instead.",
      );
      this.serverInfo(res);
    });
    this.route('/server_info', ['GET'], ({ res }) => this.serverInfo(res));
    this.route('/get_load', ['GET'], ({ res }) => this.getLoad(res));
    this.route('/generate', ['POST', 'PUT'], (call) => this.generate(call));
    for (const path of ['/encode', '/classify']) {
      this.route(path, ['POST', 'PUT'], ({ req, res, body }) => encodeRoute(this.ctx, req, res, body));
    }
    this.route('/flush_cache', ['GET', 'POST'], (call) => this.flushCache(call));
    this.route('/release_memory_occupation', ['GET', 'POST'], (call) => this.memory(call, 'release'));
    this.route('/resume_memory_occupation', ['GET', 'POST'], (call) => this.memory(call, 'resume'));
    this.route('/load_lora_adapter', ['POST'], (call) => this.loadLora(call));
    this.route('/unload_lora_adapter', ['POST'], (call) => this.unloadLora(call));
    this.route('/pause_generation', ['POST'], (call) => this.pause(call, true));
    this.route('/continue_generation', ['POST'], (call) => this.pause(call, false));
    this.route('/v1/completions', ['POST'], (call) => this.openai(call, 'completion'));
    this.route('/v1/chat/completions', ['POST'], (call) => this.openai(call, 'chat'));
    this.route('/v1/embeddings', ['POST'], ({ req, res, body }) => embeddingsRoute(this.ctx, req, res, body));
    this.route('/v1/classify', ['POST'], ({ req, res, body }) => classifyRoute(this.ctx, req, res, body));
    for (const path of ['/v1/tokenize', '/tokenize']) this.route(path, ['POST'], (call) => this.tokenize(call));
    for (const path of ['/v1/detokenize', '/detokenize']) this.route(path, ['POST'], (call) => this.detokenize(call));
    this.route('/v1/models', ['GET'], ({ res }) => this.models(res));
    this.route('/v1/models/', ['GET'], (call) => this.retrieveModel(call), true);
    this.route('/v1/score', ['POST'], ({ req, res, body }) => scoreRoute(this.ctx, req, res, body));
    this.route('/v1/responses', ['POST'], ({ req, res, body }) => runResponses(this.ctx, prepareResponses(this.ctx, req, body), res));
    this.route('/v1/responses/{response_id}', ['GET'], ({ res, path }) => retrieveResponse(this.ctx, res, pathParam(path, 2)));
    this.route('/v1/responses/{response_id}/cancel', ['POST'], ({ path }) => cancelResponse(this.ctx, pathParam(path, 2)));
    this.route('/v1/rerank', ['POST', 'PUT'], ({ req, res, body }) => rerankRoute(this.ctx, req, res, body));
    this.route('/ping', ['GET'], ({ res }) => sendEmpty(res, 200));
    this.route('/invocations', ['POST'], (call) => this.openai(call, 'chat'));
    // add_prometheus_middleware: a Mount of make_asgi_app, every method, every path under /metrics.
    if (args.enableMetrics) this.routes.push({ path: '/metrics', methods: [], mount: true, handler: ({ res }) => this.metrics(res) });
  }

  // -------------------------------------------------------------------------------------------
  // Pipeline: access log, API key, CORS, routing

  protected override onRequest(req: IncomingMessage, res: ServerResponse): void {
    if (this.ctx.settings.hang) return;
    this.instrument(req, res);
    const url = new URL(req.url ?? '/', 'http://localhost');
    const chunks: Buffer[] = [];
    req.on('data', (chunk: Buffer) => chunks.push(chunk));
    req.on('end', () => {
      const call: Call = { req, res, url, path: unquotePath(url.pathname), body: Buffer.concat(chunks) }; // uvicorn decodes the path
      this.dispatch(call).catch((error: unknown) => {
        this.ctx.log.error(`Exception in ASGI application\n${String((error as Error)?.stack ?? error)}`);
        if (res.headersSent) res.end();
        else sendText(res, 500, 'Internal Server Error', 'text/plain; charset=utf-8');
      });
    });
  }

  private instrument(req: IncomingMessage, res: ServerResponse): void {
    res.setHeader('server', 'uvicorn');
    this.logAccess(req, res);
  }

  private async dispatch(call: Call): Promise<void> {
    const { req, res, path } = call;
    const method = req.method ?? 'GET';
    const denied = this.authorize(req, method, path);
    if (denied) {
      sendJson(res, denied, { error: denied === 401 ? 'Unauthorized' : 'Forbidden' });
      return;
    }
    if (this.cors(req, res, method)) return;
    await routeRequest(call, path, this.routes, (r, p) => this.matches(r, p));
  }

  /**
   * Exact paths; `{name}` segments match one path segment; `/v1/models/{model:path}` needs a
   * non-empty rest (routeRequest matches Mounts).
   */
  private matches(route: Route<Call>, path: string): boolean {
    if (route.path.includes('{')) return templateRegex(route.path).test(path);
    if (!route.prefix) return route.path === path;
    return path.startsWith(route.path) && path.length > route.path.length;
  }

  /** auth.py decide_request_auth: null when allowed, else 401/403. */
  private authorize(req: IncomingMessage, method: string, path: string): number | null {
    const { apiKey, adminApiKey } = this.ctx.args;
    if (!apiKey && !adminApiKey) return null;
    if (method === 'OPTIONS' || path.startsWith('/health') || path.startsWith('/metrics')) return null;
    const check = (expected: string): boolean => {
      const header = req.headers.authorization;
      if (typeof header === 'string') {
        const space = header.indexOf(' ');
        if (space !== -1 && header.slice(0, space).toLowerCase() === 'bearer' && sameSecret(header.slice(space + 1), expected)) {
          return true;
        }
      }
      const xApiKey = req.headers['x-api-key'];
      return typeof xApiKey === 'string' && sameSecret(xApiKey, expected);
    };
    if (ADMIN_OPTIONAL.has(path)) {
      if (adminApiKey) return check(adminApiKey) ? null : 401;
      if (apiKey) return check(apiKey) ? null : 401;
      return null;
    }
    if (apiKey) return check(apiKey) ? null : 401;
    return null;
  }

  /** CORSMiddleware(allow_origins=["*"], allow_credentials=True, methods/headers "*"). */
  private cors(req: IncomingMessage, res: ServerResponse, method: string): boolean {
    const origin = req.headers.origin;
    if (!origin) return false;
    res.setHeader('access-control-allow-origin', origin);
    res.setHeader('access-control-allow-credentials', 'true');
    res.setHeader('vary', 'Origin');
    if (method !== 'OPTIONS' || !req.headers['access-control-request-method']) return false;
    res.setHeader('access-control-allow-methods', CORS_ALL_METHODS);
    res.setHeader('access-control-max-age', '600');
    const requested = req.headers['access-control-request-headers'];
    if (requested) res.setHeader('access-control-allow-headers', requested);
    sendText(res, 200, 'OK', 'text/plain; charset=utf-8');
    return true;
  }

  // -------------------------------------------------------------------------------------------
  // Health

  /**
   * /health and /health_generate: 503 while shutting down or warming up; otherwise a one-token
   * generation whose output (or any output) must arrive within SGLANG_HEALTH_CHECK_TIMEOUT,
   * checked after each one-second sleep.
   */
  private async health({ res, path }: Call): Promise<void> {
    const { ctx } = this;
    const answer = (status: number): void => {
      const delay = ctx.settings.healthDelayMs;
      if (delay > 0) setTimeout(() => sendEmpty(res, status), delay);
      else sendEmpty(res, status);
    };
    if (ctx.gracefullyExit) {
      ctx.log.info('Health check request received during shutdown. Returning 503.');
      return answer(503);
    }
    if (ctx.status === 'Starting') return answer(503);
    if (!healthGenerationEnabled() && path === '/health') return answer(200);
    ctx.ensureHandleLoop();
    const tic = Date.now();
    const touch = (): void => {
      ctx.lastReceive = Date.now();
    };
    const listener: RequestListener = {
      onStarted: () => undefined,
      onToken: touch,
      onFinished: touch,
      onEngineDead: () => undefined,
    };
    ctx.engine.add(
      { type: 'add', id: `HEALTH_CHECK_${tic / 1000}`, numTokens: 1, finishReason: 'length', promptTokens: 1 },
      listener,
    );
    const deadline = tic + HEALTH_CHECK_TIMEOUT_S * 1000;
    while (Date.now() < deadline) {
      await new Promise((resolve) => setTimeout(resolve, HEALTH_POLL_MS));
      if (ctx.lastReceive > tic) {
        ctx.status = 'Up';
        return answer(200);
      }
    }
    ctx.log.error(
      `Health check failed. Server couldn't get a response from detokenizer for last ` +
        `${HEALTH_CHECK_TIMEOUT_S} seconds. tic start time: ${hhmmss(tic)}. last_heartbeat time: ` +
        `${hhmmss(ctx.lastReceive)}`,
    );
    ctx.status = 'UnHealthy';
    return answer(503);
  }

  // -------------------------------------------------------------------------------------------
  // Information

  private modelInfo(res: ServerResponse): void {
    const { args } = this.ctx;
    sendJson(res, 200, {
      model_path: args.modelPath,
      tokenizer_path: args.tokenizerPath,
      is_generation: !args.isEmbedding,
      preferred_sampling_params: null,
      weight_version: args.weightVersion,
      has_image_understanding: false,
      has_audio_understanding: false,
      model_type: 'qwen3',
      architectures: ['Qwen3ForCausalLM'],
    });
  }

  private load(): { running: number; queued: number; usedTokens: number } {
    let running = 0;
    let queued = 0;
    let usedTokens = 0;
    for (const r of this.ctx.inflight.values()) {
      if (r.started) {
        running += 1;
        usedTokens += r.promptTokens + r.emitted;
      } else queued += 1;
    }
    return { running, queued, usedTokens };
  }

  private serverInfo(res: ServerResponse): void {
    const { args, kvTokens } = this.ctx;
    sendJson(res, 200, {
      ...serverArgsJson(args),
      max_total_num_tokens: kvTokens,
      max_req_input_len: args.contextLength - 6,
      internal_states: [
        {
          last_gen_throughput: 0.0,
          memory_usage: { weight: 1.12, kvcache: 1.0, token_capacity: kvTokens, graph: 0.0 },
        },
      ],
      version: SIM_SGLANG_VERSION,
    });
  }

  private getLoad(res: ServerResponse): void {
    const { running, queued, usedTokens } = this.load();
    sendJson(res, 200, [{ dp_rank: 0, num_reqs: running + queued, num_waiting_reqs: queued, num_tokens: usedTokens }]);
  }

  private models(res: ServerResponse): void {
    const { args, loras } = this.ctx;
    const data = [modelCard(args.servedModelName, args.servedModelName, null, args.contextLength)];
    if (args.enableLora) {
      for (const lora of loras.values()) data.push(modelCard(lora.lora_name, lora.lora_path, args.servedModelName, null));
    }
    sendJson(res, 200, { object: 'list', data });
  }

  private retrieveModel({ res, path }: Call): void {
    const { args } = this.ctx;
    const model = decodeURIComponent(path.slice('/v1/models/'.length));
    if (model !== args.servedModelName) {
      sendJson(res, 404, modelNotFoundBody(model));
      return;
    }
    sendJson(res, 200, modelCard(model, model, null, args.contextLength));
  }

  private metrics(res: ServerResponse): void {
    const { ctx } = this;
    const { running, queued, usedTokens } = this.load();
    const now = Date.now();
    const generation = ctx.metrics.totals().generation;
    const elapsed = (now - this.lastScrape.at) / 1000;
    const genThroughput = elapsed > 0 ? (generation - this.lastScrape.generation) / elapsed : 0;
    this.lastScrape = { at: now, generation };
    const text = ctx.metrics.render({ running, queued, usedTokens, maxTotalTokens: ctx.kvTokens, genThroughput });
    sendUnsized(res, 200, text, METRICS_CONTENT_TYPE);
  }

  // -------------------------------------------------------------------------------------------
  // Generation

  private async openai({ req, res, body }: Call, kind: 'chat' | 'completion'): Promise<void> {
    const parsed = parseSglBody(req, body, true);
    const prepared = prepareOpenAi(this.ctx, kind, parsed, req.headers['x-sim-warmup'] === '1');
    if (this.ctx.args.isEmbedding) {
      // The scheduler of an embedding model answers with a pooled output and no `text`: the
      // response builder's KeyError is handle_request's 500 (streamed or not, in the simulator).
      await runPrefill(this.ctx, res, prepared.rid, prepared.prompts.map((p) => p.tokens));
      throw internalServerError("'text'");
    }
    runSglGeneration(this.ctx, prepared, res);
  }

  private generate({ req, res, body }: Call): void | Promise<void> {
    // An embedding model answers /generate with its pooled output, as /encode does.
    if (this.ctx.args.isEmbedding) {
      return encodeRoute(this.ctx, req, res, body, 'Either text, input_ids or input_embeds should be provided.');
    }
    const parsed = parseSglBody(req, body, false);
    const prepared = prepareGenerate(this.ctx, parsed, req.headers['x-sim-warmup'] === '1');
    runSglGeneration(this.ctx, prepared, res);
  }

  private tokenize({ req, res, body: raw }: Call): void {
    const body = requireSglObject(parseSglBody(req, raw, true));
    const hasPrompt = body.prompt !== undefined && body.prompt !== null;
    const hasMessages = body.messages !== undefined && body.messages !== null;
    if (hasPrompt === hasMessages) {
      throw requestValidationError([
        {
          type: 'value_error',
          loc: ['body'],
          msg: "Value error, Exactly one of 'prompt' or 'messages' must be provided.",
          input: body,
        },
      ]);
    }
    const { tokenizer, args } = this.ctx;
    let tokens: number[] | number[][];
    if (hasMessages) {
      const messages = (body.messages as Array<Record<string, unknown>>).map((m) => ({
        role: String(m?.role ?? 'user'),
        content: m?.content,
      }));
      tokens = tokenizer.encodeChat(messages, true);
    } else if (Array.isArray(body.prompt)) {
      tokens = (body.prompt as unknown[]).map((p) => tokenizer.encode(String(p)));
    } else {
      tokens = tokenizer.encode(String(body.prompt));
    }
    const count = Array.isArray(tokens[0]) ? (tokens as number[][]).map((t) => t.length) : tokens.length;
    sendJson(res, 200, { tokens, count, max_model_len: args.contextLength });
  }

  private detokenize({ req, res, body: raw }: Call): void {
    const body = requireSglObject(parseSglBody(req, raw, true));
    if (!Array.isArray(body.tokens)) {
      throw requestValidationError([{ type: 'missing', loc: ['body', 'tokens'], msg: 'Field required', input: body }]);
    }
    const ids = body.tokens as number[];
    const bad = ids.find((t) => !Number.isInteger(t) || t < 0 || t >= VOCAB_SIZE);
    if (bad !== undefined) throw badRequestError(`Token id ${bad} is out of vocabulary`);
    sendJson(res, 200, { text: this.ctx.tokenizer.decode(ids, true) });
  }

  // -------------------------------------------------------------------------------------------
  // Admin routes

  /** An engine call that fails (dead or stopping scheduler) is uncaught here: FastAPI's plain 500. */
  private flushCache({ res }: Call): Promise<void> {
    const busy = this.ctx.inflight.size > 0;
    return this.ctx.engine.call('reset_prefix_cache').then(() => {
      if (busy) this.ctx.log.warning('Cache not flushed because there are pending requests.');
      sendText(res, busy ? 400 : 200, CACHE_FLUSHED);
    });
  }

  /**
   * release_memory_occupation / resume_memory_occupation, body `{"tags": [...]?}` (required).
   * Without --enable-memory-saver SGLang's no-op adapter frees nothing and answers as if it had.
   */
  private async memory({ req, res, body: raw }: Call, op: 'release' | 'resume'): Promise<void> {
    const body = requireSglObject(parseSglBody(req, raw, false));
    const tags = Array.isArray(body.tags) ? (body.tags as string[]) : null;
    const { ctx } = this;
    if (op === 'release' && ctx.inflight.size > 0) {
      sendJson(res, 400, nativeError('release_memory_occupation should be called only when server is idle.'));
      return;
    }
    const all = tags?.length ? tags : ['weights', 'kv_cache'];
    if (ctx.args.enableMemorySaver) {
      try {
        await ctx.engine.call(op === 'release' ? 'release_memory' : 'resume_memory', { tags });
      } catch (error) {
        // `except Exception as e: return _create_error_response(e)`: a dead or stopping scheduler.
        if (!(error instanceof EngineCallError)) throw error;
        sendJson(res, 400, nativeError(error.message));
        return;
      }
      for (const tag of all) {
        if (op === 'release') ctx.releasedTags.add(tag);
        else ctx.releasedTags.delete(tag);
      }
    }
    sendJson(res, 200, null);
  }

  private loraBody(req: IncomingMessage, raw: Buffer, fields: string[]): Record<string, unknown> {
    const body = requireSglObject(parseSglBody(req, raw, false));
    const missing = fields.filter((f) => !(f in body));
    if (missing.length) {
      throw requestValidationError(
        missing.map((f) => ({ type: 'missing', loc: ['body', f], msg: 'Field required', input: body })),
      );
    }
    return body;
  }

  /** `{"success","error_message","loaded_adapters"}`: the adapters loaded now, on failure too. */
  private loraResult(res: ServerResponse, error: string | null): void {
    const loaded = Object.fromEntries([...this.ctx.loras.values()].map((l) => [l.lora_name, l.lora_path]));
    sendJson(res, error ? 400 : 200, { success: !error, error_message: error, loaded_adapters: loaded });
  }

  private loadedKeys(): string {
    return `dict_keys(${pyRepr([...this.ctx.loras.keys()])})`;
  }

  private loadLora({ req, res, body: raw }: Call): void {
    const body = this.loraBody(req, raw, ['lora_name', 'lora_path']);
    const { ctx } = this;
    const name = String(body.lora_name);
    const path = String(body.lora_path);
    if (!ctx.args.enableLora) return this.loraResult(res, 'LoRA is not enabled. Please set `--enable-lora` to enable LoRA.');
    const limit = ctx.args.maxLoadedLoras;
    if (limit !== null && ctx.loras.size >= limit) {
      return this.loraResult(
        res,
        `Cannot load LoRA adapter ${name} at path ${path}. Maximum number of loaded LoRA adapters is ` +
          `${limit}. Please unload some LoRA adapters before loading new ones.`,
      );
    }
    if (ctx.loras.has(name)) {
      return this.loraResult(res, `LoRA with name ${name} already exists. Loaded LoRAs: ${this.loadedKeys()}`);
    }
    ctx.log.info(`LoRA adapter loading starts: LoRARef(lora_name=${pyRepr(name)}, lora_path=${pyRepr(path)}).`);
    ctx.loras.set(name, { lora_name: name, lora_path: path, pinned: body.pinned === true });
    ctx.log.info(`LoRA adapter loading completes: LoRARef(lora_name=${pyRepr(name)}, lora_path=${pyRepr(path)}).`);
    this.loraResult(res, null);
  }

  private unloadLora({ req, res, body: raw }: Call): void {
    const body = this.loraBody(req, raw, ['lora_name']);
    const { ctx } = this;
    const name = String(body.lora_name);
    if (!ctx.args.enableLora) return this.loraResult(res, 'LoRA is not enabled. Please set `--enable-lora` to enable LoRA.');
    if (!ctx.loras.has(name)) {
      return this.loraResult(res, `LoRA with name ${name} does not exist. Loaded LoRAs: ${this.loadedKeys()}`);
    }
    ctx.loras.delete(name);
    ctx.log.info(`LoRA adapter unloading completes: ${name}.`);
    this.loraResult(res, null);
  }

  private async pause({ res }: Call, pause: boolean): Promise<void> {
    if (pause) await this.ctx.engine.call('sleep', { level: 0, mode: 'keep' });
    else await this.ctx.engine.call('wake_up', { tags: ['scheduling'] });
    const message = pause ? 'Generation paused successfully.' : 'Generation continued successfully.';
    sendJson(res, 200, { message, status: 'ok' });
  }

  private openapi(res: ServerResponse): void {
    const paths = Object.fromEntries(
      this.routes
        .filter((r) => !r.mount && r.path !== '/openapi.json' && !DOC_PAGES.includes(r.path))
        .map((r) => [r.prefix ? `${r.path}{model}` : r.path, Object.fromEntries(r.methods.map((m) => [m.toLowerCase(), {}]))]),
    );
    sendJson(res, 200, { openapi: '3.1.0', info: { title: 'FastAPI', version: '0.1.0' }, paths });
  }

  // -------------------------------------------------------------------------------------------
  // Listener

  listen(): Promise<void> {
    const { host, port } = this.ctx.args;
    return this.listenOn({ host, port });
  }
}
