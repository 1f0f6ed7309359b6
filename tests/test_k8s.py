"""serving/k8s/ validates offline against the Kubernetes schemas that ship in the
kubernetes-validate package (strict: unknown fields fail). KubeRay's RayCluster is a custom
resource without a schema there: its pod templates are validated as core PodTemplates.
Every vLLM sits behind lrmerge's key gate, and nothing runs as root."""

import copy
import re
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
            kubernetes_validate.validate(
                {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template},
                VERSION,
                strict=True,
            )
    else:
        kubernetes_validate.validate(doc, VERSION, strict=True)


def test_a_broken_manifest_fails_validation():
    doc = next(d for _, d in resources() if d["kind"] == "Deployment")
    broken = {**doc, "spec": {**doc["spec"], "replicas": "one"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, VERSION, strict=True)


def test_the_gate_gets_the_key_from_a_secret_and_is_probed_on_health():
    servers = [
        c
        for _, d in resources()
        for t in pod_templates(d)
        for c in t["spec"]["containers"]
        if "8000" in yaml.safe_dump(c)
    ]
    assert len(servers) == 2 and all(runs_the_gate(c) for c in servers)
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


# --- the key gate in front of every vLLM, and no root ---

GATE_MIDDLEWARE = "lrmerge_hub.serve.gate.RequireKey"
LOOPBACK = re.compile(r"^(127\.\d+\.\d+\.\d+|::1|localhost)$")


def container_text(c) -> str:
    """What a container runs: its command, its arguments and its postStart hook."""
    hook = (c.get("lifecycle") or {}).get("postStart", {}).get("exec", {}).get("command", [])
    return " ".join([*c.get("command", []), *c.get("args", []), *hook])


def runs_the_gate(c) -> bool:
    return (
        "lrmerge-router" in c["image"]
        or "lrmerge_hub.serve.gate" in container_text(c)
        and GATE_MIDDLEWARE not in container_text(c)
    )


def runs_vllm(c, in_ray_cluster: bool) -> bool:
    """A vLLM API server: `vllm serve` or the api_server module in what it runs, or the vLLM image
    left to its own entrypoint (`vllm serve`) outside a RayCluster (where KubeRay runs `ray start`)."""
    text = container_text(c)
    if re.search(r"vllm serve|vllm\.entrypoints\.openai", text):
        return True
    return (
        c["image"].startswith("vllm/vllm-openai")
        and not c.get("command")
        and not in_ray_cluster
        and not runs_the_gate(c)
    )


def vllm_host(text: str) -> str | None:
    """The --host vLLM is given (None: vLLM's default, every interface)."""
    words = text.split()
    for i, word in enumerate(words):
        if word.startswith("--host="):
            return word.split("=", 1)[1]
        if word == "--host" and i + 1 < len(words):
            return words[i + 1]
    return None


def gate_problems(docs) -> list[str]:
    """Every way these manifests let a request reach vLLM without lrmerge's key gate."""
    problems = []
    for doc in docs:
        in_ray = doc["kind"] == "RayCluster"
        for t in pod_templates(doc):
            for c in t["spec"]["containers"]:
                if not runs_vllm(c, in_ray):
                    continue
                host, text = vllm_host(container_text(c)), container_text(c)
                if not (host and LOOPBACK.match(host)) and GATE_MIDDLEWARE not in text:
                    problems.append(
                        f"{doc['metadata']['name']}/{c['name']}: vLLM binds {host or 'every interface'} "
                        "without lrmerge's key middleware"
                    )
    for service in (d for d in docs if d["kind"] == "Service"):
        selector = service["spec"]["selector"]
        pods = [(d, t) for d in docs for t in pod_templates(d) if selected(selector, d, t)]
        assert pods, f"the Service {service['metadata']['name']} selects no pod of these manifests"
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            for _, t in pods:
                owners = [
                    c
                    for c in t["spec"]["containers"]
                    for p in c.get("ports", [])
                    if target in (p.get("name"), p["containerPort"])
                ]
                if not owners or not all(runs_the_gate(c) or GATE_MIDDLEWARE in container_text(c) for c in owners):
                    problems.append(
                        f"Service {service['metadata']['name']} port {port['port']} reaches "
                        f"{[c['name'] for c in owners] or 'no declared port'}, not the gate"
                    )
    return problems


def selected(selector: dict, doc, template) -> bool:
    labels = dict(template.get("metadata", {}).get("labels", {}))
    if doc["kind"] == "RayCluster":  # KubeRay labels the pods it makes
        head = template is doc["spec"]["headGroupSpec"]["template"]
        labels.update({"ray.io/cluster": doc["metadata"]["name"], "ray.io/node-type": "head" if head else "worker"})
    return all(labels.get(k) == v for k, v in selector.items())


def test_no_manifest_lets_a_request_reach_vllm_without_the_key_gate():
    assert gate_problems([d for _, d in resources()]) == []


def test_the_gate_check_catches_vllm_exposed_as_it_was():
    docs = [copy.deepcopy(d) for _, d in resources()]
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    vllm = next(c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "vllm")
    vllm["args"] = [a.replace("--host=127.0.0.1", "--host=0.0.0.0") for a in vllm["args"]]
    vllm["ports"] = [{"name": "vllm", "containerPort": 8001}]
    service = next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "merged-bo")
    service["spec"]["ports"][0]["targetPort"] = "vllm"
    ray = next(d for d in docs if d["kind"] == "RayCluster")
    hook = ray["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["lifecycle"]["postStart"]["exec"]
    hook["command"][2] = hook["command"][2].replace("--host 127.0.0.1", "--host 0.0.0.0")
    problems = gate_problems(docs)
    assert len(problems) == 3, problems
    assert "merged-bo/vllm: vLLM binds 0.0.0.0 without lrmerge's key middleware" in problems
    assert "merged-bo-70b/ray-head: vLLM binds 0.0.0.0 without lrmerge's key middleware" in problems
    assert "Service merged-bo port 8000 reaches ['vllm'], not the gate" in problems
    vllm["args"] = [a for a in vllm["args"] if not a.startswith("--host")]  # vLLM's default: every interface
    assert "merged-bo/vllm: vLLM binds every interface without lrmerge's key middleware" in gate_problems(docs)


def test_every_container_runs_without_root_or_privileges():
    for name, doc in resources():
        for t in pod_templates(doc):
            pod = t["spec"]
            assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0, name
            assert pod.get("automountServiceAccountToken") is False, name
            for c in pod["containers"]:
                sc = c["securityContext"]
                assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"], c["name"]
                assert sc["readOnlyRootFilesystem"] is True, c["name"]
                written = {m["mountPath"] for m in c.get("volumeMounts", [])}
                if runs_vllm(c, doc["kind"] == "RayCluster") or "vllm" in c["image"]:  # caches on emptyDirs
                    home = next(e["value"] for e in c["env"] if e["name"] == "HOME")
                    assert "/tmp" in written and home in written, c["name"]


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.cpu", "router.Dockerfile"])
def test_every_image_runs_as_a_user_other_than_root(dockerfile):
    users = re.findall(r"^USER\s+(\S+)", (ROOT / "serving" / dockerfile).read_text(), flags=re.MULTILINE)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert users[-1].split(":")[0].isdigit()  # numeric: Kubernetes' runAsNonRoot can check it


def test_the_docs_keep_secrets_off_command_lines():
    for path in [ROOT / "serving/README.md", ROOT / "serving/k8s/README.md", *ROOT.glob("serving/*Dockerfile*")]:
        text = path.read_text()
        assert "--from-literal" not in text, path.name
        assert not re.search(r"-e (VLLM_API_KEY|HF_TOKEN)=", text), path.name
        assert not re.search(r"--api-key[ =]\$", text), path.name
