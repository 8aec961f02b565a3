"""End to end on real text through the real commands: `data prepare` -> `tokenizer train` ->
`data tokenize` -> `pretrain --config configs/tiny.yaml` (shortened by overrides) -> `evaluate`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from openllama import cli
from openllama.model import load_model
from openllama.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def shakespeare_tokens(tmp_path_factory) -> Path:
    src = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
    if not src.is_file():
        pytest.skip(f"shared data not found at {src} (CI always has it)")
    root = tmp_path_factory.mktemp("e2e")
    assert cli.main(["data", "prepare", str(src), "--out", str(root / "text"), "--text-unit", "paragraph",
                     "--workers", "1", "--no-progress"]) == 0
    assert cli.main(["tokenizer", "train", "--input", str(root / "text"), "--out", str(root / "tok"),
                     "--vocab-size", "8000"]) == 0
    assert cli.main(["data", "tokenize", "--shards", str(root / "text"), "--tokenizer", str(root / "tok"),
                     "--out", str(root / "tokens"), "--workers", "1", "--no-progress"]) == 0
    return root / "tokens"


def test_pretrain_tiny_preset_on_real_text(shakespeare_tokens, tmp_path, capsys):
    out = tmp_path / "run"
    code = cli.main(["pretrain", "--config", str(ROOT / "configs" / "tiny.yaml"), "--out", str(out), "--no-progress",
                     f"data.train={shakespeare_tokens}", "train.max_steps=24", "train.micro_batch_size=4",
                     "train.seq_len=64", "train.save_every=12", "train.eval_every=12", "train.eval_batches=2",
                     "optim.lr=3e-3", "optim.warmup_steps=4"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["step"] == 24
    train = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"]
    evals = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "eval"]
    assert np.mean([r["loss"] for r in train[-4:]]) < np.mean([r["loss"] for r in train[:4]]) - 1.0
    assert len(evals) == 2 and evals[1]["val_loss"] < evals[0]["val_loss"]
    assert 0 < evals[1]["val_bits_per_byte"] < evals[1]["val_loss"]  # about 1.8 bytes per token here
    ckpt = out / "checkpoints" / "step_0000024"
    assert (out / "checkpoints" / "latest").read_text().strip() == ckpt.name
    assert (out / "checkpoints" / "step_0000012" / "COMPLETE").is_file()
    half = json.loads((out / "checkpoints" / "step_0000012" / "state" / "trainer.json").read_text())
    assert half["step"] == 12 and half["tokens_seen"] == 12 * 4 * 64  # steps x micro batch x seq_len
    # self-describing: the run and every checkpoint's model dir carry the tokenizer
    for d in (out / "tokenizer", ckpt / "model"):
        assert {"tokenizer.json", "tokenizer.model", "tokenizer_config.json"} <= {p.name for p in d.iterdir()}
    assert load_model(ckpt / "model").cfg.vocab_size == 8000
    # evaluate the checkpoint on the shards with the command (held-out tail included in this corpus)
    assert cli.main(["evaluate", "--model", str(ckpt / "model"), "--data", str(shakespeare_tokens),
                     "--seq-len", "64", "--max-batches", "2"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["loss"] < train[0]["loss"] and result["bits_per_byte"] > 0


@pytest.mark.slow
def test_category_metrics_two_ranks_equal_one_rank_with_two_accumulation_steps(tmp_path):
    """The per-category numbers go through the engine's all-reduce: 2 DDP ranks under torchrun give
    what 1 process with 2 accumulation steps gives (counts exactly, losses to float tolerance)."""
    import sys

    import yaml
    from test_distributed import TORCHRUN, event
    from test_distributed import pretrain as launch
    from test_engine import CATS, cat_config, learnable_docs, train_of
    from test_packing import write_token_shards

    docs = learnable_docs(300, seed=1)
    names = [CATS[i % 3] for i in range(len(docs))]
    tokens = write_token_shards(tmp_path / "tokens", docs, vocab_size=64, categories=names)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(cat_config(tokens, max_steps=4, save_every=0, eval_every=2)))
    launch(config, tmp_path / "one", [sys.executable], "train.grad_accum_steps=2")
    launch(config, tmp_path / "two", TORCHRUN)
    assert event(tmp_path / "two", "start")["world"] == 2
    one, two = train_of(tmp_path / "one"), train_of(tmp_path / "two")
    assert len(one) == len(two) == 4
    for a, b in zip(one, two):
        seen = {k: v for k, v in a.items() if k.startswith("tokens_seen/")}
        assert len(seen) == 3 and seen == {k: v for k, v in b.items() if k.startswith("tokens_seen/")}
        assert sum(seen.values()) == a["tokens_seen"] == b["tokens_seen"]
        losses = {k: v for k, v in a.items() if k.startswith("loss/")}
        assert losses == pytest.approx({k: v for k, v in b.items() if k.startswith("loss/")}, abs=1e-5)
    evals = [[r for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "eval"] for run in (tmp_path / "one",
                                                                                                  tmp_path / "two")]
    for a, b in zip(*evals):
        val = {k: v for k, v in a.items() if k.startswith("val_loss/")}
        assert len(val) == 3 and val == pytest.approx({k: v for k, v in b.items() if k.startswith("val_loss/")},
                                                      abs=1e-5)
