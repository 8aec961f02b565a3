"""The one command, `openllama`. Each subcommand lives in the module of its stage, which exposes

    def add_arguments(parser: argparse.ArgumentParser) -> None
    def run(args: argparse.Namespace) -> int | None

This file only lists them (imported lazily, so `openllama --help` is fast and a stage's heavy
dependencies load only when that stage runs). A stage with a typed config sets
`ACCEPTS_OVERRIDES = True`; then arguments argparse does not know, `key.path=value` or
`--key.path=value` / `--key.path value`, land in `args.overrides` as config overrides. For any
other stage a leftover argument is an error. A `UserError` anywhere becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .errors import UserError

# name -> (module, one-line help). Nested groups ("data", "tokenizer") map to a dict of these.
COMMANDS: dict[str, tuple[str, str] | dict[str, tuple[str, str]]] = {
    "data": {
        "download": ("openllama.data.download", "resumable, checksummed download of a URL list"),
        "prepare": ("openllama.data.prepare", "read, clean, dedup and shard corpora into jsonl.zst + manifest"),
        "verify": ("openllama.data.shards", "check shards against their manifest"),
        "builtin": ("openllama.data.builtin", "write the built-in demo corpus and tasks (generated from a seed)"),
        "tokenize": ("openllama.data.tokens", "pre-tokenise shards into memory-mapped token files"),
    },
    "tokenizer": {
        "train": ("openllama.tokenizer", "train a SentencePiece BPE tokenizer and write HF files"),
    },
    "pretrain": ("openllama.train.pretrain", "pretrain a Llama on token shards"),
    "sft": ("openllama.train.sft", "instruction tuning (full or LoRA) with loss on replies only"),
    "reward": ("openllama.train.reward", "train a reward model on preference pairs"),
    "dpo": ("openllama.train.dpo", "direct preference optimisation against a frozen reference"),
    "grpo": ("openllama.train.grpo", "online RL with group-normalised advantages"),
    "evaluate": ("openllama.evaluate", "loss, bits per byte and task accuracy of a model"),
    "export": ("openllama.hf", "export a checkpoint to the Hugging Face format"),
    "import": ("openllama.hf_import", "import a Hugging Face Llama directory"),
    "generate": ("openllama.generate", "generate text from a prompt"),
    "chat": ("openllama.serve.terminal", "terminal multi-turn chat with streaming"),
    "serve": ("openllama.serve.app", "OpenAI-compatible API and Gradio chat"),
    "plot": ("openllama.train.plot", "loss and throughput curves of a run as PNG"),
    "plan": ("openllama.plan", "memory and time estimates for a config on N GPUs"),
    "demo": ("openllama.pipeline", "every stage on the built-in corpus, then a report"),
}


def _split_overrides(rest: list[str]) -> list[str]:
    """Turn leftover argv into `key=value` overrides; anything else is an error."""
    out: list[str] = []
    i = 0
    while i < len(rest):
        item = rest[i]
        if item.startswith("--") and "=" not in item and i + 1 < len(rest) and not rest[i + 1].startswith("--"):
            out.append(f"{item[2:]}={rest[i + 1]}")
            i += 2
            continue
        item = item[2:] if item.startswith("--") else item
        if "=" not in item or item.startswith("-"):
            raise UserError(f"unrecognised argument: {rest[i]}")
        out.append(item)
        i += 1
    return out


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="openllama", description="From raw corpora to a served chat model.")
    parser.add_argument("--version", action="version", version=f"openllama {__import__('openllama').__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    # Only import the chosen stage's module, to add its arguments.
    chosen = [a for a in (argv or []) if not a.startswith("-")][:2]
    for name, entry in COMMANDS.items():
        if isinstance(entry, dict):
            group = sub.add_parser(name, help=f"{name} stages: {', '.join(entry)}")
            gsub = group.add_subparsers(dest="subcommand", metavar="SUBCOMMAND")
            gsub.required = True
            for sname, (module, help_) in entry.items():
                p = gsub.add_parser(sname, help=help_, description=help_)
                p.set_defaults(_module=module)
                if chosen[:2] == [name, sname]:
                    _add_stage_arguments(p, module)
        else:
            module, help_ = entry
            p = sub.add_parser(name, help=help_, description=help_)
            p.set_defaults(_module=module)
            if chosen[:1] == [name]:
                _add_stage_arguments(p, module)
    return parser


def _add_stage_arguments(parser: argparse.ArgumentParser, module: str) -> None:
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.startswith("openllama"):
            raise UserError(f"{module}: this stage is not available in this build") from None
        raise UserError(f"missing dependency {exc.name!r} for this stage: install openllama's extras "
                        f"(pip install 'openllama[all]')") from None
    mod.add_arguments(parser)


def _close_process_group() -> None:
    """End of a command launched with several processes: leave the process group together and tear
    it down before the interpreter exits. Left to interpreter shutdown, a communication thread can
    still be running when its owner is destroyed, which aborts a rank that had finished (seen with
    DeepSpeed's shared-memory ops on CPU)."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        parser = build_parser(argv)
        args, rest = parser.parse_known_args(argv)
        module = importlib.import_module(args._module)
        if rest and not getattr(module, "ACCEPTS_OVERRIDES", False):
            # a stage without a config: a leftover argument is a typo, never silently ignored
            raise UserError(f"unrecognised argument(s): {' '.join(rest)} (see openllama {args.command} --help)")
        args.overrides = _split_overrides(rest)
        code = module.run(args)
        _close_process_group()
        return int(code or 0)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
