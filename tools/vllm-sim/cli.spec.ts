import { CliOutcome, CliTypeError, CliValueError, DEFAULT_MODEL, ServeArgs, humanReadableInt, parseCli } from './cli';

function serveArgs(argv: string[]): ServeArgs {
  const outcome = parseCli(argv);
  if (outcome.kind !== 'serve') throw new Error(`expected serve, got exit: ${outcome.stderr}`);
  return outcome.args;
}

function exitOf(argv: string[]): Extract<CliOutcome, { kind: 'exit' }> {
  const outcome = parseCli(argv);
  if (outcome.kind !== 'exit') throw new Error('expected an exit outcome');
  return outcome;
}

describe('vllm-sim CLI parser', () => {
  it('takes the model from the positional argument of `serve`', () => {
    const args = serveArgs(['serve', 'org/model', '--port', '9000']);
    expect(args.model).toBe('org/model');
    expect(args.servedModelNames).toEqual(['org/model']);
    expect(args.port).toBe(9000);
    expect(args.entrypoint).toBe('serve');
  });

  it('ignores a positional model without `serve` (python -m ...api_server) and uses --model', () => {
    expect(serveArgs(['ignored-model']).model).toBe(DEFAULT_MODEL);
    expect(serveArgs(['ignored-model', '--model', 'real']).model).toBe('real');
    expect(serveArgs([]).entrypoint).toBe('api_server');
  });

  it('accepts --model with `serve` but warns that it is deprecated', () => {
    const outcome = parseCli(['serve', '--port', '9000', '--model', 'm1']);
    expect(outcome.kind).toBe('serve');
    if (outcome.kind !== 'serve') return;
    expect(outcome.args.model).toBe('m1');
    expect(outcome.warnings[0].message).toContain('you should provide the model as a positional argument');
  });

  it('treats dashes and underscores alike and accepts --x=value', () => {
    const args = serveArgs(['serve', 'm', '--max_model_len=8k', '--gpu_memory_utilization', '0.5']);
    expect(args.maxModelLen).toBe(8000);
    expect(args.gpuMemoryUtilization).toBe(0.5);
  });

  it('accepts unique prefixes and short aliases', () => {
    const args = serveArgs(['serve', 'm', '--served-model', 'a', 'b', '-tp', '2', '--shutdown-t', '3']);
    expect(args.servedModelNames).toEqual(['a', 'b']);
    expect(args.tensorParallelSize).toBe(2);
    expect(args.shutdownTimeout).toBe(3);
  });

  it('parses human readable integers like vLLM', () => {
    expect(humanReadableInt('8k')).toBe(8000);
    expect(humanReadableInt('8K')).toBe(8192);
    expect(humanReadableInt('25.6k')).toBe(25600);
    expect(humanReadableInt('2M')).toBe(2 * 1024 * 1024);
    expect(humanReadableInt('4096')).toBe(4096);
  });

  it('resolves --max-model-len auto and -1 to the simulated default', () => {
    expect(serveArgs(['serve', 'm', '--max-model-len', 'auto']).maxModelLen).toBe(4096);
    expect(serveArgs(['serve', 'm', '--max-model-len', '-1']).maxModelLen).toBe(4096);
  });

  it('supports BooleanOptionalAction --x / --no-x pairs', () => {
    expect(serveArgs(['serve', 'm', '--enable-sleep-mode']).enableSleepMode).toBe(true);
    expect(serveArgs(['serve', 'm', '--enable-sleep-mode', '--no-enable-sleep-mode']).enableSleepMode).toBe(false);
    expect(serveArgs(['serve', 'm', '--enable-log-requests']).enableLogRequests).toBe(true);
  });

  it('reads api keys from --api-key (nargs +) before VLLM_API_KEY', () => {
    const saved = process.env.VLLM_API_KEY;
    process.env.VLLM_API_KEY = 'from-env';
    try {
      expect(serveArgs(['serve', 'm', '--api-key', 'k1', 'k2']).apiKeys).toEqual(['k1', 'k2']);
      expect(serveArgs(['serve', 'm']).apiKeys).toEqual(['from-env']);
    } finally {
      if (saved === undefined) delete process.env.VLLM_API_KEY;
      else process.env.VLLM_API_KEY = saved;
    }
  });

  it('parses --lora-modules in name=path and JSON form', () => {
    const args = serveArgs([
      'serve',
      'm',
      '--lora-modules',
      'a=/loras/a',
      '{"name": "b", "path": "/loras/b", "base_model_name": "m"}',
    ]);
    expect(args.loraModules).toEqual([
      { name: 'a', path: '/loras/a', base_model_name: null },
      { name: 'b', path: '/loras/b', base_model_name: 'm' },
    ]);
  });

  it('fails as vLLM does on a name=path item with a second "=" (an uncaught ValueError); the JSON form takes any path', () => {
    expect(() => parseCli(['serve', 'm', '--lora-modules', 'lr=/loras/lr=1e-4'])).toThrow(new CliValueError('too many values to unpack (expected 2)'));
    expect(serveArgs(['serve', 'm', '--lora-modules', '{"name":"lr","path":"/loras/lr=1e-4"}']).loraModules).toEqual([{ name: 'lr', path: '/loras/lr=1e-4', base_model_name: null }]);
  });

  it('rejects bad --lora-modules JSON with exit status 2', () => {
    const out = exitOf(['serve', 'm', '--lora-modules', '{bad']);
    expect(out.code).toBe(2);
    expect(out.stderr).toContain('vllm serve: error: Invalid JSON format for --lora-modules: {bad');
  });

  it('reports an unknown flag from the top-level parser with exit status 2', () => {
    const out = exitOf(['serve', 'm', '--foo']);
    expect(out.code).toBe(2);
    expect(out.stderr).toMatch(/^usage: vllm /);
    expect(out.stderr).toContain('vllm: error: unrecognized arguments: --foo\n');
  });

  it('treats the removed --disable-log-requests as unknown', () => {
    expect(exitOf(['serve', 'm', '--disable-log-requests']).stderr).toContain(
      'unrecognized arguments: --disable-log-requests',
    );
  });

  it('rejects an invalid choice and a non-integer the way argparse does', () => {
    expect(exitOf(['serve', 'm', '--dtype', 'foo']).stderr).toContain(
      "vllm serve: error: argument --dtype: invalid choice: 'foo' (choose from auto, bfloat16, float, float16, float32, half)",
    );
    expect(exitOf(['serve', 'm', '--max-lora-rank', '7']).stderr).toContain(
      'argument --max-lora-rank: invalid choice: 7 (choose from 1, 8, 16, 32, 64, 128, 256, 320, 512)',
    );
    const out = exitOf(['serve', 'm', '--port', 'abc']);
    expect(out.code).toBe(2);
    expect(out.stderr).toContain("argument --port: invalid int value: 'abc'");
  });

  it('reports a missing value and an ambiguous prefix', () => {
    expect(exitOf(['serve', 'm', '--port']).stderr).toContain('argument --port: expected one argument');
    expect(exitOf(['serve', 'm', '--enable-p', 'x']).stderr).toContain('ambiguous option: --enable-p could match');
  });

  it('raises ValueError for --served-model-name without a positional model', () => {
    expect(() => parseCli(['serve', '--port', '8000', '--served-model-name', 'foo'])).toThrow(CliValueError);
  });

  it("raises validate_parsed_serve_args' TypeError for the flag combinations vLLM refuses", () => {
    const refusal = (argv: string[]) => {
      try {
        parseCli(argv);
      } catch (e) {
        return e instanceof CliTypeError ? e.message : `not a TypeError: ${String(e)}`;
      }
      return 'accepted';
    };
    expect(refusal(['serve', 'm', '--enable-auto-tool-choice'])).toBe('Error: --enable-auto-tool-choice requires --tool-call-parser');
    expect(refusal(['serve', 'm', '--enable-auto-tool-choice', '--tool-call-parser', 'hermes'])).toBe('accepted');
    expect(refusal(['serve', 'm', '--enable-log-outputs'])).toBe('Error: --enable-log-outputs requires --enable-log-requests');
    expect(refusal(['serve', 'm', '--enable-log-outputs', '--enable-log-requests'])).toBe('accepted');
    expect(refusal(['serve', 'm', '--enable-per-request-metrics', '--disable-log-stats'])).toContain('--enable-per-request-metrics');
    expect(refusal(['serve', 'm', '--enable-per-request-metrics'])).toBe('accepted');
  });

  it('logs non-default args as a Python dict with the api key redacted', () => {
    const args = serveArgs(['serve', 'm', '--port', '9000', '--api-key', 'secret', '--gpu-memory-utilization', '0.5']);
    expect(args.nonDefaultArgs).toBe(
      "{'model_tag': 'm', 'port': 9000, 'api_key': '***', 'model': 'm', 'gpu_memory_utilization': 0.5}",
    );
  });

  it('accepts negative numbers as values', () => {
    expect(serveArgs(['serve', 'm', '--seed', '-1']).model).toBe('m');
  });

  it('warns about duplicated flags', () => {
    const outcome = parseCli(['serve', 'm', '--port', '1', '--port', '2']);
    expect(outcome.warnings.map((w) => w.message)).toContain('Found duplicate keys --port');
  });
});
