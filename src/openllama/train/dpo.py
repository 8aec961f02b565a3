"""`openllama dpo`: direct preference optimisation against a frozen reference.

Loss (sigmoid, Rafailov et al. 2023): -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))),
where pi_* / ref_* are the summed log-probabilities of the chosen / rejected reply tokens under
the policy / the reference (the starting model). "ipo" is there too: (margin - 1/(2 beta))^2.
The reference log-probs are computed once before training, the pairs split between the ranks
(`dpo.reference: precompute`, the reference is then freed) or on the fly each step (`online`,
keeps a frozen copy on the device). Pairs per micro-batch: `train.micro_batch_size`.
Reported: loss, implicit rewards of chosen and rejected (beta * log-ratio), their margin and the
pairwise accuracy (margin > 0), on the training batch and on held-out pairs.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
import torch.nn.functional as F

from ..config import Section
from ..data.chat import EpochBatches
from ..data.preference import EncodedPair, collate_pairs
from ..labels import sequence_logprobs
from .engine import OptimConfig, TrainConfig
from .lora import LoraConfig, LoraLlama
from .objectives import Objective
from .stage import PreferenceData, run_stage, stage_command, start_preference_stage


class DPOConfig(Section):
    beta: float = 0.1
    loss: Literal["sigmoid", "ipo"] = "sigmoid"
    reference: Literal["precompute", "online"] = "precompute"


def preference_loss(pi_c, pi_r, ref_c, ref_r, beta: float, kind: str = "sigmoid") -> tuple[torch.Tensor, dict]:
    chosen, rejected = beta * (pi_c - ref_c), beta * (pi_r - ref_r)
    margin = chosen - rejected
    if kind == "ipo":
        loss = ((margin / beta - 1 / (2 * beta)) ** 2).mean()
    else:
        loss = -F.logsigmoid(margin).mean()
    metrics = {"reward_chosen": chosen.mean().item(), "reward_rejected": rejected.mean().item(),
               "reward_margin": margin.mean().item(), "reward_accuracy": (margin > 0).float().mean().item()}
    return loss, metrics


@torch.no_grad()
def pair_logprobs(model: torch.nn.Module, pairs: Sequence[EncodedPair], pad_id: int, batch_size: int = 8,
                  device: torch.device | str | None = None) -> torch.Tensor:
    """(N, 2) summed log-probs of (chosen, rejected) for each pair, in eval mode."""
    was = model.training
    model.eval()
    device = device or next(model.parameters()).device
    out = [torch.zeros(0, 2)]
    for i in range(0, len(pairs), batch_size):
        batch = collate_pairs(pairs[i:i + batch_size], pad_id)
        lp = sequence_logprobs(model, batch["tokens"].to(device), batch["labels"].to(device))
        n = len(pairs[i:i + batch_size])
        out.append(torch.stack([lp[:n], lp[n:]], dim=1).cpu())
    model.train(was)
    return torch.cat(out)


def sharded_pair_logprobs(model: torch.nn.Module, pairs: Sequence[EncodedPair], pad_id: int, batch_size: int,
                          accelerator) -> torch.Tensor:
    """`pair_logprobs` of all pairs with each rank scoring pairs rank, rank + world, ... on its own
    device, gathered so every rank holds the same (N, 2) table (on the CPU)."""
    rank, world = accelerator.process_index, accelerator.num_processes
    per_rank = -(-len(pairs) // world)
    with accelerator.autocast():
        mine = pair_logprobs(model, list(pairs[rank::world]), pad_id, batch_size, accelerator.device)
    padded = torch.zeros(per_rank, 2)
    padded[:len(mine)] = mine
    return unshard_rows(accelerator.gather(padded.to(accelerator.device)).cpu(), len(pairs), world)


def unshard_rows(gathered: torch.Tensor, n: int, world: int) -> torch.Tensor:
    """The ranks' shares, each padded to ceil(n / world) rows and concatenated in rank order, back
    in item order: row j of rank r is item r + j * world."""
    per_rank = gathered.shape[0] // world
    return gathered.view(world, per_rank, *gathered.shape[1:]).transpose(0, 1).reshape(-1, *gathered.shape[1:])[:n]


class DPOObjective(Objective):
    """Preference pairs -> the DPO loss of the policy against a frozen reference. The reference
    goes to the device in `setup` (called by the engine once Accelerate exists); with
    `precompute` the ranks score the pairs between them there and the reference is dropped."""

    def __init__(self, train: list[EncodedPair], held_out: list[EncodedPair], reference: torch.nn.Module,
                 cfg: DPOConfig, pad_id: int, micro_batch_size: int, seed: int = 0):
        self.cfg, self.pad_id, self.micro_batch_size, self.seed = cfg, pad_id, micro_batch_size, seed
        self.train, self.held_out = train, held_out
        self.ref_train = self.ref_held_out = None
        self.reference = copy.deepcopy(reference).eval().requires_grad_(False)

    def setup(self, accelerator) -> None:
        self.reference.to(accelerator.device)
        if self.cfg.reference == "precompute":
            args = (self.pad_id, self.micro_batch_size, accelerator)
            self.ref_train = sharded_pair_logprobs(self.reference, self.train, *args)
            if self.held_out:
                self.ref_held_out = sharded_pair_logprobs(self.reference, self.held_out, *args)
            self.reference = None

    def _collate(self, items: list[int]) -> dict[str, Any]:
        batch = collate_pairs([self.train[i] for i in items], self.pad_id)
        batch["index"] = torch.tensor(items, dtype=torch.long)
        return batch

    def train_batches(self, rank: int, world: int) -> EpochBatches:
        return EpochBatches(list(range(len(self.train))), self.micro_batch_size, rank=rank, world=world,
                            seed=self.seed, collate=self._collate)

    def _reference(self, batch, cached) -> tuple[torch.Tensor, torch.Tensor]:
        if cached is not None:
            ref = cached[batch["index"].cpu()].to(batch["tokens"].device)
            return ref[:, 0], ref[:, 1]
        lp = sequence_logprobs(self.reference, batch["tokens"], batch["labels"]).detach()
        n = lp.shape[0] // 2
        return lp[:n], lp[n:]

    def loss(self, model, batch):
        lp = sequence_logprobs(model, batch["tokens"], batch["labels"])
        n = lp.shape[0] // 2
        with torch.no_grad():
            ref_c, ref_r = self._reference(batch, self.ref_train)
        loss, metrics = preference_loss(lp[:n], lp[n:], ref_c, ref_r, self.cfg.beta, self.cfg.loss)
        # tokens the model processed: the real (unpadded) tokens of both replies' rows
        return loss, metrics, int(batch["lengths"].sum())

    @torch.no_grad()
    def evaluate(self, model) -> dict[str, float]:
        """Implicit-reward margin and accuracy on the held-out pairs."""
        if not self.held_out:
            return {}
        device = next(model.parameters()).device
        pol = pair_logprobs(model, self.held_out, self.pad_id, self.micro_batch_size, device)
        if self.ref_held_out is not None:
            ref = self.ref_held_out
        else:
            ref = pair_logprobs(self.reference, self.held_out, self.pad_id, self.micro_batch_size, device)
        loss, metrics = preference_loss(pol[:, 0], pol[:, 1], ref[:, 0], ref[:, 1], self.cfg.beta, self.cfg.loss)
        return {"loss": loss.item(), **metrics}


# ----------------------------------------------------------------------------------------------
# The stage


class DPOStageConfig(Section):
    init: str = ""  # the starting model, which is also the frozen reference
    data: PreferenceData = PreferenceData()
    dpo: DPOConfig = DPOConfig()
    lora: LoraConfig = LoraConfig()
    train: TrainConfig
    optim: OptimConfig = OptimConfig(lr=5e-5, weight_decay=0.0)


def dpo(cfg: DPOStageConfig, out, resume: bool = False, progress: bool = True) -> dict:
    out = Path(out)
    model, tok, run_tok_dir, train_pairs, held, report = start_preference_stage(cfg, out)
    objective = DPOObjective(train_pairs, held, model, cfg.dpo, tok.pad_id, cfg.train.micro_batch_size,
                             cfg.train.seed)
    if cfg.lora.enabled:
        model = LoraLlama(model, cfg.lora)
    return run_stage(cfg, model, objective, out, resume, run_tok_dir, progress, report)


ACCEPTS_OVERRIDES = True  # leftover `key.path=value` arguments are config overrides (see cli.py)

add_arguments, run = stage_command(DPOStageConfig, dpo, "preference file(s): prompt/chosen/rejected JSON lines "
                                                        "or Anthropic HH")
