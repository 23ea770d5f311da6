import { PyFloat, PyTuple, pyFloat, pyJsonDumps, pyOsError, pyOsErrorLine, pyRepr, pyTraceback } from './python-format';

describe('Python-compatible formatting', () => {
  it.each([
    [1, '1.0'],
    [-1, '-1.0'],
    [0.92, '0.92'],
    [1e16, '1e+16'],
    [1.5e-5, '1.5e-05'],
    [0.0001, '0.0001'],
    [123456.789, '123456.789'],
    [Infinity, 'inf'],
    [NaN, 'nan'],
  ])('formats the float %p like repr()', (value, expected) => {
    expect(pyFloat(value)).toBe(expected);
  });

  it('prints dicts, lists, tuples, strings and constants like repr()', () => {
    expect(
      pyRepr({ a: 'x', b: [1, new PyFloat(2)], c: null, d: true, e: new PyTuple(['generate']) }),
    ).toBe("{'a': 'x', 'b': [1, 2.0], 'c': None, 'd': True, 'e': ('generate',)}");
    expect(pyRepr("it's")).toBe('"it\'s"');
    expect(pyRepr('a\nb')).toBe("'a\\nb'");
  });

  it('dumps JSON with json.dumps spacing and ensure_ascii', () => {
    expect(pyJsonDumps({ error: { message: 'é', param: null, code: 500 } })).toBe(
      '{"error": {"message": "\\u00e9", "param": null, "code": 500}}',
    );
  });

  it('renders a traceback with the exception last', () => {
    const lines = pyTraceback([['vllm/x.py', 3, 'f', 'g()']], 'OSError: boom');
    expect(lines[0]).toBe('Traceback (most recent call last):');
    expect(lines[1]).toBe('  File "/usr/local/lib/python3.12/dist-packages/vllm/x.py", line 3, in f');
    expect(lines.at(-1)).toBe('OSError: boom');
  });

  it.each([
    ['EADDRINUSE', -98, 'OSError: [Errno 98] Address already in use'],
    ['EADDRNOTAVAIL', -99, 'OSError: [Errno 99] Cannot assign requested address'],
    ['EACCES', -13, 'PermissionError: [Errno 13] Permission denied'],
    ['ENOTFOUND', -3008, 'socket.gaierror: [Errno -2] Name or service not known'],
    ['EINVAL', -22, 'OSError: [Errno 22] listen EINVAL: invalid argument'],
  ])('names the bind error %s as Python does', (code, errno, line) => {
    const error = Object.assign(new Error(`listen ${code}: invalid argument`), { code, errno });
    expect(pyOsErrorLine(pyOsError(error))).toBe(line);
  });
});
