import { createServer } from 'node:net';

/**
 * True when host:port can be listened on, found by binding it for a moment; else why not
 * (EADDRINUSE: something listens there). It cannot see a vLLM
 * that is still loading its model (bound, not yet listening, A1): both binds set SO_REUSEADDR,
 * which Linux allows while neither listens. Such a vLLM makes ours fail at its own listen
 * ("address already in use", reported with its output), unless both set SO_REUSEPORT (vLLM up
 * to May 2026), when they share the port. Our own orphans are reaped before this check.
 */
export async function portIsFree(host: string, port: number): Promise<true | NodeJS.ErrnoException> {
  return new Promise((resolve) => {
    const probe = createServer();
    probe.once('error', (err: NodeJS.ErrnoException) => resolve(err));
    probe.listen({ host, port, exclusive: true }, () => probe.close(() => resolve(true)));
  });
}

/** Why a server cannot listen on an address, for an operator. */
export function listenProblem(err: NodeJS.ErrnoException): string {
  switch (err.code) {
    case 'EADDRINUSE':
      return 'the port is already in use';
    case 'EADDRNOTAVAIL':
      return 'the address is not on this machine';
    case 'EACCES':
      return 'permission denied (ports below 1024 need root or CAP_NET_BIND_SERVICE)';
    case 'ENOTFOUND':
    case 'EAI_AGAIN':
      return 'the host name does not resolve';
    default:
      return err.message;
  }
}
