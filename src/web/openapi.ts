import type { INestApplication } from '@nestjs/common';
import { DocumentBuilder, SwaggerModule, type OpenAPIObject } from '@nestjs/swagger';
import { ChatRequestDto } from './chat.dto';

/** The relay routes are plain Fastify routes, so they are described here rather than by decorators. */
function relayedPaths(): OpenAPIObject['paths'] {
  const relayed = (summary: string, method: 'get' | 'post') => ({
    [method]: {
      tags: ['openai'],
      summary,
      ...(method === 'post' ? { requestBody: { required: true, content: { 'application/json': { schema: { type: 'object' } } } } } : {}),
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
    '/v1/responses': relayed('OpenAI Responses API, relayed to vLLM (streams end with response.completed, no [DONE])', 'post'),
    '/v1/models': relayed('Served models and loaded LoRA adapters', 'get'),
    '/v1/embeddings': relayed('Embeddings (pooling models only; 404 otherwise)', 'post'),
    '/v1/rerank': relayed('Rerank (pooling models only; 404 otherwise)', 'post'),
    '/v1/score': relayed('Score (pooling models only; 404 otherwise)', 'post'),
    '/tokenize': relayed("vLLM's tokenizer", 'post'),
    '/detokenize': relayed("vLLM's detokenizer", 'post'),
  };
}

/** /openapi.json and /docs (Swagger UI), generated from the controllers and DTOs. */
export function setupOpenApi(app: INestApplication): void {
  const config = new DocumentBuilder()
    .setTitle('tide-vllm')
    .setDescription('Launches, supervises and fronts one vLLM model')
    .addBearerAuth()
    .build();
  const document = SwaggerModule.createDocument(app, config, { extraModels: [ChatRequestDto] });
  Object.assign(document.paths, relayedPaths());
  SwaggerModule.setup('docs', app, document, { jsonDocumentUrl: 'openapi.json', raw: ['json'] });
}
