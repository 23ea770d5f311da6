import { AppError } from './app-error';
import { ChatEntity, type ChatMessage, type TraceContext } from './chat.entity';

/** Request defaults and limits, taken from the vllm section of the configuration and web.max_prompt_chars. */
export interface ChatDefaults {
  readonly systemPrompt: string;
  readonly maxTokens: number;
  readonly temperature: number;
  readonly topP: number;
  readonly maxModelLen: number;
  /** Longest conversation accepted, in characters over all messages (web.max_prompt_chars). */
  readonly maxPromptChars: number;
}

/** The simple API's input, already type-checked by the web layer. */
export interface PromptInput {
  prompt: string;
  system_prompt?: string;
  request_id?: string;
  max_tokens?: number;
  temperature?: number;
  top_p?: number;
  /** From the request's headers, not its body. */
  trace?: TraceContext | null;
}

/** The /generate protocol: a prompt plus earlier turns as two parallel lists. */
export interface HistoryInput extends Omit<PromptInput, 'system_prompt'> {
  system_info?: string;
  history_input?: string[];
  history_output?: string[];
}

const HEX_BYTES = Array.from({ length: 256 }, (_, byte) => byte.toString(16).padStart(2, '0'));
/** Random bytes for ids, drawn from the system's generator a batch at a time. */
const idPool = new Uint8Array(8 * 256);
let idPoolAt = idPool.length;

/**
 * A fresh request id as vLLM makes one (its random_uuid(): 16 lowercase hex digits), so that
 * vLLM's ids (`chatcmpl-<id>`) look the same through tide-vllm as without it.
 */
export function newRequestId(): string {
  if (idPoolAt === idPool.length) {
    globalThis.crypto.getRandomValues(idPool);
    idPoolAt = 0;
  }
  let id = '';
  for (let i = idPoolAt; i < idPoolAt + 8; i += 1) id += HEX_BYTES[idPool[i]];
  idPoolAt += 8;
  return id;
}

/** Builds ChatEntity objects from user input, applying defaults and the model's limits. */
export class ChatFactory {
  constructor(
    private readonly defaults: ChatDefaults,
    private readonly newId: () => string = newRequestId,
  ) {}

  fromPrompt(input: PromptInput): ChatEntity {
    const system = input.system_prompt ?? this.defaults.systemPrompt;
    return this.build(input, this.withSystem(system, []));
  }

  fromHistory(input: HistoryInput): ChatEntity {
    const asked = input.history_input ?? [];
    const answered = input.history_output ?? [];
    if (asked.length !== answered.length) {
      throw AppError.invalid(
        `history_input and history_output must have the same length (got ${asked.length} and ${answered.length})`,
        'history_input',
      );
    }
    const turns = asked.flatMap((question, i): ChatMessage[] => [
      { role: 'user', content: question },
      { role: 'assistant', content: answered[i] },
    ]);
    return this.build(input, this.withSystem(input.system_info ?? this.defaults.systemPrompt, turns));
  }

  private withSystem(system: string, turns: ChatMessage[]): ChatMessage[] {
    // An empty system prompt means "none": vLLM would otherwise render an empty system turn.
    return system === '' ? turns : [{ role: 'system', content: system }, ...turns];
  }

  private build(input: PromptInput, history: ChatMessage[]): ChatEntity {
    if (typeof input.prompt !== 'string' || input.prompt.trim() === '') {
      throw AppError.invalid('prompt must contain text, not only whitespace', 'prompt');
    }
    const maxTokens = input.max_tokens ?? Math.min(this.defaults.maxTokens, this.defaults.maxModelLen);
    if (maxTokens > this.defaults.maxModelLen) {
      throw AppError.invalid(
        `max_tokens must be at most max_model_len (${this.defaults.maxModelLen}), got ${maxTokens}`,
        'max_tokens',
      );
    }
    const messages: ChatMessage[] = [...history, { role: 'user', content: input.prompt }];
    const chars = messages.reduce((sum, m) => sum + m.content.length, 0);
    if (chars > this.defaults.maxPromptChars) {
      throw promptTooLong(chars, messages.length > 1 ? ' (system prompt, history and prompt together)' : '', this.defaults.maxPromptChars, 'prompt');
    }
    return new ChatEntity(
      input.request_id ?? this.newId(),
      messages,
      {
        maxTokens,
        maxTokensDefaulted: input.max_tokens == null, // null is "the default" too
        temperature: input.temperature ?? this.defaults.temperature,
        topP: input.top_p ?? this.defaults.topP,
      },
      input.trace ?? null,
    );
  }
}

/** The refusal of a prompt over web.max_prompt_chars (`parts`: what was counted, when not the prompt alone). */
export function promptTooLong(chars: number, parts: string, limit: number, param?: string): AppError {
  return AppError.invalid(`the prompt is ${chars} characters long${parts}; at most ${limit} are accepted (web.max_prompt_chars)`, param);
}
