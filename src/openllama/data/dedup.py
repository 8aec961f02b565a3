"""MinHash near-deduplication: a signature per document, LSH bands, connected components.

The FineWeb recipe (datatrove's MinhashDedup* blocks): word 5-grams, 112 hash functions in 14
bands of 8. Two documents that agree on all 8 values of any band are linked; every connected
component keeps its first document in input order and drops the rest as `near_duplicate`. The
probability that a pair of Jaccard similarity s is linked is 1 - (1 - s^8)^14: 0.92 at s = 0.8,
0.9996 at s = 0.9, 0.05 at s = 0.5.

Words are what `words()` finds: runs of letters/digits for space-separated scripts and single
characters for Chinese, Japanese and Korean (which write no spaces), lower-cased. Signatures are
deterministic (crc32 of words, fixed seeds), so any process computes the same one.

Memory: a signature is 112 uint32 = 448 bytes per document; `near_duplicates` holds all of them
plus ~50 bytes per document of band keys and labels (about 0.5 KB per document in all, i.e.
~120 MB per GB of 4 KB documents).
"""

from __future__ import annotations

import re
import zlib
from dataclasses import asdict, dataclass

import numpy as np

_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af"
_WORDS = re.compile(f"[{_CJK}]|[^\\W{_CJK}]+")
_PRIME = np.uint64((1 << 61) - 1)
_MIX = np.uint64(0x9E3779B97F4A7C15)
_BLOCK = 4096  # shingles per block of the (shingles x hashes) product: bounds memory on huge documents


@dataclass(frozen=True)
class MinhashConfig:
    ngram: int = 5
    bands: int = 14
    rows: int = 8
    seed: int = 1

    @property
    def num_hashes(self) -> int:
        return self.bands * self.rows

    def to_dict(self) -> dict:
        return asdict(self)


def words(text: str) -> list[str]:
    return _WORDS.findall(text.lower())


class Minhasher:
    """`signature(text)`: the document's MinHash signature (uint32[bands * rows]), or None when it
    has no word (such documents are never linked)."""

    def __init__(self, cfg: MinhashConfig = MinhashConfig()):
        self.cfg = cfg
        rng = np.random.RandomState(cfg.seed)
        # as datatrove/datasketch: a, b < 2^61 - 1, (a * x + b) wrapping at 2^64, then mod the prime
        self.a = rng.randint(1, int(_PRIME), size=cfg.num_hashes, dtype=np.uint64)
        self.b = rng.randint(0, int(_PRIME), size=cfg.num_hashes, dtype=np.uint64)

    def shingles(self, text: str) -> np.ndarray:
        """32-bit hashes of the document's distinct word n-grams."""
        toks = words(text)
        h = np.fromiter((zlib.crc32(t.encode("utf-8")) for t in toks), dtype=np.uint64, count=len(toks))
        n = min(self.cfg.ngram, len(h))
        if n == 0:
            return h
        sh = h[: len(h) - n + 1].copy()
        for j in range(1, n):  # polynomial combination of the n word hashes (wrapping uint64)
            sh = sh * _MIX + h[j : len(h) - n + 1 + j]
        return np.unique((sh ^ (sh >> np.uint64(29))) & np.uint64(0xFFFFFFFF))

    def signature(self, text: str) -> np.ndarray | None:
        sh = self.shingles(text)
        if len(sh) == 0:
            return None
        best = np.full(self.cfg.num_hashes, np.iinfo(np.uint64).max, dtype=np.uint64)
        for start in range(0, len(sh), _BLOCK):
            block = (sh[start : start + _BLOCK, None] * self.a + self.b) % _PRIME
            np.minimum(best, block.min(axis=0), out=best)
        return (best & np.uint64(0xFFFFFFFF)).astype(np.uint32)


def _band_keys(signatures: np.ndarray, band: int, rows: int) -> np.ndarray:
    """One uint64 per document for the band's `rows` values (a 64-bit mix: a false match needs a
    collision of ~2^-64 per pair)."""
    cols = signatures[:, band * rows : (band + 1) * rows].astype(np.uint64)
    key = np.zeros(len(signatures), dtype=np.uint64)
    for j in range(rows):
        key = (key ^ cols[:, j]) * _MIX
        key ^= key >> np.uint64(31)
    return key


def _components(n: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Label of each node = the smallest node of its connected component (min-label propagation
    with pointer jumping, vectorised)."""
    labels = np.arange(n, dtype=np.int64)
    if len(u) == 0:
        return labels
    while True:
        lu, lv = labels[u], labels[v]
        low = np.minimum(lu, lv)
        new = labels.copy()
        np.minimum.at(new, lu, low)
        np.minimum.at(new, lv, low)
        while True:  # pointer jumping: every node points at its root
            jumped = new[new]
            if np.array_equal(jumped, new):
                break
            new = jumped
        if np.array_equal(new, labels):
            return labels
        labels = new


def near_duplicates(signatures: np.ndarray, candidates: np.ndarray, cfg: MinhashConfig = MinhashConfig()) -> np.ndarray:
    """Bool mask over rows of `signatures` (uint32[n, bands * rows], in input order): True for a
    candidate linked (through any chain of shared bands) to an earlier candidate. Rows that are
    not candidates (exact duplicates, documents without words) are never linked."""
    n = len(signatures)
    idx = np.flatnonzero(candidates)
    us, vs = [], []
    for band in range(cfg.bands):
        keys = _band_keys(signatures[idx], band, cfg.rows)
        order = np.argsort(keys, kind="stable")
        sk = keys[order]
        same = sk[1:] == sk[:-1]
        if not same.any():
            continue
        starts = np.flatnonzero(np.r_[True, ~same])
        first = np.repeat(order[starts], np.diff(np.r_[starts, len(order)]))
        linked = np.r_[False, same]
        us.append(idx[order[linked]])
        vs.append(idx[first[linked]])
    u = np.concatenate(us) if us else np.zeros(0, np.int64)
    v = np.concatenate(vs) if vs else np.zeros(0, np.int64)
    labels = _components(n, u, v)
    return candidates & (labels != np.arange(n))
