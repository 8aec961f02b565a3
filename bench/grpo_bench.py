"""GRPO steps per second on the demo's shapes: this tree against a baseline tree, same run.

    python bench/grpo_bench.py --model runs/demo/sft --prompts runs/demo/data/rl/train.jsonl \
        [--baseline REF] [--steps 6] [--repeats 3] [--threads 2]

One GRPO step = sample `group_size` completions for each of `micro_batch_size` prompts, score them
(exact match), the policy's and the reference's log-probs, backward, AdamW step: the objective's
`loss` + backward + optimizer, timed after one warm-up step. `--baseline REF` (a git ref, e.g. the
commit before the fast rollouts) is extracted with `git archive` and timed in the same run, the two
alternating, so a busy machine slows both alike; we report medians of the per-step times and the
ratio. Also reported: how the step splits into rollout (sampling) and update.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(args: argparse.Namespace) -> None:
    """Time steps in this process with whatever `openllama` is on sys.path; print JSON."""
    import torch

    torch.set_num_threads(args.threads)
    from openllama.train.grpo import GRPOConfig, GRPOObjective, read_prompts
    from openllama.train.stage import load_start, run_template

    model, tok, tok_dir = load_start(args.model)
    template, _ = run_template(None, tok, Path(tok_dir), Path(tempfile.mkdtemp()))
    prompts = read_prompts(args.prompts)
    cfg = GRPOConfig(group_size=args.group_size, max_new_tokens=args.max_new_tokens)
    obj = GRPOObjective(prompts, [], model, tok, template, cfg, args.prompts_per_step, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    batches = iter(obj.train_batches(0, 1))
    sample_time = []
    original = obj._sample

    def timed_sample(*a, **k):
        t = time.perf_counter()
        out = original(*a, **k)
        sample_time.append(time.perf_counter() - t)
        return out

    obj._sample = timed_sample
    steps = []
    for i in range(args.steps + 1):
        batch = next(batches)
        t = time.perf_counter()
        loss, metrics, _ = obj.loss(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:  # the first step warms up allocators and caches
            steps.append(time.perf_counter() - t)
    print(json.dumps({"step_s": steps, "sample_s": sample_time[1:]}))


def run_tree(src: Path, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", "--model", args.model, "--prompts", args.prompts,
           "--steps", str(args.steps), "--threads", str(args.threads), "--group-size", str(args.group_size),
           "--prompts-per-step", str(args.prompts_per_step), "--max-new-tokens", str(args.max_new_tokens)]
    env = dict(os.environ, PYTHONPATH=str(src))
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="the starting policy (the demo's SFT run)")
    ap.add_argument("--prompts", required=True, help="RL prompts (the demo's data/rl/train.jsonl)")
    ap.add_argument("--baseline", default=None, help="a git ref to time in the same run")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--prompts-per-step", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=12)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    trees = {"this tree": ROOT / "src"}
    if args.baseline:
        base = Path(tempfile.mkdtemp(prefix="grpo_base_"))
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.baseline, "src"], capture_output=True,
                                 check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(base)], input=archive, check=True)
        trees[f"baseline {args.baseline}"] = base / "src"
    times: dict[str, dict[str, list[float]]] = {name: {"step_s": [], "sample_s": []} for name in trees}
    for _ in range(args.repeats):
        for name, src in trees.items():
            got = run_tree(src, args)
            for key in got:
                times[name][key] += got[key]
    print(f"GRPO step, {args.prompts_per_step} prompts x {args.group_size} samples, {args.max_new_tokens} new "
          f"tokens, {args.threads} threads; medians of {args.steps} steps x {args.repeats} runs")
    print("| tree | s/step | steps/s | rollout s | update s |")
    print("|---|---|---|---|---|")
    med = {}
    for name, t in times.items():
        step, sample = statistics.median(t["step_s"]), statistics.median(t["sample_s"])
        med[name] = step
        print(f"| {name} | {step:.3f} | {1 / step:.2f} | {sample:.3f} | {step - sample:.3f} |")
    if args.baseline:
        print(f"speed-up: {med[f'baseline {args.baseline}'] / med['this tree']:.2f}x steps/s")


if __name__ == "__main__":
    main()
