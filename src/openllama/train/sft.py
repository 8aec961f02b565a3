"""`openllama sft`: instruction tuning, full or LoRA, with loss on assistant replies only.

    openllama sft --model RUN_OR_MODEL_DIR --data chats.json --out runs/sft [--format auto]
                  [--on-error skip] [--config sft.yaml] [--resume] [lora.r=8] [train.max_steps=200]

Conversations (any format `data.chat` reads) are rendered with the chat template of the starting
model's tokenizer (or `data.template`), tokenised once, truncated only at the end of an assistant
turn (or dropped, counted), and packed several per row with document ids so no conversation
attends to another. The loss is the mean cross-entropy over the assistant tokens of a batch;
`evaluate` reports it on held-out conversations. With `lora.r > 0` only the adapters train and
every checkpoint holds the merged weights (exportable as is) plus the adapters (for resume).

The pieces every alignment stage shares live here too: the subcommand (`stage_command`), the
config plumbing (starting model + tokenizer; on resume the run's config.yaml, which other
options must agree with), the template and the held-out split. `train.max_steps` is required.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any, Literal, Sequence, TypeVar

import torch
from pydantic import Field

from ..config import Section, build, merge, parse_overrides, read_yaml
from ..data.chat import (IGNORE_INDEX, ChatTemplate, EpochBatches, Example, LengthReport, ReadReport, collate_rows,
                         fit_length, pack, read_conversations)
from ..errors import UserError
from .engine import OptimConfig, TrainConfig
from .logprobs import next_token_targets
from .lora import LoraConfig, LoraLlama

S = TypeVar("S", bound=Section)


# ----------------------------------------------------------------------------------------------
# Shared by sft / reward / dpo / grpo


# Run-control keys a resumed run may change: they decide when to stop, save and log, not what
# is trained. Everything else given with --resume must agree with RUN/config.yaml.
RESUME_MAY_CHANGE = frozenset({"train.halt_at_step", "train.save_every", "train.keep_last", "train.log_every",
                               "train.eval_every", "train.trackers"})


def stage_config(cls: type[S], args: argparse.Namespace, flags: dict[str, Any]) -> S:
    """The stage config. A fresh run: --config, then the flags, then dotted overrides. With
    --resume: the run's own config.yaml (nothing has to be repeated); a --config, flag or override
    given as well must agree with it (except RESUME_MAY_CHANGE), else a one-line UserError.
    The length is explicit, as for pretraining: train.max_steps is required (train.max_tokens
    counts packed pretraining tokens, so these stages refuse it)."""
    requested: dict[str, Any] = read_yaml(args.config) if getattr(args, "config", None) else {}
    requested = merge(requested, {k: v for k, v in flags.items() if v is not None})
    requested = merge(requested, parse_overrides(args.overrides or []))
    run_cfg = Path(args.out) / "config.yaml"
    if getattr(args, "resume", False) and run_cfg.is_file():
        saved = build(cls, read_yaml(run_cfg), str(run_cfg))
        cfg = build(cls, merge(read_yaml(run_cfg), requested), str(run_cfg))
        _check_resume_agrees(saved, cfg, run_cfg)
        return cfg
    train = requested.get("train") or {}
    if isinstance(train, dict) and train.get("max_tokens") is not None:
        raise UserError("train.max_tokens is for pretraining (packed tokens per step); this stage takes "
                        "train.max_steps=N")
    if not isinstance(train, dict) or train.get("max_steps") is None:
        raise UserError("no training length: pass train.max_steps=N (or set train.max_steps in --config)")
    return build(cls, requested, getattr(args, "config", None) or "")


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _check_resume_agrees(saved: Section, cfg: Section, run_cfg: Path) -> None:
    old, new = _flat(saved.model_dump(mode="json")), _flat(cfg.model_dump(mode="json"))
    for key in sorted(old.keys() | new.keys()):
        if key not in RESUME_MAY_CHANGE and old.get(key) != new.get(key):
            raise UserError(f"--resume: {run_cfg} has {key}={old.get(key)!r} but this command gives "
                            f"{new.get(key)!r}; drop it to resume, or start a new --out")


def nested(flat: dict[str, Any]) -> dict[str, Any]:
    """{"data.train": x} -> {"data": {"train": x}} (None values dropped)."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        if value is None:
            continue
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


