"""The cluster definitions in cluster/: Ray launcher configs validate against the schema that ships with
Ray and describe 8-GPU pools with a loopback dashboard; the KubeRay manifests carry the fields the
multi-node setup relies on; nothing exposes a port to the internet. Pure file checks: no Ray is started."""
from __future__ import annotations

import json
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
    assert {p.name for p in MANIFESTS} >= {"raycluster.yaml", "pvc-shared.yaml", "mlflow.yaml", *RAYJOBS}
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


def test_mlflow_server_manifest():
    docs = load_manifest(KUBERAY / "mlflow.yaml")
    kinds = {d["kind"]: d for d in docs}
    assert set(kinds) == {"Deployment", "Service"}, f"mlflow.yaml kinds: {sorted(kinds)}"
    container = kinds["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    command = " ".join(container.get("command", []) + container.get("args", []))
    assert "mlflow server" in command and "--port 5000" in command
    assert "--serve-artifacts" in command and "--artifacts-destination /shared/mlflow-artifacts" in command
    mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
    assert "/shared" in mounts, "the MLflow store lives on the shared volume"
    for env in container.get("env", []) or []:
        assert "value" not in env or "postgres" not in str(env["value"]).lower(), "database URIs come from a Secret"
    service = kinds["Service"]
    assert service["metadata"]["name"] == "mlflow"
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
    assert [p["port"] for p in service["spec"]["ports"]] == [5000]


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
