import type { INestApplication } from '@nestjs/common';
import { DocumentBuilder, SwaggerModule, type OpenAPIObject } from '@nestjs/swagger';
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

/** /openapi.json and /docs (Swagger UI), generated from the controllers and DTOs. */
export function setupOpenApi(app: INestApplication, engine: VllmConfig['engine']): void {
  const config = new DocumentBuilder()
    .setTitle('tide-vllm')
    .setDescription('Launches, supervises and fronts one vLLM model')
    .addBearerAuth()
    .build();
  const document = SwaggerModule.createDocument(app, config, { extraModels: [ChatRequestDto] });
  Object.assign(document.paths, relayedPaths(engine));
  SwaggerModule.setup('docs', app, document, { jsonDocumentUrl: 'openapi.json', raw: ['json'] });
}
