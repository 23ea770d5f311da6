/**
 * The Dockerfile runs the service as `npm start` does: the same Node flags (README,
 * "Performance"), the same entry point, no CMD that would override $TIDE_VLLM_CONFIG.
 */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { planCall } from '../src/cli';
import { repoRoot } from './harness';

const dockerfile = readFileSync(join(repoRoot, 'Dockerfile'), 'utf8');
const pkg = JSON.parse(readFileSync(join(repoRoot, 'package.json'), 'utf8')) as {
  scripts: { start: string };
  scarfSettings?: { enabled?: boolean };
  allowScripts?: Record<string, boolean>;
};
const startScript = pkg.scripts.start;

describe('Dockerfile', () => {
  it("runs node with npm start's flags and entry point, under tini", () => {
    const entrypoint = JSON.parse(/^ENTRYPOINT (\[.*\])$/m.exec(dockerfile)?.[1] ?? 'null') as string[] | null;
    expect(entrypoint?.slice(0, 2)).toEqual(['/usr/bin/tini', '--']);
    // `exec node FLAGS… dist/src/main.js` in package.json.
    const npmStart = startScript.replace(/^exec /, '').split(/\s+/);
    expect(entrypoint?.slice(2)).toEqual(npmStart);
  });

  it("checks its health with the CLI's health command, which the build puts where it runs it", () => {
    const check = JSON.parse(/^HEALTHCHECK .* CMD (\[.*\])$/m.exec(dockerfile)?.[1] ?? 'null') as string[] | null;
    expect(check?.slice(0, 3)).toEqual(['node', 'dist/src/cli.js', 'health']);
    expect(dockerfile).toMatch(/^COPY --from=build \/app\/dist dist$/m); // WORKDIR /app: dist/src/cli.js resolves there
    // The command exists (planCall throws a UsageError for an unknown one) and asks the service's /health.
    expect(planCall([check![2]], undefined)).toEqual({ method: 'GET', path: '/health' });
  });

  it('has no CMD: a -c there would override $TIDE_VLLM_CONFIG', () => {
    expect(dockerfile).not.toMatch(/^CMD /m);
  });

  it("builds with an npm ci that sends no install-time telemetry", () => {
    // @nestjs/swagger's swagger-ui-dist depends on @scarf/scarf, whose postinstall reports the
    // install to scarf.sh unless the root package.json opts out: npm 11.16+ does not run a script
    // allowScripts denies; an older npm (the build image's npm 10) runs it, and it reads scarfSettings.
    expect(dockerfile).toMatch(/^RUN npm ci\b/m);
    expect([pkg.allowScripts?.['@scarf/scarf'], pkg.scarfSettings?.enabled]).toEqual([false, false]);
  });
});
