/**
 * SGLang's pooling routes: POST /v1/embeddings (serving_embedding.py), /v1/classify
 * (serving_classify.py), /v1/rerank (serving_rerank.py), /v1/score (serving_score.py and the
 * TokenizerManager's score mixin) and the native /encode and /classify (http_server.py).
 *
 * What decides the answer is the model kind (`--is-embedding`, TokenizerManager.is_generation):
 * - a generation model (the default) refuses every EmbeddingReqInput in _validate_one_request
 *   ("This model does not appear to be an embedding model by default. ..."), so /v1/embeddings,
 *   /v1/classify, /v1/rerank (its cross-encoder path) answer the flat 400 "BadRequestError" and
 *   /encode the native 400; /v1/score works (label_token_ids' next-token probabilities);
 * - an embedding model answers them all (and /v1/score with each item's embedding).
 *
 * The simulated embedding of a prompt is derived from a hash of its token ids: deterministic,
 * EMBEDDING_DIM float32 values, L2-normalized. Pooled requests go through the scheduler child as a
 * one-step prefill, so they queue, count in /get_load and drain on SIGTERM like generations.
 */
import { createHash } from 'node:crypto';
import type { IncomingMessage, ServerResponse } from 'node:http';
import { coerceFields, sendJson, type FieldKind } from '../fastapi';
import { PyRaw, pyRepr } from '../python-format';
import { ENDOFTEXT_ID } from '../tokenizer';
import type { InflightRequest, SglContext } from './context';
import { checkLength, parseSglBody, randomHex, requireSglObject } from './generation';
import {
  ClassifyData,
  NOT_AN_EMBEDDING_MODEL,
  NativeError,
  PydanticEntry,
  classifyResponse,
  embeddingMetaInfo,
  embeddingResponse,
  httpException,
  requestValidationError,
  rerankItem,
  scoringResponse,
  servingError,
} from './protocol';

/** The simulated model's hidden size (Qwen3-0.6B), the length of every embedding. */
export const EMBEDDING_DIM = 1024;
/** `tokenizer.vocab_size` (the HF tokenizer's base vocabulary, special tokens excluded). */
const TOKENIZER_VOCAB_SIZE = ENDOFTEXT_ID;
/** protocol.py DEFAULT_MODEL_NAME: the `model` of a request that names none. */
const DEFAULT_MODEL_NAME = 'default';
/** A PretrainedConfig's default id2label (num_labels 2), what OpenAIServingClassify reads. */
const ID2LABEL = ['LABEL_0', 'LABEL_1'];

// ---------------------------------------------------------------------------------------------
// The simulated model

/** xorshift128 seeded from a sha256 of `key`: the same key always gives the same numbers. */
function seededUniform(key: string): () => number {
  const seed = createHash('sha256').update(key).digest();
  let [a, b, c, d] = [0, 4, 8, 12].map((o) => seed.readUInt32LE(o) || 1);
  return () => {
    const t = a ^ (a << 11);
    [a, b, c] = [b, c, d];
    d = (d ^ (d >>> 19) ^ (t ^ (t >>> 8))) >>> 0;
    return d / 0x100000000;
  };
}

/** The embedding of a prompt (its token ids): EMBEDDING_DIM float32 values, unit L2 norm. */
export function simEmbedding(tokenIds: readonly number[]): number[] {
  const next = seededUniform(`embedding:${tokenIds.join(',')}`);
  const raw = Array.from({ length: EMBEDDING_DIM }, () => next() * 2 - 1);
  const norm = Math.sqrt(raw.reduce((sum, x) => sum + x * x, 0)) || 1;
  return raw.map((x) => Math.fround(x / norm));
}

/**
 * The next-token probability of each label after a prompt: deterministic, each in (0, 1), their
 * sum below 1 (the rest of the vocabulary keeps some mass), as exp(logprob) gives them.
 */
export function simLabelProbs(tokenIds: readonly number[], labels: readonly number[]): number[] {
  const weights = labels.map((label) => 0.05 + seededUniform(`label:${label}:${tokenIds.join(',')}`)());
  const total = weights.reduce((sum, w) => sum + w, 1);
  return weights.map((w) => w / total);
}

function softmax(values: readonly number[]): number[] {
  const max = Math.max(...values);
  const exps = values.map((v) => Math.exp(v - max));
  const sum = exps.reduce((s, e) => s + e, 0);
  return exps.map((e) => e / sum);
}

