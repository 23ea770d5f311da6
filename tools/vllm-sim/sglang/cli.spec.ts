import {
  SGLANG_DEFAULT_CONTEXT_LENGTH,
  SglangArgs,
  SglangCliException,
  SglangCliOutcome,
  parseSglangCli,
  serverArgsRepr,
  usageText,
} from './cli';

function serve(argv: string[]): SglangArgs {
  const outcome = parseSglangCli(['serve', ...argv]);
  if (outcome.kind !== 'serve') throw new Error(`expected serve, got: ${outcome.stderr}`);
  return outcome.args;
}

function exitOf(argv: string[]): Extract<SglangCliOutcome, { kind: 'exit' }> {
  const outcome = parseSglangCli(['serve', ...argv]);
  if (outcome.kind !== 'exit') throw new Error('expected an exit outcome');
  return outcome;
}

describe('sglang serve command line', () => {
  it('takes --model-path (alias --model) or a positional model, with SGLang defaults', () => {
    const args = serve(['--model-path', 'org/m']);
    expect(args).toMatchObject({
      modelPath: 'org/m',
      servedModelName: 'org/m',
      tokenizerPath: 'org/m',
      host: '127.0.0.1',
      port: 30000,
      tpSize: 1,
      contextLength: SGLANG_DEFAULT_CONTEXT_LENGTH,
      maxPrefillTokens: 16384,
      maxLorasPerBatch: 8,
      enableMetrics: false,
      apiKey: null,
    });
    expect(serve(['--model', 'x']).modelPath).toBe('x');
    expect(serve(['pos-model', '--port', '1234'])).toMatchObject({ modelPath: 'pos-model', port: 1234 });
  });

  it("parses tide-vllm's full SGLang argv", () => {
    const args = serve([
      '--model-path', 'm', '--served-model-name', 'name', '--host', '0.0.0.0', '--port', '8001',
      '--mem-fraction-static', '0.5', '--tp-size', '2', '--max-running-requests', '7',
      '--max-prefill-tokens', '4096', '--context-length', '8k', '--dtype', 'bfloat16',
      '--chunked-prefill-size', '-1', '--disable-radix-cache', '--enable-memory-saver',
      '--enable-weights-cpu-backup', '--enable-lora', '--max-loras-per-batch', '3', '--max-lora-rank', '16',
      '--lora-paths', 'a=/p/a', '/p/b', '{"lora_name":"c","lora_path":"/p/c","pinned":true}',
      '--api-key', 'secret', '--enable-metrics',
    ]);
    expect(args).toMatchObject({
      servedModelName: 'name',
      host: '0.0.0.0',
      port: 8001,
      memFractionStatic: 0.5,
      tpSize: 2,
      maxRunningRequests: 7,
      maxPrefillTokens: 4096,
      contextLength: 8000,
      dtype: 'bfloat16',
      chunkedPrefillSize: -1,
      disableRadixCache: true,
      enableMemorySaver: true,
      enableWeightsCpuBackup: true,
      enableLora: true,
      maxLorasPerBatch: 3,
      maxLoraRank: 16,
      apiKey: 'secret',
      enableMetrics: true,
    });
    expect(args.loraPaths).toEqual([
      { lora_name: 'a', lora_path: '/p/a', pinned: false },
      { lora_name: '/p/b', lora_path: '/p/b', pinned: false },
      { lora_name: 'c', lora_path: '/p/c', pinned: true },
    ]);
  });

  it('enables LoRA when --lora-paths is given and accepts aliases and unique prefixes', () => {
    expect(serve(['m', '--lora-paths', 'x=/y']).enableLora).toBe(true);
    expect(serve(['m']).enableLora).toBe(false);
    expect(serve(['m', '--tensor-parallel-size', '4']).tpSize).toBe(4);
    expect(serve(['m', '--tp', '2']).tpSize).toBe(2);
    expect(serve(['m', '--enable-metr']).enableMetrics).toBe(true);
    expect(serve(['m', '--uvicorn-access-log-exclude-prefixes', '/metrics', '/health']).accessLogExcludePrefixes).toEqual([
      '/metrics',
      '/health',
    ]);
  });

  it('rejects unknown flags, --no- forms, underscores and a missing model like argparse (exit 2)', () => {
    for (const argv of [['m', '--foo'], ['m', '--no-enable-metrics'], ['m', '--model_path', 'x']]) {
      const out = exitOf(argv);
      expect(out.code).toBe(2);
      expect(out.stderr).toMatch(/^usage: sglang serve \[-h\] --model-path MODEL_PATH\n/);
      expect(out.stderr).toContain(`sglang serve: error: unrecognized arguments: ${argv.slice(1).join(' ')}\n`);
    }
    const missing = exitOf(['--port', '1']);
    expect(missing.code).toBe(2);
    expect(missing.stderr.endsWith('sglang serve: error: the following arguments are required: --model-path/--model\n')).toBe(true);
    expect(exitOf(['m', '--dtype', 'fp8']).stderr).toContain(
      "sglang serve: error: argument --dtype: invalid choice: 'fp8' (choose from auto, half, float16, bfloat16, float, float32)",
    );
    expect(exitOf(['m', '--port', 'x']).stderr).toContain("argument --port: invalid int value: 'x'");
    expect(exitOf(['m', '--enable-lora=1']).stderr).toContain("argument --enable-lora: ignored explicit argument '1'");
    // --served-model-name takes one string.
    expect(exitOf(['m', '--served-model-name', 'a', 'b']).stderr).toContain('unrecognized arguments: b');
  });

  it('wraps the usage line like argparse at 78 columns', () => {
    const lines = usageText().trimEnd().split('\n');
    expect(lines[0]).toBe('usage: sglang serve [-h] --model-path MODEL_PATH');
    expect(lines.slice(1).every((l) => l.startsWith(' '.repeat(20)))).toBe(true);
  });

  it('raises (traceback, exit 1) for --enable-lora with no --lora-paths and no --lora-target-modules, as SGLang asserts', () => {
    expect(() => parseSglangCli(['serve', 'm', '--enable-lora', '--max-lora-rank', '16'])).toThrow(/When no initial --lora-paths is provided/);
    expect(() => parseSglangCli(['serve', 'm', '--enable-lora', '--max-lora-rank', '16', '--lora-target-modules', 'all'])).not.toThrow();
  });

  it('raises (traceback, exit 1) for a JSON --lora-paths item without its keys', () => {
    expect(() => parseSglangCli(['serve', 'm', '--lora-paths', '{"name":"x"}'])).toThrow(SglangCliException);
  });

  it('logs the resolved ServerArgs as a dataclass repr', () => {
    const repr = serverArgsRepr(serve(['m', '--port', '5']));
    expect(repr).toMatch(/^ServerArgs\(model_path='m', tokenizer_path='m', /);
    expect(repr).toContain("host='127.0.0.1', port=5,");
    expect(repr).toContain('mem_fraction_static=0.88');
    expect(repr).toContain("served_model_name='m'");
    expect(repr).toContain('enable_lora=None');
  });

  it('has a top-level `sglang` parser with the serve command only', () => {
    const out = parseSglangCli(['launch']);
    expect(out).toMatchObject({ kind: 'exit', code: 2 });
    expect(out.kind === 'exit' && out.stderr).toContain("sglang: error: argument command: invalid choice: 'launch'");
    expect(parseSglangCli(['serve', '--help'])).toMatchObject({ kind: 'exit', code: 0 });
  });
});
