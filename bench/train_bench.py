"""Training throughput and peak memory: our Llama vs transformers' LlamaForCausalLM (sdpa attention).

Both models get identical shapes and identical weights (ours converted with `openllama.hf`), the same
batches, the same loss (mean next-token cross-entropy) and the same optimizer (fused AdamW). Each
computes the loss its own way: transformers materialises the logits and calls F.cross_entropy (what
`labels=` does); ours calls `model(tokens, targets=...)`, the chunked output projection + cross-entropy
of `openllama.model.linear_cross_entropy`. A third row, "ours (logits + F.cross_entropy)", runs our
model through the transformers-style loss, to show what the fused loss contributes. Repetitions are interleaved (ours, theirs, ours, theirs, ...) so machine noise hits both;
the table shows medians and the ratio. Times are taken twice: wall clock, and the process's CPU
time, which on a shared machine leaves out the time spent waiting for a core (with `--threads 1` the
better measure; with more threads CPU time adds up the threads, so read the wall-clock columns).

- CPU (default): float32. MFU is against the float32 matmul peak measured in the same run (the best of
  a few large `torch.mm`). Peak memory is the high-water mark of live tensor bytes during one training
  step, from the profiler's allocator events (`profile_memory=True`), plus the bytes live when the
  step starts (weights, optimizer state, batch): the CPU counterpart of `torch.cuda.max_memory_allocated`.
  It counts tensors only, not the interpreter or library code (the same for both models).
- CUDA: bf16 autocast (weights and optimizer in float32), optional `--compile` for both models, MFU
  against the card's dense bf16 peak, peak memory from `torch.cuda.max_memory_allocated`.

    PYTHONPATH=src python bench/train_bench.py                     # CPU, ~5M params, batch 8x256
    PYTHONPATH=src python bench/train_bench.py --device cuda --preset 1b --compile
"""

from __future__ import annotations

import argparse
import gc
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from openllama.config import ModelConfig, read_yaml  # noqa: E402
from openllama.hf import to_hf_model  # noqa: E402
from openllama.model import Llama, count_params, flops_per_token  # noqa: E402

