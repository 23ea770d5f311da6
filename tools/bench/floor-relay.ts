// The floor: the least a Node relay can do on this machine — node:http in front, undici's
// dispatch API behind, the JSON body parsed and serialized again, bytes passed straight back.
// No Fastify, no Nest, no validation, no metrics, no admission, no auth (it only aborts the
// upstream request of a client that left, as every relay must). It runs with the node
// flags tide-vllm ships with; tide-vllm's relay is measured against it to show what the gateway
// itself costs.
//
//   node dist/tools/bench/floor-relay.js --backend-port=N   (forked: reports { port } on IPC)
import { type IncomingHttpHeaders, createServer } from 'node:http';
import { Pool } from 'undici';

const backendPort = Number(/--backend-port=(\d+)/.exec(process.argv.join(' '))?.[1]);
const pool = new Pool(`http://127.0.0.1:${backendPort}`, { connections: 1024, keepAliveTimeout: 4_000 });

const server = createServer((req, res) => {
  if (req.method === 'GET') return void res.end('ok'); // readiness
  const chunks: Buffer[] = [];
  req.on('data', (chunk: Buffer) => chunks.push(chunk));
  req.on('end', () => {
    const body: unknown = JSON.parse(Buffer.concat(chunks).toString('utf8'));
    pool.dispatch(
      { method: 'POST', path: req.url ?? '/', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) },
      {
        // A client that leaves ends its upstream request too, as any relay must: otherwise a stream
        // left paused (its last write refused) holds a pooled connection for good.
        onRequestStart: (c) => {
          res.once('close', () => {
            if (!res.writableFinished) c.abort(new Error('the client left'));
          });
        },
        onResponseStart: (_c, status: number, headers: IncomingHttpHeaders) => {
          const out: Record<string, string> = { 'content-type': String(headers['content-type'] ?? 'application/json') };
          if (typeof headers['content-length'] === 'string') out['content-length'] = headers['content-length'];
          res.writeHead(status, out);
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
});

server.listen(0, '127.0.0.1', () => {
  const address = server.address();
  process.send?.({ port: typeof address === 'object' && address ? address.port : 0 });
});
