import * as fc from 'fast-check';
import { plainContent } from './vllm-chat.repository';

/** A content delta exactly as vLLM frames it (A5). */
function delta(content: string): string {
  return `{"id":"chatcmpl-x","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"content":${JSON.stringify(content)}},"logprobs":null,"finish_reason":null,"token_ids":null}]}`;
}

describe('plainContent (the fast path for content deltas)', () => {
  it('reads the text of an ordinary delta, escapes and all', () => {
    expect(plainContent(delta(' Paris'))).toBe(' Paris');
    expect(plainContent(delta('a "quoted" \\ back\nslash\t😀'))).toBe('a "quoted" \\ back\nslash\t😀');
    expect(plainContent(delta(''))).toBe('');
  });

  it('agrees with JSON.parse for any text', () => {
    fc.assert(
      fc.property(fc.string({ unit: 'binary' }), (text) => {
        const data = delta(text);
        expect(plainContent(data)).toBe((JSON.parse(data) as { choices: Array<{ delta: { content: string } }> }).choices[0].delta.content);
      }),
    );
  });

  it('declines everything that is not a lone content delta, so it is parsed in full', () => {
    const finish = delta('x').replace('"finish_reason":null', '"finish_reason":"stop"');
    const role = delta('').replace('"delta":{"content":""}', '"delta":{"role":"assistant","content":""}');
    const reasoning = delta('x').replace('"content":"x"}', '"content":"x","reasoning":null}');
    const twoChoices = delta('a').replace(']}', ',{"index":1,"delta":{"content":"b"},"finish_reason":null}]}');
    const usage = delta('a').replace(']}', '],"usage":{"prompt_tokens":1}}');
    for (const data of [finish, role, reasoning, twoChoices, usage, '{"error": {"message": "x"}}']) {
      expect(plainContent(data)).toBeNull();
    }
  });
});
