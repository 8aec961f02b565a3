"""What every training stage shares: its subcommand, its config (one resume rule), the starting
model and tokenizer, the chat template it trains with, a held-out split, and `run_stage` (train on
the engine, then RUN/summary.json). Stage modules (pretrain, sft, reward, dpo, grpo) import this
and never each other; each has the same shape: config, objective, command.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any, Callable, Literal, Sequence, TypeVar

import torch

from ..artifacts import METRICS_FILE, RUN_CONFIG, SUMMARY_FILE
from ..atomic import write_text_atomic
from ..config import Section, build, dump_config, flatten, merge, nested, parse_overrides, read_yaml
from ..errors import UserError

S = TypeVar("S", bound=Section)

# ----------------------------------------------------------------------------------------------
# The one resume rule

# What a resumed run may change: how long it runs (extend max_steps, stop earlier with halt_at_step),
# how it is laid out on the hardware and how often it saves / logs / evaluates; none of these changes
# the weights' trajectory (grad_accum_steps keeps the global batch when the world size changes; the
# data position refuses a different one). Everything else must agree with RUN/config.yaml.
RUN_LENGTH_KEYS = ("train.max_steps", "train.max_tokens", "train.halt_at_step")
LAYOUT_KEYS = ("train.grad_accum_steps", "train.strategy", "train.cpu", "train.compile", "train.async_save",
               "train.activation_checkpointing", "train.save_every", "train.keep_last", "train.eval_every",
               "train.log_every", "train.trackers", "train.eval_tasks", "train.eval_tasks_limit")
RESUME_MAY_CHANGE = frozenset(RUN_LENGTH_KEYS + LAYOUT_KEYS)


def resume_config(cls: type[S], run_cfg: Path, requested: dict[str, Any]) -> S:
    """The config of `--resume`: the run's own config.yaml, then what this command gives (a
    --config, flags, overrides), which may only change RESUME_MAY_CHANGE keys; anything else is a
    one-line UserError. A saved halt_at_step ends one invocation and does not carry over; a new
    length (max_steps or max_tokens) replaces the saved one."""
    saved_data = read_yaml(run_cfg)
    saved = build(cls, saved_data, str(run_cfg))
    base = merge(saved_data, {"train": {"halt_at_step": None}})
    if {"max_steps", "max_tokens"} & set(requested.get("train") or {}):
        base = merge(base, {"train": {"max_steps": None, "max_tokens": None}})
    cfg = build(cls, merge(base, requested), str(run_cfg))
    old, new = flatten(dump_config(saved)), flatten(dump_config(cfg))
    for key in sorted(old.keys() | new.keys()):
        if key not in RESUME_MAY_CHANGE and old.get(key) != new.get(key):
            raise UserError(f"{run_cfg}: --resume with a different config: the run has {key}={old.get(key)!r} but "
                            f"this command gives {new.get(key)!r}; only the run length, layout and save/log/eval "
                            f"cadence may change (drop it to resume, or start a new --out)")
    return cfg


def stage_config(cls: type[S], args: argparse.Namespace, flags: dict[str, Any] | None = None,
                 allow_max_tokens: bool = False) -> S:
    """A stage's config. A fresh run: --config, then the flags (dotted keys), then the dotted
    overrides. With --resume: `resume_config` (nothing has to be repeated). The length is explicit:
    train.max_steps, or for pretraining (`allow_max_tokens`) train.max_tokens, which counts packed
    tokens and so means nothing to the chat stages."""
    requested: dict[str, Any] = read_yaml(args.config) if getattr(args, "config", None) else {}
    requested = merge(requested, nested(flags or {}))
    requested = merge(requested, parse_overrides(getattr(args, "overrides", None) or []))
    run_cfg = Path(args.out) / RUN_CONFIG
    if getattr(args, "resume", False) and run_cfg.is_file():
        return resume_config(cls, run_cfg, requested)
    train = requested.get("train") if isinstance(requested.get("train"), dict) else {}
    if not allow_max_tokens:  # (pretraining: TrainConfig itself asks for exactly one of the two)
        if train.get("max_tokens") is not None:
            raise UserError("train.max_tokens is for pretraining (packed tokens per step); this stage takes "
                            "train.max_steps=N")
        if train.get("max_steps") is None:
            raise UserError("no training length: pass train.max_steps=N (or set train.max_steps in --config)")
    return build(cls, requested, getattr(args, "config", None) or "")


# ----------------------------------------------------------------------------------------------
# The subcommand


def add_stage_arguments(parser: argparse.ArgumentParser, data_help: str, formats: bool = True) -> None:
    parser.add_argument("--model", help="starting model: a model dir, a checkpoint step dir or a run dir")
    parser.add_argument("--data", help=data_help)
    add_run_arguments(parser, "YAML with the stage's sections (train, optim, data, ...); train.max_steps is "
                              "required (here or as an override)")
    if formats:
        parser.add_argument("--format", help="data format (default: detected from the first record)")
    parser.add_argument("--on-error", choices=("raise", "skip"), help="malformed records: stop (default) or skip and count")


def add_run_arguments(parser: argparse.ArgumentParser, config_help: str) -> None:
    """--out, --config, --resume, --no-progress: what every training command takes."""
    parser.add_argument("--out", required=True, help="run directory (checkpoints, metrics.jsonl, config.yaml)")
    parser.add_argument("--config", help=config_help)
    parser.add_argument("--resume", action="store_true",
                        help="continue from the newest complete checkpoint in --out with the run's config.yaml "
                             "(other options must agree with it, except the run length, layout and "
                             "save/log/eval cadence)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (metrics.jsonl is still written)")


def stage_command(config_cls: type[Section], stage: Callable[..., dict], data_help: str, formats: bool = True,
                  extra: dict[str, tuple[str, str]] | None = None):
    """(add_arguments, run) of a chat stage's subcommand: --model/--data/--out/... flags, the
    config (`stage_config`), `stage(cfg, out, resume=, progress=)`, then a one-line summary.
    `extra`: the stage's own flags, `--flag` -> (the config key it sets, help)."""
    extra = extra or {}

    def add_arguments(parser: argparse.ArgumentParser) -> None:
        add_stage_arguments(parser, data_help, formats)
        for flag, (key, help) in extra.items():
            parser.add_argument(flag, default=None, help=f"{help} (= {key}=...)")

    def run(args: argparse.Namespace) -> int:
        flags = {"init": args.model, "data.train": [args.data] if args.data else None,
                 "data.format": getattr(args, "format", None), "data.on_error": args.on_error}
        flags.update({key: getattr(args, flag.lstrip("-").replace("-", "_")) for flag, (key, _) in extra.items()})
        cfg = stage_config(config_cls, args, flags)
        print_summary(stage(cfg, args.out, resume=args.resume, progress=not args.no_progress))
        return 0

    return add_arguments, run