// ---------------------------------------------------------------------------------------------
// The scheduler's side: a one-step prefill per prompt

let prefillSeq = 0;

export interface Prefilled {
  /** The rid of each prompt's output (`meta_info.id`). */
  rids: string[];
  e2eLatency: number;
}

/**
 * Runs the prompts (their token counts) through the scheduler child as one request `rid`: each a
 * prefill that ends after one step. Resolves when all are done; rejects with SGLang's
 * HTTPException when the scheduler aborts one (a full queue: 503). A client that leaves aborts
 * them; a dead scheduler never answers (SGLang's TokenizerManager waits too).
 */
export function runPrefill(ctx: SglContext, res: ServerResponse, rid: string, prompts: number[]): Promise<Prefilled> {
  ctx.ensureHandleLoop();
  const arrivedAt = Date.now();
  const total = prompts.reduce((sum, n) => sum + n, 0);
  const state: InflightRequest = { rid, promptTokens: total, emitted: 0, started: false };
  const ids = prompts.map(() => `${rid}#prefill${(prefillSeq += 1)}`);
  const rids = prompts.length === 1 ? [rid] : prompts.map(() => randomHex());
  ctx.inflight.set(rid, state);
  return new Promise((resolve, reject) => {
    let pending = prompts.length;
    let ended = false;
    const end = (): void => {
      ended = true;
      ctx.inflight.delete(rid);
      res.off('close', onClose);
    };
    const onClose = (): void => {
      if (ended) return;
      end();
      ctx.metrics.recordAborted();
      ctx.engine.abort(ids);
      if (ctx.args.logRequests) ctx.log.info(`Abort request ${rid}`);
    };
    res.on('close', onClose);
    prompts.forEach((promptTokens, i) => {
      ctx.engine.add(
        { type: 'add', id: ids[i], numTokens: 1, finishReason: 'length', promptTokens },
        {
          onStarted: () => {
            if (state.started) return;
            state.started = true;
            ctx.metrics.recordQueueTime((Date.now() - arrivedAt) / 1000);
          },
          onToken: () => {
            ctx.lastReceive = Date.now();
          },
          onFinished: (reason, error) => {
            ctx.lastReceive = Date.now();
            if (ended) return;
            if (reason === 'abort') {
              end();
              ctx.engine.abort(ids.filter((id) => id !== ids[i]));
              ctx.metrics.recordAborted();
              reject(httpException(error?.status ?? 500, error?.message ?? 'Generation aborted.'));
              return;
            }
            pending -= 1;
            if (pending > 0) return;
            end();
            const e2eLatency = (Date.now() - arrivedAt) / 1000;
            ctx.metrics.recordFinished(total, 0, e2eLatency);
            resolve({ rids, e2eLatency });
          },
          onEngineDead: () => undefined,
        },
      );
    });
  });
}

/**
 * TokenizerManager._validate_one_request for one EmbeddingReqInput prompt, in its order: the
 * length, then the model kind, then Matryoshka `dimensions` (the simulated model has none).
 */
function validateEmbeddingPrompt(ctx: SglContext, tokens: number, dimensions: unknown): void {
  try {
    checkLength(ctx, tokens, null);
  } catch (error) {
    throw servingError((error as Error).message);
  }
  if (!ctx.args.isEmbedding) throw servingError(NOT_AN_EMBEDDING_MODEL);
  if (dimensions !== undefined && dimensions !== null) {
    throw servingError(
      `Model '${ctx.args.modelPath}' does not support matryoshka representation, changing output dimensions will lead to poor results.`,
    );
  }
}

function validateFields(body: Record<string, unknown>, fields: Record<string, FieldKind>, required: string[]): void {
  const { errors } = coerceFields(body, fields, required);
  if (errors.length) throw requestValidationError(errors);
}

const isTokenIds = (v: unknown): v is number[] =>
  Array.isArray(v) && v.length > 0 && v.every((t) => typeof t === 'number' && Number.isInteger(t));

