"""Deployment files, checked offline and fast: the Ray cluster launcher's
cluster.yaml, the Kubernetes manifests under k8s/, and their documentation.

* cluster.yaml passes Ray's own `prepare_config` + `validate_config` (which
  reject unknown keys), and so do the GCP and on-prem variants documented in
  its comments.
* Core Kubernetes kinds validate strictly with kubernetes-validate against a
  pinned Kubernetes version; the KubeRay kinds validate against the JSON
  schema kept in k8s/schemas/, and the pod templates embedded in them against
  core/v1 PodTemplate.
* Every check is shown to reject a deliberately broken copy.
* Cross-file wiring: kustomization references, the image, the ConfigMaps the
  jobs read, the MLflow URI, non-root security contexts, no literal secrets.
"""
from __future__ import annotations

import copy
import fnmatch
import functools
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"
K8S = ROOT / "k8s"
SCHEMA = K8S / "schemas" / "kuberay-ray.io-v1.schema.json"
DOCS = ROOT / "docs" / "cluster.md"
DOCKERFILE = K8S / "image" / "Dockerfile"
# Kubernetes version the core kinds are validated against (kubernetes-validate
# ships its schemas; 1.30 is the oldest release the manifests target).
K8S_VERSION = "1.30"
NAMESPACE = "secura-cl"
KUBERAY_KINDS = {"RayCluster", "RayJob"}
KUSTOMIZE_KINDS = {"Kustomization", "Component"}
# Env var names that hold credentials: AWS_SECRET_ACCESS_KEY, RAY_AUTH_TOKEN, HF_TOKEN, DB_PASSWORD, ...
SECRETISH = re.compile(r"(^|_)(PASSWORD|PASSWD|SECRET|TOKEN|ACCESS_KEY|API_KEY|CREDENTIALS?|PRIVATE_KEY)(_|$)", re.I)

ray_util = pytest.importorskip("ray.autoscaler._private.util")
jsonschema = pytest.importorskip("jsonschema")
kubernetes_validate = pytest.importorskip("kubernetes_validate")


# --- loading -----------------------------------------------------------------------


def _yaml_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*.yaml") if p.is_file())


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _is_kustomize_file(path: Path) -> bool:
    return path.name in ("kustomization.yaml", "kustomizeconfig.yaml")


@functools.lru_cache(maxsize=None)
def _parsed_manifests() -> tuple[tuple[Path, dict], ...]:
    out = []
    for path in _yaml_files():
        if _is_kustomize_file(path):
            continue
        out.extend((path, doc) for doc in _docs(path))
    return tuple(out)


def manifests() -> list[tuple[Path, dict]]:
    """(file, object) for every Kubernetes object under k8s/ (kustomize files excluded); fresh copies."""
    return copy.deepcopy(list(_parsed_manifests()))


def objects_of(kind: str) -> list[dict]:
    return [obj for _, obj in manifests() if obj.get("kind") == kind]


