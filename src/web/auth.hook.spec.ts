import { AuthConfig } from '../config/config.schema';
import { ApiKeys } from './auth.hook';

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
