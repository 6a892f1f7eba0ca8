"""Deployment files, checked offline and fast: the Ray cluster launcher's
cluster.yaml, the Kubernetes files under k8s/, the project image and its lock
file, and docs/cluster.md, which walks through them.

* cluster.yaml passes Ray's own `prepare_config` + `validate_config` (which
  reject unknown keys), and so do the GCP and on-prem variants documented in
  its comments.
* Core Kubernetes kinds validate strictly with kubernetes-validate against a
  pinned Kubernetes version; the KubeRay kinds validate against the JSON
  schema kept in k8s/schemas/, and the pod templates embedded in them against
  core/v1 PodTemplate. `kubectl kustomize` output (when kubectl is installed)
  validates the same way.
* Every check is shown to reject a deliberately broken copy.
* Cross-file wiring: one image tag everywhere, the lock behind it, the job's
  config, identities, storage, MLflow's auth and network reach, the order of
  the documented steps.
"""
from __future__ import annotations

import copy
import fnmatch
import functools
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml
from lockfile import CUDA_LOCK, LOCK, locked_version, pins

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"
K8S = ROOT / "k8s"
SCHEMA = K8S / "schemas" / "kuberay-ray.io-v1.schema.json"
EKSCTL_CONFIG = K8S / "eks" / "cluster.yaml"
IMAGE_DIR = K8S / "image"
DOCKERFILE = IMAGE_DIR / "Dockerfile"
DOCS = ROOT / "docs" / "cluster.md"
# Kubernetes version the core kinds are validated against (kubernetes-validate
# ships its schemas; 1.30 is the oldest release the manifests target).
K8S_VERSION = "1.30"
NAMESPACE = "secura-cl"
KUBERAY_KINDS = {"RayCluster", "RayJob"}
KUSTOMIZE_KINDS = {"Kustomization", "Component"}
STACKS = {"production": K8S, "trial": K8S / "trial"}
JOBS = {"secura-run": K8S / "run", "secura-sweep": K8S / "sweep"}
RAY_SERVICE_ACCOUNT = "secura-ray"
SHARED_RUNS = "/srv/secura-cl"  # the launcher's shared run folders
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


def _kustomizations() -> list[Path]:
    return sorted(K8S.rglob("kustomization.yaml"))


def _load_kustomization(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


@functools.lru_cache(maxsize=None)
def _manifest_paths() -> tuple[Path, ...]:
    """Files some kustomization or component lists under `resources:`."""
    paths = set()
    for kustomization in _kustomizations():
        for ref in _load_kustomization(kustomization).get("resources", []) or []:
            target = (kustomization.parent / ref).resolve()
            if target.is_file():
                paths.add(target)
    return tuple(sorted(paths))


def _generator_inputs() -> set[Path]:
    """Files turned into ConfigMaps by a configMapGenerator (the jobs' configs)."""
    inputs = set()
    for kustomization in _kustomizations():
        for generator in _load_kustomization(kustomization).get("configMapGenerator", []) or []:
            inputs |= {(kustomization.parent / f).resolve() for f in generator.get("files", [])}
    return inputs


@functools.lru_cache(maxsize=None)
def _parsed_manifests() -> tuple[tuple[Path, dict], ...]:
    return tuple((path, doc) for path in _manifest_paths() for doc in _docs(path))


def manifests() -> list[tuple[Path, dict]]:
    """(file, object) for every Kubernetes object the kustomizations deploy; fresh copies."""
    return copy.deepcopy(list(_parsed_manifests()))


def one(kind: str, name: str | None = None) -> dict:
    found = [o for _, o in manifests() if o.get("kind") == kind and (name is None or o["metadata"]["name"] == name)]
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


def ray_templates(rayjob: dict) -> dict[str, dict]:
    """The Ray pods of a job's own cluster: {"head": template, "<group>": template}."""
    spec = rayjob["spec"]["rayClusterSpec"]
    templates = {"head": spec["headGroupSpec"]["template"]}
    templates.update({g["groupName"]: g["template"] for g in spec["workerGroupSpecs"]})
    return templates


def all_pod_templates() -> list[tuple[str, dict]]:
    return [(f"{obj['metadata']['name']}:{where}", tpl) for _, obj in manifests() for where, tpl in pod_templates(obj)]


def _job_source() -> dict:
    return copy.deepcopy(one("RayJob", "secura-job"))


def _deployment() -> dict:
    return copy.deepcopy(one("Deployment", "mlflow"))


def project_image() -> str:
    """The project image, as k8s/job/kustomization.yaml maps the placeholder `secura-cl`."""
    (entry,) = [i for i in _load_kustomization(K8S / "job" / "kustomization.yaml")["images"] if i["name"] == "secura-cl"]
    return f"{entry['newName']}:{entry['newTag']}"


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


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def _volume_at(template: dict, container: dict, mount_path: str) -> dict:
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == mount_path)
    return next(v for v in template["spec"]["volumes"] if v["name"] == mount["name"])


# --- cluster.yaml ------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def _command_lists(config: dict) -> dict[str, list[str]]:
    lists = {key: config.get(key, []) or [] for key in (
        "initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
        "head_start_ray_commands", "worker_start_ray_commands")}
    for name, node_type in config.get("available_node_types", {}).items():
        for key in ("initialization_commands", "worker_setup_commands"):
            lists[f"{name}.{key}"] = node_type.get(key, []) or []
    return lists


