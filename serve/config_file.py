"""``serve/config.yaml`` loaded, with dotted overrides, and validated against Ray Serve's own schema.

Overrides read like NeMo's: ``args.max_audio_s=300``, ``Transcriber.max_ongoing_requests=32``,
``Transcriber.user_config.max_batch_audio_s=320``, ``Ingress.autoscaling_config.max_replicas=8``,
``http_options.port=8001``. The first key names the application's ``args``, a deployment, a
top-level section, or an application field; values are parsed as YAML (``null``, numbers, lists).
"""

from __future__ import annotations

import copy
from pathlib import Path

import yaml
from ray.serve.schema import ServeDeploySchema

DEFAULT_CONFIG = Path(__file__).with_name("config.yaml")
TOP_LEVEL_KEYS = {"proxy_location", "http_options", "grpc_options", "logging_config", "target_capacity"}


def load_serve_config(
    path: str | Path = DEFAULT_CONFIG, model: str | Path | None = None, overrides: list[str] = ()
) -> dict:
    """The config file as a dict, ``args.model`` set to ``model`` (made absolute), overrides applied, validated."""
    config = yaml.safe_load(Path(path).read_text())
    applications = config.get("applications") or []
    if len(applications) != 1:
        raise ValueError(f"{path} must hold exactly one application, found {len(applications)}")
    if model is not None:
        applications[0].setdefault("args", {})["model"] = str(Path(model).expanduser().resolve())
    for override in overrides:
        apply_override(config, override)
    validate_serve_config(config)
    return config


def apply_override(config: dict, override: str) -> None:
    """Set one ``dotted.key=value`` in ``config`` (in place)."""
    key, sep, raw_value = override.partition("=")
    if not sep or not key:
        raise ValueError(f"override {override!r} must look like `section.key=value`")
    head, *rest = key.split(".")
    application = config["applications"][0]
    deployments = {d["name"]: d for d in application.get("deployments", [])}
    if head == "args":
        target = application.setdefault("args", {})
    elif head in deployments:
        target = deployments[head]
    elif head in TOP_LEVEL_KEYS:
        if not rest:
            config[head] = yaml.safe_load(raw_value)
            return
        target = config.setdefault(head, {})
    elif not rest:
        application[head] = yaml.safe_load(raw_value)
        return
    else:
        known = ", ".join(["args", *deployments, *sorted(TOP_LEVEL_KEYS)])
        raise ValueError(f"override {override!r}: {head!r} is not one of {known}")
    if not rest:
        raise ValueError(
            f"override {override!r} must name a field inside {head!r}, e.g. `{head}.<field>=...`"
        )
    for part in rest[:-1]:
        target = target.setdefault(part, {})
    target[rest[-1]] = yaml.safe_load(raw_value)


def validate_serve_config(config: dict) -> ServeDeploySchema:
    """Raise pydantic's error naming the bad field if Ray Serve would reject this config."""
    return ServeDeploySchema.model_validate(copy.deepcopy(config))
