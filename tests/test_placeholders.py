"""The vectorised placeholder replacement: positions, masks and targets, and equality with NeMo."""

import pytest
import torch

from salm.errors import PromptError
from salm.model.placeholders import IGNORE_INDEX, replace_placeholders

PAD, PH = 0, 99


def _embed(ids: torch.Tensor) -> torch.Tensor:
    return ids.unsqueeze(-1).float().expand(*ids.shape, 2).clone()  # value = token id, H = 2


def test_two_audios_in_one_prompt_and_left_padding() -> None:
    input_ids = torch.tensor([[PAD, PAD, 5, PH, 6, PH, 7], [8, 9, 10, PH, 11, 12, 13]])
    audio_lens = torch.tensor([2, 1, 3])  # row 0 has audios 0 and 1, row 1 has audio 2
    audio = torch.full((3, 3, 2), -1.0)
    for index, length in enumerate(audio_lens.tolist()):
        audio[index, :length] = 100.0 + index
    targets = torch.tensor([[PAD, PAD, 5, PH, 6, PH, 7], [8, 9, 10, PH, 11, 12, 13]])
    targets = targets.masked_fill(targets == PH, IGNORE_INDEX)

    embeds, out_targets, mask = replace_placeholders(
        input_ids, _embed(input_ids), audio, audio_lens, PH, PAD, targets
    )

    # row 0: 3 text + 2 + 1 frames = 6; row 1: 6 text + 3 frames = 9 -> row 0 left-padded by 3
    assert embeds.shape == (2, 9, 2)
    assert embeds[0, :, 0].tolist() == [0, 0, 0, 5, 100, 100, 6, 101, 7]
    assert embeds[1, :, 0].tolist() == [8, 9, 10, 102, 102, 102, 11, 12, 13]
    assert mask[0].tolist() == [False] * 3 + [True] * 6
    assert mask[1].all()
    assert out_targets[0].tolist() == [IGNORE_INDEX] * 3 + [5, IGNORE_INDEX, IGNORE_INDEX, 6, IGNORE_INDEX, 7]
    assert out_targets[1].tolist() == [8, 9, 10] + [IGNORE_INDEX] * 3 + [11, 12, 13]


def test_padding_frames_of_shorter_audio_never_leak_into_output() -> None:
    input_ids = torch.tensor([[PH, 5], [PH, 6]])
    audio = torch.tensor([[[1.0], [1.0], [-7.0]], [[2.0], [2.0], [2.0]]]).expand(2, 3, 1).clone()
    embeds, _, mask = replace_placeholders(
        input_ids, _embed(input_ids)[..., :1], audio, torch.tensor([2, 3]), PH, PAD
    )
    assert -7.0 not in embeds[0].flatten().tolist()
    assert mask.sum(dim=1).tolist() == [3, 4]


def test_placeholder_count_must_match_number_of_audios() -> None:
    input_ids = torch.tensor([[5, PH, PH]])
    with pytest.raises(PromptError, match="2 audio placeholders .* but 1 audios"):
        replace_placeholders(input_ids, _embed(input_ids), torch.zeros(1, 4, 2), torch.tensor([4]), PH, PAD)


def test_equals_nemo_loop_implementation_on_random_batch() -> None:
    from nemo.collections.speechlm2.models.salm import replace_placeholders_and_build_targets

    generator = torch.Generator().manual_seed(3)
    rows, audio_lens = [], []
    for _ in range(5):
        length = int(torch.randint(3, 12, (1,), generator=generator))
        row = torch.randint(1, 50, (length,), generator=generator)
        for position in torch.randperm(length, generator=generator)[
            : int(torch.randint(0, 3, (1,), generator=generator))
        ]:
            row[position] = PH
        rows.append(row)
        audio_lens += torch.randint(1, 6, (int((row == PH).sum()),), generator=generator).tolist()
    input_ids = torch.nn.utils.rnn.pad_sequence(
        rows, batch_first=True, padding_value=PAD, padding_side="left"
    )
    embeds = torch.randn(*input_ids.shape, 4, generator=generator)
    audio = torch.randn(len(audio_lens), 6, 4, generator=generator)
    lens = torch.tensor(audio_lens, dtype=torch.long)
    targets = input_ids.masked_fill(torch.rand(input_ids.shape, generator=generator) < 0.5, IGNORE_INDEX)

    ours = replace_placeholders(input_ids, embeds, audio, lens, PH, PAD, targets)
    theirs = replace_placeholders_and_build_targets(
        input_ids, embeds, PAD, PH, [a[:n] for a, n in zip(audio, audio_lens, strict=True)], targets
    )
    for mine, nemo in zip(ours, theirs, strict=True):
        assert torch.equal(mine, nemo)
