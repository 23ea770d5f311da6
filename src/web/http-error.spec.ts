import { AppError, type ErrorCode } from '../domain/app-error';
import { errorBody, flavorOf, openAiType, originForm, pathOf, routePathOf, statusOf, toHttpError, transportError } from './http-error';

describe('statusOf', () => {
  const cases: Array<[ErrorCode, number]> = [
    ['INVALID_REQUEST', 400],
    ['UNAUTHORIZED', 401],
    ['NOT_FOUND', 404],
    ['CONFLICT', 409],
    ['REQUEST_TIMEOUT', 408],
    ['PAYLOAD_TOO_LARGE', 413],
    ['URI_TOO_LONG', 414],
    ['REQUEST_HEADERS_TOO_LARGE', 431],
    ['UNSUPPORTED_MEDIA_TYPE', 415],
    ['OVERLOADED', 429],
    ['INTERNAL', 500],
    ['UPSTREAM_ERROR', 502],
    ['VLLM_DISABLED', 503],
    ['VLLM_NOT_READY', 503],
    ['VLLM_START_FAILED', 503],
    ['SHUTTING_DOWN', 503],
    ['UPSTREAM_TIMEOUT', 504],
  ];
  it.each(cases)('maps %s to %i', (code, status) => {
    expect(statusOf(new AppError(code, 'x'))).toBe(status);
  });

  it("passes vLLM's own status on for a rejected input, 400 by default", () => {
    expect(statusOf(new AppError('UPSTREAM_REJECTED', 'x', { upstreamStatus: 404 }))).toBe(404);
    expect(statusOf(new AppError('UPSTREAM_REJECTED', 'x'))).toBe(400);
  });

  it('adds Retry-After to 503 and 429 only', () => {
    expect(toHttpError(new AppError('VLLM_NOT_READY', 'x')).retryAfter).toBe(5);
    expect(toHttpError(new AppError('OVERLOADED', 'x', { retryAfter: 1 })).retryAfter).toBe(1);
    expect(toHttpError(new AppError('UPSTREAM_ERROR', 'x')).retryAfter).toBeUndefined();
  });
});

describe('errorBody', () => {
  const http = toHttpError(new AppError('UPSTREAM_REJECTED', 'too long', { upstreamStatus: 400, param: 'input_tokens' }));

  it('renders the simple envelope with content null', () => {
    expect(errorBody(http, 'simple', 'r1')).toEqual({
      request_id: 'r1',
      content: null,
      model: null,
      usage: null,
      finish_reason: null,
      error: { type: 'upstream_rejected', message: 'too long' },
    });
  });

  it("renders OpenAI's shape with the SDK's type names", () => {
    expect(errorBody(http, 'openai', 'r1')).toEqual({
      error: { message: 'too long', type: 'BadRequestError', param: 'input_tokens', code: 400 },
    });
    const notFound = toHttpError(new AppError('NOT_FOUND', 'nope'));
    expect((errorBody(notFound, 'openai', null) as { error: { type: string } }).error.type).toBe('NotFoundError');
  });
});

describe('flavorOf', () => {
  it('picks the shape by route, and by body on /v1/chat/completions', () => {
    expect(flavorOf('/chat/completions', {})).toBe('simple');
    expect(flavorOf('/generate?x=1', undefined)).toBe('simple');
    expect(flavorOf('/v1/chat/completions', { prompt: 'x' })).toBe('simple');
    expect(flavorOf('/v1/chat/completions', { messages: [] })).toBe('openai');
    expect(flavorOf('/v1/models', undefined)).toBe('openai');
    expect(flavorOf('/tokenize', undefined)).toBe('openai');
    expect(flavorOf('/detokenize?x=1', undefined)).toBe('openai');
    expect(flavorOf('/admin/status', undefined)).toBe('plain');
  });

  it('judges the path as routed, however it is spelled (percent-escapes, an absolute URL)', () => {
    expect(flavorOf('/tokeniz%65', undefined)).toBe('openai');
    expect(flavorOf('/%761/chat/completions', { messages: [] })).toBe('openai');
    expect(flavorOf('/v1/chat/completion%73', { prompt: 'x' })).toBe('simple');
    expect(flavorOf('http://127.0.0.1:10002/generate?x=1', undefined)).toBe('simple');
  });
});

describe('originForm and routePathOf', () => {
  it('drop an absolute URL\'s scheme and host; routePathOf also the query, with percent-escapes decoded', () => {
    const cases: Array<[string, string, string]> = [
      ['/v1/models', '/v1/models', '/v1/models'],
      ['/v1/respons%65s?stream=true', '/v1/respons%65s?stream=true', '/v1/responses'],
      ['http://127.0.0.1/v1/responses', '/v1/responses', '/v1/responses'],
      ['HTTP://h:1/v1/responses/r%2F1?x', '/v1/responses/r%2F1?x', '/v1/responses/r/1'],
      ['http://host', '/', '/'],
      ['http://host?q', '/?q', '/'],
      ['http://h?x=/v1/completions', '/?x=/v1/completions', '/'], // the authority ends at the "?"
      ['*', '/*', '/*'],
      ['/%61dmin/%zz', '/%61dmin/%zz', '/admin/%zz'],
    ];
    for (const [url, origin, route] of cases) expect([url, originForm(url), routePathOf(url)]).toEqual([url, origin, route]);
  });
});

describe('pathOf', () => {
  it('is what comes before the first "?"', () => {
    expect(pathOf('/v1/models')).toBe('/v1/models');
    expect(pathOf('/v1/models?x=1?y')).toBe('/v1/models');
    expect(pathOf('/health?')).toBe('/health');
    expect(pathOf('?a')).toBe('');
    expect(pathOf('')).toBe('');
  });
});

describe('transportError', () => {
  it("keeps the status Node or Fastify gave, with a type and message of the project's, never a framework code", () => {
    const cases: Array<[string | undefined, number, string]> = [
      ['ERR_HTTP_REQUEST_TIMEOUT', 408, 'request_timeout'],
      ['HPE_HEADER_OVERFLOW', 431, 'request_headers_too_large'],
      ['HPE_INVALID_METHOD', 400, 'invalid_request'],
      [undefined, 400, 'invalid_request'],
      ['FST_ERR_BAD_URL', 400, 'invalid_request'],
      ['FST_ERR_MAX_PARAM_LENGTH', 414, 'uri_too_long'],
    ];
    for (const [code, status, type] of cases) {
      const http = transportError(code);
      expect([code, http.status, http.type]).toEqual([code, status, type]);
      expect(http.message).not.toMatch(/FST_|HPE_|ERR_/);
    }
  });
});

describe('openAiType', () => {
  it('names the status it is given: the same type for an error body and an in-stream error event', () => {
    const cases: Array<[number, string]> = [
      [400, 'BadRequestError'],
      [404, 'NotFoundError'],
      [408, 'RequestTimeoutError'],
      [431, 'RequestHeaderFieldsTooLargeError'],
      [500, 'InternalServerError'],
      [502, 'InternalServerError'],
      [503, 'ServiceUnavailableError'],
      [504, 'TimeoutError'],
    ];
    expect(cases.map(([status]) => [status, openAiType(status)])).toEqual(cases);
  });
});
