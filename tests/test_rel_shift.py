"""The strided relative-position shift: NeMo's numbers, NeMo's weights, used by every SALM encoder."""

from __future__ import annotations

import copy

import pytest
import torch
from nemo.collections.asr.modules import ConformerEncoder
from nemo.collections.asr.parts.submodules.multi_head_attention import RelPositionMultiHeadAttention

from salm.errors import SALMConfigError
from salm.model.compile import compile_layers
from salm.model.perception import AudioPerception
from salm.model.rel_shift import (
    StridedRelPositionAttention,
    set_key_padding,
    strided_rel_shift,
    use_strided_rel_shift,
)


def nemo_rel_shift(scores: torch.Tensor) -> torch.Tensor:
    return RelPositionMultiHeadAttention.rel_shift(None, scores)


@pytest.mark.parametrize("time", [1, 2, 7, 64])
def test_the_strided_shift_is_nemos_shift_on_the_key_columns(time: int) -> None:
    scores = torch.randn(3, 4, time, 2 * time - 1)
    assert torch.equal(strided_rel_shift(scores), nemo_rel_shift(scores)[..., :time])


@pytest.mark.parametrize(("time", "positions"), [(3, 6), (3, 9), (64, 128)])
def test_wider_position_scores_give_nemos_shift_on_every_valid_column(time: int, positions: int) -> None:
    """2T columns (our padded position table) or more (a streaming cache: keys outnumber queries)."""
    scores = torch.randn(2, 4, time, positions)
    assert torch.equal(strided_rel_shift(scores), nemo_rel_shift(scores)[..., : positions - time + 1])


def test_too_narrow_position_scores_are_refused() -> None:
    with pytest.raises(ValueError, match="at least 2T - 1 = 5"):
        strided_rel_shift(torch.randn(1, 1, 3, 4))


@pytest.mark.parametrize("cached", [1, 2])
def test_attention_with_a_streaming_cache_matches_nemos(cached: int) -> None:
    """With a cache the position table is NeMo's (T + cached + T - 1 rows, no extra row): one cached
    frame makes it 2T rows by coincidence, which must not be taken for our padded table."""
    torch.manual_seed(0)
    nemo = RelPositionMultiHeadAttention(
        n_head=2, n_feat=8, dropout_rate=0.0, pos_bias_u=None, pos_bias_v=None
    )
    nemo.cache_drop_size = 0  # what the encoder's streaming set-up gives its attentions
    ours = copy.deepcopy(nemo)
    ours.__class__ = StridedRelPositionAttention
    query, cache = torch.randn(1, 3, 8), torch.randn(1, cached, 8)
    pos_emb = torch.randn(1, 3 + cached + 3 - 1, 8)
    mask = torch.zeros(1, 3, 3 + cached, dtype=torch.bool)
    nemo_out, nemo_cache = nemo(query, query, query, mask, pos_emb, cache=cache)
    our_out, our_cache = ours(query, query, query, mask, pos_emb, cache=cache)
    torch.testing.assert_close(our_out, nemo_out)
    assert torch.equal(our_cache, nemo_cache)


def small_encoder(layers: int = 2, dropout: float = 0.0) -> ConformerEncoder:
    """A 32-wide FastConformer in training mode; ``dropout`` for all of its dropouts."""
    return ConformerEncoder(
        feat_in=16,
        n_layers=layers,
        d_model=32,
        n_heads=4,
        subsampling_factor=4,
        subsampling_conv_channels=8,
        dropout=dropout,
        dropout_pre_encoder=dropout,
        dropout_emb=dropout,
        dropout_att=dropout,
    ).train()


