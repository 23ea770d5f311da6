import { outputLevel } from './engine-process';

describe('outputLevel (the log level of a line of vLLM’s output)', () => {
  it('is the level vLLM, uvicorn or SGLang gave the line, after vLLM\'s process prefix', () => {
    const cases: Array<[string, string]> = [
      ['(APIServer pid=12) INFO 12-07 20:00:01 [api_server.py:1] Starting vLLM server on http://0.0.0.0:8000', 'log'],
      ['(EngineCore_DP0 pid=13) WARNING 12-07 20:00:01 [core.py:2] low memory', 'warn'],
      ['(EngineCore pid=13) ERROR 12-07 20:00:01 [core.py:3] EngineCore encountered a fatal error.', 'error'],
      ['CRITICAL 12-07 20:00:01 [x.py:4] gone', 'error'],
      ['DEBUG 12-07 20:00:01 [x.py:5] detail', 'debug'],
      ['WARNING:  Invalid HTTP request received.', 'warn'],
      ['INFO:     127.0.0.1:5555 - "POST /v1/chat/completions HTTP/1.1" 200 OK', 'log'],
      ['[2026-12-07 20:05:00] ERROR:    Exception in ASGI application', 'error'], // SGLang's uvicorn lines
      ['[2026-12-07 20:05:00 TP0] Decode batch. #running-req: 1', 'log'], // SGLang's own: no level word
      ['/usr/lib/python3/x.py:63: UserWarning: something is deprecated', 'warn'],
      ['Traceback (most recent call last):', 'error'],
      ['(APIServer pid=12) Traceback (most recent call last):', 'error'],
      ['INFORMATION is no level word', 'log'],
    ];
    for (const [line, level] of cases) expect([line, outputLevel(line, 'warn')]).toEqual([line, level]);
  });

  it('keeps a traceback at the level of its first line, and goes back to info after it', () => {
    const lines = [
      '(EngineCore pid=13) ERROR 12-07 20:00:01 [core.py:3] EngineCore failed to start.',
      '(EngineCore pid=13) Traceback (most recent call last):',
      '(EngineCore pid=13)   File "/x.py", line 1, in <module>',
      '(EngineCore pid=13)     run()',
      '(EngineCore pid=13) RuntimeError: CUDA out of memory',
      '[2026-12-07 20:05:00 TP0] Decode batch. #running-req: 1',
      'Loading safetensors checkpoint shards:   0% Completed | 0/4',
    ];
    const levels: string[] = [];
    let level: Parameters<typeof outputLevel>[1] = 'log';
    for (const line of lines) levels.push((level = outputLevel(line, level)));
    expect(levels).toEqual(['error', 'error', 'error', 'error', 'error', 'log', 'log']);
  });
});
