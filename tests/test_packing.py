"""Packed batches: rank partition, exact resume, document boundaries, mixing weights, data categories
(per token, and mixing by category)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from openllama.data.packing import IGNORE_INDEX, PackedBatches, TokenCorpus, eval_batches, split_by_category
from openllama.errors import UserError

BOS, EOS = 1, 2


def write_token_shards(directory: Path, docs: list[list[int]], vocab_size: int = 512, docs_per_shard: int = 50,
                       bytes_per_token: float = 3.0, categories: list[str] | None = None) -> Path:
    """Token shards in the documented format (docs/architecture.md), written by hand:
    NAME.bin (uint16 ids), NAME.idx.npy (int64 document starts + end), manifest.json, and with
    `categories` (a name per document) NAME.cat.npy; without, a directory from before categories."""
    directory.mkdir(parents=True, exist_ok=True)
    shards = []
    for i in range(0, len(docs), docs_per_shard):
        part = [[BOS, *d, EOS] for d in docs[i:i + docs_per_shard]]
        flat = np.array([t for d in part for t in d], dtype=np.uint16)
        offsets = np.concatenate([[0], np.cumsum([len(d) for d in part])]).astype(np.int64)
        name = f"shard_{i // docs_per_shard:05d}"
        (directory / f"{name}.bin").write_bytes(flat.tobytes())
        np.save(directory / f"{name}.idx.npy", offsets)
        num_bytes = int(sum(len(d) - 2 for d in part) * bytes_per_token)
        shards.append({"name": name, "num_tokens": int(len(flat)), "num_docs": len(part), "num_bytes": num_bytes,
                       "sha256": hashlib.sha256(flat.tobytes()).hexdigest()})
        if categories is not None:
            shards[-1].update(_write_categories(directory / f"{name}.cat.npy", categories[i:i + docs_per_shard],
                                                [len(d) for d in part]))
    manifest = {"format": "openllama-tokens",
                "tokenizer": {"fingerprint": "test", "vocab_size": vocab_size, "bos_id": BOS, "eos_id": EOS},
                "dtype": "uint16", "shards": shards,
                "num_tokens": sum(s["num_tokens"] for s in shards), "num_docs": sum(s["num_docs"] for s in shards),
                "num_bytes": sum(s["num_bytes"] for s in shards), "source": "test"}
    (directory / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    return directory


def _write_categories(path: Path, names: list[str], lengths: list[int]) -> dict:
    """NAME.cat.npy (uint16 index into the entry's first-appearance list) and the entry's keys."""
    local = list(dict.fromkeys(names))
    np.save(path, np.array([local.index(n) for n in names], dtype=np.uint16))
    return {"categories": local, "category_docs": [names.count(n) for n in local],
            "category_tokens": [sum(t for m, t in zip(names, lengths) if m == n) for n in local]}


def random_docs(n: int, seed: int, lo: int = 3, hi: int = 40, vocab: int = 512, tag: int | None = None) -> list[list[int]]:
    """Documents of random length; the first id of each is its index (+ 3) so tests can tell them apart,
    and `tag` (if given) fills the rest so corpora are recognisable."""
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(n):
        length = int(rng.integers(lo, hi))
        body = [tag] * (length - 1) if tag is not None else rng.integers(3, vocab, size=length - 1).tolist()
        docs.append([3 + i % (vocab - 3), *body])
    return docs


@pytest.fixture
def corpus(tmp_path) -> TokenCorpus:
    return TokenCorpus(write_token_shards(tmp_path / "a", random_docs(120, seed=1)))


def _rows(batches, n):
    return [tuple(row.tolist()) for _ in range(n) for row in next(batches)["tokens"]]


def test_ranks_partition_the_global_order(corpus):
    B, T = 3, 16
    single = PackedBatches([corpus], [1.0], T, B, seed=7)
    global_rows = _rows(single, 8)  # 8 micro-batches = 24 samples
    rank_rows = []
    ranks = [PackedBatches([corpus], [1.0], T, B, seed=7, rank=r, world=2) for r in range(2)]
    for _ in range(4):
        for r in range(2):
            rank_rows += [tuple(row.tolist()) for row in next(ranks[r])["tokens"]]
    # rank r's k-th micro-batch is global micro-batch 2k + r: same multiset, same order, no overlap or gap
    assert rank_rows == global_rows
    assert ranks[0].state_dict() == ranks[1].state_dict() == single.state_dict()


def test_windows_cover_the_stream_without_gaps(corpus):
    B, T = 2, 16
    batches = PackedBatches([corpus], [1.0], T, B, seed=3)
    per_epoch = (corpus.num_tokens - 1) // T
    seen = []
    for _ in range(per_epoch // B):
        batch = next(batches)
        full = torch.cat([batch["tokens"], batch["targets"][:, -1:]], dim=1)
        seen.append(batch)
    # consecutive windows overlap by exactly one token: labels[-1] of window k == tokens[0] of window k+1
    flat_tokens = torch.cat([b["tokens"] for b in seen])
    flat_last = torch.cat([b["targets"][:, -1] for b in seen])
    ok = (flat_last[:-1] == flat_tokens[1:, 0]) | (flat_last[:-1] == IGNORE_INDEX)
    assert bool(ok.all())
    # every document of the corpus starts somewhere in one epoch (bos count)
    assert int((flat_tokens == BOS).sum()) >= corpus.num_docs - 1


def test_restoring_state_continues_identically(corpus):
    a = PackedBatches([corpus], [1.0], 16, 4, seed=5, rank=1, world=2)
    for _ in range(7):
        next(a)
    state = json.loads(json.dumps(a.state_dict()))  # must survive JSON
    expected = [next(a) for _ in range(30)]  # crosses into the next epochs
    b = PackedBatches([corpus], [1.0], 16, 4, seed=5, rank=1, world=2)
    b.load_state_dict(state)
    for want in expected:
        got = next(b)
        for key in want:
            assert torch.equal(got[key], want[key])


def test_epochs_reshuffle_and_seed_matters(corpus):
    T, B = 16, 4
    per_epoch = (corpus.num_tokens - 1) // T
    it = PackedBatches([corpus], [1.0], T, B, seed=0)
    rows = _rows(it, (2 * per_epoch) // B + 1)
    first, second = rows[:per_epoch], rows[per_epoch:2 * per_epoch]
    assert first != second  # new permutation in epoch 2
    other = _rows(PackedBatches([corpus], [1.0], T, B, seed=1), 3)
    assert other != rows[:len(other)]


def test_document_boundaries(corpus):
    batch = next(PackedBatches([corpus], [1.0], 32, 8, seed=2))
    tokens, labels, docs = batch["tokens"], batch["targets"], batch["doc_ids"]
    assert tokens.shape == labels.shape == docs.shape == (8, 32)
    # a new document (doc id changes) starts with bos, and the label that would cross into it is ignored
    starts = docs[:, 1:] != docs[:, :-1]
    assert bool((tokens[:, 1:][starts] == BOS).all())
    assert bool((labels[:, :-1][starts] == IGNORE_INDEX).all())
    # the label before a document start is an eos prediction target's successor: the input there is eos
    assert bool((tokens[:, :-1][starts] == EOS).all())
    # everywhere else labels are the next token
    keep = labels != IGNORE_INDEX
    assert keep.float().mean() > 0.8
    assert bool((docs[:, 0] == 0).all()) and bool((docs.diff(dim=1) >= 0).all())


def test_mixing_weights_are_exact(tmp_path):
    a = TokenCorpus(write_token_shards(tmp_path / "a", random_docs(60, seed=1, tag=100)))
    b = TokenCorpus(write_token_shards(tmp_path / "b", random_docs(60, seed=2, tag=200)))
    it = PackedBatches([a, b], [3.0, 1.0], 16, 4, seed=0)
    for _ in range(10):
        next(it)
    assert it.state_dict()["taken"] == [30, 10]
    tokens = torch.cat([next(it)["tokens"] for _ in range(25)])
    from_a = ((tokens == 100).sum(1) > (tokens == 200).sum(1)).sum().item()
    assert abs(from_a / len(tokens) - 0.75) < 0.05


def test_held_out_range_and_eval_batches(tmp_path):
    docs = random_docs(50, seed=4)
    path = write_token_shards(tmp_path / "a", docs)
    train = TokenCorpus(path, doc_range=(0, 40))
    val = TokenCorpus(path, doc_range=(40, 50))
    assert train.num_docs == 40 and val.num_docs == 10
    val_first_ids = {int(val.document(d)[1]) for d in range(10)}
    train_tokens = torch.cat([next(PackedBatches([train], [1.0], 8, 4, seed=0))["tokens"] for _ in range(1)])
    it = PackedBatches([train], [1.0], 8, 4, seed=0)
    starts = set()
    for _ in range((train.num_tokens // 8) // 4 + 2):
        b = next(it)
        t = b["tokens"]
        after_bos = t[:, 1:][t[:, :-1] == BOS]
        starts |= set(after_bos.tolist())
    assert not (starts & val_first_ids)  # training never sees a held-out document
    assert train_tokens.shape == (4, 8)
    first = [b["tokens"] for b in eval_batches(val, 8, 4, max_batches=2)]
    again = [b["tokens"] for b in eval_batches(val, 8, 4, max_batches=2)]
    assert len(first) == 2 and all(torch.equal(x, y) for x, y in zip(first, again))
    # predictions per document: its ids + eos (bos is never a target); bytes: 3 per id in this helper
    n_ids = sum(len(d) for d in docs)
    assert val.tokens_per_byte == pytest.approx((n_ids + len(docs)) / sum(int(len(d) * 3.0) for d in docs))


def test_bad_inputs(tmp_path, corpus):
    with pytest.raises(UserError, match="manifest.json"):
        TokenCorpus(tmp_path)
    tiny = TokenCorpus(write_token_shards(tmp_path / "t", [[5, 6]]))
    with pytest.raises(UserError, match="too few"):
        PackedBatches([tiny], [1.0], 64, 2)
    it = PackedBatches([corpus], [1.0], 16, 4, seed=5)
    next(it)
    state = it.state_dict()
    with pytest.raises(UserError, match="seed"):
        PackedBatches([corpus], [1.0], 16, 4, seed=6).load_state_dict(state)
    with pytest.raises(UserError, match="divide"):
        PackedBatches([corpus], [1.0], 16, 4, seed=5, rank=0, world=3).load_state_dict(state)


# -- data categories ---------------------------------------------------------------------------------


CATEGORIES = ["Pile-CC", "Wikipedia (en)", "zh"]  # sorted, as the batches number them


def tagged_corpus(directory: Path, names: list[str], n: int, seed: int) -> Path:
    """n documents, document i of category names[i % len] (and every third one of the first name,
    so the categories differ in size); every body token is 100 + the category's index in
    CATEGORIES, so a token tells its category."""
    rng = np.random.default_rng(seed)
    cats = [names[0] if i % 3 == 0 else names[i % len(names)] for i in range(n)]
    docs = [[3 + i % 50] + [100 + CATEGORIES.index(c)] * int(rng.integers(4, 40)) for i, c in enumerate(cats)]
    return write_token_shards(directory, docs, docs_per_shard=40, categories=cats)


def test_batches_carry_each_tokens_category(tmp_path):
    a = TokenCorpus(tagged_corpus(tmp_path / "a", CATEGORIES, 90, seed=1))
    b = TokenCorpus(tagged_corpus(tmp_path / "b", CATEGORIES[1:], 60, seed=2))  # a subset of the categories
    assert a.categories == CATEGORIES and b.categories == CATEGORIES[1:]
    it = PackedBatches([a, b], [1.0, 1.0], 32, 4, seed=0)
    assert it.categories == CATEGORIES  # one numbering for both corpora
    for _ in range(12):
        batch = next(it)
        tokens, cat = batch["tokens"], batch["category"]
        body = tokens >= 100  # a body token's tag names its category
        assert torch.equal(cat[body], tokens[body] - 100)
        same_doc = batch["doc_ids"][:, 1:] == batch["doc_ids"][:, :-1]  # bos/eos/first ids: their document's
        assert bool((cat[:, 1:][same_doc] == cat[:, :-1][same_doc]).all())
    held = next(eval_batches(b, 32, 4, max_batches=2, categories=["x", *CATEGORIES]))
    body = held["tokens"] >= 100
    assert torch.equal(held["category"][body], held["tokens"][body] - 99)  # indexes the list given


def test_old_token_dirs_read_as_one_unknown_category(corpus):
    assert corpus.categories == ["unknown"] and not corpus.doc_category.any()
    assert bool((next(PackedBatches([corpus], [1.0], 16, 2))["category"] == 0).all())


def test_category_weights_give_each_category_its_token_share(tmp_path):
    a = TokenCorpus(tagged_corpus(tmp_path / "a", CATEGORIES, 90, seed=1))
    b = TokenCorpus(tagged_corpus(tmp_path / "b", CATEGORIES, 60, seed=2))
    weights = {"Pile-CC": 1.0, "Wikipedia (en)": 2.0, "zh": 1.0}  # Pile-CC has the most tokens, zh the fewest
    parts, shares = split_by_category([a, b], weights)
    assert len(parts) == 6 and all(len(set(p.doc_category.tolist())) == 1 for p in parts)
    assert sum(shares) == pytest.approx(4.0)
    it = PackedBatches(parts, shares, 32, 4, seed=0)
    counts = torch.zeros(3)
    for _ in range(100):  # 400 windows: several epochs of the small categories
        cat = next(it)["category"]
        counts += torch.bincount(cat.flatten(), minlength=3)
    share = (counts / counts.sum()).tolist()
    assert share == pytest.approx([0.25, 0.5, 0.25], abs=0.01)
    # deterministic and resumable: a copy restored from the position continues identically
    state = it.state_dict()
    want = [next(it) for _ in range(5)]
    again = PackedBatches(split_by_category([a, b], weights)[0], shares, 32, 4, seed=0)
    again.load_state_dict(state)
    for w in want:
        got = next(again)
        assert all(torch.equal(got[k], w[k]) for k in w)
    # weight 0 leaves a category out
    parts, shares = split_by_category([a, b], {**weights, "zh": 0.0})
    assert {names_of(p) for p in parts} == {"Pile-CC", "Wikipedia (en)"}
    # a directory's slice of a category under one window is left out (its share goes to the rest);
    # a category with no slice that large is an error naming it
    sizes = sorted((n, name) for c in (a, b) for name, n in c.category_tokens().items())
    (smallest, name), (second, _) = sizes[:2]
    assert smallest < second and sum(1 for _, k in sizes if k == name) == 2  # its other slice stays
    parts, shares = split_by_category([a, b], weights, min_tokens=smallest + 1)
    assert len(parts) == 5 and sum(shares) == pytest.approx(4.0)
    with pytest.raises(UserError, match=r"data.category_weights.Pile-CC: no training directory holds"):
        split_by_category([a, b], weights, min_tokens=10**9)


def names_of(corpus: TokenCorpus) -> str:
    (name,) = {corpus.categories[k] for k in corpus.doc_category.tolist()}
    return name
