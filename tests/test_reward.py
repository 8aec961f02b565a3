"""Reward model: Bradley-Terry on synthetic pairs with a learnable rule (positive words are
preferred) reaches > 90% held-out pairwise accuracy; checkpoints resume exactly."""

from __future__ import annotations

import json
import random

import pytest
import torch

from alignment_helpers import make_start, metrics, write_jsonl
from openllama.cli import main

GOOD, BAD = ["good", "nice", "great"], ["bad", "awful", "poor"]


def preference_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt = " ".join(rng.choice(GOOD + BAD + ["ok", "after"]) for _ in range(3))
        chosen = " ".join(rng.choice(GOOD + ["ok"]) for _ in range(3))
        rejected = " ".join(rng.choice(BAD + ["ok"]) for _ in range(3))
        if rng.random() < 0.5:  # the rule, not the position of the words, must decide
            chosen, rejected = chosen + " ok", rejected
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("reward")
    start = make_start(root / "start", dim=32, n_layers=1)
    train = write_jsonl(root / "train.jsonl", preference_rows(96, 0))
    valid = write_jsonl(root / "valid.jsonl", preference_rows(48, 1))
    return root, start, train, valid


def test_reward_model_learns_rule(setup):
    root, start, train, valid = setup
    out = root / "rm"
    assert main(["reward", "--model", str(start), "--data", str(train), "--out", str(out), "--no-progress",
                 f"data.valid=[{valid}]", "train.max_steps=15", "train.micro_batch_size=8", "train.seq_len=64",
                 "optim.lr=3e-3", "optim.schedule=constant"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["after"]["accuracy"] > 0.9 > summary["before"]["accuracy"]
    assert metrics(out, "eval")[-1]["accuracy"] == summary["after"]["accuracy"]

    from openllama.hf import export_hf
    from openllama.train.reward_model import load_reward_model

    ckpt = out / "checkpoints" / "step_0000015" / "model"
    rm = load_reward_model(ckpt)
    ids = torch.tensor([[1, 200, 201, 2]])
    assert rm(ids).shape == (1,)
    export_hf(ckpt, root / "hf")  # the trunk exports like any model directory
    assert (root / "hf" / "config.json").is_file()


def test_reward_resume_is_exact(setup):
    root, start, train, _ = setup
    common = ["--model", str(start), "--data", str(train), "--no-progress", "train.max_steps=4",
              "train.micro_batch_size=4", "train.seq_len=64", "optim.lr=1e-3"]
    assert main(["reward", "--out", str(root / "a"), *common]) == 0
    assert main(["reward", "--out", str(root / "b"), *common, "train.halt_at_step=2"]) == 0
    assert main(["reward", "--out", str(root / "b"), "--resume", "--no-progress"]) == 0
    from safetensors.torch import load_file

    for name in ("model.safetensors", "score.safetensors"):
        a = load_file(str(root / "a" / "checkpoints" / "step_0000004" / "model" / name))
        b = load_file(str(root / "b" / "checkpoints" / "step_0000004" / "model" / name))
        assert all(torch.equal(a[k], b[k]) for k in a)
    la = [r["loss"] for r in metrics(root / "a", "train")]
    lb = [r["loss"] for r in metrics(root / "b", "train")]
    assert la == lb