# ----------------------------------------------------------------------------------------------
# The start: model, tokenizer, template, held-out split


def load_start(init: str):
    """(Llama, Tokenizer, tokenizer dir) of the starting model."""
    from ..artifacts import find_tokenizer_dir, resolve_model_dir
    from ..model import load_model
    from ..tokenizer import Tokenizer

    if not init:
        raise UserError("no starting model: pass --model DIR (a model, checkpoint or run directory) or set init=DIR")
    model_dir = resolve_model_dir(init)
    tok_dir = find_tokenizer_dir(init)
    if tok_dir is None:
        raise UserError(f"{init}: no tokenizer files beside the model (tokenizer.json / tokenizer.model)")
    model = load_model(model_dir)
    tok = Tokenizer.load(tok_dir)
    if tok.vocab_size > model.cfg.vocab_size:
        raise UserError(f"{tok_dir}: tokenizer has {tok.vocab_size} tokens, more than the model's {model.cfg.vocab_size}")
    return model, tok, tok_dir


def run_template(template: str | None, tok, tok_dir: Path, out: Path):
    """(ChatTemplate, tokenizer dir to ship with the run): the starting tokenizer's own template, or
    `template`, saved with a copy of the tokenizer so the exported tokenizer_config.json renders
    exactly what was trained on."""
    from ..chat_template import ChatTemplate

    chat = ChatTemplate.for_tokenizer(tok, template or tok.chat_template)
    if chat.source == tok.chat_template:
        return chat, tok_dir
    copy_dir = out / "chat_tokenizer"
    tok.save(copy_dir, chat_template=chat.source)
    return chat, copy_dir


