"""Shared, offline test material: a tiny Qwen3 LLM dir (real tokenizer) and real synthetic speech."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig, OmegaConf

from salm.assets.synthetic_speech import Utterance, make_sentences, synthesize_corpus
from salm.assets.tiny_llm import write_tiny_qwen3

TINY_RECIPE = Path(__file__).resolve().parents[1] / "salm" / "configs" / "tiny.yaml"


@pytest.fixture(scope="session")
def tiny_llm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_qwen3(tmp_path_factory.mktemp("tiny_llm"))


@pytest.fixture(scope="session")
def _tiny_model_cfg(tiny_llm_dir: Path) -> DictConfig:
    cfg = OmegaConf.load(TINY_RECIPE).model
    cfg.pretrained_llm = str(tiny_llm_dir)
    return cfg


@pytest.fixture
def tiny_model_cfg(_tiny_model_cfg: DictConfig) -> DictConfig:
    """The bundled tiny recipe's model section, pointing at the tiny LLM; a fresh copy per test."""
    return copy.deepcopy(_tiny_model_cfg)


@pytest.fixture(scope="session")
def tiny_salm(_tiny_model_cfg: DictConfig):
    """A tiny SALM in eval mode with every weight random (LoRA B too, so LoRA changes outputs)."""
    from salm.model import SALM

    torch.manual_seed(0)
    model = SALM(copy.deepcopy(_tiny_model_cfg))
    randomize_lora(model)
    return model.eval()


def randomize_lora(model: torch.nn.Module) -> None:
    """PEFT starts lora_B at zero (a no-op adapter); make it non-zero so tests can see LoRA's effect."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05)


@pytest.fixture(scope="session")
def speech_clips(tmp_path_factory: pytest.TempPathFactory) -> list[Utterance]:
    """Six real utterances of different lengths and voices (``kal`` writes 8 kHz, the rest 16 kHz)."""
    texts = make_sentences(6, seed=1)
    texts[2] = "yes"
    voices = ["kal16", "slt", "kal", "rms", "awb", "espeak:en-us"]
    return synthesize_corpus(tmp_path_factory.mktemp("speech"), texts, voices)


def free_port() -> int:
    """A TCP port nothing listens on right now (for dashboards and HTTP servers started by tests)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def ray_local():
    """One real local Ray cluster for the whole test session (dashboard on, token auth off).

    4 logical CPUs on the 2-core CI machine so that 2 train workers plus Ray Data tasks fit.
    Serve runs in its throughput mode, as ``salm serve`` and the RayService start it.
    """
    import os

    import ray

    from serve.throughput_mode import with_throughput_mode

    os.environ.update(with_throughput_mode(os.environ))  # Ray's processes read it when they start
    # In that mode an ingress replica drains for 30 s when stopped (for external load balancers to
    # let go of it), and `serve.shutdown()` waits for it: 1 s here, where no balancer is involved.
    os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "1")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    context = ray.init(
        num_cpus=4,
        include_dashboard=True,
        dashboard_port=free_port(),
        runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled"}},
    )
    yield context
    ray.shutdown()
