"""The reward model: our Llama with a scalar head, and its files.

The head (`score`, dim -> 1, no bias) is read at the last real token of each sequence (right
padding, so at `length - 1`), as transformers' `LlamaForSequenceClassification` does at the last
non-pad token. On disk it is an openllama model directory (the language model's weights, so every
tool reads it) plus `score.safetensors` with the head; `load_reward_model` reads both. The reward
stage trains it; GRPO scores samples with it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import UserError
from ..model import Llama, load_model, save_model

SCORE_FILE = "score.safetensors"


class RewardModel(nn.Module):
    """Llama trunk + scalar head. `forward(tokens, lengths)` -> (B,) rewards."""

    def __init__(self, llama: Llama):
        super().__init__()
        self.model = llama
        self.cfg = llama.cfg
        self.score = nn.Linear(llama.cfg.dim, 1, bias=False)
        nn.init.normal_(self.score.weight, std=1.0 / (llama.cfg.dim ** 0.5))
        if not llama.cfg.tie_embeddings:
            # the LM head plays no part in the reward (and unused parameters upset DDP)
            llama.output.weight.requires_grad_(False)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor | None = None, **forward) -> torch.Tensor:
        hidden = self.model(tokens, return_hidden=True, **forward)
        if lengths is None:
            lengths = torch.full((tokens.shape[0],), tokens.shape[1], device=tokens.device)
        last = hidden[torch.arange(tokens.shape[0], device=tokens.device), lengths - 1]
        return self.score(last).squeeze(-1).float()

    # the engine's checkpoint hooks: the trunk as an ordinary model dir + the head beside it
    def save_checkpoint(self, directory) -> None:
        from safetensors.torch import save_file

        save_model(self.model, directory, extra={"reward_head": SCORE_FILE})
        save_file({"weight": self.score.weight.detach().cpu().contiguous()}, str(Path(directory) / SCORE_FILE))

    def load_checkpoint(self, directory) -> None:
        from .checkpoint import load_weights

        load_weights(Path(directory).parent, self.model)  # `directory` is a checkpoint's model/
        load_score_head(self, directory)


def load_score_head(model: RewardModel, directory: str | Path) -> None:
    from safetensors.torch import load_file

    with torch.no_grad():
        model.score.weight.copy_(load_file(str(Path(directory) / SCORE_FILE))["weight"])


def reward_model_dir(path: str | Path) -> Path:
    """The reward model behind `path`: its model directory, a checkpoint step or an `openllama reward` run."""
    from ..artifacts import resolve_model_dir

    directory = resolve_model_dir(path)
    if not (directory / SCORE_FILE).is_file():
        raise UserError(f"{path}: not a reward model directory (no {SCORE_FILE}); train one with `openllama reward`")
    return directory


def load_reward_model(directory: str | Path, device="cpu") -> RewardModel:
    directory = reward_model_dir(directory)
    rm = RewardModel(load_model(directory))
    load_score_head(rm, directory)
    return rm.to(device).eval()
