import { AppError } from '../domain/app-error';
import type { ChatCompletion, ChatDelta, ChatEntity } from '../domain/chat.entity';
import { ChatFactory } from '../domain/chat.factory';
import type { ChatRepository, ChatSink } from '../domain/chat.repository';
import { ChatHandler } from './chat.handler';

/** Records what it was asked and answers like a tiny model: the last user message, reversed. */
class RecordingRepository implements ChatRepository {
  readonly seen: ChatEntity[] = [];

  async complete(chat: ChatEntity): Promise<ChatCompletion> {
    this.seen.push(chat);
    const last = chat.messages[chat.messages.length - 1].content;
    return {
      content: [...last].reverse().join(''),
      model: 'm',
      usage: { prompt_tokens: last.length, completion_tokens: last.length, total_tokens: 2 * last.length },
      finishReason: 'stop',
    };
  }

  stream(chat: ChatEntity, _signal: AbortSignal, sink: ChatSink): void {
    this.seen.push(chat);
    for (const ch of chat.messages[chat.messages.length - 1].content) {
      sink.write({ content: ch, finishReason: null, usage: null, model: 'm' });
    }
    sink.write({ content: '', finishReason: 'stop', usage: null, model: 'm' });
    sink.end();
  }
}

const defaults = { systemPrompt: 'sys', maxTokens: 16, temperature: 0.7, topP: 0.9, maxModelLen: 64, maxPromptChars: 1000 };

describe('ChatHandler', () => {
  let repository: RecordingRepository;
  let handler: ChatHandler;
  const signal = new AbortController().signal;

  beforeEach(() => {
    repository = new RecordingRepository();
    handler = new ChatHandler(new ChatFactory(defaults, () => 'rid'), repository);
  });

  it('answers a prompt with the repository result and the request id', async () => {
    const reply = await handler.complete({ prompt: 'abc' }, signal);
    expect(reply).toEqual({
      requestId: 'rid',
      content: 'cba',
      model: 'm',
      usage: { prompt_tokens: 3, completion_tokens: 3, total_tokens: 6 },
      finishReason: 'stop',
    });
    expect(repository.seen[0].messages.map((m) => m.role)).toEqual(['system', 'user']);
  });

  it('rejects invalid input before calling the repository', async () => {
    await expect(handler.complete({ prompt: 'x', max_tokens: 65 }, signal)).rejects.toBeInstanceOf(AppError);
    expect(() => handler.stream({ prompt: '' }, signal)).toThrow(AppError);
    expect(repository.seen).toHaveLength(0);
  });

  it('streams the deltas of the repository in order', async () => {
    const { requestId, pipe } = handler.stream({ prompt: 'hey', request_id: 'mine' }, signal);
    expect(repository.seen).toHaveLength(0); // nothing is asked of the model until the answer is piped
    const parts: string[] = [];
    let ended = false;
    pipe({ write: (d: ChatDelta) => parts.push(d.content) > 0, onDrain: () => undefined, end: () => (ended = true), fail: (e) => { throw e; } });
    expect(requestId).toBe('mine');
    expect([parts.join(''), ended]).toEqual(['hey', true]);
  });

  it('builds /generate conversations from history', async () => {
    await handler.generate({ prompt: 'q2', history_input: ['q1'], history_output: ['a1'], system_info: 's' }, signal);
    expect(repository.seen[0].messages.map((m) => `${m.role}:${m.content}`)).toEqual(['system:s', 'user:q1', 'assistant:a1', 'user:q2']);
  });
});
