/**
 * The Kubernetes manifests in deploy/kubernetes agree with the service: probe paths and ports,
 * a vLLM container's startup probe that outlasts vllm.startup_timeout, a grace period that
 * outlasts the drain and the vLLM stop, images and resources a cluster runs as they are, and a
 * configuration that tide-vllm itself accepts.
 */
import { existsSync, readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import * as yaml from 'js-yaml';
import { parseConfig } from '../src/config/config.loader';
import type { TideConfig } from '../src/config/config.schema';
import { repoRoot } from './harness';

type Doc = Record<string, any>; // manifests are free-form YAML

const dir = join(repoRoot, 'deploy', 'kubernetes');
const load = (file: string): Doc[] => yaml.loadAll(readFileSync(join(dir, file), 'utf8')) as Doc[];
const byKind = (docs: Doc[], kind: string): Doc => docs.find((d) => d.kind === kind) as Doc;

function configOf(configMap: Doc): TideConfig {
  // Keys come from a Secret at run time; any value will do to validate the rest.
  return parseConfig(yaml.load(configMap.data['tide-vllm.yaml']), { TIDE_API_KEY: 'k', TIDE_ADMIN_KEY: 'a' }, 'configmap');
}

function container(deployment: Doc, name: string): Doc {
  return deployment.spec.template.spec.containers.find((c: Doc) => c.name === name);
}

/** Every container of the manual-mode Deployment (tide-vllm and vLLM). */
function manualContainers(): Doc[] {
  return byKind(load('manual-mode.yaml'), 'Deployment').spec.template.spec.containers;
}

function probeSeconds(probe: Doc): number {
  return probe.periodSeconds * probe.failureThreshold;
}

/** The files a manifest's header comment tells the operator to apply with it ("Use with a.yaml, b.yaml and c.yaml."). */
function headerPointsTo(file: string): string[] {
  const lines = readFileSync(join(dir, file), 'utf8').split('\n');
  const header = lines.slice(0, lines.findIndex((l) => !l.startsWith('#'))).map((l) => l.replace(/^#\s?/, '')).join(' ');
  const useWith = /Use with (.*?)[.:](?:\s|$)/.exec(header);
  return useWith ? (useWith[1].match(/[\w-]+\.yaml/g) ?? []) : [];
}

/** True when a Service's selector picks pods that carry these labels (an empty selector picks none here). */
function selects(service: Doc, labels: Record<string, string>): boolean {
  const selector: Record<string, string> = service.spec?.selector ?? {};
  return Object.keys(selector).length > 0 && Object.entries(selector).every(([k, v]) => labels?.[k] === v);
}

describe('deploy/kubernetes (auto-start)', () => {
  const deployment = byKind(load('deployment.yaml'), 'Deployment');
  const config = configOf(byKind(load('configmap.yaml'), 'ConfigMap'));
  const app = container(deployment, 'tide-vllm');
  const port = app.ports.find((p: Doc) => p.name === 'http').containerPort;

  it('the configmap is a configuration tide-vllm accepts', () => {
    expect(config.vllm.auto_start).toBe(true);
    expect(config.vllm.host).toBe('127.0.0.1');
    expect(config.auth.api_keys).toEqual(['k']);
  });

  it('probes use /health for liveness, /ready for readiness, on the service port; no startup probe (/health is 200 while the model loads)', () => {
    expect(port).toBe(config.web.bind_address.port);
    expect(app.livenessProbe.httpGet).toEqual({ path: '/health', port: 'http' });
    expect(app.readinessProbe.httpGet).toEqual({ path: '/ready', port: 'http' });
    expect(app.startupProbe).toBeUndefined();
  });

  it('images are pulled only when not on the node (a :latest tag would mean Always), and every container requests CPU and memory', () => {
    const containers = [app, ...manualContainers()];
    expect(containers.map((c: Doc) => [c.name, c.imagePullPolicy])).toEqual(containers.map((c: Doc) => [c.name, 'IfNotPresent']));
    for (const c of containers) expect([c.name, c.resources?.requests?.cpu !== undefined, c.resources?.requests?.memory !== undefined]).toEqual([c.name, true, true]);
  });

  it('the grace period outlasts preStop + drain_timeout + stop_timeout', () => {
    const preStop = app.lifecycle?.preStop?.sleep?.seconds ?? 0;
    expect(deployment.spec.template.spec.terminationGracePeriodSeconds).toBeGreaterThan(
      preStop + config.web.drain_timeout + config.vllm.stop_timeout,
    );
  });

  it('requests a GPU and mounts the config where args point', () => {
    expect(app.resources.limits['nvidia.com/gpu']).toBeGreaterThanOrEqual(1);
    const mount = app.volumeMounts.find((m: Doc) => m.name === 'config').mountPath;
    expect(app.args).toEqual(['-c', `${mount}/tide-vllm.yaml`]);
  });

  it('the Service targets the named port, and the Secret holds the keys the env reads', () => {
    expect(byKind(load('service.yaml'), 'Service').spec.ports[0].targetPort).toBe('http');
    const secret = byKind(load('secret.yaml'), 'Secret');
    for (const env of app.env) {
      if (env.valueFrom?.secretKeyRef) expect(Object.keys(secret.stringData)).toContain(env.valueFrom.secretKeyRef.key);
    }
  });
});

describe('deploy/kubernetes (manual mode)', () => {
  const docs = load('manual-mode.yaml');
  const deployment = byKind(docs, 'Deployment');
  const config = configOf(byKind(docs, 'ConfigMap'));
  const app = container(deployment, 'tide-vllm');
  const vllm = container(deployment, 'vllm');

  it('tide-vllm watches the vLLM container it runs beside, on the port and name vLLM serves', () => {
    expect(config.vllm.auto_start).toBe(false);
    const arg = (flag: string) => vllm.args[vllm.args.indexOf(flag) + 1];
    expect(Number(arg('--port'))).toBe(config.vllm.port);
    expect(arg('--served-model-name')).toBe(config.vllm.model_name);
    expect(app.readinessProbe.httpGet.path).toBe('/ready');
    expect(app.livenessProbe.httpGet.path).toBe('/health');
    expect(deployment.spec.template.spec.terminationGracePeriodSeconds).toBeGreaterThan(
      (app.lifecycle?.preStop?.sleep?.seconds ?? 0) + config.web.drain_timeout,
    );
  });

  it('vLLM outlives the drain: all containers are stopped at once, so its preStop waits out tide-vllm’s pause and drain', () => {
    const drained = (app.lifecycle?.preStop?.sleep?.seconds ?? 0) + config.web.drain_timeout;
    expect(vllm.lifecycle?.preStop?.sleep?.seconds).toBeGreaterThanOrEqual(drained);
    expect(deployment.spec.template.spec.terminationGracePeriodSeconds).toBeGreaterThan(vllm.lifecycle.preStop.sleep.seconds);
  });

  it('the vLLM container has exec probes on /health at the loopback host and port vLLM is started with', () => {
    const arg = (flag: string) => vllm.args[vllm.args.indexOf(flag) + 1];
    for (const probe of [vllm.startupProbe, vllm.livenessProbe]) {
      const command: string[] = probe.exec.command;
      expect(command[0]).toBe('python3'); // the vLLM image has python3; curl is not reliably there
      const urls = command.join(' ').match(/https?:\/\/[^\s'"]+/g) ?? [];
      expect(urls).toHaveLength(1);
      const url = new URL(urls[0] ?? '');
      expect(url.pathname).toBe('/health');
      expect(url.hostname).toBe(arg('--host'));
      expect(url.hostname).toBe(config.vllm.host);
      expect(Number(url.port)).toBe(Number(arg('--port')));
      expect(Number(url.port)).toBe(config.vllm.port);
      const inner = /timeout=(\d+(?:\.\d+)?)/.exec(command.join(' '));
      if (inner) expect(probe.timeoutSeconds).toBeGreaterThan(Number(inner[1]));
    }
  });

  it("the vLLM startup probe lets the model load: at least the auto-start vllm.startup_timeout, and vLLM's own wait as long (A11)", () => {
    const autoStart = configOf(byKind(load('configmap.yaml'), 'ConfigMap'));
    expect(probeSeconds(vllm.startupProbe)).toBeGreaterThanOrEqual(autoStart.vllm.startup_timeout);
    // vLLM gives up on its engine after VLLM_ENGINE_READY_TIMEOUT_S (600 s by default): a longer probe window would be unusable.
    const engineWait = (vllm.env as Array<{ name: string; value?: string }>).find((e) => e.name === 'VLLM_ENGINE_READY_TIMEOUT_S')?.value;
    expect(Number(engineWait)).toBeGreaterThanOrEqual(probeSeconds(vllm.startupProbe));
    expect(probeSeconds(vllm.livenessProbe)).toBeLessThan(probeSeconds(vllm.startupProbe));
  });
});

describe('deploy/kubernetes (every Deployment with the files its header names)', () => {
  const files = readdirSync(dir).filter((f) => f.endsWith('.yaml')).sort();
  const deploymentFiles = files.filter((f) => load(f).some((d) => d?.kind === 'Deployment'));
  const allDeployments = files.flatMap((f) => load(f).filter((d) => d?.kind === 'Deployment'));
  const allServices = files.flatMap((f) => load(f).filter((d) => d?.kind === 'Service'));

  it('finds both modes', () => {
    expect(deploymentFiles).toEqual(['deployment.yaml', 'manual-mode.yaml']);
  });

  describe.each(deploymentFiles)('%s', (file) => {
    const named = headerPointsTo(file);
    const docs = [file, ...named.filter((f) => existsSync(join(dir, f)))].flatMap(load).filter(Boolean);
    const deployment = byKind(load(file), 'Deployment');
    const pod = deployment.spec.template;

    it('the header names files that exist', () => {
      expect(named.length).toBeGreaterThan(0);
      for (const f of named) expect(existsSync(join(dir, f))).toBe(true);
    });

    it('a Service in the file or the files its header names selects its pods, on a port they name', () => {
      expect(selects({ spec: { selector: deployment.spec.selector.matchLabels } }, pod.metadata.labels)).toBe(true);
      const services = docs.filter((d) => d.kind === 'Service' && selects(d, pod.metadata.labels));
      expect(services.map((s) => s.metadata.name)).toHaveLength(1);
      const portNames = pod.spec.containers.flatMap((c: Doc) => (c.ports ?? []).map((p: Doc) => p.name));
      for (const port of services[0].spec.ports) expect(portNames).toContain(port.targetPort);
    });

    it('the ConfigMaps and Secrets its pods read are in the file or the files its header names', () => {
      const defined = (kind: string) => docs.filter((d) => d.kind === kind).map((d) => d.metadata.name);
      for (const volume of pod.spec.volumes ?? []) {
        if (volume.configMap) expect(defined('ConfigMap')).toContain(volume.configMap.name);
      }
      for (const c of pod.spec.containers) {
        for (const env of c.env ?? []) {
          const ref = env.valueFrom?.secretKeyRef;
          if (!ref) continue;
          expect(defined('Secret')).toContain(ref.name);
          const secret = docs.find((d) => d.kind === 'Secret' && d.metadata.name === ref.name) as Doc;
          if (!ref.optional) expect(Object.keys(secret.stringData ?? secret.data ?? {})).toContain(ref.key);
        }
      }
    });
  });

  it('no Service selects the pods of both modes', () => {
    for (const service of allServices) {
      const picked = allDeployments.filter((d) => selects(service, d.spec.template.metadata.labels));
      expect(picked.map((d) => d.metadata.name)).toHaveLength(1);
    }
  });
});
