"""Greedy decoding with a static KV cache; on CUDA the one-token step replays as a CUDA graph.

Why not ``transformers.generate``: for a 28-layer LLM each new token is ~1000 small kernel
launches plus logits processors, stopping criteria and a host-device sync, so at any batch size
the GPU mostly waits for Python (NeMo's ``generate`` barely gets faster from batch 16 to 128).
Here every buffer a step touches (KV cache, attention mask, positions, the token being fed) is
allocated once, so the whole step -- embed, 28 layers, LM head on the last position, argmax,
bookkeeping -- is captured once and replayed with one launch per token. The host looks at the
tokens only every ``EOS_CHECK_EVERY`` steps to stop early.

Attention reads only the cache slots in use: a step attends to the first ``attended_slots`` slots
(the written ones, rounded up to ``CACHE_LENGTH_QUANTUM``), one captured graph per such window, and
the prefill to the prompt's. The cache is sized for ``max_new_tokens`` (128 by default, served and
``salm eval``), while a 10 s clip's transcript ends after ~40: over the whole cache every step read
1.7x the keys and values in use, and the prefill attended to 2.3x the keys.

A server sees a different batch size in almost every call, and capturing a new graph (with a new
KV cache) costs more than decoding a batch. So batches are padded up to a few sizes
(``padded_batch_size``) and the captured decoders are kept per size in ``DecoderCache``.

The cache is our own minimal class rather than ``transformers.StaticCache``: the LLM calls only
``cache.update(key, value, layer_idx, ...)``, and that call has kept its shape across transformers
releases while ``StaticCache``'s constructor and bookkeeping have not. We pass the 4-D attention
mask ourselves (``{"full_attention": mask}``), so no mask-building code with host syncs runs.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import time
from collections import OrderedDict

import torch
import torch.fx.experimental._config as fx_config
from torch import nn
from transformers import AttentionInterface

from salm.model.llm import attention_implementation

EOS_CHECK_EVERY = 8  # decoding steps between host checks for "every row has finished"
CACHE_LENGTH_QUANTUM = 64  # cache lengths and attended windows are rounded up to this (graph reuse)
# SDPA's memory-efficient kernel (the fused one that takes a mask) wants every stride of the mask but
# the last to be a multiple of 16 elements; it copies a mask that is not, at every layer of every step.
MASK_ALIGNMENT = 16
# Cache and mask slots allocated past ``max_len``, never written or attended: every window a step reads,
# the whole cache included, is then a strided view of a longer tensor with aligned rows. A compiled
# step first traced on a window that was the whole (contiguous) tensor guarded on that, and
# recompiled for the others.
SPARE_SLOTS = MASK_ALIGNMENT
MAX_CACHED_DECODERS = 64  # captured decoders kept (each holds a KV cache for its batch and length)
# Their KV caches together, as a share of the GPU's memory (the newest is kept whatever its size). A
# server at 256 clients meets ~14 batch sizes x 2-3 cache lengths: a fixed 8 GiB held one 256-row
# decoder (7.5 GB) and recaptured 56 times in 2048 requests; a quarter of an H200 holds them all.
DECODER_CACHE_MEMORY_SHARE = 0.25


KV_HEAD_ATTENTION = "salm_sdpa_on_kv_heads"  # the attention the greedy decoder runs (registered below)


def sdpa_on_kv_heads(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """SDPA on the cached key/value heads as they are (``enable_gqa``), with the decoder's 4-D mask.

    transformers' ``sdpa`` copies the keys and values once per query group whenever a mask is given
    (``repeat_kv``; its ``pack_gqa`` avoids that only for one query outside ``torch.compile``),
    because older torch fell back to the math kernel for grouped heads with a mask. Current torch's
    fused kernels take both: decoding attention of 256 rows over 256 slots went 121 -> 71 us per
    layer on an H200, and the prefill no longer copies the cache per layer (BENCHMARKS.md).
    """
    output = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, enable_gqa=True
    )
    return output.transpose(1, 2).contiguous(), None


AttentionInterface.register(KV_HEAD_ATTENTION, sdpa_on_kv_heads)


def attention_on_kv_heads(config) -> contextlib.AbstractContextManager[None]:
    """The LLM runs ``sdpa_on_kv_heads`` inside (the greedy decoder always passes a mask); training
    and ``transformers.generate`` keep the configured attention."""
    return attention_implementation(config, KV_HEAD_ATTENTION)


def padded_batch_size(batch: int, compile_step: bool = False) -> int:
    """The batch size a captured decoder is built for: 1, 2, 4, 8, then 12, 16, 24, 32, 48, 64, ...

    Steps of 1.5x-2x keep the padding under a third of the batch while a server's ever-changing
    batch sizes reuse a handful of graphs. Only the decoding steps carry the padded rows, and they
    are bound by reading the weights, so those rows cost little; the prefill skips them.

    With ``compile_step`` a single prompt gets 2 rows too: ``torch.compile`` specialises a size of 1,
    so a batch of one would compile the whole step a second time (1.5-2.5 min on an H200, once per
    process) to save one row that costs nothing.
    """
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    power = 1 << (batch - 1).bit_length()
    rows = power * 3 // 4 if batch > 8 and batch <= power * 3 // 4 else power
    return max(rows, 2) if compile_step else rows


def cache_length(prompt_len: int, max_new_tokens: int) -> int:
    """The KV cache length a decoder is built for: the prompt plus the new tokens, rounded up to a
    multiple of ``CACHE_LENGTH_QUANTUM``, so that calls of similar lengths share a captured decoder."""
    return round_up(prompt_len + max_new_tokens, CACHE_LENGTH_QUANTUM)


def attended_slots(position: int, max_len: int) -> int:
    """The cache slots a step that writes slot ``position`` attends to: the written ones (``position +
    1``) rounded up to a multiple of ``CACHE_LENGTH_QUANTUM``, at most ``max_len``. Slots past the
    written ones inside the window are masked."""
    return min(max_len, round_up(position + 1, CACHE_LENGTH_QUANTUM))


def round_up(count: int, multiple: int) -> int:
    """``count`` rounded up to a multiple of ``multiple``."""
    return -(-count // multiple) * multiple


def kv_shape(config, batch: int, max_len: int) -> tuple[int, int, int, int]:
    """One layer's key (or value) cache: ``(batch, kv_heads, max_len, head_dim)``."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return (batch, config.num_key_value_heads, max_len, head_dim)


