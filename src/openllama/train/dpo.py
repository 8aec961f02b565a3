"""`openllama dpo`: direct preference optimisation against a frozen reference.

Loss (sigmoid, Rafailov et al. 2023): -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))),
where pi_* / ref_* are the summed log-probabilities of the chosen / rejected reply tokens under
the policy / the reference (the starting model). "ipo" is there too: (margin - 1/(2 beta))^2.
The reference log-probs are computed once before training (`dpo.reference: precompute`, the
reference is then freed) or on the fly each step (`online`, keeps a frozen copy in memory).
Reported: loss, implicit rewards of chosen and rejected (beta * log-ratio), their margin and the
pairwise accuracy (margin > 0), on the training batch and on held-out pairs.
"""

from __future__ import annotations

import argparse
import copy
from typing import Any, Literal, Sequence

import torch
import torch.nn.functional as F

from ..config import Section
from ..data.chat import IGNORE_INDEX, EpochBatches
from ..data.preference import EncodedPair, collate_pairs
from .engine import OptimConfig, TrainConfig
from .lora import LoraConfig, LoraLlama
from .reward import PreferenceData


class DPOConfig(Section):
    beta: float = 0.1
    loss: Literal["sigmoid", "ipo"] = "sigmoid"
    reference: Literal["precompute", "online"] = "precompute"
    batch_size: int = 8  # pairs per micro-batch (the stage sets it from train.micro_batch_size)


def sequence_logprobs(model: torch.nn.Module, tokens: torch.Tensor, labels: torch.Tensor, **forward) -> torch.Tensor:
    """Sum over labelled tokens of log p(token | prefix): (B,). Labels are aligned with tokens."""
    logits = model(tokens, **forward)[:, :-1].float()
    targets = labels[:, 1:]
    nll = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none")
    return -(nll * (targets != IGNORE_INDEX)).sum(-1)


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
    out = []
    for i in range(0, len(pairs), batch_size):
        batch = collate_pairs(pairs[i:i + batch_size], pad_id)
        lp = sequence_logprobs(model, batch["tokens"].to(device), batch["labels"].to(device))
        n = len(pairs[i:i + batch_size])
        out.append(torch.stack([lp[:n], lp[n:]], dim=1).cpu())
    model.train(was)
    return torch.cat(out)


class DPOObjective:
    """Preference pairs -> the DPO loss of the policy against a frozen reference."""

    def __init__(self, train: list[EncodedPair], held_out: list[EncodedPair], reference: torch.nn.Module,
                 cfg: DPOConfig, pad_id: int, seed: int = 0):
        self.cfg, self.pad_id, self.seed = cfg, pad_id, seed
        self.train, self.held_out = train, held_out
        self.reference = None
        self.ref_train = self.ref_held_out = None
        reference = copy.deepcopy(reference).eval().requires_grad_(False)
        if cfg.reference == "precompute":
            device = "cuda" if torch.cuda.is_available() else "cpu"
            reference.to(device)
            self.ref_train = pair_logprobs(reference, train, pad_id, cfg.batch_size, device)
            if held_out:
                self.ref_held_out = pair_logprobs(reference, held_out, pad_id, cfg.batch_size, device)
            del reference
        else:
            self.reference = reference

    def _collate(self, items: list[int]) -> dict[str, Any]:
        batch = collate_pairs([self.train[i] for i in items], self.pad_id)
        batch["index"] = torch.tensor(items, dtype=torch.long)
        return batch

    def train_batches(self, rank: int, world: int) -> EpochBatches:
        return EpochBatches(list(range(len(self.train))), self.cfg.batch_size, rank=rank, world=world,
                            seed=self.seed, collate=self._collate)

    def _reference(self, batch, cached) -> tuple[torch.Tensor, torch.Tensor]:
        if cached is not None:
            ref = cached[batch["index"].cpu()].to(batch["tokens"].device)
            return ref[:, 0], ref[:, 1]
        self.reference.to(batch["tokens"].device)
        lp = sequence_logprobs(self.reference, batch["tokens"], batch["labels"]).detach()
        n = lp.shape[0] // 2
        return lp[:n], lp[n:]

    def loss(self, model, batch):
        lp = sequence_logprobs(model, batch["tokens"], batch["labels"])
        n = lp.shape[0] // 2
        with torch.no_grad():
            ref_c, ref_r = self._reference(batch, self.ref_train)
        loss, metrics = preference_loss(lp[:n], lp[n:], ref_c, ref_r, self.cfg.beta, self.cfg.loss)
        n_tokens = int((batch["labels"] != IGNORE_INDEX).sum())
        return loss, metrics, n_tokens

    @torch.no_grad()
    def evaluate(self, model) -> dict[str, float]:
        """Implicit-reward margin and accuracy on the held-out pairs."""
        if not self.held_out:
            return {}
        device = next(model.parameters()).device
        pol = pair_logprobs(model, self.held_out, self.pad_id, self.cfg.batch_size, device)
        if self.ref_held_out is not None:
            ref = self.ref_held_out
        else:
            ref = pair_logprobs(self.reference.to(device), self.held_out, self.pad_id, self.cfg.batch_size, device)
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
    from pathlib import Path

    from .reward import read_preference_data
    from .sft import load_start, run_stage, run_template

    out = Path(out)
    model, tok, tok_dir = load_start(cfg.init)
    template, run_tok_dir = run_template(cfg.data.template, tok, tok_dir, out)
    seq_len = min(cfg.train.seq_len, model.cfg.max_seq_len)
    train_pairs, held, report = read_preference_data(cfg.data, template, tok, seq_len, cfg.train.seed)
    dcfg = cfg.dpo.model_copy(update={"batch_size": cfg.train.micro_batch_size})
    objective = DPOObjective(train_pairs, held, model, dcfg, tok.pad_id, cfg.train.seed)
    if cfg.lora.enabled:
        model = LoraLlama(model, cfg.lora)
    return run_stage(cfg, model, objective, out, resume, run_tok_dir, progress, report)


ACCEPTS_OVERRIDES = True  # leftover `key.path=value` arguments are config overrides (see cli.py)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .sft import add_stage_arguments

    add_stage_arguments(parser, "preference file(s): prompt/chosen/rejected JSON lines or Anthropic HH")


def run(args: argparse.Namespace) -> int:
    from .sft import nested, print_summary, stage_config

    flags = nested({"init": args.model, "data.train": [args.data] if args.data else None,
                    "data.format": args.format, "data.on_error": args.on_error})
    cfg = stage_config(DPOStageConfig, args, flags)
    print_summary(dpo(cfg, args.out, resume=args.resume, progress=not args.no_progress))
    return 0
