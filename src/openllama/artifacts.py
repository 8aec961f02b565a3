"""Where things are in the directories the stages hand each other: the one layout rule.

    MODEL_DIR/   openllama.json (marks it) + model.safetensors (+ tokenizer files)
    RUN/         config.yaml, metrics.jsonl, summary.json, tokenizer/,
                 checkpoints/step_NNNNNNN/{model/, state/, COMPLETE}, checkpoints/latest

A step directory counts only once its COMPLETE marker exists; `latest` names the newest one but may
lag a kill between the rename and the pointer write, so the highest complete step wins over it.
`resolve_model_dir` lets every stage take a model, step or run directory alike. A leaf module: it
imports nothing from the project but errors.
"""

from __future__ import annotations

import re
from pathlib import Path

from .errors import UserError

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "openllama.json"  # marks a directory as an openllama model
RUN_CONFIG = "config.yaml"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CHECKPOINTS = "checkpoints"
COMPLETE = "COMPLETE"
LATEST = "latest"
STEP_RE = re.compile(r"^step_(\d{7,})$")
TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer.model")


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def complete_steps(root: Path) -> list[int]:
    """Step numbers of the complete checkpoints (COMPLETE marker written) under `root`, ascending."""
    if not root.is_dir():
        return []
    steps = []
    for p in root.iterdir():
        m = STEP_RE.match(p.name)
        if m and (p / COMPLETE).is_file():
            steps.append(int(m.group(1)))
    return sorted(steps)


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint under `root` (a run's checkpoints/): `latest` if it names a
    complete one, else the highest complete step directory. The one rule resume, export, evaluate
    and serve all use."""
    steps = complete_steps(root)
    pointer = root / LATEST
    if pointer.is_file():
        named = root / pointer.read_text(encoding="utf-8").strip()
        m = STEP_RE.match(named.name)
        if m and (named / COMPLETE).is_file() and int(m.group(1)) >= (max(steps) if steps else -1):
            return named
    return root / step_dir_name(steps[-1]) if steps else None


def resolve_model_dir(path: str | Path) -> Path:
    """The model directory behind `path`: a model directory (holds openllama.json), a checkpoint
    step directory (holds model/openllama.json) or a run directory (its newest complete step)."""
    path = Path(path)
    if (path / CONFIG_FILE).is_file():
        return path
    if (path / "model" / CONFIG_FILE).is_file():
        return path / "model"
    ckpts = path / CHECKPOINTS
    if ckpts.is_dir():
        step = latest_checkpoint(ckpts)
        if step is None or not (step / "model" / CONFIG_FILE).is_file():
            raise UserError(f"{ckpts}: no complete checkpoint (no step_*/ with a COMPLETE marker and model/)")
        return step / "model"
    if not path.exists():
        raise UserError(f"{path}: no such directory")
    raise UserError(f"{path}: not a model, checkpoint or run directory (no {CONFIG_FILE}, model/ or checkpoints/)")


def find_tokenizer_dir(path: str | Path) -> Path | None:
    """The directory holding the tokenizer files for the model behind `path`: the model directory
    itself, its step directory, or the run directory (first that has tokenizer.json or .model)."""
    path = Path(path)
    model_dir = resolve_model_dir(path)
    candidates = [model_dir, model_dir.parent]
    if model_dir.parent.parent.name == CHECKPOINTS:  # RUN/checkpoints/step_N/model -> RUN
        candidates.append(model_dir.parent.parent.parent)
    for d in (*candidates, path):
        if any((d / name).is_file() for name in TOKENIZER_MARKERS):
            return d
    return None