def test_cluster_yaml_passes_rays_validator(cluster):
    prepared = validate_cluster_yaml(cluster)
    assert prepared["provider"]["type"] == "aws"
    assert prepared["head_node_type"] == "head"
    gpu = prepared["available_node_types"]["gpu_worker"]
    assert (gpu["min_workers"], gpu["max_workers"]) == (0, 4)
    assert gpu["resources"].get("GPU") == 1
    assert "GPU" not in prepared["available_node_types"]["head"]["resources"]
    assert prepared["idle_timeout_minutes"] > 0


def test_cluster_yaml_runs_the_project_image_and_installs_nothing(cluster):
    docker = cluster["docker"]
    assert docker["image"] == project_image()
    for key in ("head_image", "worker_image"):
        assert docker.get(key, docker["image"]) == docker["image"], key
    for name, node_type in cluster["available_node_types"].items():
        assert node_type.get("docker", {}).get("worker_image", docker["image"]) == docker["image"], name
    for where, commands in _command_lists(cluster).items():
        for command in commands:
            assert not re.search(r"\b(pip|pip3|conda|uv)\s+install\b", command), f"{where}: {command}"


def test_cluster_yaml_nodes_boot_the_nvidia_driver_ami_with_their_roles(cluster):
    nodes = cluster["available_node_types"]
    docs = DOCS.read_text()
    for name, profile in (("head", "secura-cl-head"), ("gpu_worker", "secura-cl-worker")):
        config = nodes[name]["node_config"]
        assert config["ImageId"].startswith("resolve:ssm:/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-")
        assert config["IamInstanceProfile"] == {"Name": profile}
        assert config["MetadataOptions"]["HttpTokens"] == "required"
        assert profile in docs, f"docs/cluster.md must create the instance profile {profile}"
    assert "aws iam create-instance-profile" in docs


def test_cluster_yaml_shares_the_run_folders_over_nfs(cluster):
    assert f"--volume {SHARED_RUNS}:{SHARED_RUNS}" in cluster["docker"]["run_options"]
    head_init = " ".join(cluster["initialization_commands"])
    assert f"{SHARED_RUNS} *(" in head_init and "exportfs" in head_init
    worker_init = " ".join(cluster["available_node_types"]["gpu_worker"]["initialization_commands"])
    assert f'"$RAY_HEAD_IP:{SHARED_RUNS}" {SHARED_RUNS}' in worker_init
    assert f"--output-dir {SHARED_RUNS}/" in DOCS.read_text()


def test_cluster_yaml_leaves_the_object_stores_shm_to_ray(cluster):
    docker = cluster["docker"]
    assert docker.get("disable_shm_size_detection") is not True
    assert not any("--shm-size" in option for option in docker["run_options"])


