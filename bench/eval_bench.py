"""lm-evaluation-harness: our backend (`openllama`) vs lm-eval's own `hf` backend on the export.

Both evaluate the same tasks on the same weights in the same run: the demo's three lm-eval tasks
(configs/eval/demo: generate_until exact match, multiple choice, loglikelihood) over the built-in
test tasks, one task at a time. Ours loads the openllama model directory; `hf` loads
`openllama export` of it (float32, device cpu, the same batch size). Each repetition times, per
task, the whole `simple_evaluate` call (end to end: loading the model, lm-eval building the
requests from the dataset, its environment report, scoring) and, inside it, the model calls alone
(the backend's loglikelihood / generate_until: what differs between the two; the rest is the same
lm-eval code), as wall clock and this process's CPU time. Repetitions are interleaved (ours, hf,
ours, ...) so machine noise hits both; medians and ratios. The metrics of the two must be equal
(checked every repetition).

The model is a random-weight Llama of the demo's size by default (dim 128, 4 layers, vocab 2048,
256 context: what the demo evaluates) with a tokenizer trained on the built-in corpus, or any
model / run directory (`--model runs/demo/dpo`, exported here first).

    PYTHONPATH=src python bench/eval_bench.py                          # demo-sized model, 2 threads
    PYTHONPATH=src python bench/eval_bench.py --model runs/demo/dpo --limit 200
"""

from __future__ import annotations

import argparse
import logging
import math
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from openllama.lm_eval_backend import OpenLlamaLM, evaluate_tasks, task_manager_for, write_demo_tasks  # noqa: E402

TASKS = ("demo_exact", "demo_choice", "demo_answer")
KIND = {"demo_exact": "generate_until", "demo_choice": "multiple_choice", "demo_answer": "loglikelihood"}


def build_model(work: Path, dim: int, layers: int, heads: int, vocab: int, seed: int) -> Path:
    """A random-weight Llama with a 2048-token tokenizer trained on the built-in corpus (a larger
    `vocab` gives the model that many output rows, as a real vocabulary would)."""
    from openllama.config import ModelConfig
    from openllama.data.builtin import pretrain_documents
    from openllama.model import Llama, save_model
    from openllama.tokenizer import train_tokenizer

    out = work / "model"
    docs = [d["text"] for d in pretrain_documents(seed, "train", 3000)]
    tok = train_tokenizer(docs, out, 2048)
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=max(vocab, tok.vocab_size), dim=dim, n_layers=layers, n_heads=heads,
                      multiple_of=32, max_seq_len=256, tie_embeddings=True)
    save_model(Llama(cfg), out)
    return out


def build_tasks(work: Path, seed: int, items: int) -> Path:
    from openllama.data.builtin import BuiltinConfig, write_builtin

    cfg = BuiltinConfig(corpus={"docs": 200, "valid_docs": 10}, eval_test=items, eval_valid=10, sft_train=10,
                        preference_pairs=10, rl_prompts=10,
                        tasks={"families": ["add", "compare", "count", "upper"], "max_operand": 19, "max_items": 4})
    paths = write_builtin(work / "data", seed, cfg)
    return write_demo_tasks(work / "tasks", paths["tasks_test"])


def ours(model_dir: Path, task: str, tasks_dir: Path, batch: int, limit: int | None) -> dict:
    lm = OpenLlamaLM(str(model_dir), batch_size=batch)
    return evaluate_tasks(lm, [str(tasks_dir / f"{task}.yaml")], limit=limit, bootstrap_iters=0, log_samples=False)


def hf(hf_dir: Path, task: str, tasks_dir: Path, batch: int, limit: int | None) -> dict:
    from lm_eval import simple_evaluate

    manager, names = task_manager_for([str(tasks_dir / f"{task}.yaml")])
    return simple_evaluate(model="hf", model_args={"pretrained": str(hf_dir), "dtype": "float32"}, device="cpu",
                           batch_size=batch, tasks=names, task_manager=manager, limit=limit, bootstrap_iters=0,
                           log_samples=False)


def metrics(results: dict, task: str) -> dict[str, float]:
    return {k: float(v) for k, v in results["results"][task].items() if "," in k and "stderr" not in k}


