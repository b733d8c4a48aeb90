"""The cluster definitions in cluster/: Ray launcher configs validate against the schema that ships with
Ray and describe 8-GPU pools with a loopback dashboard; the KubeRay manifests carry the fields the
multi-node setup relies on; nothing exposes a port to the internet. Hardening: every pod and container runs
non-root without capabilities, GCP workers have no external IP, every pip install is pinned, MLflow runs on
PostgreSQL with basic auth and passwords only in Secrets, NetworkPolicies fence MLflow and its database.
Pure file checks: no Ray is started."""
from __future__ import annotations

import dataclasses
import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
KUBERAY = CLUSTER / "kuberay"
LAUNCHER_CONFIGS = sorted(CLUSTER.glob("*.yaml"))
MANIFESTS = sorted(KUBERAY.glob("*.yaml"))
RAYJOBS = {"rayjob-precompute.yaml": "precompute", "rayjob-train.yaml": "train", "rayjob-tune.yaml": "tune"}


def ray_schema() -> dict[str, Any]:
    import ray  # importing ray starts nothing

    path = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
    assert path.is_file(), f"Ray's cluster config schema is missing at {path}"
    return json.loads(path.read_text())


def load_manifest(path: Path) -> list[dict[str, Any]]:
    docs = [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    assert docs, f"{path.name} holds no YAML documents"
    for doc in docs:
        assert isinstance(doc, dict), f"{path.name}: a document is {type(doc).__name__}, not a mapping"
        assert doc.get("apiVersion") and doc.get("kind"), f"{path.name}: a document lacks apiVersion/kind"
    return docs


def all_manifest_docs() -> list[tuple[str, dict[str, Any]]]:
    return [(path.name, doc) for path in MANIFESTS for doc in load_manifest(path)]


def test_the_expected_files_exist():
    assert {p.name for p in LAUNCHER_CONFIGS} >= {"aws.yaml", "gcp.yaml"}
    assert {p.name for p in MANIFESTS} >= {"raycluster.yaml", "pvc-shared.yaml", "mlflow.yaml",
                                           "mlflow-postgres.yaml", *RAYJOBS}
    assert (CLUSTER / "README.md").is_file()


# ---------------------------------------------------------------------------------------------------------
# Ray cluster launcher configs (`ray up`)


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=lambda p: p.name)
def test_launcher_config_validates_against_rays_schema(path):
    import jsonschema

    config = yaml.safe_load(path.read_text())
    jsonschema.validate(config, ray_schema())  # raises ValidationError naming the offending field

    # What `ray up` itself does before launching: fill in the provider's defaults, then validate
    # (head_node_type among the node types, min_workers within max_workers, ...).
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(config))


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=lambda p: p.name)
def test_launcher_config_has_cpu_head_and_8_gpu_pools(path):
    config = yaml.safe_load(path.read_text())
    types = config["available_node_types"]
    head = config["head_node_type"]
    assert head in types, f"head_node_type {head!r} is not one of {sorted(types)}"
    assert types[head]["resources"].get("GPU", 0) == 0, "the head must not advertise GPUs"
    assert types[head]["resources"].get("CPU") == 0, "the head should advertise CPU: 0 (no training on it)"

    gpu_types = {name: t for name, t in types.items() if name != head and t["resources"].get("GPU") == 8}
    assert gpu_types, f"no worker node type with resources GPU: 8 in {path.name}"
    for name, node_type in gpu_types.items():
        assert node_type.get("min_workers") == 0, f"{name}: min_workers should be 0 (scale from zero)"
        assert 1 <= node_type.get("max_workers", 0) <= config["max_workers"], f"{name}: max_workers out of range"

    provider = config["provider"]["type"]
    spot = []
    for name, node_type in gpu_types.items():
        node_config = node_type["node_config"]
        if provider == "aws":
            assert node_config["InstanceType"] == "p5.48xlarge", f"{name}: not an 8x H100 instance"
            if node_config.get("InstanceMarketOptions", {}).get("MarketType") == "spot":
                spot.append(name)
        elif provider == "gcp":
            assert node_config["machineType"] == "a3-highgpu-8g", f"{name}: not an 8x H100 machine"
            accelerators = node_config.get("guestAccelerators", [])
            assert {"acceleratorType": "nvidia-h100-80gb", "acceleratorCount": 8} in accelerators, name
            scheduling = node_config.get("scheduling", {})
            assert isinstance(scheduling, dict), f"{name}: scheduling must be a mapping (the GCE API's shape)"
            if scheduling.get("provisioningModel") == "SPOT" or scheduling.get("preemptible") is True:
                spot.append(name)
        else:
            pytest.fail(f"{path.name}: unexpected provider type {provider!r}")
    assert spot, f"{path.name}: no spot / preemptible GPU pool"
    assert len(spot) < len(gpu_types), f"{path.name}: every GPU pool is spot; keep an on-demand one"
    head_config = types[head]["node_config"]
    assert "InstanceMarketOptions" not in head_config and "provisioningModel" not in head_config.get("scheduling", {}), \
        "the head must stay on on-demand capacity"


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=lambda p: p.name)
def test_launcher_config_keeps_the_dashboard_local_and_mounts_shared_storage(path):
    config = yaml.safe_load(path.read_text())
    head_start = " ".join(config["head_start_ray_commands"])
    assert "ray start --head" in head_start
    assert "--dashboard-host=127.0.0.1" in head_start, "the dashboard/job server must bind to the head's loopback"
    assert "--dashboard-host=0.0.0.0" not in head_start
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head_start
    assert "RAY_AUTH_MODE=token" in head_start, "token authentication must be switched on"
    worker_start = " ".join(config["worker_start_ray_commands"])
    assert "ray start --address=$RAY_HEAD_IP:6379" in worker_start
    assert "RAY_AUTH_MODE=token" in worker_start

    assert config["docker"]["image"].startswith("rayproject/ray:"), "use a Ray GPU image"
    assert config["docker"]["image"].endswith("-gpu")
    assert "-v /shared:/shared" in config["docker"]["run_options"], "the shared mount must reach the container"
    init = " ".join(config["initialization_commands"])
    assert "mount" in init and "/shared" in init, "shared storage must be mounted at /shared on every node"
    assert any("pip install" in cmd and "dumo" in cmd for cmd in config["setup_commands"]), "nodes must install dumo-ray"

    if config["provider"]["type"] == "aws":
        # Ray's auto-created security group opens SSH to every address; every node type names its own.
        for name, node_type in config["available_node_types"].items():
            assert node_type["node_config"].get("SecurityGroupIds"), f"{name}: set SecurityGroupIds"
        assert "security_group" not in config["provider"], "no extra ingress rules in the config"


