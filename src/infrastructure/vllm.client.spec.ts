import { AxiosError } from 'axios';
import { readVllmError, toAppError, upstreamStatusError } from './vllm.client';
import { vllmBaseUrl } from './infrastructure.module';

describe('readVllmError', () => {
  it("reads vLLM's current nested envelope", () => {
    expect(readVllmError({ error: { message: 'm', type: 'NotFoundError', param: 'model', code: 404 } })).toEqual({
      message: 'm',
      type: 'NotFoundError',
      param: 'model',
      code: 404,
    });
  });

  it('reads the flat envelope of old vLLM and SGLang', () => {
    expect(readVllmError({ object: 'error', message: 'm', type: 'BadRequest', param: null, code: 400 })?.message).toBe('m');
  });

  it("reads SGLang's LoRA failures", () => {
    expect(readVllmError({ success: false, error_message: 'LoRA adapter x is already loaded', loaded_adapters: {} })?.message).toBe(
      'LoRA adapter x is already loaded',
    );
    expect(readVllmError({ success: true, error_message: null })).toBeNull();
  });

  it('returns null for anything else', () => {
    expect(readVllmError('text')).toBeNull();
    expect(readVllmError({ error: 'Unauthorized' })).toBeNull();
  });
});

describe('upstreamStatusError', () => {
  it("passes vLLM's message on for client-input statuses", () => {
    const err = upstreamStatusError(400, { error: { message: 'prompt too long', type: 'BadRequestError', param: 'input_tokens', code: 400 } });
    expect([err.code, err.message, err.upstreamStatus, err.param]).toEqual(['UPSTREAM_REJECTED', 'prompt too long', 400, 'input_tokens']);
  });

  it('hides the details of server-side failures', () => {
    const err = upstreamStatusError(500, { error: { message: 'EngineCore at /opt/x.py failed', type: 'InternalServerError', param: null, code: 500 } });
    expect(err.code).toBe('UPSTREAM_ERROR');
    expect(err.message).not.toContain('/opt');
  });

  it('treats 503 as not ready, and 401 (our key) as an upstream failure', () => {
    expect(upstreamStatusError(503, null).code).toBe('VLLM_NOT_READY');
    expect(upstreamStatusError(401, { error: 'Unauthorized' }).code).toBe('UPSTREAM_ERROR');
  });
});

describe('toAppError', () => {
  it('maps refused connections to 503 and timeouts to 504', () => {
    expect(toAppError(new AxiosError('x', 'ECONNREFUSED'), 1000).code).toBe('VLLM_NOT_READY');
    expect(toAppError(new AxiosError('x', 'ETIMEDOUT'), 1000).code).toBe('UPSTREAM_TIMEOUT');
    expect(toAppError(new Error('boom'), 1000).code).toBe('UPSTREAM_ERROR');
  });
});

describe('vllmBaseUrl', () => {
  it('reaches a wildcard bind over loopback and brackets IPv6', () => {
    expect(vllmBaseUrl({ host: '0.0.0.0', port: 8000 })).toBe('http://127.0.0.1:8000');
    expect(vllmBaseUrl({ host: '::', port: 8000 })).toBe('http://[::1]:8000');
    expect(vllmBaseUrl({ host: '10.0.0.5', port: 9 })).toBe('http://10.0.0.5:9');
  });
});
