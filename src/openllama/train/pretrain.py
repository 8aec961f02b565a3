"""`openllama pretrain --config configs/tiny.yaml --out runs/x [a.b=c ...]`; `openllama pretrain --out runs/x
--resume [train.max_steps=N]` continues it from its own config.yaml (the one resume rule, stage.py).

The config has four sections: `model` (ModelConfig), `optim`, `train` (engine.py) and `data`
(PretrainData: token-shard directories with mixing weights and the held-out split); the objective
is `objectives.PretrainObjective`. Under `torchrun --nproc_per_node N` the same command trains
data-parallel.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..artifacts import RUN_CONFIG
from ..config import ModelConfig, Section
from ..errors import UserError
from .engine import OptimConfig, TrainConfig
from .objectives import PretrainData
from .stage import add_run_arguments, is_main, stage_config


class PretrainConfig(Section):
    init: str | None = None  # continue from these weights (a model, checkpoint or run dir); else fresh
    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig
    data: PretrainData = PretrainData()


def pretrain(cfg: PretrainConfig, out: str, resume: bool = False, progress: bool = True) -> dict:
    import torch

    from ..model import Llama, StoredWeights
    from .engine import train
    from .objectives import PretrainObjective

    if cfg.train.seq_len > cfg.model.max_seq_len:
        raise UserError(f"train.seq_len ({cfg.train.seq_len}) is longer than model.max_seq_len ({cfg.model.max_seq_len})")
    if cfg.init is not None and StoredWeights(cfg.init).cfg != cfg.model:
        raise UserError(f"init={cfg.init}: that model's config differs from `model` (set model to its openllama.json)")
    objective = PretrainObjective(cfg.data, cfg.train.seq_len, cfg.train.micro_batch_size, seed=cfg.train.seed,
                                  eval_batches=cfg.train.eval_batches, vocab_size=cfg.model.vocab_size,
                                  eval_tasks=cfg.train.eval_tasks, eval_tasks_limit=cfg.train.eval_tasks_limit)
    # built on the meta device: the engine materialises only each rank's shards and initialises
    # them from train.seed (the same weights at every world size), or loads `init`
    with torch.device("meta"):
        model = Llama(cfg.model)
    return train(cfg, model, objective, out, resume=resume, tokenizer_dir=objective.tokenizer_dir, progress=progress,
                 init_from=cfg.init)


ACCEPTS_OVERRIDES = True  # leftover `key.path=value` arguments are config overrides (see cli.py)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_run_arguments(parser, "YAML preset, e.g. configs/tiny.yaml (with --resume: optional, the run's config.yaml "
                              "is used, and what is given must agree with it except the run length and layout)")


def run(args: argparse.Namespace) -> int:
    if args.config is None and not args.resume:
        raise UserError("pretrain: --config is required (only --resume reads the run's own config.yaml)")
    if args.config is None and not (Path(args.out) / RUN_CONFIG).is_file():
        raise UserError(f"{Path(args.out) / RUN_CONFIG}: not found, so there is nothing to resume; give --config "
                        f"to start the run")
    cfg = stage_config(PretrainConfig, args, allow_max_tokens=True)
    summary = pretrain(cfg, args.out, resume=args.resume, progress=not args.no_progress)
    if is_main():
        print(json.dumps(summary))
    return 0
