"""Shared pieces of the alignment tests (test_chat, test_sft, test_reward, test_dpo, test_grpo):
a tiny tokenizer trained on text that covers the toy tasks, and a tiny random Llama saved beside
it as a starting model directory."""

from __future__ import annotations

import json
import random
from pathlib import Path

LETTERS = "abcdefghij"


def succ_task(n: int) -> tuple[str, str]:
    """The toy task: the letter after a letter (a -> b, ..., i -> j)."""
    return f"after {LETTERS[n]}", LETTERS[n + 1]


def tokenizer_text() -> list[str]:
    rng = random.Random(0)
    docs = []
    for _ in range(300):
        words = [rng.choice(["good", "bad", "nice", "awful", "great", "poor", "after", "user", "system", "ok"])
                 for _ in range(8)]
        docs.append("user: " + " ".join(words) + "\nsystem: " + " ".join(rng.choice(LETTERS) for _ in range(6)))
    docs.append("Give three tips for staying healthy. The quick brown fox 0123456789")
    return docs


def make_start(root: Path, dim: int = 64, n_layers: int = 2, seed: int = 0, max_seq_len: int = 256) -> Path:
    """A starting model dir (tiny random Llama + tokenizer files) under `root`."""
    import torch

    from openllama.config import ModelConfig
    from openllama.model import Llama, save_model
    from openllama.tokenizer import train_tokenizer

    root.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(tokenizer_text(), root, vocab_size=400, num_threads=1)
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=tok.vocab_size, dim=dim, n_layers=n_layers, n_heads=4, multiple_of=32,
                      max_seq_len=max_seq_len)
    save_model(Llama(cfg), root)
    return root


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def metrics(run: Path, kind: str) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("kind") == kind]
