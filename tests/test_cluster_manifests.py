"""cluster/kuberay/ and cluster/docker/: what `kubectl apply` and `docker build` would accept.

The manifests are checked against KubeRay v1.7.0's own CRD schemas (../shared/kuberay-crds/),
strictly: an unknown field is an error, as with `kubectl apply --validate=strict`. What they
reference (entrypoint, recipe, overrides, Serve application, image, volumes) must exist and fit.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
import tomllib
from functools import cache
from pathlib import Path

import jsonschema
import pytest
import yaml
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
KUBERAY = REPO / "cluster" / "kuberay"
DOCKER = REPO / "cluster" / "docker"
CRD_DIR = REPO.parent / "shared" / "kuberay-crds"
MANIFESTS = {"RayCluster": "raycluster.yaml", "RayJob": "rayjob.yaml", "RayService": "rayservice.yaml"}
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def manifest(kind: str) -> dict:
    return yaml.safe_load((KUBERAY / MANIFESTS[kind]).read_text())


def cluster_spec(kind: str) -> dict:
    spec = manifest(kind)["spec"]
    return {
        "RayCluster": spec,
        "RayJob": spec.get("rayClusterSpec"),
        "RayService": spec.get("rayClusterConfig"),
    }[kind]


def groups(kind: str) -> dict[str, dict]:
    """``head`` and every worker group of a manifest's cluster, by name."""
    spec = cluster_spec(kind)
    return {"head": spec["headGroupSpec"], **{g["groupName"]: g for g in spec["workerGroupSpecs"]}}


def ray_pin() -> str:
    (pin,) = [d for d in PYPROJECT["project"]["dependencies"] if d.startswith("ray[")]
    return pin.split("==")[1]


# --- validation against the CRDs -------------------------------------------------------------


def _strict(schema):
    """Close every object that lists its properties, unless Kubernetes keeps unknown fields there."""
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    closed = {key: _strict(value) for key, value in schema.items()}
    if (
        "properties" in closed
        and "additionalProperties" not in closed
        and not closed.get("x-kubernetes-preserve-unknown-fields")
    ):
        closed["additionalProperties"] = False
    return closed


def _unchecked_cel_rules(validator, rules, instance, schema):
    # CEL rules (x-kubernetes-validations) need the API server; a manifest that sets such a
    # field must not pass silently here, so using one is an error until someone checks it.
    yield jsonschema.ValidationError(f"field has CEL rules this test cannot evaluate: {rules}")


KubernetesValidator = jsonschema.validators.extend(
    jsonschema.Draft7Validator, {"x-kubernetes-validations": _unchecked_cel_rules}
)


@cache
def crd_validator(kind: str) -> tuple[dict, jsonschema.protocols.Validator]:
    """The CRD of ``kind`` and a strict validator for its v1 schema (the CRDs are 1-1.4 MB of YAML)."""
    path = CRD_DIR / f"ray.io_{kind.lower()}s.yaml"
    if not path.is_file():
        pytest.fail(f"KubeRay CRD {path} is missing (../shared/kuberay-crds/ holds KubeRay v1.7.0's CRDs)")
    definition = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    (version,) = [v for v in definition["spec"]["versions"] if v["name"] == "v1"]
    assert version["served"] and version["storage"]
    return definition, KubernetesValidator(_strict(version["schema"]["openAPIV3Schema"]))


def validate(document: dict) -> None:
    """Raise jsonschema's error naming the bad field if the KubeRay CRD would reject ``document``."""
    definition, validator = crd_validator(document["kind"])
    assert document["apiVersion"] == f"{definition['spec']['group']}/v1"
    assert document["kind"] == definition["spec"]["names"]["kind"]
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", document["metadata"]["name"])
    validator.validate(document)


@pytest.mark.parametrize("kind", sorted(MANIFESTS))
def test_manifest_validates_against_the_kuberay_crd(kind: str) -> None:
    validate(manifest(kind))


def test_crd_validation_rejects_a_misspelt_field_and_a_wrong_type() -> None:
    misspelt = manifest("RayCluster")
    misspelt["spec"]["workerGroupSpecs"][0]["maxReplica"] = 4
    with pytest.raises(jsonschema.ValidationError, match="maxReplica"):
        validate(misspelt)
    wrong_type = manifest("RayJob")
    wrong_type["spec"]["shutdownAfterJobFinishes"] = "yes"
    with pytest.raises(jsonschema.ValidationError, match="is not of type 'boolean'"):
        validate(wrong_type)


# --- the cluster shape -----------------------------------------------------------------------


def test_rayjob_creates_the_same_cluster_as_raycluster() -> None:
    # One cluster definition for interactive work and for training runs; a change to one is a change to both.
    assert cluster_spec("RayJob") == cluster_spec("RayCluster")


