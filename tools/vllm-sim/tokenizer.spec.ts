import {
  EOS_TOKEN_ID,
  GENERATION_PROMPT_TOKENS,
  MAX_CHARS_PER_TOKEN,
  MESSAGE_OVERHEAD_TOKENS,
  SimTokenizer,
  planOutput,
  wordPieces,
} from './tokenizer';

describe('vllm-sim tokenizer', () => {
  it('makes one token per word, later words carrying their leading space', () => {
    expect(wordPieces('Hello  big\nworld')).toEqual(['Hello', ' big', ' world']);
  });

  it('cuts a word longer than max_chars_per_token into pieces no longer than that', () => {
    const long = 'y'.repeat(MAX_CHARS_PER_TOKEN * 2);
    const pieces = wordPieces(`a ${long}`);
    expect(pieces.map((p) => p.length)).toEqual([1, MAX_CHARS_PER_TOKEN, MAX_CHARS_PER_TOKEN, 1]);
    expect(pieces.join('')).toBe(`a ${long}`);
    const t = new SimTokenizer();
    expect(t.decode(t.encode(`a ${long}`))).toBe(`a ${long}`);
  });

  it('gives the same ids in every instance and decodes them back', () => {
    const a = new SimTokenizer();
    const b = new SimTokenizer();
    const ids = a.encode('the quick fox');
    expect(b.encode('the quick fox')).toEqual(ids);
    expect(a.decode(ids)).toBe('the quick fox');
  });

  it('counts a chat prompt as words plus a fixed overhead per message and for the generation prompt', () => {
    const t = new SimTokenizer();
    const ids = t.encodeChat([
      { role: 'system', content: 'be brief' },
      { role: 'user', content: [{ type: 'text', text: 'hi there you' }] },
    ]);
    expect(ids).toHaveLength(2 + 3 + 2 * MESSAGE_OVERHEAD_TOKENS + GENERATION_PROMPT_TOKENS);
    expect(t.decode(ids)).toBe(
      '<|im_start|>system\nbe brief<|im_end|><|im_start|>user\nhi there you<|im_end|><|im_start|>assistant\n',
    );
  });
});

describe('vllm-sim output plan', () => {
  const t = new SimTokenizer();

  it('answers with the words and then EOS, finishing with stop', () => {
    const plan = planOutput(t, 'one two three', 100);
    expect(plan.texts).toEqual(['one', ' two', ' three', '']);
    expect(plan.tokenIds[3]).toBe(EOS_TOKEN_ID);
    expect(plan.finishReason).toBe('stop');
  });

  it('cuts the answer at max_tokens with finish_reason length', () => {
    const plan = planOutput(t, 'one two three', 2);
    expect(plan.texts).toEqual(['one', ' two']);
    expect(plan.finishReason).toBe('length');
  });

  it('treats max_tokens equal to the word count as length (EOS never sampled)', () => {
    expect(planOutput(t, 'one two three', 3).finishReason).toBe('length');
  });

  it('cycles the words until max_tokens with ignore_eos', () => {
    const plan = planOutput(t, 'a b', 5, true);
    expect(plan.texts.join('')).toBe('a b a b a');
    expect(plan.finishReason).toBe('length');
  });

  it('falls back to placeholder text for an empty source', () => {
    expect(planOutput(t, '   ', 100).texts.join('')).toContain('placeholder');
  });
});
