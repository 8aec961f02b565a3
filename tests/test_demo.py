"""`openllama demo`: the recipe's defaults, its guards, and one end-to-end run on a tiny budget."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from openllama import cli
from openllama.errors import UserError
from openllama.pipeline import DEFAULTS, choose_threads, load_demo_config, prepare_out_dir, scaled

ROOT = Path(__file__).resolve().parents[1]


def test_configs_demo_yaml_is_the_built_in_recipe():
    assert yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text(encoding="utf-8")) == DEFAULTS
    cfg = load_demo_config(str(ROOT / "configs" / "demo.yaml"), ["sft.train.max_steps=7", "align=[grpo]"])
    assert cfg.sft["train"]["max_steps"] == 7 and cfg.align == ["grpo"]


def test_bad_recipe_keys_name_the_key():
    with pytest.raises(UserError, match="nope: unknown key"):
        load_demo_config(None, ["nope=1"])
    with pytest.raises(UserError, match="align"):
        load_demo_config(None, ["align=[ppo]"])


def test_minutes_scale_every_stage():
    cfg = load_demo_config(None, [])
    double = scaled(cfg, 2 * cfg.reference_minutes)
    for stage in ("pretrain", "sft", "dpo", "grpo"):
        assert double.__getattribute__(stage)["train"]["max_steps"] == 2 * getattr(cfg, stage)["train"]["max_steps"]
    assert scaled(cfg, cfg.reference_minutes / 100).pretrain["train"]["max_steps"] >= 2


def test_threads_follow_the_request_then_the_environment_then_the_idle_cores(monkeypatch):
    import os

    assert choose_threads(3) == (3, "--threads")
    with pytest.raises(UserError, match="--threads must be >= 1"):
        choose_threads(0)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert choose_threads(None)[0] == 1
    monkeypatch.delenv("OMP_NUM_THREADS")
    cores = os.cpu_count() or 1
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    assert choose_threads(None)[0] == cores
    monkeypatch.setattr(os, "getloadavg", lambda: (cores + 5.0, 0.0, 0.0))
    assert choose_threads(None)[0] == 1


def test_tokenizer_train_quiet_prints_only_its_summary(tmp_path, capfd):
    from openllama.data.builtin import pretrain_documents, write_jsonl

    corpus = tmp_path / "docs.jsonl"
    write_jsonl(corpus, pretrain_documents(0, "train", 300))
    assert cli.main(["tokenizer", "train", "--input", str(corpus), "--out", str(tmp_path / "quiet"),
                     "--vocab-size", "1024", "--quiet"]) == 0
    quiet = capfd.readouterr()
    assert quiet.err.strip() == "" and len(quiet.out.strip().splitlines()) == 3, quiet  # summary lines only
    assert cli.main(["tokenizer", "train", "--input", str(corpus), "--out", str(tmp_path / "loud"),
                     "--vocab-size", "1024"]) == 0
    assert len(capfd.readouterr().err.splitlines()) > 20  # SentencePiece's own log, when not quiet


def test_out_dir_of_something_else_is_never_replaced(tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(UserError, match="not a demo run directory"):
        prepare_out_dir(tmp_path)
    assert (tmp_path / "mine.txt").read_text() == "keep me"


@pytest.mark.slow
def test_demo_end_to_end_on_a_tiny_budget(tmp_path, capsys):
    out = tmp_path / "demo"
    code = cli.main(["demo", "--out", str(out), "--minutes", "0.2", "--no-progress",
                     "data.eval_test=120", "data.eval_valid=60", "data.preference_pairs=200", "data.rl_prompts=100",
                     "align=[dpo,grpo]", "grpo.grpo.eval_prompts=8", "eval.valid_batches=4"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "$ openllama pretrain --config" in printed and "openllama serve --model" in printed

    # artefacts
    for rel in ("report.md", "results.json", "accuracy.png", "hf/config.json", "pretrain/plots/loss.png",
                "eval/base.json", "eval/sft.json", "eval/dpo.json", "eval/grpo.json", "configs/pretrain.yaml"):
        assert (out / rel).is_file(), rel
    for png in ("accuracy.png", "pretrain/plots/loss.png"):
        assert (out / png).read_bytes().startswith(b"\x89PNG\r\n\x1a\n"), png
    pretrain_cfg = yaml.safe_load((out / "configs" / "pretrain.yaml").read_text(encoding="utf-8"))
    assert pretrain_cfg["data"]["train"] == [str(out / "tokens" / "train")]
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "95%" in report and "n = 120" in report

    # the shards verify against their manifests (the same check `openllama data verify` runs)
    assert cli.main(["data", "verify", str(out / "text" / "train")]) == 0

    # SFT lowered the loss of held-out replies below the base model's
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    stages = {s["name"]: s for s in results["stages"]}
    assert list(stages) == ["pretrain", "sft", "dpo", "grpo"]
    for name, stage in stages.items():  # each eval/*.json is what the report took its numbers from
        written = json.loads((out / "eval" / f"{'base' if name == 'pretrain' else name}.json").read_text("utf-8"))
        assert written["loss"] == stage["eval"]["loss"] and written["tasks"]["overall"] == stage["tasks"]["overall"]
    assert stages["sft"]["tasks"]["reply_loss"] < stages["pretrain"]["tasks"]["reply_loss"]
    for s in stages.values():
        acc = s["tasks"]["overall"]
        assert acc["n"] == 120 and acc["low"] <= acc["accuracy"] <= acc["high"]
    assert stages["pretrain"]["eval"]["bits_per_byte"] > 0

    # the export loads in stock transformers and computes what our model computes
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from openllama.model import load_model

    tok = AutoTokenizer.from_pretrained(out / "hf")
    hf = AutoModelForCausalLM.from_pretrained(out / "hf").eval()
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    ours = load_model(out / "grpo").eval()
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, ours(ids), atol=1e-4)
