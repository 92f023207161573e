"""bench/packing_ab.py's reference check: it reads packed and padded losses and gradients as equal
when they are, and a wrong packed attention as a difference."""

import copy

import pytest
import torch
from test_model import _batch

import salm.model.packing as packing
from bench.packing_ab import reference_check


@pytest.fixture
def model_and_batch(tiny_salm, speech_clips):
    model = copy.deepcopy(tiny_salm)
    return model, _batch(model, speech_clips[:3], ["hello there", "yes", "a somewhat longer answer here"])


def test_reference_check_finds_packed_and_padded_equal(model_and_batch) -> None:
    model, batch = model_and_batch
    check = reference_check(model, batch)
    assert check["packed"]["loss"] == pytest.approx(check["padded"]["loss"], rel=1e-5)
    assert check["packed"]["computed_positions"] == check["packed"]["real_positions"]
    assert check["padded"]["computed_positions"] > check["padded"]["real_positions"]
    assert check["grad_relative_difference"] < 1e-4
    assert all(p.grad is None for p in model.parameters())  # leaves no gradients behind


def test_reference_check_sees_attention_across_sequences(model_and_batch, monkeypatch) -> None:
    """With the block-diagonal mask replaced by a plain causal one, later sequences see earlier ones."""

    def causal_over_the_whole_row(query, key, value, cu_seq_lens, scale):
        out = torch.nn.functional.scaled_dot_product_attention(
            query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1), is_causal=True, scale=scale,
            enable_gqa=key.shape[1] != query.shape[1],
        )  # fmt: skip
        return out.transpose(0, 1)

    monkeypatch.setattr(packing, "_masked_causal_attention", causal_over_the_whole_row)
    model, batch = model_and_batch
    check = reference_check(model, batch)
    assert check["grad_relative_difference"] > 1e-3