# dense bf16 tensor-core peaks (TFLOP/s), matched against torch.cuda.get_device_name()
GPU_BF16_PEAK = [("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("A100", 312e12),
                 ("L40S", 362e12), ("A10G", 70e12), ("L4", 121e12), ("RTX 4090", 165e12)]

# the CPU default shape: ~5M parameters, as in NOTES.md
BENCH_SHAPE = dict(vocab_size=8000, dim=256, n_layers=4, n_heads=8, multiple_of=256, max_seq_len=256,
                   tie_embeddings=True)


def model_config(args) -> ModelConfig:
    if args.preset is None:
        return ModelConfig(**BENCH_SHAPE)
    path = Path(args.preset)
    if not path.is_file():
        path = ROOT / "configs" / f"{args.preset}.yaml"
    return ModelConfig.model_validate(read_yaml(path)["model"])


def matmul_peak(device: str, dtype: torch.dtype, n: int = 2048, reps: int = 5) -> float:
    """Best FLOP/s of an n x n x n matmul (the machine's practical matmul peak)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(reps + 1):
        sync(device)
        t = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def gpu_peak(name: str) -> float | None:
    for key, peak in GPU_BF16_PEAK:
        if key in name:
            return peak
    return None


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class Runner:
    """One model + its optimizer; `step()` runs forward, loss, backward, optimizer step."""

    def __init__(self, name: str, model: torch.nn.Module, hf: bool, args, device: str, fused_loss: bool = True):
        self.name, self.model, self.hf, self.device = name, model.to(device).train(), hf, device
        self.fused_loss = fused_loss
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=True)
        self.autocast = device == "cuda"
        self.fwd = torch.compile(model) if args.compile else model
        self.times: list[float] = []
        self.cpu_times: list[float] = []
        self.losses: list[float] = []

    def loss(self, x, y):
        if self.hf:  # the logits, then the usual cross-entropy (what `labels=` does, minus the shift)
            logits = self.fwd(input_ids=x, use_cache=False).logits
        elif self.fused_loss:
            return self.fwd(x, targets=y)  # our chunked output projection + cross-entropy
        else:
            logits = self.fwd(x)
        return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())

    def step(self, x, y) -> float:
        with torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.autocast):
            loss = self.loss(x, y)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.detach()


def resident_bytes(runner: Runner, x, y) -> int:
    """What one model holds between steps: weights, optimizer state, the batch."""
    live = sum(t.numel() * t.element_size() for t in runner.model.parameters())
    live += sum(v.numel() * v.element_size() for s in runner.opt.state.values() for v in s.values()
                if torch.is_tensor(v))
    return live + (x.numel() + y.numel()) * x.element_size()


def peak_bytes(runner: Runner, x, y) -> int:
    """Resident bytes + the allocator's high-water mark above them during one training step (the
    other model's memory, resident in the same process, is not counted)."""
    gc.collect()
    if runner.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        runner.step(x, y)
        torch.cuda.synchronize()
        return resident_bytes(runner, x, y) + torch.cuda.max_memory_allocated() - before
    from torch._C._autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        runner.step(x, y)
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == DeviceType.CPU)
    cur = peak = 0
    for _, nbytes in events:
        cur += nbytes
        peak = max(peak, cur)
    return resident_bytes(runner, x, y) + peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--preset", help="a configs/ preset name or YAML path (default: a ~5M-param shape)")
    ap.add_argument("--batch", type=int, default=None, help="sequences per step (default 8 on CPU, 8 on GPU)")
    ap.add_argument("--seq", type=int, default=None, help="tokens per sequence (default: 256, or the preset's)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per repetition")
    ap.add_argument("--reps", type=int, default=5, help="interleaved repetitions per model")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per model first")
    ap.add_argument("--compile", action="store_true", help="torch.compile both models")
    ap.add_argument("--threads", type=int, help="CPU threads (default: torch's choice, one per core)")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    ap.add_argument("--only", choices=["ours", "transformers"], help="run one model only")
    ap.add_argument("--no-plain", action="store_true", help="skip the 'ours with the transformers-style loss' row")
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    cfg = model_config(args)
    T = args.seq or (256 if args.preset is None else cfg.max_seq_len)
    B = args.batch or 8
    if T > cfg.max_seq_len:
        cfg = cfg.model_copy(update={"max_seq_len": T})

    torch.manual_seed(0)
    ours = Llama(cfg)
    theirs = to_hf_model(ours)  # same weights, converted
    theirs.config._attn_implementation = "sdpa"  # transformers' default already; stated for the record
    runners = [Runner("ours", ours, False, args, device), Runner("transformers", theirs, True, args, device)]
    if not args.no_plain:
        clone = Llama(cfg)
        clone.load_state_dict(ours.state_dict())
        runners.append(Runner("ours (logits + F.cross_entropy)", clone, False, args, device, fused_loss=False))
    if args.only:
        runners = [r for r in runners if r.name == args.only]

    gen = torch.Generator().manual_seed(1)
    data = torch.randint(0, cfg.vocab_size, (args.warmup + args.steps, B, T + 1), generator=gen).to(device)

    if device == "cuda":
        name = torch.cuda.get_device_name()
        peak, peak_note = gpu_peak(name), "dense bf16 spec"
        hw = f"{name}, bf16 autocast"
    else:
        name = platform.processor() or platform.machine()
        peak, peak_note = matmul_peak("cpu", torch.float32), "measured fp32 torch.mm 2048^3, best of before/after"
        hw = f"CPU {name}, {torch.get_num_threads()} threads, float32"

    for r in runners:  # warm-up (and compile)
        for i in range(args.warmup):
            r.step(data[i, :, :-1], data[i, :, 1:])
        sync(device)
    for _ in range(args.reps):
        for r in runners:
            sync(device)
            t, c = time.perf_counter(), time.process_time()
            for i in range(args.warmup, args.warmup + args.steps):
                loss = r.step(data[i, :, :-1], data[i, :, 1:])
            sync(device)
            r.times.append(time.perf_counter() - t)
            r.cpu_times.append(time.process_time() - c)
            r.losses.append(float(loss))

    mem = {}
    if not args.no_memory:
        for r in runners:
            mem[r.name] = peak_bytes(r, data[0, :, :-1], data[0, :, 1:])

    if device == "cpu":  # measured again after the runs; the better one is nearer the truth on a busy machine
        peak = max(peak, matmul_peak("cpu", torch.float32))
    fpt = flops_per_token(cfg, T)
    print(f"\n## train_bench: {count_params(cfg) / 1e6:.1f}M params (dim {cfg.dim}, {cfg.n_layers} layers, "
          f"vocab {cfg.vocab_size}), batch {B}x{T}, {hw}{', compiled' if args.compile else ''}")
    if peak:
        print(f"peak for MFU: {peak / 1e9:,.0f} GFLOP/s ({peak_note}); {fpt / 1e6:.1f} MFLOP/token (train)")
    print(f"{args.reps} interleaved repetitions x {args.steps} steps; medians\n")
    print("| model | tokens/s | step (ms) | MFU | tokens/s (CPU time) | peak memory (MiB) | final loss |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    tps, cpu_tps = {}, {}
    for r in runners:
        step_s = statistics.median(r.times) / args.steps
        tps[r.name] = B * T / step_s
        cpu_tps[r.name] = B * T * args.steps / statistics.median(r.cpu_times)
        mfu = f"{100 * tps[r.name] * fpt / peak:.1f}%" if peak else "n/a"
        m = f"{mem[r.name] / 2**20:,.0f}" if r.name in mem else "-"
        print(f"| {r.name} | {tps[r.name]:,.0f} | {1000 * step_s:,.1f} | {mfu} | {cpu_tps[r.name]:,.0f} | {m} "
              f"| {r.losses[-1]:.4f} |")
    if "ours" in tps and "transformers" in tps:
        mline = f", peak memory {mem['ours'] / mem['transformers']:.2f}x" if mem else ""
        for clock, rates, attr in (("wall clock", tps, "times"), ("CPU time", cpu_tps, "cpu_times")):
            paired = [b / a for a, b in zip(getattr(runners[0], attr), getattr(runners[1], attr))]  # theirs / ours
            print(f"\nours / transformers ({clock}): tokens/s {rates['ours'] / rates['transformers']:.2f}x (ratio of "
                  f"medians); per repetition {', '.join(f'{p:.2f}' for p in paired)} "
                  f"(median {statistics.median(paired):.2f}x){mline}")


if __name__ == "__main__":
    main()