def add_stage_arguments(parser: argparse.ArgumentParser, data_help: str, formats: bool = True) -> None:
    parser.add_argument("--model", help="starting model: a model dir, a checkpoint step dir or a run dir")
    parser.add_argument("--data", help=data_help)
    parser.add_argument("--out", required=True, help="run directory (checkpoints, metrics.jsonl, config.yaml)")
    parser.add_argument("--config", help="YAML with the stage's sections (train, optim, data, ...); "
                                         "train.max_steps is required (here or as an override)")
    if formats:
        parser.add_argument("--format", help="data format (default: detected from the first record)")
    parser.add_argument("--on-error", choices=("raise", "skip"), help="malformed records: stop (default) or skip and count")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the newest complete checkpoint in --out with the run's config.yaml "
                             "(other options must agree with it, except train.halt_at_step / save_every / "
                             "keep_last / log_every / eval_every / trackers)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (metrics.jsonl is still written)")


def stage_command(config_cls: type[Section], stage, data_help: str, formats: bool = True):
    """(add_arguments, run) of an alignment stage's subcommand: --model/--data/--out/... flags, the
    config (`stage_config`), `stage(cfg, out, resume=, progress=)`, then a one-line summary."""

    def add_arguments(parser: argparse.ArgumentParser) -> None:
        add_stage_arguments(parser, data_help, formats)

    def run(args: argparse.Namespace) -> int:
        flags = nested({"init": args.model, "data.train": [args.data] if args.data else None,
                        "data.format": getattr(args, "format", None), "data.on_error": args.on_error})
        cfg = stage_config(config_cls, args, flags)
        print_summary(stage(cfg, args.out, resume=args.resume, progress=not args.no_progress))
        return 0

    return add_arguments, run


def load_start(init: str):
    """(Llama, Tokenizer, tokenizer dir) of the starting model."""
    from ..model import find_tokenizer_dir, load_model, resolve_model_dir
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


def run_template(template: str | None, tok, tok_dir: Path, out: Path) -> tuple[ChatTemplate, Path]:
    """The chat template to train with and the tokenizer dir to ship with the run: the starting
    tokenizer's own template, or `template`, saved with a copy of the tokenizer so that the
    exported tokenizer_config.json renders exactly what was trained on."""
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


