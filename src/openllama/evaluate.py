"""Evaluation of a language model on held-out token shards: mean token loss and bits per byte.

Bits per byte makes models with different tokenizers comparable: the total negative log-likelihood
of a text in bits divided by its UTF-8 size. From a mean loss in nats per predicted token,
    bits_per_byte = loss / ln(2) * tokens_per_byte,
where tokens_per_byte = (num_tokens - num_docs) / num_bytes from the shards' manifest (each stored
document `[bos] + ids + [eos]` gives len - 1 predictions: its ids and the eos). On a subset of the
windows this is an estimate of the corpus figure.

`openllama evaluate --model DIR --data TOKENS_DIR [--device cuda --dtype bf16]` prints the results as JSON;
DIR is anything generate/serve read (a model, step or run directory, or an exported Hugging Face one).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from .data.packing import TokenCorpus, eval_batches
from .labels import IGNORE_INDEX


@torch.no_grad()
def language_model_loss(model: torch.nn.Module, batches, device: torch.device | str | None = None) -> tuple[float, int]:
    """(mean loss in nats per predicted token, number of predicted tokens) over `batches`, through
    the same fused `forward(targets=)` as training (the (B, T, vocab) logits never exist)."""
    device = device or next(model.parameters()).device
    total, count = 0.0, 0
    for batch in batches:
        targets = batch["targets"].to(device)
        total += float(model(batch["tokens"].to(device), doc_ids=batch["doc_ids"].to(device), targets=targets,
                             ignore_index=IGNORE_INDEX, reduction="sum"))
        count += int((targets != IGNORE_INDEX).sum())
    return (total / count if count else float("nan")), count


def bits_per_byte(loss_nats: float, tokens_per_byte: float) -> float:
    return loss_nats / math.log(2) * tokens_per_byte


def evaluate_corpus(model: torch.nn.Module, corpus: TokenCorpus, seq_len: int, batch_size: int,
                    max_batches: int | None = None) -> dict[str, float]:
    """Loss, perplexity and bits per byte on the first `max_batches` windows of a held-out corpus."""
    was_training = model.training
    model.eval()
    loss, count = language_model_loss(model, eval_batches(corpus, seq_len, batch_size, max_batches))
    model.train(was_training)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "bits_per_byte": bits_per_byte(loss, corpus.tokens_per_byte),
            "tokens": float(count)}


# -- command line ----------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .generate import add_model_arguments

    add_model_arguments(parser)  # --model (model/step/run/HF dir), --device, --dtype, --compile, --threads
    parser.add_argument("--data", default=None, help="a token-shard directory (held-out text)")
    parser.add_argument("--tasks", default=None,
                        help="a task file (JSON lines of messages + answer, e.g. the built-in tasks/test.jsonl): "
                             "greedy exact-match accuracy in the chat format with a 95%% interval, and reply loss")
    parser.add_argument("--max-new-tokens", type=int, default=24, help="answer length limit for --tasks")
    parser.add_argument("--seq-len", type=int, default=None, help="window length (default: the model's max_seq_len)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-batches", type=int, default=None, help="evaluate only the first N batches")
    parser.add_argument("--out", default=None, help="also write the JSON results to this file")


def run(args: argparse.Namespace) -> int:
    from .errors import UserError
    from .generate import apply_threads, load_for_inference

    if not args.data and not args.tasks:
        raise UserError("evaluate: give --data (held-out token shards) and/or --tasks (a task file)")
    apply_threads(args)
    # the same loading as generate/serve: our model, step and run dirs and exported HF dirs, on --device
    loaded = load_for_inference(args.model, device=args.device, dtype=args.dtype, require_tokenizer=bool(args.tasks))
    cfg, weight = loaded.model.cfg, next(loaded.model.parameters())
    scorer = torch.compile(loaded.model) if args.compile else loaded.model
    results = {"model": str(args.model), "device": str(weight.device), "dtype": str(weight.dtype).removeprefix("torch.")}
    if args.data:
        corpus = TokenCorpus(args.data)
        vocab = corpus.manifest.get("tokenizer", {}).get("vocab_size")
        if vocab is not None and vocab > cfg.vocab_size:
            raise UserError(f"{args.data}: tokenizer vocab_size {vocab} is larger than the model's {cfg.vocab_size}")
        seq_len = args.seq_len or cfg.max_seq_len
        results.update(data=str(args.data), seq_len=seq_len,
                       **evaluate_corpus(scorer, corpus, seq_len, args.batch_size, args.max_batches))
    if args.tasks:
        from .tasks import load_tasks, task_report

        results["tasks"] = task_report(loaded.model, loaded.tokenizer, load_tasks(args.tasks),
                                       max_new_tokens=args.max_new_tokens)
        results["tasks"]["file"] = str(args.tasks)
    text = json.dumps(results, indent=2, ensure_ascii=False)
    printed = {k: v for k, v in results.items() if k != "tasks"}
    if args.tasks:  # the per-task answers go to --out only
        printed["tasks"] = {k: v for k, v in results["tasks"].items() if k != "samples"}
    print(json.dumps(printed, indent=2, ensure_ascii=False))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    return 0
