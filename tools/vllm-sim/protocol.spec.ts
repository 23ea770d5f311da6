import {
  modelValidatorError,
  requestValidationError,
  sanitizeMessage,
  unsupportedMediaType,
  validationError,
} from './protocol';

describe('vLLM error envelopes', () => {
  it('appends parameter and value to a VLLMValidationError message', () => {
    const e = validationError('temperature must be non-negative, got -1.0.', 'temperature', '-1.0');
    expect(e.body()).toEqual({
      error: {
        message: 'temperature must be non-negative, got -1.0. (parameter=temperature, value=-1.0)',
        type: 'BadRequestError',
        param: 'temperature',
        code: 400,
      },
    });
  });

  it('renders a pydantic missing-field error like the validation handler', () => {
    const e = requestValidationError([
      { type: 'missing', loc: ['body', 'messages'], msg: 'Field required', input: { model: 'm' } },
    ]);
    expect(e.status).toBe(400);
    expect(e.type).toBe('Bad Request');
    expect(e.param).toBe('body.messages');
    expect(e.message).toBe(
      "1 validation error:\n  {'type': 'missing', 'loc': 'body.messages', 'msg': 'Field required', 'input': '<dict of 1 items>'}",
    );
  });

  it('answers a wrong content type with the validate_json_request message and no param', () => {
    const e = unsupportedMediaType();
    expect(e.message).toBe("1 validation error:\n  Unsupported Media Type: Only 'application/json' is allowed");
    expect(e.param).toBeNull();
  });

  it('takes the param of a model validator from its VLLMValidationError', () => {
    const e = modelValidatorError('Stream options can only be defined when `stream=True`.', 'stream_options', {});
    expect(e.param).toBe('stream_options');
    expect(e.message).toContain('Stream options can only be defined when `stream=True`.');
  });

  it('sanitizes absolute paths and object addresses', () => {
    expect(sanitizeMessage('bad <obj at 0xdeadbeef> in /usr/lib/x.py')).toBe('bad <obj> in <path>');
  });
});
