"""Memory per rank and checkpoint cost at world 1, 2 and 4 on CPU (gloo), against `openllama plan`.

    python bench/scale_bench.py [--dim 768 --layers 7 --vocab 8192] [--worlds 1 2 4] [--out result.json]

For each world size and strategy (ddp; fsdp2 from 2 ranks) it pretrains a >= 50M-parameter model for
a few steps under torchrun and reads the engine's own `memory` and `checkpoint` events from
metrics.jsonl: the largest rank's weights + gradients + optimizer state (bytes it holds), its peak
resident memory above where it started, and the seconds a checkpoint held training up (sync, and
for fsdp2 async). Each is printed beside what `openllama plan` predicts for the same config
(fp32, the plan's per-GPU model state + gathered units + activations). Then the checkpoint is
resumed (restore seconds) and exported to the HF format (peak memory of the export).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from openllama.config import ModelConfig  # noqa: E402
from openllama.plan import PRECISIONS, STRATEGIES, activation_bytes, model_state_bytes  # noqa: E402

# glibc returns large freed blocks to the OS only above its (adaptive) mmap threshold: pinned low,
# resident memory follows the live tensors instead of the heap's high-water mark
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "MALLOC_MMAP_THRESHOLD_": "65536"}


def write_tokens(root: Path, vocab: int) -> Path:
    """A small token-shard directory (random documents) the engine reads like any other."""
    sys.path.insert(0, str(ROOT / "tests"))
    from test_packing import write_token_shards

    rng = np.random.default_rng(0)
    docs = [rng.integers(4, vocab, int(rng.integers(40, 120))).tolist() for _ in range(400)]
    return write_token_shards(root / "tokens", docs, vocab_size=vocab)


def config(root: Path, tokens: Path, model: dict, steps: int, micro: int, seq: int) -> Path:
    cfg = {"model": model, "optim": {"lr": 1e-4},
           "train": {"max_steps": steps, "micro_batch_size": micro, "seq_len": seq, "save_every": 2, "keep_last": 4,
                     "eval_batches": 1, "log_every": 1},
           "data": {"train": str(tokens), "val_docs": 10, "verify_sha256": False}}
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def launch(world: int, cfg: Path, out: Path, *extra: str) -> None:
    launcher = ([sys.executable] if world == 1 else
                [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world)])
    cmd = [*launcher, "-m", "openllama.cli", "pretrain", "--config", str(cfg), "--out", str(out), "--no-progress",
           *extra]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")


def events(run: Path, name: str) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("event") == name]


def predicted(model: ModelConfig, strategy: str, world: int, micro: int, seq: int) -> dict[str, float]:
    prec = PRECISIONS["fp32"]
    plan_strategy = next(s for s in STRATEGIES if s.name == ("ddp" if strategy == "ddp" else "fsdp2/zero3"))
    state = model_state_bytes(model, prec, plan_strategy, world, prefetch=False)  # CPU: one unit gathered at a time
    act = activation_bytes(model, prec, micro, seq, checkpointing=False, attention="fused", autocast=False)
    static = state["weights"] + state["grads"] + state["optimizer"]
    return {"state": static, "peak": static + state["gathered"] + act}


def memory_of_run(world: int, strategy: str, cfg: Path, out: Path, *extra: str) -> tuple[float, float]:
    """Pretrain under `world` ranks; -> (largest rank's weights + grads + optimizer bytes, its peak
    resident memory above where it started), from the engine's `memory` event."""
    launch(world, cfg, out, f"train.strategy={strategy}", *extra)
    memory = events(out, "memory")[0]
    state = memory["weights_bytes"] + memory["grads_bytes"] + memory["optimizer_bytes"]
    return state, memory["peak_rss_bytes"] - memory["start_rss_bytes"]


