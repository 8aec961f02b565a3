"""Cost of the per-data-category metrics of pretraining (docs/data.md): one training step (forward,
backward, fused AdamW) without them (the loss alone, as before categories) and with them (the fused
loss's per-token losses in `row_losses`, `CategoryTally.add` per micro-batch, `pending` + `finish`
per step), and for comparison the per-token loss through reduction="none" (whose backward recomputes
the softmax). Repetitions are interleaved so machine noise hits every variant; the table shows
medians of wall-clock and process CPU time per step and their ratio to the plain loss. On a
shared machine whole steps vary by +-10% between runs, so the script also times the added work on
its own: the fused loss (forward + backward) with and without `row_losses`, and the tally's calls.

    PYTHONPATH=src python bench/category_bench.py                 # the demo's model, batch 16 x 128
    PYTHONPATH=src python bench/category_bench.py --shape larger  # d=256, 4 layers, vocab 8000, 8 x 256
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from openllama.config import ModelConfig  # noqa: E402
from openllama.labels import IGNORE_INDEX  # noqa: E402
from openllama.model import Llama, linear_cross_entropy  # noqa: E402
from openllama.train.metrics import CategoryTally  # noqa: E402

SHAPES = {  # (model, batch, seq_len)
    "demo": (dict(vocab_size=2048, dim=128, n_layers=4, n_heads=4, multiple_of=32, max_seq_len=256,
                  tie_embeddings=True), 16, 128),
    "larger": (dict(vocab_size=8000, dim=256, n_layers=4, n_heads=8, multiple_of=256, max_seq_len=256,
                    tie_embeddings=True), 8, 256),
}


def make_batch(vocab: int, batch: int, seq: int, categories: int, doc_len: int = 40) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, vocab, (batch, seq + 1), generator=gen)
    docs = (torch.arange(seq + 1) // doc_len).expand(batch, -1).contiguous()
    targets = tokens[:, 1:].clone()
    targets[docs[:, 1:] != docs[:, :-1]] = IGNORE_INDEX
    doc_cat = torch.randint(0, categories, (batch, seq // doc_len + 2), generator=gen)
    return {"tokens": tokens[:, :-1], "targets": targets, "doc_ids": docs[:, :-1],
            "category": doc_cat.gather(1, docs[:, :-1])}


def interleaved(variants: dict, reps: int, steps: int) -> dict[str, tuple[list[float], list[float]]]:
    """name -> (wall seconds, CPU seconds) per call, one sample per repetition; the order of the
    variants is reversed every other repetition (A B C, C B A, ...), so none always runs first."""
    for fn in variants.values():
        for _ in range(2):
            fn()
    out = {k: ([], []) for k in variants}
    names = list(variants)
    for rep in range(reps):
        for name in names if rep % 2 == 0 else names[::-1]:
            fn = variants[name]
            w0, c0 = time.perf_counter(), time.process_time()
            for _ in range(steps):
                fn()
            out[name][0].append((time.perf_counter() - w0) / steps)
            out[name][1].append((time.process_time() - c0) / steps)
    return out


def table(title: str, times: dict, base: str) -> None:
    bw, bc = (statistics.median(x) for x in times[base])
    print(title)
    print(f"  {'variant':36s} {'wall ms':>9s} {'ratio':>7s} {'cpu ms':>9s} {'ratio':>7s}")
    for name, (wall, cpu) in times.items():
        w, c = statistics.median(wall), statistics.median(cpu)
        print(f"  {name:36s} {1e3 * w:9.3f} {w / bw:7.3f} {1e3 * c:9.3f} {c / bc:7.3f}")


def added_work(cfg: dict, b: dict, tally: CategoryTally, reps: int) -> None:
    """The fused loss alone, with and without row_losses, and the tally's calls alone."""
    gen = torch.Generator().manual_seed(1)
    n = b["targets"].numel()
    h = torch.randn(n, cfg["dim"], generator=gen, requires_grad=True)
    w = torch.randn(cfg["vocab_size"], cfg["dim"], generator=gen, requires_grad=True)
    t = b["targets"].flatten()
    rows = torch.empty(n)

    def without() -> None:
        linear_cross_entropy(h, w, t).backward()

    def with_rows() -> None:
        linear_cross_entropy(h, w, t, row_losses=rows).backward()

    def tally_only() -> None:
        tally.add(rows, b["targets"], b["category"], IGNORE_INDEX)
        tally.finish(tally.pending(rows.device))

    table("fused loss (forward + backward) alone", interleaved({"without row_losses": without,
                                                                "with row_losses": with_rows}, reps, 5), "without row_losses")
    table("tally alone (add + pending + finish, one micro-batch)", interleaved({"tally": tally_only}, reps, 50), "tally")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="demo")
    ap.add_argument("--categories", type=int, default=22, help="22: The Pile's subsets")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per repetition and variant")
    ap.add_argument("--no-none", action="store_true", help="leave out the reduction='none' variant")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg, batch_size, seq = SHAPES[args.shape]
    torch.manual_seed(0)
    model = Llama(ModelConfig(**cfg))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    b = make_batch(cfg["vocab_size"], batch_size, seq, args.categories)
    tally = CategoryTally([f"c{i}" for i in range(args.categories)])

    def update(loss: torch.Tensor) -> None:
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def plain() -> None:
        update(model(b["tokens"], doc_ids=b["doc_ids"], targets=b["targets"]))

    def categories() -> None:
        rows = torch.empty(b["targets"].numel(), dtype=torch.float32)
        update(model(b["tokens"], doc_ids=b["doc_ids"], targets=b["targets"], row_losses=rows))
        tally.add(rows, b["targets"], b["category"], IGNORE_INDEX)
        tally.finish(tally.pending(rows.device))

    def reduction_none() -> None:
        rows = model(b["tokens"], doc_ids=b["doc_ids"], targets=b["targets"], reduction="none").flatten()
        update(rows.sum() / (b["targets"] != IGNORE_INDEX).sum())
        tally.add(rows, b["targets"], b["category"], IGNORE_INDEX)
        tally.finish(tally.pending(rows.device))

    variants = {"loss only (before)": plain, "row_losses + tally (after)": categories,
                "reduction='none' + tally": reduction_none}
    if args.no_none:
        del variants["reduction='none' + tally"]
    print(f"shape {args.shape}: {cfg}, batch {batch_size} x {seq}, {args.categories} categories, "
          f"{torch.get_num_threads()} threads, {args.reps} x {args.steps} steps")
    table("training step", interleaved(variants, args.reps, args.steps), "loss only (before)")
    added_work(cfg, b, tally, args.reps)


if __name__ == "__main__":
    main()
