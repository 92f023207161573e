"""The static-cache greedy decoder gives the tokens ``transformers.generate`` gives."""

import pytest
import torch
from transformers import GenerationConfig

from salm.model.decoding import DecoderCache, GreedyDecoder, cache_bytes, padded_batch_size
from salm.model.llm import base_causal_lm, embedding_inside

PROMPT = "Transcribe the following: <|audioplaceholder|>"


def graphs_compiled_by_each(calls: list) -> list[int]:
    """How many new graphs Dynamo compiled in each of ``calls``, from an empty cache: any number
    after the first is a recompile."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counts = []
    with torch.no_grad():
        for call in calls:
            before = counters["stats"]["unique_graphs"]
            call()
            counts.append(counters["stats"]["unique_graphs"] - before)
    return counts


def decoder_parts(model) -> tuple:
    """What ``GreedyDecoder`` takes of a SALM: the LLM body, its head and the input embedding."""
    causal_lm = base_causal_lm(model.llm)
    return causal_lm.model, causal_lm.lm_head, model.embed_tokens


def transformers_greedy_tokens(
    model, embeds: torch.Tensor, mask: torch.Tensor, max_new_tokens: int
) -> torch.Tensor:
    """``transformers.generate``'s greedy tokens for the same input embeddings: the reference."""
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=model.text_eos_id,
        pad_token_id=model.text_pad_id,
    )
    with torch.no_grad(), embedding_inside(model.llm, model.embed_tokens):
        return model.llm.generate(inputs_embeds=embeds, attention_mask=mask, generation_config=config)


def test_greedy_decoder_equals_transformers_generate(tiny_salm, speech_clips) -> None:
    prompts = [[{"role": "user", "content": PROMPT, "audio": u.path}] for u in speech_clips[:3]]
    prompts.append([{"role": "user", "content": "Say something long about nothing at all, please"}])
    embeds, mask = tiny_salm.prepare_generation_inputs(prompts)
    ours = tiny_salm._greedy_decode(embeds, mask, max_new_tokens=12)
    theirs = transformers_greedy_tokens(tiny_salm, embeds, mask, max_new_tokens=12)
    assert torch.equal(ours, theirs[:, : ours.shape[1]])


def test_greedy_decoder_pads_after_eos_and_stops_when_all_finished(tiny_salm, speech_clips) -> None:
    embeds, mask = tiny_salm.prepare_generation_inputs(
        [[{"role": "user", "content": PROMPT, "audio": speech_clips[0].path}]]
    )
    eos = tiny_salm.text_eos_id

    def eos_wins(module, args, logits):
        return logits.index_fill(-1, torch.tensor([eos]), 1e4)

    hook = tiny_salm.llm.get_base_model().lm_head.register_forward_hook(eos_wins)
    try:
        out = tiny_salm._greedy_decode(embeds, mask, max_new_tokens=40)
    finally:
        hook.remove()
    assert out.shape[1] < 40
    assert out[0, 0].item() == eos
    assert (out[0, 1:] == tiny_salm.text_pad_id).all()


def test_padded_batch_sizes_are_few_and_waste_little() -> None:
    sizes = {b: padded_batch_size(b) for b in range(1, 1025)}
    assert [sizes[b] for b in (1, 2, 3, 5, 8, 9, 12, 13, 17, 25, 33, 49, 100, 129, 256)] == [
        1, 2, 4, 8, 8, 12, 12, 16, 24, 32, 48, 64, 128, 192, 256,
    ]  # fmt: skip
    assert all(b <= padded <= 1.6 * b for b, padded in sizes.items())
    assert len({sizes[b] for b in range(1, 257)}) == 14  # graphs a server at up to 256 clips captures
    with pytest.raises(ValueError, match="batch must be >= 1"):
        padded_batch_size(0)


