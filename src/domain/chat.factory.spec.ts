import * as fc from 'fast-check';
import { AppError } from './app-error';
import { ChatFactory, type ChatDefaults } from './chat.factory';

const defaults: ChatDefaults = {
  systemPrompt: 'Be helpful.',
  maxTokens: 2048,
  temperature: 0.7,
  topP: 0.9,
  maxModelLen: 4096,
  maxPromptChars: 100,
};

function expectInvalid(fn: () => unknown, param: string): void {
  try {
    fn();
  } catch (err) {
    expect(err).toBeInstanceOf(AppError);
    expect((err as AppError).code).toBe('INVALID_REQUEST');
    expect((err as AppError).param).toBe(param);
    return;
  }
  throw new Error('expected an INVALID_REQUEST error');
}

describe('ChatFactory', () => {
  const factory = new ChatFactory(defaults, () => 'generated-id');

  it('puts the system prompt first and the prompt last, with config defaults', () => {
    const chat = factory.fromPrompt({ prompt: 'Hi there' });
    expect(chat.requestId).toBe('generated-id');
    expect(chat.messages).toEqual([
      { role: 'system', content: 'Be helpful.' },
      { role: 'user', content: 'Hi there' },
    ]);
    expect(chat.params).toEqual({ maxTokens: 2048, maxTokensDefaulted: true, temperature: 0.7, topP: 0.9 });
  });

  it('takes a null max_tokens as none given: the default, which a long prompt may make way for', () => {
    const chat = factory.fromPrompt({ prompt: 'Hi', max_tokens: null as unknown as undefined });
    expect(chat.params).toMatchObject({ maxTokens: 2048, maxTokensDefaulted: true });
  });

  it('counts the system prompt and the history into web.max_prompt_chars, and says so', () => {
    const prompt = 'x'.repeat(95); // 95 + the 11 of 'Be helpful.' > 100
    expect(() => factory.fromPrompt({ prompt })).toThrow(
      'the prompt is 106 characters long (system prompt, history and prompt together); at most 100 are accepted (web.max_prompt_chars)',
    );
    expect(() => factory.fromPrompt({ prompt, system_prompt: '' })).not.toThrow();
    expect(() => factory.fromPrompt({ prompt: 'x'.repeat(101), system_prompt: '' })).toThrow('the prompt is 101 characters long; at most 100');
  });

  it('lets the request override every default', () => {
    const chat = factory.fromPrompt({
      prompt: 'x',
      system_prompt: 'Terse.',
      request_id: 'r-1',
      max_tokens: 5,
      temperature: 0,
      top_p: 1,
    });
    expect(chat.requestId).toBe('r-1');
    expect(chat.messages[0]).toEqual({ role: 'system', content: 'Terse.' });
    expect(chat.params).toEqual({ maxTokens: 5, maxTokensDefaulted: false, temperature: 0, topP: 1 });
  });

  it('omits the system message when system_prompt is the empty string', () => {
    expect(factory.fromPrompt({ prompt: 'x', system_prompt: '' }).messages).toEqual([
      { role: 'user', content: 'x' },
    ]);
  });

  it('rejects an empty or blank prompt', () => {
    expectInvalid(() => factory.fromPrompt({ prompt: '' }), 'prompt');
    expectInvalid(() => factory.fromPrompt({ prompt: ' \n\t' }), 'prompt');
  });

  it('rejects max_tokens above max_model_len and caps the default at it', () => {
    expectInvalid(() => factory.fromPrompt({ prompt: 'x', max_tokens: 4097 }), 'max_tokens');
    const small = new ChatFactory({ ...defaults, maxModelLen: 100 });
    expect(small.fromPrompt({ prompt: 'x' }).params.maxTokens).toBe(100);
  });

  it('rejects a conversation longer than max_prompt_chars, counting every message', () => {
    expectInvalid(() => factory.fromPrompt({ prompt: 'x'.repeat(101), system_prompt: '' }), 'prompt');
    expectInvalid(() => factory.fromPrompt({ prompt: 'x'.repeat(95) }), 'prompt'); // + 11 of the system prompt
    expect(factory.fromPrompt({ prompt: 'x'.repeat(100), system_prompt: '' }).messages).toHaveLength(1);
  });

  it('generates a fresh id per request by default, as vLLM makes them (16 lowercase hex digits)', () => {
    const real = new ChatFactory(defaults);
    // More than one batch of the id pool: every id well-formed, none repeated.
    const ids = Array.from({ length: 600 }, () => real.fromPrompt({ prompt: 'x' }).requestId);
    for (const id of ids) expect(id).toMatch(/^[0-9a-f]{16}$/);
    expect(new Set(ids).size).toBe(ids.length);
  });

  describe('fromHistory (/generate)', () => {
    it('interleaves history pairs in order between system_info and the prompt', () => {
      const chat = factory.fromHistory({
        prompt: 'third',
        system_info: 'sys',
        history_input: ['first', 'second'],
        history_output: ['one', 'two'],
      });
      expect(chat.messages).toEqual([
        { role: 'system', content: 'sys' },
        { role: 'user', content: 'first' },
        { role: 'assistant', content: 'one' },
        { role: 'user', content: 'second' },
        { role: 'assistant', content: 'two' },
        { role: 'user', content: 'third' },
      ]);
    });

    it('rejects history lists of different lengths', () => {
      expectInvalid(
        () => factory.fromHistory({ prompt: 'x', history_input: ['a'], history_output: [] }),
        'history_input',
      );
    });

    it('always yields 2n+2 messages ending with the prompt for n history pairs', () => {
      const roomy = new ChatFactory({ ...defaults, maxPromptChars: 1_000_000 });
      fc.assert(
        fc.property(fc.array(fc.tuple(fc.string(), fc.string()), { maxLength: 20 }), fc.string({ minLength: 1 }).filter((s) => s.trim() !== ''), (pairs, prompt) => {
          const chat = roomy.fromHistory({
            prompt,
            history_input: pairs.map((p) => p[0]),
            history_output: pairs.map((p) => p[1]),
          });
          expect(chat.messages).toHaveLength(2 * pairs.length + 2);
          expect(chat.messages[chat.messages.length - 1]).toEqual({ role: 'user', content: prompt });
        }),
      );
    });
  });
});