/** A request's `input` as token-id prompts: a string, strings, token ids, lists of token ids, or {text} objects. */
function inputPrompts(ctx: SglContext, input: unknown, allowNested: boolean): number[][] {
  const { tokenizer } = ctx;
  if (typeof input === 'string') return [tokenizer.encode(input)];
  if (Array.isArray(input)) {
    if (input.every((i) => typeof i === 'string')) return (input as string[]).map((t) => tokenizer.encode(t));
    if (input.every((i) => typeof i === 'number' && Number.isInteger(i))) return [input as number[]];
    if (allowNested && input.every(isTokenIds)) return input as number[][];
    if (allowNested && input.every((i) => i !== null && typeof i === 'object' && !Array.isArray(i))) {
      // MultimodalEmbeddingInput: the text part (no chat template, images ignored).
      return input.map((i) => tokenizer.encode(String((i as Record<string, unknown>).text ?? 'padding')));
    }
  }
  throw requestValidationError([
    { type: 'string_type', loc: ['body', 'input', 'str'], msg: 'Input should be a valid string', input },
  ]);
}

/** The embeddings / classify handlers' _validate_request: empty or whitespace-only input. */
function validateInput(input: unknown): string | null {
  if (!input || (Array.isArray(input) && input.length === 0)) return 'Input cannot be empty';
  if (typeof input === 'string') return input.trim() ? null : 'Input cannot be empty or whitespace only';
  if (!Array.isArray(input)) return null;
  if (typeof input[0] === 'string') {
    for (let i = 0; i < input.length; i += 1) {
      if (typeof input[i] !== 'string') return 'All items in input list must be strings';
      if (!(input[i] as string).trim()) return `Input at index ${i} cannot be empty or whitespace only`;
    }
  } else if (typeof input[0] === 'number') {
    for (let i = 0; i < input.length; i += 1) {
      if (typeof input[i] !== 'number') return 'All items in input list must be integers';
      if ((input[i] as number) < 0) return `Token ID at index ${i} must be non-negative`;
    }
  }
  return null;
}

// ---------------------------------------------------------------------------------------------
// Routes

/** POST /v1/embeddings. */
export async function embeddingsRoute(ctx: SglContext, req: IncomingMessage, res: ServerResponse, raw: Buffer): Promise<void> {
  const body = requireSglObject(parseSglBody(req, raw, true));
  validateFields(body, { model: 'str', encoding_format: 'str', dimensions: 'int', user: 'str' }, ['input']);
  const prompts = inputPrompts(ctx, body.input, true);
  const invalid = validateInput(body.input);
  if (invalid) throw servingError(invalid);
  ctx.ensureHandleLoop();
  for (const p of prompts) validateEmbeddingPrompt(ctx, p.length, body.dimensions);
  await runPrefill(ctx, res, randomHex(), prompts.map((p) => p.length));
  const total = prompts.reduce((sum, p) => sum + p.length, 0);
  sendJson(res, 200, embeddingResponse(prompts.map(simEmbedding), ctx.args.modelPath, total));
}

/** POST /v1/classify: softmax over the pooled output, labelled through the default id2label. */
export async function classifyRoute(ctx: SglContext, req: IncomingMessage, res: ServerResponse, raw: Buffer): Promise<void> {
  const body = requireSglObject(parseSglBody(req, raw, true));
  validateFields(body, { model: 'str', user: 'str' }, ['input']);
  const prompts = inputPrompts(ctx, body.input, false);
  const invalid = validateInput(body.input);
  if (invalid) throw servingError(invalid);
  ctx.ensureHandleLoop();
  for (const p of prompts) validateEmbeddingPrompt(ctx, p.length, null);
  await runPrefill(ctx, res, randomHex(), prompts.map((p) => p.length));
  const data: ClassifyData[] = prompts.map((p, index) => {
    const embedding = simEmbedding(p);
    const best = embedding.indexOf(Math.max(...embedding));
    // id2label[argmax]: a KeyError (argmax past the two default labels) gives "Default", [1.0].
    if (best >= ID2LABEL.length) return { index, label: 'Default', probs: [1.0], num_classes: 1 };
    const probs = softmax(embedding);
    return { index, label: ID2LABEL[best], probs, num_classes: probs.length };
  });
  const total = prompts.reduce((sum, p) => sum + p.length, 0);
  sendJson(res, 200, classifyResponse(`classify-${randomHex()}`, Math.floor(Date.now() / 1000), ctx.args.servedModelName, data, total));
}

/** A rerank query or document: a string, or content parts (their text parts joined by spaces). */
function contentText(content: unknown): string {
  if (typeof content === 'string') return content;
  if (!Array.isArray(content)) return '';
  return content
    .filter((p) => (p as Record<string, unknown> | null)?.type === 'text')
    .map((p) => String((p as Record<string, unknown>).text ?? ''))
    .join(' ');
}