@pytest.mark.parametrize("kind", sorted(MANIFESTS))
def test_head_has_no_gpus_and_schedules_no_work(kind: str) -> None:
    head = groups(kind)["head"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    (container,) = head["template"]["spec"]["containers"]
    assert not any("gpu" in key for key in container["resources"]["limits"])


@pytest.mark.parametrize("kind", sorted(MANIFESTS))
def test_worker_groups_autoscale_with_autoscaler_v2(kind: str) -> None:
    spec = cluster_spec(kind)
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["autoscalerOptions"]["version"] == "v2"
    for name, group in groups(kind).items():
        if name != "head":
            assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], name
            assert group["template"]["spec"]["restartPolicy"] == "Never", name  # v2 replaces failed pods


def test_raycluster_has_a_gpu_group_and_a_cpu_group_for_ray_data() -> None:
    workers = {name: group for name, group in groups("RayCluster").items() if name != "head"}
    gpu_limits = {name: gpu_per_pod(group) for name, group in workers.items()}
    assert gpu_limits["gpu"] > 0 and gpu_limits["cpu"] == 0
    assert workers["gpu"]["minReplicas"] == 0 and workers["cpu"]["minReplicas"] == 0  # scale from zero


def gpu_per_pod(group: dict) -> int:
    (container,) = group["template"]["spec"]["containers"]
    return int(container["resources"]["limits"].get("nvidia.com/gpu", 0))


