"""`openllama reward`: a reward model trained on preference pairs with the Bradley-Terry loss.

The reward model is our Llama with a scalar head (`score`, dim -> 1, no bias) read at the last
real token of each sequence (right padding, so at `length - 1`), as transformers'
`LlamaForSequenceClassification` does at the last non-pad token. Loss: -log sigmoid(r_chosen -
r_rejected). Reported: loss, pairwise accuracy and mean margin, on training batches and held out.

It is saved as an openllama model directory (the language model's weights, so every tool reads
it) plus `score.safetensors` with the head; `load_reward_model` reads both.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Section
from ..data.chat import EpochBatches
from ..data.preference import EncodedPair, collate_pairs
from ..errors import UserError
from ..model import Llama, load_model
from .engine import OptimConfig, TrainConfig
from .sft import load_start, run_stage, run_template, split_held_out, stage_command

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
        from ..model import save_model

        save_model(self.model, directory)
        save_score_head(self, directory)

    def load_checkpoint(self, directory) -> None:
        from .checkpoint import load_weights

        load_weights(Path(directory).parent, self.model)  # `directory` is a checkpoint's model/
        load_score_head(self, directory)


def save_score_head(model: RewardModel, directory: str | Path) -> None:
    from safetensors.torch import save_file

    save_file({"weight": model.score.weight.detach().cpu().contiguous()}, str(Path(directory) / SCORE_FILE))
    meta_path = Path(directory) / "openllama.json"
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    meta["reward_head"] = SCORE_FILE
    meta_path.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def load_score_head(model: RewardModel, directory: str | Path) -> None:
    from safetensors.torch import load_file

    with torch.no_grad():
        model.score.weight.copy_(load_file(str(Path(directory) / SCORE_FILE))["weight"])


def load_reward_model(directory: str | Path, device="cpu") -> RewardModel:
    directory = Path(directory)
    if not (directory / SCORE_FILE).is_file():
        raise UserError(f"{directory}: not a reward model (no {SCORE_FILE}); train one with `openllama reward`")
    rm = RewardModel(load_model(directory))
    load_score_head(rm, directory)
    return rm.to(device).eval()


def bradley_terry(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    margin = r_chosen - r_rejected
    loss = -F.logsigmoid(margin).mean()
    return loss, {"accuracy": (margin > 0).float().mean().item(), "margin": margin.mean().item()}


class RewardObjective:
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



# ----------------------------------------------------------------------------------------------
# The stage


class PreferenceData(Section):
    train: list[str] = []  # preference files: prompt/chosen/rejected or Anthropic HH
    format: str = "auto"
    on_error: Literal["raise", "skip"] = "raise"
    valid: list[str] = []  # held-out files; else valid_fraction of train
    valid_fraction: float = 0.1
    template: str | None = None


def read_preference_data(data: PreferenceData, template, tok, max_len: int, seed: int):
    """(train pairs, held-out pairs, report) encoded with the chat template."""
    from ..data.chat import LengthReport, ReadReport
    from ..data.preference import encode_pairs, read_preferences
    if not data.train:
        raise UserError("no training data: pass --data FILE or set data.train=[...]")
    reads = [ReadReport() for _ in data.train]
    pairs = [p for path, r in zip(data.train, reads) for p in read_preferences(path, data.format, data.on_error, r)]
    if data.valid:
        held = [p for path in data.valid for p in read_preferences(path, data.format, data.on_error)]
    else:
        pairs, held = split_held_out(pairs, data.valid_fraction, seed)
    length = LengthReport()
    train = encode_pairs(pairs, template, tok, max_len, length)
    held_enc = encode_pairs(held, template, tok, max_len)
    report = {"files": [{"path": p, "format": r.format, "records": r.records, "skipped": len(r.skipped)}
                        for p, r in zip(data.train, reads)],
              "pairs": len(pairs), "held_out": len(held_enc), "kept": length.kept, "dropped_too_long": length.dropped}
    return train, held_enc, report


class RewardStageConfig(Section):
    init: str = ""  # the starting model (model / checkpoint / run dir)
    data: PreferenceData = PreferenceData()
    train: TrainConfig
    optim: OptimConfig = OptimConfig(lr=1e-4, weight_decay=0.0)


def start_preference_stage(cfg, out: Path):
    """What reward and DPO both begin with: the starting model and tokenizer, the run's chat template
    and tokenizer dir, and the encoded pairs. -> (model, tokenizer, run_tok_dir, train, held, report)"""
    model, tok, tok_dir = load_start(cfg.init)
    template, run_tok_dir = run_template(cfg.data.template, tok, tok_dir, out)
    seq_len = min(cfg.train.seq_len, model.cfg.max_seq_len)
    train_pairs, held, report = read_preference_data(cfg.data, template, tok, seq_len, cfg.train.seed)
    return model, tok, run_tok_dir, train_pairs, held, report


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
