"""An auxiliary CTC loss on the speech encoder, for training the encoder from scratch.

Canary-Qwen-2.5B starts from a FastConformer that was already trained for ASR, and NeMo's SALM
recipe has only the LLM's cross-entropy. With a *random* encoder that loss alone does not find the
audio: the LLM learns the text prior and the encoder gets almost no signal. Measured on the
quickstart grammar (tiny SALM, 300 flite utterances, 600 steps on CPU): held-out WER 82% without
this loss, which is what a text-only model gets (feeding silence gives the same training loss), and
32% with it at weight 0.5 (28% with a softmax over the full vocabulary, at 2.3x the step time).

The head is a linear layer from the encoder's output (before the projection into the LLM) to the
LLM's vocabulary plus a blank, so the targets are the transcript's own LLM tokens. It lives in the
training wrapper, not in ``SALM``: exported models (HF layout, ``.nemo``) stay exactly NeMo's SALM.
DeepSpeed checkpoints keep it (exact resume); resuming at another world size starts it afresh.
"""

from __future__ import annotations

import torch
from torch import nn

from salm.model.salm import SALM


class EncoderCTC(nn.Module):
    """CTC of the encoder output against the transcript tokens; ``weight`` x this is added to the loss."""

    def __init__(self, salm: SALM, weight: float) -> None:
        super().__init__()
        self.weight = weight
        self.tokenizer = salm.tokenizer
        self.blank_id = len(salm.tokenizer)
        self.head = nn.Linear(salm.perception.proj.in_features, self.blank_id + 1)
        self._encoded: tuple[torch.Tensor, torch.Tensor] | None = None
        # The encoder states are an intermediate of SALM's own forward: capture them there
        # instead of running the encoder twice.
        salm.perception.modality_adapter.register_forward_hook(self._capture)

    def _capture(self, module: nn.Module, inputs: tuple, output: tuple[torch.Tensor, torch.Tensor]) -> None:
        self._encoded = output  # (B, D, T) states, (B,) lengths

    def forward(self, texts: list[str]) -> torch.Tensor:
        """Mean CTC loss per utterance (normalised by target length) for the last encoder forward.

        The softmax runs over the batch's own target tokens plus blank (a sampled softmax), not
        the LLM's whole ~152k vocabulary: the signal the encoder needs is which of the spoken
        tokens sits where, and the full softmax made the tiny recipe's CPU step 2.3x slower.
        """
        if self._encoded is None:
            raise RuntimeError("EncoderCTC needs the SALM forward to run first (it reads the encoder output)")
        encoded, lengths = self._encoded
        self._encoded = None
        targets = [self.tokenizer.encode(text, add_special_tokens=False) for text in texts]
        flat = torch.tensor([i for t in targets for i in t], dtype=torch.long, device=encoded.device)
        vocab, flat_in_vocab = torch.unique(flat, return_inverse=True)  # batch tokens -> 0..K-1
        rows = torch.cat([vocab, vocab.new_tensor([self.blank_id])])  # blank is the last class, K
        logits = nn.functional.linear(encoded.transpose(1, 2), self.head.weight[rows], self.head.bias[rows])
        return nn.functional.ctc_loss(
            logits.float().log_softmax(dim=-1).transpose(0, 1),  # (T, B, K+1)
            flat_in_vocab,
            lengths.long(),
            torch.tensor([len(t) for t in targets], dtype=torch.long, device=encoded.device),
            blank=len(vocab),
            reduction="mean",
            zero_infinity=True,  # an utterance with more tokens than frames adds nothing, not inf
        )
