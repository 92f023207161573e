"""Regional compilation (``salm.model.compile``) changes speed, not the model or its outputs."""

import copy
import os
import subprocess
import sys
from pathlib import Path

import torch
from nemo.collections.asr.parts.submodules.causal_convs import CausalConv1D
from nemo.collections.asr.parts.submodules.conformer_modules import ConformerConvolution
from torch._dynamo.utils import counters

from salm.model.compile import (
    CACHE_KEY_TAG,
    compile_repeated_layers,
    keep_conv1d_backward_dynamic,
    repeated_layers,
    uncompile_layers,
)
from salm.model.depthwise_conv import DepthwiseConvAsShiftedSums

REPO = Path(__file__).resolve().parents[1]
PROMPT = "Transcribe the following: <|audioplaceholder|>"


def test_compiled_layers_keep_the_state_dict_and_the_transcripts(tiny_salm, speech_clips) -> None:
    torch._dynamo.reset()  # graphs cached by an earlier test would hide whether these layers compile
    model = copy.deepcopy(tiny_salm)  # compiling works in place; the shared fixture stays eager
    prompts = [[{"role": "user", "content": PROMPT, "audio": u.path}] for u in speech_clips[:2]]
    eager = model.generate(prompts, max_new_tokens=8)
    keys = list(model.state_dict())

    compiled = compile_repeated_layers(model)

    encoder_layers = len(model.perception.encoder.layers)
    assert compiled == encoder_layers + model.llm.get_base_model().config.num_hidden_layers
    assert all(layer._compiled_call_impl is not None for layer in repeated_layers(model))
    assert list(model.state_dict()) == keys  # checkpoints and .nemo files are unaffected
    graphs_before = counters["stats"]["unique_graphs"]
    again = model.generate(prompts, max_new_tokens=8)  # encoder compiled, LLM eager (force_eager)
    assert counters["stats"]["unique_graphs"] > graphs_before  # the compiled encoder layers ran
    assert again.token_ids == eager.token_ids
    # compiled, the depthwise convolutions are shifted sums Inductor can fuse; eager, NeMo's again
    depthwise = [layer.conv.depthwise_conv for layer in model.perception.encoder.layers]
    assert {type(conv) for conv in depthwise} == {DepthwiseConvAsShiftedSums}
    uncompile_layers(repeated_layers(model))
    assert {type(conv) for conv in depthwise} == {CausalConv1D}


def test_the_recipes_inductor_options_reach_every_compiled_layer(tiny_salm) -> None:
    """``trainer.compile_options`` (the canary recipe's ``cpp_wrapper``) must configure each layer's compiler."""
    with_options, without = copy.deepcopy(tiny_salm), copy.deepcopy(tiny_salm)
    compile_repeated_layers(with_options, {"cpp_wrapper": True})
    compile_repeated_layers(without)
    configs = [layer._compiled_call_impl.get_compiler_config() for layer in repeated_layers(with_options)]
    assert configs and all(config["cpp_wrapper"] is True for config in configs)
    assert all(config["layout_optimization"] is False for config in configs)  # ours, under the recipe's
    assert all(
        layer._compiled_call_impl.get_compiler_config()["cpp_wrapper"] is False
        for layer in repeated_layers(without)
    )


def test_the_compiled_conformer_convolution_trains_on_every_frame_count_with_one_graph() -> None:
    """NeMo's Conformer convolution module, compiled as compile_repeated_layers does, over 3 lengths.

    Torch 2.13's Inductor lowering of the convolution backward pinned the frame count, so each new
    length compiled again (and past 8, the layer ran eagerly); the gradients must stay eager's.
    """
    assert keep_conv1d_backward_dynamic()  # the pinned torch has the lowering to replace
    assert keep_conv1d_backward_dynamic()  # idempotent: one replacement, one cache-key tag
    assert torch.compiler.config.cache_key_tag.split(";").count(CACHE_KEY_TAG) == 1
    torch.manual_seed(0)
    eager = ConformerConvolution(d_model=8, kernel_size=9).train()
    compiled = copy.deepcopy(eager)
    compiled.compile(dynamic=True)
    torch._dynamo.reset()
    counters.clear()
    for frames in (20, 27, 34):
        x = torch.randn(3, frames, 8)
        for model in (eager, compiled):
            model.zero_grad()
            model(x).square().mean().backward()
        for mine, reference in zip(compiled.parameters(), eager.parameters(), strict=True):
            torch.testing.assert_close(mine.grad, reference.grad)
    assert counters["frames"]["ok"] == 1  # one dynamic graph; a recompile per length gave 3


# The Conformer's two 1-D convolutions (depthwise, pointwise) without NeMo: its import would double the
# time of each subprocess, and the test above already runs NeMo's block.
COMPILE_THREE_LENGTHS = """
import sys, torch
from torch._dynamo.utils import counters
from salm.model.compile import keep_conv1d_backward_dynamic
if sys.argv[1] == "ours":
    keep_conv1d_backward_dynamic()
depthwise, pointwise = torch.nn.Conv1d(8, 8, 9, padding=4, groups=8), torch.nn.Conv1d(8, 8, 1)
block = torch.compile(lambda x: pointwise(depthwise(x).relu()), dynamic=True)
for frames in (20, 27, 34):
    block(torch.randn(3, 8, frames)).square().mean().backward()
print("frames", counters["frames"]["ok"])
"""


def test_artefacts_cached_with_torchs_lowering_are_not_reused(tmp_path) -> None:
    """A cache filled by a build without the fix (pinned lengths) must not pin ours: one graph."""

    def compiled_frames(lowering: str) -> int:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path), "PYTHONPATH": str(REPO)}
        done = subprocess.run(
            [sys.executable, "-c", COMPILE_THREE_LENGTHS, lowering],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            check=True,
        )
        return int(done.stdout.split("frames")[-1])

    assert compiled_frames("torch") == 3  # a recompile per length, and the cache now holds them
    assert compiled_frames("ours") == 1