def test_padding_rows_leaves_the_real_rows_tokens_unchanged(tiny_salm, speech_clips) -> None:
    """A decoder for 4 rows given 3 prompts: the same tokens as a decoder for 3, padding rows emit only padding."""
    prompts = [[{"role": "user", "content": PROMPT, "audio": u.path}] for u in speech_clips[:3]]
    embeds, mask = tiny_salm.prepare_generation_inputs(prompts)
    parts = decoder_parts(tiny_salm)
    results = []
    with torch.no_grad():
        for rows in (3, padded_batch_size(3)):
            decoder = GreedyDecoder(*parts, rows, 128, 10, False)
            decoder.cache.keys[0].normal_()  # stale cache contents (an earlier batch's) must not leak in
            decoder.prefill(embeds, mask, tiny_salm.text_eos_id, tiny_salm.text_pad_id)
            results.append(decoder.decode())
        assert results[1].shape == (4, results[0].shape[1])
        assert torch.equal(results[0], results[1][:3])
        assert (results[1][3] == tiny_salm.text_pad_id).all()
        with pytest.raises(ValueError, match="3 prompts do not fit a decoder for 2"):
            GreedyDecoder(*parts, 2, 128, 10, False).prefill(embeds, mask, 0, 0)


def test_decoder_cache_keeps_recent_shapes_and_forgets_moved_weights(tiny_salm) -> None:
    parts = decoder_parts(tiny_salm)
    cache = DecoderCache(max_entries=2)
    first = cache.get(*parts, 4, 64, 8, weight_ptrs=(1,), use_graph=False)
    assert cache.get(*parts, 4, 64, 8, weight_ptrs=(1,), use_graph=False) is first
    second = cache.get(*parts, 8, 64, 8, weight_ptrs=(1,), use_graph=False)
    first.capture_s, second.capture_s = 1.0, 2.0  # what capture() measures on a GPU
    cache.get(*parts, 4, 64, 8, weight_ptrs=(1,), use_graph=False)  # the 4-row decoder is now the newest
    cache.get(*parts, 16, 64, 8, weight_ptrs=(1,), use_graph=False)  # evicts the 8-row one
    assert len(cache) == 2
    assert cache.capture_seconds() == 3.0  # an evicted decoder's capture still counts
    assert cache.get(*parts, 4, 64, 8, weight_ptrs=(1,), use_graph=False) is first
    assert cache.get(*parts, 4, 64, 8, weight_ptrs=(1,), use_graph=True) is not first  # a graph or not
    assert cache.get(*parts, 8, 64, 8, weight_ptrs=(1,), use_graph=False) is not second
    assert cache.get(*parts, 4, 64, 8, weight_ptrs=(2,), use_graph=False) is not first  # weights moved
    assert len(cache) == 1
    assert cache.capture_seconds() == 3.0


def test_decoder_cache_stays_within_its_byte_budget(tiny_salm) -> None:
    parts = decoder_parts(tiny_salm)
    one = cache_bytes(parts[0].config, 4, 64, tiny_salm.embed_tokens.weight.dtype)
    cache = DecoderCache(max_entries=16, max_bytes=int(2.5 * one))
    first = cache.get(*parts, 4, 64, 8, weight_ptrs=(1,), use_graph=False)
    assert first.cache.nbytes() == one
    for max_len in (128, 192):  # 2x and 3x the bytes of the first: each evicts what came before
        cache.get(*parts, 4, max_len, 8, weight_ptrs=(1,), use_graph=False)
        assert len(cache) == 1
    assert (
        cache.bytes() == cache_bytes(parts[0].config, 4, 192, tiny_salm.embed_tokens.weight.dtype) > 2.5 * one
    )
    # the newest is kept even over budget
    assert (cache.hits, cache.misses) == (0, 3)


def test_compiled_decoding_step_gives_the_eager_tokens_at_several_batch_sizes(
    tiny_salm, speech_clips
) -> None:
    """``compile_step`` (torch.compile of the whole step) must not change a single token."""
    prompts = [[{"role": "user", "content": PROMPT, "audio": u.path}] for u in speech_clips[:3]]
    embeds, mask = tiny_salm.prepare_generation_inputs(prompts)
    parts = decoder_parts(tiny_salm)
    with torch.no_grad():
        for rows in (2, 3):  # the second shape takes the dynamic-shape code path
            tokens = []
            for compile_step in (False, True):
                decoder = GreedyDecoder(*parts, rows, 128, 10, False, compile_step)
                decoder.prefill(embeds[:rows], mask[:rows], tiny_salm.text_eos_id, tiny_salm.text_pad_id)
                tokens.append(decoder.decode())
            assert torch.equal(tokens[0], tokens[1])


