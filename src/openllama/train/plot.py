"""`openllama plot RUN_DIR`: loss and throughput curves of a run as PNG, from its metrics.jsonl.

Writes RUN_DIR/plots/loss.png (training loss per step, with validation loss where evaluated),
RUN_DIR/plots/throughput.png (tokens/s per step, and MFU where known), when the run evaluated
lm-eval tasks (`train.eval_tasks`), RUN_DIR/plots/lm_eval.png: each task's accuracies and `core`,
their average above chance, and when it logged data categories (pretraining on more than one,
docs/data.md), RUN_DIR/plots/categories.png: train and validation loss and tokens seen per category.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import UserError
from .metrics import read_metrics


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{path}: no metrics (is {run_dir} a run directory?)")
    records = read_metrics(path)
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval" and "val_loss" in r]
    if not train:
        raise UserError(f"{path}: no training steps recorded yet")
    out = Path(out_dir) if out_dir else run_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    steps = [r["step"] for r in train]

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [r["loss"] for r in train], lw=1, label="train loss")
    if evals:
        ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(run_dir.name)
    loss_png = _save(fig, [ax], out / "loss.png", legend={})

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [r.get("tokens_per_s") or 0 for r in train], lw=1, color="tab:green")
    ax.set_xlabel("step")
    ax.set_ylabel("tokens/s")
    mfu = [(r["step"], 100 * r["mfu"]) for r in train if r.get("mfu") is not None]
    if mfu:
        ax2 = ax.twinx()
        ax2.plot(*zip(*mfu), lw=1, color="tab:orange", alpha=0.6)
        ax2.set_ylabel("MFU (%)")
    ax.set_title(f"{run_dir.name}: throughput")
    tput_png = _save(fig, [ax], out / "throughput.png")
    lm_png = plot_lm_eval(records, out / "lm_eval.png", run_dir.name)
    cat_png = plot_categories(records, out / "categories.png", run_dir.name)
    return [loss_png, tput_png] + [p for p in (lm_png, cat_png) if p]


def _category_names(records: list[dict], prefix: str) -> list[str]:
    return sorted({k[len(prefix):] for r in records for k in r if k.startswith(prefix)})


def _smooth(values: list[float], window: int) -> list[float]:
    """Trailing mean over `window` points: one category's loss on one step rests on few tokens."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def plot_categories(records: list[dict], path: Path, title: str) -> Path | None:
    """Per data category, one colour each: train loss (`loss/<name>`, trailing mean over 10 logged
    steps), validation loss (`val_loss/<name>`, dots) and cumulative tokens seen
    (`tokens_seen/<name>`); None when the run logged no categories."""
    import matplotlib.pyplot as plt

    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    names = sorted(set(_category_names(train, "loss/")) | set(_category_names(evals, "val_loss/"))
                   | set(_category_names(train, "tokens_seen/")))
    if not names:
        return None
    fig, (ax_loss, ax_tok) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, name in enumerate(names):
        color = f"C{i % 10}"
        points = [(r["step"], r[f"loss/{name}"]) for r in train if f"loss/{name}" in r]
        if points:
            steps, values = zip(*points)
            ax_loss.plot(steps, _smooth(list(values), 10), lw=1, color=color, label=f"{name} (train)")
        points = [(r["step"], r[f"val_loss/{name}"]) for r in evals if f"val_loss/{name}" in r]
        if points:
            ax_loss.plot(*zip(*points), "o--", ms=4, lw=1, color=color, label=f"{name} (val)")
        points = [(r["step"], r[f"tokens_seen/{name}"]) for r in train if f"tokens_seen/{name}" in r]
        if points:
            ax_tok.plot(*zip(*points), lw=1.5, color=color, label=name)
    ax_loss.set(xlabel="step", ylabel="loss (nats/token)", title=f"{title}: loss per category")
    ax_tok.set(xlabel="step", ylabel="tokens seen", title="tokens seen per category")
    return _save(fig, [ax_loss, ax_tok], path, legend={"fontsize": 7})


# lm-eval metrics on a 0..1 scale worth a line (perplexities and the like are not)
_LM_EVAL_ACCURACY = ("acc", "acc_norm", "exact_match")


def plot_lm_eval(records: list[dict], path: Path, title: str) -> Path | None:
    """Accuracy-like `lm_eval/<task>/<metric>` scores per evaluation step and `core` (bold); None
    when the run logged none."""
    import matplotlib.pyplot as plt

    evals = [r for r in records if r.get("kind") == "eval"]
    keys = sorted({k for r in evals for k in r
                   if k.startswith("lm_eval/") and k.split("/")[2] in _LM_EVAL_ACCURACY})
    if not keys and not any("core" in r for r in evals):
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in keys:
        points = [(r["step"], r[key]) for r in evals if key in r]
        ax.plot(*zip(*points), "o-", lw=1, ms=3, label=key.removeprefix("lm_eval/"))
    core = [(r["step"], r["core"]) for r in evals if "core" in r]
    if core:
        ax.plot(*zip(*core), "o-", lw=2.5, color="black", label="core (above chance)")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("score")
    ax.set_title(f"{title}: lm-eval tasks")
    return _save(fig, [ax], path, legend={"fontsize": 7})


def _save(fig, axes, path: Path, legend: dict | None = None) -> Path:
    """Grid (and a legend, given its options) on each axis, then the PNG; the figure is closed."""
    import matplotlib.pyplot as plt

    for ax in axes:
        ax.grid(alpha=0.3)
        if legend is not None:
            ax.legend(**legend)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a run directory with metrics.jsonl")
    parser.add_argument("--out", default=None, help="where the PNGs go (default: RUN_DIR/plots)")


def run(args: argparse.Namespace) -> int:
    for path in plot_run(args.run_dir, args.out):
        print(path)
    return 0
