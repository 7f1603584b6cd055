"""deploy/kuberay/rayservice.yaml, checked offline: against KubeRay's RayService CRD schema
(vendored in deploy/kuberay/crd/), strictly (an unknown field fails, as `kubectl apply`
rejects it by default), its serveConfigV2 against Ray Serve's schema and ours, and against
what the runbook (deploy/README.md) says it holds. Broken copies must fail the same check."""

from __future__ import annotations

import copy
import functools
import re
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from pydantic import ValidationError
from ray.serve.schema import ServeDeploySchema

from serving.config import ServeConfig

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
CRD = DEPLOY / "kuberay" / "crd" / "ray.io_rayservices.yaml"
MANIFEST = DEPLOY / "kuberay" / "rayservice.yaml"
POD_MONITOR = DEPLOY / "kuberay" / "podmonitor.yaml"
GPU_CONFIG = DEPLOY / "serve_config.gpu.yaml"
RUNBOOK = DEPLOY / "README.md"
Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRD is 1 MB of YAML


def load(path: Path) -> dict:
    return yaml.load(path.read_text(), Loader=Loader)


@functools.cache
def crd() -> dict:
    return load(CRD)


@functools.cache
def validator(version: str) -> jsonschema.Draft7Validator:
    (served,) = (v for v in crd()["spec"]["versions"] if v["name"] == version)
    return jsonschema.Draft7Validator(strict(copy.deepcopy(served["schema"]["openAPIV3Schema"])))


def strict(schema: dict) -> dict:
    """Every object with declared properties takes no others (unless the schema keeps unknown
    fields): what the API server's strict field validation, kubectl's default, enforces."""
    if "properties" in schema and "additionalProperties" not in schema and not schema.get(
            "x-kubernetes-preserve-unknown-fields"):
        schema["additionalProperties"] = False
    for key in ("properties", "patternProperties"):
        for child in schema.get(key, {}).values():
            strict(child)
    for key in ("items", "additionalProperties", "not"):
        if isinstance(schema.get(key), dict):
            strict(schema[key])
    for key in ("anyOf", "allOf", "oneOf"):
        for child in schema.get(key, []):
            strict(child)
    return schema


def problems(manifest: dict) -> list[str]:
    """Everything wrong with a RayService manifest; [] when it is valid."""
    spec = crd()["spec"]
    if manifest.get("kind") != spec["names"]["kind"]:
        return [f"kind {manifest.get('kind')!r} is not {spec['names']['kind']}"]
    served = [f"{spec['group']}/{v['name']}" for v in spec["versions"] if v.get("served")]
    if manifest.get("apiVersion") not in served:
        return [f"apiVersion {manifest.get('apiVersion')!r}: the CRD serves {served}"]
    found = [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
             for e in validator(manifest["apiVersion"].split("/")[1]).iter_errors(manifest)]
    name = manifest.get("metadata", {}).get("name", "")
    if not re.fullmatch(r"[a-z]([-a-z0-9]{0,46}[a-z0-9])?", name):  # KubeRay derives Service names from it
        found.append(f"metadata/name: {name!r} is not a short DNS-1035 label")
    return found + serve_config_problems(manifest.get("spec", {}).get("serveConfigV2", ""))


def serve_config_problems(text: str) -> list[str]:
    try:
        config = yaml.safe_load(text)
        ServeDeploySchema.model_validate(config)
    except (yaml.YAMLError, ValidationError) as err:
        return [f"serveConfigV2: {err}"]
    found = []
    for app in config["applications"]:
        if app["import_path"] != "serving.deployment:app_builder":
            found.append(f"serveConfigV2: application {app['name']} imports {app['import_path']}")
        try:
            ServeConfig.model_validate(app.get("args", {}))
        except ValidationError as err:
            found.append(f"serveConfigV2: application {app['name']} args: {err}")
        unknown = {d["name"] for d in app.get("deployments", [])} - {"AdapterModel", "Ingress"}
        if unknown:
            found.append(f"serveConfigV2: no deployment named {sorted(unknown)}")
    return found


def test_the_vendored_crd_names_its_source_and_serves_ray_io_v1():
    header = CRD.read_text()[:2000]
    assert "github.com/ray-project/kuberay" in header and "Version: v" in header and "Apache License 2.0" in header
    assert "Apache License" in (CRD.parent / "LICENSE").read_text()[:200]
    versions = {v["name"]: v for v in crd()["spec"]["versions"]}
    assert versions["v1"]["served"] and versions["v1"]["storage"]


def test_the_rayservice_manifest_is_valid():
    assert problems(load(MANIFEST)) == []


def test_the_embedded_serve_config_is_the_gpu_serve_config():
    """The manifest says serveConfigV2 is serve_config.gpu.yaml verbatim: the same data."""
    assert yaml.safe_load(load(MANIFEST)["spec"]["serveConfigV2"]) == load(GPU_CONFIG)


