import argparse
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


def _listed_commands(help_text: str) -> list[str]:
    """The subcommand names argparse lists under COMMAND / SUBCOMMAND: the lines indented by exactly
    four spaces between that heading and the options (a long name's help wraps to a deeper indent)."""
    body = help_text.split("positional arguments:", 1)[1].split("options:", 1)[0]
    return [line.split()[0] for line in body.splitlines() if line.startswith("    ") and line[4] != " "]


def _subparser_choices(parser) -> dict:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return action.choices


def test_help_lists_exactly_the_commands():
    from openllama.cli import COMMANDS, build_parser

    proc = subprocess.run([sys.executable, "-m", "openllama.cli", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert _listed_commands(proc.stdout) == list(COMMANDS)  # every one, in order, and nothing else
    for stage in ["data", "tokenizer", "pretrain", "sft", "reward", "dpo", "grpo", "export", "serve", "demo"]:
        assert stage in COMMANDS
    # the parser object agrees, group by group
    choices = _subparser_choices(build_parser())
    assert list(choices) == list(COMMANDS)
    for name, entry in COMMANDS.items():
        if isinstance(entry, dict):
            assert list(_subparser_choices(choices[name])) == list(entry), name
            assert _listed_commands(choices[name].format_help()) == list(entry), name


def _all_command_paths() -> list[list[str]]:
    from openllama.cli import COMMANDS

    return [[name, *([sub] if sub else [])] for name, entry in COMMANDS.items()
            for sub in (entry if isinstance(entry, dict) else [None])]


@pytest.mark.parametrize("path", _all_command_paths(), ids=" ".join)
def test_every_command_help_exits_0(path, capsys):
    from openllama import cli

    with pytest.raises(SystemExit) as exit_:
        cli.main([*path, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: openllama {' '.join(path)} "), out[:200]
    # the stage's module added its own arguments: the usage shows more than [-h]
    assert out.splitlines()[0].strip() != f"usage: openllama {' '.join(path)} [-h]", out


def test_every_group_help_exits_0_and_lists_its_commands(capsys):
    from openllama import cli

    groups = [name for name, entry in cli.COMMANDS.items() if isinstance(entry, dict)]
    assert groups == ["data", "tokenizer"]
    for name in groups:
        with pytest.raises(SystemExit) as exit_:
            cli.main([name, "--help"])
        assert exit_.value.code == 0
        assert _listed_commands(capsys.readouterr().out) == list(cli.COMMANDS[name])


def test_leftover_argument_of_a_stage_without_config_is_an_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "openllama.cli", "evaluate", "--model", str(tmp_path),
                           "--max_batches", "2"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "unrecognised argument(s): --max_batches 2" in proc.stderr
