import { Module } from '@nestjs/common';
import { ConfigService } from '@nestjs/config';
import type { AuthConfig, TideConfig, VllmConfig } from '../config/config.schema';
import { CHAT_REPOSITORY } from '../domain/chat.repository';
import { VLLMChatRepository } from './vllm-chat.repository';
import { type GatewaySecrets, VLLMServerManager } from './vllm-server.manager';
import { idleConnectionMs, VLLMClient } from './vllm.client';
import { VLLMRelay } from './vllm.relay';

/** Where tide-vllm connects to reach vLLM: a wildcard bind address is reached over loopback. */
export function vllmBaseUrl(vllm: Pick<VllmConfig, 'host' | 'port'>): string {
  const host = vllm.host === '0.0.0.0' ? '127.0.0.1' : vllm.host === '::' ? '::1' : vllm.host;
  return `http://${host.includes(':') ? `[${host}]` : host}:${vllm.port}`;
}

/**
 * Any key at all (API or admin): vLLM then gets a per-start key of its own, so its /v1 routes are
 * no side door. vLLM guards only /v1, /v2, /inference and /cohere with it (A4): the loopback
 * bind keeps the others (/invocations, /tokenize, /sleep, /collective_rpc…) from the network.
 */
function gatewaySecrets(auth: AuthConfig): GatewaySecrets {
  return { keys: [...auth.api_keys, ...auth.admin_api_keys], variables: auth.keyVariables ?? [] };
}

@Module({
  providers: [
    {
      provide: VLLMClient,
      inject: [ConfigService],
      useFactory: (config: ConfigService<TideConfig, true>) => {
        const vllm = config.get('vllm', { infer: true });
        return new VLLMClient(vllmBaseUrl(vllm), vllm.timeout * 1000, idleConnectionMs(vllm.env));
      },
    },
    {
      provide: VLLMRelay,
      inject: [ConfigService, VLLMClient],
      useFactory: (config: ConfigService<TideConfig, true>, client: VLLMClient) => {
        const vllm = config.get('vllm', { infer: true });
        return new VLLMRelay(vllmBaseUrl(vllm), vllm.timeout * 1000, () => client.apiKey, idleConnectionMs(vllm.env));
      },
    },
    {
      provide: VLLMServerManager,
      inject: [ConfigService, VLLMClient],
      useFactory: (config: ConfigService<TideConfig, true>, client: VLLMClient) =>
        new VLLMServerManager(config.get('vllm', { infer: true }), client, gatewaySecrets(config.get('auth', { infer: true }))),
    },
    {
      provide: CHAT_REPOSITORY,
      inject: [ConfigService, VLLMClient, VLLMRelay, VLLMServerManager],
      useFactory: (config: ConfigService<TideConfig, true>, client: VLLMClient, relay: VLLMRelay, manager: VLLMServerManager) =>
        new VLLMChatRepository(client, relay, manager, config.get('vllm', { infer: true }).model_name),
    },
  ],
  exports: [VLLMClient, VLLMRelay, VLLMServerManager, CHAT_REPOSITORY],
})
export class InfrastructureModule {}