/** POST|PUT /v1/rerank: the cross-encoder path (an EmbeddingReqInput of [query, document] pairs). */
export async function rerankRoute(ctx: SglContext, req: IncomingMessage, res: ServerResponse, raw: Buffer): Promise<void> {
  const body = requireSglObject(parseSglBody(req, raw, true));
  const entries: PydanticEntry[] = [];
  for (const field of ['query', 'documents']) {
    if (!(field in body)) entries.push({ type: 'missing', loc: ['body', field], msg: 'Field required', input: body });
  }
  if ('documents' in body && !Array.isArray(body.documents)) {
    entries.push({ type: 'list_type', loc: ['body', 'documents'], msg: 'Input should be a valid list', input: body.documents });
  }
  const { errors } = coerceFields(body, { instruct: 'str', top_n: 'int', return_documents: 'bool' }, []);
  entries.push(...errors);
  if (typeof body.top_n === 'number' && body.top_n < 1) {
    const message = 'Value error, parameter top_n should be larger than 0.';
    entries.push({
      type: 'value_error',
      loc: ['body', 'top_n'],
      msg: `Value error, ${message}`,
      input: body.top_n,
      ctx: { error: new PyRaw(`ValueError(${pyRepr(message)})`) },
    });
  }
  if (entries.length) throw requestValidationError(entries);
  const query = body.query;
  const documents = body.documents as unknown[];
  // _validate_request
  if (!query || (Array.isArray(query) && query.length === 0)) throw servingError('Query cannot be empty');
  if (typeof query === 'string' && !query.trim()) throw servingError('Query cannot be empty or whitespace only');
  if (documents.length === 0) throw servingError('Documents cannot be empty');
  for (const doc of documents) {
    if (!doc || (Array.isArray(doc) && doc.length === 0)) throw servingError('Each document must be a non-empty string');
    if (typeof doc === 'string' && !doc.trim()) throw servingError('Each document cannot be empty or whitespace only');
  }
  const { tokenizer } = ctx;
  const queryIds = tokenizer.encode(contentText(query));
  const pairs = documents.map((doc) => [...queryIds, ...tokenizer.encode(contentText(doc))]);
  ctx.ensureHandleLoop();
  for (const p of pairs) validateEmbeddingPrompt(ctx, p.length, null);
  const done = await runPrefill(ctx, res, randomHex(), pairs.map((p) => p.length));
  const returnDocuments = body.return_documents === undefined || body.return_documents === null ? true : body.return_documents === true;
  const items = pairs.map((pair, index) =>
    // A pooled output that is a vector: its first value is the score (embedding[0]).
    rerankItem(
      simEmbedding(pair)[0],
      returnDocuments ? documents[index] : null,
      index,
      embeddingMetaInfo(done.rids[index], pair.length, ctx.args.weightVersion, done.e2eLatency),
    ),
  );
  items.sort((a, b) => (b.score as number) - (a.score as number));
  const topN = typeof body.top_n === 'number' ? body.top_n : null;
  sendJson(res, 200, topN === null ? items : items.slice(0, topN));
}

/**
 * POST /v1/score: each (query + item) prompt scored. A generation model gives each label's
 * next-token probability (softmax over the labels' logprobs with `apply_softmax`); an embedding
 * model gives the pooled output itself. The ValueErrors are the score mixin's.
 */