def test_cluster_yaml_exposes_nothing_and_authenticates(cluster):
    assert "security_group" not in cluster["provider"], "no extra inbound rules beyond Ray's SSH + intra-cluster"
    mlflow_start, ray_start = cluster["head_start_ray_commands"][1:]
    worker_start = " ".join(cluster["worker_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in ray_start
    for start in (ray_start, worker_start):
        assert "RAY_AUTH_MODE=token" in start and "MLFLOW_TRACKING_URI=" in start
        assert ". ~/.secura-cl/mlflow-client.env" in start, "Ray processes log as the job user"
        assert "mlflow-server.env" not in start, "the server's secrets stay out of Ray"
    assert "mlflow server" in mlflow_start and ". ~/.secura-cl/mlflow-server.env" in mlflow_start
    for flag in ("--serve-artifacts", "--app-name basic-auth", "--host 0.0.0.0"):
        assert flag in mlflow_start, flag
    assert "MLFLOW_AUTH_CONFIG_PATH=$HOME/.secura-cl/basic_auth.ini" in mlflow_start
    assert cluster["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"
    assert cluster["file_mounts"].get("/home/ray/.secura-cl") == "~/.secura-cl"


@pytest.mark.parametrize("mutate", [
    pytest.param(lambda c: c.update(idle_timeout_minute=5), id="top-level-typo"),
    pytest.param(lambda c: c["available_node_types"]["gpu_worker"].update(min_worker=0), id="node-type-typo"),
    pytest.param(lambda c: c["docker"].update(imagee="x"), id="docker-typo"),
    pytest.param(lambda c: c["available_node_types"]["gpu_worker"]["resources"].update(GPU=0.5), id="fractional-gpu"),
    pytest.param(lambda c: c.update(head_node_type="nope"), id="unknown-head-type"),
    pytest.param(lambda c: c["available_node_types"]["gpu_worker"].update(initialization_command=[]),
                 id="node-type-commands-typo"),
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
        for key in ("available_node_types", "head_node_type", "initialization_commands"):
            switched.pop(key)
    else:
        worker_init = " ".join(switched["available_node_types"]["gpu_worker"]["initialization_commands"])
        assert f"$RAY_HEAD_IP:{SHARED_RUNS}" in worker_init, "GCP workers mount the head's run folders too"
    prepared = validate_cluster_yaml(switched)
    assert prepared["provider"]["type"] == variant


# --- the image and its lock file ---------------------------------------------------


def test_the_image_tag_is_the_same_everywhere(cluster):

    image = project_image()
    tag = image.rsplit(":", 1)[1]
    assert f"ray{locked_version('ray')}" in tag and "py311" in tag
    assert cluster["docker"]["image"] == image
    assert f"-t {image} ." in DOCKERFILE.read_text(), "the Dockerfile's build command names the deployed tag"
    assert f"export IMAGE={image}" in DOCS.read_text(), "docs/cluster.md builds and pushes the deployed tag"


def test_the_image_runs_the_locked_versions():
    entries = pins(LOCK)
    # PyPI's Linux torch wheel ships its CUDA runtime as a package: its major.minor is the tag's cuXYZ.
    cuda = locked_version("nvidia-cuda-runtime", CUDA_LOCK).split(".")
    assert project_image().endswith(f"-cu{cuda[0]}{cuda[1]}"), (project_image(), cuda)
    # What the launcher's head needs to serve MLflow itself: the auth app, PostgreSQL, S3.
    for name in ("flask-wtf", "psycopg2-binary", "boto3"):
        assert name in entries, name
    text = DOCKERFILE.read_text()
    for name in ("ray", "mlflow"):
        assert f"assert {name}.__version__ == '{locked_version(name)}'" in text, f"the image checks the lock's {name}"
    assert f"torch.__version__.startswith('{locked_version('torch', CUDA_LOCK)}')" in text


def test_the_dockerfile_installs_the_lock_and_nothing_unpinned():

    text = DOCKERFILE.read_text()
    assert f"ARG RAY_IMAGE=rayproject/ray:{locked_version('ray')}-py311-gpu" in text
    assert "COPY --chown=1000:100 requirements.lock requirements-cuda.lock /tmp/" in text
    installs = re.findall(r"pip install [^\n]*", text)
    assert installs == ["pip install --no-cache-dir --require-hashes -r /tmp/requirements.lock "
                        "-r /tmp/requirements-cuda.lock \\",
                        "pip install --no-cache-dir --no-deps --no-build-isolation . \\"], installs
    assert (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text().count(".venv") == 1


def test_the_docs_name_the_lock_and_its_command():
    docs = DOCS.read_text()
    assert "requirements.lock" in docs and "make lock" in docs
    assert "k8s/image/requirements" not in docs, "the image's own lock is gone: one lock for every path"


def test_mlflow_is_the_same_version_on_both_paths():
    """The tracking server image serves the lock's MLflow (the lock, not whatever is installed here)."""
    (container,) = _deployment()["spec"]["template"]["spec"]["containers"]
    server = re.fullmatch(r"ghcr\.io/mlflow/mlflow:v([\d.]+)-full", container["image"])
    assert server, container["image"]
    assert locked_version("mlflow") == server.group(1), "the server runs the clients' (the lock's) MLflow"
    assert f"MLflow {server.group(1)}" in DOCS.read_text(), "docs/cluster.md names the served MLflow"


# --- k8s: files, validation ---------------------------------------------------------


def test_every_k8s_yaml_is_accounted_for():
    generated = _generator_inputs()
    for path in _yaml_files():
        if _is_kustomize_file(path) or path.resolve() in generated or path == EKSCTL_CONFIG:
            continue
        assert path.resolve() in _manifest_paths(), f"{path} is neither deployed nor a job's config"
        for doc in _docs(path):
            assert {"apiVersion", "kind", "metadata"} <= doc.keys(), path
            assert doc["metadata"].get("name"), path
    kinds = {o["kind"] for _, o in manifests()}
    assert {"RayJob", "Deployment", "Service", "PersistentVolumeClaim", "NetworkPolicy", "ServiceAccount"} <= kinds
    assert "RayCluster" not in kinds, "each job brings its own cluster (retries recreate it)"


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


CLUSTER = "spec.rayClusterSpec"
HEAD_CONTAINER = f"{CLUSTER}.headGroupSpec.template.spec.containers.0"


def _on_a_shared_cluster(job: dict, backoff: int) -> dict:
    del job["spec"]["rayClusterSpec"]
    job["spec"].update(clusterSelector={"ray.io/cluster": "shared"}, shutdownAfterJobFinishes=False,
                       backoffLimit=backoff)
    return job


BROKEN_KUBERAY = {
    "spec-typo": lambda: _set(_job_source(), f"{CLUSTER}.enableInTreeAutoScaling", True),
    "worker-group-typo": lambda: _set(_job_source(), f"{CLUSTER}.workerGroupSpecs.0.minReplica", 0),
    "rayStartParams-not-a-string": lambda: _set(_job_source(), f"{CLUSTER}.headGroupSpec.rayStartParams.num-cpus", 0),
    "auth-mode-unknown": lambda: _set(_job_source(), f"{CLUSTER}.authOptions.mode", "password"),
    "autoscaler-option-typo": lambda: _set(_job_source(), f"{CLUSTER}.autoscalerOptions.idleTimeoutSecond", 60),
    "container-field-typo": lambda: _set(_job_source(), f"{HEAD_CONTAINER}.imagePullPolicyy", "Always"),
    "container-resources-typo": lambda: _set(_job_source(), f"{HEAD_CONTAINER}.resources.limit", {"cpu": "1"}),
    "pod-spec-typo": lambda: _set(_job_source(), f"{CLUSTER}.headGroupSpec.template.spec.serviceAcountName", "x"),
    "wrong-apiVersion": lambda: _set(_job_source(), "apiVersion", "ray.io/v1alpha1"),
    "rayjob-spec-typo": lambda: _set(_job_source(), "spec.entryPoint", "secura run x"),
    "rayjob-submission-mode": lambda: _set(_job_source(), "spec.submissionMode", "K8sJob"),
    "rayjob-two-clusters": lambda: _set(_job_source(), "spec.clusterSelector", {"ray.io/cluster": "x"}),
    "retries-on-a-shared-cluster": lambda: _on_a_shared_cluster(_job_source(), backoff=2),
    "retries-in-interactive-mode": lambda: _set(_job_source(), "spec.submissionMode", "InteractiveMode"),
    "submitter-pod-typo": lambda: _set(_job_source(), "spec.submitterPodTemplate.spec.restartPolicyy", "Never"),
}


@pytest.mark.parametrize("name", sorted(BROKEN_KUBERAY))
def test_kuberay_validation_rejects_broken_copies(name, kuberay_schema):
    with pytest.raises((jsonschema.ValidationError, kubernetes_validate.ValidationError)):
        validate_kuberay(BROKEN_KUBERAY[name](), kuberay_schema)


def test_a_shared_cluster_without_retries_is_still_valid(kuberay_schema):
    validate_kuberay(_on_a_shared_cluster(_job_source(), backoff=0), kuberay_schema)


BROKEN_CORE = {
    "deployment-typo": lambda: _set(_deployment(), "spec.replica", 1),
    "container-typo": lambda: _set(_deployment(), "spec.template.spec.containers.0.imagee", "x"),
    "container-port-as-string": lambda: _set(_deployment(), "spec.template.spec.containers.0.ports.0.containerPort", "5000"),
    "service-port-missing": lambda: _set(copy.deepcopy(one("Service", "mlflow")), "spec.ports.0",
                                         {"name": "http", "targetPort": "http"}),
    "pvc-access-mode-typo": lambda: _set(copy.deepcopy(one("PersistentVolumeClaim", "secura-shared")),
                                         "spec.accesModes", ["ReadWriteMany"]),
}


@pytest.mark.parametrize("name", sorted(BROKEN_CORE))
def test_kubernetes_validate_rejects_broken_copies(name):
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_core(BROKEN_CORE[name]())


# --- k8s: kustomizations -----------------------------------------------------------


@pytest.mark.parametrize("kustomization", _kustomizations(), ids=lambda p: str(p.relative_to(K8S)))
def test_kustomization_references_exist(kustomization):
    data = _load_kustomization(kustomization)
    assert data["kind"] in KUSTOMIZE_KINDS
    if data["kind"] == "Kustomization":
        assert data["namespace"] == NAMESPACE
    for key in ("resources", "components", "configurations"):
        for ref in data.get(key, []) or []:
            target = kustomization.parent / ref
            assert target.exists(), f"{kustomization}: {key} entry {ref} does not exist"
            if target.is_dir():
                assert (target / "kustomization.yaml").is_file(), f"{target} is no kustomization"
    for generator in data.get("configMapGenerator", []) or []:
        for name in generator["files"]:
            assert (kustomization.parent / name).is_file(), f"{kustomization}: generator file {name}"


def test_production_is_the_default_and_sqlite_only_the_trial():
    components = {name: [str((path / c).resolve().relative_to(K8S / "components"))
                         for c in _load_kustomization(path / "kustomization.yaml").get("components", [])]
                  for name, path in STACKS.items()}
    assert components == {"production": ["mlflow-postgres", "mlflow-s3-artifacts", "mlflow-basic-auth"],
                          "trial": ["mlflow-sqlite"]}
    on_disk = sorted(p.parent.name for p in (K8S / "components").glob("*/kustomization.yaml"))
    assert sorted(components["production"] + components["trial"]) == on_disk, "every component is used"


def test_the_job_overlays_generate_the_config_the_entrypoint_reads():
    job = _job_source()
    head = ray_templates(job)["head"]
    volume = _volume_at(head, head["spec"]["containers"][0], "/configs")
    config = (K8S / "job" / "kustomizeconfig.yaml").read_text()
    assert "spec/rayClusterSpec/headGroupSpec/template/spec/volumes/configMap/name" in config, \
        "kustomize must write the generated (hashed) name into the RayJob"
    for name, overlay in JOBS.items():
        data = _load_kustomization(overlay / "kustomization.yaml")
        (generator,) = data["configMapGenerator"]
        assert generator["name"] == volume["configMap"]["name"]
        assert data["generatorOptions"]["immutable"] is True
        assert data.get("generatorOptions", {}).get("disableNameSuffixHash") is not True
        patch = yaml.safe_load(data["patches"][0]["patch"])
        ops = {op["path"]: op["value"] for op in patch}
        assert ops["/metadata/name"] == name
        entry = ops["/spec/entrypoint"].split()
        assert entry[:2] == ["secura", name.removeprefix("secura-")] and entry[-1] == "--resume"
        assert Path(entry[2]).parent == Path("/configs") and Path(entry[2]).name in generator["files"]


KUBECTL = shutil.which("kubectl")
needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="kubectl (with its built-in kustomize) is not installed")


@functools.lru_cache(maxsize=None)
def _rendered(directory: Path) -> tuple[dict, ...]:
    result = subprocess.run([KUBECTL, "kustomize", str(directory)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return tuple(d for d in yaml.safe_load_all(result.stdout) if d)


def rendered(directory: Path) -> list[dict]:
    return copy.deepcopy(list(_rendered(directory)))


@needs_kubectl
@pytest.mark.parametrize("directory", [*STACKS.values(), *JOBS.values()], ids=lambda p: str(p.relative_to(ROOT)))
def test_kustomize_output_validates(directory, kuberay_schema):
    objects = rendered(directory)
    assert objects
    for obj in objects:
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") == NAMESPACE, obj["metadata"]["name"]
        assert obj["metadata"]["labels"].get("app.kubernetes.io/part-of") == "secura-cl"
        assert not _secret_problems(obj)
        if obj["kind"] in KUBERAY_KINDS:
            validate_kuberay(obj, kuberay_schema)
        else:
            validate_core(obj)


@needs_kubectl
@pytest.mark.parametrize("name", sorted(JOBS))
def test_kustomized_jobs_retry_resume_and_run_the_pinned_image_as_secura_ray(name):
    objects = rendered(JOBS[name])
    (job,) = [o for o in objects if o["kind"] == "RayJob"]
    spec = job["spec"]
    assert job["metadata"]["name"] == name
    assert spec["backoffLimit"] >= 1 and spec["entrypoint"].split()[-1] == "--resume"
    assert "clusterSelector" not in spec and spec["shutdownAfterJobFinishes"] is True, "its own cluster"
    assert spec["rayClusterSpec"]["rayVersion"] == locked_version("ray")
    templates = ray_templates(job)
    assert set(templates) == {"head", "gpu"}
    for role, template in templates.items():
        pod = template["spec"]
        assert pod["serviceAccountName"] == RAY_SERVICE_ACCOUNT, role
        (container,) = pod["containers"]
        assert container["image"] == project_image(), role
        shm = _volume_at(template, container, "/dev/shm")
        assert shm["emptyDir"]["medium"] == "Memory" and shm["emptyDir"]["sizeLimit"], role
        assert _volume_at(template, container, "/shared")["persistentVolumeClaim"]["claimName"] == "secura-shared"
    head, worker = templates["head"]["spec"], templates["gpu"]["spec"]
    assert head["nodeSelector"] == {"secura-cl.io/pool": "cpu"} and not head.get("tolerations")
    assert "nvidia.com/gpu" not in head["containers"][0]["resources"]["limits"]
    assert worker["nodeSelector"] == {"secura-cl.io/pool": "gpu"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in worker["tolerations"]
    assert str(worker["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]) == "1"
    assert worker["automountServiceAccountToken"] is False
    group = spec["rayClusterSpec"]["workerGroupSpecs"][0]
    assert 0 == group["minReplicas"] <= group["replicas"] <= group["maxReplicas"] == 4
    assert project_image().rsplit(":", 1)[1] in DOCS.read_text()


@needs_kubectl
@pytest.mark.parametrize("name", sorted(JOBS))
def test_the_job_config_travels_with_the_job(name, tmp_path):
    def config_map_of(directory: Path) -> tuple[str, dict]:
        objects = rendered(directory)
        (job,) = [o for o in objects if o["kind"] == "RayJob"]
        head = ray_templates(job)["head"]
        volume = _volume_at(head, head["spec"]["containers"][0], "/configs")
        maps = {o["metadata"]["name"]: o for o in objects if o["kind"] == "ConfigMap"}
        return volume["configMap"]["name"], maps[volume["configMap"]["name"]]

    map_name, config_map = config_map_of(JOBS[name])
    assert re.fullmatch(r"secura-job-config-[a-z0-9]{10}", map_name), "a per-content name"
    assert config_map["immutable"] is True
    (job,) = [o for o in rendered(JOBS[name]) if o["kind"] == "RayJob"]
    assert Path(job["spec"]["entrypoint"].split()[2]).name in config_map["data"]
    copy_of_k8s = tmp_path / "k8s"
    shutil.copytree(K8S, copy_of_k8s)
    edited = copy_of_k8s / JOBS[name].name / "run.yaml"
    edited.write_text(edited.read_text() + "# edited\n")
    assert config_map_of(copy_of_k8s / JOBS[name].name)[0] != map_name, "an edited config is a new ConfigMap"


@needs_kubectl
def test_production_mlflow_uses_postgres_s3_and_basic_auth_from_a_secret():
    objects = rendered(STACKS["production"])
    assert not [o for o in objects if o["kind"] == "PersistentVolumeClaim" and o["metadata"]["name"] == "mlflow-data"]
    deployment = next(o for o in objects if o["kind"] == "Deployment")
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    env = _env(container)
    for name, key in (("MLFLOW_BACKEND_STORE_URI", "backend-store-uri"),
                      ("MLFLOW_ARTIFACTS_DESTINATION", "artifacts-destination"),
                      ("MLFLOW_AUTH_ADMIN_PASSWORD", "admin-password"),
                      ("MLFLOW_FLASK_SERVER_SECRET_KEY", "flask-secret-key")):
        assert "value" not in env[name], name
        assert env[name]["valueFrom"]["secretKeyRef"] == {"name": "mlflow-server", "key": key}, name
    args = container["args"]
    assert args[args.index("--app-name") + 1] == "basic-auth"
    assert args[args.index("--workers") + 1] == "2"
    config_path = Path(env["MLFLOW_AUTH_CONFIG_PATH"]["value"])
    volume = _volume_at(pod, container, str(config_path.parent))
    assert volume["secret"]["secretName"] == "mlflow-server"
    assert {"key": config_path.name, "path": config_path.name} in volume["secret"]["items"]
    assert pod["spec"]["serviceAccountName"] == "mlflow"
    docs = DOCS.read_text()
    for key in ("backend-store-uri", "artifacts-destination", "admin-password", "flask-secret-key", "basic_auth.ini"):
        assert f"{key}=" in docs, f"docs/cluster.md must create the Secret key {key}"


@needs_kubectl
def test_the_trial_is_sqlite_on_a_volume_with_one_worker_and_no_auth():
    objects = rendered(STACKS["trial"])
    deployment = next(o for o in objects if o["kind"] == "Deployment")
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    env = _env(container)
    database = env["MLFLOW_BACKEND_STORE_URI"]["value"]
    assert database.startswith("sqlite:////")
    volume = _volume_at(pod, container, str(Path(database.removeprefix("sqlite:///")).parent))
    assert volume["persistentVolumeClaim"]["claimName"] == "mlflow-data"
    assert [o for o in objects if o["kind"] == "PersistentVolumeClaim" and o["metadata"]["name"] == "mlflow-data"]
    args = container["args"]
    assert args[args.index("--workers") + 1] == "1" and "--app-name" not in args


# --- wiring between the pieces -----------------------------------------------------


def _ray_containers() -> list[dict]:
    return [t["spec"]["containers"][0] for t in ray_templates(_job_source()).values()]


def _run_configs() -> dict[str, dict]:
    return {str(p.relative_to(K8S)): yaml.safe_load(p.read_text()) for p in sorted(K8S.glob("*/run.yaml"))}


def test_ray_pods_track_to_the_in_cluster_mlflow_service_as_the_job_user():
    service = one("Service", "mlflow")
    port = service["spec"]["ports"][0]
    url = f"http://{service['metadata']['name']}:{port['port']}"
    for container in _ray_containers():
        assert _env(container)["MLFLOW_TRACKING_URI"]["value"] == url, container["name"]
        assert {"secretRef": {"name": "mlflow-client", "optional": True}} in container["envFrom"]
    for where, config in _run_configs().items():
        assert config["tracking_uri"] == url, where
    assert yaml.safe_load((K8S / "sweep" / "sweep.yaml").read_text())["tracking_uri"] == url
    deployment = one("Deployment", "mlflow")
    pod = deployment["spec"]["template"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    (container,) = pod["spec"]["containers"]
    assert port["targetPort"] in {p["name"] for p in container["ports"]}
    # The server's DNS-rebinding filter must accept the names clients use.
    patterns = _env(container)["MLFLOW_SERVER_ALLOWED_HOSTS"]["value"].split(",")
    for host in (f"mlflow:{port['port']}", f"mlflow.{NAMESPACE}.svc.cluster.local:{port['port']}",
                 "localhost:5000", "127.0.0.1:5000"):
        assert any(fnmatch.fnmatch(host, p) for p in patterns), host
    assert not any(fnmatch.fnmatch("mlflow.evil.example:5000", p) for p in patterns)
    assert "--serve-artifacts" in container["args"]


def _policy_problems(policy: dict) -> list[str]:
    """Anything that lets more than the Ray pods and the ingress controller reach MLflow."""
    spec = policy["spec"]
    problems = [] if spec.get("policyTypes") == ["Ingress"] else ["policyTypes must be [Ingress]"]
    ray_pods = {"matchExpressions": [{"key": "ray.io/node-type", "operator": "In", "values": ["head", "worker"]}]}
    ingress_controller = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}},
                          "podSelector": {"matchLabels": {"app.kubernetes.io/name": "ingress-nginx"}}}
    for rule in spec.get("ingress", []):
        if not rule.get("from"):
            problems.append("a rule without `from` admits everyone")
        for peer in rule.get("from", []):
            if peer not in ({"podSelector": ray_pods}, ingress_controller):
                problems.append(f"peer {peer}")
        if rule.get("ports") != [{"protocol": "TCP", "port": 5000}]:
            problems.append(f"ports {rule.get('ports')}")
    return problems


def test_mlflow_admits_only_the_ray_pods_and_the_ingress_controller():
    policy = one("NetworkPolicy", "mlflow")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= \
        one("Deployment", "mlflow")["spec"]["template"]["metadata"]["labels"].items()
    assert policy["spec"]["ingress"] and not _policy_problems(policy)


@pytest.mark.parametrize("mutate", [
    pytest.param(lambda p: p["spec"]["ingress"][0]["from"].append({"podSelector": {}}), id="whole-namespace"),
    pytest.param(lambda p: p["spec"]["ingress"][0]["from"].append({"ipBlock": {"cidr": "0.0.0.0/0"}}), id="ip-block"),
    pytest.param(lambda p: p["spec"]["ingress"][0]["from"][1].pop("podSelector"), id="whole-ingress-namespace"),
    pytest.param(lambda p: p["spec"]["ingress"].append({}), id="open-rule"),
    pytest.param(lambda p: p["spec"]["ingress"][0].pop("ports"), id="every-port"),
])
def test_the_network_policy_check_rejects_broken_copies(mutate):
    policy = copy.deepcopy(one("NetworkPolicy", "mlflow"))
    mutate(policy)
    assert _policy_problems(policy)


def test_mlflow_stays_cluster_internal_and_its_bind_address_is_explained():
    service = one("Service", "mlflow")
    assert service["spec"]["type"] == "ClusterIP"
    assert not {"externalIPs", "loadBalancerIP", "externalName"} & service["spec"].keys()
    assert all("nodePort" not in p for p in service["spec"]["ports"])
    for path, forwarded in ((K8S / "base" / "mlflow-deployment.yaml", "kubectl port-forward"),
                            (CLUSTER_YAML, "ray attach -p 5000")):
        text = path.read_text()
        comments = "\n".join(line for line in text.splitlines() if line.lstrip().startswith("#"))
        assert "0.0.0.0" in comments and forwarded in comments, f"{path.name}: say why MLflow binds 0.0.0.0"


def test_service_accounts_exist_and_the_docs_bind_them_to_iam_roles():
    accounts = {o["metadata"]["name"] for o in [one("ServiceAccount", "secura-ray"), one("ServiceAccount", "mlflow")]}
    used = {t["spec"]["serviceAccountName"] for t in ray_templates(_job_source()).values()}
    used.add(one("Deployment", "mlflow")["spec"]["template"]["spec"]["serviceAccountName"])
    assert used == accounts
    docs = " ".join(DOCS.read_text().replace("\\\n", " ").split())
    for account in accounts:
        assert re.search(rf"eksctl create iamserviceaccount [^`]*--namespace {NAMESPACE} --name {account} ", docs), \
            f"docs/cluster.md must bind {account} to an IAM role"


def test_eks_node_groups_match_the_pods_node_selectors_and_tolerations():
    config = yaml.safe_load(EKSCTL_CONFIG.read_text())
    groups = {g["name"]: g for g in config["managedNodeGroups"]}
    templates = ray_templates(_job_source())
    assert templates["head"]["spec"]["nodeSelector"].items() <= groups["cpu"]["labels"].items()
    assert one("Deployment", "mlflow")["spec"]["template"]["spec"]["nodeSelector"].items() <= \
        groups["cpu"]["labels"].items()
    gpu = groups["gpu"]
    assert templates["gpu"]["spec"]["nodeSelector"].items() <= gpu["labels"].items()
    tolerated = {(t["key"], t["effect"]) for t in templates["gpu"]["spec"]["tolerations"]}
    assert {(t["key"], t["effect"]) for t in gpu["taints"]} <= tolerated
    assert gpu["minSize"] == 0 and gpu["propagateASGTags"] is True, "scaled from zero by the Cluster Autoscaler"
    assert gpu["instanceType"] == yaml.safe_load(CLUSTER_YAML.read_text())[
        "available_node_types"]["gpu_worker"]["node_config"]["InstanceType"]
    assert config["iam"]["withOIDC"] is True
    addons = {a["name"]: a for a in config["addons"]}
    assert "aws-efs-csi-driver" in addons, "the shared volume's ReadWriteMany storage"
    assert json.loads(addons["vpc-cni"]["configurationValues"])["enableNetworkPolicy"] == "true", \
        "EKS enforces the MLflow NetworkPolicy only with this"


def test_shared_storage_is_read_write_many_on_efs_as_the_ray_user():
    pvc = one("PersistentVolumeClaim", "secura-shared")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    storage_class = pvc["spec"]["storageClassName"]
    docs = DOCS.read_text()
    (manifest,) = [yaml.safe_load(block) for block in re.findall(r"<<EOF\n(.*?)\nEOF", docs, re.S)
                   if "kind: StorageClass" in block]
    assert manifest["metadata"]["name"] == storage_class and manifest["provisioner"] == "efs.csi.aws.com"
    for template in ray_templates(_job_source()).values():
        security = template["spec"]["securityContext"]
        assert (manifest["parameters"]["uid"], manifest["parameters"]["gid"]) == \
            (str(security["runAsUser"]), str(security["runAsGroup"]))
    for where, config in _run_configs().items():
        assert config["output_dir"].startswith("/shared/"), where


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


@pytest.mark.parametrize("where", sorted(_run_configs()))
def test_job_run_configs_use_only_known_fields(where):
    data = _run_configs()[where]
    assert data["scaling"]["use_gpu"] is True
    assert data["scaling"]["num_workers"] <= _job_source()["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["maxReplicas"]
    fields = _model_fields("pipelines/config.py")
    assert set(data) <= fields["RunConfig"], set(data) - fields["RunConfig"]
    for section, cls in (("train", "TrainConfig"), ("eval", "EvalConfig"), ("scaling", "ScalingConfig")):
        assert set(data.get(section, {})) <= fields[cls], (section, set(data[section]) - fields[cls])
    broken = dict(data, outptu_dir="x")
    assert not set(broken) <= fields["RunConfig"], "the field check must catch a typo"


def test_the_sweep_config_uses_only_known_fields_and_its_base():
    data = yaml.safe_load((K8S / "sweep" / "sweep.yaml").read_text())
    assert isinstance(data, dict) and data["space"]
    assert data["output_dir"].startswith("/shared/")
    assert data["base"] == "run.yaml" and (K8S / "sweep" / data["base"]).is_file()
    fields = _model_fields("tune/sweep.py")["SweepSpec"]
    assert set(data) <= fields, set(data) - fields
    run_sections = _model_fields("pipelines/config.py")["RunConfig"]
    for key in list(data.get("overrides", {})) + list(data["space"]):
        assert key.split(".")[0] in run_sections, key


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
    options = _job_source()["spec"]["rayClusterSpec"]["autoscalerOptions"]
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
    # a value on the key's own line (a `secret:` volume source nests its keys below)
    re.compile(r"^\s*(password|passwd|secret|aws_secret_access_key|auth_token)\s*:[ \t]*[^\s{]", re.I | re.M),
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


def test_no_literal_secrets_in_the_other_deployment_files():
    files = [CLUSTER_YAML, EKSCTL_CONFIG, *sorted(_generator_inputs())]
    files += [p for p in _yaml_files() if _is_kustomize_file(p)]
    for path in files:
        stripped = "\n".join(line for line in path.read_text().splitlines() if not line.lstrip().startswith("#"))
        for pattern in LITERAL_SECRET_PATTERNS:
            assert not pattern.search(stripped), (path, pattern.pattern)
        assert not re.search(r"(AWS_SECRET_ACCESS_KEY|PASSWORD|RAY_AUTH_TOKEN)\s*[:=]\s*\S", stripped), path


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


# --- docs/cluster.md ---------------------------------------------------------------


def test_docs_name_only_files_that_exist():
    text = DOCS.read_text()
    for ref in sorted(set(re.findall(r"\b(k8s/[\w./-]*\w|configs/[\w.-]+\.yaml|cluster\.yaml)", text))):
        if ref.startswith("configs/") and ref.split("/")[1] in ("run.yaml", "sweep.yaml"):
            continue  # the in-pod paths /configs/run.yaml, /configs/sweep.yaml
        assert (ROOT / ref).exists(), f"docs/cluster.md names {ref}, which does not exist"
    for command in ("ray up cluster.yaml", "ray attach cluster.yaml -p 5000", "ray dashboard cluster.yaml",
                    "ray job submit --address http://127.0.0.1:8265", "ray down cluster.yaml", "RAY_AUTH_MODE=token",
                    "eksctl create cluster -f k8s/eks/cluster.yaml", "helm install kuberay-operator",
                    "kubectl apply -k k8s/run", "kubectl apply -k k8s/sweep", "kubectl apply -k k8s/trial",
                    "kubectl logs -f", "kubectl port-forward -n secura-cl svc/mlflow 5000:5000",
                    "storage_path", "output_dir", "tracking_uri", "--resume", "backoffLimit", "/dev/shm",
                    "gcsFaultToleranceOptions", "RAY_REDIS_ADDRESS", "driver ≥ 580"):
        assert command in text, f"docs/cluster.md should cover `{command}`"


def _position(text: str, needle: str, start: int = 0) -> int:
    at = text.find(needle, start)
    assert at >= 0, f"docs/cluster.md lacks `{needle}`"
    return at


COMMON_STEPS = ["aws s3api create-bucket", "aws iam create-policy"]


@pytest.mark.parametrize("section,steps", [
    ("## 2. Ray cluster launcher", ["aws iam create-role", "aws rds create-db-instance", "mlflow-server.env <<EOF",
                                    "ray up cluster.yaml", "/api/2.0/mlflow/users/create", "ray job submit",
                                    "### 2.5 The UI"]),
    ("## 3. Kubernetes", ["eksctl create cluster", "eksctl create iamserviceaccount", "kind: StorageClass",
                          "helm install kuberay-operator", "secret generic secura-ray-auth",
                          "aws rds create-db-instance", "secret generic mlflow-server", "kubectl apply -k k8s/\n",
                          "/api/2.0/mlflow/users/create", "kubectl apply -k k8s/run", "### 3.4 The UI"]),
])
def test_docs_steps_come_in_order(section, steps):
    """Bucket, IAM, cluster, MLflow, job, UI: nothing is used before the step that makes it."""
    text = DOCS.read_text()
    at = 0
    for step in COMMON_STEPS:
        at = _position(text, step, at)
    begin = _position(text, section)
    end = text.find("\n## ", begin + 1)
    at, previous = max(at, begin), section
    for step in steps:
        found = text.find(step, at)
        assert begin <= found < end, f"`{step}` must come after `{previous}` in `{section}`"
        at, previous = found, step
