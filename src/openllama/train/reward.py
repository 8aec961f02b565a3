"""`openllama reward`: a reward model trained on preference pairs with the Bradley-Terry loss.

Loss: -log sigmoid(r_chosen - r_rejected), where r is the scalar the reward model
(`reward_model.RewardModel`: our Llama + a head at the last real token) gives a prompt + reply.
Reported: loss, pairwise accuracy and mean margin, on training batches and held out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from ..config import Section
from ..data.chat import EpochBatches
from ..data.preference import EncodedPair, collate_pairs
from .engine import OptimConfig, TrainConfig
from .objectives import Objective
from .reward_model import RewardModel
from .stage import PreferenceData, run_stage, stage_command, start_preference_stage


class RewardStageConfig(Section):
    init: str = ""  # the starting model (model / checkpoint / run dir)
    data: PreferenceData = PreferenceData()
    train: TrainConfig
    optim: OptimConfig = OptimConfig(lr=1e-4, weight_decay=0.0)


def bradley_terry(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    margin = r_chosen - r_rejected
    loss = -F.logsigmoid(margin).mean()
    return loss, {"accuracy": (margin > 0).float().mean().item(), "margin": margin.mean().item()}


class RewardObjective(Objective):
    def __init__(self, train: list[EncodedPair], held_out: list[EncodedPair], micro_batch_size: int, pad_id: int,
                 seed: int = 0):
        self.train, self.held_out, self.pad_id, self.seed = train, held_out, pad_id, seed
        self.micro_batch_size = micro_batch_size  # pairs per micro-batch

    def train_batches(self, rank: int, world: int) -> EpochBatches:
        return EpochBatches(self.train, self.micro_batch_size, rank=rank, world=world, seed=self.seed,
                            collate=lambda pairs: collate_pairs(pairs, self.pad_id))

    @staticmethod
    def _rewards(model, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        r = model(batch["tokens"], batch["lengths"])
        n = r.shape[0] // 2
        return r[:n], r[n:]

    def loss(self, model, batch):
        loss, metrics = bradley_terry(*self._rewards(model, batch))
        return loss, metrics, int(batch["lengths"].sum())  # the real (unpadded) tokens processed

    @torch.no_grad()
    def evaluate(self, model) -> dict[str, float]:
        return evaluate_pairs(model, self.held_out, self.pad_id, self.micro_batch_size) if self.held_out else {}


@torch.no_grad()
def evaluate_pairs(model, pairs: Sequence[EncodedPair], pad_id: int, batch_size: int = 16) -> dict[str, float]:
    """Bradley-Terry loss, pairwise accuracy and mean margin over `pairs`."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    chosen, rejected = [], []
    for i in range(0, len(pairs), batch_size):
        batch = {k: v.to(device) for k, v in collate_pairs(pairs[i:i + batch_size], pad_id).items()}
        c, r = RewardObjective._rewards(model, batch)
        chosen.append(c)
        rejected.append(r)
    model.train(was)
    loss, metrics = bradley_terry(torch.cat(chosen), torch.cat(rejected))
    return {"loss": loss.item(), **metrics}



def reward(cfg: RewardStageConfig, out, resume: bool = False, progress: bool = True) -> dict:
    out = Path(out)
    llama, tok, run_tok_dir, train_pairs, held, report = start_preference_stage(cfg, out)
    torch.manual_seed(cfg.train.seed)  # the same head init on every rank and every run
    model = RewardModel(llama)
    objective = RewardObjective(train_pairs, held, cfg.train.micro_batch_size, tok.pad_id, cfg.train.seed)
    return run_stage(cfg, model, objective, out, resume, run_tok_dir, progress, report)


ACCEPTS_OVERRIDES = True  # leftover `key.path=value` arguments are config overrides (see cli.py)


add_arguments, run = stage_command(RewardStageConfig, reward, "preference file(s): prompt/chosen/rejected JSON "
                                                              "lines or Anthropic HH")
