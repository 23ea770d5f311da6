// The floor: the least a Node relay can do on this machine — Fastify with its JSON body parsing,
// undici's dispatch API, bytes passed straight through. No Nest, no validation, no metrics, no
// admission, no auth. tide-vllm's relay is measured against it to show what the gateway itself costs.
//
//   node dist/tools/bench/floor-relay.js --backend-port=N   (forked: reports { port } on IPC)
import type { IncomingHttpHeaders } from 'node:http';
import fastify from 'fastify';
import { Pool } from 'undici';

const backendPort = Number(/--backend-port=(\d+)/.exec(process.argv.join(' '))?.[1]);
const pool = new Pool(`http://127.0.0.1:${backendPort}`, { connections: 1024, keepAliveTimeout: 4_000 });
const app = fastify({ logger: false, bodyLimit: 1_048_576 });

app.post('/v1/chat/completions', (request, reply) => {
  const res = reply.raw;
  reply.hijack();
  pool.dispatch(
    { method: 'POST', path: '/v1/chat/completions', headers: { 'content-type': 'application/json' }, body: JSON.stringify(request.body) },
    {
      onRequestStart: () => undefined, // undici calls every hook of a dispatch handler
      onResponseStart: (_c, status: number, headers: IncomingHttpHeaders) => {
        res.writeHead(status, { 'content-type': String(headers['content-type'] ?? 'application/json') });
      },
      onResponseData: (c, chunk: Buffer) => {
        if (!res.write(chunk)) {
          c.pause();
          res.once('drain', () => c.resume());
        }
      },
      onResponseEnd: () => res.end(),
      onResponseError: () => res.destroy(),
    },
  );
});
app.get('/ready', (_request, reply) => reply.send('ok'));

void app.listen({ host: '127.0.0.1', port: 0 }).then(() => {
  const address = app.server.address();
  process.send?.({ port: typeof address === 'object' && address ? address.port : 0 });
});