class StaticKVCache:
    """Per-layer key/value tensors ``(B, kv_heads, max_len, head_dim)`` written at ``position``."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], position: torch.Tensor) -> None:
        self.keys, self.values, self.position = keys, values, position  # position: first slot written next

    @classmethod
    def allocate(
        cls, config, batch: int, max_len: int, dtype: torch.dtype, device: torch.device
    ) -> StaticKVCache:
        shape = kv_shape(config, batch, max_len)
        layers = range(config.num_hidden_layers)
        return cls(
            [torch.zeros(shape, dtype=dtype, device=device) for _ in layers],
            [torch.zeros(shape, dtype=dtype, device=device) for _ in layers],
            torch.zeros(1, dtype=torch.long, device=device),
        )

    def first_rows(self, rows: int) -> StaticKVCache:
        """The first ``rows`` rows of every layer (views, and the same ``position``): what a prefill
        of fewer prompts than the decoder's batch writes into."""
        return StaticKVCache([k[:rows] for k in self.keys], [v[:rows] for v in self.values], self.position)

    def first_slots(self, slots: int) -> StaticKVCache:
        """The first ``slots`` slots of every layer (views, and the same ``position``): all a step that
        attends to no later slot reads and writes."""
        keys = [k[:, :, :slots] for k in self.keys]
        return StaticKVCache(keys, [v[:, :, :slots] for v in self.values], self.position)

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        slots = self.position + torch.arange(key.shape[-2], device=key.device)
        self.keys[layer_idx].index_copy_(2, slots, key)
        self.values[layer_idx].index_copy_(2, slots, value)
        return self.keys[layer_idx], self.values[layer_idx]

    def get_seq_length(self, layer_idx: int = 0) -> torch.Tensor:
        return self.position

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)


