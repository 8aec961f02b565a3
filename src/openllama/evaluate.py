"""Evaluation of a language model on held-out token shards: mean token loss and bits per byte.

Bits per byte makes models with different tokenizers comparable: the total negative log-likelihood
of a text in bits divided by its UTF-8 size. From a mean loss in nats per predicted token,
    bits_per_byte = loss / ln(2) * tokens_per_byte,
where tokens_per_byte = (num_tokens - num_docs) / num_bytes from the shards' manifest (each stored
document `[bos] + ids + [eos]` gives len - 1 predictions: its ids and the eos). On a subset of the
windows this is an estimate of the corpus figure.

`openllama evaluate --model DIR --data TOKENS_DIR [--device cuda --dtype bf16]` prints the results as JSON;
DIR is anything generate/serve read (a model, step or run directory, or an exported Hugging Face one).
`--lm-eval TASKS` runs lm-evaluation-harness tasks (names, YAML files or directories of YAMLs) on
the model through `lm_eval_backend.OpenLlamaLM`, prints lm-eval's table and, with `--lm-eval-out`,
writes the results as lm-eval writes them.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Callable

import torch

from .data.packing import TokenCorpus, eval_batches
from .labels import IGNORE_INDEX


@torch.no_grad()
def language_model_loss(model: torch.nn.Module, batches, device: torch.device | str | None = None,
                        per_token: Callable[[dict, torch.Tensor, torch.Tensor], None] | None = None) -> tuple[float, int]:
    """(mean loss in nats per predicted token, number of predicted tokens) over `batches`, through
    the same fused `forward(targets=)` as training (the (B, T, vocab) logits never exist).
    `per_token(batch, targets, losses)` gets each batch's per-target losses (flat, 0 where a target
    is not scored) from the same pass (e.g. validation loss per data category)."""
    device = device or next(model.parameters()).device
    total, count = 0.0, 0
    for batch in batches:
        targets = batch["targets"].to(device)
        extra = {}
        if per_token is not None:
            extra["row_losses"] = torch.empty(targets.numel(), dtype=torch.float32, device=device)
        total += float(model(batch["tokens"].to(device), doc_ids=batch["doc_ids"].to(device), targets=targets,
                             ignore_index=IGNORE_INDEX, reduction="sum", **extra))
        count += int((targets != IGNORE_INDEX).sum())
        if per_token is not None:
            per_token(batch, targets, extra["row_losses"])
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
    lm = parser.add_argument_group("lm-evaluation-harness (the `eval` extra)")
    lm.add_argument("--lm-eval", default=None, metavar="TASKS",
                    help="comma-separated lm-eval task/group names, task YAML files and directories of YAMLs "
                         "(e.g. configs/eval/demo; lm-eval's own tasks download from the Hugging Face hub)")
    lm.add_argument("--lm-eval-limit", type=float, default=None,
                    help="items per task (a fraction below 1: that share of each task)")
    lm.add_argument("--lm-eval-batch-size", type=int, default=16,
                    help="a batch holds this many rows of the model's full context (more, when shorter)")
    lm.add_argument("--lm-eval-num-fewshot", type=int, default=None, help="few-shot examples (default: the task's)")
    lm.add_argument("--lm-eval-add-bos", action="store_true",
                    help="start every context with BOS (as lm-eval's hf backend with add_bos_token=True); "
                         "default: as the exported tokenizer, which adds none")
    lm.add_argument("--lm-eval-bootstrap", type=int, default=100000, help="bootstrap iterations for stderr (0: none)")
    lm.add_argument("--lm-eval-out", default=None,
                    help="directory for lm-eval's results_<date>.json and per-task samples (as `lm_eval` writes them)")


def run(args: argparse.Namespace) -> int:
    from .errors import UserError
    from .generate import apply_threads, load_for_inference

    if not args.data and not args.tasks and not args.lm_eval:
        raise UserError("evaluate: give --data (held-out token shards), --tasks (a task file) and/or --lm-eval TASKS")
    apply_threads(args)
    # the same loading as generate/serve: our model, step and run dirs and exported HF dirs, on --device
    loaded = load_for_inference(args.model, device=args.device, dtype=args.dtype,
                                require_tokenizer=bool(args.tasks or args.lm_eval))
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
    if args.lm_eval:
        results["lm_eval"] = run_lm_eval(loaded, args)
    text = json.dumps(results, indent=2, ensure_ascii=False)
    printed = {k: v for k, v in results.items() if k != "tasks"}
    if args.tasks:  # the per-task answers go to --out only
        printed["tasks"] = {k: v for k, v in results["tasks"].items() if k != "samples"}
    if args.lm_eval:  # lm-eval's table is printed already; its per-task results go to --out
        printed["lm_eval"] = {k: v for k, v in results["lm_eval"].items() if k != "results"}
    print(json.dumps(printed, indent=2, ensure_ascii=False))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    return 0


def run_lm_eval(loaded, args: argparse.Namespace) -> dict:
    """lm-eval on the loaded model: prints lm-eval's table, writes its files under --lm-eval-out, and
    returns the scores (`lm_eval/<task>/<metric>`, `core`) with the tasks' results and the time taken."""
    import time

    from .lm_eval_backend import OpenLlamaLM, evaluate_tasks, flat_scores, save_results, short_table, split_specs

    limit = args.lm_eval_limit
    if limit is not None and limit >= 1:
        limit = int(limit)  # lm-eval reads a float as a fraction of each task
    lm = OpenLlamaLM(model=loaded.model, tokenizer=loaded.tokenizer, batch_size=args.lm_eval_batch_size,
                     add_bos_token=True if args.lm_eval_add_bos else None, name=str(args.model), progress=True)
    start = time.perf_counter()
    results = evaluate_tasks(lm, split_specs(args.lm_eval), limit=limit, num_fewshot=args.lm_eval_num_fewshot,
                             bootstrap_iters=args.lm_eval_bootstrap)
    seconds = time.perf_counter() - start
    print(short_table(results))
    files = save_results(results, args.lm_eval_out) if args.lm_eval_out else []
    return {"tasks": args.lm_eval, "limit": limit, "seconds": seconds, "scores": flat_scores(results),
            "results": _plain(results.get("results", {})), "files": [str(f) for f in files]}


def _plain(value):
    """lm-eval's numbers (numpy scalars among them) as plain JSON values."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    return value
