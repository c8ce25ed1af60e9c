"""Deployment files: valid for the tools that read them, consistent with each other, free of secrets.

Nothing here talks to a cloud or a cluster. The Ray cluster-launcher config is
checked with Ray's own schema and default-filling; the Kubernetes manifests are
parsed and their cross-references checked; the CronJob's shell script is run
against a stand-in ``kubectl`` to see which RayJob it would create.
"""

from __future__ import annotations

import copy
import gzip
import json
import os
import re
import shutil
import subprocess
from datetime import datetime, timedelta, timezone
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from uflow_batch.jobs import parse_job_spec, validate_cron

ROOT = Path(__file__).resolve().parents[1]
KUBERAY = ROOT / "deploy" / "kuberay"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
SCHEDULER_DOCKERFILE = ROOT / "deploy" / "Dockerfile.scheduler"
CRD_SCHEMAS = KUBERAY / "schemas"
DEPLOY_README = ROOT / "deploy" / "README.md"
CLUSTER_CONFIG = ROOT / "ray-cluster.yaml"


def load_docs(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def all_manifests() -> list[tuple[str, dict]]:
    return [(path.name, doc) for path in sorted(KUBERAY.glob("*.yaml")) for doc in load_docs(path)]


def one(kind: str, filename: str) -> dict:
    docs = [doc for doc in load_docs(KUBERAY / filename) if doc["kind"] == kind]
    assert len(docs) == 1, f"expected one {kind} in {filename}"
    return docs[0]


def ray_pod_specs(cluster_spec: dict) -> list[tuple[str, dict]]:
    """(group name, pod spec) for the head and every worker group of a RayCluster spec."""
    pods = [("head", cluster_spec["headGroupSpec"]["template"]["spec"])]
    pods += [(g["groupName"], g["template"]["spec"]) for g in cluster_spec["workerGroupSpecs"]]
    return pods


def ray_cluster_specs() -> list[tuple[str, dict]]:
    specs = [("raycluster.yaml", one("RayCluster", "raycluster.yaml")["spec"])]
    for path in sorted(KUBERAY.glob("rayjob-*.yaml")):
        specs.append((path.name, one("RayJob", path.name)["spec"]["rayClusterSpec"]))
    return specs


def dockerfile_default(arg: str) -> str:
    match = re.search(rf"^ARG {arg}=(\S+)", DOCKERFILE.read_text(), re.MULTILINE)
    assert match, f"Dockerfile has no default for ARG {arg}"
    return match.group(1)


def nightly_spec():
    configmap = one("ConfigMap", "configmap-jobs.yaml")
    return parse_job_spec(configmap["data"]["nightly.yaml"], source="configmap-jobs.yaml:nightly.yaml")


# --- ray-cluster.yaml (Ray cluster launcher, AWS) ------------------------------------------------

def prepared_cluster_config() -> dict:
    """The config as `ray up` sees it after filling defaults: offline, no AWS calls."""
    return prepare_config(copy.deepcopy(yaml.safe_load(CLUSTER_CONFIG.read_text())))


def test_cluster_config_passes_rays_own_schema_validation():
    validate_config(prepared_cluster_config())


def test_rays_validator_does_reject_a_broken_config():
    # The check above means something only if the validator is live.
    broken = prepared_cluster_config()
    broken["idle_timeout_minutes_typo"] = 5
    with pytest.raises(jsonschema.ValidationError):
        validate_config(broken)


def test_cluster_config_has_a_cpu_head_and_an_autoscaling_gpu_worker_type():
    config = yaml.safe_load(CLUSTER_CONFIG.read_text())
    assert config["provider"]["type"] == "aws"
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    gpu_types = [t for name, t in types.items() if name != config["head_node_type"] and t["resources"].get("GPU")]
    assert len(gpu_types) == 1
    gpu = gpu_types[0]
    assert gpu["resources"]["GPU"] == 1
    assert gpu["node_config"]["InstanceType"].startswith(("g", "p"))  # an EC2 GPU family
    assert gpu.get("min_workers", 0) == 0 < gpu["max_workers"] <= config["max_workers"]
    assert config["idle_timeout_minutes"] >= 1


def test_every_node_gets_s3_access_from_an_instance_profile():
    config = yaml.safe_load(CLUSTER_CONFIG.read_text())
    for name, node_type in config["available_node_types"].items():
        profile = node_type["node_config"].get("IamInstanceProfile", {})
        assert re.match(r"^arn:aws:iam::\d{12}:instance-profile/", profile.get("Arn", "")), name


def test_cluster_setup_installs_the_package_with_the_same_ray_as_the_image():
    config = yaml.safe_load(CLUSTER_CONFIG.read_text())
    setup = "\n".join(config["setup_commands"])
    assert re.search(r"pip install .*uflow_batch-.*\.whl", setup)
    assert f"ray[default,data]=={dockerfile_default('RAY_VERSION')}" in setup
    mounted = {Path(local).as_posix().lstrip("./") for local in config["file_mounts"].values()}
    assert {"dist", "jobs"} <= mounted


# --- Kubernetes manifests ---------------------------------------------------------------------------

def test_every_manifest_parses_and_names_its_api_kind_and_name():
    manifests = all_manifests()
    assert {path.name for path in KUBERAY.glob("*.yaml")} >= {
        "raycluster.yaml", "rayjob-train-all.yaml", "rayjob-nightly.yaml",
        "cronjob-nightly.yaml", "configmap-jobs.yaml", "serviceaccount.yaml",
    }
    for filename, doc in manifests:
        assert isinstance(doc.get("apiVersion"), str) and doc["apiVersion"], filename
        assert isinstance(doc.get("kind"), str) and doc["kind"], filename
        assert re.match(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", doc.get("metadata", {}).get("name", "")), filename


def test_ray_resources_use_the_v1_api():
    for filename, doc in all_manifests():
        if doc["kind"] in ("RayCluster", "RayJob"):
            assert doc["apiVersion"] == "ray.io/v1", filename


def test_raycluster_has_a_head_and_an_autoscaling_gpu_worker_group():
    spec = one("RayCluster", "raycluster.yaml")["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["headGroupSpec"]["template"]["spec"]["containers"]
    head_limits = spec["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert "nvidia.com/gpu" not in head_limits
    gpu_groups = [
        g for g in spec["workerGroupSpecs"]
        if g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu") == 1
    ]
    assert len(gpu_groups) == 1
    group = gpu_groups[0]
    assert group["minReplicas"] == 0 < group["maxReplicas"]
    assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]


def test_every_ray_cluster_runs_the_images_ray_version_with_matching_images():
    for filename, spec in ray_cluster_specs():
        assert spec["rayVersion"] == dockerfile_default("RAY_VERSION"), filename
        for group, pod in ray_pod_specs(spec):
            container = pod["containers"][0]
            wants_gpu = "nvidia.com/gpu" in container["resources"].get("limits", {})
            assert container["image"].endswith("-gpu" if wants_gpu else "-cpu"), (filename, group)


def test_every_ray_pod_runs_as_the_iam_annotated_service_account_and_not_as_root():
    account = one("ServiceAccount", "serviceaccount.yaml")
    assert re.match(r"^arn:aws:iam::\d{12}:role/", account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"])
    for filename, spec in ray_cluster_specs():
        for group, pod in ray_pod_specs(spec):
            assert pod["serviceAccountName"] == account["metadata"]["name"], (filename, group)
            assert pod["securityContext"]["runAsNonRoot"] is True, (filename, group)


def test_rayjobs_run_uflow_batch_on_clusters_that_go_away_afterwards():
    jobs = [(path.name, one("RayJob", path.name)) for path in sorted(KUBERAY.glob("rayjob-*.yaml"))]
    assert len(jobs) >= 2
    for filename, job in jobs:
        assert job["spec"]["entrypoint"].startswith("uflow-batch "), filename
        assert job["spec"]["shutdownAfterJobFinishes"] is True, filename


def test_the_training_rayjob_runs_train_all_on_data_and_models():
    entrypoint = one("RayJob", "rayjob-train-all.yaml")["spec"]["entrypoint"].split()
    assert entrypoint[:2] == ["uflow-batch", "train-all"]
    assert "--data" in entrypoint and "--models" in entrypoint


def test_the_nightly_rayjob_reads_its_spec_from_the_jobs_configmap_on_the_head():
    job = one("RayJob", "rayjob-nightly.yaml")
    assert job["spec"]["entrypoint"] == "uflow-batch run-job /jobs/nightly.yaml"
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mounts = {m["name"]: m["mountPath"] for m in head["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in head["volumes"]}
    jobs_volume = next(name for name, path in mounts.items() if path == "/jobs")
    configmap = one("ConfigMap", "configmap-jobs.yaml")
    assert volumes[jobs_volume]["configMap"]["name"] == configmap["metadata"]["name"]
    assert "nightly.yaml" in configmap["data"]


def test_the_configmaps_job_spec_is_valid_and_fits_the_nightly_cluster():
    spec = nightly_spec()
    gpu_group = next(
        g for g in one("RayJob", "rayjob-nightly.yaml")["spec"]["rayClusterSpec"]["workerGroupSpecs"]
        if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]
    )
    if spec.resources.gpus_per_actor:
        assert spec.resources.actors * spec.resources.gpus_per_actor <= gpu_group["maxReplicas"]


def test_the_cronjob_fires_on_the_specs_schedule_in_utc():
    cronjob = one("CronJob", "cronjob-nightly.yaml")
    assert cronjob["apiVersion"] == "batch/v1"
    validate_cron(cronjob["spec"]["schedule"])
    assert cronjob["spec"]["schedule"] == nightly_spec().schedule
    assert cronjob["spec"]["timeZone"] in ("Etc/UTC", "UTC")
    assert cronjob["spec"]["concurrencyPolicy"] == "Forbid"
    env = {e["name"]: e["value"] for e in cronjob_container()["env"]}
    assert env["JOB_NAME"] == nightly_spec().name


def cronjob_container() -> dict:
    pod = one("CronJob", "cronjob-nightly.yaml")["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return pod["containers"][0]


def test_the_cronjob_may_manage_rayjobs_and_nothing_else():
    pod = one("CronJob", "cronjob-nightly.yaml")["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    account = one("ServiceAccount", "cronjob-nightly.yaml")
    role = one("Role", "cronjob-nightly.yaml")
    binding = one("RoleBinding", "cronjob-nightly.yaml")
    assert pod["serviceAccountName"] == account["metadata"]["name"]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account["metadata"]["name"]}]
    assert role["rules"] == [{
        "apiGroups": ["ray.io"], "resources": ["rayjobs"], "verbs": ["get", "list", "create", "delete"],
    }]


def test_the_cronjob_template_configmap_is_documented_with_its_create_command():
    pod = one("CronJob", "cronjob-nightly.yaml")["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    template = next(v["configMap"]["name"] for v in pod["volumes"] if "configMap" in v)
    command = f"kubectl create configmap {template}"
    readme = (ROOT / "deploy" / "README.md").read_text()
    assert command in readme and "--from-file=rayjob.yaml=deploy/kuberay/rayjob-nightly.yaml" in readme


def run_cronjob_script(tmp_path: Path, existing: list[str], overrides: dict | None = None) -> tuple[Path, list[str]]:
    """Run the CronJob's script with a stand-in kubectl; return (created file, deleted refs).

    The stand-in answers ``get`` from ``existing``, records ``create`` and
    ``delete``, and hands ``patch --local`` (pure, offline) to the real kubectl.
    """
    real = shutil.which("kubectl")
    if real is None:
        pytest.skip("kubectl is not installed")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "kubectl"
    fake.write_text(
        '#!/bin/sh\n'
        'case "$1" in\n'
        '  get) if [ "$3" = "-l" ]; then for n in $FAKE_EXISTING; do echo "rayjob.ray.io/$n"; done; exit 0; fi\n'
        '       for n in $FAKE_EXISTING; do [ "$n" = "$3" ] && exit 0; done; exit 1 ;;\n'
        '  patch) exec "$REAL_KUBECTL" "$@" ;;\n'
        '  create) cp "$3" "$FAKE_OUT/created.yaml" ;;\n'
        '  delete) echo "$2" >> "$FAKE_OUT/deleted" ;;\n'
        '  *) echo "unexpected kubectl $*" >&2; exit 2 ;;\n'
        'esac\n'
    )
    fake.chmod(0o755)
    container = cronjob_container()
    env = {e["name"]: e["value"] for e in container["env"]}
    env.update({
        "TEMPLATE": str(KUBERAY / "rayjob-nightly.yaml"),
        "HOME": str(tmp_path),
        "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}",
        "REAL_KUBECTL": real,
        "KUBECONFIG": str(tmp_path / "no-kubeconfig"),
        "FAKE_EXISTING": " ".join(existing),
        "FAKE_OUT": str(tmp_path),
    })
    env.update(overrides or {})
    result = subprocess.run([*container["command"], *container["args"]], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    deleted = tmp_path / "deleted"
    return tmp_path / "created.yaml", deleted.read_text().split() if deleted.exists() else []


def cronjob_env() -> dict:
    return {e["name"]: e["value"] for e in cronjob_container()["env"]}


def expected_run_date() -> datetime:
    return datetime.now(timezone.utc) - timedelta(days=int(cronjob_env()["LAG_DAYS"]))


def test_the_cronjob_scores_the_night_the_spec_says():
    assert int(cronjob_env()["LAG_DAYS"]) == nightly_spec().lag_days


def test_the_cronjob_creates_the_nights_rayjob_from_the_template_and_prunes_old_ones(tmp_path):
    run_date = expected_run_date()
    old = (run_date - timedelta(days=40)).strftime("%Y%m%d")
    recent = (run_date - timedelta(days=1)).strftime("%Y%m%d")
    job_name = nightly_spec().name

    created, deleted = run_cronjob_script(tmp_path, [f"{job_name}-{old}", f"{job_name}-{recent}", job_name])

    job = yaml.safe_load(created.read_text())
    night = run_date.strftime("%Y%m%d")
    assert job["kind"] == "RayJob"
    assert job["metadata"]["name"] == f"{job_name}-{night}"
    assert job["metadata"]["labels"]["uflow-batch/night"] == night
    assert job["metadata"]["labels"]["uflow-batch/job"] == job_name
    template = one("RayJob", "rayjob-nightly.yaml")["spec"]
    assert {k: v for k, v in job["spec"].items() if k != "entrypoint"} == {
        k: v for k, v in template.items() if k != "entrypoint"
    }
    assert deleted == [f"rayjob.ray.io/{job_name}-{old}"]


def test_the_rayjob_entrypoint_pins_the_run_date_its_name_says(tmp_path):
    created, _ = run_cronjob_script(tmp_path, [])
    job = yaml.safe_load(created.read_text())
    night = job["metadata"]["name"].rsplit("-", 1)[1]
    run_date = f"{night[:4]}-{night[4:6]}-{night[6:]}"
    template = one("RayJob", "rayjob-nightly.yaml")["spec"]["entrypoint"]
    assert job["spec"]["entrypoint"] == f"{template} --run-date {run_date}"
    assert run_date == expected_run_date().strftime("%Y-%m-%d")


def test_the_cronjob_leaves_an_existing_rayjob_for_the_night_alone(tmp_path):
    night = expected_run_date().strftime("%Y%m%d")
    created, deleted = run_cronjob_script(tmp_path, [f"{nightly_spec().name}-{night}"])
    assert not created.exists()
    assert deleted == []


DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
RAYJOB_NAME_MAX = 47  # KubeRay >= 1.4: MaxRayClusterNameLength (53) - 6


def test_every_rayjob_name_with_its_date_suffix_is_a_dns1035_label_of_at_most_47_characters():
    names = [one("RayJob", path.name)["metadata"]["name"] for path in sorted(KUBERAY.glob("rayjob-*.yaml"))]
    # names the CronJob builds (JOB_NAME-YYYYMMDD), and those specs' names would give
    specs = [nightly_spec().name, cronjob_env()["JOB_NAME"]]
    specs += [parse_job_spec(p.read_text(), source=p.name).name for p in sorted((ROOT / "jobs").glob("*.yaml"))]
    names += [f"{name}-20261231" for name in specs]
    for name in names:
        assert DNS_1035.match(name) and len(name) <= RAYJOB_NAME_MAX, name


@pytest.mark.parametrize("job_name", ["n" * 39, "1nightly", "Nightly-Tiles", "nightly_tiles"])
def test_the_cronjob_refuses_a_rayjob_name_kuberay_would_reject(tmp_path, job_name):
    with pytest.raises(AssertionError, match="not a DNS-1035 label of at most 47 characters"):
        run_cronjob_script(tmp_path, [], {"JOB_NAME": job_name})
    assert not (tmp_path / "created.yaml").exists()


def test_the_cronjob_accepts_the_longest_name_kuberay_allows(tmp_path):
    created, _ = run_cronjob_script(tmp_path, [], {"JOB_NAME": "n" * 38})
    assert len(yaml.safe_load(created.read_text())["metadata"]["name"]) == RAYJOB_NAME_MAX


def test_rayjobs_retry_on_new_clusters_and_give_up_early_when_nothing_starts():
    for path in sorted(KUBERAY.glob("rayjob-*.yaml")):
        spec = one("RayJob", path.name)["spec"]
        assert spec["backoffLimit"] >= 1, path.name
        assert 0 < spec["preRunningDeadlineSeconds"] < spec["activeDeadlineSeconds"], path.name


# --- secrets and the Dockerfile -------------------------------------------------------------------

SECRET_PATTERNS = [
    re.compile(r"AKIA[0-9A-Z]{16}"),
    re.compile(r"aws_secret_access_key", re.IGNORECASE),
    re.compile(r"aws_session_token", re.IGNORECASE),
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"^\s*(password|secret|token)\s*[:=]\s*\S+", re.IGNORECASE | re.MULTILINE),
]


def deployment_files() -> list[Path]:
    files = [p for p in (ROOT / "deploy").rglob("*") if p.is_file()]
    files += [CLUSTER_CONFIG, *(ROOT / "jobs").glob("*")]
    return sorted(files)


@pytest.mark.parametrize("path", deployment_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_deployment_file_holds_a_credential(path):
    text = gzip.decompress(path.read_bytes()).decode() if path.suffix == ".gz" else path.read_text()
    for pattern in SECRET_PATTERNS:
        assert not pattern.search(text), f"{pattern.pattern} in {path}"


# --- images, Pod Security, shared memory ------------------------------------------------------------

def pod_specs_of(doc: dict) -> list[tuple[str, dict]]:
    """Every pod spec a manifest creates, directly or through KubeRay, with a label."""
    name = f"{doc['kind']}/{doc['metadata']['name']}"
    if doc["kind"] == "RayCluster":
        return [(f"{name}:{group}", pod) for group, pod in ray_pod_specs(doc["spec"])]
    if doc["kind"] == "RayJob":
        pods = [(f"{name}:{group}", pod) for group, pod in ray_pod_specs(doc["spec"]["rayClusterSpec"])]
        if "submitterPodTemplate" in doc["spec"]:
            pods.append((f"{name}:submitter", doc["spec"]["submitterPodTemplate"]["spec"]))
        return pods
    if doc["kind"] == "CronJob":
        return [(name, doc["spec"]["jobTemplate"]["spec"]["template"]["spec"])]
    return []


def all_pod_specs() -> list[tuple[str, dict]]:
    return [pod for _, doc in all_manifests() for pod in pod_specs_of(doc)]


def containers_of(pod: dict) -> list[dict]:
    return [*pod.get("initContainers", []), *pod["containers"]]


WITHDRAWN_IMAGES = re.compile(r"^(docker\.io/)?bitnami/")  # Bitnami dropped its versioned public tags


def assert_pinned(image: str, where: str) -> None:
    repository, _, digest = image.partition("@")
    tag = repository.rsplit("/", 1)[-1].partition(":")[2]
    assert tag and tag != "latest" and re.search(r"\d", tag), f"{where}: {image} is not pinned to a version"
    assert not digest or re.fullmatch(r"sha256:[0-9a-f]{64}", digest), f"{where}: bad digest in {image}"
    assert not WITHDRAWN_IMAGES.match(image), f"{where}: {image} is withdrawn"


def test_no_manifest_uses_a_withdrawn_or_unpinned_image():
    pods = all_pod_specs()
    assert any(label.startswith("CronJob/") for label, _ in pods)
    for label, pod in pods:
        for container in containers_of(pod):
            assert_pinned(container["image"], label)


def test_the_scheduler_image_is_kubectl_from_the_kubernetes_project_on_a_pinned_shell_image():
    text = SCHEDULER_DOCKERFILE.read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", text, re.MULTILINE))
    froms = [re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], f.split()[0])
             for f in re.findall(r"^FROM (.+)$", text, re.MULTILINE)]
    assert froms[0].startswith("registry.k8s.io/kubectl:v")
    assert re.fullmatch(r"v\d+\.\d+\.\d+", args["KUBECTL_VERSION"])
    for image in froms:
        assert_pinned(image, "Dockerfile.scheduler")
    assert "COPY --from=kubectl /bin/kubectl /bin/kubectl" in text
    user = re.findall(r"^USER (\S+)", text, re.MULTILINE)[-1]
    pod = one("CronJob", "cronjob-nightly.yaml")["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert user.split(":")[0] == str(pod["securityContext"]["runAsUser"]) != "0"
    assert "uflow-batch-scheduler:" in cronjob_container()["image"]
    assert "deploy/Dockerfile.scheduler" in DEPLOY_README.read_text()


RESTRICTED_CONTAINER = {
    "allowPrivilegeEscalation": False,
    "runAsNonRoot": True,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}


def assert_restricted(context: dict, where: str) -> None:
    for key, value in RESTRICTED_CONTAINER.items():
        assert context.get(key) == value, f"{where}: securityContext.{key} is {context.get(key)!r}, not {value!r}"
    assert not context.get("privileged"), where
    assert context.get("runAsUser", 1) != 0, where


def test_every_container_of_every_manifest_runs_under_the_restricted_pod_security_profile():
    pods = all_pod_specs()
    for label, pod in pods:
        assert pod["securityContext"]["runAsNonRoot"] is True, label
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, label
        assert pod["securityContext"].get("runAsUser", 1) != 0, label
        assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC"), label
        assert all("hostPath" not in volume for volume in pod.get("volumes", [])), label
        for container in containers_of(pod):
            assert_restricted(container["securityContext"], f"{label}/{container['name']}")
    # KubeRay adds the autoscaler container itself; its securityContext comes from autoscalerOptions
    for filename, spec in ray_cluster_specs():
        if spec.get("enableInTreeAutoscaling"):
            assert_restricted(spec["autoscalerOptions"]["securityContext"], f"{filename}: autoscaler")
    # KubeRay's default submitter pod has no securityContext: every RayJob brings its own
    for path in sorted(KUBERAY.glob("rayjob-*.yaml")):
        spec = one("RayJob", path.name)["spec"]
        if spec.get("submissionMode", "K8sJobMode") == "K8sJobMode":
            assert "submitterPodTemplate" in spec, path.name


def memory_bytes(quantity: str) -> float:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT]i?)?", str(quantity))
    assert match, quantity
    return float(match.group(1)) * units.get(match.group(2) or "", 1)


RAY_DEFAULT_OBJECT_STORE_FRACTION = 0.3


def test_no_shm_volume_smaller_than_the_object_store():
    """A /dev/shm mount written here replaces KubeRay's (sized to the container's memory)."""
    for filename, spec in ray_cluster_specs():
        for (group, pod), group_spec in zip(
            ray_pod_specs(spec), [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
        ):
            container = pod["containers"][0]
            memory = memory_bytes(container["resources"]["limits"]["memory"])
            params = group_spec.get("rayStartParams", {})
            store = float(params.get("object-store-memory", RAY_DEFAULT_OBJECT_STORE_FRACTION * memory))
            volumes = {v["name"]: v for v in pod.get("volumes", [])}
            for mount in container.get("volumeMounts", []):
                if mount["mountPath"] != "/dev/shm":
                    continue
                size = volumes[mount["name"]].get("emptyDir", {}).get("sizeLimit")
                assert size is None or memory_bytes(size) >= store, (filename, group, size, store)


# --- the KubeRay CRD schemas (vendored: deploy/kuberay/schemas) ------------------------------------

KUBERAY_FLOOR = "1.6.0"
VENDORED_KUBERAY = sorted({p.name.split("-", 1)[1].removesuffix(".json.gz") for p in CRD_SCHEMAS.glob("*.json.gz")},
                          key=lambda v: tuple(int(x) for x in v.split(".")))


def strict(schema):
    """The CRD schema as the API server applies it with kubectl's default --validate=strict:
    unknown fields are errors, except below x-kubernetes-preserve-unknown-fields."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


def crd_errors(doc: dict, version: str) -> list[str]:
    kind = {"RayJob": "rayjobs", "RayCluster": "rayclusters"}[doc["kind"]]
    schema = strict(json.loads(gzip.decompress((CRD_SCHEMAS / f"{kind}-{version}.json.gz").read_bytes())))
    validator = jsonschema.Draft7Validator(schema)
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def ray_manifests() -> list[tuple[str, dict]]:
    return [(f, d) for f, d in all_manifests() if d["kind"] in ("RayJob", "RayCluster")]


@pytest.mark.parametrize("version", [v for v in VENDORED_KUBERAY if tuple(map(int, v.split("."))) >= (1, 6)])
def test_every_ray_manifest_is_valid_against_the_kuberay_crd_schema(version):
    for filename, doc in ray_manifests():
        assert crd_errors(doc, version) == [], (filename, version)


def test_the_crd_check_rejects_a_misplaced_field():
    doc = copy.deepcopy(one("RayJob", "rayjob-nightly.yaml"))
    doc["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["seccompProfile"] = {
        "type": "RuntimeDefault"}  # belongs in securityContext
    assert crd_errors(doc, KUBERAY_FLOOR)


def test_the_documented_kuberay_floor_is_the_oldest_schema_that_accepts_every_manifest():
    older = [v for v in VENDORED_KUBERAY if tuple(map(int, v.split("."))) < tuple(map(int, KUBERAY_FLOOR.split(".")))]
    assert older, "vendor the schema of the release before the floor to prove the floor"
    assert any(crd_errors(doc, older[-1]) for _, doc in ray_manifests())
    assert all(not crd_errors(doc, KUBERAY_FLOOR) for _, doc in ray_manifests())
    assert f"KubeRay >= {KUBERAY_FLOOR.rsplit('.', 1)[0]}" in DEPLOY_README.read_text()


# --- AWS: the GPU node image and its driver --------------------------------------------------------

# NVIDIA's CUDA minor-version compatibility: the oldest driver branch for each CUDA major version.
CUDA_DRIVER_FLOOR = {12: 525, 13: 580}


def test_gpu_nodes_boot_an_image_whose_driver_runs_the_pinned_torch_build():
    import torch

    pinned = dockerfile_default("TORCH_VERSION")
    if torch.__version__.split("+")[0] != pinned or not torch.version.cuda:
        pytest.skip(f"this environment's torch ({torch.__version__}) is not the pinned CUDA build {pinned}")
    floor = CUDA_DRIVER_FLOOR[int(torch.version.cuda.split(".")[0])]
    config = yaml.safe_load(CLUSTER_CONFIG.read_text())
    for name, node_type in config["available_node_types"].items():
        if not node_type["resources"].get("GPU"):
            continue
        image = node_type["node_config"].get("ImageId", "")
        assert image.startswith(("ami-", "resolve:ssm:")), name
        assert "nvidia-driver" in image or image.startswith("ami-"), name
        check = " ".join(node_type["worker_setup_commands"])
        assert "nvidia-smi --query-gpu=driver_version" in check and f"-ge {floor}" in check, name
    readme = DEPLOY_README.read_text()
    assert f"driver >= {floor}" in readme and f"CUDA {torch.version.cuda.split('.')[0]}" in readme


def test_the_cluster_keeps_rays_own_start_commands():
    config = yaml.safe_load(CLUSTER_CONFIG.read_text())
    assert "head_start_ray_commands" not in config and "worker_start_ray_commands" not in config
    defaults = yaml.safe_load(
        (Path(__import__("ray").__file__).parent / "autoscaler" / "aws" / "defaults.yaml").read_text())
    prepared = prepared_cluster_config()
    assert prepared["head_start_ray_commands"] == defaults["head_start_ray_commands"]
    assert prepared["worker_start_ray_commands"] == defaults["worker_start_ray_commands"]
    assert config["setup_commands"][0] == defaults["setup_commands"][0]
