"""Next-token log-probabilities of labelled tokens, the one way every objective scores a reply.

Labels are aligned with the tokens (`labels[t]` is `tokens[t]` where it is trained, else -100), as
`data.chat` writes them; the logits at position t predict token t + 1. The model's fused output
projection + cross-entropy (`forward(targets=...)`) is used, so the (B, T, vocab) logits never
exist, and wrappers (DDP, FSDP, LoRA, compile) still see an ordinary forward call.
"""

from __future__ import annotations

import torch

from ..data.chat import IGNORE_INDEX


def next_token_targets(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) labels aligned with the tokens -> the targets of each position (B, T): labels shifted
    left by one, -100 at the last position (it predicts nothing)."""
    return torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), IGNORE_INDEX)], dim=1)


def token_logprobs(model: torch.nn.Module, tokens: torch.Tensor, labels: torch.Tensor,
                   doc_ids: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T) float32: at position t, log p(labels[t + 1] | tokens[:t + 1]); 0 where that label is
    -100 (and at the last position)."""
    targets = next_token_targets(labels)
    nll = model(tokens, doc_ids=doc_ids, targets=targets, ignore_index=IGNORE_INDEX, reduction="none")
    return -nll


def sequence_logprobs(model: torch.nn.Module, tokens: torch.Tensor, labels: torch.Tensor,
                      doc_ids: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) summed log-probabilities of each row's labelled tokens."""
    return token_logprobs(model, tokens, labels, doc_ids).sum(-1)