def test_greedy_decoding_attends_on_the_kv_heads_and_restores_the_llm_attention(
    tiny_salm, speech_clips, monkeypatch
) -> None:
    """The decoder runs ``sdpa_on_kv_heads`` (no per-group copy of the cache); training keeps its own."""
    from transformers import AttentionInterface

    from salm.model.decoding import KV_HEAD_ATTENTION, sdpa_on_kv_heads

    calls = []

    def counting(module, query, key, value, *args, **kwargs):
        calls.append((query.shape[1], key.shape[1]))
        return sdpa_on_kv_heads(module, query, key, value, *args, **kwargs)

    monkeypatch.setitem(AttentionInterface._global_mapping, KV_HEAD_ATTENTION, counting)
    config = base_causal_lm(tiny_salm.llm).model.config
    before = config._attn_implementation
    embeds, mask = tiny_salm.prepare_generation_inputs(
        [[{"role": "user", "content": PROMPT, "audio": speech_clips[0].path}]]
    )
    tiny_salm._greedy_decode(embeds, mask, max_new_tokens=4)
    layers = config.num_hidden_layers
    assert len(calls) == 4 * layers  # prefill + 3 steps, every layer
    assert calls[0] == (config.num_attention_heads, config.num_key_value_heads)  # cache not repeated
    assert config._attn_implementation == before


def test_attention_reads_only_the_slots_in_use_and_the_tokens_stay_those_of_generate(
    tiny_salm, monkeypatch
) -> None:
    """The prefill attends to the prompt (rounded up to 16 slots), each step to the written slots
    rounded up to 64: a prompt of 44 positions and 24 new tokens has a cache of 128 slots, and its
    steps cross from 64 to 128."""
    from transformers import AttentionInterface

    from salm.model.decoding import CACHE_LENGTH_QUANTUM, KV_HEAD_ATTENTION, sdpa_on_kv_heads

    slots_read = []

    def counting(module, query, key, value, *args, **kwargs):
        if module.layer_idx == 0:
            slots_read.append(key.shape[2])
        return sdpa_on_kv_heads(module, query, key, value, *args, **kwargs)

    monkeypatch.setitem(AttentionInterface._global_mapping, KV_HEAD_ATTENTION, counting)
    hidden = tiny_salm.embed_tokens.weight.shape[1]
    generator = torch.Generator().manual_seed(3)
    embeds = torch.randn(2, 44, hidden, generator=generator)
    mask = torch.ones(2, 44, dtype=torch.long)
    mask[1, :5] = 0  # a left-padded prompt
    ours = tiny_salm._greedy_decode(embeds, mask, max_new_tokens=24)
    assert CACHE_LENGTH_QUANTUM == 64
    # prefill (44 -> 48), then 23 steps writing slots 44..66: up to 64 written -> 64 slots; then 128
    assert slots_read == [48] + [64] * 20 + [128] * 3
    theirs = transformers_greedy_tokens(tiny_salm, embeds, mask, max_new_tokens=24)
    assert torch.equal(ours, theirs[:, : ours.shape[1]])


def test_compiled_step_compiles_once_for_every_batch_size_and_cache_length(tiny_salm) -> None:
    """One compile serves a single prompt, larger batches and every cache length.

    On an H200 each compile of the step takes 1.5-2.5 min. A batch of one used to compile apart
    (torch.compile specialises size 1), and a cache length equal to another size (here head_dim, 16:
    a Serve replica warmed up on 1 s clips has cache length 128 = Qwen3's head_dim) was baked in,
    which cost a replica 119 s of recompiling on its first batches of real clips.
    """
    parts = decoder_parts(tiny_salm)
    head_dim = parts[0].config.head_dim
    hidden = tiny_salm.embed_tokens.weight.shape[1]

    def prefill_and_decode(batch: int, max_len: int, length: int = 6) -> None:
        decoder = GreedyDecoder(*parts, padded_batch_size(batch, compile_step=True), max_len, 4, False, True)
        decoder.prefill(torch.randn(batch, length, hidden), torch.ones(batch, length, dtype=torch.long), 0, 0)
        decoder.decode()

    # the last: steps attending to 64 of 128 slots, then to all (``attended_slots``)
    shapes = ((1, head_dim), (2, head_dim), (3, 2 * head_dim), (5, 3 * head_dim), (3, 128, 62))
    new_graphs = graphs_compiled_by_each([lambda s=shape: prefill_and_decode(*s) for shape in shapes])
    assert padded_batch_size(1, compile_step=True) == 2
    assert new_graphs == [1, 0, 0, 0, 0]


