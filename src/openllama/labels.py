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
                   doc_ids: torch.Tensor | None = None, positions: torch.Tensor | None = None,
                   attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T) float32: at position t, log p(labels[t + 1] | tokens[:t + 1]); 0 where that label is
    IGNORE_INDEX (and at the last position). The one way every objective and evaluation scores a
    reply: through the model's fused output projection + cross-entropy (`forward(targets=)`), so
    the (B, T, vocab) logits never exist and wrappers (DDP, FSDP, LoRA, compile) see a plain call.
    `positions` / `attn_mask` (see `SharedPrompts`) replace the plain causal layout."""
    extra = {} if positions is None else {"positions": positions, "attn_mask": attn_mask}
    nll = model(tokens, doc_ids=doc_ids, targets=next_token_targets(labels), ignore_index=IGNORE_INDEX,
                reduction="none", **extra)
    return -nll


class SharedPrompts:
    """Completions of the same prompt scored in one row, the prompt computed once.

    Row r holds prompt r but its last token once (positions 0..P-2), then one branch per
    completion: the prompt's last token again and the completion (positions P-1..). A branch
    attends to the shared prompt and causally to itself, never to another branch, so every
    completion token's log-prob is the one a row [prompt + completion] of its own gives; the
    prompt's activations take the gradients of all its completions, as they would summed over
    separate rows. Repeating the last prompt token is what lets each branch predict its own first
    token. GRPO's 8 samples of a ~20-token prompt with ~6-token answers: 8 x 26 = 208 tokens as
    separate rows, 19 + 8 x 7 = 75 here. The price is a dense mask and attention over the whole
    row: with long completions (8 x 256 after a 20-token prompt) one 2,075-token row costs more
    than 8 rows of 276, so `separate=True` (see `pays`) gives each completion its own plain causal
    row instead, with the same outputs.

    `gather(per_token)` maps a (R, T) result (e.g. `token_logprobs`) to (N, L): completion i's
    tokens in order (N = all completions, prompt-major; L = the longest), zero past its end;
    `mask` (N, L) marks real tokens.
    """

    def __init__(self, prompts: list[list[int]], completions: list[list[list[int]]], pad_id: int = 0,
                 separate: bool = False):
        if separate:  # one row per completion: the plain causal layout (no positions, no mask)
            prompts = [p for p, branches in zip(prompts, completions) for _ in branches]
            completions = [[c] for branches in completions for c in branches]
        rows, index, lengths = [], [], []
        for prompt, branches in zip(prompts, completions):
            tokens, labels, pos, branch = list(prompt[:-1]), [IGNORE_INDEX] * (len(prompt) - 1), \
                list(range(len(prompt) - 1)), [-1] * (len(prompt) - 1)
            for b, completion in enumerate(branches):
                start = len(tokens)  # where this branch's first token is predicted (the prompt's last)
                tokens += [prompt[-1], *completion]
                labels += [IGNORE_INDEX, *completion]
                pos += range(len(prompt) - 1, len(prompt) + len(completion))
                branch += [b] * (len(completion) + 1)
                index.append((len(rows), start))
                lengths.append(len(completion))
            rows.append((tokens, labels, pos, branch))
        T, R = max(len(r[0]) for r in rows), len(rows)
        self.tokens = torch.full((R, T), pad_id, dtype=torch.long)
        self.labels = torch.full((R, T), IGNORE_INDEX, dtype=torch.long)
        self.positions = torch.zeros((R, T), dtype=torch.long)
        branch_ids = torch.full((R, T), -2, dtype=torch.long)  # -2: padding, -1: the shared prompt
        for r, (tokens, labels, pos, branch) in enumerate(rows):
            n = len(tokens)
            self.tokens[r, :n], self.labels[r, :n] = torch.tensor(tokens), torch.tensor(labels)
            self.positions[r, :n], branch_ids[r, :n] = torch.tensor(pos), torch.tensor(branch)
        q, k = branch_ids[:, :, None], branch_ids[:, None, :]
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        # every position attends at least to itself: a padding row that attended to nothing would
        # give NaNs, which a zero weight does not remove from the gradient
        self.attn_mask = ((causal & ((k == -1) | (k == q))) | torch.eye(T, dtype=torch.bool))[:, None]
        L = max(lengths)
        steps = torch.arange(L)
        self.mask = steps[None, :] < torch.tensor(lengths)[:, None]
        flat = torch.tensor([r * T + s for r, s in index])[:, None] + steps[None, :]
        self._flat = torch.where(self.mask, flat, 0)
        self.num_tokens = sum(len(r[0]) for r in rows)
        if separate:
            self.positions = self.attn_mask = None

    @staticmethod
    def pays(prompts: list[list[int]], completions: list[list[list[int]]], dim: int) -> bool:
        """Whether shared rows cost less than separate ones, by the forward's FLOPs per row of T
        tokens: ~24 dim^2 T for the projections (and more for the output layer) + 4 dim T^2 for
        attention, i.e. proportional to 6 dim T + T^2."""
        def cost(T: int) -> int:
            return 6 * dim * T + T * T

        shared = sum(cost(len(p) - 1 + sum(len(c) + 1 for c in cs)) for p, cs in zip(prompts, completions))
        separate = sum(cost(len(p) + len(c)) for p, cs in zip(prompts, completions) for c in cs)
        return shared < separate

    def to(self, device) -> "SharedPrompts":
        for name in ("tokens", "labels", "positions", "attn_mask", "mask", "_flat"):
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name).to(device))
        return self

    def logprobs(self, model: torch.nn.Module) -> torch.Tensor:
        """(N, L) log-probs of every completion token under `model` (0 past a completion's end)."""
        per_token = token_logprobs(model, self.tokens, self.labels, positions=self.positions,
                                   attn_mask=self.attn_mask)
        return self.gather(per_token)

    def gather(self, per_token: torch.Tensor) -> torch.Tensor:
        return per_token.reshape(-1)[self._flat] * self.mask


def sequence_logprobs(model: torch.nn.Module, tokens: torch.Tensor, labels: torch.Tensor,
                      doc_ids: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) summed log-probabilities of each row's labelled tokens."""
    return token_logprobs(model, tokens, labels, doc_ids).sum(-1)
