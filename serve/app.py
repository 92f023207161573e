"""The Serve application: ``Ingress`` (CPU, HTTP) -> ``Transcriber`` (GPU when the cluster has one).

``serve run serve/config.yaml`` builds it through ``build_app`` with the ``args`` of the config
file; per-deployment settings (replicas, autoscaling, queue limits, batching) live in the same
file and override the defaults set here. ``salm serve MODEL`` is a shortcut for the same thing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import ray
from pydantic import BaseModel, ConfigDict, Field
from ray.serve import Application

from serve.ingress import Ingress, IngressSettings
from serve.transcriber import Transcriber


class AppArgs(BaseModel):
    """The application's ``args`` in ``serve/config.yaml`` (``serve run ... key=value`` sets them too)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    model: str = Field(description="a saved SALM: HF-layout directory or .nemo file on the replicas' disk")
    model_name: str | None = Field(default=None, description="name in /v1/models; default: the file name")
    num_gpus: float | Literal["auto"] = Field(
        default="auto", description="GPUs per transcriber replica; auto: 1 if the cluster has GPUs, else 0"
    )
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        default="auto", description="transcriber weights; auto: bfloat16 on GPU, float32 on CPU"
    )
    max_upload_mb: float = Field(default=25.0, gt=0, description="request body limit (HTTP 413 above)")
    max_audio_s: float = Field(default=600.0, gt=0, description="hard limit on audio per request (HTTP 413)")
    max_chunk_s: float = Field(default=40.0, gt=0, description="longer audio is cut at quiet points")
    api_key_env: str | None = Field(
        default="SALM_SERVE_API_KEY", description="env var holding a bearer token; unset or empty: no auth"
    )


def build_app(args: AppArgs | dict) -> Application:
    """Application builder named by ``import_path: serve.app:build_app``."""
    args = args if isinstance(args, AppArgs) else AppArgs.model_validate(args)
    model_path = Path(args.model).expanduser().resolve()
    if not model_path.exists():
        raise FileNotFoundError(
            f"`args.model` {str(model_path)!r} does not exist; give the path of a saved SALM "
            "(`salm quickstart` writes one to runs/quickstart/runs/tiny/final.nemo)"
        )
    num_gpus = args.num_gpus
    if num_gpus == "auto":
        num_gpus = 1 if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0 else 0
    transcriber = Transcriber.options(ray_actor_options={"num_cpus": 1, "num_gpus": num_gpus}).bind(
        str(model_path), dtype=args.dtype
    )
    settings = IngressSettings(
        model_name=args.model_name or model_path.stem,
        max_upload_bytes=int(args.max_upload_mb * 2**20),
        max_audio_s=args.max_audio_s,
        max_chunk_s=args.max_chunk_s,
        api_key_env=args.api_key_env,
    )
    return Ingress.bind(transcriber, settings)
