"""`openllama sft`: instruction tuning, full or LoRA, with loss on assistant replies only.

    openllama sft --model RUN_OR_MODEL_DIR --data chats.json --out runs/sft [--format auto]
                  [--on-error skip] [--config sft.yaml] [--resume] [lora.r=8] [train.max_steps=200]

Conversations (any format `data.chat` reads) are rendered with the chat template of the starting
model's tokenizer (or `data.template`), tokenised once, truncated only at the end of an assistant
turn (or dropped, counted), and packed several per row with document ids so no conversation
attends to another. The loss is the mean cross-entropy over the assistant tokens of a batch;
`evaluate` reports it on held-out conversations. With `lora.r > 0` only the adapters train and
every checkpoint holds the merged weights (exportable as is) plus the adapters (for resume).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field

from ..chat_template import ChatTemplate, Example
from ..config import Section
from ..data.chat import EpochBatches, LengthReport, collate_rows, fit_length, pack, read_conversations
from ..errors import UserError
from ..labels import IGNORE_INDEX, next_token_targets
from .engine import OptimConfig, TrainConfig
from .lora import LoraConfig, LoraLlama
from .objectives import Objective
from .stage import is_main, load_start, read_files, run_stage, run_template, split_held_out, stage_command

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


class SFTObjective(Objective):
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
    convs, report = read_files(cfg.data.train, read_conversations, fmt=cfg.data.format, on_error=cfg.data.on_error)
    if cfg.data.valid:
        held_convs, _ = read_files(cfg.data.valid, read_conversations, fmt=cfg.data.format,
                                   on_error=cfg.data.on_error)
    else:
        convs, held_convs = split_held_out(convs, cfg.data.valid_fraction, cfg.train.seed)
    length = LengthReport()
    train_ex = encode_conversations(convs, template, tok, seq_len, length)
    held_ex = encode_conversations(held_convs, template, tok, seq_len, LengthReport())
    report.update(conversations=len(convs), held_out=len(held_ex), kept=length.kept,
                  truncated_at_turn=length.truncated, dropped_too_long=length.dropped)
    if is_main():
        print(f"sft data: {json.dumps(report)}")
    if cfg.lora.enabled:
        model = LoraLlama(model, cfg.lora)
    objective = SFTObjective(train_ex, held_ex, seq_len, cfg.train.micro_batch_size, tok.pad_id, cfg.train.seed,
                             cfg.data.pack, cfg.train.eval_batches)
    return run_stage(cfg, model, objective, out, resume, run_tok_dir, progress, report)


ACCEPTS_OVERRIDES = True  # leftover `key.path=value` arguments are config overrides (see cli.py)


add_arguments, run = stage_command(SFTConfig, sft, "chat data file(s): alpaca / BELLE / ShareGPT / messages / "
                                                    "prompt-completion, JSON array or JSON lines")