class GreedyDecoder:
    """Buffers (and on CUDA the captured step) for one batch size and cache length.

    ``decoder`` is the transformer body (``Qwen3Model``; PEFT's LoRA layers live inside it),
    ``lm_head`` and ``embed_tokens`` its head and (tied) input embedding.
    """

    def __init__(
        self,
        decoder: nn.Module,
        lm_head: nn.Module,
        embed_tokens: nn.Embedding,
        batch: int,
        max_len: int,
        max_new_tokens: int,
        use_graph: bool,
        compile_step: bool = False,
    ) -> None:
        weight = embed_tokens.weight
        self.decoder, self.lm_head, self.embed_tokens = decoder, lm_head, embed_tokens
        self.batch, self.max_len, self.max_new_tokens = batch, max_len, max_new_tokens
        slots = max_len + SPARE_SLOTS
        self.cache = StaticKVCache.allocate(decoder.config, batch, slots, weight.dtype, weight.device)
        device = weight.device
        self.blocked = torch.finfo(weight.dtype).min
        self.mask = torch.full((batch, 1, 1, slots), self.blocked, dtype=weight.dtype, device=device)
        self.positions = torch.zeros(
            batch, 1, dtype=torch.long, device=device
        )  # RoPE position of the fed token
        self.token = torch.zeros(batch, dtype=torch.long, device=device)  # the token fed to the next step
        self.finished = torch.zeros(batch, dtype=torch.bool, device=device)
        self.step_index = torch.zeros(1, dtype=torch.long, device=device)
        self.output = torch.zeros(batch, max_new_tokens, dtype=torch.long, device=device)
        self.eos_id = torch.zeros((), dtype=torch.long, device=device)
        self.pad_id = torch.zeros((), dtype=torch.long, device=device)
        params = inspect.signature(decoder.forward).parameters
        # transformers >= 5.2x calls the cache argument ``cache``; earlier releases ``past_key_values``.
        self.cache_arg = "cache" if "cache" in params else "past_key_values"
        self.pass_cache_position = "cache_position" in params
        self.use_graph = use_graph
        self.compile_step = compile_step
        self.prompt_length = 0  # the last prefill's prompt length: the slot its first step writes
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}  # captured steps by attended slots
        self._windows: dict[int, tuple[StaticKVCache, torch.Tensor]] = {}
        self.capture_s = 0.0  # host seconds ``capture`` took (a server pays them inside a request)

    def _forward(
        self, embeds: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: StaticKVCache
    ) -> torch.Tensor:
        kwargs = {self.cache_arg: cache}
        if self.pass_cache_position:
            kwargs["cache_position"] = cache.position + torch.arange(embeds.shape[1], device=embeds.device)
        return self.decoder(
            inputs_embeds=embeds,
            attention_mask={"full_attention": mask},
            position_ids=positions,
            use_cache=True,
            **kwargs,
        ).last_hidden_state

    def _emit(self, hidden_last: torch.Tensor) -> None:
        """Argmax of the last position -> output column ``step_index``; rows past EOS emit padding."""
        next_token = self.lm_head(hidden_last).argmax(dim=-1)  # (B,)
        next_token = torch.where(self.finished, self.pad_id, next_token)
        self.finished |= next_token == self.eos_id
        self.output.index_copy_(1, self.step_index, next_token.unsqueeze(1))
        self.token.copy_(next_token)
        self.step_index += 1

    def prefill(
        self,
        embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        eos_id: int,
        pad_id: int,
        compiled: bool = False,
    ) -> None:
        """Run the prompts ``(B, T, H)`` (left-padded, ``attention_mask`` (B, T)) and emit the first token.

        ``B`` may be smaller than the decoder's batch (a server's batch padded up to a captured
        size): the prefill runs on the ``B`` real rows only, since it costs in proportion to its
        rows, and the padding rows start finished, so they emit ``pad_id`` and never hold up the
        early stop. ``compiled`` runs the LLM through ``compiled_prefill``; a single prompt then
        runs as two rows (a copy of it) when the decoder has them, so that it shares the compiled
        graph of every other batch size.
        """
        batch, length, _ = embeds.shape
        if batch > self.batch:
            raise ValueError(f"{batch} prompts do not fit a decoder for {self.batch}")
        real = batch
        if compiled and batch == 1 and self.batch > 1:
            embeds, attention_mask, batch = embeds.repeat(2, 1, 1), attention_mask.repeat(2, 1), 2
        if compiled:  # Dynamo guards on strides: a view of other strides would compile again
            embeds = embeds.contiguous()
        self.eos_id.fill_(eos_id)
        self.pad_id.fill_(pad_id)
        self.finished.zero_()
        self.finished[real:] = True
        self.step_index.zero_()
        self.cache.position.zero_()
        valid = attention_mask.bool()
        self.mask.fill_(self.blocked)
        self.mask[:batch, 0, 0, :length].masked_fill_(valid, 0.0)
        # The prompt attends to itself only: its slots, rounded up to aligned mask rows (the rest masked).
        slots = round_up(length, MASK_ALIGNMENT)
        causal = torch.ones(length, length, dtype=torch.bool, device=embeds.device).tril()
        prompt_mask = torch.full(
            (batch, 1, length, slots), self.blocked, dtype=embeds.dtype, device=embeds.device
        )
        prompt_mask[..., :length].masked_fill_(causal & valid[:, None, None, :], 0.0)
        positions = (valid.long().cumsum(dim=1) - 1).clamp(min=0)  # (B, T): left padding shifts positions
        cache = self.cache.first_rows(batch).first_slots(slots)
        if compiled:
            with torch.compiler.set_stance("default"), fx_config.patch(use_duck_shape=False):
                hidden = compiled_prefill()(self, embeds, prompt_mask, positions, cache)
        else:
            hidden = self._forward(embeds, prompt_mask, positions, cache)
        self.cache.position.fill_(length)
        self.prompt_length = length
        self.positions.zero_()
        self.positions[:batch].copy_(positions[:, -1:])
        last = hidden.new_zeros(self.batch, hidden.shape[-1])
        last[:batch] = hidden[:, -1]
        self._emit(last)

    def step(self, slots: int) -> None:
        """Feed ``token`` at slot ``cache.position`` (below ``slots``), attending to the first ``slots``
        slots; emit the next token. No host syncs."""
        cache, mask = self._window(slots)
        # Admit the slot this step writes. Outside the compiled step: written inside it, the mask view
        # broke AOTAutograd's functionalisation on CUDA (torch 2.11: "n=copy_, n.args[0]=empty").
        mask.index_fill_(-1, cache.position, 0.0)
        if self.compile_step:
            # generate() holds the LLM eager otherwise. Without duck sizing, a cache length that
            # happens to equal another size (128 = Qwen3's head_dim: a warm-up on 1 s clips) is not
            # assumed equal to it, which cost a ~2-minute recompile on the first real batch.
            with torch.compiler.set_stance("default"), fx_config.patch(use_duck_shape=False):
                compiled_step()(self, cache, mask)
        else:
            self._eager_step(cache, mask)

    def _window(self, slots: int) -> tuple[StaticKVCache, torch.Tensor]:
        """The cache and mask views of the first ``slots`` slots, made once (a captured graph keeps
        reading the tensors it was recorded with)."""
        if slots not in self._windows:
            self._windows[slots] = (self.cache.first_slots(slots), self.mask[..., :slots])
        return self._windows[slots]

    def _eager_step(self, cache: StaticKVCache, mask: torch.Tensor) -> None:
        """The step after ``step`` admitted slot ``cache.position`` in ``mask``."""
        self.positions += 1
        embeds = self.embed_tokens(self.token).unsqueeze(1)  # (B, 1, H)
        hidden = self._forward(embeds, mask, self.positions, cache)
        cache.position += 1
        self._emit(hidden[:, -1])

    def capture(self, slots: int, position: int) -> None:
        """Record ``step(slots)`` as a CUDA graph, with the decoder about to write slot ``position``
        (below ``slots``; the warm-up steps must not write past the window). Restores the state it
        warmed up on. The graphs of one decoder share a memory pool: they only ever run one after
        another, and none leaves a tensor behind in it (every step writes into the decoder's buffers)."""
        started = time.perf_counter()
        saved = [t.clone() for t in self._state()]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            # warm-up outside capture (cuBLAS workspaces, lazy inits), never writing past the window
            for _ in range(min(2, slots - position)):
                self.step(slots)
        torch.cuda.current_stream().wait_stream(stream)
        for tensor, value in zip(self._state(), saved, strict=True):
            tensor.copy_(value)
        graph = torch.cuda.CUDAGraph()
        pool = next(iter(self.graphs.values())).pool() if self.graphs else None
        with torch.cuda.graph(graph, pool=pool):
            self.step(slots)
        for tensor, value in zip(self._state(), saved, strict=True):  # capture ran nothing, but be exact
            tensor.copy_(value)
        torch.cuda.current_stream().synchronize()
        self.graphs[slots] = graph
        self.capture_s += time.perf_counter() - started

    def _state(self) -> list[torch.Tensor]:
        return [
            self.mask,
            self.positions,
            self.token,
            self.finished,
            self.step_index,
            self.output,
            self.cache.position,
        ]

    def decode(self) -> torch.Tensor:
        """Remaining steps after ``prefill``; returns ``(B, max_new_tokens)`` ids, padding after EOS.

        The host knows which slot each step writes (the prompt length, then one more per step), so it
        picks each step's window (``attended_slots``) without asking the GPU. Every window this call
        could reach is captured before its first step, even if EOS comes first: a server's warm-up on
        silence (which a trained model ends at once) then leaves no capture for a request to pay."""
        emitted = 1  # prefill emitted the first token
        position = self.prompt_length  # the slot the next step writes
        if self.use_graph:
            last = position + self.max_new_tokens - 2  # the slot the last step would write
            for slots in sorted({attended_slots(p, self.max_len) for p in range(position, last + 1)}):
                if slots not in self.graphs:
                    self.capture(slots, position)
        while emitted < self.max_new_tokens:
            if emitted % EOS_CHECK_EVERY == 0 and bool(self.finished.all()):
                break
            slots = attended_slots(position, self.max_len)
            if self.use_graph:
                self.graphs[slots].replay()
            else:
                self.step(slots)
            emitted += 1
            position += 1
        return self.output[:, :emitted].clone()


