/**
 * The simulator's deterministic tokenizer, chat template and text generator.
 *
 * One token per whitespace-separated word; every word after the first carries its leading space
 * (" world"), like a BPE tokenizer's space-prefixed pieces, and a piece is at most
 * MAX_CHARS_PER_TOKEN characters long (longer words make several). Word ids are a hash of the
 * piece, so they are the same in every run; the tokenizer remembers each id it produced so
 * /detokenize can map it back. A chat prompt costs its words plus a fixed overhead per message
 * (`<|im_start|>`, the role, `<|im_end|>`) plus two tokens for the generation prompt, so
 * prompt_tokens, /tokenize and the too-long check always agree.
 *
 * Generated text is placeholder text: the last user message's words, cycled.
 */

/** Qwen-like vocabulary size; word ids fall below the special tokens. */
export const VOCAB_SIZE = 151936;
const FIRST_SPECIAL_ID = 151643;
export const ENDOFTEXT_ID = 151643;
export const IM_START_ID = 151644;
export const IM_END_ID = 151645;
/** The end-of-sequence token ending a natural (finish_reason "stop") answer. */
export const EOS_TOKEN_ID = IM_END_ID;

/**
 * The longest piece (`tokenizer.max_chars_per_token`, the longest vocabulary entry): a longer word
 * is split. So a text longer than N × this many characters has more than N tokens, and vLLM's
 * pre-check refuses it before tokenizing (param `input_text`).
 */
export const MAX_CHARS_PER_TOKEN = 128;

/** Tokens a chat message costs besides its words: `<|im_start|>`, `role\n`, `<|im_end|>`. */
export const MESSAGE_OVERHEAD_TOKENS = 3;
/** Tokens of the generation prompt `<|im_start|>assistant\n`. */
export const GENERATION_PROMPT_TOKENS = 2;

/** Answer used when the source text has no words at all. */
const PLACEHOLDER_ANSWER = 'This is placeholder text from the vLLM simulator.';

const SPECIAL_TEXT = new Map<number, string>([
  [ENDOFTEXT_ID, '<|endoftext|>'],
  [IM_START_ID, '<|im_start|>'],
  [IM_END_ID, '<|im_end|>'],
]);

/** A chat message as the OpenAI API carries it; content may be text parts. */
export interface ChatMessage {
  role: string;
  content?: unknown;
}

/** 32-bit FNV-1a, so ids are stable across runs and machines. */
function fnv1a(text: string): number {
  let hash = 0x811c9dc5;
  for (const byte of Buffer.from(text, 'utf8')) {
    hash ^= byte;
    hash = Math.imul(hash, 0x01000193) >>> 0;
  }
  return hash;
}

/**
 * Splits text into word pieces: `"Hello  big world"` → `["Hello", " big", " world"]`; a piece
 * longer than MAX_CHARS_PER_TOKEN is cut into pieces of that length.
 */
export function wordPieces(text: string): string[] {
  const pieces: string[] = [];
  for (const [i, word] of (text.match(/\S+/g) ?? []).entries()) {
    const piece = i === 0 ? word : ` ${word}`;
    for (let at = 0; at < piece.length; at += MAX_CHARS_PER_TOKEN) {
      pieces.push(piece.slice(at, at + MAX_CHARS_PER_TOKEN));
    }
  }
  return pieces;
}

/** The text of a message's content: a string, or the `text` parts joined by newlines. */
export function contentText(content: unknown): string {
  if (typeof content === 'string') return content;
  if (Array.isArray(content)) {
    return content
      .filter((p): p is { text: string } => typeof p?.text === 'string')
      .map((p) => p.text)
      .join('\n');
  }
  return '';
}

export class SimTokenizer {
  private readonly pieces = new Map<number, string>();

  /** The id of one piece; remembered so decode() can map it back. */
  pieceId(piece: string): number {
    const id = fnv1a(piece) % FIRST_SPECIAL_ID;
    this.pieces.set(id, piece);
    return id;
  }

  encode(text: string): number[] {
    return wordPieces(text).map((p) => this.pieceId(p));
  }

  /**
   * The chat template's text, what vLLM's pre-check measures: `<|im_start|>role\ncontent<|im_end|>\n`
   * per message, then `<|im_start|>assistant\n`. encodeChat() gives its tokens.
   */
  renderChat(messages: readonly ChatMessage[], addGenerationPrompt = true): string {
    let text = '';
    for (const message of messages) {
      text += `<|im_start|>${message.role}\n${contentText(message.content)}<|im_end|>\n`;
    }
    return addGenerationPrompt ? `${text}<|im_start|>assistant\n` : text;
  }

  /** The chat template: `<|im_start|>role\n content <|im_end|>` per message, then the prompt. */
  encodeChat(messages: readonly ChatMessage[], addGenerationPrompt = true): number[] {
    const ids: number[] = [];
    for (const message of messages) {
      ids.push(IM_START_ID, this.pieceId(`${message.role}\n`));
      ids.push(...this.encode(contentText(message.content)), IM_END_ID);
    }
    if (addGenerationPrompt) ids.push(IM_START_ID, this.pieceId('assistant\n'));
    return ids;
  }

  /** The piece text of one id; ids this process never produced read `<|tok_N|>`. */
  pieceText(id: number): string {
    return SPECIAL_TEXT.get(id) ?? this.pieces.get(id) ?? `<|tok_${id}|>`;
  }

  decode(ids: readonly number[], skipSpecialTokens = false): string {
    return ids
      .filter((id) => !(skipSpecialTokens && SPECIAL_TEXT.has(id)))
      .map((id) => this.pieceText(id))
      .join('');
  }
}

/** What the simulated model answers: the pieces to emit and why it stops. */
export interface OutputPlan {
  /** Text of each emitted token; the end-of-sequence token's text is "". */
  texts: string[];
  tokenIds: number[];
  finishReason: 'stop' | 'length';
}

/**
 * Plans the answer to `sourceText`: its words cycled, one token each. A natural answer is all the
 * words and then the EOS token (finish_reason "stop", the EOS counted as a completion token, as
 * vLLM counts it); `maxTokens` cuts it short with finish_reason "length". `ignoreEos` keeps
 * cycling the words until `maxTokens`.
 */
export function planOutput(
  tokenizer: SimTokenizer,
  sourceText: string,
  maxTokens: number,
  ignoreEos = false,
): OutputPlan {
  const words = (sourceText.match(/\S+/g) ?? PLACEHOLDER_ANSWER.split(' ')) as string[];
  const naturalLength = ignoreEos ? Infinity : words.length + 1;
  const count = Math.min(naturalLength, maxTokens);
  const texts: string[] = [];
  const tokenIds: number[] = [];
  for (let i = 0; i < count; i += 1) {
    if (i === words.length && !ignoreEos) {
      texts.push('');
      tokenIds.push(EOS_TOKEN_ID);
      continue;
    }
    const piece = i === 0 ? words[0] : ` ${words[i % words.length]}`;
    texts.push(piece);
    tokenIds.push(tokenizer.pieceId(piece));
  }
  return { texts, tokenIds, finishReason: count < naturalLength ? 'length' : 'stop' };
}
