import { Module, type OnModuleInit } from '@nestjs/common';
import { ConfigService } from '@nestjs/config';
import { HttpAdapterHost } from '@nestjs/core';
import { TerminusModule } from '@nestjs/terminus';
import type { FastifyInstance } from 'fastify';
import { ApplicationModule } from '../application/application.module';
import type { TideConfig } from '../config/config.schema';
import { InfrastructureModule } from '../infrastructure/infrastructure.module';
import { ChatHandler } from '../application/chat.handler';
import { VLLMRelay } from '../infrastructure/vllm.relay';
import { VLLMServerManager } from '../infrastructure/vllm-server.manager';
import { AdminController } from './admin.controller';
import { ApiKeys } from './auth.hook';
import { AccessLog } from './logging';
import { Metrics, MetricsController } from './metrics';
import { ChatController } from './chat.controller';
import { Cors } from './cors';
import { registerOpenAiRoutes } from './openai.routes';
import { OpenAiProxy } from './openai.proxy';
import { outcomeOf } from './request-outcome';
import { HealthController, VllmHealthIndicator } from './health.controller';
import { TrafficGate } from './traffic.gate';
import { answerUnroutedEarly } from './app-error.filter';

@Module({
  imports: [ApplicationModule, InfrastructureModule, TerminusModule],
  controllers: [ChatController, HealthController, AdminController, MetricsController],
  providers: [
    VllmHealthIndicator,
    Metrics,
    {
      provide: TrafficGate,
      inject: [ConfigService],
      useFactory: (config: ConfigService<TideConfig, true>) => new TrafficGate(config.get('web', { infer: true }).max_concurrent_requests),
    },
    {
      provide: ApiKeys,
      inject: [ConfigService],
      useFactory: (config: ConfigService<TideConfig, true>) => new ApiKeys(config.get('auth', { infer: true })),
    },
    {
      provide: Cors,
      inject: [ConfigService],
      useFactory: (config: ConfigService<TideConfig, true>) => new Cors(config.get('web', { infer: true }).cors_allowed_origins),
    },
    {
      provide: OpenAiProxy,
      inject: [VLLMRelay, VLLMServerManager, Metrics, TrafficGate, ApiKeys, Cors, ConfigService],
      useFactory: (relay: VLLMRelay, manager: VLLMServerManager, metrics: Metrics, gate: TrafficGate, keys: ApiKeys, cors: Cors, config: ConfigService<TideConfig, true>) =>
        new OpenAiProxy({
          relay,
          manager,
          metrics,
          gate,
          keys,
          cors,
          model: config.get('vllm', { infer: true }).model_name,
          engine: config.get('vllm', { infer: true }).engine,
          maxPromptChars: config.get('web', { infer: true }).max_prompt_chars,
          bodyLimit: config.get('web', { infer: true }).body_limit,
          logBodies: config.get('logging', { infer: true }).log_bodies,
          clientTimeoutMs: config.get('web', { infer: true }).client_timeout * 1000,
        }),
    },
  ],
  exports: [TrafficGate, OpenAiProxy],
})
export class WebModule implements OnModuleInit {
  constructor(
    private readonly adapterHost: HttpAdapterHost,
    private readonly gate: TrafficGate,
    private readonly manager: VLLMServerManager,
    private readonly chat: ChatHandler,
    private readonly config: ConfigService<TideConfig, true>,
    private readonly metrics: Metrics,
    private readonly keys: ApiKeys,
    private readonly cors: Cors,
    private readonly proxy: OpenAiProxy,
  ) {}

  /** Fastify-level pieces: the admission hook, and the OpenAI relay routes (hot path, no Nest pipeline). */
  onModuleInit(): void {
    const fastify = this.adapterHost.httpAdapter.getInstance<FastifyInstance>();
    // Order matters: every request is measured, then (its answer readable by its origin) authenticated, then admitted.
    this.metrics.register(fastify, new AccessLog(this.config.get('logging', { infer: true })));
    this.cors.register(fastify);
    this.keys.register(fastify, this.config.get('web', { infer: true }).bind_address.host);
    this.gate.register(fastify);
    answerUnroutedEarly(fastify);
    this.gate.onSettled = (scope) => {
      if (scope.activity) this.manager.touch();
    };
    this.manager.trackTraffic(this.gate, this.config.get('web', { infer: true }).drain_timeout * 1000);
    // Their common case is answered before Fastify by OpenAiProxy (main.ts hands it the server).
    registerOpenAiRoutes(fastify, this.proxy, this.chat);
    // (The relay routes read their own bodies and record them themselves.)
    if (this.config.get('logging', { infer: true }).log_bodies) {
      fastify.addHook('preHandler', (request, reply, done) => {
        outcomeOf(reply.raw).body = request.body;
        done();
      });
    }
  }
}
