import { Inject, Injectable } from '@nestjs/common';
import type { ChatCompletion } from '../domain/chat.entity';
import { ChatFactory, type HistoryInput, type PromptInput } from '../domain/chat.factory';
import { CHAT_REPOSITORY, type ChatRepository, type ChatSink } from '../domain/chat.repository';

export interface ChatReply extends ChatCompletion {
  requestId: string;
}

export interface ChatStream {
  requestId: string;
  /** Starts the answer, delivered to `sink` as it arrives. */
  pipe(sink: ChatSink): void;
}

/** The chat use cases: answer a prompt (or a /generate conversation) whole or as a stream. */
@Injectable()
export class ChatHandler {
  constructor(
    private readonly factory: ChatFactory,
    @Inject(CHAT_REPOSITORY) private readonly repository: ChatRepository,
  ) {}

  async complete(input: PromptInput, signal: AbortSignal): Promise<ChatReply> {
    const chat = this.factory.fromPrompt(input);
    return { requestId: chat.requestId, ...(await this.repository.complete(chat, signal)) };
  }

  /** Input errors throw here, before any byte of the stream is sent. */
  stream(input: PromptInput, signal: AbortSignal): ChatStream {
    const chat = this.factory.fromPrompt(input);
    return { requestId: chat.requestId, pipe: (sink) => this.repository.stream(chat, signal, sink) };
  }

  async generate(input: HistoryInput, signal: AbortSignal): Promise<ChatReply> {
    const chat = this.factory.fromHistory(input);
    return { requestId: chat.requestId, ...(await this.repository.complete(chat, signal)) };
  }

  generateStream(input: HistoryInput, signal: AbortSignal): ChatStream {
    const chat = this.factory.fromHistory(input);
    return { requestId: chat.requestId, pipe: (sink) => this.repository.stream(chat, signal, sink) };
  }
}