def run_stage(cfg: Section, model: torch.nn.Module, objective, out: str | Path, resume: bool, tok_dir: Path,
              progress: bool = True, report: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train on the engine, which evaluates the starting model first (on the device, under the
    same autocast as later evaluations), and write RUN/summary.json with the before/after
    evaluation and the data report. A resumed run finds "before" in metrics.jsonl (step 0)."""
    from .engine import train

    out = Path(out)
    result = train(cfg, model, objective, out, resume=resume, tokenizer_dir=tok_dir, progress=progress,
                   eval_at_start=True)
    before = result.get("eval_start")
    if before is None:
        before = _logged_eval(out / "metrics.jsonl", step=0)
    summary = {"before": before, "after": result.get("eval"), "data": report or {}, **result}
    summary.pop("eval_start", None)
    if _is_main():
        from .checkpoint import write_text_atomic

        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / "summary.json", json.dumps(summary, indent=1, ensure_ascii=False) + "\n")
    return summary


def _logged_eval(path: Path, step: int) -> dict[str, float] | None:
    if not path.is_file():
        return None
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line) if line.strip() else {}
        if row.get("kind") == "eval" and row.get("step") == step:
            return {k: v for k, v in row.items() if k not in ("kind", "step")}
    return None


def _is_main() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


def print_summary(summary: dict[str, Any]) -> None:
    if _is_main():
        print(json.dumps({k: summary[k] for k in ("step", "before", "after", "checkpoint") if k in summary}))


# ----------------------------------------------------------------------------------------------
# SFT


class ChatData(Section):
    train: list[str] = Field(default_factory=list)  # chat files (JSON array or JSON lines)
    format: str = "auto"
    on_error: Literal["raise", "skip"] = "raise"
    valid: list[str] = Field(default_factory=list)  # held-out files; else valid_fraction of train
    valid_fraction: float = Field(0.05, ge=0, lt=1)
    template: str | None = None  # name (default, chatml), .jinja file or text; default: the tokenizer's
    pack: bool = True  # several conversations per row (document-masked)


class SFTConfig(Section):
    init: str = ""  # the starting model (model / checkpoint / run dir)
    data: ChatData = ChatData()
    lora: LoraConfig = LoraConfig()
    train: TrainConfig
    optim: OptimConfig = OptimConfig(lr=1e-4, weight_decay=0.0, warmup_steps=0)


def encode_conversations(convs, template: ChatTemplate, tok, max_len: int, length: LengthReport) -> list[Example]:
    out = []
    for conv in convs:
        ex = fit_length(template.encode(conv, tok), max_len, length)
        if ex is not None:
            out.append(ex)
    return out


def sft_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(mean cross-entropy over labelled next tokens, their count). Labels are aligned with the
    tokens, so the logits at t predict labels at t+1."""
    targets = next_token_targets(batch["labels"])
    n = int((targets != IGNORE_INDEX).sum())
    # the model's fused output projection + cross-entropy: the (B, T, vocab) logits never exist
    loss = model(batch["tokens"], doc_ids=batch.get("doc_ids"), targets=targets, ignore_index=IGNORE_INDEX,
                 reduction="sum")
    return loss / max(n, 1), n


class SFTObjective:
    def __init__(self, train: list[Example], held_out: list[Example], seq_len: int, micro_batch_size: int,
                 pad_id: int, seed: int = 0, pack_rows: bool = True, eval_batches: int = 8):
        self.train, self.held_out = train, held_out
        self.seq_len, self.micro_batch_size, self.pad_id, self.seed = seq_len, micro_batch_size, pad_id, seed
        self.pack_rows, self.eval_batches = pack_rows, eval_batches

    def _arrange(self, examples: list[Example]):
        if self.pack_rows:
            return pack(examples, self.seq_len, self.pad_id)
        return [pack([e], self.seq_len, self.pad_id)[0] for e in examples]

    def train_batches(self, rank: int, world: int) -> EpochBatches:
        return EpochBatches(self.train, self.micro_batch_size, rank=rank, world=world, seed=self.seed,
                            arrange=self._arrange, collate=collate_rows)

    def loss(self, model, batch):
        loss, n = sft_loss(model, batch)
        # tokens the model processed: the packed rows' real tokens, padding left out
        return loss, {"reply_tokens": float(n)}, int((batch["tokens"] != self.pad_id).sum())

    @torch.no_grad()
    def evaluate(self, model) -> dict[str, float]:
        """Mean loss per assistant token on held-out conversations."""
        if not self.held_out:
            return {}
        device = next(model.parameters()).device
        rows = self._arrange(self.held_out)
        total, count = 0.0, 0
        for i in range(0, min(len(rows), self.eval_batches * self.micro_batch_size), self.micro_batch_size):
            batch = {k: v.to(device) for k, v in collate_rows(rows[i:i + self.micro_batch_size]).items()}
            loss, n = sft_loss(model, batch)
            total += float(loss) * n
            count += n
        return {"reply_loss": total / max(count, 1)}


def sft(cfg: SFTConfig, out: str | Path, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    out = Path(out)
    if not cfg.data.train:
        raise UserError("no training data: pass --data FILE or set data.train=[...]")
    model, tok, tok_dir = load_start(cfg.init)
    seq_len = min(cfg.train.seq_len, model.cfg.max_seq_len)
    template, run_tok_dir = run_template(cfg.data.template, tok, tok_dir, out)
    reads = [ReadReport() for _ in cfg.data.train]
    convs = [c for path, r in zip(cfg.data.train, reads) for c in read_conversations(path, cfg.data.format, cfg.data.on_error, r)]
    held_convs: list = []
    if cfg.data.valid:
        for path in cfg.data.valid:
            held_convs += read_conversations(path, cfg.data.format, cfg.data.on_error)
    else:
        convs, held_convs = split_held_out(convs, cfg.data.valid_fraction, cfg.train.seed)
    length = LengthReport()
    train_ex = encode_conversations(convs, template, tok, seq_len, length)
    held_ex = encode_conversations(held_convs, template, tok, seq_len, LengthReport())
    report = {"files": [{"path": p, "format": r.format, "records": r.records, "skipped": len(r.skipped)}
                        for p, r in zip(cfg.data.train, reads)],
              "conversations": len(convs), "held_out": len(held_ex), "kept": length.kept,
              "truncated_at_turn": length.truncated, "dropped_too_long": length.dropped}
    if _is_main():
        for r in reads:
            for msg in r.skipped[:5]:
                print(f"skipped: {msg}")
        print(f"sft data: {json.dumps(report)}")
    if cfg.lora.enabled:
        model = LoraLlama(model, cfg.lora)
    objective = SFTObjective(train_ex, held_ex, seq_len, cfg.train.micro_batch_size, tok.pad_id, cfg.train.seed,
                             cfg.data.pack, cfg.train.eval_batches)
    return run_stage(cfg, model, objective, out, resume, run_tok_dir, progress, report)


ACCEPTS_OVERRIDES = True  # leftover `key.path=value` arguments are config overrides (see cli.py)


add_arguments, run = stage_command(SFTConfig, sft, "chat data file(s): alpaca / BELLE / ShareGPT / messages / "
                                                    "prompt-completion, JSON array or JSON lines")
