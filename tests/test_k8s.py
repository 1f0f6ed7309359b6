"""serving/k8s/ validates offline against the Kubernetes schemas that ship in the
kubernetes-validate package (strict: unknown fields fail). KubeRay's RayCluster is a custom
resource without a schema there: its pod templates are validated as core PodTemplates."""

import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = sorted((ROOT / "serving/k8s").glob("*.yaml"))
VERSION = kubernetes_validate.latest_version()


def resources():
    for path in MANIFESTS:
        for doc in yaml.safe_load_all(path.read_text()):
            yield path.name, doc


def pod_templates(doc):
    if doc["kind"] == "Deployment":
        return [doc["spec"]["template"]]
    if doc["kind"] == "RayCluster":
        spec = doc["spec"]
        return [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    return []


@pytest.mark.parametrize("name, doc", list(resources()), ids=lambda v: v if isinstance(v, str) else v["kind"])
def test_manifest_validates_against_the_kubernetes_schemas(name, doc):
    if doc["apiVersion"].startswith("ray.io/"):
        for template in pod_templates(doc):
            kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"},
                                          "template": template}, VERSION, strict=True)
    else:
        kubernetes_validate.validate(doc, VERSION, strict=True)


def test_a_broken_manifest_fails_validation():
    doc = next(d for _, d in resources() if d["kind"] == "Deployment")
    broken = {**doc, "spec": {**doc["spec"], "replicas": "one"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, VERSION, strict=True)


def test_vllm_gets_its_key_from_a_secret_and_is_probed_on_health():
    servers = [c for _, d in resources() for t in pod_templates(d) for c in t["spec"]["containers"]
               if "8000" in yaml.safe_dump(c)]
    assert len(servers) == 2
    for c in servers:
        key = next(e for e in c["env"] if e["name"] == "VLLM_API_KEY")
        assert set(key) == {"name", "valueFrom"} and key["valueFrom"]["secretKeyRef"]["name"] == "lrmerge-serve"
        probe = " ".join(c["readinessProbe"]["exec"]["command"])
        assert "/health" in probe and 'os.environ["VLLM_API_KEY"]' in probe
        compile(c["readinessProbe"]["exec"]["command"][2], "probe", "exec")  # the probe is valid Python
    ray_cluster = next(d for _, d in resources() if d["kind"] == "RayCluster")
    head = ray_cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    head = head["lifecycle"]["postStart"]["exec"]["command"][2]
    for flag in ("--tensor-parallel-size 8", "--pipeline-parallel-size 2", "--distributed-executor-backend ray"):
        assert flag in head


def test_the_head_start_script_is_valid_bash():
    head = next(d for _, d in resources() if d["kind"] == "RayCluster")["spec"]["headGroupSpec"]["template"]
    script = head["spec"]["containers"][0]["lifecycle"]["postStart"]["exec"]["command"][2]
    assert subprocess.run(["bash", "-n", "-c", script]).returncode == 0
