// The raw floor: the least any Node relay can cost on this machine. Plain TCP sockets on both
// sides and HTTP/1.1 parsed by hand, just enough for the bench's own requests (Content-Length
// bodies in, Content-Length or chunked answers back, the chunked bytes passed on as they are);
// the JSON body parsed and serialized again, as the floor and tide-vllm do. One write per
// request to the backend, one per answer (head and first body bytes together), pauses for a
// client that cannot keep up, the backend's request aborted when the client leaves.
//
// It is a yardstick, not a server: it trusts its input (no limits, no validation, no errors
// answered), which is what a production relay cannot do. The bench shows it beside the floor
// (node:http + undici) to say how much of a Node relay's cost is node:http's server.
//
//   node dist/tools/bench/raw-floor.js --backend-port=N   (forked: reports { port } on IPC)
import { connect, createServer, type Socket } from 'node:net';

const backendPort = Number(/--backend-port=(\d+)/.exec(process.argv.join(' '))?.[1]);
const HEAD_END = Buffer.from('\r\n\r\n');
const idle: Socket[] = [];

function upstream(): Socket {
  const pooled = idle.pop();
  if (pooled) return pooled;
  const socket = connect({ port: backendPort, host: '127.0.0.1', noDelay: true });
  socket.on('error', () => socket.destroy());
  socket.on('close', () => {
    const at = idle.indexOf(socket);
    if (at !== -1) idle.splice(at, 1);
  });
  return socket;
}

/** Where a chunked body ends, read as it passes: its bytes are not changed. */
class ChunkedEnd {
  private sizeLine = '';
  /** Bytes of chunk data and its CRLF still to pass; -1 while reading a size line. */
  private left = -1;
  /** After the last chunk: bytes of the final CRLF still to pass (no trailers here). */
  private last = -1;

  /** True once `bytes` completed the body. */
  feed(bytes: Buffer): boolean {
    let at = 0;
    while (at < bytes.length) {
      if (this.last >= 0) {
        const take = Math.min(this.last, bytes.length - at);
        this.last -= take;
        at += take;
        if (this.last === 0) return true;
      } else if (this.left > 0) {
        const take = Math.min(this.left, bytes.length - at);
        this.left -= take;
        at += take;
      } else {
        const lf = bytes.indexOf(10, at);
        if (lf === -1) {
          this.sizeLine += bytes.toString('latin1', at);
          return false;
        }
        const size = parseInt(this.sizeLine + bytes.toString('latin1', at, lf), 16);
        this.sizeLine = '';
        at = lf + 1;
        if (size === 0) this.last = 2;
        else this.left = size + 2;
      }
    }
    return this.last === 0;
  }
}

/** One request relayed: its answer passed to `client` as it comes; `done` once it is whole. */
function relay(client: Socket, path: string, body: Buffer, done: () => void): void {
  const json = Buffer.from(JSON.stringify(JSON.parse(body.toString('utf8'))));
  const up = upstream();
  up.write(Buffer.concat([Buffer.from(`POST ${path} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\ncontent-length: ${json.length}\r\n\r\n`, 'latin1'), json]));
  let head: Buffer | null = Buffer.alloc(0) as Buffer;
  let length = -1; // Content-Length left; -1: chunked
  const chunked = new ChunkedEnd();
  let finished = false;
  const finish = () => {
    finished = true;
    up.removeListener('data', onData);
    up.removeListener('close', onUpstreamClose);
    client.removeListener('close', onClientClose);
    idle.push(up);
    done();
  };
  const onData = (data: Buffer) => {
    let out = data;
    if (head !== null) {
      head = head.length === 0 ? data : Buffer.concat([head, data]);
      const end = head.indexOf(HEAD_END);
      if (end === -1) return;
      const lines = head.toString('latin1', 0, end);
      const rest = head.subarray(end + 4);
      head = null;
      const type = /\r\ncontent-type: *([^\r]*)/i.exec(lines)?.[1] ?? 'application/json';
      const declared = /\r\ncontent-length: *(\d+)/i.exec(lines);
      length = declared ? Number(declared[1]) : -1;
      const framing = length === -1 ? 'transfer-encoding: chunked' : `content-length: ${length}`;
      out = Buffer.concat([Buffer.from(`HTTP/1.1 ${lines.slice(9, 12)} OK\r\ncontent-type: ${type}\r\n${framing}\r\n\r\n`, 'latin1'), rest]);
      data = rest;
    }
    const whole = length === -1 ? chunked.feed(data) : (length -= data.length) <= 0;
    if (!client.write(out) && !whole) {
      up.pause();
      client.once('drain', () => up.resume());
    }
    if (whole) finish();
  };
  // A client that leaves ends its backend request; a backend that fails ends the client's connection.
  const onClientClose = () => {
    if (!finished) up.destroy();
  };
  const onUpstreamClose = () => {
    if (!finished) client.destroy();
  };
  up.on('data', onData);
  up.once('close', onUpstreamClose);
  client.once('close', onClientClose);
}

const server = createServer((client) => {
  client.setNoDelay(true);
  client.on('error', () => client.destroy());
  let received: Buffer = Buffer.alloc(0);
  let busy = false;
  // One request at a time per connection (the load generator does not pipeline).
  const next = (): void => {
    if (busy) return;
    const end = received.indexOf(HEAD_END);
    if (end === -1) return;
    const lines = received.toString('latin1', 0, end);
    const declared = /\r\ncontent-length: *(\d+)/i.exec(lines);
    const bodyEnd = end + 4 + (declared ? Number(declared[1]) : 0);
    if (received.length < bodyEnd) return;
    const body = received.subarray(end + 4, bodyEnd);
    received = received.subarray(bodyEnd);
    const [method, path] = lines.split(' ', 2);
    if (method === 'GET') {
      client.write('HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok'); // readiness
      return next();
    }
    busy = true;
    relay(client, path, body, () => {
      busy = false;
      next();
    });
  };
  client.on('data', (data: Buffer) => {
    received = received.length === 0 ? data : Buffer.concat([received, data]);
    next();
  });
});

server.listen(0, '127.0.0.1', () => {
  const address = server.address();
  process.send?.({ port: typeof address === 'object' && address ? address.port : 0 });
});
