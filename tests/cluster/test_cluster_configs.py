"""Launcher configs and KubeRay manifests, checked offline against the installed ray.

The launcher's own schema (ray/autoscaler/ray-schema.json) and its config preparation and
validation (`prepare_config` + `validate_config`, private API of ray 2.60) are what `ray up` runs
first; KubeRay's autoscaler derives its config from a RayCluster spec with
`_derive_autoscaling_config_from_ray_cr` (private) and validates it the same way.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr
from ray.autoscaler._private.util import prepare_config, validate_config

from cluster.cloud import render

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "cluster" / "configs").glob("*.yaml"))
KUBERAY = REPO / "cluster" / "kuberay"
SCHEMA = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())


def _pinned_ray() -> str:
    match = re.search(r'"ray\[[a-z,]+\]==([0-9.]+)"', (REPO / "pyproject.toml").read_text())
    assert match, "pyproject.toml pins ray"
    return match.group(1)


def _docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((KUBERAY / name).read_text()) if d]


def _one(name: str, kind: str) -> dict:
    (doc,) = [d for d in _docs(name) if d["kind"] == kind]
    return doc


def test_both_clouds_have_a_config():
    assert {p.stem for p in CONFIGS} == {"aws-gpu", "gcp-gpu"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_launcher_config_matches_the_installed_schema(path):
    jsonschema.validate(yaml.safe_load(path.read_text()), SCHEMA)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_launcher_config_passes_the_launchers_preparation_and_validation(path):
    prepared = prepare_config(yaml.safe_load(path.read_text()))
    validate_config(prepared)
    assert prepared["head_node_type"] in prepared["available_node_types"]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_rendered_config_still_validates(path):
    env = {"MLFLOW_BACKEND_STORE_URI": "postgresql://bitlm:pw@db:5432/mlflow", "BITLM_IMAGE": "r/bitlm:x"}
    rendered = render(yaml.safe_load(path.read_text()), env, token="t0k")
    validate_config(prepare_config(copy.deepcopy(rendered)))
    first = rendered["setup_commands"][0]
    assert "MLFLOW_BACKEND_STORE_URI=postgresql://bitlm:pw@db:5432/mlflow" in first and "RAY_AUTH_TOKEN=t0k" in first
    assert rendered["docker"]["image"] == "r/bitlm:x"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_launcher_config_has_a_cpu_head_and_bounded_gpu_workers_with_a_spot_option(path):
    config = yaml.safe_load(path.read_text())
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert not head["resources"].get("GPU")
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    on_demand = [t for t in workers.values() if not _is_spot(t)]
    spot = [t for t in workers.values() if _is_spot(t)]
    assert on_demand and spot
    for node_type in workers.values():
        assert 0 <= node_type["min_workers"] <= node_type["max_workers"] <= config["max_workers"]
    assert any(t["max_workers"] > 0 for t in on_demand)
    if config["provider"]["type"] == "gcp":  # GCP detects nothing: GPUs are declared and attached
        for node_type in on_demand + spot:
            assert node_type["resources"]["GPU"] == 1
            assert node_type["node_config"]["guestAccelerators"][0]["acceleratorCount"] == 1
            assert {"onHostMaintenance": "TERMINATE"} in node_type["node_config"]["scheduling"]


def _is_spot(node_type: dict) -> bool:
    node_config = node_type["node_config"]
    return (node_config.get("InstanceMarketOptions", {}).get("MarketType") == "spot"
            or {"preemptible": True} in node_config.get("scheduling", []))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_launcher_config_runs_the_project_image_of_the_pinned_ray(path):
    config = yaml.safe_load(path.read_text())
    assert config["docker"]["image"].rsplit(":", 1)[1].startswith(f"{_pinned_ray()}-py311-cu")


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_head_set_up_starts_mlflow_with_one_worker_and_a_store_from_the_environment(path):
    config = yaml.safe_load(path.read_text())
    (mlflow,) = [c for c in config["head_setup_commands"] if "mlflow server" in c]
    assert "--workers 1" in mlflow
    assert '"${MLFLOW_BACKEND_STORE_URI:-sqlite:////' in mlflow
    assert "${MLFLOW_ARTIFACTS_DESTINATION:-" in mlflow
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    assert all("MLFLOW_TRACKING_URI=http://" in c for c in starts if "ray start" in c)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_checkpoints_go_to_shared_storage_mounted_on_every_node(path):
    config = yaml.safe_load(path.read_text())
    assert any("mount" in c and "/mnt/shared" in c for c in config["initialization_commands"])
    assert "-v /mnt/shared:/mnt/shared" in config["docker"]["run_options"]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_only_ssh_is_meant_to_be_reachable_from_outside(path):
    text = path.read_text()
    config = yaml.safe_load(text)
    assert "security_group" not in config["provider"] and "firewall" not in json.dumps(config["provider"])
    assert "ray dashboard" in text  # the documented way in


def test_raycluster_has_a_cpu_head_and_a_bounded_gpu_group():
    cr = _one("raycluster.yaml", "RayCluster")
    assert cr["apiVersion"] == "ray.io/v1" and cr["spec"]["rayVersion"] == _pinned_ray()
    head = cr["spec"]["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    assert "nvidia.com/gpu" not in json.dumps(head["template"]["spec"]["containers"][0]["resources"])
    groups = {g["groupName"]: g for g in cr["spec"]["workerGroupSpecs"]}
    gpu = groups["gpu"]
    assert {"groupName", "template", "minReplicas", "maxReplicas", "replicas", "rayStartParams"} <= set(gpu)
    assert 0 <= gpu["minReplicas"] <= gpu["replicas"] <= gpu["maxReplicas"] and gpu["maxReplicas"] > 0
    (container,) = gpu["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert cr["spec"]["enableInTreeAutoscaling"] is True


@pytest.mark.parametrize("name, kind, spec_key", [("raycluster.yaml", "RayCluster", None),
                                                  ("rayjob.yaml", "RayJob", "rayClusterSpec"),
                                                  ("rayservice.yaml", "RayService", "rayClusterConfig")])
def test_derived_autoscaling_config_validates(name, kind, spec_key):
    doc = _one(name, kind)
    spec = doc["spec"][spec_key] if spec_key else doc["spec"]
    autoscaling = _derive_autoscaling_config_from_ray_cr({"metadata": doc["metadata"], "spec": spec})
    validate_config(autoscaling)
    resources = {name: t["resources"] for name, t in autoscaling["available_node_types"].items()}
    assert any(r.get("GPU") == 1 for r in resources.values())


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml", "rayservice.yaml"])
def test_every_ray_container_runs_the_project_image_of_the_pinned_ray(name):
    images = re.findall(r"image: (\S+)", (KUBERAY / name).read_text())
    assert images and all(i.rsplit(":", 1)[1].startswith(f"{_pinned_ray()}-py311-cu") for i in images)


def test_rayjob_runs_the_training_pipeline_with_a_config_and_the_mlflow_uri():
    job = _one("rayjob.yaml", "RayJob")["spec"]
    assert job["entrypoint"].startswith("python -m pipelines.train --config ")
    config = job["entrypoint"].split("--config ")[1].split()[0]
    assert (REPO / config.removeprefix("/home/ray/bitlm/")).is_file()  # a file the image copies
    runtime_env = yaml.safe_load(job["runtimeEnvYAML"])
    assert runtime_env["env_vars"]["MLFLOW_TRACKING_URI"].startswith("http://")
    assert job["shutdownAfterJobFinishes"] is True and job["submissionMode"] == "K8sJobMode"
    assert isinstance(job["rayClusterSpec"]["headGroupSpec"]["rayStartParams"], dict)


def test_rayservice_serves_a_registered_model_through_the_serve_app():
    service = _one("rayservice.yaml", "RayService")["spec"]
    assert "rayClusterSpec" not in service
    serve_config = yaml.safe_load(service["serveConfigV2"])
    (app,) = serve_config["applications"]
    assert app["import_path"] == "serve.app:build_app"
    assert re.fullmatch(r"models:/[\w.-]+@[\w-]+", app["args"]["model"])
    from serve.schemas import AppArgs

    AppArgs.model_validate(app["args"])  # the args build_app will be given


def test_no_kubernetes_service_is_exposed_outside_the_cluster():
    for name in ("raycluster.yaml", "rayjob.yaml", "rayservice.yaml"):
        for doc in _docs(name):
            if doc["kind"] == "Service":
                assert doc["spec"].get("type", "ClusterIP") == "ClusterIP"
        assert "LoadBalancer" not in (KUBERAY / name).read_text() and "NodePort" not in (KUBERAY / name).read_text()
