"""The one label convention every objective, evaluation and reader shares, and scoring by it.

`labels` are aligned with the tokens: `labels[t]` is `tokens[t]` where token t carries loss, else
IGNORE_INDEX (chat readers write them so, before any shift). `targets` are what each position
predicts: `targets[t] = labels[t + 1]`, IGNORE_INDEX at the last position and across a document
boundary. The model's fused loss (`Llama.forward(targets=...)`) takes targets; pretraining batches
are built as targets directly (packing knows the next token), chat batches as labels.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100  # a position that carries no loss (torch cross_entropy's default ignore_index)


def next_token_targets(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) labels aligned with the tokens -> (B, T) targets: shifted left by one, IGNORE_INDEX
    at the last position (it predicts nothing)."""
    return torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), IGNORE_INDEX)], dim=1)


def token_logprobs(model: torch.nn.Module, tokens: torch.Tensor, labels: torch.Tensor,
                   doc_ids: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T) float32: at position t, log p(labels[t + 1] | tokens[:t + 1]); 0 where that label is
    IGNORE_INDEX (and at the last position). The one way every objective and evaluation scores a
    reply: through the model's fused output projection + cross-entropy (`forward(targets=)`), so
    the (B, T, vocab) logits never exist and wrappers (DDP, FSDP, LoRA, compile) see a plain call."""
    nll = model(tokens, doc_ids=doc_ids, targets=next_token_targets(labels), ignore_index=IGNORE_INDEX,
                reduction="none")
    return -nll


def sequence_logprobs(model: torch.nn.Module, tokens: torch.Tensor, labels: torch.Tensor,
                      doc_ids: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) summed log-probabilities of each row's labelled tokens."""
    return token_logprobs(model, tokens, labels, doc_ids).sum(-1)
