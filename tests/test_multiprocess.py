"""Data parallel on CPU: `torchrun --nproc_per_node 2` runs the same command, and two ranks with
per-rank batch b follow the same trajectory as one rank with 2 accumulation steps of batch b."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_engine import learnable_docs, tiny_config
from test_packing import write_token_shards

from openllama.train.metrics import read_metrics


def _pretrain(config, out, launcher: list[str], *extra: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [*launcher, "-m", "openllama.cli", "pretrain", "--config", str(config), "--out", str(out), "--no-progress", *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


@pytest.mark.slow
def test_two_ranks_equal_one_rank_with_two_accumulation_steps(tmp_path):
    tokens = write_token_shards(tmp_path / "tokens", learnable_docs(300), vocab_size=64)
    cfg = tiny_config(tokens, max_steps=8, save_every=0, eval_every=4)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(cfg))
    _pretrain(config, tmp_path / "one", [sys.executable], "train.grad_accum_steps=2")
    _pretrain(config, tmp_path / "two", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                         "--nproc_per_node", "2"])
    one, two = (read_metrics(tmp_path / r / "metrics.jsonl") for r in ("one", "two"))
    assert next(r for r in two if r["kind"] == "event")["world"] == 2
    train1, train2 = ([r for r in m if r["kind"] == "train"] for m in (one, two))
    assert len(train1) == len(train2) == 8
    for a, b in zip(train1, train2):
        assert a["tokens"] == b["tokens"] == 2 * 4 * 32  # the same global batch per step
        assert abs(a["loss"] - b["loss"]) < 1e-5, (a["step"], a["loss"], b["loss"])
        assert abs(a["grad_norm"] - b["grad_norm"]) < 1e-4
    assert train1[-1]["loss"] < train1[0]["loss"]
    evals1, evals2 = ([r["val_loss"] for r in m if r["kind"] == "eval"] for m in (one, two))
    assert len(evals1) == 2 and all(abs(a - b) < 1e-5 for a, b in zip(evals1, evals2))
    w1 = load_file(str(tmp_path / "one/checkpoints/step_0000008/model/model.safetensors"))
    w2 = load_file(str(tmp_path / "two/checkpoints/step_0000008/model/model.safetensors"))
    for name in w1:
        torch.testing.assert_close(w1[name], w2[name], atol=1e-5, rtol=0)
    # one copy of everything, written by rank 0; each rank's RNG state beside it
    state = tmp_path / "two/checkpoints/step_0000008/state"
    assert sorted(p.name for p in state.glob("rng_rank*.pt")) == ["rng_rank0.pt", "rng_rank1.pt"]
    assert json.loads((state / "trainer.json").read_text())["world"] == 2
