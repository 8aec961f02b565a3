"""Run metrics: the JSONL log, throughput and MFU, peak FLOP/s of the device, loss-spike detection,
and the per-data-category tally of pretraining."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from ..atomic import write_text_atomic

# Dense bf16 peak FLOP/s (no sparsity) of common accelerators, matched by substring of the
# device name (first match wins, so the more specific names come first).
GPU_PEAK_BF16 = [
    ("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("H800", 989e12), ("GH200", 989e12),
    ("B200", 2250e12), ("A100", 312e12), ("A800", 312e12), ("A10G", 70e12), ("A10", 125e12),
    ("L40S", 362e12), ("L40", 181e12), ("L4", 121e12), ("RTX 4090", 165e12), ("RTX 3090", 71e12),
    ("V100", 125e12), ("T4", 65e12), ("MI300X", 1307e12), ("MI250X", 383e12),
]

_CPU_PEAK: float | None = None


def measure_cpu_matmul_peak(n: int = 1024, repeats: int = 3, refresh: bool = False) -> float:
    """float32 FLOP/s of a large torch.mm on this CPU (best of a few), measured once per process;
    `refresh` measures again and keeps the best (a first measurement on a busy machine is low)."""
    global _CPU_PEAK
    if _CPU_PEAK is None or refresh:
        gen = torch.Generator().manual_seed(0)  # never the global RNG: resume must stay exact
        a, b = torch.randn(n, n, generator=gen), torch.randn(n, n, generator=gen)
        torch.mm(a, b)  # warm up
        best = math.inf
        for _ in range(repeats):
            t0 = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - t0)
        _CPU_PEAK = max(_CPU_PEAK or 0.0, 2 * n ** 3 / best)
    return _CPU_PEAK


def peak_flops(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> float | None:
    """Peak FLOP/s per device for MFU: a table by GPU name (bf16; float32 taken as half of it
    on tensor-core parts is not assumed, so fp32 on GPU reports None), a measured matmul on CPU."""
    if device.type == "cpu":
        return measure_cpu_matmul_peak()
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        name = torch.cuda.get_device_name(device)
        for key, value in GPU_PEAK_BF16:
            if key in name:
                return value
    return None


def state_bytes(model: torch.nn.Module, optimizer) -> dict[str, int]:
    """Bytes this rank holds of weights, gradients and optimizer state (its shards under FSDP2;
    what `openllama plan` predicts per GPU, so the two can be compared)."""
    def local(t: torch.Tensor) -> int:
        t = t.to_local() if hasattr(t, "to_local") else t
        return t.numel() * t.element_size()

    params = {id(p): p for p in model.parameters()}.values()  # a tied weight once
    inner = getattr(optimizer, "optimizer", optimizer)
    opt = sum(local(v) for state in inner.state.values() for v in state.values()
              if isinstance(v, torch.Tensor) and v.dim() > 0)  # not AdamW's scalar step counters
    return {"weights": sum(local(p) for p in params),
            "grads": sum(local(p.grad) for p in params if p.grad is not None), "optimizer": opt}


def host_memory() -> dict[str, int]:
    """This process's resident memory now and at its peak (bytes; Linux /proc, else the peak only)."""
    try:
        status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
        return {"rss": int(status["VmRSS"].split()[0]) * 1024, "peak_rss": int(status["VmHWM"].split()[0]) * 1024}
    except (OSError, KeyError, ValueError):
        import resource

        return {"peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def reset_peak_memory() -> bool:
    """Start a new high-water mark of resident memory (Linux: /proc/self/clear_refs), so that a
    following `host_memory()["peak_rss"]` is the peak of what ran in between."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class Throughput:
    """Tokens/s over a sliding window of recent steps (skips the first, compile/warmup, step)."""

    def __init__(self, window: int = 20):
        self.window = window
        self.samples: list[tuple[float, int]] = []

    def update(self, seconds: float, tokens: int) -> float:
        self.samples.append((seconds, tokens))
        self.samples = self.samples[-self.window:]
        total_s = sum(s for s, _ in self.samples)
        return sum(t for _, t in self.samples) / total_s if total_s > 0 else 0.0


class SpikeDetector:
    """A loss is a spike when it exceeds `factor` x the running mean of recent good losses."""

    def __init__(self, factor: float = 2.0, warmup: int = 20, beta: float = 0.95):
        self.factor, self.warmup, self.beta = factor, warmup, beta
        self.ema: float | None = None
        self.count = 0

    def update(self, loss: float) -> bool:
        spike = self.ema is not None and self.count >= self.warmup and loss > self.factor * self.ema
        if not spike and math.isfinite(loss):
            self.ema = loss if self.ema is None else self.beta * self.ema + (1 - self.beta) * loss
            self.count += 1
        return spike


class CategoryTally:
    """Loss and tokens per data category (docs/data.md). `add` takes a micro-batch's per-token
    losses on the device without a host sync (index_add_, not bincount, which syncs to size its
    output); `pending` hands the step's sums (to be summed over ranks, then given to `finish`,
    which turns them into metrics and adds the tokens to the cumulative `seen`, checkpointed state).

    Every position counts as a token of its document's category (so the categories' tokens add up
    to the engine's `tokens`); the loss counts only scored targets (targets != IGNORE_INDEX), whose
    category is the same as their input's."""

    def __init__(self, names: list[str]):
        self.names = list(names)
        self.seen = [0] * len(self.names)  # tokens per category since the start of the run
        self._sums: torch.Tensor | None = None  # (3, K + 1): loss, scored targets, tokens; bin K: unscored

    def add(self, rows: torch.Tensor, targets: torch.Tensor, category: torch.Tensor, ignore_index: int) -> None:
        k = len(self.names)
        if self._sums is None:
            self._sums = torch.zeros(3, k + 1, dtype=torch.float64, device=rows.device)
        cat = category.reshape(-1)
        scored = torch.where(targets.reshape(-1) != ignore_index, cat, k)
        ones = torch.ones(cat.shape, dtype=torch.float64, device=rows.device)
        self._sums[0].index_add_(0, scored, rows.detach().reshape(-1).double())
        self._sums[1].index_add_(0, scored, ones)
        self._sums[2].index_add_(0, cat, ones)

    def pending(self, device: torch.device) -> torch.Tensor:
        """This rank's sums since the last call, (3 * K,) float64 (zeros if no batch came), and reset."""
        k = len(self.names)
        sums = self._sums[:, :k] if self._sums is not None else torch.zeros(3, k, dtype=torch.float64, device=device)
        self._sums = None
        return sums.reshape(-1)

    def finish(self, summed: torch.Tensor) -> dict[str, float]:
        """Metrics of summed `pending` sums: `loss/<name>` (token-weighted, where some target was
        scored) and the cumulative `tokens_seen/<name>` (every category, every step)."""
        loss, scored, tokens = summed.reshape(3, -1).tolist()  # one device-to-host copy
        self.seen = [s + round(t) for s, t in zip(self.seen, tokens)]
        out = {f"loss/{n}": loss[i] / scored[i] for i, n in enumerate(self.names) if scored[i] > 0}
        out.update({f"tokens_seen/{n}": s for n, s in zip(self.names, self.seen)})
        return out

    def state_dict(self) -> dict[str, int]:
        return dict(zip(self.names, self.seen))

    def load_state_dict(self, state: dict[str, int]) -> None:
        """By name: a category the checkpoint did not know starts at 0."""
        self.seen = [int(state.get(n, 0)) for n in self.names]


class MetricsLog:
    """`metrics.jsonl`: one JSON object per line (`{"kind": "train"|"eval"|"event", "step": ...}`).
    Lines are flushed as written, so a killed run keeps everything up to its last step."""

    def __init__(self, path: str | Path, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        self._fh = open(self.path, "a", encoding="utf-8") if enabled else None

    def write(self, record: dict) -> None:
        if self._fh is not None:
            self._fh.write(json.dumps(record) + "\n")
            self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def read_metrics(path: str | Path) -> list[dict]:
    """All complete records of a metrics.jsonl (a torn last line from a killed run is ignored)."""
    out = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def truncate_metrics(path: str | Path, last_step: int) -> None:
    """On resume: drop records after the checkpoint's step (they will be recomputed), atomically."""
    path = Path(path)
    if not path.is_file():
        return
    keep = [r for r in read_metrics(path) if r.get("step", 0) <= last_step]
    write_text_atomic(path, (json.dumps(r) + "\n" for r in keep))