@functools.cache
def compiled_step():
    """``GreedyDecoder._eager_step`` under ``torch.compile``, made once per process, shared by every decoder
    and window.

    Why: replaying a CUDA graph removes the launch cost but not the kernels themselves, and an eager
    step of a 28-layer LLM is ~65 small kernels per layer (norms, RoPE, casts, residual adds), a few
    microseconds of GPU time each whatever the batch. Compiled, they fuse. The whole step is one
    trace (the layer loop unrolled), so the layer index is a constant, not a recompile per layer;
    ``dynamic=True`` lets every batch size of 2 or more, every cache length and every attended window
    share one compile (``padded_batch_size`` never gives it a single row). The compiled step is then captured like
    the eager one.
    """
    return torch.compile(GreedyDecoder._eager_step, dynamic=True)


@functools.cache
def compiled_prefill():
    """``GreedyDecoder._forward`` over the prompts under ``torch.compile``, made once per process.

    Why: generation runs the LLM eagerly, and an eager Qwen3 layer over a whole batch of prompts
    makes many passes over memory outside its matmuls (RMSNorm in fp32 as six kernels, RoPE with
    ``cat``, SiLU and the gate product, casts, residual adds). Compiled, they fuse. As in
    ``compiled_step`` the layer loop is unrolled in one trace, so the layer index is a constant;
    ``dynamic=True`` with duck sizing off lets every batch size of 2 or more and every prompt length
    share one graph.
    """
    return torch.compile(GreedyDecoder._forward, dynamic=True)


