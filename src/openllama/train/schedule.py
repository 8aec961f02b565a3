"""Learning-rate schedules as a multiplier of the peak lr at each optimizer step.

- cosine:   linear warmup, then cosine from 1 down to `min_lr_ratio` at `total` steps.
- wsd:      warmup-stable-decay: linear warmup, flat at 1, then a linear decay to `min_lr_ratio`
            over the last `decay_fraction` of the steps (a run can be extended from any stable-phase
            checkpoint by re-running only the decay).
- constant: linear warmup, then 1.
"""

from __future__ import annotations

import math


def lr_multiplier(step: int, total: int, kind: str, warmup: int, min_ratio: float = 0.1,
                  decay_fraction: float = 0.2) -> float:
    """Multiplier for optimizer step `step` (0-based) of `total`."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    if kind == "cosine":
        span = max(1, total - warmup)
        progress = min(1.0, (step - warmup) / span)
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if kind == "wsd":
        decay_steps = max(1, int(round(total * decay_fraction)))
        decay_start = max(warmup, total - decay_steps)
        if step < decay_start:
            return 1.0
        progress = min(1.0, (step - decay_start + 1) / max(1, total - decay_start))
        return 1.0 - (1.0 - min_ratio) * progress
    raise ValueError(f"unknown schedule {kind!r}")
