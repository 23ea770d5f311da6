/**
 * The Kubernetes manifests in deploy/kubernetes agree with the service: probe paths and ports,
 * a startup probe that outlasts vllm.startup_timeout, a grace period that outlasts the drain and
 * the vLLM stop, and a configuration that tide-vllm itself accepts.
 */
import { readFileSync } from 'node:fs';
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

function probeSeconds(probe: Doc): number {
  return probe.periodSeconds * probe.failureThreshold;
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

  it('probes use /health for liveness and start-up, /ready for readiness, on the service port', () => {
    expect(port).toBe(config.web.bind_address.port);
    expect(app.livenessProbe.httpGet).toEqual({ path: '/health', port: 'http' });
    expect(app.startupProbe.httpGet).toEqual({ path: '/health', port: 'http' });
    expect(app.readinessProbe.httpGet).toEqual({ path: '/ready', port: 'http' });
  });

  it('the startup probe waits at least vllm.startup_timeout', () => {
    expect(probeSeconds(app.startupProbe)).toBeGreaterThanOrEqual(config.vllm.startup_timeout);
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
});