class DecoderCache:
    """Decoders by ``(batch, max_len, max_new_tokens, use_graph, compile_step)``; the least recently used go
    first when there are ``max_entries`` or their KV caches would pass ``max_bytes`` (default:
    ``DECODER_CACHE_MEMORY_SHARE`` of the memory of the GPU the first decoder is made on).

    All are dropped when the weights move (``weight_ptrs`` changes): a captured graph reads the
    weights at the addresses it was recorded with. ``hits``/``misses`` count reuses and new
    decoders (each miss on a GPU is a new KV cache and a graph capture).
    """

    def __init__(self, max_entries: int = MAX_CACHED_DECODERS, max_bytes: int | None = None) -> None:
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self.hits = self.misses = 0
        self._entries: OrderedDict[tuple[int, int, int, bool, bool], GreedyDecoder] = OrderedDict()
        self._dropped_capture_s = 0.0  # capture seconds of decoders no longer kept
        self._weight_ptrs: tuple[int, ...] = ()

    def __len__(self) -> int:
        return len(self._entries)

    def get(
        self,
        decoder: nn.Module,
        lm_head: nn.Module,
        embed_tokens: nn.Embedding,
        batch: int,
        max_len: int,
        max_new_tokens: int,
        weight_ptrs: tuple[int, ...],
        use_graph: bool = True,
        compile_step: bool = False,
    ) -> GreedyDecoder:
        if weight_ptrs != self._weight_ptrs:
            self.clear()
            self._weight_ptrs = weight_ptrs
        key = (batch, max_len, max_new_tokens, use_graph, compile_step)
        if key in self._entries:
            self.hits += 1
            self._entries.move_to_end(key)
            return self._entries[key]
        self.misses += 1
        if self.max_bytes is None:
            self.max_bytes = memory_share(embed_tokens.weight.device, DECODER_CACHE_MEMORY_SHARE)
        needed = cache_bytes(decoder.config, batch, max_len, embed_tokens.weight.dtype)
        while self._entries and (  # free before allocating the next cache
            len(self._entries) >= self.max_entries or self.bytes() + needed > self.max_bytes
        ):
            self._drop(next(iter(self._entries)))
        entry = GreedyDecoder(
            decoder, lm_head, embed_tokens, batch, max_len, max_new_tokens, use_graph, compile_step
        )
        self._entries[key] = entry
        return entry

    def bytes(self) -> int:
        """KV cache bytes held by the kept decoders."""
        return sum(entry.cache.nbytes() for entry in self._entries.values())

    def capture_seconds(self) -> float:
        """Host seconds spent capturing every decoder made so far (kept or not)."""
        return self._dropped_capture_s + sum(entry.capture_s for entry in self._entries.values())

    def discard(self, entry: GreedyDecoder) -> None:
        for key, value in list(self._entries.items()):
            if value is entry:
                self._drop(key)

    def clear(self) -> None:
        for key in list(self._entries):
            self._drop(key)

    def _drop(self, key: tuple[int, int, int, bool, bool]) -> None:
        self._dropped_capture_s += self._entries.pop(key).capture_s


def memory_share(device: torch.device, share: float) -> int:
    """``share`` of a GPU's total memory in bytes; on other devices ``share`` of 32 GiB (they decode
    eagerly and keep no decoders, so this only bounds tests)."""
    if device.type == "cuda":
        return int(share * torch.cuda.get_device_properties(device).total_memory)
    return int(share * 32 * 2**30)


def cache_bytes(config, batch: int, max_len: int, dtype: torch.dtype) -> int:
    """Bytes of a ``GreedyDecoder``'s ``StaticKVCache`` for ``batch`` x ``max_len`` (keys and values of
    every layer, ``SPARE_SLOTS`` included)."""
    per_layer = math.prod(kv_shape(config, batch, max_len + SPARE_SLOTS)) * torch.finfo(dtype).bits // 8
    return 2 * config.num_hidden_layers * per_layer


def weight_pointers(*modules: nn.Module) -> tuple[int, ...]:
    """Addresses of every parameter: a captured graph is valid only while none was reallocated."""
    return tuple(p.data_ptr() for m in modules for p in m.parameters())
