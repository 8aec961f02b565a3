"""Shared test fixtures: deterministic seeds, few threads (CI has 2 cores), the shared data folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _deterministic():
    import torch

    torch.manual_seed(0)
    yield


@pytest.fixture
def shared_data() -> Path:
    """../shared/data with the real third-party files; tests skip with a reason where it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder not found at {SHARED_DATA} (CI always has it)")
    return SHARED_DATA


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
