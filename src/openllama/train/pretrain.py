"""`openllama pretrain --config configs/tiny.yaml --out runs/x [a.b=c ...]`; `openllama pretrain --out runs/x
--resume [train.max_steps=N]` continues it from its own config.yaml (engine.resume_config).

The config has four sections: `model` (ModelConfig), `optim`, `train` (engine.py) and `data`
(PretrainData: token-shard directories with mixing weights and the held-out split).
Under `torchrun --nproc_per_node N` the same command trains data-parallel.
"""

from __future__ import annotations

import argparse
import json

from ..config import ModelConfig, Section, load_config
from .engine import OptimConfig, TrainConfig, resume_config
from .objectives import PretrainData


class PretrainConfig(Section):
    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig
    data: PretrainData = PretrainData()


ACCEPTS_OVERRIDES = True  # leftover `key.path=value` arguments are config overrides (see cli.py)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None,
                        help="YAML preset, e.g. configs/tiny.yaml (with --resume: optional, the run's config.yaml "
                             "is used, and a given one must match it except the run length)")
    parser.add_argument("--out", required=True, help="run directory (checkpoints, metrics.jsonl, config.yaml)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (metrics.jsonl is still written)")


def pretrain(cfg: PretrainConfig, out: str, resume: bool = False, progress: bool = True) -> dict:
    import torch
    from accelerate.utils import set_seed

    from ..model import Llama
    from .engine import train
    from .objectives import PretrainObjective

    if cfg.train.seq_len > cfg.model.max_seq_len:
        from ..errors import UserError

        raise UserError(f"train.seq_len ({cfg.train.seq_len}) is longer than model.max_seq_len ({cfg.model.max_seq_len})")
    objective = PretrainObjective(cfg.data, cfg.train.seq_len, cfg.train.micro_batch_size, seed=cfg.train.seed,
                                  eval_batches=cfg.train.eval_batches, vocab_size=cfg.model.vocab_size)
    set_seed(cfg.train.seed)  # the same initial weights on every rank and every run
    with torch.device("cpu"):
        model = Llama(cfg.model)
    return train(cfg, model, objective, out, resume=resume, tokenizer_dir=objective.tokenizer_dir, progress=progress)


def run(args: argparse.Namespace) -> int:
    if args.resume:
        cfg = resume_config(PretrainConfig, args.out, args.config, args.overrides)
    elif args.config is None:
        from ..errors import UserError

        raise UserError("pretrain: --config is required (only --resume reads the run's own config.yaml)")
    else:
        cfg = load_config(PretrainConfig, args.config, args.overrides)
    summary = pretrain(cfg, args.out, resume=args.resume, progress=not args.no_progress)
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        print(json.dumps(summary))
    return 0
