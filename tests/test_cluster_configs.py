"""serve_config.yaml and cluster/: each file validates against its schema, targets the app's real
deployments, and carries what a Ray user needs to apply it as it is.

Schemas, all offline:
- Serve configs: Ray Serve's ServeDeploySchema (what `serve deploy` and KubeRay's submission check).
- cluster/ray-cluster.yaml: Ray's own launcher checks (`prepare_config` + `validate_config`, i.e. the
  ray-schema.json shipped in the wheel), and each node_config against EC2 RunInstances' input shape
  from botocore's service model (what Ray's AWS provider passes node_config to).
- cluster/rayservice.yaml: tests/schemas/rayservice.schema.yaml (hand-written from KubeRay's CRD, see
  its header) for the RayService's own fields, plus Kubernetes' core/v1 schemas (kubernetes-validate,
  strict) for the pod templates, the Serve Service and the other documents of the file.
Each schema check has negative cases, so that a check that cannot fail does not pass unnoticed.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml

from deployments.app import APP_IMPORT_PATH, DEPLOYMENT_NAMES, AppArgs

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
SERVE_CONFIGS = [ROOT / "serve_config.yaml", CLUSTER / "serve_config.gpu.yaml"]
RAYSERVICE = CLUSTER / "rayservice.yaml"
LAUNCHER = CLUSTER / "ray-cluster.yaml"
RAYSERVICE_SCHEMA = Path(__file__).resolve().parent / "schemas" / "rayservice.schema.yaml"
K8S_VERSION = "1.33"  # Kubernetes API the manifests are checked against (kubernetes-validate ships 1.25+)
SERVE_FLAGS = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}  # every node's env, before `ray start`
TRAINER_RESOURCE = "rerank_trainer"  # custom resource only the CPU worker nodes advertise
DASHBOARD_PORT, SERVE_PORT = 8265, 8000


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


# --- Serve configs ---------------------------------------------------------------------------


def rayservice_docs() -> list[dict]:
    return [d for d in yaml.safe_load_all(RAYSERVICE.read_text()) if d]


def the_rayservice(docs: list[dict] | None = None) -> dict:
    services = [d for d in (docs or rayservice_docs()) if d["kind"] == "RayService"]
    assert len(services) == 1, "cluster/rayservice.yaml must hold exactly one RayService"
    return services[0]


def rayservice_serve_config() -> dict:
    return yaml.safe_load(the_rayservice()["spec"]["serveConfigV2"])


def rerank_app(config: dict) -> dict:
    apps = [a for a in config["applications"] if a["import_path"] == APP_IMPORT_PATH]
    assert len(apps) == 1, f"expected one application importing {APP_IMPORT_PATH}"
    return apps[0]


def all_serve_configs() -> list[tuple[str, dict]]:
    return [(p.name, load(p)) for p in SERVE_CONFIGS] + [("rayservice.yaml", rayservice_serve_config())]


def deployments_in_app(args: AppArgs) -> set[str]:
    """The Serve deployments build_app creates for these args (Serve refuses overrides of others)."""
    roles = {"ingress", "scorer"} | ({"features", "ranker"} if args.layout == "split" else set())
    if args.online.enabled:
        roles.add("trainer")
    if args.sink.enabled:
        roles.add("sink")
    return {DEPLOYMENT_NAMES[r] for r in roles}


@pytest.mark.parametrize(("name", "config"), all_serve_configs(), ids=lambda v: v if isinstance(v, str) else "")
def test_serve_configs_target_the_app_and_its_deployments(name, config):
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(config)  # what `serve deploy` checks
    app = rerank_app(config)
    module, attr = app["import_path"].split(":")
    imported = __import__(module, fromlist=[attr])
    assert callable(getattr(imported, attr))
    args = AppArgs.model_validate(app["args"])  # the args are what the builder accepts
    names = {d["name"] for d in app.get("deployments", [])}
    assert names <= deployments_in_app(args), (
        f"{name}: overrides for deployments the app (layout {args.layout}) does not have: "
        f"{names - deployments_in_app(args)}"
    )
    assert DEPLOYMENT_NAMES["scorer"] in names


@pytest.mark.parametrize(("name", "config"), all_serve_configs(), ids=lambda v: v if isinstance(v, str) else "")
def test_serve_flags_are_not_in_a_runtime_env(name, config):
    """Serve's flags are read by the controller and proxies too: node env, not runtime_env."""
    for app in config["applications"]:
        envs = [app.get("runtime_env") or {}] + [
            (d.get("ray_actor_options") or {}).get("runtime_env") or {} for d in app.get("deployments", [])
        ]
        for env in envs:
            flags = [k for k in env.get("env_vars", {}) if k.startswith("RAY_SERVE_")]
            assert not flags, f"{name}: {flags} in a runtime_env; set them in every node's env before ray start"


