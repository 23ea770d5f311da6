/**
 * Splits a server-sent-event byte stream into the `data:` payloads of its events. vLLM frames
 * each event as exactly `data: <json>\n\n`; CRLF framing and multi-line data are accepted too.
 * Synchronous and allocation-light: it runs once per token of a stream.
 */
export class SseParser {
  private buffer = '';
  /** The last text ended in a CR, already taken as a line end: an LF opening the next one is its pair. */
  private skipLf = false;

  /** Adds received text; returns the payloads of the events it completed, in order. */
  push(text: string): string[] {
    if (text === '') return [];
    if (this.skipLf && text.charCodeAt(0) === 10) text = text.slice(1);
    this.skipLf = false;
    let buffer = this.buffer + text;
    // CRLF or CR framing: normalise; a CR at the end is a line end now (its LF, if one follows, is dropped then).
    if (buffer.includes('\r')) {
      this.skipLf = buffer.endsWith('\r');
      buffer = buffer.replace(/\r\n?/g, '\n');
    }
    const out: string[] = [];
    let start = 0;
    let end: number;
    while ((end = buffer.indexOf('\n\n', start)) !== -1) {
      const data = dataOf(buffer, start, end);
      if (data !== null) out.push(data);
      start = end + 2;
    }
    this.buffer = start === 0 ? buffer : buffer.slice(start);
    return out;
  }

}

/** Joins the data lines of the event in buffer[start, end); null when it has none. */
function dataOf(buffer: string, start: number, end: number): string | null {
  // The common case, a single `data: ` line, without splitting.
  const newline = buffer.indexOf('\n', start);
  if (buffer.startsWith('data: ', start) && (newline === -1 || newline >= end)) return buffer.slice(start + 6, end);
  let data: string | null = null;
  for (const line of buffer.slice(start, end).split('\n')) {
    if (!line.startsWith('data:')) continue;
    const value = line.slice(line.startsWith('data: ') ? 6 : 5);
    data = data === null ? value : `${data}\n${value}`;
  }
  return data;
}