export async function scoreRoute(ctx: SglContext, req: IncomingMessage, res: ServerResponse, raw: Buffer): Promise<void> {
  const body = requireSglObject(parseSglBody(req, raw, true));
  validateFields(
    body,
    { label_token_ids: 'list', apply_softmax: 'bool', item_first: 'bool', return_pooled_hidden_states: 'bool', model: 'str' },
    [],
  );
  const model = typeof body.model === 'string' ? body.model : DEFAULT_MODEL_NAME;
  const generation = !ctx.args.isEmbedding;
  const labels = Array.isArray(body.label_token_ids) ? (body.label_token_ids as number[]) : null;
  const fail = (message: string): never => {
    throw servingError(message);
  };
  ctx.ensureHandleLoop();
  if (generation && labels === null) fail('label_token_ids is required for generation (CausalLM) models.');
  let { query, items } = body;
  if (items === undefined || items === null) fail('items must be provided');
  if (!items || (Array.isArray(items) && items.length === 0)) {
    sendJson(res, 200, scoringResponse([], model, 0));
    return;
  }
  if (query === undefined || query === null) query = Array.isArray(items) && Array.isArray(items[0]) ? [] : '';
  for (const label of labels ?? []) {
    if (label >= TOKENIZER_VOCAB_SIZE) fail(`Token ID ${label} is out of vocabulary (vocab size: ${TOKENIZER_VOCAB_SIZE})`);
  }
  const itemFirst = body.item_first === true;
  let prompts: number[][];
  if (typeof query === 'string') {
    const list = typeof items === 'string' ? [items] : (items as unknown[]);
    const texts = list.map((item) => {
      const itemText = typeof item === 'string' ? item : pyRepr(item);
      return itemFirst ? `${itemText}${query as string}` : `${query as string}${itemText}`;
    });
    prompts = texts.map((t) => ctx.tokenizer.encode(t));
  } else if (isTokenIds(query) || (Array.isArray(query) && query.length === 0)) {
    if (!Array.isArray(items) || !Array.isArray(items[0])) return fail('Invalid combination of query/items types for score_request.');
    prompts = (items as number[][]).map((item) => (itemFirst ? [...item, ...(query as number[])] : [...(query as number[]), ...item]));
  } else {
    return fail('Invalid combination of query/items types for score_request.');
  }
  if (body.return_pooled_hidden_states === true && generation) {
    fail(
      'return_pooled_hidden_states is not supported for CausalLM models. It requires a model with a task-specific head ' +
        '(e.g. SequenceClassification or RewardModel).',
    );
  }
  for (const p of prompts) {
    try {
      checkLength(ctx, p.length, generation ? 0 : null);
    } catch (error) {
      fail((error as Error).message);
    }
  }
  await runPrefill(ctx, res, randomHex(), prompts.map((p) => p.length));
  const applySoftmax = body.apply_softmax === true;
  const scores = prompts.map((p) => {
    if (!generation) return applySoftmax ? softmax(simEmbedding(p)) : simEmbedding(p);
    const probs = simLabelProbs(p, labels as number[]);
    return applySoftmax ? softmax(probs.map(Math.log)) : probs;
  });
  sendJson(res, 200, scoringResponse(scores, model, prompts.reduce((sum, p) => sum + p.length, 0)));
}

/**
 * POST|PUT /encode and /classify (EmbeddingReqInput; /generate too on an embedding model): one
 * `{"embedding", "meta_info"}` per prompt, a list for a batch. Its ValueErrors are the native
 * `{"error": {"message"}}` 400.
 */
export async function encodeRoute(
  ctx: SglContext,
  req: IncomingMessage,
  res: ServerResponse,
  raw: Buffer,
  missingInput = 'At least one of text, input_ids, or image should be provided',
): Promise<void> {
  const body = requireSglObject(parseSglBody(req, raw, false));
  ctx.ensureHandleLoop();
  const { text, input_ids: inputIds } = body;
  let prompts: number[][];
  let batch = false;
  if (typeof text === 'string') prompts = [ctx.tokenizer.encode(text)];
  else if (Array.isArray(text) && text.every((t) => typeof t === 'string')) {
    prompts = (text as string[]).map((t) => ctx.tokenizer.encode(t));
    batch = true;
  } else if (isTokenIds(inputIds)) prompts = [inputIds];
  else if (Array.isArray(inputIds) && inputIds.length > 0 && inputIds.every(isTokenIds)) {
    prompts = inputIds as number[][];
    batch = true;
  } else throw new NativeError(400, missingInput);
  for (const p of prompts) {
    try {
      validateEmbeddingPrompt(ctx, p.length, null);
    } catch (error) {
      throw new NativeError(400, (error as Error).message);
    }
  }
  const rid = typeof body.rid === 'string' && body.rid ? body.rid : randomHex();
  const done = await runPrefill(ctx, res, rid, prompts.map((p) => p.length));
  const outputs = prompts.map((p, i) => ({
    embedding: simEmbedding(p),
    meta_info: embeddingMetaInfo(done.rids[i], p.length, ctx.args.weightVersion, done.e2eLatency),
  }));
  sendJson(res, 200, batch ? outputs : outputs[0]);
}
