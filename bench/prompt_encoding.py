"""Host time to tokenise a batch of prompts: ``SALM.encode_prompts`` (token ids remembered per prompt
text) vs encoding every prompt's turns again, as it did before, in the same run.

A server sends the same prompt with nearly every clip; at batch 256 tokenising took 25-45 ms of a
call on the H200's host (``bench/serve_throughput.py --phases``). CPU only, tiny SALM with the real
Qwen3 tokenizer::

    python -m bench.prompt_encoding
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from bench.common import PROMPT, recipe, write_llm_dir


def mean_ms(fn, repeats: int) -> float:
    for _ in range(2):  # warm-up (and, for the cached path, the first encoding)
        fn()
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - started) / repeats * 1000


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()

    from salm.model.salm import SALM

    model = SALM(recipe(write_llm_dir(Path(tempfile.mkdtemp()) / "llm", tiny=True), tiny=True).model)
    prompts = [[{"role": "user", "content": PROMPT, "audio": torch.zeros(16000)}] for _ in range(args.batch)]
    turns = [[{"role": "user", "content": PROMPT}] for _ in range(args.batch)]
    tag = model.audio_locator_tag_id

    def encode_every_time() -> None:  # what encode_prompts did per prompt before it remembered them
        for turn in turns:
            ids = model.prompt_format.encode_dialog(turn).input_ids
            int((ids == tag).sum())

    every_time = mean_ms(encode_every_time, args.repeats)
    remembered = mean_ms(lambda: model.encode_prompts(prompts), args.repeats)
    print(
        f"{args.batch} identical prompts: encoded every time {every_time:.1f} ms, "
        f"encode_prompts {remembered:.1f} ms, ratio {every_time / remembered:.1f}x"
    )


if __name__ == "__main__":
    main()
