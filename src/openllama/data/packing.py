"""Fixed-length packed batches from token shards: mixed corpora, deterministic, rank-aware, resumable.

Each corpus (a token-shard directory, see docs/architecture.md) is read as one long stream per epoch:
its documents (`[bos] + ids + [eos]`) in a seeded permutation, concatenated. Window k of that stream
is tokens `[k*T, k*T + T + 1)`: T inputs and their T next-token `targets` (labels.py's convention;
windows overlap by one token so no target is lost). `doc_ids` number the documents inside a window so
the model's block-diagonal mask keeps attention inside a document; a target that belongs to another
document than its input (the `bos` after an `eos`) is IGNORE_INDEX.

The global order of samples interleaves the corpora by weight: sample n comes from the corpus that is
furthest behind its share (`w_c * (n + 1) - taken_c` largest; ties to the first). That is
deterministic and keeps the mixture exact at every prefix. A corpus that runs out starts its next
epoch with a new permutation. Mixing by data category instead (`split_by_category`) makes one
corpus per (directory, category), so the same rule gives each category its share.

Every batch also carries `category`: per input token, the data category of its document (an index
into the batches' `categories`, data/tokens.py). A target that is not IGNORE_INDEX lies in the same
document as its input, so it is also the category of every scored target.

Ranks: the global order is cut into micro-batches of B samples; rank r of world w takes micro-batches
r, r + w, r + 2w, ... So w ranks x batch B see exactly what one rank with w accumulation steps would
see, with no overlap and no gap. The position (`state_dict`) is global (samples consumed by all
ranks together), so a run can resume on the same or a dividing number of ranks.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from ..labels import IGNORE_INDEX


class TokenCorpus:
    """The documents of one token-shard directory (`TokenShards`) as a flat table of (shard, start,
    length, category). `doc_range` keeps only documents [lo, hi) (a held-out tail is cut off this
    way); `subset` takes any documents of it (one category's, for mixing by category)."""

    def __init__(self, path: str | Path, doc_range: tuple[int, int] | None = None):
        from .tokens import TokenShards

        self.path = Path(path)
        shards = TokenShards(self.path)
        self.manifest = shards.manifest
        self.arrays = shards.shards
        spans = shards.document_spans()
        lo, hi = doc_range or (0, len(spans))
        spans = spans[lo:hi]
        self.categories: list[str] = shards.categories  # names; doc_category indexes them
        self.doc_category = shards.document_categories()[lo:hi]
        self.doc_shard, self.doc_start = spans[:, 0], spans[:, 1]
        self.doc_len = spans[:, 2] - spans[:, 1]
        self.num_docs = len(spans)
        self.num_tokens = int(self.doc_len.sum())
        self.label = str(self.path)  # for messages and the data position

    def subset(self, docs: np.ndarray, label: str) -> "TokenCorpus":
        """Documents `docs` (indices into this corpus, in order) as a corpus of their own; the
        token arrays are shared, not copied."""
        sub = copy.copy(self)
        for name in ("doc_shard", "doc_start", "doc_len", "doc_category"):
            setattr(sub, name, getattr(self, name)[docs])
        sub.num_docs, sub.num_tokens, sub.label = len(docs), int(sub.doc_len.sum()), label
        return sub

    def category_tokens(self) -> dict[str, int]:
        """Category name -> tokens of this corpus's documents in it (categories it has only)."""
        sums = np.bincount(self.doc_category, weights=self.doc_len, minlength=len(self.categories))
        return {name: int(n) for name, n in zip(self.categories, sums) if n > 0}

    @property
    def tokens_per_byte(self) -> float:
        """Predicted tokens per UTF-8 byte of text, for bits per byte. Every document contributes
        len - 1 predictions (its ids and the eos; the bos is never a target), so this is
        (num_tokens - num_docs) / num_bytes of the whole directory's manifest."""
        m = self.manifest
        if not m.get("num_bytes"):
            raise UserError(f"{self.path / 'manifest.json'}: num_bytes missing or zero, cannot compute bits per byte")
        return (m["num_tokens"] - m["num_docs"]) / m["num_bytes"]

    def document(self, d: int) -> np.ndarray:
        s = int(self.doc_start[d])
        return np.asarray(self.arrays[int(self.doc_shard[d])][s:s + int(self.doc_len[d])])


class _EpochStream:
    """One corpus, one epoch: documents in a seeded order, cut into overlapping T+1 windows.
    `doc_category`: each document's category id in the batches' numbering (default the corpus's)."""

    def __init__(self, corpus: TokenCorpus, seq_len: int, seed: int, corpus_index: int, epoch: int, shuffle: bool,
                 doc_category: np.ndarray | None = None):
        n = corpus.num_docs
        self.corpus = corpus
        self.doc_category = corpus.doc_category if doc_category is None else doc_category
        self.seq_len = seq_len
        self.order = np.random.default_rng([seed, corpus_index, epoch]).permutation(n) if shuffle else np.arange(n)
        self.ends = np.cumsum(corpus.doc_len[self.order])
        self.num_windows = max(0, (int(self.ends[-1]) - 1) // seq_len) if n else 0

    def window(self, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(tokens, document number inside the window, category) of window k, T + 1 each."""
        lo, hi = k * self.seq_len, k * self.seq_len + self.seq_len + 1
        first = int(np.searchsorted(self.ends, lo, side="right"))
        tokens, docs, cats = [], [], []
        pos, j = lo, first
        while pos < hi:
            d = int(self.order[j])
            doc_begin = int(self.ends[j]) - int(self.corpus.doc_len[d])
            piece = self.corpus.document(d)[pos - doc_begin: min(hi, int(self.ends[j])) - doc_begin]
            tokens.append(piece)
            docs.append(np.full(len(piece), j - first, dtype=np.int64))
            cats.append(np.full(len(piece), self.doc_category[d], dtype=np.int64))
            pos += len(piece)
            j += 1
        return np.concatenate(tokens).astype(np.int64), np.concatenate(docs), np.concatenate(cats)


@dataclass
class _Position:
    samples: int  # global samples consumed (all ranks together)
    taken: list[int]  # per corpus: windows consumed so far (across epochs)


class PackedBatches:
    """An iterator of `{"tokens", "targets", "doc_ids", "category"}` (each (B, T) int64) for one rank.

    corpora/weights: the mixture; seed: the permutation seed; rank/world: which micro-batches are ours;
    categories: the names `category` indexes (default: every corpus's, sorted).
    `state_dict()` is the global position after the last batch this iterator returned."""

    def __init__(self, corpora: list[TokenCorpus], weights: list[float], seq_len: int, batch_size: int,
                 seed: int = 0, rank: int = 0, world: int = 1, shuffle: bool = True,
                 categories: list[str] | None = None):
        if len(corpora) != len(weights) or not corpora:
            raise ValueError("need one weight per corpus and at least one corpus")
        if any(w <= 0 for w in weights):
            raise UserError("data mixing weights must be positive")
        self.corpora = corpora
        total = float(sum(weights))
        self.weights = [w / total for w in weights]
        self.seq_len, self.batch_size = seq_len, batch_size
        self.seed, self.rank, self.world, self.shuffle = seed, rank, world, shuffle
        self.categories = categories or sorted({n for c in corpora for n in c.categories})
        self._doc_category = [category_ids(c, self.categories) for c in corpora]
        self._streams: dict[tuple[int, int], _EpochStream] = {}
        # windows per epoch: the same every epoch (same tokens, another order)
        self._per_epoch = [self._stream(c, 0).num_windows for c in range(len(corpora))]
        for c, corpus in enumerate(corpora):
            if self._per_epoch[c] == 0:
                raise UserError(f"{corpus.label}: {corpus.num_tokens} tokens is too few for one window of "
                                f"seq_len {seq_len} + 1")
        self.pos = _Position(0, [0] * len(corpora))

    # -- ordering ------------------------------------------------------------------------------

    def _stream(self, c: int, epoch: int) -> _EpochStream:
        key = (c, epoch)
        if key not in self._streams:
            self._streams = {k: v for k, v in self._streams.items() if k[0] != c}  # keep one epoch per corpus
            self._streams[key] = _EpochStream(self.corpora[c], self.seq_len, self.seed, c, epoch, self.shuffle,
                                              self._doc_category[c])
        return self._streams[key]

    def _next_corpus(self) -> int:
        n = self.pos.samples
        deficits = [w * (n + 1) - t for w, t in zip(self.weights, self.pos.taken)]
        return int(np.argmax(deficits))

    def _advance(self, take: bool) -> tuple[np.ndarray, ...] | None:
        """Move one sample along the global order; return its window when `take`."""
        c = self._next_corpus()
        k = self.pos.taken[c]
        per_epoch = self._per_epoch[c]
        out = self._stream(c, k // per_epoch).window(k % per_epoch) if take else None
        self.pos.taken[c] += 1
        self.pos.samples += 1
        return out

    # -- iteration -----------------------------------------------------------------------------

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        # One round = one micro-batch for every rank; we walk the whole round (cheap: only our
        # windows are read) so every rank ends at the same global position.
        windows = []
        for r in range(self.world):
            for _ in range(self.batch_size):
                w = self._advance(r == self.rank)
                if w is not None:
                    windows.append(w)
        return _collate(windows)

    # -- exact resume --------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """The global position (samples consumed by all ranks, windows taken per corpus) and what
        the order depends on. The same on every rank, so one copy is enough."""
        return {"samples": self.pos.samples, "taken": list(self.pos.taken), "seed": self.seed,
                "batch_size": self.batch_size, "seq_len": self.seq_len, "weights": list(self.weights),
                "corpora": [c.label for c in self.corpora]}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "batch_size", "seq_len"):
            if state[key] != getattr(self, key):
                raise UserError(f"data position in checkpoint has {key}={state[key]}, config has {getattr(self, key)}")
        if len(state["taken"]) != len(self.corpora) or not np.allclose(state["weights"], self.weights):
            raise UserError("data position in checkpoint was made with a different corpus mixture")
        if state["samples"] % (self.world * self.batch_size):
            raise UserError(f"checkpoint data position ({state['samples']} samples) does not divide into "
                            f"{self.world} ranks x batch {self.batch_size}")
        self.pos = _Position(int(state["samples"]), [int(t) for t in state["taken"]])


def category_ids(corpus: TokenCorpus, categories: list[str]) -> np.ndarray:
    """Each document's category as an index into `categories` (which must name all of them)."""
    index = {name: i for i, name in enumerate(categories)}
    missing = sorted(set(corpus.categories) - set(index))
    if missing:
        raise ValueError(f"{corpus.label}: categories {missing} not in the list given")
    return np.array([index[n] for n in corpus.categories], np.int64)[corpus.doc_category]


def split_by_category(corpora: list[TokenCorpus], weights: dict[str, float],
                      min_tokens: int = 0) -> tuple[list[TokenCorpus], list[float]]:
    """One corpus per (corpus, category) for mixing by category: category k gets the share
    w_k / sum(w) of the samples, spread over the corpora holding it in proportion to their tokens.
    Categories with weight 0 (or none given) are left out, and so is a corpus's part of a category
    smaller than `min_tokens` (one window: it could not be sampled) when other corpora hold more
    of it; a category with no part that large is an error."""
    kept = [(c, k, name, n) for c in corpora for name, n in c.category_tokens().items()
            for k in [c.categories.index(name)] if weights.get(name, 0) > 0 and n >= min_tokens]
    totals: dict[str, int] = {}
    for _, _, name, n in kept:
        totals[name] = totals.get(name, 0) + n
    short = sorted({name for c in corpora for name in c.category_tokens()
                    if weights.get(name, 0) > 0 and name not in totals})
    if short:
        raise UserError(f"data.category_weights.{short[0]}: no training directory holds {min_tokens} tokens "
                        f"of it (one window); give it weight 0 or shorten train.seq_len")
    parts = [c.subset(np.flatnonzero(c.doc_category == k), f"{c.label} [{name}]") for c, k, name, _ in kept]
    return parts, [weights[name] * n / totals[name] for _, _, name, n in kept]


def eval_batches(corpus: TokenCorpus, seq_len: int, batch_size: int, max_batches: int | None = None,
                 categories: list[str] | None = None):
    """Held-out batches in document order, each window once (the last batch may be smaller):
    the same batches on every call and on every rank. `category` indexes `categories` (default:
    the corpus's own)."""
    doc_category = category_ids(corpus, categories) if categories is not None else None
    stream = _EpochStream(corpus, seq_len, seed=0, corpus_index=0, epoch=0, shuffle=False, doc_category=doc_category)
    n = stream.num_windows if max_batches is None else min(stream.num_windows, max_batches * batch_size)
    if n == 0:
        raise UserError(f"{corpus.path}: {corpus.num_tokens} held-out tokens is too few for one window of "
                        f"seq_len {seq_len} + 1")
    for lo in range(0, n, batch_size):
        windows = [stream.window(k) for k in range(lo, min(n, lo + batch_size))]
        yield _collate(windows)


def _collate(windows: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> dict[str, torch.Tensor]:
    tokens = torch.from_numpy(np.stack([w[0] for w in windows]))
    docs = torch.from_numpy(np.stack([w[1] for w in windows]))
    cats = torch.from_numpy(np.stack([w[2][:-1] for w in windows]))
    targets = tokens[:, 1:].clone()
    targets[docs[:, 1:] != docs[:, :-1]] = IGNORE_INDEX
    return {"tokens": tokens[:, :-1].contiguous(), "targets": targets, "doc_ids": docs[:, :-1].contiguous(),
            "category": cats}