def test_compiled_prefill_gives_the_eager_tokens_for_one_prompt_and_several(tiny_salm, speech_clips) -> None:
    """The prefill through ``compiled_prefill`` must not change a token, also for a single prompt,
    which runs as two rows (a copy) in a decoder that has them."""
    prompts = [[{"role": "user", "content": PROMPT, "audio": u.path}] for u in speech_clips[:3]]
    embeds, mask = tiny_salm.prepare_generation_inputs(prompts)
    parts = decoder_parts(tiny_salm)
    with torch.no_grad():
        for batch, rows in ((1, 2), (3, 4)):
            tokens = []
            for compiled in (False, True):
                decoder = GreedyDecoder(*parts, rows, 128, 10, False)
                decoder.cache.keys[0].normal_()  # stale contents of an earlier batch must not leak in
                eos, pad = tiny_salm.text_eos_id, tiny_salm.text_pad_id
                decoder.prefill(embeds[:batch], mask[:batch], eos, pad, compiled=compiled)
                tokens.append(decoder.decode())
            assert torch.equal(tokens[0], tokens[1])
            assert (tokens[1][batch:] == tiny_salm.text_pad_id).all()  # the copy and the padding rows


def test_compiled_prefill_compiles_once_for_every_batch_size_prompt_and_cache_length(tiny_salm) -> None:
    """A recompile in a server costs a request minutes: a single prompt, any batch, any prompt
    length and any cache length (also one equal to another size) must share the first graph."""
    parts = decoder_parts(tiny_salm)
    head_dim = parts[0].config.head_dim
    hidden = tiny_salm.embed_tokens.weight.shape[1]

    def prefill(batch: int, length: int, max_len: int) -> None:
        decoder = GreedyDecoder(*parts, padded_batch_size(batch, compile_step=True), max_len, 4, False)
        mask = torch.ones(batch, length, dtype=torch.long)
        mask[0, :2] = 0  # a left-padded prompt
        decoder.prefill(torch.randn(batch, length, hidden), mask, 0, 0, compiled=True)

    shapes = ((1, 6, head_dim), (2, 9, head_dim), (3, 3, 2 * head_dim), (5, 5, 48))
    new_graphs = graphs_compiled_by_each([lambda s=shape: prefill(*s) for shape in shapes])
    assert new_graphs == [1, 0, 0, 0]


