"""`openllama import HF_DIR --out DIR`: a transformers Llama directory -> an openllama model directory
(openllama.json + model.safetensors, plus the tokenizer files), ready to continue pretraining or tune."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from .errors import UserError
from .hf import copy_tokenizer_files, import_hf
from .model import save_model


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("hf_dir", help="a transformers LlamaForCausalLM directory (config.json + safetensors)")
    parser.add_argument("--out", required=True, help="output model directory (must not exist or be empty)")


def import_dir(hf_dir: str | Path, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out}: output directory exists and is not empty")
    model = import_hf(hf_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(model, tmp, extra={"imported_from": str(Path(hf_dir).resolve())})
    copy_tokenizer_files(Path(hf_dir), tmp)
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    return out


def run(args: argparse.Namespace) -> int:
    out = import_dir(args.hf_dir, args.out)
    print(f"imported {args.hf_dir} -> {out}")
    return 0
