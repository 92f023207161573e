"""salm/model/packing.py: the loss on one packed row of real positions equals the padded batch's loss."""

import copy

import pytest
import torch
from test_model import _batch

from salm.assets.synthetic_speech import make_sentences, synthesize_corpus
from salm.model.activation_checkpointing import use_activation_checkpointing
from salm.model.compile import compile_repeated_layers
from salm.model.packing import pack_sequences, packed_attention
from salm.model.placeholders import IGNORE_INDEX


def test_packing_keeps_each_rows_real_positions_in_order_with_their_own_positions() -> None:
    # Rows of 5, 3 and 4 real positions, left-padded to 5, as replace_placeholders makes them.
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1], [0, 1, 1, 1, 1]], dtype=torch.bool)
    embeds = torch.arange(15, dtype=torch.float32).view(3, 5, 1)
    targets = torch.tensor([[-100, 7, 8, -100, 9], [0, 0, -100, 5, 6], [0, -100, 1, 2, 3]])

    packed = pack_sequences(embeds, mask, targets)

    assert packed.embeds.flatten().tolist() == [0, 1, 2, 3, 4, 7, 8, 9, 11, 12, 13, 14]
    assert packed.targets.tolist() == [[-100, 7, 8, -100, 9, -100, 5, 6, -100, 1, 2, 3]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3]]
    assert packed.cu_seq_lens.tolist() == [0, 5, 8, 12] and packed.cu_seq_lens.dtype == torch.int32
    assert packed.max_length == 5


def test_packed_attention_attends_causally_within_each_sequence_only() -> None:
    """Against SDPA run on each sequence alone, with grouped key/value heads (4 query, 2 kv)."""
    torch.manual_seed(0)
    lengths = [3, 6, 2]
    query, key, value = torch.randn(1, 4, 11, 8), torch.randn(1, 2, 11, 8), torch.randn(1, 2, 11, 8)
    cu = torch.tensor([0, 3, 9, 11], dtype=torch.int32)

    output, _ = packed_attention(None, query, key, value, None, scaling=0.5, cu_seq_lens_q=cu, max_length_q=6)

    assert output.shape == (1, 11, 4, 8)
    start = 0
    for length in lengths:
        part = slice(start, start + length)
        alone = torch.nn.functional.scaled_dot_product_attention(
            query[:, :, part], key[:, :, part], value[:, :, part], is_causal=True, scale=0.5, enable_gqa=True
        )
        torch.testing.assert_close(output[:, part], alone.transpose(1, 2))
        start += length


def _loss_and_grads(model, batch: dict) -> tuple[dict, list[torch.Tensor]]:
    model.zero_grad()
    out = model.loss(batch)
    out["loss"].backward()
    return out, [p.grad.clone() for p in model.parameters() if p.requires_grad]


def test_the_packed_loss_equals_the_padded_one_with_the_same_gradients(tiny_salm, speech_clips) -> None:
    padded = copy.deepcopy(tiny_salm).eval()  # eval: no dropout, so both compute the same thing
    batch = _batch(padded, speech_clips[:3], ["hello there", "yes", "a somewhat longer answer here"])
    packed = copy.deepcopy(padded)
    packed.pack_llm_sequences = True

    padded_out, padded_grads = _loss_and_grads(padded, batch)
    packed_out, packed_grads = _loss_and_grads(packed, batch)

    assert padded_out["padded_positions"] > padded_out["num_positions"]  # the batch has padding
    assert packed_out["padded_positions"] == packed_out["num_positions"]  # the packed LLM ran none
    torch.testing.assert_close(packed_out["loss"], padded_out["loss"])
    for key in (
        "num_target_tokens",
        "correct_tokens",
        "predicted_ids",
        "targets_per_example",
        "num_positions",
    ):
        assert torch.equal(packed_out[key], padded_out[key]), key
    assert (padded_out["targets_per_example"] > 0).all()
    for mine, reference in zip(packed_grads, padded_grads, strict=True):
        torch.testing.assert_close(mine, reference, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("packed", [True, False])
def test_the_loss_through_compiled_layers_compiles_once_for_every_batch(
    tiny_salm, speech_clips, packed
) -> None:
    """The recipe compiles the layers (dynamic shapes): rows of new lengths reuse the graphs, packed or
    padded."""
    from torch._dynamo import reset
    from torch._dynamo.utils import counters

    reset()  # graphs of an earlier test would hide what these layers compile
    eager = copy.deepcopy(tiny_salm).eval()
    eager.pack_llm_sequences = packed
    compiled = copy.deepcopy(eager)
    compile_repeated_layers(compiled)
    batches = [
        _batch(eager, speech_clips[:2], ["hello there", "yes"]),
        _batch(eager, speech_clips[1:4], ["one", "two words", "and three words"]),
        _batch(eager, speech_clips[3:6], ["a", "b c", "the longest answer of them all"]),
    ]
    graphs = [counters["stats"]["unique_graphs"]]
    for batch in batches:
        with torch.no_grad():
            torch.testing.assert_close(compiled.loss(batch)["loss"], eager.loss(batch)["loss"])
        graphs.append(counters["stats"]["unique_graphs"] - graphs[0])
    # The first batch compiles one graph per layer kind: a Conformer layer's and a Qwen3 layer's (the
    # LLM's input is no view, packed or padded, so the first Qwen3 layer shares it); rows of new
    # lengths and sequence counts compile nothing.
    assert graphs[1:] == [2, 2, 2], graphs
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])