def test_generate_with_compile_prefill_gives_the_eager_transcripts_and_falls_back_once_on_failure(
    tiny_salm, speech_clips, monkeypatch
) -> None:
    import copy

    from salm.model import decoding

    model = copy.deepcopy(tiny_salm)  # the test turns its switch on and off
    prompts = [[{"role": "user", "content": PROMPT, "audio": u.path}] for u in speech_clips[:2]]
    expected = model.generate(prompts, max_new_tokens=8).token_ids
    model.compile_prefill = True
    assert model.generate(prompts, max_new_tokens=8).token_ids == expected

    def no_compiler():
        raise RuntimeError("no C compiler")

    monkeypatch.setattr(decoding, "compiled_prefill", no_compiler)
    with pytest.warns(UserWarning, match="compiling the prefill failed .*no C compiler.*prefilling eagerly"):
        assert model.generate(prompts, max_new_tokens=8).token_ids == expected
    assert model.compile_prefill is False  # given up once, not retried per call

    # the replica's start (salm.inference_compile) sees the same fall-back and reports it
    from salm.inference_compile import compile_prefill_now

    with pytest.warns(UserWarning, match="compiling the prefill failed"):
        assert compile_prefill_now(model, max_new_tokens=4) == "the model's warning above says why"
    assert model.compile_prefill is False


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled, captured decoding step is GPU-only")
def test_a_failing_step_compile_turns_compiling_off_and_keeps_the_tokens(
    tiny_model_cfg, tmp_path, monkeypatch
) -> None:
    """A compile that fails (e.g. no C compiler for Triton) is given up once, not retried per call."""
    import warnings

    from salm.assets.synthetic_speech import make_sentences, synthesize_corpus
    from salm.model import SALM, decoding

    model = SALM(tiny_model_cfg).to("cuda").eval()  # its own: the test turns its compiling off
    # flite voices only: the GPU machine has flite (bench/device_setup.sh) but not espeak-ng.
    clips = synthesize_corpus(tmp_path, make_sentences(3, seed=1), ["kal16", "slt", "rms"])
    prompts = [[{"role": "user", "content": PROMPT, "audio": u.path}] for u in clips]
    expected = model.generate(prompts, max_new_tokens=8).token_ids

    def no_compiler():
        def step(*decoder_cache_mask) -> None:  # called as compiled_step()(decoder, cache, mask)
            raise RuntimeError("Failed to find C compiler. Please specify via CC environment variable.")

        return step

    monkeypatch.setattr(decoding, "compiled_step", no_compiler)
    model.compile_decoding = True
    with pytest.warns(UserWarning, match="compiling the decoding step failed.*C compiler"):
        first = model.generate(prompts, max_new_tokens=8).token_ids
    assert model.compile_decoding is False
    assert first == expected
    with warnings.catch_warnings(record=True) as later:
        warnings.simplefilter("always")
        assert model.generate(prompts, max_new_tokens=8).token_ids == expected
    assert not [w for w in later if "compiling" in str(w.message)]  # not attempted again


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs are GPU-only")
@pytest.mark.parametrize("compile_step", [False, True])
def test_captured_steps_across_attended_windows_give_the_eager_tokens(
    tiny_model_cfg, compile_step, monkeypatch
) -> None:
    """One graph per attended window (64, then 128 slots here), all captured before the first step,
    sharing one memory pool: the tokens must be those of the uncaptured, unwindowed eager steps."""
    from salm.model import SALM, decoding

    model = SALM(tiny_model_cfg).to("cuda").eval()
    parts = decoder_parts(model)
    generator = torch.Generator(device="cuda").manual_seed(5)
    embeds = torch.randn(3, 44, model.embed_tokens.weight.shape[1], device="cuda", generator=generator)
    mask = torch.ones(3, 44, dtype=torch.long, device="cuda")
    mask[1, :5] = 0
    no_eos = -1  # every row decodes all 40 tokens, across the window boundary
    with torch.no_grad():
        eager = GreedyDecoder(*parts, 4, 128, 40, use_graph=False)
        with monkeypatch.context() as whole_cache:
            whole_cache.setattr(decoding, "attended_slots", lambda position, max_len: max_len)
            eager.prefill(embeds, mask, no_eos, model.text_pad_id)
            expected = eager.decode()
        captured = GreedyDecoder(*parts, 4, 128, 40, use_graph=True, compile_step=compile_step)
        captured.prefill(embeds, mask, no_eos, model.text_pad_id)
        new_graphs = graphs_compiled_by_each([captured.decode])
        tokens = captured.output[:, :40]
    assert new_graphs == [1 if compile_step else 0]  # both windows share one compile of the step
    assert sorted(captured.graphs) == [64, 128]
    assert tokens.shape == (4, 40)
    assert torch.equal(tokens[:3], expected[:3])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled prefill's CUDA lowering is GPU-only")
def test_compiled_prefill_on_the_gpu_gives_the_eager_tokens_and_compiles_once(tiny_model_cfg) -> None:
    """On CUDA the prefill's window (the prompt rounded up to 16 slots) and its mask reach SDPA's
    memory-efficient kernel, whose lowering the CPU never runs: prompts of 44 and 51 positions
    (windows of 48 and 64) must share one compile and give the eager prefill's tokens."""
    from salm.model import SALM

    model = SALM(tiny_model_cfg).to("cuda").eval()
    parts = decoder_parts(model)
    hidden = model.embed_tokens.weight.shape[1]
    generator = torch.Generator(device="cuda").manual_seed(7)

    def tokens(length: int, compiled: bool) -> torch.Tensor:
        embeds = torch.randn(3, length, hidden, device="cuda", generator=generator.manual_seed(length))
        mask = torch.ones(3, length, dtype=torch.long, device="cuda")
        mask[2, :4] = 0
        decoder = GreedyDecoder(*parts, 4, 128, 8, use_graph=False)
        decoder.prefill(embeds, mask, -1, model.text_pad_id, compiled=compiled)
        return decoder.decode()

    with torch.no_grad():
        expected = [tokens(length, compiled=False) for length in (44, 51)]
    got = []
    new_graphs = graphs_compiled_by_each(
        [lambda n=length: got.append(tokens(n, compiled=True)) for length in (44, 51)]
    )
    assert new_graphs == [1, 0]
    for ours, eager in zip(got, expected, strict=True):
        assert torch.equal(ours[:3], eager[:3])
