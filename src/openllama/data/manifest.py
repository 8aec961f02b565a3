"""The `manifest.json` of a prepared shard directory, from the scan results, the dedup masks and the
written shards' entries. For every input, source and language: read == kept + sum(dropped)."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from . import shards as shardlib
from .clean import DROP_REASONS

# The order reasons are listed in: the cheap filters, then the web steps, then dedup.
REASONS = ("not_html", "bad_encoding", "extract_timeout", "extract_failed", "no_text", "language",
           "gopher_repetition", "gopher_quality", "c4", "fineweb_quality",
           *[r for r in DROP_REASONS if r != "duplicate"], "duplicate", "near_duplicate")


def counts(read: int, kept: int, dropped: Counter, errors: int | None = 0) -> dict[str, Any]:
    out = {"read": read, "kept": kept, "dropped": {r: dropped[r] for r in REASONS if dropped[r]}}
    if errors is not None:
        out["errors"] = errors
    return out


class _Group:
    """read / kept / dropped per name (a source or a language)."""

    def __init__(self):
        self.read, self.kept, self.dropped = Counter(), Counter(), {}

    def add_result(self, names: list[str], ids: np.ndarray, read: Counter, dropped: dict[str, Counter],
                   dup: np.ndarray, near: np.ndarray) -> None:
        self.read.update(read)
        for name, c in dropped.items():
            self.dropped.setdefault(name, Counter()).update(c)
        if not names:
            return
        kept_per = np.bincount(ids[~dup & ~near], minlength=len(names))
        dup_per = np.bincount(ids[dup], minlength=len(names))
        near_per = np.bincount(ids[near], minlength=len(names))
        for i, name in enumerate(names):
            self.kept[name] += int(kept_per[i])
            for reason, per in (("duplicate", dup_per), ("near_duplicate", near_per)):
                if per[i]:
                    self.dropped.setdefault(name, Counter())[reason] += int(per[i])

    def table(self) -> dict[str, Any]:
        return {name: counts(self.read[name], self.kept[name], self.dropped.get(name, Counter()), None)
                for name in sorted(self.read)}


def build_manifest(results: list, exact: list[np.ndarray], near: list[np.ndarray], entries: list[dict], job) -> dict:
    opts = job.opts
    inputs, total_dropped = [], Counter()
    sources, languages = _Group(), _Group()
    for res, keep_exact, is_near in zip(results, exact, near):
        dup = ~keep_exact
        dropped = Counter(res.dropped)
        for reason, mask in (("duplicate", dup), ("near_duplicate", is_near)):
            if mask.any():
                dropped[reason] += int(mask.sum())
        kept = int((keep_exact & ~is_near).sum())
        inputs.append({"path": res.path, "format": res.format, **counts(res.read, kept, dropped, res.errors),
                       "error_examples": res.error_examples})
        total_dropped.update(dropped)
        sources.add_result(res.sources, res.source_ids, res.source_read, res.source_dropped, dup, is_near)
        languages.add_result(res.languages, res.language_ids, res.language_read, res.language_dropped, dup, is_near)
    num_lines = sum(e["num_lines"] for e in entries)
    manifest = {
        "format": shardlib.FORMAT,
        "version": 1,
        "max_lines": opts.max_lines,
        "num_lines": num_lines,
        "num_bytes": sum(e["num_bytes"] for e in entries),
        "text_bytes": sum(e["text_bytes"] for e in entries),
        "shards": entries,
        "totals": counts(sum(r.read for r in results), num_lines, total_dropped, sum(r.errors for r in results)),
        "sources": sources.table(),
        "inputs": inputs,
        "settings": job.settings(),
    }
    if languages.read:
        manifest["languages"] = languages.table()
    return manifest