def test_local_config_is_cpu_only():
    app = rerank_app(load(ROOT / "serve_config.yaml"))
    assert app["args"]["scorer_num_gpus"] == 0
    for d in app["deployments"]:
        assert d.get("ray_actor_options", {}).get("num_gpus", 0) == 0
        assert d.get("ray_actor_options", {}).get("num_cpus", 1) <= 0.5  # fits 2 cores


@pytest.mark.parametrize("config", [load(SERVE_CONFIGS[1]), rayservice_serve_config()], ids=["gpu", "rayservice"])
def test_gpu_overrides_put_the_scorer_on_gpus_with_autoscaling(config):
    app = rerank_app(config)
    scorer = next(d for d in app["deployments"] if d["name"] == DEPLOYMENT_NAMES["scorer"])
    assert scorer["ray_actor_options"]["num_gpus"] >= 1 and app["args"]["scorer_num_gpus"] >= 1
    bounds = scorer["autoscaling_config"]
    assert 1 <= bounds["min_replicas"] < bounds["max_replicas"]


@pytest.mark.parametrize("config", [load(SERVE_CONFIGS[1]), rayservice_serve_config()], ids=["gpu", "rayservice"])
def test_gpu_config_is_inline_and_runs_one_trainer_on_the_cpu_group(config):
    app = rerank_app(config)
    args = AppArgs.model_validate(app["args"])
    assert args.layout == "inline" and args.online.enabled
    assert args.registry_uri and args.registry_uri.startswith("s3://")  # shared by every node
    assert app["args"]["redis_url"] == "env"  # REDIS_URL from each node's env
    trainer = next(d for d in app["deployments"] if d["name"] == DEPLOYMENT_NAMES["trainer"])
    assert trainer["num_replicas"] == 1 and "autoscaling_config" not in trainer
    options = trainer["ray_actor_options"]
    assert options["num_cpus"] >= 1 and options.get("num_gpus", 0) == 0
    assert options["resources"] == {TRAINER_RESOURCE: 1}
    # ... and only the CPU worker groups advertise that resource
    launcher_types = load(LAUNCHER)["available_node_types"]
    assert launcher_types["cpu_workers"]["resources"].get(TRAINER_RESOURCE, 0) >= 1
    assert TRAINER_RESOURCE not in launcher_types["gpu_workers"]["resources"]
    groups = worker_groups(the_rayservice())
    assert float(groups["cpu-workers"].get("resources", {}).get(TRAINER_RESOURCE, 0)) >= 1
    assert TRAINER_RESOURCE not in groups["gpu-workers"].get("resources", {})


def test_gpu_serve_config_and_rayservice_agree():
    assert load(SERVE_CONFIGS[1]) == rayservice_serve_config()


# --- RayService: schema ----------------------------------------------------------------------


def worker_groups(rayservice: dict) -> dict[str, dict]:
    return {g["groupName"]: g for g in rayservice["spec"]["rayClusterConfig"].get("workerGroupSpecs", [])}


def pod_templates(rayservice: dict) -> dict[str, dict]:
    cluster = rayservice["spec"]["rayClusterConfig"]
    templates = {"head": cluster["headGroupSpec"]["template"]}
    templates.update({name: g["template"] for name, g in worker_groups(rayservice).items()})
    return templates


def k8s_errors(resource: dict) -> list[str]:
    import kubernetes_validate

    try:
        kubernetes_validate.validate(resource, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as err:
        return [f"{resource['kind']} {'.'.join(map(str, err.path))}: {err.message}"]
    return []


def rayservice_errors(manifest: dict) -> list[str]:
    """Everything wrong with a RayService manifest: its schema, the embedded k8s objects, operator rules."""
    import jsonschema

    schema = load(RAYSERVICE_SCHEMA)
    validator = jsonschema.Draft202012Validator(schema)
    errors = [f"{'.'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(manifest)]
    if errors:
        return errors
    spec = manifest["spec"]
    cluster = spec["rayClusterConfig"]
    for name, template in pod_templates(manifest).items():
        pod_template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name}, "template": template}
        errors += k8s_errors(pod_template)
    services = [spec.get("serveService"), cluster["headGroupSpec"].get("headService")]
    for service in filter(None, services):
        service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "svc"}, **service}
        errors += k8s_errors(service)
    # two of the operator's own checks (KubeRay refuses the RayService otherwise)
    groups = [("head", cluster["headGroupSpec"])] + list(worker_groups(manifest).items())
    for name, group in groups:
        start = group.get("rayStartParams", {})
        if group.get("resources") and any(start.get(k) for k in ("num-cpus", "num-gpus", "memory", "resources")):
            errors.append(f"{name}: resources set in both rayStartParams and resources")
        if name != "head" and group["minReplicas"] > group["maxReplicas"]:
            errors.append(f"{name}: minReplicas > maxReplicas")
    return errors