def same(a: dict[str, float], b: dict[str, float]) -> bool:
    """Equal accuracies; perplexities equal to float32 rounding (per-item log-likelihoods agree to ~1e-5)."""
    return a.keys() == b.keys() and all(math.isclose(a[k], b[k], rel_tol=1e-4) for k in a)


class ModelCalls:
    """Wall and CPU seconds spent in the request methods of the lm-eval model classes."""

    METHODS = ("loglikelihood", "loglikelihood_rolling", "generate_until")

    def __init__(self):
        from lm_eval.models.huggingface import HFLM

        self.wall = self.cpu = 0.0
        for cls in (OpenLlamaLM, HFLM):
            for name in self.METHODS:
                setattr(cls, name, self._timed(getattr(cls, name)))

    def _timed(self, fn):
        def run(*args, **kwargs):
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.wall += time.perf_counter() - t0
                self.cpu += time.process_time() - c0
        return run

    def take(self) -> tuple[float, float]:
        out, self.wall, self.cpu = (self.wall, self.cpu), 0.0, 0.0
        return out


def measure(runners: dict, task: str, reps: int, calls: ModelCalls) -> dict[str, list[tuple[float, ...]]]:
    """(end-to-end wall, CPU, model-call wall, CPU) seconds per repetition and backend; CPU time
    leaves out the time spent waiting for a core on a shared machine."""
    times: dict[str, list[tuple[float, ...]]] = {k: [] for k in runners}
    for _ in range(reps):
        seen = {}
        for name, run in runners.items():
            calls.take()
            t0, c0 = time.perf_counter(), time.process_time()
            seen[name] = metrics(run(task), task)
            times[name].append((time.perf_counter() - t0, time.process_time() - c0, *calls.take()))
            print(f"  {task} {name}: " + ", ".join(f"{v:.2f}" for v in times[name][-1]), flush=True)
        if not same(seen["openllama"], seen["hf"]):
            raise SystemExit(f"{task}: metrics differ: openllama {seen['openllama']} vs hf {seen['hf']}")
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="an openllama model/step/run dir (default: a random demo-sized one)")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=2048, help="the model's vocabulary (output rows)")
    p.add_argument("--items", type=int, default=400, help="built-in test tasks to write")
    p.add_argument("--limit", type=int, default=None, help="items per task")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    logging.disable(logging.WARNING)  # lm-eval's per-task notices
    from openllama.hf import export_hf

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = Path(args.model) if args.model else build_model(work, args.dim, args.layers, args.heads, args.vocab, args.seed)
        hf_dir = export_hf(model_dir, work / "hf")
        tasks_dir = build_tasks(work, args.seed, args.items)
        runners = {"openllama": lambda t: ours(model_dir, t, tasks_dir, args.batch_size, args.limit),
                   "hf": lambda t: hf(hf_dir, t, tasks_dir, args.batch_size, args.limit)}
        calls = ModelCalls()
        for task in TASKS:  # warm-up: dataset caches, imports, kernels
            runners["openllama"](task), runners["hf"](task)
        rows, total = [], {"openllama": [0.0] * 4, "hf": [0.0] * 4}
        for task in TASKS:
            times = measure(runners, task, args.reps, calls)
            med = {k: [statistics.median(t[i] for t in v) for i in range(4)] for k, v in times.items()}
            for k in total:
                total[k] = [a + b for a, b in zip(total[k], med[k])]
            rows.append(_row(f"{task} ({KIND[task]})", med))
    print(f"\n{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} threads, "
          f"batch {args.batch_size}, {args.limit or args.items} items per task, median of {args.reps}; "
          f"model: {args.model or f'random, dim {args.dim}, {args.layers} layers, vocab {args.vocab}, 256 context'}\n")
    print("| task | end to end: openllama (s) | hf (s) | speed-up | model calls: openllama (s) | hf (s) | speed-up "
          "| model calls, CPU: openllama (s) | hf (s) | speed-up |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows + [_row("all three", total)]))


def _row(name: str, med: dict[str, list[float]]) -> str:
    o, h = med["openllama"], med["hf"]
    cells = [f"{o[i]:.2f} | {h[i]:.2f} | {h[i] / o[i]:.2f}x" for i in (0, 2, 3)]
    return f"| {name} | " + " | ".join(cells) + " |"


if __name__ == "__main__":
    main()