@pytest.mark.parametrize("kind", sorted(MANIFESTS))
def test_every_pod_mounts_the_shared_volume_and_a_shm_object_store(kind: str) -> None:
    storage = yaml.safe_load((KUBERAY / "storage.yaml").read_text())
    assert storage["kind"] == "PersistentVolumeClaim"
    assert storage["spec"]["accessModes"] == ["ReadWriteMany"]  # workers write, the driver reads
    for name, group in groups(kind).items():
        pod = group["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["shared"]["persistentVolumeClaim"]["claimName"] == storage["metadata"]["name"], name
        assert volumes["dshm"]["emptyDir"]["medium"] == "Memory", name
        (container,) = pod["containers"]
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        assert mounts == {"shared": "/mnt/salm", "dshm": "/dev/shm"}, name


@pytest.mark.parametrize("kind", sorted(MANIFESTS))
def test_images_and_ray_version_match_the_project_pins(kind: str) -> None:
    assert cluster_spec(kind)["rayVersion"] == ray_pin()
    for name, group in groups(kind).items():
        for container in group["template"]["spec"]["containers"]:
            assert container["image"] == f"salm-ray:{PYPROJECT['project']['version']}", name


# --- the RayJob: ray_jobs/train.py with the canary-qwen recipe --------------------------------


def rayjob_command() -> tuple[Path, str, list[str]]:
    """(script in the repo, recipe name, overrides) of the RayJob's entrypoint."""
    argv = shlex.split(manifest("RayJob")["spec"]["entrypoint"])  # KubeRay runs it through a shell
    assert argv[0] == "python" and argv[2] == "--config-name", argv
    image_path = Path(argv[1])
    assert image_path.is_relative_to("/app"), (
        "the image holds the project in /app (cluster/docker/Dockerfile)"
    )
    return REPO / image_path.relative_to("/app"), argv[3], argv[4:]


def test_rayjob_runs_train_py_with_the_canary_qwen_recipe() -> None:
    script, config_name, _ = rayjob_command()
    assert script == REPO / "ray_jobs" / "train.py" and script.is_file()
    assert config_name == "salm_canary_qwen_2.5b"
    assert (REPO / "salm" / "configs" / f"{config_name}.yaml").is_file()


def test_rayjob_overrides_name_existing_recipe_keys_and_make_a_valid_recipe() -> None:
    from salm.train.recipe import load_recipe, resolve_config_path

    _, config_name, overrides = rayjob_command()
    bundled = OmegaConf.to_container(OmegaConf.load(resolve_config_path(config_name)))
    for override in overrides:
        key = override.split("=", 1)[0]
        # A misspelt key would be merged in silently and ignored: it must exist in the recipe.
        node = bundled
        for part in key.split("."):
            assert isinstance(node, dict) and part in node, f"{key} is not a key of {config_name}"
            node = node[part]
    recipe = load_recipe(config_name, overrides)  # raises on ??? left unset or invalid values
    assert OmegaConf.to_container(recipe.trainer.resources_per_worker) == {"GPU": 1, "CPU": 8}
    assert recipe.trainer.use_gpu is True
    assert str(recipe.exp_manager.exp_dir).startswith("/mnt/salm/")  # checkpoints on the shared volume


def test_gpu_group_holds_all_training_workers_and_their_cpus() -> None:
    from salm.train.recipe import load_recipe

    _, config_name, overrides = rayjob_command()
    trainer = load_recipe(config_name, overrides).trainer
    gpu = groups("RayJob")["gpu"]
    workers_per_pod = gpu_per_pod(gpu) // trainer.resources_per_worker.GPU
    assert workers_per_pod * gpu["maxReplicas"] >= trainer.num_workers
    # Ray's CPUs on a GPU pod are exactly what its training workers take, so Ray Data's decoding
    # tasks run on the CPU group instead of on the GPU pods' cores.
    assert int(gpu["rayStartParams"]["num-cpus"]) == workers_per_pod * trainer.resources_per_worker.CPU
    (container,) = gpu["template"]["spec"]["containers"]
    assert int(container["resources"]["limits"]["cpu"]) >= int(gpu["rayStartParams"]["num-cpus"])


def test_rayjob_shuts_its_cluster_down_and_has_a_valid_runtime_env() -> None:
    from ray.runtime_env import RuntimeEnv

    spec = manifest("RayJob")["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    RuntimeEnv(**runtime_env)  # Ray's own validation of the runtime env fields
    assert all(isinstance(value, str) for value in runtime_env["env_vars"].values())


# --- the RayService: serve/config.yaml's application -----------------------------------------


def sync_script():
    spec = importlib.util.spec_from_file_location("sync_serve_config", KUBERAY / "sync_serve_config.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def serve_config_v2() -> dict:
    return yaml.safe_load(manifest("RayService")["spec"]["serveConfigV2"])


def test_serve_config_v2_is_serve_config_yaml_with_only_the_cluster_overrides() -> None:
    from serve.config_file import load_serve_config

    sync = sync_script()
    assert serve_config_v2() == yaml.safe_load(sync.render()), (
        "rayservice.yaml is stale: run python cluster/kuberay/sync_serve_config.py"
    )
    # The overrides change only args: every deployment setting is serve/config.yaml's.
    plain = load_serve_config()
    overridden = serve_config_v2()
    plain["applications"][0].pop("args"), overridden["applications"][0].pop("args")
    assert overridden == plain


def test_sync_script_rewrites_a_stale_serve_config_block() -> None:
    sync = sync_script()
    current = (KUBERAY / "rayservice.yaml").read_text()
    stale = current.replace("max_batch_audio_s: 640", "max_batch_audio_s: 1")
    assert stale != current
    assert sync.with_serve_config(stale, sync.render()) == current


def test_serve_config_v2_validates_against_ray_serves_schema_and_imports() -> None:
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(serve_config_v2())
    (application,) = schema.applications
    module_name, builder = application.import_path.split(":")
    assert callable(getattr(importlib.import_module(module_name), builder))
    from serve.app import AppArgs

    AppArgs.model_validate(application.args)  # the app's own argument schema


def test_rayservice_serves_the_model_the_rayjob_exports() -> None:
    from salm.train.recipe import load_recipe

    _, config_name, overrides = rayjob_command()
    exp = load_recipe(config_name, overrides).exp_manager
    assert exp.save_nemo_on_train_end
    args = serve_config_v2()["applications"][0]["args"]
    assert args["model"] == f"{exp.exp_dir}/{exp.name}/final.nemo"  # salm.train.driver writes it there


def test_transcriber_replicas_fit_the_gpu_group() -> None:
    app = serve_config_v2()["applications"][0]
    # A number, not `auto`: with GPU pods scaled down `auto` would see no GPU and serve on CPU.
    assert app["args"]["num_gpus"] >= 1
    (transcriber,) = [d for d in app["deployments"] if d["name"] == "Transcriber"]
    gpu = groups("RayService")["gpu"]
    assert (
        gpu_per_pod(gpu) * gpu["maxReplicas"]
        >= app["args"]["num_gpus"] * (transcriber["autoscaling_config"]["max_replicas"])
    )


def test_every_rayservice_pod_starts_serve_in_its_throughput_mode() -> None:
    from serve.throughput_mode import THROUGHPUT_MODE_ENV

    for name, group in groups("RayService").items():
        (container,) = group["template"]["spec"]["containers"]
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        assert {key: env.get(key) for key in THROUGHPUT_MODE_ENV} == THROUGHPUT_MODE_ENV, name


# --- the image -------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", (DOCKER / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def test_dockerfile_builds_on_rays_gpu_image_at_the_pinned_version() -> None:
    (base,) = [arg for op, arg in dockerfile_instructions() if op == "FROM"]
    python = PYPROJECT["project"]["requires-python"].removeprefix(">=").replace(".", "")
    assert base == f"rayproject/ray:{ray_pin()}-py{python}-gpu"


def test_dockerfile_installs_with_the_same_script_as_ci() -> None:
    instructions = dockerfile_instructions()
    runs = [arg for op, arg in instructions if op == "RUN"]
    assert any(arg.endswith("./install.sh") for arg in runs)
    assert "./install.sh" in (REPO / ".ci" / "run").read_text()
    (workdir,) = [arg for op, arg in instructions if op == "WORKDIR"]
    assert workdir == "/app"  # rayjob.yaml's entrypoint is /app/ray_jobs/train.py
    (env,) = [arg for op, arg in instructions if op == "ENV"]
    assert "PATH=/app/.venv/bin:$PATH" in env  # install.sh's venv provides `ray` and `python`


def test_dockerfile_copies_the_project_without_local_artefacts() -> None:
    copies = [arg.split() for op, arg in dockerfile_instructions() if op == "COPY"]
    assert [c[-2:] for c in copies] == [[".", "/app"]]
    ignored = (DOCKER / "Dockerfile.dockerignore").read_text().split()
    assert {".venv", ".git", "runs"} <= set(ignored)
    for needed in ("install.sh", "pyproject.toml", "ray_jobs/train.py", "salm", "serve"):
        assert (REPO / needed).exists() and needed not in ignored
