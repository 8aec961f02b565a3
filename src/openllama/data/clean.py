"""Normalisation, quality filters and exact deduplication of documents.

Each function does one thing and is cheap on clean text (the common case): control characters are
found with one regex scan before anything is copied, and the repetition check only splits text
that has enough lines to judge.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import asdict, dataclass

# C0 and C1 control characters except tab and newline. \r goes too, so CRLF text becomes LF.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")

DROP_REASONS = ("empty", "too_short", "too_long", "repetitive", "duplicate")


@dataclass(frozen=True)
class CleanConfig:
    nfkc: bool = False  # Unicode NFKC (folds full-width forms, ligatures); off keeps text as written
    min_chars: int = 16  # shorter documents (after cleaning, stripped) are dropped as too_short
    max_chars: int = 10_000_000  # longer ones are dropped as too_long
    max_dup_line_fraction: float = 0.3  # share of non-blank lines that repeat an earlier line
    min_lines_for_repetition: int = 4  # fewer non-blank lines than this: too little to judge
    dedup: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


def normalise(text: str, nfkc: bool = False) -> str:
    """Strip control characters (keeping \\n and \\t); optionally NFKC."""
    if _CONTROL.search(text):
        text = _CONTROL.sub("", text)
    if nfkc:
        text = unicodedata.normalize("NFKC", text)
    return text


def dup_line_fraction(text: str, min_lines: int = 4) -> float:
    """Fraction of non-blank lines that exactly repeat an earlier line (0.0 with fewer than
    min_lines non-blank lines: too little to judge). Lines are compared as written."""
    lines = text.split("\n")
    if len(lines) < min_lines:
        return 0.0
    unique = set(lines)
    blank = [line for line in unique if not line.strip()]
    n = len(lines) - sum(lines.count(b) for b in blank) if blank else len(lines)
    if n < min_lines:
        return 0.0
    return 1.0 - (len(unique) - len(blank)) / n


def drop_reason(text: str, cfg: CleanConfig) -> str | None:
    """Why a (normalised) document should be dropped, or None to keep it."""
    stripped_len = len(text.strip())
    if stripped_len == 0:
        return "empty"
    if stripped_len < cfg.min_chars:
        return "too_short"
    if len(text) > cfg.max_chars:
        return "too_long"
    if dup_line_fraction(text, cfg.min_lines_for_repetition) > cfg.max_dup_line_fraction:
        return "repetitive"
    return None


def content_hash(text: str | bytes) -> int:
    """64-bit hash of the exact text (UTF-8), for dedup. Expected false duplicates are about
    n^2 / 2^65: ~0.03 documents lost in a billion, acceptable for a corpus filter."""
    data = text.encode("utf-8") if isinstance(text, str) else text
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")
