// A vLLM stand-in cheap enough never to be the bottleneck of the benchmark: node:http, every
// response byte pre-serialized, nothing logged. Shapes are vLLM's (shared/vllm-protocol.md A5).
//
//   node dist/tools/bench/backend.js [--port=0] [--host=127.0.0.1] [--model=bench-model] [--pace-ms=0]
//
// POST /v1/chat/completions  non-stream: a small fixed body; stream: a role chunk, max_tokens
//                            content chunks (the last with finish_reason "length"), a usage chunk
//                            when stream_options.include_usage, then [DONE]
// GET  /v1/models, /health    as vLLM
// POST /bench/config         {"pace_ms": 20}: from now on one token per 20 ms per stream
//                            (setInterval per stream); 0 writes them as fast as the socket takes them
//
// With --port=0 the bound port is reported on IPC ({ port }) when forked, and on stdout.
import { createServer, type IncomingMessage, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';

const CREATED = Math.floor(Date.now() / 1000);
const REQUEST_ID = 'chatcmpl-b3nchb3nchb3nch0';
const FINGERPRINT = 'vllm-0.0.0-bench0000';
const PROMPT_TOKENS = 12;
const TOKEN_TEXT = ' hello';
/** uvicorn keeps idle connections 5 s; longer here so nginx's pooled upstream sockets stay valid between cases. */
const KEEP_ALIVE_MS = 75_000;

interface Options {
  host: string;
  port: number;
  model: string;
  paceMs: number;
}

function parseOptions(argv: string[]): Options {
  const opts: Options = { host: '127.0.0.1', port: 0, model: 'bench-model', paceMs: 0 };
  for (const arg of argv) {
    const [key, value = ''] = arg.replace(/^--/, '').split('=', 2);
    if (key === 'host') opts.host = value;
    else if (key === 'port') opts.port = Number(value);
    else if (key === 'model') opts.model = value;
    else if (key === 'pace-ms') opts.paceMs = Number(value);
    else throw new Error(`backend: unknown option ${arg}`);
  }
  return opts;
}

/** Every byte the backend ever sends, built once. */
function frames(model: string) {
  const head = `{"id":"${REQUEST_ID}","object":"chat.completion.chunk","created":${CREATED},"model":${JSON.stringify(model)}`;
  const event = (json: string) => Buffer.from(`data: ${json}\n\n`);
  const usage = (completion: number) =>
    `"usage":{"prompt_tokens":${PROMPT_TOKENS},"total_tokens":${PROMPT_TOKENS + completion},"completion_tokens":${completion}}`;
  const text = JSON.stringify(TOKEN_TEXT);
  return {
    role: event(`${head},"choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}],"prompt_token_ids":null,"prompt_text":null}`),
    token: event(`${head},"choices":[{"index":0,"delta":{"content":${text}},"logprobs":null,"finish_reason":null,"token_ids":null}]}`),
    /** The final choice chunk; vLLM stamps the fingerprint on it only when no usage chunk follows. */
    last: event(`${head},"choices":[{"index":0,"delta":{"content":${text}},"logprobs":null,"finish_reason":"length","stop_reason":null,"token_ids":null}],"system_fingerprint":"${FINGERPRINT}"}`),
    lastBeforeUsage: event(`${head},"choices":[{"index":0,"delta":{"content":${text}},"logprobs":null,"finish_reason":"length","stop_reason":null,"token_ids":null}]}`),
    usage: (completion: number) => event(`${head},"choices":[],${usage(completion)},"system_fingerprint":"${FINGERPRINT}"}`),
    done: Buffer.from('data: [DONE]\n\n'),
    completion: Buffer.from(
      JSON.stringify({
        id: REQUEST_ID,
        object: 'chat.completion',
        created: CREATED,
        model,
        choices: [
          {
            index: 0,
            message: { role: 'assistant', content: 'Hello!', refusal: null, annotations: null, audio: null, function_call: null, reasoning: null },
            logprobs: null,
            finish_reason: 'stop',
            stop_reason: null,
            token_ids: null,
            routed_experts: null,
          },
        ],
        service_tier: null,
        system_fingerprint: FINGERPRINT,
        usage: { prompt_tokens: PROMPT_TOKENS, total_tokens: PROMPT_TOKENS + 3, completion_tokens: 3, prompt_tokens_details: null, completion_tokens_details: null },
        prompt_logprobs: null,
        prompt_token_ids: null,
        prompt_text: null,
        kv_transfer_params: null,
        ec_transfer_params: null,
        metrics: null,
      }),
    ),
    models: Buffer.from(
      JSON.stringify({
        object: 'list',
        data: [{ id: model, object: 'model', created: CREATED, owned_by: 'vllm', root: model, parent: null, max_model_len: 4096, permission: [] }],
      }),
    ),
  };
}

const JSON_HEADERS = { 'content-type': 'application/json' };
const SSE_HEADERS = { 'content-type': 'text/event-stream; charset=utf-8' };

interface ChatBody {
  model?: unknown;
  max_tokens?: unknown;
  stream?: unknown;
  stream_options?: { include_usage?: unknown } | null;
}

export function startBackend(opts: Options): Promise<{ port: number; close(): Promise<void> }> {
  const f = frames(opts.model);
  const usageFrames = new Map<number, Buffer>();
  const usageFrame = (n: number) => {
    let frame = usageFrames.get(n);
    if (!frame) usageFrames.set(n, (frame = f.usage(n)));
    return frame;
  };
  let paceMs = opts.paceMs;

  const sendJson = (res: ServerResponse, status: number, body: Buffer | string) => {
    res.writeHead(status, JSON_HEADERS);
    res.end(body);
  };

  const chat = (res: ServerResponse, raw: string) => {
    let body: ChatBody;
    try {
      body = JSON.parse(raw) as ChatBody;
    } catch {
      return sendJson(res, 400, '{"error":{"message":"invalid JSON body","type":"BadRequestError","param":null,"code":400}}');
    }
    if (body.model !== undefined && body.model !== opts.model) {
      return sendJson(res, 404, JSON.stringify({ error: { message: `The model \`${String(body.model)}\` does not exist.`, type: 'NotFoundError', param: 'model', code: 404 } }));
    }
    if (body.stream !== true) return sendJson(res, 200, f.completion);
    const tokens = Math.max(1, Number.isInteger(body.max_tokens) ? (body.max_tokens as number) : 16);
    const usage = body.stream_options?.include_usage === true;
    res.writeHead(200, SSE_HEADERS);
    // Frame i: 0 = role, 1..tokens = content (the last one finishing), then usage, then [DONE] (via end).
    const total = tokens + 1 + (usage ? 1 : 0);
    const frameAt = (i: number): Buffer =>
      i === 0 ? f.role : i < tokens ? f.token : i === tokens ? (usage ? f.lastBeforeUsage : f.last) : usageFrame(tokens);
    if (paceMs <= 0) {
      // As fast as possible: one res.write per event, waiting only when the socket pushes back.
      let i = 0;
      const pump = () => {
        while (i < total) {
          if (res.destroyed) return;
          if (!res.write(frameAt(i++))) return void res.once('drain', pump);
        }
        res.end(f.done);
      };
      res.once('close', () => res.off('drain', pump));
      return pump();
    }
    // Paced: the role chunk and the first token at once (as vLLM after prefill), then one token per
    // tick; the usage chunk and [DONE] follow the last token at once.
    res.write(f.role);
    res.write(frameAt(1));
    let i = 2;
    const finish = () => {
      while (i < total) res.write(frameAt(i++));
      res.end(f.done);
    };
    if (i > tokens) return finish();
    const timer = setInterval(() => {
      res.write(frameAt(i++));
      if (i > tokens) {
        clearInterval(timer);
        finish();
      }
    }, paceMs);
    res.once('close', () => clearInterval(timer));
  };

  const server = createServer((req: IncomingMessage, res: ServerResponse) => {
    const url = req.url ?? '/';
    if (req.method === 'GET') {
      if (url === '/health') return sendJson(res, 200, '');
      if (url === '/v1/models') return sendJson(res, 200, f.models);
      return sendJson(res, 404, '{"detail":"Not Found"}');
    }
    if (req.method !== 'POST' || (url !== '/v1/chat/completions' && url !== '/bench/config')) {
      req.resume();
      return sendJson(res, 404, '{"detail":"Not Found"}');
    }
    let raw = '';
    req.setEncoding('utf8');
    req.on('data', (chunk: string) => (raw += chunk));
    req.on('end', () => {
      if (url === '/v1/chat/completions') return chat(res, raw);
      paceMs = Number((JSON.parse(raw) as { pace_ms?: unknown }).pace_ms) || 0;
      sendJson(res, 200, JSON.stringify({ pace_ms: paceMs }));
    });
  });
  server.keepAliveTimeout = KEEP_ALIVE_MS;
  server.headersTimeout = KEEP_ALIVE_MS + 1_000;
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(opts.port, opts.host, () => {
      resolve({
        port: (server.address() as AddressInfo).port,
        close: () =>
          new Promise<void>((done) => {
            server.close(() => done());
            server.closeAllConnections();
          }),
      });
    });
  });
}

if (require.main === module) {
  const opts = parseOptions(process.argv.slice(2));
  startBackend(opts).then(
    ({ port }) => {
      process.stdout.write(`backend listening on http://${opts.host}:${port} (model ${opts.model})\n`);
      process.send?.({ port });
      process.on('disconnect', () => process.exit(0)); // the benchmark that forked us is gone
    },
    (err: Error) => {
      process.stderr.write(`backend: ${err.message}\n`);
      process.exit(1);
    },
  );
  for (const signal of ['SIGTERM', 'SIGINT'] as const) process.on(signal, () => process.exit(0));
}
