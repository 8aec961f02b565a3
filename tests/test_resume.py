"""Exact resume, through the real command in fresh processes: 2N steps in one go equal N steps +
`--resume` + N steps bitwise (weights and every step's loss), and so does a run killed with SIGKILL
at an arbitrary moment and resumed. Dropout and gradient accumulation are on, so the RNG state,
the optimizer, the schedule and the data position all have to come back exactly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_engine import learnable_docs, tiny_config
from test_packing import write_token_shards

from openllama.train.metrics import read_metrics

STEPS = 16


def _cmd(config: Path | None, out: Path, *extra: str) -> list[str]:
    """The pretrain command; config=None resumes from the run's own config.yaml."""
    given = ["--config", str(config)] if config is not None else []
    return [sys.executable, "-m", "openllama.cli", "pretrain", *given, "--out", str(out), "--no-progress", *extra]


def _env() -> dict:
    # the same single-threaded math in every process (and kind to a shared 2-core machine)
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _run(*args: str, config: Path | None, out: Path) -> None:
    proc = subprocess.run(_cmd(config, out, *args), env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / f"step_{step:07d}" / "model" / "model.safetensors"))


def _history(run: Path) -> list[tuple]:
    return [(r["step"], r["loss"], r["grad_norm"], r["lr"], r["tokens_seen"])
            for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"]


def _evals(run: Path) -> list[tuple]:
    return [(r["step"], r["val_loss"]) for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "eval"]


def assert_same_run(a: Path, b: Path) -> None:
    wa, wb = _weights(a, STEPS), _weights(b, STEPS)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), f"{name} differs"
    assert _history(a) == _history(b)  # every step's loss, grad norm, lr: exactly
    assert _evals(a) == _evals(b)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    tokens = write_token_shards(root / "tokens", learnable_docs(300), vocab_size=64)
    cfg = tiny_config(tokens, max_steps=STEPS, save_every=4, eval_every=4, grad_accum_steps=2, keep_last=10)
    cfg["model"]["dropout"] = 0.1
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump(cfg))
    _run(config=config, out=root / "unbroken")
    history = _history(root / "unbroken")
    assert [h[0] for h in history] == list(range(1, STEPS + 1))
    assert history[-1][1] < history[0][1]
    return root, config


def test_n_steps_then_resume_equals_2n_steps(setup):
    root, config = setup
    split = root / "split"
    _run(f"train.halt_at_step={STEPS // 2}", config=config, out=split)
    assert (split / "checkpoints" / "latest").read_text().strip() == f"step_{STEPS // 2:07d}"
    assert not (split / "checkpoints" / f"step_{STEPS:07d}").exists()
    _run("--resume", config=None, out=split)  # the run's own config.yaml; its halt_at_step does not carry over
    assert_same_run(root / "unbroken", split)


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_equals_unbroken(setup):
    root, config = setup
    killed = root / "killed"
    # checkpoints every 2 steps here: saving touches no RNG, so the math is the unbroken run's
    proc = subprocess.Popen(_cmd(config, killed, "train.save_every=2"), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = killed / "checkpoints" / "latest"
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            if latest.is_file() and latest.read_text().strip() >= "step_0000004":
                break
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    done = sorted(p.name for p in (killed / "checkpoints").glob("step_*"))
    assert f"step_{STEPS:07d}" not in done
    _run("--resume", config=config, out=killed)
    assert_same_run(root / "unbroken", killed)