def one(kind: str, name: str | None = None) -> dict:
    found = [o for o in objects_of(kind) if name is None or o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _ids(items: list[tuple[Path, dict]]) -> list[str]:
    return [f"{p.relative_to(K8S)}:{o.get('kind')}/{o.get('metadata', {}).get('name')}" for p, o in items]


CORE = [(p, o) for p, o in manifests() if o.get("kind") not in KUBERAY_KINDS]
KUBERAY = [(p, o) for p, o in manifests() if o.get("kind") in KUBERAY_KINDS]


def pod_templates(obj: dict) -> Iterator[tuple[str, dict]]:
    """(where, pod template) for each pod template an object carries."""
    kind, spec = obj["kind"], obj.get("spec", {})
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        yield f"{kind}.spec.template", spec["template"]
    elif kind == "RayCluster":
        yield from _raycluster_templates(spec, "RayCluster.spec")
    elif kind == "RayJob":
        if "rayClusterSpec" in spec:
            yield from _raycluster_templates(spec["rayClusterSpec"], "RayJob.spec.rayClusterSpec")
        if "submitterPodTemplate" in spec:
            yield "RayJob.spec.submitterPodTemplate", spec["submitterPodTemplate"]


def _raycluster_templates(spec: dict, where: str) -> Iterator[tuple[str, dict]]:
    yield f"{where}.headGroupSpec.template", spec["headGroupSpec"]["template"]
    for group in spec.get("workerGroupSpecs", []):
        yield f"{where}.workerGroupSpecs[{group['groupName']}].template", group["template"]


def all_pod_templates() -> list[tuple[str, dict]]:
    return [(f"{obj['metadata']['name']}:{where}", tpl) for _, obj in manifests() for where, tpl in pod_templates(obj)]


# --- validators --------------------------------------------------------------------


def validate_core(obj: dict) -> None:
    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def validate_pod_template(template: dict) -> None:
    """A pod template embedded in a CRD, checked as a core/v1 PodTemplate."""
    kubernetes_validate.validate(
        {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "embedded"}, "template": template},
        K8S_VERSION, strict=True)


@pytest.fixture(scope="module")
def kuberay_schema() -> dict:
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return schema


def validate_kuberay(obj: dict, schema: dict) -> None:
    jsonschema.Draft202012Validator(schema).validate(obj)
    for _, template in pod_templates(obj):
        validate_pod_template(template)


def validate_cluster_yaml(config: dict) -> dict:
    prepared = ray_util.prepare_config(copy.deepcopy(config))
    ray_util.validate_config(prepared)
    return prepared


# --- cluster.yaml ------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def test_cluster_yaml_passes_rays_validator(cluster):
    prepared = validate_cluster_yaml(cluster)
    assert prepared["provider"]["type"] == "aws"
    assert prepared["head_node_type"] == "head"
    gpu = prepared["available_node_types"]["gpu_worker"]
    assert (gpu["min_workers"], gpu["max_workers"]) == (0, 4)
    assert gpu["resources"].get("GPU") == 1
    assert prepared["idle_timeout_minutes"] > 0


def test_cluster_yaml_uses_this_projects_ray_image(cluster):
    import ray

    images = [cluster["docker"][key] for key in ("image", "head_image", "worker_image")]
    for image in images:
        assert image.startswith(f"rayproject/ray:{ray.__version__}-py"), image
    assert cluster["docker"]["worker_image"].endswith("-gpu")
    assert any(f"ray[default,train,tune,data]=={ray.__version__}" in c for c in cluster["worker_setup_commands"])


def test_cluster_yaml_installs_the_project_from_the_mounted_tree(cluster):
    mount = next(remote for remote, local in cluster["file_mounts"].items() if local == ".")
    for key in ("head_setup_commands", "worker_setup_commands"):
        commands = cluster[key]
        torch_at = next(i for i, c in enumerate(commands) if "torch==" in c)
        project_at = next(i for i, c in enumerate(commands) if f"pip install --quiet -e {mount}" in c)
        assert torch_at < project_at, f"{key}: torch must be pinned before the project pulls its own"
    assert any("download.pytorch.org/whl/cpu" in c for c in cluster["head_setup_commands"])
    assert not any("whl/cpu" in c for c in cluster["worker_setup_commands"]), "GPU nodes take the normal wheel"
    assert ".gitignore" in cluster["rsync_filter"] and ".venv" in cluster["rsync_exclude"]


