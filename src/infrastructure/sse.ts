/**
 * Splits a server-sent-event byte stream into the `data:` payloads of its events. vLLM frames
 * each event as exactly `data: <json>\n\n`; CRLF framing and multi-line data are accepted too.
 * Synchronous and allocation-light: it runs once per token of a stream.
 */
export class SseParser {
  /** Text received since the last event's end, in the pieces it came in: no blank line in it. */
  private readonly pending: string[] = [];
  /** The pending text ends with a line feed: a blank line may straddle two pieces. */
  private pendingEndsWithLf = false;
  /** The last text ended in a CR, already taken as a line end: an LF opening the next one is its pair. */
  private skipLf = false;

  /**
   * Adds received text; returns the payloads of the events it completed, in order. Only the new
   * text is searched for an event's end, and pending pieces are joined once one came: an event
   * that arrives in many reads costs linear time.
   */
  push(received: string): string[] {
    let text = received;
    if (this.skipLf && text.charCodeAt(0) === 10) text = text.slice(1);
    this.skipLf = false;
    // CRLF or CR framing: normalised; a CR at the end is a line end now (its LF, if one follows, is dropped then).
    if (text.includes('\r')) {
      this.skipLf = text.endsWith('\r');
      text = text.replace(/\r\n?/g, '\n');
    }
    if (text === '') return [];
    let end = text.indexOf('\n\n');
    if (end === -1 && !(this.pendingEndsWithLf && text.charCodeAt(0) === 10)) {
      this.pending.push(text);
      this.pendingEndsWithLf = text.charCodeAt(text.length - 1) === 10;
      return [];
    }
    let buffer = text;
    if (this.pending.length > 0) {
      buffer = this.pending.join('') + text;
      this.pending.length = 0;
      end = buffer.indexOf('\n\n');
    }
    const out: string[] = [];
    let start = 0;
    while (end !== -1) {
      const data = dataOf(buffer, start, end);
      if (data !== null) out.push(data);
      start = end + 2;
      end = buffer.indexOf('\n\n', start);
    }
    if (start < buffer.length) {
      const rest = start === 0 ? buffer : buffer.slice(start);
      this.pending.push(rest);
      this.pendingEndsWithLf = rest.charCodeAt(rest.length - 1) === 10;
    } else this.pendingEndsWithLf = false;
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