def split_held_out(items: Sequence[Any], fraction: float, seed: int, minimum: int = 1) -> tuple[list, list]:
    """A fixed random split: (train, held out), the held-out share `fraction` (at least `minimum`
    when fraction > 0 and more than one item)."""
    items = list(items)
    if fraction <= 0 or len(items) < 2:
        return items, []
    order = list(range(len(items)))
    random.Random(f"held-out:{seed}").shuffle(order)
    n = min(len(items) - 1, max(minimum, round(len(items) * fraction)))
    held = set(order[:n])
    return [x for i, x in enumerate(items) if i not in held], [items[i] for i in sorted(held)]


def read_files(paths: Sequence[str], read: Callable[..., list], **kwargs) -> tuple[list, dict[str, Any]]:
    """Every record of `paths` through `read(path, report=ReadReport, **kwargs)`, and the per-file
    read report (records read, used, skipped by reason), printed once on the main rank."""
    from ..data.chat import ReadReport

    items, files = [], []
    for path in paths:
        report = ReadReport()
        items += read(path, report=report, **kwargs)
        files.append({"path": str(path), **report.to_json()})
        if is_main():
            for message in report.skipped[:5]:
                print(f"skipped: {message}")
    return items, {"files": files}


# ----------------------------------------------------------------------------------------------
# Preference data (reward and DPO)


class PreferenceData(Section):
    train: list[str] = []  # preference files: prompt/chosen/rejected or Anthropic HH
    format: str = "auto"
    on_error: Literal["raise", "skip"] = "raise"
    valid: list[str] = []  # held-out files; else valid_fraction of train
    valid_fraction: float = 0.1
    template: str | None = None


def start_preference_stage(cfg, out: Path):
    """What reward and DPO both begin with: the starting model and tokenizer, the run's chat template
    and tokenizer dir, and the encoded pairs. -> (model, tokenizer, run_tok_dir, train, held, report)"""
    from ..data.chat import LengthReport
    from ..data.preference import encode_pairs, read_preferences

    data: PreferenceData = cfg.data
    if not data.train:
        raise UserError("no training data: pass --data FILE or set data.train=[...]")
    model, tok, tok_dir = load_start(cfg.init)
    template, run_tok_dir = run_template(data.template, tok, tok_dir, out)
    max_len = min(cfg.train.seq_len, model.cfg.max_seq_len)
    pairs, report = read_files(data.train, read_preferences, fmt=data.format, on_error=data.on_error)
    if data.valid:
        held, _ = read_files(data.valid, read_preferences, fmt=data.format, on_error=data.on_error)
    else:
        pairs, held = split_held_out(pairs, data.valid_fraction, cfg.train.seed)
    length = LengthReport()
    train = encode_pairs(pairs, template, tok, max_len, length)
    held_enc = encode_pairs(held, template, tok, max_len)
    report.update(pairs=len(pairs), held_out=len(held_enc), kept=length.kept, dropped_too_long=length.dropped)
    if is_main():
        print(f"data: {json.dumps(report)}")
    return model, tok, run_tok_dir, train, held_enc, report


# ----------------------------------------------------------------------------------------------
# Run and summarise


def run_stage(cfg: Section, model: torch.nn.Module, objective, out: str | Path, resume: bool, tok_dir: Path,
              progress: bool = True, report: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train on the engine, which evaluates the starting model first (on the device, under the
    same autocast as later evaluations), and write RUN/summary.json with the before/after
    evaluation and the data report. A resumed run finds "before" in metrics.jsonl (step 0)."""
    from .engine import train

    out = Path(out)
    result = train(cfg, model, objective, out, resume=resume, tokenizer_dir=tok_dir, progress=progress,
                   eval_at_start=True)
    before = result.pop("eval_start", None)
    if before is None:
        before = _logged_eval(out / METRICS_FILE, step=0)
    summary = {"before": before, "after": result.get("eval"), "data": report or {}, **result}
    if is_main():
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / SUMMARY_FILE, json.dumps(summary, indent=1, ensure_ascii=False) + "\n")
    return summary


def _logged_eval(path: Path, step: int) -> dict[str, float] | None:
    from .metrics import read_metrics

    if not path.is_file():
        return None
    for row in read_metrics(path):
        if row.get("kind") == "eval" and row.get("step") == step:
            return {k: v for k, v in row.items() if k not in ("kind", "step")}
    return None


def is_main() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


def print_summary(summary: dict[str, Any]) -> None:
    if is_main():
        print(json.dumps({k: summary[k] for k in ("step", "before", "after", "checkpoint") if k in summary}))
