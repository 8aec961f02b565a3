"""Local copies of the suite's datasets, for machines that cannot reach the Hugging Face hub.

Run it where the hub is reachable, copy the output folder over, and evaluate with the YAMLs in
configs/eval/local (they read data/eval/... relative to the directory you run from):

    python configs/eval/fetch_local.py --out data/eval                 # every task of the suite
    python configs/eval/fetch_local.py --out data/eval hellaswag mmlu  # some of them
    openllama evaluate --model runs/7b --lm-eval configs/eval/local    # then, offline

Single-dataset tasks become JSON lines of the dataset's own rows (what lm-eval's task code
expects), one file per split lm-eval reads. Tasks with one dataset config per subject (MMLU, C-Eval,
CMMLU) become a folder with `<subject>/<split>.parquet` and a README.md that names each subject as a
config: the hub's own layout, so `load_dataset(folder, subject)` works and lm-eval's subject tasks
only need `dataset_path` changed. `--source` reads from another copy (a local folder) instead of the
hub, e.g. to re-export one.
"""

from __future__ import annotations

import argparse
from pathlib import Path

# task: (hub dataset, config or None, splits lm-eval reads, "jsonl" | "configs")
SUITE = {
    "hellaswag": ("Rowan/hellaswag", None, ["validation"], "jsonl"),
    "arc_easy": ("allenai/ai2_arc", "ARC-Easy", ["test"], "jsonl"),
    "arc_challenge": ("allenai/ai2_arc", "ARC-Challenge", ["test"], "jsonl"),
    "piqa": ("baber/piqa", None, ["validation"], "jsonl"),
    "winogrande": ("allenai/winogrande", "winogrande_xl", ["validation"], "jsonl"),
    "mmlu": ("cais/mmlu", None, ["test", "dev"], "configs"),
    "ceval-valid": ("ceval/ceval-exam", None, ["val", "dev"], "configs"),
    "cmmlu": ("haonan-li/cmmlu", None, ["test", "dev"], "configs"),
}
FOLDER = {"ceval-valid": "ceval-exam"}  # the folder configs/eval/local/<task>_local.yaml reads


def export_jsonl(source: str, config: str | None, splits: list[str], out: Path) -> list[Path]:
    from datasets import load_dataset

    out.mkdir(parents=True, exist_ok=True)
    written = []
    for split in splits:
        path = out / f"{split}.jsonl"
        load_dataset(source, config, split=split).to_json(str(path), force_ascii=False)
        written.append(path)
    return written


def export_configs(source: str, splits: list[str], out: Path, configs: list[str] | None = None) -> Path:
    """Every config (subject) of `source` as <config>/<split>.parquet, and the README.md naming them."""
    from datasets import get_dataset_config_names, load_dataset

    names = configs or [c for c in get_dataset_config_names(source) if c not in ("all", "auxiliary_train")]
    lines = ["---", "configs:"]
    for name in names:
        (out / name).mkdir(parents=True, exist_ok=True)
        lines += [f"- config_name: {name}", "  data_files:"]
        for split in splits:
            load_dataset(source, name, split=split).to_parquet(str(out / name / f"{split}.parquet"))
            lines += [f"  - split: {split}", f"    path: {name}/{split}.parquet"]
    (out / "README.md").write_text("\n".join(lines + ["---", ""]), encoding="utf-8")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("tasks", nargs="*", default=list(SUITE), help=f"tasks (default: all of {', '.join(SUITE)})")
    p.add_argument("--out", default="data/eval", help="output folder (default: data/eval)")
    p.add_argument("--source", default=None, help="read from this copy instead of the hub (one task)")
    args = p.parse_args()
    for task in args.tasks:
        if task not in SUITE:
            raise SystemExit(f"unknown task {task!r}; one of {', '.join(SUITE)}")
        hub, config, splits, kind = SUITE[task]
        out = Path(args.out) / FOLDER.get(task, task)
        if kind == "jsonl":
            export_jsonl(args.source or hub, config, splits, out)
        else:
            export_configs(args.source or hub, splits, out)
        print(f"{task}: {out}")


if __name__ == "__main__":
    main()