def test_rayservice_validates_against_the_crd_schema_and_kubernetes():
    assert rayservice_errors(the_rayservice()) == []


def test_other_documents_of_the_rayservice_file_validate_against_kubernetes():
    docs = rayservice_docs()
    assert {d["kind"] for d in docs} == {"ServiceAccount", "RayService", "NetworkPolicy"}
    for doc in docs:
        if doc["kind"] != "RayService":
            assert k8s_errors(doc) == []


def _set(path: str, value):
    """A mutation setting `path` (dots; [n] for list items) of a manifest to `value`."""

    def mutate(manifest: dict) -> None:
        keys = [int(k) if k.isdigit() else k for k in re.split(r"\.|\[(\d+)\]\.?", path) if k]
        node = manifest
        for key in keys[:-1]:
            node = node[key]
        node[keys[-1]] = value

    return mutate


def _drop(path: str):
    def mutate(manifest: dict) -> None:
        *head, last = path.split(".")
        node = manifest
        for key in head:
            node = node[key]
        del node[last]

    return mutate


WORKER0 = "spec.rayClusterConfig.workerGroupSpecs[0]"


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (_set("spec.serviceUnhealthySecondThreshold", 900), "serviceUnhealthySecondThreshold"),
        (_set("spec.deploymentUnhealthySecondThreshold", 300), "deploymentUnhealthySecondThreshold"),
        (_set("apiVersion", "ray.io/v1alpha1"), "ray.io/v1"),
        (_set(f"{WORKER0}.minReplica", 1), "minReplica"),
        (_set("spec.rayClusterConfig.headGroupSpec.rayStartParams.num-cpus", 0), "is not of type 'string'"),
        (_set("spec.rayClusterConfig.autoscalerOptions.upscalingMode", "Fast"), "Fast"),
        (_drop("spec.rayClusterConfig.headGroupSpec.template"), "template"),
        (_set(f"{WORKER0}.template.metadata.generateName", "x"), "generateName"),
        (_set(f"{WORKER0}.template.spec.tolerationz", []), "tolerationz"),  # core/v1 PodSpec
        (_set(f"{WORKER0}.template.spec.containers[0].resources.limit", {}), "limit"),
        (_set("spec.serveService.spec.portz", []), "portz"),  # core/v1 Service
        (_set(f"{WORKER0}.rayStartParams", {"num-cpus": "8"}), "both rayStartParams and resources"),
        (_set(f"{WORKER0}.minReplicas", 20), "minReplicas > maxReplicas"),
    ],
    ids=lambda v: "" if callable(v) else v,
)
def test_rayservice_check_rejects_bad_manifests(mutate, message):
    manifest = copy.deepcopy(the_rayservice())
    mutate(manifest)
    errors = rayservice_errors(manifest)
    assert errors and message in "\n".join(errors), errors


# --- RayService: what it deploys ---------------------------------------------------------------


def test_rayservice_pods_have_the_serve_flags_redis_and_registry_credentials():
    docs = rayservice_docs()
    accounts = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ServiceAccount"}
    for name, template in pod_templates(the_rayservice(docs)).items():
        spec = template["spec"]
        account = accounts.get(spec.get("serviceAccountName"))
        assert account is not None, f"{name}: no serviceAccountName of a ServiceAccount in the file"
        assert account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")
        ray_container = spec["containers"][0]  # KubeRay runs Ray in the first container
        env = {e["name"]: e for e in ray_container.get("env", [])}
        for flag, value in SERVE_FLAGS.items():
            assert env.get(flag, {}).get("value") == value, f"{name}: {flag}={value} missing from the pod env"
        assert "secretKeyRef" in env["REDIS_URL"]["valueFrom"], f"{name}: REDIS_URL should come from a Secret"