def measure(world: int, strategy: str, cfg: Path, root: Path, model: ModelConfig, micro: int, seq: int,
            asynchronous: bool = False) -> dict:
    out = root / f"{strategy}_w{world}{'_async' if asynchronous else ''}"
    extra = [f"train.strategy={strategy}"] + (["train.async_save=true"] if asynchronous else [])
    state, rise = memory_of_run(world, strategy, cfg, out, *extra[1:])
    saves = events(out, "checkpoint")
    save_extra = max(s["save_extra_bytes"] for s in saves)
    launch(world, cfg, out, "--resume", *extra, "train.max_steps=6")
    restore = events(out, "resume")[-1]["restore_seconds"]
    plan = predicted(model, strategy, world, micro, seq)
    return {"world": world, "strategy": strategy, "async": asynchronous, "state_mb": state / 2**20,
            "plan_state_mb": plan["state"] / 2**20, "peak_rise_mb": rise / 2**20, "plan_peak_mb": plan["peak"] / 2**20,
            "save_extra_mb": save_extra / 2**20, "largest_tensor_mb": model.vocab_size * model.dim * 4 / 2**20,
            "save_s": float(np.median([s["seconds"] for s in saves])), "restore_s": restore}


def export_rise_mb(run: Path) -> float:
    probe = ("import torch, transformers; from openllama import hf\n"
             "def rss(k): return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith(k + ':'))\n"
             "b = rss('VmRSS'); open('/proc/self/clear_refs', 'w').write('5')\n"
             f"hf.export_hf({str(run)!r}, {str(run.parent / (run.name + '_hf'))!r})\n"
             "print((rss('VmHWM') - b) / 1024)")
    proc = subprocess.run([sys.executable, "-c", probe], env={**ENV, "PYTHONPATH": str(ROOT / "src")},
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-2000:])
    return float(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--layers", type=int, default=7)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--micro", type=int, default=1)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--out", default=None, help="also write the rows as JSON")
    args = ap.parse_args()
    model_dict = {"vocab_size": args.vocab, "dim": args.dim, "n_layers": args.layers, "n_heads": 12,
                  "multiple_of": 64, "max_seq_len": args.seq, "tie_embeddings": True}
    model = ModelConfig(**model_dict)
    from openllama.model import count_params

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cfg = config(root, write_tokens(root, args.vocab), model_dict, steps=4, micro=args.micro, seq=args.seq)
        for world in args.worlds:
            rows.append(measure(world, "ddp", cfg, root, model, args.micro, args.seq))
            if world > 1:
                rows.append(measure(world, "fsdp2", cfg, root, model, args.micro, args.seq))
                rows.append(measure(world, "fsdp2", cfg, root, model, args.micro, args.seq, asynchronous=True))
        export_from = root / f"fsdp2_w{max(args.worlds)}" / "checkpoints" / "step_0000004"
        export = export_rise_mb(export_from) if export_from.is_dir() else None
    print(f"model: {count_params(model) / 1e6:.1f}M parameters ({count_params(model) * 4 / 2**20:.0f} MB fp32); "
          f"micro batch {args.micro} x {args.seq} tokens; the largest rank of each run")
    print("| world | strategy | save | weights+grads+optim MB | plan MB | ratio | peak rise MB | plan peak MB | ratio "
          "| save extra MB (/ shard) | save s | restore s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['world']} | {r['strategy']} | {'async' if r['async'] else 'sync'} | {r['state_mb']:.0f} | "
              f"{r['plan_state_mb']:.0f} | {r['state_mb'] / r['plan_state_mb']:.3f} | {r['peak_rise_mb']:.0f} | "
              f"{r['plan_peak_mb']:.0f} | {r['peak_rise_mb'] / r['plan_peak_mb']:.2f} | "
              f"{r['save_extra_mb']:.0f} ({r['save_extra_mb'] / r['state_mb']:.2f}) | "
              f"{r['save_s']:.2f} | {r['restore_s']:.2f} |")
    if export is not None:
        print(f"export of the {max(args.worlds)}-rank sharded checkpoint to HF: peak memory rise {export:.0f} MB")
    if args.out:
        Path(args.out).write_text(json.dumps({"rows": rows, "export_rise_mb": export}, indent=1))


if __name__ == "__main__":
    main()
