"""The Serve configs and KubeRay manifests we ship are valid, and say what their comments say.

Serve's own schema validates each Serve config; every import_path is a builder of
`deployments.app`; and the per-deployment options of the RayService reach the
scoring application's bound deployments by name, as the controller applies them
(Ray's `override_deployment_info`), placing the steps on the worker pods.
"""

from __future__ import annotations

import importlib
import inspect
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import ray
import yaml
from pydantic import ValidationError
from ray.serve.schema import ServeApplicationSchema, ServeDeploySchema

import deployments.app as app_module

REPO = Path(__file__).resolve().parents[2]
KUBERAY = REPO / "deploy" / "kuberay"
STEPS = {"FeatureStep", "ModelStep", "ShapStep", "ScoringIngress"}
ARGS_MODELS = {"build_app": app_module.AppArgs, "build_ingest_app": app_module.IngestArgs,
               "build_ui_app": app_module.UIArgs}
SECRETS = {"DATABASE_URL", "FRAUD_API_KEY", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"}


def _documents(name: str) -> dict[str, dict]:
    """The manifests of a file, by kind."""
    return {doc["kind"]: doc for doc in yaml.safe_load_all((KUBERAY / name).read_text()) if doc}


def _serve_configs() -> dict[str, ServeDeploySchema]:
    service = _documents("rayservice.yaml")["RayService"]
    return {
        "serve_config.yaml": ServeDeploySchema.model_validate(
            yaml.safe_load((REPO / "serve_config.yaml").read_text())),
        "rayservice.yaml": ServeDeploySchema.model_validate(yaml.safe_load(service["spec"]["serveConfigV2"])),
    }


def _ray_resources(group: dict) -> dict[str, float]:
    """The custom resources a KubeRay group advertises (`rayStartParams.resources`, quoted JSON)."""
    raw = group.get("rayStartParams", {}).get("resources")
    return json.loads(json.loads(raw)) if raw else {}


def _containers(kind: str, spec: dict) -> list[dict]:
    cluster = spec["rayClusterConfig"] if kind == "RayService" else spec["rayClusterSpec"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


@pytest.mark.parametrize("name", ["serve_config.yaml", "rayservice.yaml"])
def test_each_serve_config_is_valid_and_names_builders_of_deployments_app(name):
    config = _serve_configs()[name]
    assert {app.name for app in config.applications} == {"fraud-scoring", "ingestion", "ui"}
    for app in config.applications:
        module, _, attr = app.import_path.partition(":")
        assert module == "deployments.app", app.import_path
        builder = getattr(importlib.import_module(module), attr)
        assert inspect.isfunction(builder) and attr.startswith("build_"), app.import_path
        assert {d.name for d in app.deployments} <= STEPS  # Serve refuses an unknown name
        # The builder's typed arguments accept the file's `args` (extra="forbid" catches drift).
        ARGS_MODELS[attr].model_validate(app.args)


def test_the_rayservice_runs_the_applications_of_serve_config_yaml():
    configs = _serve_configs()
    local, cluster = ({a.name: a.import_path for a in c.applications} for c in configs.values())
    assert local == cluster
    scoring = next(a for a in configs["rayservice.yaml"].applications if a.name == "fraud-scoring")
    # A real database gets no sample model or history.
    assert scoring.args["bootstrap"] is False and scoring.args["warm_state"] is False
    # Secrets never travel in a runtime_env: Ray's runtime-env agent logs it whole.
    for app in configs["rayservice.yaml"].applications:
        assert not set((app.runtime_env or {}).get("env_vars", {})) & SECRETS


@pytest.fixture
def bound_scoring_app(monkeypatch):
    """The scoring application's deployments as Serve's build task makes them, without Ray."""
    from ray.serve._private.build_app import build_app as serve_build_app
    from ray.serve._private.deploy_utils import deploy_args_to_deployment_info

    import deployments.bootstrap
    from deployments.app import build_app

    # prepare() starts servers and trains a bootstrap model: nothing here needs them.
    monkeypatch.setattr(deployments.bootstrap, "prepare", lambda settings, args: None)
    ray_was_up = ray.is_initialized()  # (a whole test session may have started Ray before)
    built = serve_build_app(build_app({}), name="fraud-scoring")
    infos = {d.name: deploy_args_to_deployment_info(
        deployment_name=d.name, deployment_config_proto_bytes=d._deployment_config.to_proto_bytes(),
        replica_config_proto_bytes=d._replica_config.to_proto_bytes(), deployer_job_id="01000000",
        app_name="fraud-scoring") for d in built.deployments}
    assert ray.is_initialized() == ray_was_up  # building the application starts no Ray
    return built, infos


def test_the_builder_binds_the_four_steps_and_leaves_their_scale_to_the_config(bound_scoring_app):
    built, infos = bound_scoring_app
    assert set(infos) == STEPS and built.ingress_deployment_name == "ScoringIngress"
    for name, info in infos.items():
        chosen_in_code = info.deployment_config.user_configured_option_names
        assert not chosen_in_code & {"num_replicas", "autoscaling_config"}, (name, chosen_in_code)


def test_the_rayservice_places_the_steps_on_cpu_workers_and_scales_shap_on_its_own(bound_scoring_app):
    from ray.serve._private.application_state import override_deployment_info

    _, infos = bound_scoring_app
    service = _documents("rayservice.yaml")["RayService"]
    config = ServeDeploySchema.model_validate(yaml.safe_load(service["spec"]["serveConfigV2"]))
    scoring: ServeApplicationSchema = next(a for a in config.applications if a.name == "fraud-scoring")
    final = override_deployment_info(infos, scoring)  # what the controller deploys

    def resources(name: str) -> dict[str, float]:
        return final[name].replica_config.resource_dict

    for step in ("FeatureStep", "ModelStep", "ShapStep"):
        assert resources(step).get("worker", 0) > 0, (step, resources(step))
        assert not resources(step).get("GPU"), step
    assert resources("ScoringIngress").get("head", 0) > 0  # its spool is on the head's volume
    shap = final["ShapStep"].deployment_config.autoscaling_config
    assert (shap.min_replicas, shap.max_replicas) == (1, 8) and shap.target_ongoing_requests == 2
    assert final["FeatureStep"].deployment_config.num_replicas == 2
    # ray_actor_options replaces the code's: each one repeats num_cpus rather than take 1 CPU.
    for deployment in scoring.deployments:
        if "ray_actor_options" in deployment.model_fields_set:
            assert "num_cpus" in deployment.ray_actor_options.model_fields_set, deployment.name
    # user_config set in the file still reaches reconfigure().
    assert final["ScoringIngress"].deployment_config.user_config["max_batch_size"] == 64

    # Every custom resource asked for is offered by a group; the worker group has no GPU.
    cluster = service["spec"]["rayClusterConfig"]
    head, workers = cluster["headGroupSpec"], cluster["workerGroupSpecs"]
    assert len(workers) == 1
    offered = _ray_resources(head) | _ray_resources(workers[0])
    for name in STEPS:
        custom = {k for k in resources(name) if k not in ("CPU", "GPU", "memory")}
        assert custom <= set(offered), (name, custom, offered)
    assert "worker" in _ray_resources(workers[0]) and "worker" not in _ray_resources(head)
    worker_pod = workers[0]["template"]["spec"]["containers"][0]
    assert not any("gpu" in k for k in worker_pod["resources"]["limits"])
    assert "num-gpus" not in workers[0]["rayStartParams"]


@pytest.mark.parametrize("name", ["rayservice.yaml", "rayjob-train.yaml"])
def test_every_pod_takes_its_settings_from_the_same_configmap_and_secret(name):
    docs = _documents(name)
    kind = "RayService" if name == "rayservice.yaml" else "RayJob"
    containers = _containers(kind, docs[kind]["spec"])
    assert len(containers) >= 2
    for container in containers:
        sources = {(k, v["name"]) for ref in container["envFrom"] for k, v in ref.items()}
        assert sources == {("configMapRef", "fraud-scoring-config"), ("secretRef", "fraud-scoring-secrets")}
        # A secret never sits in plain `env:` of a pod.
        assert not {e["name"] for e in container.get("env", [])} & SECRETS
    settings = _documents("rayservice.yaml")["ConfigMap"]["data"]
    assert settings["FRAUD_MODEL_STORE"].startswith("s3://")
    assert settings["KAFKA_BOOTSTRAP_SERVERS"] and settings["FRAUD_DATA_DIR"].startswith("/")
    assert not set(settings) & SECRETS


def test_the_head_keeps_its_data_directory_on_a_volume_claim():
    docs = _documents("rayservice.yaml")
    head = docs["RayService"]["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    data_dir = docs["ConfigMap"]["data"]["FRAUD_DATA_DIR"]
    mount = next(m for m in head["containers"][0]["volumeMounts"] if m["mountPath"] == data_dir)
    volume = next(v for v in head["volumes"] if v["name"] == mount["name"])
    assert volume["persistentVolumeClaim"]["claimName"] == docs["PersistentVolumeClaim"]["metadata"]["name"]


def test_the_manifests_and_the_image_name_the_ray_version_the_code_runs_on():
    base = re.search(r"^FROM rayproject/ray:(\S+?)-py", (KUBERAY / "Dockerfile").read_text(), re.MULTILINE)
    assert base and base.group(1) == ray.__version__
    service = _documents("rayservice.yaml")["RayService"]["spec"]["rayClusterConfig"]
    job = _documents("rayjob-train.yaml")["RayJob"]["spec"]["rayClusterSpec"]
    assert service["rayVersion"] == job["rayVersion"] == ray.__version__


def test_the_training_job_runs_jobs_train_on_s3_with_flags_it_accepts():
    job = _documents("rayjob-train.yaml")["RayJob"]["spec"]
    argv = shlex.split(job["entrypoint"])
    assert argv[:3] == ["python", "-m", "jobs.train"]
    assert argv[argv.index("--input") + 1].startswith("s3://") and "--activate" in argv
    assert job["shutdownAfterJobFinishes"] is True
    usage = subprocess.run([sys.executable, "-m", "jobs.train", "--help"], cwd=REPO,
                           capture_output=True, text=True, timeout=120, check=False)
    assert usage.returncode == 0, usage.stderr[-2000:]
    for flag in (a for a in argv[3:] if a.startswith("--")):
        assert flag in usage.stdout, flag


def test_a_removed_replica_argument_says_where_replicas_are_set_now():
    from deployments.app import AppArgs

    with pytest.raises(ValidationError) as caught:
        AppArgs.model_validate({"shap_replicas": 3})
    message = str(caught.value)
    assert "ShapStep" in message and "num_replicas" in message and "serve_config.yaml" in message
