"""Shared by the generation and serving tests: a tiny model directory with a freshly trained
tokenizer, and a real uvicorn server on a free 127.0.0.1 port in a background thread."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from pathlib import Path

import torch

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


def shakespeare_text(limit: int) -> str:
    """The first `limit` characters of ../shared/data/tinyshakespeare.txt; the calling test skips,
    saying why, where that folder is absent (CI always has it). A repeated sentence is no stand-in:
    it holds too few distinct pieces for the 600-token tokenizer these tests train."""
    import pytest

    if not SHAKESPEARE.is_file():
        pytest.skip(f"shared data not found at {SHAKESPEARE} (CI always has it)")
    return SHAKESPEARE.read_text(encoding="utf-8")[:limit]


def make_tiny_model_dir(out: Path, *, max_seq_len: int = 256, seed: int = 0) -> Path:
    """A randomly initialised 2-layer Llama saved as an openllama model dir, with a 600-token
    SentencePiece tokenizer trained here (byte fallback, so any text encodes) beside it."""
    from openllama.config import ModelConfig
    from openllama.model import Llama, save_model
    from openllama.tokenizer import train_tokenizer

    text = shakespeare_text(200_000)
    tok = train_tokenizer([text], out, 600, sample_bytes=200_000)
    cfg = ModelConfig(vocab_size=tok.vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32,
                      max_seq_len=max_seq_len, init_std=0.1)
    torch.manual_seed(seed)
    save_model(Llama(cfg), out)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(app, timeout: float = 30.0):
    """Serve `app` with uvicorn on 127.0.0.1:<free port> in a thread; yields the base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on",
                                           timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@contextlib.contextmanager
def torch_threads(n: int):
    """Few intra-op threads: tiny decode steps are fastest on one, and CI's 2 cores are shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