def test_cluster_yaml_exposes_nothing_and_uses_token_auth(cluster):
    assert "security_group" not in cluster["provider"], "no extra inbound rules beyond Ray's SSH + intra-cluster"
    head_start = " ".join(cluster["head_start_ray_commands"])
    worker_start = " ".join(cluster["worker_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    for start in (head_start, worker_start):
        assert "RAY_AUTH_MODE=token" in start
        assert "MLFLOW_TRACKING_URI=" in start
    assert cluster["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"
    assert "--serve-artifacts" in head_start and "mlflow server" in head_start


@pytest.mark.parametrize("mutate", [
    pytest.param(lambda c: c.update(idle_timeout_minute=5), id="top-level-typo"),
    pytest.param(lambda c: c["available_node_types"]["gpu_worker"].update(min_worker=0), id="node-type-typo"),
    pytest.param(lambda c: c["docker"].update(worker_imag="x"), id="docker-typo"),
    pytest.param(lambda c: c["available_node_types"]["gpu_worker"]["resources"].update(GPU=0.5), id="fractional-gpu"),
    pytest.param(lambda c: c.update(head_node_type="nope"), id="unknown-head-type"),
])
def test_cluster_yaml_validator_rejects_broken_copies(cluster, mutate):
    broken = copy.deepcopy(cluster)
    mutate(broken)
    with pytest.raises(Exception):
        validate_cluster_yaml(broken)


def _commented_block(name: str) -> dict:
    text = CLUSTER_YAML.read_text()
    match = re.search(rf"^# >>> {name}\n(.*?)^# <<< {name}$", text, re.M | re.S)
    assert match, f"cluster.yaml has no `# >>> {name}` block"
    lines = [line[2:] if line.startswith("# ") else line.lstrip("#") for line in match.group(1).splitlines()]
    return yaml.safe_load("\n".join(lines))


@pytest.mark.parametrize("variant", ["gcp", "local"])
def test_cluster_yaml_documented_provider_switches_validate(cluster, variant):
    block = _commented_block(variant)
    switched = copy.deepcopy(cluster)
    switched.update(block)
    if variant == "local":  # as the block's comment says: Ray generates the node type itself
        switched.pop("available_node_types")
        switched.pop("head_node_type")
    prepared = validate_cluster_yaml(switched)
    assert prepared["provider"]["type"] == variant


# --- k8s: parsing and validation ---------------------------------------------------


def test_every_k8s_yaml_parses_into_named_objects():
    files = _yaml_files()
    assert files, "no manifests under k8s/"
    for path in files:
        docs = _docs(path)
        assert docs, f"{path} is empty"
        if _is_kustomize_file(path):
            continue
        for doc in docs:
            assert {"apiVersion", "kind", "metadata"} <= doc.keys(), path
            assert doc["metadata"].get("name"), path
    kinds = {o["kind"] for _, o in manifests()}
    assert {"RayCluster", "RayJob", "Deployment", "Service", "PersistentVolumeClaim", "ConfigMap"} <= kinds


@pytest.mark.parametrize("path,obj", CORE, ids=_ids(CORE))
def test_core_kinds_validate_with_kubernetes_validate(path, obj):
    validate_core(obj)


def test_kuberay_schema_is_a_valid_strict_schema(kuberay_schema):
    defs = kuberay_schema["$defs"]
    for name in ("RayClusterSpec", "HeadGroupSpec", "WorkerGroupSpec", "RayJobSpec", "AutoscalerOptions",
                 "AuthOptions", "ObjectMeta", "PodTemplateSpec"):
        assert defs[name]["additionalProperties"] is False, name


@pytest.mark.parametrize("path,obj", KUBERAY, ids=_ids(KUBERAY))
def test_kuberay_kinds_validate_against_the_schema(path, obj, kuberay_schema):
    validate_kuberay(obj, kuberay_schema)


def _raycluster() -> dict:
    return copy.deepcopy(one("RayCluster"))


def _rayjob() -> dict:
    return copy.deepcopy(one("RayJob", "secura-run"))


def _deployment() -> dict:
    return copy.deepcopy(one("Deployment", "mlflow"))


def _set(obj: dict, dotted: str, value: Any) -> dict:
    node = obj
    keys = dotted.split(".")
    for key in keys[:-1]:
        node = node[int(key)] if key.isdigit() else node[key]
    last = keys[-1]
    if last.isdigit():
        node[int(last)] = value
    else:
        node[last] = value
    return obj


HEAD_CONTAINER = "spec.headGroupSpec.template.spec.containers.0"
BROKEN_KUBERAY = {
    "spec-typo": lambda: _set(_raycluster(), "spec.enableInTreeAutoScaling", True),
    "worker-group-typo": lambda: _set(_raycluster(), "spec.workerGroupSpecs.0.minReplica", 0),
    "rayStartParams-not-a-string": lambda: _set(_raycluster(), "spec.headGroupSpec.rayStartParams.num-cpus", 0),
    "auth-mode-unknown": lambda: _set(_raycluster(), "spec.authOptions.mode", "password"),
    "autoscaler-option-typo": lambda: _set(_raycluster(), "spec.autoscalerOptions.idleTimeoutSecond", 60),
    "container-field-typo": lambda: _set(_raycluster(), f"{HEAD_CONTAINER}.imagePullPolicyy", "Always"),
    "container-resources-typo": lambda: _set(_raycluster(), f"{HEAD_CONTAINER}.resources.limit", {"cpu": "1"}),
    "wrong-apiVersion": lambda: _set(_raycluster(), "apiVersion", "ray.io/v1alpha1"),
    "rayjob-spec-typo": lambda: _set(_rayjob(), "spec.entryPoint", "secura run x"),
    "rayjob-submission-mode": lambda: _set(_rayjob(), "spec.submissionMode", "K8sJob"),
    "rayjob-two-clusters": lambda: _set(_rayjob(), "spec.rayClusterSpec", _raycluster()["spec"]),
    "rayjob-deletes-shared-cluster": lambda: _set(_rayjob(), "spec.shutdownAfterJobFinishes", True),
    "submitter-pod-typo": lambda: _set(_rayjob(), "spec.submitterPodTemplate.spec.restartPolicyy", "Never"),
}


@pytest.mark.parametrize("name", sorted(BROKEN_KUBERAY))
def test_kuberay_validation_rejects_broken_copies(name, kuberay_schema):
    with pytest.raises(jsonschema.ValidationError):
        validate_kuberay(BROKEN_KUBERAY[name](), kuberay_schema)


BROKEN_CORE = {
    "deployment-typo": lambda: _set(_deployment(), "spec.replica", 1),
    "container-typo": lambda: _set(_deployment(), "spec.template.spec.containers.0.imagee", "x"),
    "container-port-as-string": lambda: _set(_deployment(), "spec.template.spec.containers.0.ports.0.containerPort", "5000"),
    "service-port-missing": lambda: _set(copy.deepcopy(one("Service", "mlflow")), "spec.ports.0",
                                         {"name": "http", "targetPort": "http"}),
    "pvc-access-mode-typo": lambda: _set(copy.deepcopy(one("PersistentVolumeClaim", "mlflow-data")),
                                         "spec.accesModes", ["ReadWriteOnce"]),
}


@pytest.mark.parametrize("name", sorted(BROKEN_CORE))
def test_kubernetes_validate_rejects_broken_copies(name):
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_core(BROKEN_CORE[name]())


# --- kustomize ---------------------------------------------------------------------


def _kustomizations() -> list[Path]:
    return sorted(K8S.rglob("kustomization.yaml"))


@pytest.mark.parametrize("kustomization", _kustomizations(), ids=lambda p: str(p.relative_to(K8S)))
def test_kustomization_references_exist(kustomization):
    data = yaml.safe_load(kustomization.read_text())
    assert data["kind"] in KUSTOMIZE_KINDS
    if data["kind"] == "Kustomization":
        assert data["namespace"] == NAMESPACE
    for key in ("resources", "components", "configurations", "patchesStrategicMerge"):
        for ref in data.get(key, []) or []:
            target = kustomization.parent / ref
            assert target.exists(), f"{kustomization}: {key} entry {ref} does not exist"
            if target.is_dir():
                assert (target / "kustomization.yaml").is_file(), f"{target} is no kustomization"
    for patch in data.get("patches", []) or []:
        if "path" in patch:
            assert (kustomization.parent / patch["path"]).is_file()


def test_every_manifest_is_deployed_by_some_kustomization():
    referenced: set[Path] = set()
    for kustomization in _kustomizations():
        data = yaml.safe_load(kustomization.read_text())
        referenced |= {(kustomization.parent / ref).resolve() for ref in data.get("resources", []) or []}
    orphans = [p for p, _ in manifests() if p.resolve() not in referenced]
    assert not orphans, f"manifests no kustomization applies: {sorted(set(map(str, orphans)))}"


def test_the_commented_components_are_real_components():
    text = (K8S / "kustomization.yaml").read_text()
    named = re.findall(r"^#\s+-\s+(components/[\w-]+)", text, re.M)
    assert named, "kustomization.yaml should document its optional components"
    on_disk = sorted(str(p.parent.relative_to(K8S)) for p in (K8S / "components").glob("*/kustomization.yaml"))
    assert sorted(named) == on_disk


KUBECTL = shutil.which("kubectl")


def _kustomize(directory: Path) -> list[dict]:
    result = subprocess.run([KUBECTL, "kustomize", str(directory)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


@pytest.mark.skipif(KUBECTL is None, reason="kubectl (with its built-in kustomize) is not installed")
def test_kustomize_builds_the_stack_and_its_options(tmp_path, kuberay_schema):
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    # kustomize takes relative paths only.
    components = sorted(os.path.relpath(p.parent, overlay) for p in (K8S / "components").glob("*/kustomization.yaml"))
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [os.path.relpath(K8S, overlay)], "components": components}))
    for directory in (K8S, K8S / "sweep", overlay):
        rendered = _kustomize(directory)
        assert rendered
        for obj in rendered:
            if obj["kind"] != "Namespace":
                assert obj["metadata"].get("namespace") == NAMESPACE, obj["metadata"]["name"]
            assert obj["metadata"]["labels"].get("app.kubernetes.io/part-of") == "secura-cl"
            if obj["kind"] in KUBERAY_KINDS:
                validate_kuberay(obj, kuberay_schema)
            else:
                validate_core(obj)
            for _, template in pod_templates(obj):
                for container in template["spec"]["containers"]:
                    assert container["image"] != "secura-cl", "the images: transform missed a container"
                    assert "/" in container["image"] and ":" in container["image"], container["image"]
    # With the components on, the backend URI comes from a Secret, not a value.
    deployment = next(o for o in _kustomize(overlay) if o["kind"] == "Deployment")
    env = {e["name"]: e for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert "value" not in env["MLFLOW_BACKEND_STORE_URI"]
    assert env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"]["name"] == "mlflow-backend"
    assert env["MLFLOW_ARTIFACTS_DESTINATION"]["value"].startswith("s3://")


# --- security ----------------------------------------------------------------------


@pytest.mark.parametrize("where,template", all_pod_templates(), ids=[w for w, _ in all_pod_templates()])
def test_pod_templates_run_as_non_root_without_privileges(where, template):
    spec = template["spec"]
    pod_sc = spec.get("securityContext", {})
    assert pod_sc.get("runAsNonRoot") is True, where
    assert pod_sc.get("runAsUser", 0) > 0, where
    assert pod_sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", where
    assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC"), where
    for volume in spec.get("volumes", []):
        assert "hostPath" not in volume, where
    for container in spec["containers"] + spec.get("initContainers", []):
        sc = container.get("securityContext", {})
        name = f"{where}/{container['name']}"
        assert sc.get("allowPrivilegeEscalation") is False, name
        assert "ALL" in sc.get("capabilities", {}).get("drop", []), name
        assert not sc.get("capabilities", {}).get("add"), name
        assert sc.get("privileged") is not True, name
        assert sc.get("runAsNonRoot", True) is True and sc.get("runAsUser", 1) > 0, name
        resources = container.get("resources", {})
        assert resources.get("requests") and resources.get("limits"), f"{name}: requests and limits"
        assert {"cpu", "memory"} <= resources["limits"].keys(), name


def test_autoscaler_sidecar_is_locked_down_too():
    options = one("RayCluster")["spec"]["autoscalerOptions"]
    sc = options["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["allowPrivilegeEscalation"] is False
    assert "ALL" in sc["capabilities"]["drop"]
    assert options["resources"]["limits"]


def test_namespace_enforces_the_restricted_pod_security_profile():
    labels = one("Namespace")["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"


def _walk(node: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield f"{path}.{key}", value
            yield from _walk(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _walk(value, f"{path}[{i}]")


def _env_lists(obj: Any) -> Iterator[list]:
    for path, value in _walk(obj):
        if path.endswith(".env") and isinstance(value, list):
            yield value


LITERAL_SECRET_PATTERNS = [
    re.compile(r"AKIA[0-9A-Z]{16}"),  # an AWS access key id
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"\b(postgres(ql)?|mysql)(\+\w+)?://[^\s/:@]+:[^\s/@]+@"),  # user:password@ in a DB URI
    re.compile(r"^\s*(password|passwd|secret|aws_secret_access_key|auth_token)\s*:\s*\S", re.I | re.M),
]


def _secret_problems(obj: dict) -> list[str]:
    problems = []
    if obj.get("kind") == "Secret":
        problems.append("a Secret object (create it out of band)")
    for env in _env_lists(obj):
        for item in env:
            if SECRETISH.search(item.get("name", "")) and "value" in item:
                problems.append(f"env {item['name']} has a literal value")
    text = yaml.safe_dump(obj)
    problems += [f"literal secret matching {p.pattern}" for p in LITERAL_SECRET_PATTERNS if p.search(text)]
    return problems


@pytest.mark.parametrize("path,obj", manifests(), ids=_ids(manifests()))
def test_no_literal_secrets_in_manifests(path, obj):
    assert not _secret_problems(obj)


def test_no_literal_secrets_in_cluster_yaml_or_kustomize_files():
    texts = [CLUSTER_YAML.read_text()] + [p.read_text() for p in _yaml_files() if _is_kustomize_file(p)]
    for text in texts:
        stripped = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
        for pattern in LITERAL_SECRET_PATTERNS:
            assert not pattern.search(stripped), pattern.pattern
        assert not re.search(r"(AWS_SECRET_ACCESS_KEY|PASSWORD|RAY_AUTH_TOKEN)\s*[:=]\s*\S", stripped)


@pytest.mark.parametrize("mutate", [
    pytest.param(lambda d: d["spec"]["template"]["spec"]["containers"][0]["env"].append(
        {"name": "AWS_SECRET_ACCESS_KEY", "value": "abc"}), id="secret-env-value"),
    pytest.param(lambda d: d["spec"]["template"]["spec"]["containers"][0]["env"].append(
        {"name": "MLFLOW_BACKEND_STORE_URI_X", "value": "postgresql://mlflow:hunter2@db:5432/mlflow"}),
        id="password-in-uri"),
    pytest.param(lambda d: d.update(kind="Secret", stringData={"password": "x"}), id="secret-object"),
])
def test_secret_check_rejects_broken_copies(mutate):
    broken = _deployment()
    mutate(broken)
    assert _secret_problems(broken)


# --- wiring between the pieces -----------------------------------------------------


def _ray_containers() -> list[dict]:
    cluster = one("RayCluster")
    return [c for where, tpl in pod_templates(cluster) for c in tpl["spec"]["containers"]]


def test_ray_pods_track_to_the_in_cluster_mlflow_service():
    service = one("Service", "mlflow")
    port = service["spec"]["ports"][0]
    url = f"http://{service['metadata']['name']}:{port['port']}"
    for container in _ray_containers():
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["MLFLOW_TRACKING_URI"] == url, container["name"]
    run_config = yaml.safe_load(one("ConfigMap", "secura-run-config")["data"]["run.yaml"])
    assert run_config["tracking_uri"] == url
    deployment = one("Deployment", "mlflow")
    pod = deployment["spec"]["template"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    container = pod["spec"]["containers"][0]
    assert port["targetPort"] in {p["name"] for p in container["ports"]}
    # The server's DNS-rebinding filter must accept the names clients use.
    env = {e["name"]: e.get("value") for e in container["env"]}
    patterns = env["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
    for host in (f"mlflow:{port['port']}", f"mlflow.{NAMESPACE}.svc.cluster.local:{port['port']}",
                 "localhost:5000", "127.0.0.1:5000"):
        assert any(fnmatch.fnmatch(host, p) for p in patterns), host
    assert not any(fnmatch.fnmatch("mlflow.evil.example:5000", p) for p in patterns)
    assert "--serve-artifacts" in container["args"]
    assert env["MLFLOW_BACKEND_STORE_URI"].startswith("sqlite:////")


def test_mlflow_only_admits_pods_of_its_namespace():
    policy = one("NetworkPolicy", "mlflow")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= \
        one("Deployment", "mlflow")["spec"]["template"]["metadata"]["labels"].items()
    for rule in policy["spec"]["ingress"]:
        for peer in rule["from"]:
            assert set(peer) == {"podSelector"}, "no namespaceSelector/ipBlock: this namespace only"


def test_gpu_worker_group_autoscales_on_gpus():
    import ray

    cluster = one("RayCluster")
    spec = cluster["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["rayVersion"] == ray.__version__
    assert spec["authOptions"]["mode"] == "token"
    (group,) = spec["workerGroupSpecs"]
    assert 0 == group["minReplicas"] <= group["replicas"] <= group["maxReplicas"] == 4
    (worker,) = group["template"]["spec"]["containers"]
    assert str(worker["resources"]["limits"]["nvidia.com/gpu"]) == "1"
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head["resources"]["limits"], "the head is a CPU node"


@pytest.mark.parametrize("job,configmap,key", [
    ("secura-run", "secura-run-config", "run.yaml"),
    ("secura-sweep", "secura-sweep-config", "sweep.yaml"),
])
def test_rayjobs_submit_to_the_cluster_and_read_a_mounted_configmap(job, configmap, key):
    import ray

    rayjob = one("RayJob", job)
    cluster = one("RayCluster")
    assert rayjob["spec"]["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    entry = rayjob["spec"]["entrypoint"].split()
    assert entry[:2] == ["secura", job.removeprefix("secura-")]
    config_path = Path(entry[2])
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]
    mount = next(m for m in head["containers"][0]["volumeMounts"] if m["mountPath"] == str(config_path.parent))
    volume = next(v for v in head["volumes"] if v["name"] == mount["name"])
    sources = [s["configMap"]["name"] for s in volume["projected"]["sources"]]
    assert configmap in sources
    assert key == config_path.name and key in one("ConfigMap", configmap)["data"]
    yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"])
    submitter = rayjob["spec"]["submitterPodTemplate"]["spec"]["containers"][0]
    assert submitter["image"].startswith(f"rayproject/ray:{ray.__version__}-")
    auth = {e["name"]: e for e in submitter["env"]}
    assert auth["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == cluster["spec"]["authOptions"]["secretName"]


def _model_fields(module: str) -> dict[str, set[str]]:
    """Field names of the pydantic config classes of a module file, read without importing
    it (the config modules' validators import torch and transformers: ~20 s on 2 cores)."""
    import ast

    tree = ast.parse((ROOT / module).read_text())
    fields = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            fields[node.name] = {s.target.id for s in node.body
                                 if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)}
    return fields


def test_configmap_run_config_uses_only_known_fields():
    data = yaml.safe_load(one("ConfigMap", "secura-run-config")["data"]["run.yaml"])
    assert isinstance(data, dict)
    assert data["output_dir"].startswith(("/shared/", "s3://", "gs://")), "must be storage every pod shares"
    assert data["scaling"]["use_gpu"] is True
    assert data["scaling"]["num_workers"] <= one("RayCluster")["spec"]["workerGroupSpecs"][0]["maxReplicas"]
    if not (ROOT / "pipelines" / "config.py").is_file():
        pytest.skip("pipelines/config.py is not there")
    fields = _model_fields("pipelines/config.py")
    assert set(data) <= fields["RunConfig"], set(data) - fields["RunConfig"]
    for section, cls in (("train", "TrainConfig"), ("eval", "EvalConfig"), ("scaling", "ScalingConfig")):
        assert set(data.get(section, {})) <= fields[cls], (section, set(data[section]) - fields[cls])
    broken = dict(data, outptu_dir="x")
    assert not set(broken) <= fields["RunConfig"], "the field check must catch a typo"


def test_configmap_sweep_config_uses_only_known_fields_and_the_run_config():
    data = yaml.safe_load(one("ConfigMap", "secura-sweep-config")["data"]["sweep.yaml"])
    assert isinstance(data, dict) and data["space"]
    assert data["output_dir"].startswith(("/shared/", "s3://", "gs://"))
    assert data["tracking_uri"] == "http://mlflow:5000"
    # `base` is resolved next to the sweep YAML: both ConfigMaps land in /configs.
    assert data["base"] == "run.yaml" and "run.yaml" in one("ConfigMap", "secura-run-config")["data"]
    if not (ROOT / "tune" / "sweep.py").is_file():
        pytest.skip("tune/sweep.py is not there")
    fields = _model_fields("tune/sweep.py")["SweepSpec"]
    assert set(data) <= fields, set(data) - fields
    run_sections = _model_fields("pipelines/config.py")["RunConfig"]
    for key in list(data.get("overrides", {})) + list(data["space"]):
        assert key.split(".")[0] in run_sections, key


def test_shared_storage_is_mounted_read_write_many_everywhere():
    pvc = one("PersistentVolumeClaim", "secura-shared")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    for where, template in pod_templates(one("RayCluster")):
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"]
                  for v in template["spec"]["volumes"] if "persistentVolumeClaim" in v}
        mounts = {m["name"]: m["mountPath"] for m in template["spec"]["containers"][0]["volumeMounts"]}
        assert any(claims.get(name) == "secura-shared" and path == "/shared" for name, path in mounts.items()), where


def test_image_build_matches_the_manifests():
    import ray

    text = DOCKERFILE.read_text()
    assert f"rayproject/ray:{ray.__version__}-py311-gpu" in text
    assert f"ray[default,train,tune,data]=={ray.__version__}" in text
    assert (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text().count(".venv") == 1
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    names = {image["name"] for image in kustomization["images"]}
    for container in _ray_containers():
        assert container["image"] in names, "Ray pods must use the kustomize-mapped project image"


def test_docs_name_only_files_that_exist():
    text = DOCS.read_text()
    for ref in sorted(set(re.findall(r"\b(k8s/[\w./-]*\w|configs/[\w.-]+\.yaml|cluster\.yaml)", text))):
        if "*" in ref or ref.startswith("configs/") and not (ROOT / "configs").is_dir():
            continue
        if ref.startswith("configs/") and ref.split("/")[1] in ("run.yaml", "sweep.yaml"):
            continue  # the in-pod paths /configs/run.yaml, /configs/sweep.yaml
        assert (ROOT / ref).exists(), f"docs/cluster.md names {ref}, which does not exist"
    for command in ("ray up cluster.yaml", "ray attach", "ray dashboard", "ray job submit --address http://127.0.0.1:8265",
                    "ray down", "RAY_AUTH_MODE", "helm install", "kubectl apply -k k8s/", "kubectl logs -f",
                    "kubectl port-forward", "storage_path", "output_dir", "tracking_uri"):
        assert command in text, f"docs/cluster.md should cover `{command}`"
