import { Module } from '@nestjs/common';
import { ConfigService } from '@nestjs/config';
import type { TideConfig } from '../config/config.schema';
import { ChatFactory } from '../domain/chat.factory';
import { InfrastructureModule } from '../infrastructure/infrastructure.module';
import { ChatHandler } from './chat.handler';

@Module({
  imports: [InfrastructureModule],
  providers: [
    {
      provide: ChatFactory,
      inject: [ConfigService],
      useFactory: (config: ConfigService<TideConfig, true>) => {
        const vllm = config.get('vllm', { infer: true });
        return new ChatFactory({
          maxPromptChars: config.get('web', { infer: true }).max_prompt_chars,
          systemPrompt: vllm.system_prompt,
          maxTokens: vllm.max_tokens,
          temperature: vllm.temperature,
          topP: vllm.top_p,
          maxModelLen: vllm.max_model_len,
        });
      },
    },
    ChatHandler,
  ],
  exports: [ChatHandler],
})
export class ApplicationModule {}