def test_an_encoder_with_the_strided_shift_computes_the_same_outputs_and_gradients() -> None:
    torch.manual_seed(0)
    nemo = small_encoder()
    ours = copy.deepcopy(nemo)
    assert use_strided_rel_shift(ours) == 2
    assert list(ours.state_dict()) == list(nemo.state_dict())
    features, lengths = torch.randn(3, 16, 120), torch.tensor([120, 90, 41])
    outputs = []
    for model in (nemo, ours):
        encoded, encoded_lens = model(audio_signal=features, length=lengths)
        encoded.square().sum().backward()
        outputs.append((encoded, encoded_lens, [p.grad for p in model.parameters()]))
    (nemo_out, nemo_lens, nemo_grads), (our_out, our_lens, our_grads) = outputs
    assert torch.equal(our_lens, nemo_lens)
    torch.testing.assert_close(our_out, nemo_out, rtol=1e-5, atol=1e-5)
    for ours_grad, nemo_grad in zip(our_grads, nemo_grads, strict=True):
        torch.testing.assert_close(ours_grad, nemo_grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("masked", [True, False])
@pytest.mark.parametrize("time", [5, 8, 13])
def test_padded_keys_give_nemos_attention_outputs_and_gradients(time: int, masked: bool) -> None:
    """Keys padded to a multiple of 8 are masked: NeMo's outputs and gradients, float64, with NeMo's
    padding mask or none (then the padded keys alone are masked)."""
    torch.manual_seed(0)
    nemo = RelPositionMultiHeadAttention(
        n_head=2, n_feat=8, dropout_rate=0.0, pos_bias_u=None, pos_bias_v=None
    ).double()
    torch.nn.init.normal_(nemo.pos_bias_u)  # NeMo starts them at zero: make the position term count
    torch.nn.init.normal_(nemo.pos_bias_v)
    ours = copy.deepcopy(nemo)
    ours.__class__ = StridedRelPositionAttention
    ours.key_multiple = 8
    x = torch.randn(2, time, 8, dtype=torch.float64)
    pos_emb = torch.randn(1, 2 * time - 1, 8, dtype=torch.float64)
    mask = None
    if masked:  # the second clip is 3 frames long, as the encoder's padding mask says
        valid = torch.arange(time) < torch.tensor([time, 3])[:, None]
        mask = ~(valid[:, :, None] & valid[:, None, :])
    results = []
    for module in (nemo, ours):
        module.zero_grad()
        inputs = x.clone().requires_grad_()
        out = module(inputs, inputs, inputs, mask, pos_emb)
        out.square().sum().backward()
        results.append((out, inputs.grad, [p.grad for p in module.parameters()]))
    (nemo_out, nemo_dx, nemo_grads), (our_out, our_dx, our_grads) = results
    torch.testing.assert_close(our_out, nemo_out)
    torch.testing.assert_close(our_dx, nemo_dx)
    for mine, reference in zip(our_grads, nemo_grads, strict=True):
        torch.testing.assert_close(mine, reference)


def test_a_compiled_layer_with_padded_keys_is_one_graph_over_frame_counts_with_eagers_gradients() -> None:
    """Compiled as ``compile_repeated_layers`` does (``dynamic=True``): the shift's offset must not
    break the graph (``storage_offset()`` did: 4 graphs per layer) and the padded width, a function
    of the frame count, must not pin it (a recompile per length)."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    eager = small_encoder(layers=1).double()  # float64: eager's and Inductor's sums agree closely
    use_strided_rel_shift(eager)
    set_key_padding(eager, 8)
    compiled = copy.deepcopy(eager)
    compile_layers([compiled.layers[0]])
    torch._dynamo.reset()
    counters.clear()
    for frames in (57, 40, 81):  # 15, 10 and 21 encoder frames: padded to 16, 16 and 24 keys
        features = torch.randn(2, 16, frames, dtype=torch.float64)
        lengths = torch.tensor([frames, frames - 13])
        for model in (eager, compiled):
            model.zero_grad()
            encoded, _ = model(audio_signal=features, length=lengths)
            encoded.square().sum().backward()
        for mine, reference in zip(compiled.parameters(), eager.parameters(), strict=True):
            torch.testing.assert_close(mine.grad, reference.grad)
    assert sum(counters["graph_break"].values()) == 0
    assert counters["frames"]["ok"] == 1


def test_a_compiled_layer_with_padded_keys_recompiles_for_one_clip_with_dropout() -> None:
    """Dynamo compiles a batch of one clip apart (sizes 0 and 1 are specialised). With dropout on,
    that graph once broke Inductor (torch 2.13: "Exponent must be non-negative") when the mask's
    padded width was written as "mask's T + keys - key's T", a second symbol for the same length."""
    torch.manual_seed(0)
    encoder = small_encoder(layers=1, dropout=0.1)  # the canary recipe's dropouts
    use_strided_rel_shift(encoder)
    set_key_padding(encoder, 8)
    compile_layers([encoder.layers[0]])
    torch._dynamo.reset()
    for frames, clips in ((157, 2), (140, 1)):
        lengths = torch.tensor([frames, frames - 13][:clips])
        encoded, _ = encoder(audio_signal=torch.randn(clips, 16, frames), length=lengths)
        encoded.square().sum().backward()
        assert torch.isfinite(encoded).all()
        assert all(torch.isfinite(p.grad).all() for p in encoder.layers[0].parameters())


def test_pad_attention_keys_to_is_a_perception_key_and_a_bad_value_is_refused(tiny_model_cfg) -> None:
    tiny_model_cfg.perception.output_dim = 64
    tiny_model_cfg.perception.pad_attention_keys_to = 8
    attentions = [layer.self_attn for layer in AudioPerception(tiny_model_cfg.perception).encoder.layers]
    assert attentions and all(a.key_multiple == 8 for a in attentions)
    for bad in (-8, "8", True):
        tiny_model_cfg.perception.pad_attention_keys_to = bad
        with pytest.raises(SALMConfigError, match=r"pad_attention_keys_to` must be a whole number >= 0"):
            AudioPerception(tiny_model_cfg.perception)


def test_bench_padded_keys_variant_is_the_recipes_key_padding() -> None:
    """``bench/encoder_attention.py``'s ``padded_keys`` variant must time what the canary recipe runs."""
    from bench.encoder_attention import set_variant

    model = small_encoder()
    set_variant(model, "padded_keys")
    attentions = [layer.self_attn for layer in model.layers]
    assert all(type(a) is StridedRelPositionAttention and a.key_multiple == 8 for a in attentions)


def test_every_attention_of_the_salm_encoder_shifts_with_strides(tiny_salm) -> None:
    attentions = [layer.self_attn for layer in tiny_salm.perception.encoder.layers]
    assert attentions and all(type(a) is StridedRelPositionAttention for a in attentions)


def test_the_benchmarks_other_codings_of_the_shift_are_nemos_shift() -> None:
    """``bench/rel_shift_codings.py`` times alternatives to the recipe's shift; each must be NeMo's."""
    from bench.rel_shift_codings import check_codings

    check_codings()  # raises AssertionError naming the coding that differs