def test_rayservice_has_cpu_and_gpu_groups_and_autoscaling():
    rayservice = the_rayservice()
    assert rayservice["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] is True
    groups = worker_groups(rayservice)
    gpu = groups["gpu-workers"]["template"]["spec"]
    assert gpu["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert gpu["nodeSelector"], "GPU pods need a nodeSelector for GPU nodes"
    assert any(t["key"] == "nvidia.com/gpu" and t.get("effect") == "NoSchedule" for t in gpu["tolerations"])
    cpu = groups["cpu-workers"]["template"]["spec"]
    assert "nvidia.com/gpu" not in cpu["containers"][0]["resources"]["limits"]
    assert "nvidia.com/gpu" not in str(cpu.get("tolerations", []))
    for group in groups.values():
        assert group["minReplicas"] < group["maxReplicas"]


def dashboard_open_to(rule: dict) -> bool:
    ports = rule.get("ports")
    return ports is None or any(p.get("port") in (DASHBOARD_PORT, "dashboard") for p in ports)


def test_rayservice_exposes_serve_and_not_the_dashboard():
    docs = rayservice_docs()
    rayservice = the_rayservice(docs)
    head = rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP", "the head Service carries the dashboard"
    assert head.get("headService", {}).get("spec", {}).get("type", "ClusterIP") == "ClusterIP"
    assert not head.get("enableIngress"), "enableIngress exposes the dashboard"
    serve_ports = rayservice["spec"]["serveService"]["spec"]["ports"]
    assert [p["port"] for p in serve_ports] == [SERVE_PORT]
    assert {d["kind"] for d in docs}.isdisjoint({"Ingress", "Service", "Route", "HTTPRoute"})
    # The NetworkPolicy of the head pods: the dashboard only to the operator and the Ray pods.
    (policy,) = [d for d in docs if d["kind"] == "NetworkPolicy"]
    selected = policy["spec"]["podSelector"]["matchLabels"]
    head_labels = {**head["template"]["metadata"]["labels"], "ray.io/node-type": "head"}
    assert selected.items() <= head_labels.items() and selected.get("ray.io/node-type") == "head"
    assert "Ingress" in policy["spec"]["policyTypes"]
    own_pods = rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["metadata"]["labels"]
    allowed = [own_pods, {"app.kubernetes.io/name": "kuberay-operator"}]
    for rule in policy["spec"]["ingress"]:
        if dashboard_open_to(rule):
            assert rule.get("from"), "a rule opens the dashboard to every source"
            for peer in rule["from"]:
                assert "ipBlock" not in peer and peer["podSelector"]["matchLabels"] in allowed, peer
    serve_rules = [r for r in policy["spec"]["ingress"] if any(p.get("port") == SERVE_PORT for p in r.get("ports", []))]
    assert serve_rules, "Serve's port must stay reachable"


# --- Cluster launcher ----------------------------------------------------------------------------


def launcher_errors(config: dict) -> list[str]:
    """Ray's own checks of a launcher config (`ray up` runs them first), offline."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    try:
        validate_config(prepare_config(copy.deepcopy(config)))
    except (jsonschema.ValidationError, ValueError) as err:
        return [getattr(err, "message", str(err))]
    return []


def node_config_errors(node_config: dict) -> list[str]:
    """A node_config against EC2 RunInstances' input (Ray's AWS provider passes it through)."""
    import botocore.session
    from botocore.validate import ParamValidator

    model = botocore.session.get_session().get_service_model("ec2")
    params = {k: v for k, v in node_config.items() if k not in ("SubnetIds",)}  # Ray maps SubnetIds itself
    run_instances = model.operation_model("RunInstances").input_shape
    report = ParamValidator().validate({"MinCount": 1, "MaxCount": 1, **params}, run_instances)
    errors = [report.generate_report()] if report.has_errors() else []
    if node_config.get("InstanceType") not in model.shape_for("InstanceType").enum:
        errors.append(f"unknown InstanceType {node_config.get('InstanceType')}")
    return errors


def test_launcher_config_validates_with_ray():
    assert launcher_errors(load(LAUNCHER)) == []


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("head_start_ray_command", ["ray start --head"], "head_start_ray_command"),
        ("available_node_types.cpu_workers.min_worker", 1, "min_worker"),
        ("available_node_types.gpu_workers.resources.GPU", "1", "is not of type 'integer'"),
        ("docker.imagee", "rayproject/ray", "imagee"),
        ("head_node_type", "heads", "head_node_type"),
    ],
)
def test_launcher_check_rejects_bad_configs(path, value, message):
    config = load(LAUNCHER)
    _set(path, value)(config)
    errors = launcher_errors(config)
    assert errors and message in "\n".join(errors), errors


def test_launcher_node_configs_are_ec2_parameters_with_an_instance_profile():
    for name, node_type in load(LAUNCHER)["available_node_types"].items():
        node_config = node_type["node_config"]
        assert node_config_errors(node_config) == [], name
        # every node reads (workers) or writes (trainer, app builder) the s3:// registry
        assert node_config["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::"), name


@pytest.mark.parametrize(
    ("node_config", "message"),
    [
        ({"InstanceType": "c6i.4xlarge", "IamInstanceProfile": {"Arm": "arn:aws:iam::1:instance-profile/x"}}, "Arm"),
        ({"InstanceTyp": "c6i.4xlarge"}, "InstanceTyp"),
        ({"InstanceType": "g5.2xlarg"}, "g5.2xlarg"),
    ],
)
def test_node_config_check_rejects_bad_ec2_parameters(node_config, message):
    errors = node_config_errors(node_config)
    assert errors and message in "\n".join(errors), errors


def exported_before_ray_start(command: str) -> dict[str, str]:
    """Variables `export`ed in a start command before its `ray start` (each command is its own shell)."""
    before = command.split("ray start", 1)[0] if "ray start" in command else ""
    found: dict[str, str] = {}
    for statement in re.split(r"[;&|\n]+", before):
        words = statement.split()
        if words[:1] == ["export"]:
            found.update(w.split("=", 1) for w in words[1:] if "=" in w)
    return found


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ("export A=1 B=x; ulimit -n 65536; ray start --head", {"A": "1", "B": "x"}),
        ("ray start --head; export A=1", {}),
        ("echo 'export A=1' >> ~/.bashrc", {}),
    ],
)
def test_exported_before_ray_start_reads_commands(command, expected):
    assert exported_before_ray_start(command) == expected


@pytest.mark.parametrize("key", ["head_start_ray_commands", "worker_start_ray_commands"])
def test_launcher_nodes_export_serve_flags_and_redis_before_ray_start(key):
    commands = [c for c in load(LAUNCHER)[key] if "ray start" in c]
    assert len(commands) == 1
    exported = exported_before_ray_start(commands[0])
    assert SERVE_FLAGS.items() <= exported.items(), f"{key}: {SERVE_FLAGS} not exported before ray start"
    assert exported.get("REDIS_URL", "").startswith("redis"), f"{key}: REDIS_URL not exported before ray start"


def test_launcher_dashboard_is_not_bound_publicly():
    (start,) = [c for c in load(LAUNCHER)["head_start_ray_commands"] if "ray start" in c]
    host = re.search(r"--dashboard-host[= ](\S+)", start)
    assert host is None or host.group(1) in ("127.0.0.1", "localhost"), "reach the dashboard via `ray dashboard`"


def test_cluster_launcher_has_cpu_and_gpu_node_types():
    config = load(LAUNCHER)
    types = config["available_node_types"]
    assert types["gpu_workers"]["resources"]["GPU"] >= 1
    assert "GPU" not in types["cpu_workers"]["resources"]
    assert config["head_node_type"] in types
    assert all(t["min_workers"] <= t["max_workers"] for t in types.values())


# --- AppArgs ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"redis_url": "embedded"}, "give `model`"),
        ({"model": "m", "online": {"enabled": False}, "ingress_max_batch_size": 64, "scorer_max_batch_size": 32},
         "scorer_max_batch_size"),
        ({"model": "m"}, "registry_uri"),  # the online trainer (on by default) publishes to a registry
        ({"model": "m", "registry_uri": "r", "layout": "splitt"}, "layout"),
        ({"model": "m", "max_candidate": 10}, "max_candidate"),
        ({"model": "m", "scorer_num_gpus": -1}, "scorer_num_gpus"),
        ({"model": "m", "online": {"enabled": False}, "experiments": {"a": {"traffic": 0.6, "arms": {"x": {}}},
                                                                        "b": {"traffic": 0.6, "arms": {"y": {}}}}},
         "traffic"),
        ({"model": "m", "online": {"enabled": False}, "experiments": {"t": {"type": "interleave", "arms": {"x": {}}}}},
         "exactly two arms"),
        ({"model": "m", "registry_uri": "r", "layout": "split",
          "experiments": {"t": {"arms": {"x": {"model": "/m2"}, "y": {}}}}}, "layout split"),
    ],
)
def test_app_args_refuse_bad_config_naming_it(args, message):
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as info:
        AppArgs.model_validate(args)
    assert message in str(info.value)