def worker(manifest: dict) -> dict:
    (group,) = manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    return group


def pod_groups(manifest: dict) -> list[dict]:
    return [manifest["spec"]["rayClusterConfig"]["headGroupSpec"], worker(manifest)]


def test_the_manifest_holds_what_the_runbook_says():
    manifest, runbook = load(MANIFEST), RUNBOOK.read_text()
    cluster = manifest["spec"]["rayClusterConfig"]
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayService"
    assert cluster["rayVersion"] == ray.__version__ == "2.60.0"
    gpu = worker(manifest)
    pod = gpu["template"]["spec"]
    assert pod["nodeSelector"], "GPU workers must be pinned to GPU nodes"
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    serve = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    (app,) = serve["applications"]
    model = next(d for d in app["deployments"] if d["name"] == "AdapterModel")
    assert gpu["maxReplicas"] == model["autoscaling_config"]["max_replicas"]
    assert re.match(r"(s3|gs)://", app["args"]["engine"]["hub"]), "the hub must be object storage every node reads"
    assert app["args"]["api_keys_file"] is None  # keys from the Secret, through DCFT_API_KEYS
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert env["DCFT_API_KEYS"]["valueFrom"]["secretKeyRef"]["name"] == "dcft-api-keys"
    assert {"secretRef": {"name": "dcft-hub-s3"}} in pod["containers"][0]["envFrom"]
    for secret in ("dcft-api-keys", "dcft-hub-s3"):
        assert secret in runbook
    for group in pod_groups(manifest):
        port = int(group["rayStartParams"]["metrics-export-port"])
        ports = {p["name"]: p["containerPort"] for p in group["template"]["spec"]["containers"][0]["ports"]}
        assert ports["metrics"] == port


def test_the_pod_monitor_selects_every_ray_pod_on_its_metrics_port():
    monitor, manifest = load(POD_MONITOR), load(MANIFEST)
    assert monitor["kind"] == "PodMonitor"
    wanted = monitor["spec"]["selector"]["matchLabels"].items()
    for group in pod_groups(manifest):
        assert wanted <= group["template"]["metadata"]["labels"].items()
        names = {p["name"] for p in group["template"]["spec"]["containers"][0]["ports"]}
        assert {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]} <= names


def containers(m):
    return m["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"]


def serve_args(m, change):
    config = yaml.safe_load(m["spec"]["serveConfigV2"])
    change(config)
    m["spec"]["serveConfigV2"] = yaml.safe_dump(config)


BROKEN = {
    "a port as a string": (lambda m: containers(m)[0]["ports"][0].update(containerPort="8000"), "containerPort"),
    "a misspelt field": (lambda m: worker(m)["template"]["spec"].update(nodeSelecter={"gpu": "yes"}),
                         "nodeSelecter"),
    "a container without its name": (lambda m: containers(m)[0].pop("name"), "'name' is a required property"),
    "replicas as a word": (lambda m: worker(m).update(maxReplicas="eight"), "maxReplicas"),
    "a wrong apiVersion": (lambda m: m.update(apiVersion="ray.io/v2"), "ray.io/v2"),
    "an unknown key in our args": (
        lambda m: serve_args(m, lambda c: c["applications"][0]["args"]["engine"].update(modle="minilm")), "modle"),
    "an invalid Serve option": (lambda m: serve_args(m, lambda c: c.update(proxy_location="Everywhere")),
                                "proxy_location"),
    "a deployment the app has not": (
        lambda m: serve_args(m, lambda c: c["applications"][0]["deployments"][0].update(name="Model")), "Model"),
    "serveConfigV2 not YAML": (lambda m: m["spec"].update(serveConfigV2="applications: [unclosed"), "serveConfigV2"),
}


@pytest.mark.parametrize("broken", sorted(BROKEN))
def test_a_broken_manifest_fails(broken):
    manifest = load(MANIFEST)
    change, expected = BROKEN[broken]
    change(manifest)
    found = problems(manifest)
    assert found and any(expected in p for p in found), found


def test_a_broken_copy_of_the_file_fails(tmp_path):
    """The file as text, one value quoted: the port becomes a string, which the CRD refuses."""
    text = MANIFEST.read_text()
    assert text.count("{containerPort: 8080, name: metrics}") == 2
    broken = tmp_path / "rayservice.yaml"
    broken.write_text(text.replace("{containerPort: 8080, name: metrics}", '{containerPort: "8080", name: metrics}', 1))
    assert problems(load(MANIFEST)) == []
    (found,) = problems(load(broken))
    assert found.endswith("containerPort: '8080' is not of type 'integer'"), found
