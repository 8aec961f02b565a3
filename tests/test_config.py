import subprocess
import sys

import pytest

from openllama.config import ModelConfig, Section, load_config, parse_overrides
from openllama.errors import UserError


class Run(Section):
    model: ModelConfig = ModelConfig()
    steps: int = 10


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  dim: 64\n  n_heads: 4\nsteps: 3\n")
    cfg = load_config(Run, path, ["model.n_layers=2", "--steps=7"])
    assert (cfg.model.dim, cfg.model.n_layers, cfg.steps) == (64, 2, 7)


def test_unknown_key_names_path(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  dimm: 64\n")
    with pytest.raises(UserError, match=r"model\.dimm: unknown key"):
        load_config(Run, path)


def test_wrong_type_names_path():
    with pytest.raises(UserError, match=r"model\.dim: .*integer.*'abc'"):
        load_config(Run, None, ["model.dim=abc"])


def test_override_values_are_yaml():
    assert parse_overrides(["a.b=3", "a.c=true", "d=x y"]) == {"a": {"b": 3, "c": True}, "d": "x y"}


def test_cli_config_error_is_one_line_exit_2(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  dim: [1]\n")
    proc = subprocess.run([sys.executable, "-m", "openllama.cli", "pretrain", "--config", str(path), "--out", str(tmp_path / "run")],
                          capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "model.dim" in proc.stderr


def test_help_lists_every_stage():
    proc = subprocess.run([sys.executable, "-m", "openllama.cli", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    for stage in ["data", "tokenizer", "pretrain", "sft", "reward", "dpo", "grpo", "export", "serve", "demo"]:
        assert stage in proc.stdout


def test_leftover_argument_of_a_stage_without_config_is_an_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "openllama.cli", "evaluate", "--model", str(tmp_path),
                           "--max_batches", "2"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "unrecognised argument(s): --max_batches 2" in proc.stderr