def test_the_loss_without_targets_in_a_row_keeps_its_zero_count(tiny_salm, speech_clips) -> None:
    """``targets_per_example`` splits ``predicted_ids`` per example: a row with no target counts 0."""
    model = copy.deepcopy(tiny_salm).eval()
    model.pack_llm_sequences = True
    batch = _batch(model, speech_clips[:2], ["hello there", "yes"])
    batch["loss_mask"][1] = False  # the second example has no target
    out = model.loss(batch)
    assert out["targets_per_example"][1] == 0 and out["targets_per_example"][0] > 0
    assert out["num_target_tokens"] == out["targets_per_example"].sum() == len(out["predicted_ids"])
    assert IGNORE_INDEX not in out["predicted_ids"].tolist()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlashAttention's varlen kernel needs a GPU")
def test_varlen_attention_on_the_gpu_equals_the_masked_reference() -> None:
    """The GPU path (aten's FlashAttention varlen kernel) against the CPU path's dense mask, Qwen3-1.7B's
    heads (16 query, 8 key/value)."""
    torch.manual_seed(0)
    cu = torch.tensor([0, 130, 131, 400, 512], dtype=torch.int32)
    # (1, N, heads, D) projections seen as (1, heads, N, D), as a Qwen3 layer hands them over
    shape = (1, 512, 16, 128), (1, 512, 8, 128)
    query = torch.randn(shape[0], dtype=torch.bfloat16, requires_grad=True)
    key, value = (torch.randn(shape[1], dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    outputs, grads = [], []
    for device in ("cuda", "cpu"):
        inputs = [t.detach().to(device).requires_grad_() for t in (query, key, value)]
        output, _ = packed_attention(
            None,
            *(t.transpose(1, 2) for t in inputs),
            None,
            scaling=128**-0.5,
            cu_seq_lens_q=cu.to(device),
            max_length_q=269,
        )
        output.float().square().sum().backward()
        outputs.append(output.float().cpu())
        grads.append([t.grad.float().cpu() for t in inputs])
    torch.testing.assert_close(outputs[0], outputs[1], rtol=2e-2, atol=2e-2)
    for gpu, cpu in zip(*grads, strict=True):
        torch.testing.assert_close(gpu, cpu, rtol=5e-2, atol=5e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlashAttention's varlen kernel needs a GPU")
def test_varlen_attention_on_the_gpu_takes_fp32_under_autocast_and_refuses_it_without() -> None:
    """FlashAttention computes in fp16/bf16 only, and the aten op is not on autocast's list: fp32
    queries (a model kept in fp32 under autocast) are cast as SDPA's would be; without autocast the
    user is told what to change instead of reading a CUDA shim's error."""
    cu = torch.tensor([0, 3, 8], dtype=torch.int32, device="cuda")
    query, key, value = (torch.randn(1, 2, 8, 64, device="cuda") for _ in range(3))
    call = dict(scaling=None, cu_seq_lens_q=cu, max_length_q=5)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        output, _ = packed_attention(None, query, key, value, None, **call)
    reference, _ = packed_attention(
        None, *(t.cpu() for t in (query, key, value)), None, **{**call, "cu_seq_lens_q": cu.cpu()}
    )
    assert output.dtype == torch.bfloat16
    torch.testing.assert_close(output.float().cpu(), reference, rtol=2e-2, atol=2e-2)
    with pytest.raises(ValueError, match="pack_llm_sequences"):
        packed_attention(None, query, key, value, None, **call)


def _on_the_gpu(batch: dict) -> dict:
    return {key: value.cuda() if torch.is_tensor(value) else value for key, value in batch.items()}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlashAttention's varlen kernel needs a GPU")
@pytest.mark.parametrize("checkpointed", [False, True])
def test_packed_loss_on_the_gpu_through_compiled_layers_equals_the_padded_one(
    tiny_salm, tmp_path, checkpointed: bool
) -> None:
    """The canary recipe's packed step on a GPU: bf16 autocast, layers compiled under Inductor's C++
    wrapper (``trainer.compile_options``), FlashAttention's varlen kernel; against the eager padded
    loss. (torch 2.11's ``varlen_attn`` failed to compile here: its ``list[int]`` argument.) With
    ``trainer.activation_checkpointing`` too: the backward recomputes the varlen attention."""
    padded = copy.deepcopy(tiny_salm).eval().cuda()
    packed = copy.deepcopy(padded)
    packed.pack_llm_sequences = True
    if checkpointed:
        use_activation_checkpointing(packed, True)
    compile_repeated_layers(packed, {"cpp_wrapper": True})
    clips = synthesize_corpus(tmp_path, make_sentences(3, seed=1), ["kal16", "slt", "rms"])  # flite only
    batch = _on_the_gpu(_batch(padded, clips, ["hello there", "yes", "a somewhat longer answer here"]))
    results = []
    for model in (padded, packed):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out, grads = _loss_and_grads(model, batch)
        results.append((out, torch.cat([grad.float().flatten() for grad in grads])))
    (padded_out, padded_grads), (packed_out, packed_grads) = results

    assert packed_out["padded_positions"] == packed_out["num_positions"] < padded_out["padded_positions"]
    torch.testing.assert_close(packed_out["loss"].float(), padded_out["loss"].float(), rtol=2e-2, atol=2e-2)
    assert torch.equal(packed_out["num_target_tokens"], padded_out["num_target_tokens"])
    relative_error = (packed_grads - padded_grads).norm() / padded_grads.norm()
    assert relative_error < 5e-2, f"gradients differ by {relative_error:.3f} of their norm"
