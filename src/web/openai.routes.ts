import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import type { ChatHandler } from '../application/chat.handler';
import { AppError } from '../domain/app-error';
import { ChatRequestDto } from './chat.dto';
import { envelope, withRequestContext } from './chat.controller';
import { sendError, slashRedirect } from './app-error.filter';
import { chatBodyKind, routePathOf } from './http-error';
import { isObject, notAnObject, registerJsonPost } from './json-body';
import { CHAT_PATH, MODELS_PATH, type OpenAiProxy, RESPONSES_PATH, needsEngine, relayedPosts } from './openai.proxy';
import { relayedRequestId, traceHeaders } from './logging';
import { outcomeOf } from './request-outcome';
import { sendChatStream } from './sse.writer';
import { requestSignal } from './traffic.gate';
import { requestValidationPipe } from './validation';

/**
 * The OpenAI-compatible routes as Fastify routes, for every request OpenAiProxy.handle does not
 * take at the http level: refused ones (key, admission, body), those that wait for vLLM, and
 * the simple API's `prompt` bodies on /v1/chat/completions. Plain Fastify routes, not Nest
 * controllers: Nest's pipeline alone would cost more than the whole relay.
 */
export function registerOpenAiRoutes(fastify: FastifyInstance, proxy: OpenAiProxy, chat: ChatHandler): void {
  const validate = requestValidationPipe();
  const { bodyLimit, logBodies } = proxy.deps;

  registerJsonPost(fastify, CHAT_PATH, bodyLimit, async (request, reply, { value: body, text }) => {
    if (!isObject(body)) return sendError(reply, notAnObject(body));
    if (logBodies) outcomeOf(reply.raw).body = body;
    switch (chatBodyKind(body)) {
      case 'simple':
        return simpleChat(request, reply, body);
      case 'openai':
        return relayJson(request, reply, body, text, CHAT_PATH);
      case 'both':
        return sendError(reply, AppError.invalid('use either "prompt" (simple API) or "messages" (OpenAI API), not both', 'messages'));
      case 'neither':
        return sendError(reply, AppError.invalid('the body needs "messages" (OpenAI chat) or "prompt" (simple API)', 'messages'));
    }
  });

  for (const path of relayedPosts(proxy.deps.engine)) {
    registerJsonPost(fastify, path, bodyLimit, async (request, reply, { value: body, text }) => {
      if (!isObject(body)) return sendError(reply, notAnObject(body));
      if (logBodies) outcomeOf(reply.raw).body = body;
      return relayJson(request, reply, body, text, path);
    });
  }

  // GET only, as vLLM's routes (FastAPI adds no HEAD): a HEAD is a 405 with `Allow: GET`, as there.
  const getOnly = { exposeHeadRoute: false };
  fastify.get(MODELS_PATH, getOnly, async (request, reply) => relay(request, reply, 'GET', MODELS_PATH, undefined, request.id));
  // One model's card (the SDKs' models.retrieve): SGLang's `/v1/models/{model:path}`, whose names
  // may hold slashes (`Qwen/Qwen3-0.6B`, as the Python SDK and curl send it). vLLM has no such
  // route, so with engine vllm it is not registered: every method of it is a 404, as on vLLM.
  if (proxy.deps.engine === 'sglang') {
    fastify.get(`${MODELS_PATH}/*`, getOnly, async (request, reply) => {
      // `/v1/models/` is the list's path with a trailing slash (an empty name).
      const slashed = (request.params as { '*': string })['*'] === '' ? slashRedirect(request) : null;
      if (slashed !== null) return reply.code(307).header('location', slashed).send();
      return relay(request, reply, 'GET', request.url, undefined, request.id);
    });
  }
  // A stored response and its cancellation: vLLM keeps responses only with VLLM_ENABLE_RESPONSES_API_STORE=1,
  // else its 404 is relayed. No body goes to vLLM (it reads none); the query (`stream`, `starting_after`) does.
  fastify.get(`${RESPONSES_PATH}/:id`, getOnly, async (request, reply) => relay(request, reply, 'GET', request.url, undefined, request.id));
  fastify.post(`${RESPONSES_PATH}/:id/cancel`, async (request, reply) => relay(request, reply, 'POST', request.url, undefined, request.id));

  async function simpleChat(request: FastifyRequest, reply: FastifyReply, body: Record<string, unknown>) {
    try {
      const dto = (await validate.transform(body, { type: 'body', metatype: ChatRequestDto })) as ChatRequestDto;
      const input = withRequestContext(dto, request, reply);
      if (dto.stream) return await sendChatStream(reply, chat.stream(input, requestSignal(request)), proxy.deps.clientTimeoutMs);
      return reply.send(envelope(await chat.complete(input, requestSignal(request)), reply));
    } catch (err) {
      return sendError(reply, err);
    }
  }

  function relayJson(request: FastifyRequest, reply: FastifyReply, body: Record<string, unknown>, text: string, route: string) {
    const json = proxy.prepare(body, text, route);
    if (json instanceof AppError) return sendError(reply, json);
    return relay(request, reply, 'POST', request.url, json, relayedRequestId(request.headers, body, request.id));
  }

  /**
   * `path`: the request target vLLM gets, as the client sent it (in origin form: main.ts's
   * rewriteUrl), which vLLM routes as Fastify did; the route is judged by the path as routed (routePathOf). `requestId`:
   * relayedRequestId's (X-Request-Id, else the body's request_id, else a fresh one); vLLM gets it,
   * and the answer carries it.
   */
  async function relay(request: FastifyRequest, reply: FastifyReply, method: 'GET' | 'POST', path: string, body: string | undefined, requestId: string) {
    const engine = needsEngine(method, routePathOf(path));
    if (request.tideScope) request.tideScope.activity = proxy.isActivity(engine);
    try {
      // A model list or a tokenizing goes to a vLLM asleep at level 1 or 2 as it is (needsEngine).
      if (!proxy.servesNow(engine)) await proxy.deps.manager.ensureServing(requestSignal(request));
    } catch (err) {
      return sendError(reply, err);
    }
    reply.hijack();
    proxy.start(reply.raw, request.tideScope, { method, path, body, requestId, headers: traceHeaders(request.headers) });
    return reply;
  }
}
