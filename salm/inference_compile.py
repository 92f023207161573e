"""Compiling a loaded SALM for inference before its first batch, with a fall-back to the eager path.

What a Serve replica does at start (``serve/transcriber.py``, ``user_config.compile_encoder``,
``compile_decoding`` and ``compile_prefill``), what ``bench/serve_load.py --offline`` repeats to time
the same model, and what ``salm generate`` / ``salm eval --compile`` ask for. One place, so the three
set the model up alike. Three parts, each optional:

- **the encoder's Conformer layers** (``salm.model.compile``), warmed up here with 1 and 2 clips of
  silence through the path batches take (``prepare_generation_inputs``): a one-row batch gets a
  graph of its own (torch specialises sizes of 1); every larger batch and every clip length shares
  one dynamic graph, so no later batch compiles. On an H200 this took the encoder of a 256-clip
  batch from 0.243 to 0.175 s (BENCHMARKS.md, serving);
- **the greedy decoding step** (``SALM.compile_decoding``; GPU only, the CPU decodes eagerly),
  compiled with one clip of silence (its decoder has 2 rows, like every batch's, so this one
  dynamic-shape compile serves them all): 1-3 minutes on a GPU;
- **the greedy decoder's prefill** (``SALM.compile_prefill``, ``decoding.compiled_prefill``; GPU
  only), the LLM over the prompts in one dynamic-shape graph, also compiled with one clip of
  silence: 1.5-3 minutes on an H100, then +11-15% RTFx at batch 128-256 (BENCHMARKS.md, serving).

If compiling fails (e.g. an image without the C compiler Triton needs), the part runs eagerly again
and the function returns why: the same transcripts, slower. Callers say so in their own words.
"""

from __future__ import annotations

import numpy as np

from salm.model.compile import compile_layers, encoder_layers, is_compiled, uncompile_layers


def compile_encoder_now(model, prompt: str) -> str | None:
    """Compile the encoder's Conformer layers not compiled yet and run the 1- and 2-clip warm-up
    (again, if they are: milliseconds while the graphs hold, a recompile here rather than in a batch
    after an encoder layout change). Returns ``None``, or why it failed (the layers are eager again)."""
    layers = encoder_layers(model)
    if not layers:
        return None
    silence = np.zeros(model.sampling_rate, dtype=np.float32)
    turn = [{"role": "user", "content": prompt, "audio": silence}]
    try:
        compile_layers([layer for layer in layers if not is_compiled(layer)])
        for rows in (1, 2):
            model.prepare_generation_inputs([turn] * rows)
    except Exception as error:  # noqa: BLE001 - any compile failure leaves a working eager model
        uncompile_layers(layers)
        return f"{type(error).__name__}: {error}"
    return None


def compile_decoding_now(model, max_new_tokens: int) -> str | None:
    """Turn on the compiled greedy decoding step and compile it with one clip of silence. Returns
    ``None``, or why it failed (``compile_decoding`` is off again and decoding uses the uncompiled step)."""
    return _compile_with_silence(model, "compile_decoding", max_new_tokens)


def compile_prefill_now(model, max_new_tokens: int) -> str | None:
    """Turn on the compiled prefill and compile it with one clip of silence (a single prompt runs
    as two rows, so the graph is the one every batch size uses). Returns ``None``, or why it failed
    (``compile_prefill`` is off again and the prefill runs eagerly)."""
    return _compile_with_silence(model, "compile_prefill", max_new_tokens)


def _compile_with_silence(model, switch: str, max_new_tokens: int) -> str | None:
    """Set the model's ``switch`` and transcribe one clip of silence, which compiles what it turns
    on. The model turns the switch off again itself, with a warning, when compiling fails inside it
    (``SALM._decode_with_cache``, ``SALM._prefill``); any other failure turns it off here."""
    setattr(model, switch, True)
    silence = np.zeros(model.sampling_rate, dtype=np.float32)
    try:
        model.transcribe([silence], max_new_tokens=max_new_tokens)
    except Exception as error:  # noqa: BLE001 - any compile failure leaves a working eager model
        setattr(model, switch, False)
        return f"{type(error).__name__}: {error}"
    return None if getattr(model, switch) else "the model's warning above says why"