# ---------------------------------------------------------------------------------------------------------
# KubeRay manifests


def _containers(pod_template: dict[str, Any]) -> list[dict[str, Any]]:
    containers = pod_template["spec"]["containers"]
    assert containers, "a pod template without containers"
    return containers


def _check_shared_and_shm(where: str, pod_template: dict[str, Any]) -> None:
    spec = pod_template["spec"]
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    mounts = {m["mountPath"]: m["name"] for c in spec["containers"] for m in c.get("volumeMounts", [])}

    assert "/shared" in mounts, f"{where}: nothing mounted at /shared"
    shared = volumes.get(mounts["/shared"])
    assert shared is not None, f"{where}: /shared mounts undefined volume {mounts['/shared']!r}"
    assert shared.get("persistentVolumeClaim", {}).get("claimName") == "dumo-shared", \
        f"{where}: /shared must be the dumo-shared ReadWriteMany claim, got {shared}"

    assert "/dev/shm" in mounts, f"{where}: no /dev/shm mount (a pod's default is 64 MiB)"
    shm = volumes.get(mounts["/dev/shm"])
    assert shm is not None and shm.get("emptyDir", {}).get("medium") == "Memory", \
        f"{where}: /dev/shm must be an emptyDir with medium Memory, got {shm}"


def _check_ray_cluster_spec(where: str, spec: dict[str, Any]) -> None:
    assert spec.get("enableInTreeAutoscaling") is True, f"{where}: enableInTreeAutoscaling must be true"
    assert spec.get("authOptions", {}).get("mode") == "token", f"{where}: authOptions.mode must be token"

    head = spec["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP", f"{where}: the head Service must stay ClusterIP"
    params = head["rayStartParams"]
    assert "dashboard-host" in params, f"{where}: set rayStartParams.dashboard-host explicitly"
    assert str(params.get("num-cpus")) == "0", f"{where}: the head should run with num-cpus 0"
    for container in _containers(head["template"]):
        limits = container.get("resources", {}).get("limits", {})
        assert "nvidia.com/gpu" not in limits, f"{where}: the head group must be CPU-only"
        assert "dumo-ray" in container["image"], f"{where}: the head runs the dumo-ray image, got {container['image']}"
    _check_shared_and_shm(f"{where} head", head["template"])

    groups = spec.get("workerGroupSpecs") or []
    assert groups, f"{where}: no workerGroupSpecs"
    for group in groups:
        name = f"{where} worker group {group.get('groupName')!r}"
        assert group.get("minReplicas") == 0, f"{name}: minReplicas should be 0"
        assert group.get("maxReplicas", 0) >= 1, f"{name}: maxReplicas should be >= 1"
        template = group["template"]
        gpu_limits = [c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu") for c in _containers(template)]
        assert any(g is not None and int(str(g)) == 8 for g in gpu_limits), \
            f"{name}: a container needs limits nvidia.com/gpu: 8, got {gpu_limits}"
        tolerations = template["spec"].get("tolerations", [])
        assert any(t.get("key") == "nvidia.com/gpu" and t.get("effect") == "NoSchedule" for t in tolerations), \
            f"{name}: needs a NoSchedule toleration for nvidia.com/gpu, got {tolerations}"
        assert template["spec"].get("nodeSelector"), f"{name}: pin the group to the GPU node pool"
        _check_shared_and_shm(name, template)


def test_every_manifest_parses():
    for path in MANIFESTS:
        load_manifest(path)


def test_raycluster_manifest():
    docs = load_manifest(KUBERAY / "raycluster.yaml")
    clusters = [d for d in docs if d["kind"] == "RayCluster"]
    assert len(clusters) == 1, f"expected one RayCluster, found kinds {[d['kind'] for d in docs]}"
    cluster = clusters[0]
    assert cluster["apiVersion"] == "ray.io/v1"
    _check_ray_cluster_spec("raycluster.yaml", cluster["spec"])
    groups = cluster["spec"]["workerGroupSpecs"]
    assert len(groups) >= 2, "the RayCluster should offer an on-demand and a spot GPU group"


@pytest.mark.parametrize("filename,command", sorted(RAYJOBS.items()))
def test_rayjob_manifests(filename, command):
    docs = load_manifest(KUBERAY / filename)
    assert [d["kind"] for d in docs] == ["RayJob"], f"{filename}: expected exactly one RayJob"
    job = docs[0]
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    entrypoint = spec.get("entrypoint", "")
    assert entrypoint.startswith(f"dumo-ray {command} "), f"{filename}: entrypoint {entrypoint!r}"
    assert "&&" not in entrypoint and ";" not in entrypoint, f"{filename}: keep the entrypoint a single command"
    assert spec.get("shutdownAfterJobFinishes") is True, f"{filename}: shutdownAfterJobFinishes must be true"
    assert isinstance(spec.get("ttlSecondsAfterFinished"), int) and spec["ttlSecondsAfterFinished"] >= 0
    assert spec.get("submissionMode") == "K8sJobMode"
    _check_ray_cluster_spec(filename, spec["rayClusterSpec"])

    if command == "precompute":
        assert "--input /shared/" in entrypoint and "--output /shared/" in entrypoint
    else:
        assert "--config " in entrypoint and "imagenet256_dumo_xl2.yaml" in entrypoint
        assert "tracking.uri=http://mlflow" in entrypoint, f"{filename}: log to the in-cluster MLflow"
    if command == "tune":
        assert "--space loss_weighting" in entrypoint and "--num-samples" in entrypoint


def test_shared_pvc_is_read_write_many():
    docs = load_manifest(KUBERAY / "pvc-shared.yaml")
    pvcs = [d for d in docs if d["kind"] == "PersistentVolumeClaim"]
    assert len(pvcs) == 1
    assert pvcs[0]["metadata"]["name"] == "dumo-shared"
    assert pvcs[0]["spec"]["accessModes"] == ["ReadWriteMany"], "every node mounts it: ReadWriteMany"


def _one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", []) or []}


def _secret_ref(env: dict[str, Any]) -> tuple[str, str]:
    ref = env.get("valueFrom", {}).get("secretKeyRef")
    assert ref and "value" not in env, f"{env['name']} must come from a Secret (valueFrom.secretKeyRef), got {env}"
    return ref["name"], ref["key"]


def _mlflow_server() -> tuple[dict[str, Any], list[str]]:
    """The MLflow Deployment's container and its `mlflow server` command line as shell words."""
    deployment = _one(load_manifest(KUBERAY / "mlflow.yaml"), "Deployment", "mlflow")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    script = " ".join(container.get("command", []) + container.get("args", []))
    assert "exec mlflow server" in script, "the container should exec `mlflow server` (so it gets the signals)"
    return container, shlex.split(script[script.index("mlflow server"):])


def _option(words: list[str], flag: str) -> str:
    assert flag in words, f"mlflow server needs {flag}"
    return words[words.index(flag) + 1]


def test_mlflow_server_manifest():
    docs = load_manifest(KUBERAY / "mlflow.yaml")
    assert {d["kind"] for d in docs} >= {"Deployment", "Service", "NetworkPolicy", "ConfigMap"}
    container, words = _mlflow_server()
    assert _option(words, "--port") == "5000"
    assert _option(words, "--app-name") == "basic-auth", "the server must require a user and password"

    # The store: PostgreSQL, never SQLite (several workers write at once; SQLite on NFS corrupts).
    from sqlalchemy.engine import make_url

    store = make_url(_option(words, "--backend-store-uri"))
    assert store.get_backend_name() == "postgresql", f"backend store must be PostgreSQL, got {store}"
    assert store.password is None, "no password in the store URI: libpq reads PGPASSWORD from the Secret"
    # The driver SQLAlchemy picks for that URI (psycopg 3 for postgresql:// since SQLAlchemy 2.1) must be
    # what the container installs, pinned.
    driver = store.get_dialect().driver
    distribution = {"psycopg": "psycopg", "psycopg2": "psycopg2-binary"}[driver]
    installs = [r for cmd in _pip_installs(" ".join(container.get("args", []))) for r in cmd.requirements]
    assert distribution in {_requirement_name(r) for r in installs}, \
        f"the server needs the {driver} driver: pip install {distribution} (installs: {installs})"
    assert _secret_ref(_env(container)["PGPASSWORD"]) == ("mlflow-postgres", "password")

    # Artifacts: proxied by the server into a bucket.
    assert "--serve-artifacts" in words
    assert re.match(r"(s3|gs)://", _option(words, "--artifacts-destination")), "artifacts go to a bucket"
    assert "--default-artifact-root" not in words, "with --serve-artifacts the clients must not write the bucket"

    # The auth app: admin and CSRF key from a Secret, its users in PostgreSQL too (a ConfigMap without secrets).
    env = _env(container)
    for name in ("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        assert name in env, f"the basic-auth app needs {name}"
        assert _secret_ref(env[name])[0] == "mlflow-auth"
    config_path = Path(env["MLFLOW_AUTH_CONFIG_PATH"]["value"])
    mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
    assert str(config_path.parent) in mounts, f"{config_path} is not on a mounted volume"
    volumes = {v["name"]: v for v in _mlflow_volumes(docs)}
    config_map = _one(docs, "ConfigMap", volumes[mounts[str(config_path.parent)]]["configMap"]["name"])
    ini = config_map["data"][config_path.name]
    auth_db = make_url(re.search(r"^database_uri\s*=\s*(\S+)", ini, re.M).group(1))
    assert auth_db.get_backend_name() == "postgresql" and auth_db.password is None, f"auth database: {auth_db}"
    assert not re.search(r"^\s*admin_password\s*=", ini, re.M), "the admin password belongs in the Secret"

    service = _one(docs, "Service", "mlflow")
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
    assert [p["port"] for p in service["spec"]["ports"]] == [5000]


def _mlflow_volumes(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return _one(docs, "Deployment", "mlflow")["spec"]["template"]["spec"].get("volumes", [])


def test_postgres_for_mlflow_is_a_statefulset_with_its_own_volume():
    docs = load_manifest(KUBERAY / "mlflow-postgres.yaml")
    statefulset = _one(docs, "StatefulSet")
    spec = statefulset["spec"]
    assert spec.get("replicas", 1) == 1
    claims = {c["metadata"]["name"]: c for c in spec.get("volumeClaimTemplates", [])}
    assert claims, "PostgreSQL needs a PersistentVolumeClaim of its own (volumeClaimTemplates)"
    (container,) = spec["template"]["spec"]["containers"]
    assert re.match(r"postgres:\d+\.\d+", container["image"]), f"pin a PostgreSQL release, got {container['image']}"
    env = _env(container)
    data_mounts = [m for m in container["volumeMounts"] if m["name"] in claims]
    assert data_mounts, "the claim must be mounted"
    assert env["PGDATA"]["value"].startswith(data_mounts[0]["mountPath"] + "/"), "PGDATA must live on the claim"
    for claim in claims.values():
        assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
        assert claim["spec"]["resources"]["requests"]["storage"]

    # The server connects where this file serves, as the user and to the database it creates, with the
    # password from the same Secret.
    from sqlalchemy.engine import make_url

    mlflow_container, words = _mlflow_server()
    store = make_url(_option(words, "--backend-store-uri"))
    service = _one(docs, "Service", spec["serviceName"])
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
    assert _selects(service["spec"]["selector"], spec["template"]["metadata"]["labels"])
    assert [p["port"] for p in service["spec"]["ports"]] == [5432]
    assert (store.host, store.port) == (service["metadata"]["name"], 5432), \
        f"the store URI {store} must name the Service {service['metadata']['name']}:5432"
    assert store.username == env["POSTGRES_USER"]["value"] and store.database == env["POSTGRES_DB"]["value"]
    assert _secret_ref(env["POSTGRES_PASSWORD"]) == _secret_ref(_env(mlflow_container)["PGPASSWORD"])
    # The auth app's database is created by the init script.
    init_sql = " ".join(" ".join(d["data"].values()) for d in docs if d["kind"] == "ConfigMap")
    assert re.search(r"CREATE DATABASE mlflow_auth", init_sql), "create the auth database (mlflow_auth)"


def test_ray_pods_that_log_to_mlflow_have_its_credentials():
    for filename in ("raycluster.yaml", "rayjob-train.yaml", "rayjob-tune.yaml"):
        for doc in load_manifest(KUBERAY / filename):
            for where, template in _pod_templates(filename, doc):
                if "submitter" in where:
                    continue
                for container in _containers(template):
                    refs = [e.get("secretRef", {}).get("name") for e in container.get("envFrom", []) or []]
                    assert "mlflow-client" in refs, \
                        f"{where}: {container['name']} needs envFrom secretRef mlflow-client (MLflow requires auth)"


# ---------------------------------------------------------------------------------------------------------
# Exposure and secrets, over everything under cluster/


def test_no_service_is_exposed_outside_the_cluster():
    for filename, doc in all_manifest_docs():
        kind = doc["kind"]
        assert kind not in ("Ingress", "Gateway", "HTTPRoute", "Route"), f"{filename}: {kind} exposes a service"
        assert kind != "Secret", f"{filename}: Secrets are created out of band, never committed"
        if kind == "Service":
            assert doc["spec"].get("type", "ClusterIP") not in ("LoadBalancer", "NodePort"), \
                f"{filename}: Service {doc['metadata']['name']} has type {doc['spec']['type']}"
        spec = doc.get("spec", {})
        cluster_spec = spec.get("rayClusterSpec", spec) if kind in ("RayCluster", "RayJob") else None
        if cluster_spec is not None:
            service_type = cluster_spec["headGroupSpec"].get("serviceType", "ClusterIP")
            assert service_type not in ("LoadBalancer", "NodePort"), f"{filename}: head serviceType {service_type}"


def test_nothing_under_cluster_opens_to_the_internet():
    files = [p for p in CLUSTER.rglob("*") if p.is_file()]
    assert files
    for path in files:
        text = path.read_text()
        assert "0.0.0.0/0" not in text, f"{path.relative_to(ROOT)} mentions 0.0.0.0/0"
        assert "::/0" not in text, f"{path.relative_to(ROOT)} mentions ::/0"


# ---------------------------------------------------------------------------------------------------------
# Hardening: pod security, no public worker IPs, pinned installs, no literal passwords, NetworkPolicies

RAY_UID = 1000  # rayproject/ray's (and so the dumo-ray image's) `ray` user
IMAGE_UIDS = {"dumo-ray": RAY_UID, "rayproject/ray": RAY_UID, "postgres:": 999}  # Debian postgres image: uid 999
CONSTRAINTS = ROOT / "constraints" / "ci.txt"


def _pod_templates(filename: str, doc: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Every pod template in a manifest document, named: Ray head and worker groups, the RayJob submitter,
    Deployments / StatefulSets / Jobs, bare Pods."""
    kind, spec = doc["kind"], doc.get("spec", {})
    where = f"{filename} {kind} {doc['metadata']['name']}"
    if kind in ("RayCluster", "RayJob"):
        cluster = spec["rayClusterSpec"] if kind == "RayJob" else spec
        found = [(f"{where} head", cluster["headGroupSpec"]["template"])]
        found += [(f"{where} group {g['groupName']}", g["template"]) for g in cluster.get("workerGroupSpecs", [])]
        if kind == "RayJob":
            # Without a template of its own the operator's default submitter pod has no securityContext.
            assert spec.get("submitterPodTemplate"), f"{where}: set submitterPodTemplate (with a securityContext)"
            found.append((f"{where} submitter", spec["submitterPodTemplate"]))
        return found
    if kind == "Pod":
        return [(where, doc)]
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
        return [(where, spec["template"])]
    if kind == "CronJob":
        return [(where, spec["jobTemplate"]["spec"]["template"])]
    return []


def _all_pod_templates() -> list[tuple[str, dict[str, Any]]]:
    return [t for filename, doc in all_manifest_docs() for t in _pod_templates(filename, doc)]


def _check_container_security(where: str, context: dict[str, Any] | None) -> None:
    context = context or {}
    assert context.get("allowPrivilegeEscalation") is False, f"{where}: allowPrivilegeEscalation must be false"
    assert "ALL" in (context.get("capabilities", {}).get("drop") or []), f"{where}: capabilities must drop ALL"
    assert not context.get("capabilities", {}).get("add"), f"{where}: no capabilities added"
    assert context.get("privileged") is not True, f"{where}: never privileged"
    assert context.get("runAsNonRoot") is not False and context.get("runAsUser") != 0, f"{where}: never root"


def test_every_pod_and_container_runs_unprivileged():
    templates = _all_pod_templates()
    assert len(templates) >= 14, f"only {len(templates)} pod templates found: is a manifest missing?"
    for where, template in templates:
        pod = template["spec"].get("securityContext") or {}
        assert pod.get("runAsNonRoot") is True, f"{where}: pod securityContext.runAsNonRoot must be true"
        for container in _containers(template) + template["spec"].get("initContainers", []):
            name = f"{where} container {container['name']}"
            _check_container_security(name, container.get("securityContext"))
            # The images name their user; the kubelet can only verify runAsNonRoot against a number.
            uid = (container.get("securityContext") or {}).get("runAsUser", pod.get("runAsUser"))
            assert isinstance(uid, int) and uid > 0, f"{name}: set a numeric non-root runAsUser, got {uid!r}"
            expected = [u for key, u in IMAGE_UIDS.items() if key in container["image"]]
            assert expected, f"{name}: which uid does {container['image']} run as? add it to IMAGE_UIDS"
            assert uid == expected[0], f"{name}: {container['image']} runs as uid {expected[0]}, not {uid}"


def test_kuberay_sidecars_are_unprivileged_too():
    for filename, doc in all_manifest_docs():
        if doc["kind"] not in ("RayCluster", "RayJob"):
            continue
        spec = doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]
        if spec.get("enableInTreeAutoscaling"):
            # The operator adds the autoscaler container to the head pod; its securityContext comes from here.
            _check_container_security(f"{filename} autoscaler sidecar",
                                      spec.get("autoscalerOptions", {}).get("securityContext"))


def test_gcp_workers_have_no_external_ip():
    config = yaml.safe_load((CLUSTER / "gcp.yaml").read_text())
    head = config["head_node_type"]
    workers = {name: t for name, t in config["available_node_types"].items() if name != head}
    assert workers
    for name, node_type in workers.items():
        # Ray adds a default interface WITH an external IP to a node type that names no networkInterfaces.
        interfaces = node_type["node_config"].get("networkInterfaces")
        assert interfaces, f"{name}: list networkInterfaces, or Ray adds one with an external IP"
        for interface in interfaces:
            assert not interface.get("accessConfigs"), f"{name}: accessConfigs gives the worker a public IP"


@dataclasses.dataclass
class PipInstall:
    where: str
    words: list[str]
    constraints: list[str]
    requirements: list[str]


def _requirement_name(requirement: str) -> str:
    return re.split(r"[\[<>=!~; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _pip_installs(text: str, where: str = "") -> list[PipInstall]:
    """Each `pip install ...` in a shell text, up to the end of its command (`&&`, `||`, `;`, a newline, or a
    single quote that closes an argument the command sits in, as in `ray exec ... 'pip install ...'`)."""
    found = []
    for match in re.finditer(r"\bpip3? install\b", text):
        rest = re.split(r"&&|\|\||;|\n|'", text[match.end():])[0]
        words = shlex.split(rest)
        constraints, requirements, i = [], [], 0
        while i < len(words):
            word = words[i]
            if word in ("-c", "--constraint"):
                constraints.append(words[i + 1]); i += 2; continue
            if word.startswith("--constraint="):
                constraints.append(word.split("=", 1)[1]); i += 1; continue
            if word in ("-e", "--editable", "-r", "--requirement", "-t", "--target", "-i", "--index-url"):
                i += 2; continue  # the editable checkout's own dependencies fall under the constraints
            if not word.startswith("-") and not word.startswith(("/", ".")):
                requirements.append(word)
            i += 1
        found.append(PipInstall(where, words, constraints, requirements))
    return found


def _strings(node: Any) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for v in node.values() for s in _strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in _strings(v)]
    return []


def _cluster_pip_installs() -> list[PipInstall]:
    installs = []
    for path in [*LAUNCHER_CONFIGS, *MANIFESTS]:  # parsed: commented-out examples do not count
        for doc in yaml.safe_load_all(path.read_text()):
            for text in _strings(doc):
                installs += _pip_installs(text, path.name)
    readme = (CLUSTER / "README.md").read_text()
    for block in re.findall(r"```(?:bash|sh|dockerfile)\n(.*?)```", readme, re.S):
        code = "\n".join(line for line in block.replace("\\\n", " ").splitlines() if not line.lstrip().startswith("#"))
        installs += _pip_installs(code, "README.md")
    return installs


def test_every_pip_install_on_a_cluster_is_pinned():
    pinned = {_requirement_name(line.split("==")[0]) for line in CONSTRAINTS.read_text().splitlines()
              if "==" in line and not line.startswith("#")}
    assert "boto3" in pinned, "the AWS head installs boto3: pin it in constraints/ci.txt"
    installs = _cluster_pip_installs()
    where = {i.where for i in installs}
    assert {"aws.yaml", "gcp.yaml", "mlflow.yaml", "README.md"} <= where, f"pip installs found only in {where}"
    for install in installs:
        command = f"{install.where}: pip install {' '.join(install.words)}"
        assert any(c.endswith("constraints/ci.txt") for c in install.constraints), \
            f"{command}: install with -c .../constraints/ci.txt (the versions CI tested)"
        for requirement in install.requirements:
            assert "==" in requirement or _requirement_name(requirement) in pinned, \
                f"{command}: {requirement} is pinned neither here (==) nor in constraints/ci.txt"


SECRET_NAME = re.compile(r"PASSWORD|PASSWD|SECRET|TOKEN|CREDENTIAL|_KEY$|^PG(PASSWORD|PASSFILE)$", re.I)


def test_no_manifest_holds_a_literal_password():
    for where, template in _all_pod_templates():
        for container in _containers(template) + template["spec"].get("initContainers", []):
            for env in container.get("env", []) or []:
                if SECRET_NAME.search(env["name"]):
                    assert "value" not in env and env.get("valueFrom", {}).get("secretKeyRef"), \
                        f"{where} {container['name']}: {env['name']} must come from a Secret, not a value"
    for path in [p for p in CLUSTER.rglob("*") if p.is_file()]:
        text = path.read_text()
        # user:password@host in any URI (placeholders such as <db-user>@<host> carry no password)
        assert not re.search(r"://[^\s/:@'\"]+:[^\s/@'\"<]+@", text), f"{path.name}: a password inside a URI"
    for filename, doc in all_manifest_docs():
        if doc["kind"] == "ConfigMap":
            for key, value in doc.get("data", {}).items():
                assert not re.search(r"^\s*[\w.-]*(password|secret)[\w.-]*\s*[=:]\s*\S", value, re.M | re.I), \
                    f"{filename}: ConfigMap {doc['metadata']['name']}/{key} holds a secret; use a Secret"


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Kubernetes label-selector semantics (matchLabels, or a plain map, plus matchExpressions)."""
    match_labels = selector.get("matchLabels", {}) if ("matchLabels" in selector or "matchExpressions" in selector) \
        else selector
    if any(labels.get(k) != v for k, v in match_labels.items()):
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        ok = {"In": key in labels and labels[key] in values, "NotIn": labels.get(key) not in values,
              "Exists": key in labels, "DoesNotExist": key not in labels}[operator]
        if not ok:
            return False
    return True


def _pod_labels() -> dict[str, dict[str, str]]:
    """The labels each pod will carry: its template's, plus the ones KubeRay sets on Ray pods."""
    pods = {}
    for filename, doc in all_manifest_docs():
        for where, template in _pod_templates(filename, doc):
            labels = dict(template.get("metadata", {}).get("labels", {}))
            if doc["kind"] in ("RayCluster", "RayJob") and "submitter" not in where:
                labels.update({"ray.io/node-type": "head" if where.endswith("head") else "worker",
                               "ray.io/cluster": doc["metadata"]["name"]})
            pods[where] = labels
    return pods


def _ingress_sources(policy: dict[str, Any], port: int) -> list[dict[str, Any]]:
    name, spec = policy["metadata"]["name"], policy["spec"]
    assert "Ingress" in spec.get("policyTypes", []), f"{name}: policyTypes must include Ingress"
    sources = []
    for rule in spec.get("ingress", []):
        assert [p.get("port") for p in rule.get("ports", [])] == [port], f"{name}: admit port {port} only"
        assert rule.get("from"), f"{name}: a rule without `from` admits every pod and address"
        for peer in rule["from"]:
            assert set(peer) == {"podSelector"}, f"{name}: only pods of this namespace, got {peer}"
            assert peer["podSelector"], f"{name}: an empty podSelector admits every pod"
            sources.append(peer["podSelector"])
    assert sources, f"{name}: no ingress rule"
    return sources


def _policy_for(pod_where: str, pods: dict[str, dict[str, str]]) -> dict[str, Any]:
    policies = [doc for _, doc in all_manifest_docs() if doc["kind"] == "NetworkPolicy"
                and _selects(doc["spec"]["podSelector"], pods[pod_where])]
    assert len(policies) == 1, f"{pod_where}: expected one NetworkPolicy selecting it, found {len(policies)}"
    return policies[0]


def test_network_policies_fence_mlflow_and_postgres():
    pods = _pod_labels()
    [mlflow] = [w for w in pods if "Deployment mlflow" in w]
    [postgres] = [w for w in pods if "StatefulSet mlflow-postgres" in w]
    ray_pods = [w for w in pods if ("RayCluster" in w or "RayJob" in w) and "submitter" not in w]
    # Ray pods that log to MLflow: the long-lived cluster and the jobs whose entrypoint sets tracking.uri.
    logging = [w for w in ray_pods if "raycluster.yaml" in w or "rayjob-train" in w or "rayjob-tune" in w]
    assert logging

    sources = _ingress_sources(_policy_for(mlflow, pods), 5000)
    admitted = {w for w in pods if any(_selects(s, pods[w]) for s in sources)}
    assert set(logging) <= admitted, f"MLflow must admit the Ray pods that log to it: {set(logging) - admitted}"
    assert admitted <= set(ray_pods), f"MLflow admits pods that are not Ray pods: {admitted - set(ray_pods)}"

    sources = _ingress_sources(_policy_for(postgres, pods), 5432)
    admitted = {w for w in pods if any(_selects(s, pods[w]) for s in sources)}
    assert admitted == {mlflow}, f"PostgreSQL must admit the MLflow server only, admits {sorted(admitted)}"
