"""The training benchmarks' batches: bucketed, 5-40 s of noise with ~30-120 target tokens each.

Their own module, free of Ray and DeepSpeed, so that a GPU check without those can build exactly
the batches ``bench/train_throughput.py`` times (same ``budget_s`` and ``seed``, same batches).
"""

from __future__ import annotations

import torch

from bench.common import PROMPT

BUCKETS = [(5.0, 10.0), (10.0, 15.0), (15.0, 20.0), (20.0, 30.0), (30.0, 40.0)]  # audio seconds
SAMPLE_RATE = 16000


def make_batches(model, budget_s: float, seed: int, tiny: bool) -> list[dict]:
    """One batch per duration bucket, ``floor(budget_s / bucket max)`` clips each, like NeMo's bucketing.

    Targets get 30 + 90 * (duration - 5) / 35 tokens (+-10%): random ids spliced into the real
    chat template where the answer goes, so prompt markup and loss mask are the real ones.
    """
    generator = torch.Generator().manual_seed(seed)
    marker = model.tokenizer.encode(" hello", add_special_tokens=False)
    assert len(marker) == 1, marker
    encoded = model.prompt_format.encode_dialog(
        [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": " hello"}]
    )
    at = int((encoded.input_ids == marker[0]).nonzero()[-1])
    buckets = [(1.0, 2.0), (2.0, 3.0)] if tiny else BUCKETS
    batches = []
    for low, high in buckets:
        size = max(1, int(budget_s // high))
        durations = low + (high - low) * torch.rand(size, generator=generator)
        ids, masks, audios = [], [], []
        for duration in durations.tolist():
            count = int(
                (30 + 90 * (duration - 5) / 35) * (0.9 + 0.2 * torch.rand(1, generator=generator).item())
            )
            answer = torch.randint(1000, 30000, (max(count, 5),), generator=generator)
            ids.append(torch.cat([encoded.input_ids[:at], answer, encoded.input_ids[at + 1 :]]))
            masks.append(
                torch.cat(
                    [
                        encoded.loss_mask[:at],
                        torch.ones(len(answer), dtype=torch.bool),
                        encoded.loss_mask[at + 1 :],
                    ]
                )
            )
            audios.append(0.1 * torch.randn(int(duration * SAMPLE_RATE), generator=generator))
        pad = model.text_pad_id
        batches.append(
            {
                "audios": torch.nn.utils.rnn.pad_sequence(audios, batch_first=True),
                "audio_lens": torch.tensor([len(a) for a in audios]),
                "input_ids": torch.nn.utils.rnn.pad_sequence(
                    ids, batch_first=True, padding_value=pad, padding_side="left"
                ),
                "loss_mask": torch.nn.utils.rnn.pad_sequence(
                    masks, batch_first=True, padding_value=False, padding_side="left"
                ),
            }
        )
    return batches


def build_tokenizer_model(cfg):
    """Tokenizer + prompt format only (batches need them, not the weights)."""
    from salm.text.prompt_formats import get_prompt_format
    from salm.text.tokenizer import load_tokenizer, padding_id

    class Text:
        tokenizer = load_tokenizer(cfg.model.pretrained_llm, cfg.model.audio_locator_tag)
        prompt_format = get_prompt_format(cfg.model.prompt_format, tokenizer)
        text_pad_id = padding_id(tokenizer)

    return Text
