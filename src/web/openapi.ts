import { existsSync, readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import type { INestApplication } from '@nestjs/common';
import { DocumentBuilder, SwaggerModule, type OpenAPIObject } from '@nestjs/swagger';
import type { SchemaObject } from '@nestjs/swagger/dist/interfaces/open-api-spec.interface';
import type { VllmConfig } from '../config/config.schema';
import { ChatRequestDto } from './chat.dto';

/** The relay routes are plain Fastify routes, so they are described here rather than by decorators. */
function relayedPaths(engine: VllmConfig['engine']): OpenAPIObject['paths'] {
  /** `pathId`: the name of the path's parameter, if it has one. */
  const relayed = (summary: string, method: 'get' | 'post', { body = method === 'post', pathId = '' } = {}) => ({
    [method]: {
      tags: ['openai'],
      summary,
      ...(body ? { requestBody: { required: true, content: { 'application/json': { schema: { type: 'object' } } } } } : {}),
      ...(pathId ? { parameters: [{ name: pathId, in: 'path', required: true, schema: { type: 'string' } }] } : {}),
      responses: { 200: { description: "vLLM's answer, relayed as vLLM sent it (JSON or text/event-stream)" } },
    },
  });
  return {
    '/v1/chat/completions': {
      post: {
        tags: ['openai'],
        summary: 'OpenAI chat completions relayed to vLLM; a body with "prompt" instead of "messages" gets the simple envelope',
        requestBody: {
          required: true,
          content: {
            'application/json': {
              schema: { oneOf: [{ type: 'object', required: ['messages'] }, { $ref: '#/components/schemas/ChatRequestDto' }] },
            },
          },
        },
        responses: { 200: { description: "vLLM's answer (or the simple envelope), JSON or text/event-stream" } },
      },
    },
    '/v1/completions': relayed('OpenAI completions, relayed to vLLM', 'post'),
    '/v1/responses': relayed('OpenAI Responses API, relayed to vLLM (streams end with response.completed, no [DONE]; a failure midway with an error event)', 'post'),
    '/v1/responses/{id}': relayed('A stored response (vLLM stores them only with VLLM_ENABLE_RESPONSES_API_STORE=1; 404 otherwise)', 'get', { pathId: 'id' }),
    '/v1/responses/{id}/cancel': relayed("Cancels a background response (needs vLLM's response store; 404 otherwise)", 'post', { body: false, pathId: 'id' }),
    '/v1/models': relayed('Served models and loaded LoRA adapters', 'get'),
    '/v1/embeddings': relayed('Embeddings (pooling models only; 404 otherwise)', 'post'),
    '/v1/rerank': relayed('Rerank (pooling models only; 404 otherwise)', 'post'),
    '/v1/score': relayed('Score (pooling models only; 404 otherwise)', 'post'),
    '/tokenize': relayed("vLLM's tokenizer", 'post'),
    '/detokenize': relayed("vLLM's detokenizer", 'post'),
    ...(engine === 'sglang'
      ? {
          '/v1/models/{model}': relayed("One model's card (SGLang; the name may hold slashes)", 'get', { pathId: 'model' }),
          '/v1/classify': relayed('Classification (SGLang, classification models only)', 'post'),
          '/v1/tokenize': relayed("SGLang's tokenizer (as /tokenize)", 'post'),
          '/v1/detokenize': relayed("SGLang's detokenizer (as /detokenize)", 'post'),
        }
      : {}),
  };
}

/** The simple API's answer (application/json), and the shape of its errors. */
const ENVELOPE: SchemaObject = {
  type: 'object',
  required: ['request_id', 'content', 'model', 'usage', 'finish_reason', 'error'],
  properties: {
    request_id: { type: 'string' },
    content: { type: 'string', nullable: true },
    model: { type: 'string', nullable: true },
    usage: {
      type: 'object',
      nullable: true,
      properties: { prompt_tokens: { type: 'integer' }, completion_tokens: { type: 'integer' }, total_tokens: { type: 'integer' } },
    },
    finish_reason: { type: 'string', nullable: true, example: 'stop' },
    error: {
      type: 'object',
      nullable: true,
      properties: { type: { type: 'string', example: 'invalid_request' }, message: { type: 'string' } },
    },
  },
};

/** The simple API's routes: their answer and errors (README, "Simple chat"), and no field beyond the documented ones. */
function describeSimpleApi(document: OpenAPIObject): void {
  document.components ??= {};
  document.components.schemas ??= {};
  document.components.schemas.ChatEnvelope = ENVELOPE;
  for (const dto of ['ChatRequestDto', 'GenerateRequestDto']) {
    const schema = document.components.schemas[dto] as SchemaObject | undefined;
    if (schema) schema.additionalProperties = false; // an unknown field is a 400 that names it
  }
  const envelope = { $ref: '#/components/schemas/ChatEnvelope' };
  for (const path of ['/chat/completions', '/generate']) {
    const operation = document.paths[path]?.post;
    if (!operation) continue;
    operation.responses = {
      200: {
        description: 'The answer; with "stream": true, server-sent events (each with request_id and a content delta, a final one with finish_reason and usage, then data: [DONE])',
        content: { 'application/json': { schema: envelope }, 'text/event-stream': { schema: { type: 'string' } } },
      },
      default: { description: 'An error, in the same envelope (content null, error set): 400, 401, 413, 415, 429, 502, 503, 504', content: { 'application/json': { schema: envelope } } },
    };
  }
}

/** Routes answered without a key (auth.api_keys guards the rest; /metrics unless auth.protect_metrics). */
const OPEN_PATHS = ['/health', '/ready'];

/** /openapi.json and /docs (Swagger UI), generated from the controllers and DTOs. */
export function setupOpenApi(app: INestApplication, engine: VllmConfig['engine']): void {
  const config = new DocumentBuilder()
    .setTitle('tide-vllm')
    .setDescription('Launches, supervises and fronts one vLLM model')
    .setVersion(packageVersion())
    // Opaque keys, not JWTs: auth.api_keys, and auth.admin_api_keys on /admin.
    .addBearerAuth({ type: 'http', scheme: 'bearer', description: 'A key of auth.api_keys (of auth.admin_api_keys on /admin)' })
    .addSecurityRequirements('bearer') // so Swagger UI's "Authorize" sends the key on every route
    .addGlobalParameters({
      name: 'X-Request-Id',
      in: 'header',
      required: false,
      description: 'The request id (printable ASCII, at most 1024 characters), sent to vLLM and echoed in the answer',
      schema: { type: 'string' },
    })
    .addTag('chat', 'The simple API')
    .addTag('openai', "OpenAI's API, relayed to vLLM")
    .addTag('health', 'Liveness and readiness')
    .addTag('admin', 'Sleep, wake, restart, LoRA adapters')
    .build();
  const document = SwaggerModule.createDocument(app, config, { extraModels: [ChatRequestDto] });
  Object.assign(document.paths, relayedPaths(engine));
  describeSimpleApi(document);
  for (const path of OPEN_PATHS) {
    const operation = document.paths[path]?.get;
    if (operation) operation.security = [];
  }
  document.paths['/metrics'] = {
    get: {
      tags: ['health'],
      summary: "Prometheus metrics (text exposition): tide-vllm's and the process's, not vLLM's own",
      security: [{}, { bearer: [] }], // a key only with auth.protect_metrics
      responses: { 200: { description: 'Prometheus text format 0.0.4', content: { 'text/plain': { schema: { type: 'string' } } } } },
    },
  };
  SwaggerModule.setup('docs', app, document, { jsonDocumentUrl: 'openapi.json', raw: ['json'] });
}

/** tide-vllm's version, from its package.json (found up from here: src/ under ts-jest, dist/src/ built). */
function packageVersion(): string {
  for (let dir = __dirname; dir !== dirname(dir); dir = dirname(dir)) {
    const file = join(dir, 'package.json');
    if (!existsSync(file)) continue;
    const pkg = JSON.parse(readFileSync(file, 'utf8')) as { name?: string; version?: string };
    if (pkg.name === 'tide-vllm' && pkg.version) return pkg.version;
  }
  return '0.0.0';
}
