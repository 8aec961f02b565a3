"""The demo's report: what each stage cost and what it taught, with intervals, as Markdown + PNGs.

`collect_stage` reads what a stage left behind (metrics.jsonl, summary.json, the evaluation JSON);
`checks` states the claims the demo is meant to show (SFT beats the base model beyond the 95%
interval, alignment raises its reward, the aligned model is not worse than SFT beyond the
interval); `write_report` writes OUT/report.md, OUT/results.json and the plots; `print_summary`
prints the short version.
"""

from __future__ import annotations

import json
import platform
import statistics
from pathlib import Path
from typing import Any

from .artifacts import METRICS_FILE
from .tasks import Accuracy, clearly_better
from .train.metrics import read_metrics

ALIGN_REWARD = {"dpo": "reward_margin", "grpo": "reward_mean"}  # the per-step signal that should rise


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def collect_stage(name: str, run_dir: Path, seconds: float, evaluation: dict) -> dict[str, Any]:
    """One stage's numbers: time, steps, tokens, final training loss, throughput, evaluation."""
    metrics = run_dir / METRICS_FILE
    records = read_metrics(metrics) if metrics.is_file() else []
    train = [r for r in records if r.get("kind") == "train"]
    tail = train[-max(1, len(train) // 10):]
    stage: dict[str, Any] = {
        "name": name, "run_dir": str(run_dir), "seconds": seconds, "steps": train[-1]["step"] if train else 0,
        "tokens": train[-1].get("tokens_seen", 0) if train else 0,
        "final_loss": _mean([r["loss"] for r in tail if "loss" in r]),
        "tokens_per_s": statistics.median([r["tokens_per_s"] for r in train if "tokens_per_s" in r]) if train else None,
    }
    summary = run_dir / "summary.json"
    if summary.is_file():
        s = json.loads(summary.read_text(encoding="utf-8"))
        stage["before"], stage["after"] = s.get("before"), s.get("after")
    key = ALIGN_REWARD.get(name)
    if key:
        values = [r[key] for r in train if key in r]
        k = max(1, len(values) // 5)
        stage["reward"] = {"metric": key, "first": _mean(values[:k]), "last": _mean(values[-k:]), "steps": len(values)}
    stage["eval"] = {k: v for k, v in evaluation.items() if k != "tasks"}
    tasks = evaluation.get("tasks", {})
    stage["tasks"] = {k: v for k, v in tasks.items() if k != "samples"}
    stage["answers"] = tasks.get("samples", [])
    return stage


def accuracy_of(stage: dict) -> Accuracy | None:
    o = stage.get("tasks", {}).get("overall")
    return Accuracy(o["correct"], o["n"]) if o else None


def checks(stages: list[dict]) -> list[dict[str, Any]]:
    """The claims the demo should show, each with whether it held and the numbers behind it."""
    by = {s["name"]: s for s in stages}
    out = []
    base, sft = by.get("pretrain"), by.get("sft")
    if base and sft:
        a, b = accuracy_of(sft), accuracy_of(base)
        out.append({"claim": "SFT beats the base model beyond the 95% intervals", "held": clearly_better(a, b),
                    "detail": f"SFT {a} vs base {b}"})
        rb, rs = base["tasks"].get("reply_loss"), sft["tasks"].get("reply_loss")
        out.append({"claim": "SFT lowers the loss of held-out replies", "held": rs < rb,
                    "detail": f"{rb:.3f} -> {rs:.3f} nats/token"})
    for name in ("dpo", "grpo"):
        st = by.get(name)
        if not st or not sft:
            continue
        r = st.get("reward") or {}
        before = (st.get("before") or {}).get(r.get("metric", ""))
        after = (st.get("after") or {}).get(r.get("metric", ""))
        rose = r.get("first") is not None and r["last"] > r["first"]
        detail = f"training {r.get('metric')}: {r.get('first', float('nan')):.4f} (first fifth of steps) -> " \
                 f"{r.get('last', float('nan')):.4f} (last fifth)"
        if before is not None and after is not None:
            rose = rose and after > before
            detail += f"; held-out {before:.4f} -> {after:.4f}"
        out.append({"claim": f"{name.upper()} raises its reward", "held": bool(rose), "detail": detail})
        a, s = accuracy_of(st), accuracy_of(sft)
        out.append({"claim": f"{name.upper()} is not worse than SFT beyond the intervals",
                    "held": not clearly_better(s, a), "detail": f"{name.upper()} {a} vs SFT {s}"})
        out.append({"claim": f"{name.upper()} beats SFT beyond the intervals (stretch goal)",
                    "held": clearly_better(a, s), "detail": f"{name.upper()} {a} vs SFT {s}"})
    return out


# ----------------------------------------------------------------------------------------------
# Writing


def _fmt(x: Any, spec: str = ".3f") -> str:
    return "—" if x is None else format(x, spec)


def _plot_accuracy(stages: list[dict], path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    accs = [(s["name"], accuracy_of(s)) for s in stages if accuracy_of(s)]
    if not accs:
        return None
    fig, ax = plt.subplots(figsize=(5, 3.2))
    xs = range(len(accs))
    vals = [100 * a.value for _, a in accs]
    lo = [100 * (a.value - a.interval[0]) for _, a in accs]
    hi = [100 * (a.interval[1] - a.value) for _, a in accs]
    ax.bar(xs, vals, color="#4c72b0")
    ax.errorbar(xs, vals, yerr=[lo, hi], fmt="none", ecolor="black", capsize=4)
    ax.set_xticks(list(xs), [n if n != "pretrain" else "base" for n, _ in accs])
    ax.set_ylabel("held-out exact match (%)")
    ax.set_title(f"task accuracy, 95% Wilson intervals (n={accs[0][1].n})")
    ax.set_ylim(0, 100)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _sample_rows(stages: list[dict], k: int) -> list[int]:
    """Indices of `k` held-out tasks, one per family in turn, the same for every stage."""
    answers = stages[0].get("answers", []) if stages else []
    seen, rows = set(), []
    for i, a in enumerate(answers):
        if a["family"] not in seen:
            seen.add(a["family"])
            rows.append(i)
        if len(rows) == k:
            break
    return rows


def _cell(text: str) -> str:
    return (text or "∅").replace("|", "\\|").replace("\n", " ")[:60]


def write_report(out: Path, results: dict[str, Any], cfg) -> Path:
    from .train.plot import plot_run

    out = Path(out)
    stages = results["stages"]
    results["checks"] = checks(stages)
    plots: dict[str, list[Path]] = {}
    for s in stages:
        try:
            plots[s["name"]] = plot_run(s["run_dir"])
        except Exception as exc:  # a missing plot must not lose the report
            print(f"note: no plots for {s['name']}: {exc}")
    acc_png = _plot_accuracy(stages, out / "accuracy.png")

    n = stages[0]["tasks"]["overall"]["n"] if stages and stages[0].get("tasks") else 0
    L = [f"# openllama demo: a chat model from nothing on the built-in corpus", "",
         f"Command: `{results.get('command') or f'openllama demo --out {out}'}` — "
         f"total {results['total_seconds'] / 60:.1f} min on {platform.machine()} ({_cpus()} CPUs).", "",
         "Every accuracy is greedy exact match on held-out tasks that no training stage saw "
         f"(the `{cfg.eval.split}` split, n = {n}, a small sample: the brackets are 95% Wilson intervals). "
         "The base model is asked in the chat format, which its pretraining text contains.", "",
         "## Stages", "",
         "| stage | time | steps | tokens | final train loss | tokens/s | held-out reply loss | task accuracy [95% CI] |",
         "|---|---|---|---|---|---|---|---|"]
    for s in stages:
        a = accuracy_of(s)
        L.append(f"| {s['name']} | {s['seconds']:.0f} s | {s['steps']} | {s['tokens']:,} | {_fmt(s['final_loss'])} | "
                 f"{_fmt(s['tokens_per_s'], ',.0f')} | {_fmt(s['tasks'].get('reply_loss'))} | {a if a else '—'} |")
    base = next((s for s in stages if s["name"] == "pretrain"), None)
    if base:
        e = base["eval"]
        L += ["", f"Held-out text after pretraining: loss {_fmt(e.get('loss'))} nats/token, "
                  f"{_fmt(e.get('bits_per_byte'))} bits per byte ({int(e.get('tokens', 0)):,} tokens)."]
    L += ["", "## What the run shows", ""]
    for c in results["checks"]:
        L.append(f"- {'✅' if c['held'] else '❌'} {c['claim']}: {c['detail']}")
    fams = sorted({f for s in stages for f in s.get("tasks", {}).get("by_family", {})})
    if fams:
        L += ["", "## Accuracy per task family", "", "| family | " + " | ".join(s["name"] for s in stages) + " |",
              "|---|" + "---|" * len(stages)]
        for f in fams:
            cells = []
            for s in stages:
                v = s["tasks"]["by_family"].get(f)
                cells.append(str(Accuracy(v["correct"], v["n"])) if v else "—")
            L.append(f"| {f} | " + " | ".join(cells) + " |")
        L += ["", "The held-out set is balanced: each family gets an equal share of the tasks (n per family "
                  "above), so no family with a large problem space dominates the overall accuracy."]
    L += _lm_eval_section(stages)
    L += ["", "## Curves", ""]
    if acc_png:
        L.append(f"![accuracy]({acc_png.name})")
    for name, files in plots.items():
        for f in files:
            L.append(f"![{name} {f.stem}]({Path(f).relative_to(out)})")
    rows = _sample_rows(stages, cfg.eval.samples)
    if rows:
        L += ["", "## Sample answers before and after each stage", "",
              "| prompt | reference | " + " | ".join(s["name"] for s in stages) + " |",
              "|---|---|" + "---|" * len(stages)]
        for i in rows:
            a0 = stages[0]["answers"][i]
            cells = []
            for s in stages:
                a = s["answers"][i]
                cells.append(f"{'✓' if a['correct'] else '✗'} {_cell(a['output'])}")
            L.append(f"| {_cell(a0['prompt'])} | {_cell(a0['answer'])} | " + " | ".join(cells) + " |")
    chat = results.get("chat")
    if chat:
        L += ["", "## A scripted chat with the exported model", "", "```", chat["transcript"].strip(), "```"]
    L += ["", "## Next", "", f"Serve it: `{results['serve']}`", ""]
    report = out / "report.md"
    report.write_text("\n".join(L), encoding="utf-8")
    slim = {**results, "stages": [{k: v for k, v in s.items() if k != "answers"} for s in stages]}
    (out / "results.json").write_text(json.dumps(slim, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return report


LM_EVAL_KINDS = {"demo_exact": "generate_until", "demo_choice": "multiple_choice", "demo_answer": "loglikelihood"}


def _lm_eval_rows(results: dict, own: dict | None) -> list[str]:
    rows = []
    for task, metrics in results.items():
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            if not filt or "stderr" in metric or not isinstance(value, (int, float)):
                continue
            same = ""
            if task == "demo_exact" and metric == "exact_match" and own:
                held = abs(value - own["accuracy"]) < 1e-9
                same = f"{100 * own['accuracy']:.1f}% exact match (n={own['n']}) {'✅ equal' if held else '≠'}"
            shown = f"{value:,.2f}" if metric == "perplexity" else f"{value:.3f}"
            rows.append(f"| {task} | {LM_EVAL_KINDS.get(task, '—')} | {metric} | {shown} | {same or '—'} |")
    return rows


def _lm_eval_section(stages: list[dict]) -> list[str]:
    """The final model on the demo's tasks as lm-eval tasks, beside the demo's own exact-match number."""
    stage = next((s for s in reversed(stages) if (s.get("eval") or {}).get("lm_eval")), None)
    if stage is None:
        return []
    lm = stage["eval"]["lm_eval"]
    core = lm.get("scores", {}).get("core")
    limit = f", the first {lm['limit']} items of each" if lm.get("limit") else ", every held-out item"
    L = ["", f"## The same tasks through lm-evaluation-harness ({stage['name']} model)", "",
         "The held-out tasks as lm-eval tasks (configs/eval/demo), run through our lm-eval backend by "
         f"`openllama evaluate --lm-eval` in {lm.get('seconds', 0):.0f} s{limit}: greedy answers by exact match "
         "(the same prompts and checker as the table above, so the same number), the reference against the "
         "task's wrong answers by log-likelihood, and whether the reference is the greedy continuation.", "",
         "| lm-eval task | output type | metric | value | the demo's own |", "|---|---|---|---|---|"]
    own = None if lm.get("limit") else stage.get("tasks", {}).get("overall")  # a subset has its own number
    L += _lm_eval_rows(lm.get("results", {}), own)
    if core is not None:
        L += ["", f"core (accuracy above chance, averaged over the tasks): {core:.3f}"]
    return L


def _cpus() -> int:
    import os

    return os.cpu_count() or 1


def print_summary(results: dict[str, Any]) -> None:
    out = results["out"]
    print(f"\n=== demo finished in {results['total_seconds'] / 60:.1f} min: {out}/report.md ===")
    print(f"  accuracy: greedy exact match on the held-out `{results.get('eval_split', 'test')}` tasks, "
          f"95% Wilson intervals")
    for s in results["stages"]:
        a = accuracy_of(s)
        extra = ""
        if s["name"] == "pretrain":
            extra = f", val loss {_fmt(s['eval'].get('loss'))}, {_fmt(s['eval'].get('bits_per_byte'))} bits/byte"
        if s.get("reward"):
            r = s["reward"]
            extra = f", {r['metric']} {_fmt(r['first'])} -> {_fmt(r['last'])}"
        print(f"  {s['name']:<9} {s['seconds']:>5.0f} s  accuracy {a}{extra}")
        fams = s.get("tasks", {}).get("by_family", {})
        if len(fams) > 1:
            print("            " + ", ".join(f"{f} {100 * v['accuracy']:.0f}% (n={v['n']})" for f, v in fams.items()))
    for s in results["stages"]:
        lm = (s.get("eval") or {}).get("lm_eval")
        if lm:
            shown = ", ".join(f"{k.removeprefix('lm_eval/')} {v:.3f}" for k, v in lm.get("scores", {}).items()
                              if "perplexity" not in k)
            print(f"  lm-eval ({s['name']} model, {lm.get('seconds', 0):.0f} s): {shown}")
    for c in results.get("checks", []):
        print(f"  [{'ok' if c['held'] else 'no'}] {c['claim']}")
    print(f"\nchat with it:  openllama chat --model {out}/hf\nserve it:      {results['serve']}")
