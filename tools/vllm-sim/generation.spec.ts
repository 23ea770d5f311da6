import { parseCli } from './cli';
import type { SimContext } from './context';
import { prepareGeneration } from './generation';
import type { ApiError } from './protocol';
import { MAX_CHARS_PER_TOKEN, SimTokenizer } from './tokenizer';

/** Just what request validation reads: the args, the tokenizer, LoRAs and whether the engine is dead. */
function context(maxModelLen: number): SimContext {
  const outcome = parseCli(['serve', 'sim-model', '--max-model-len', String(maxModelLen)]);
  if (outcome.kind !== 'serve') throw new Error(outcome.stderr);
  return {
    args: outcome.args,
    tokenizer: new SimTokenizer(),
    loras: new Map(),
    engine: { dead: false },
  } as unknown as SimContext;
}

function refusal(ctx: SimContext, kind: 'chat' | 'completion', body: Record<string, unknown>): ApiError {
  try {
    prepareGeneration(ctx, kind, body, undefined);
  } catch (error) {
    return error as ApiError;
  }
  throw new Error('the request was accepted');
}

describe('vllm-sim generation request checks', () => {
  it('refuses a text over max_input_tokens × max_chars_per_token characters before tokenizing it (input_text)', () => {
    const ctx = context(64);
    const encode = jest.spyOn(ctx.tokenizer, 'encode');
    // max_input_tokens = 64 - 60 = 4: at most 512 characters; one long word is refused by its length.
    const prompt = 'x'.repeat(4 * MAX_CHARS_PER_TOKEN + 1);
    const error = refusal(ctx, 'completion', { prompt, max_tokens: 60 });
    expect(error.body()).toEqual({
      error: {
        message:
          "This model's maximum context length is 64 tokens. However, you requested 60 output tokens and your " +
          'prompt contains 513 characters (more than 512 characters, which is the upper bound for 4 input tokens). ' +
          'Please reduce the length of the input prompt or the number of requested output tokens. ' +
          '(parameter=input_text, value=513)',
        type: 'BadRequestError',
        param: 'input_text',
        code: 400,
      },
    });
    expect(encode).not.toHaveBeenCalled();
  });

  it('measures a chat by its rendered template, counts characters like Python, and skips token-id prompts', () => {
    const ctx = context(64);
    const encodeChat = jest.spyOn(ctx.tokenizer, 'encodeChat');
    // 4 input tokens allowed (512 characters); the template alone adds 50 characters to the content.
    const messages = [{ role: 'user', content: '😀'.repeat(470) }];
    expect(ctx.tokenizer.renderChat(messages).length - 2 * 470).toBe(50);
    const error = refusal(ctx, 'chat', { messages, max_tokens: 60 });
    expect([error.param, error.message]).toEqual(['input_text', expect.stringContaining('contains 520 characters (more than 512')]);
    expect(encodeChat).not.toHaveBeenCalled();
    // Token ids have no text: only their count is checked.
    const tokens = refusal(ctx, 'completion', { prompt: [1, 2, 3, 4, 5], max_tokens: 60 });
    expect(tokens.param).toBe('input_tokens');
  });

  it('a text within the character bound is tokenized and checked by its token count (input_tokens)', () => {
    const ctx = context(64);
    const error = refusal(ctx, 'completion', { prompt: 'a b c d e', max_tokens: 60 });
    expect(error.body()).toEqual({
      error: {
        message:
          "This model's maximum context length is 64 tokens. However, you requested 60 output tokens and your " +
          'prompt contains 5 input tokens, for a total of 65 tokens. Please reduce the length of the input prompt or ' +
          'the number of requested output tokens. (parameter=input_tokens, value=5)',
        type: 'BadRequestError',
        param: 'input_tokens',
        code: 400,
      },
    });
    // A word as long as the bound allows is several tokens, never fewer than its characters imply.
    expect(ctx.tokenizer.encode('x'.repeat(4 * MAX_CHARS_PER_TOKEN))).toHaveLength(4);
    expect(prepareGeneration(ctx, 'completion', { prompt: 'x'.repeat(4 * MAX_CHARS_PER_TOKEN), max_tokens: 60 }, undefined).prompts[0].tokenIds).toHaveLength(4);
  });

  it('n is at least 1, refused like its upper bound: no parameter (param null, no suffix)', () => {
    const ctx = context(64);
    expect(refusal(ctx, 'completion', { prompt: 'hi', max_tokens: 1, n: 0 }).body()).toEqual({
      error: { message: 'n must be at least 1, got 0.', type: 'BadRequestError', param: null, code: 400 },
    });
  });

  it('n is at most VLLM_MAX_N_SEQUENCES (16384 by default)', () => {
    const ctx = context(64);
    const body = { prompt: 'hi', max_tokens: 1, n: 16385 };
    expect(refusal(ctx, 'completion', body).body()).toEqual({
      error: {
        message: 'n must be at most 16384, got 16385. To increase this limit, set the VLLM_MAX_N_SEQUENCES environment variable.',
        type: 'BadRequestError',
        param: null,
        code: 400,
      },
    });
    expect(prepareGeneration(ctx, 'completion', { ...body, n: 16384 }, undefined).n).toBe(16384);
    process.env.VLLM_MAX_N_SEQUENCES = '4';
    try {
      expect(refusal(ctx, 'completion', { ...body, n: 5 }).message).toMatch(/^n must be at most 4, got 5\./);
    } finally {
      delete process.env.VLLM_MAX_N_SEQUENCES;
    }
  });
});
