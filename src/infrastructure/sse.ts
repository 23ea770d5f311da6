import type { Readable } from 'node:stream';

/** The error a stream fails with when it stays silent for longer than its idle limit. */
export class StreamIdleError extends Error {
  override name = 'StreamIdleError';
}

/**
 * Yields the `data:` payload of each server-sent event of `stream`, in order.
 * vLLM frames each event as exactly `data: <json>\n\n`; `\r\n` line ends are accepted too.
 * Ends when the stream ends; fails with StreamIdleError after `idleMs` without a byte (0: never).
 */
export async function* sseData(stream: Readable, idleMs = 0): AsyncGenerator<string> {
  let timer: NodeJS.Timeout | undefined;
  const arm = () => {
    if (idleMs <= 0) return;
    clearTimeout(timer);
    timer = setTimeout(() => stream.destroy(new StreamIdleError(`no data for ${idleMs} ms`)), idleMs);
  };
  let buffer = '';
  try {
    arm();
    for await (const chunk of stream) {
      arm();
      buffer += typeof chunk === 'string' ? chunk : (chunk as Buffer).toString('utf8');
      let end: number;
      while ((end = eventEnd(buffer)) !== -1) {
        const data = dataOf(buffer.slice(0, end));
        buffer = buffer.slice(end).replace(/^(\r?\n){1,2}/, '');
        if (data !== null) yield data;
      }
    }
  } finally {
    clearTimeout(timer);
  }
  const rest = dataOf(buffer);
  if (rest !== null) yield rest;
}

function eventEnd(buffer: string): number {
  const lf = buffer.indexOf('\n\n');
  const crlf = buffer.indexOf('\r\n\r\n');
  if (lf === -1) return crlf;
  if (crlf === -1) return lf;
  return Math.min(lf, crlf);
}

/** Joins the event's data lines (SSE allows several); null when it has none. */
function dataOf(event: string): string | null {
  let data: string | null = null;
  for (const line of event.split(/\r?\n/)) {
    if (!line.startsWith('data:')) continue;
    const value = line.slice(line.startsWith('data: ') ? 6 : 5);
    data = data === null ? value : `${data}\n${value}`;
  }
  return data;
}
