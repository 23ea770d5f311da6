import { AuthConfig } from '../config/config.schema';
import { ApiKeys, crossSiteAdmin } from './auth.hook';

function keys(auth: Partial<AuthConfig>): ApiKeys {
  return new ApiKeys(Object.assign(new AuthConfig(), auth));
}

/** The message of the refusal a request gets, or null when it may proceed. */
function refused(apiKeys: ApiKeys, path: string, key?: string): string | null {
  return apiKeys.refusal('GET', path, key === undefined ? {} : { authorization: `Bearer ${key}` })?.message ?? null;
}

describe('ApiKeys refusals', () => {
  it('on the admin API with admin keys, ask for an admin key, and call any other key not one (a client key included)', () => {
    const both = keys({ api_keys: ['client'], admin_api_keys: ['admin'] });
    expect(refused(both, '/admin/status')).toBe('an admin key is required (auth.admin_api_keys; Authorization: Bearer KEY)');
    expect(refused(both, '/admin/status', 'client')).toBe('this key is not an admin key');
    expect(refused(both, '/admin/status', 'wrong')).toBe('this key is not an admin key');
    expect(refused(both, '/admin/status', 'admin')).toBeNull();
    // The API is the client keys' alone, and says so as before.
    expect(refused(both, '/v1/models')).toBe('an API key is required (Authorization: Bearer KEY)');
    expect(refused(both, '/v1/models', 'admin')).toBe('the API key is not valid');
  });

  it('without admin keys the API keys open the admin API, so an API key is what is asked for', () => {
    const clientOnly = keys({ api_keys: ['client'] });
    expect(refused(clientOnly, '/admin/status')).toBe('an API key is required (Authorization: Bearer KEY)');
    expect(refused(clientOnly, '/admin/status', 'wrong')).toBe('the API key is not valid');
    expect(refused(clientOnly, '/admin/status', 'client')).toBeNull();
  });

  it('/metrics behind the admin key (only admin keys set, protect_metrics) asks for an admin key', () => {
    const adminOnly = keys({ admin_api_keys: ['admin'], protect_metrics: true });
    expect(refused(adminOnly, '/metrics')).toBe('an admin key is required (auth.admin_api_keys; Authorization: Bearer KEY)');
    expect(refused(adminOnly, '/v1/models')).toBeNull();
  });
});

describe('crossSiteAdmin', () => {
  const refused = (path: string, headers: Record<string, string>) => crossSiteAdmin(path, { host: '10.0.0.5:10002', ...headers })?.code ?? null;

  it('refuses an admin request a web page of another origin sends (a body-less POST needs no preflight)', () => {
    expect(refused('/admin/restart', { origin: 'http://evil.example' })).toBe('FORBIDDEN');
    expect(refused('/admin/sleep', { 'sec-fetch-site': 'cross-site', origin: 'http://evil.example' })).toBe('FORBIDDEN');
    expect(refused('/admin/restart', { 'sec-fetch-site': 'same-site' })).toBe('FORBIDDEN');
    expect(refused('/admin/restart', { origin: 'null' })).toBe('FORBIDDEN'); // a sandboxed page or a file
  });

  it('takes curl, the CLI (neither header), the same origin (Swagger UI at /docs), and every other path', () => {
    expect(refused('/admin/restart', {})).toBeNull();
    expect(refused('/admin/restart', { origin: 'http://10.0.0.5:10002' })).toBeNull();
    expect(refused('/admin/restart', { 'sec-fetch-site': 'same-origin', origin: 'http://10.0.0.5:10002' })).toBeNull();
    expect(refused('/admin/status', { 'sec-fetch-site': 'none' })).toBeNull(); // typed in the address bar
    expect(refused('/v1/chat/completions', { origin: 'http://evil.example' })).toBeNull(); // CORS governs the API
  });
});
