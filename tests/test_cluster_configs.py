"""serve_config.yaml and cluster/ parse, point at the app's import path and name real deployments."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from deployments.app import APP_IMPORT_PATH, DEPLOYMENT_NAMES, AppArgs

ROOT = Path(__file__).resolve().parents[1]
SERVE_CONFIGS = [ROOT / "serve_config.yaml", ROOT / "cluster" / "serve_config.gpu.yaml"]


def rayservice_serve_config() -> dict:
    manifest = yaml.safe_load((ROOT / "cluster" / "rayservice.yaml").read_text())
    assert manifest["kind"] == "RayService"
    return yaml.safe_load(manifest["spec"]["serveConfigV2"])


def rerank_app(config: dict) -> dict:
    apps = [a for a in config["applications"] if a["import_path"] == APP_IMPORT_PATH]
    assert len(apps) == 1, f"expected one application importing {APP_IMPORT_PATH}"
    return apps[0]


def all_serve_configs() -> list[tuple[str, dict]]:
    return [(p.name, yaml.safe_load(p.read_text())) for p in SERVE_CONFIGS] + [
        ("rayservice.yaml", rayservice_serve_config())
    ]


@pytest.mark.parametrize(("name", "config"), all_serve_configs(), ids=lambda v: v if isinstance(v, str) else "")
def test_serve_configs_target_the_app_and_its_deployments(name, config):
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(config)  # what `serve deploy` checks
    app = rerank_app(config)
    module, attr = app["import_path"].split(":")
    imported = __import__(module, fromlist=[attr])
    assert callable(getattr(imported, attr))
    AppArgs.model_validate(app["args"])  # the args are what the builder accepts
    names = {d["name"] for d in app.get("deployments", [])}
    assert names <= set(DEPLOYMENT_NAMES.values()), f"{name}: unknown deployments {names - set(DEPLOYMENT_NAMES.values())}"
    assert DEPLOYMENT_NAMES["scorer"] in names


def test_local_config_is_cpu_only():
    app = rerank_app(yaml.safe_load((ROOT / "serve_config.yaml").read_text()))
    assert app["args"]["scorer_num_gpus"] == 0
    for d in app["deployments"]:
        assert d.get("ray_actor_options", {}).get("num_gpus", 0) == 0
        assert d.get("ray_actor_options", {}).get("num_cpus", 1) <= 0.5  # fits 2 cores


@pytest.mark.parametrize("config", [yaml.safe_load(SERVE_CONFIGS[1].read_text()), rayservice_serve_config()])
def test_gpu_overrides_put_the_scorer_on_gpus_with_autoscaling(config):
    app = rerank_app(config)
    scorer = next(d for d in app["deployments"] if d["name"] == DEPLOYMENT_NAMES["scorer"])
    assert scorer["ray_actor_options"]["num_gpus"] >= 1 and app["args"]["scorer_num_gpus"] >= 1
    bounds = scorer["autoscaling_config"]
    assert 1 <= bounds["min_replicas"] < bounds["max_replicas"]


def test_gpu_serve_config_and_rayservice_agree():
    assert rerank_app(yaml.safe_load(SERVE_CONFIGS[1].read_text())) == rerank_app(rayservice_serve_config())


def test_rayservice_has_cpu_and_gpu_groups_and_autoscaling():
    spec = yaml.safe_load((ROOT / "cluster" / "rayservice.yaml").read_text())["spec"]["rayClusterConfig"]
    assert spec["enableInTreeAutoscaling"] is True
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    gpu = groups["gpu-workers"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert gpu["nvidia.com/gpu"] == "1"
    assert "nvidia.com/gpu" not in groups["cpu-workers"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    for group in groups.values():
        assert group["minReplicas"] < group["maxReplicas"]


def test_cluster_launcher_has_cpu_and_gpu_node_types():
    config = yaml.safe_load((ROOT / "cluster" / "ray-cluster.yaml").read_text())
    types = config["available_node_types"]
    assert types["gpu_workers"]["resources"]["GPU"] >= 1
    assert "GPU" not in types["cpu_workers"]["resources"]
    assert config["head_node_type"] in types
    assert all(t["min_workers"] <= t["max_workers"] for t in types.values())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"redis_url": "embedded"}, "give `model`"),
        ({"model": "m", "ingress_max_batch_size": 64, "scorer_max_batch_size": 32}, "scorer_max_batch_size"),
        ({"model": "m", "max_candidate": 10}, "max_candidate"),
        ({"model": "m", "scorer_num_gpus": -1}, "scorer_num_gpus"),
        ({"model": "m", "variants": {}}, "variants"),
    ],
)
def test_app_args_refuse_bad_config_naming_it(args, message):
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as info:
        AppArgs.model_validate(args)
    assert message in str(info.value)
