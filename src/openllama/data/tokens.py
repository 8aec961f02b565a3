"""Token shards: prepared text shards tokenised in parallel into memory-mapped files.

Per text shard `NAME.jsonl.zst`, `NAME.bin` holds every document as `[bos] + ids + [eos]`, flat
(uint16 when the vocabulary fits, else uint32), and `NAME.idx.npy` the int64 offsets of document
starts (docs + 1 entries, first 0, last = tokens), and `NAME.cat.npy` each document's data
category (uint16, an index into the shard entry's `categories`; see `category_of`). `manifest.json`
(written last) names the tokenizer by fingerprint, so a loader can refuse shards made with another
tokenizer, and counts documents and tokens per category. Layout and keys: docs/architecture.md.
`TokenShards(dir)` reads them back without loading them; a directory written before categories
existed (no `.cat.npy`) reads as one category, UNKNOWN.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import itertools
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError
from . import shards as shardlib
from .pool import progress_sink, run_pool

FORMAT = "openllama-tokens"
MANIFEST = "manifest.json"
UNKNOWN = "unknown"  # the category of a line with neither `language` nor `source`, and of old directories
_BATCH_DOCS = 512
_MAX_CATEGORIES = 65_536  # per shard: the ids are uint16


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65_536 else np.dtype(np.uint32)


def category_of(record: dict) -> str:
    """A prepared line's data category: the language of web text (`language`, from language ID on
    WARC/WET input: Common Crawl per language), else its `source` (the Pile's `pile_set_name`,
    WuDao's `dataType`, else the input file's stem, as data/sources.py names it), else UNKNOWN."""
    name = record.get("language") or record.get("source")
    return name if isinstance(name, str) and name else UNKNOWN


class _Categories:
    """One shard's categories: names in first-appearance order, an id per document, counts."""

    def __init__(self, where: str):
        self.where, self.names, self.index, self.ids, self.docs, self.tokens = where, [], {}, [], [], []

    def add(self, name: str, num_tokens: int) -> None:
        i = self.index.get(name)
        if i is None:
            if len(self.names) == _MAX_CATEGORIES:
                raise UserError(f"{self.where}: more than {_MAX_CATEGORIES} data categories in one shard")
            i = self.index[name] = len(self.names)
            self.names.append(name)
            self.docs.append(0)
            self.tokens.append(0)
        self.ids.append(i)
        self.docs[i] += 1
        self.tokens[i] += num_tokens

    def entry(self) -> dict[str, list]:
        return {"categories": self.names, "category_docs": self.docs, "category_tokens": self.tokens}


def _save_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.npy")
    np.save(tmp, array)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# writing (one text shard per task, in a worker process)

_tokenizers: dict[str, Any] = {}


def _load_tokenizer(directory: str, threads: int):
    if directory not in _tokenizers:
        from ..tokenizer import Tokenizer

        _tokenizers[directory] = Tokenizer.load(directory)
    return _tokenizers[directory]


def tokenize_shard(task: tuple[str, dict, str, str, int], sink=None) -> dict[str, Any]:
    """Text shard -> NAME.bin + NAME.idx.npy + NAME.cat.npy (each renamed into place when complete)."""
    shard_path, entry, out_base, tok_dir, threads = task
    sink = sink or progress_sink()
    tok = _load_tokenizer(tok_dir, threads)
    dtype = token_dtype(tok.vocab_size)
    data = Path(shard_path).read_bytes()
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise UserError(f"{shard_path}: sha256 does not match its manifest (run `openllama data verify`)")
    try:
        text = shardlib._decompress(data)
    except Exception as exc:
        raise UserError(f"{shard_path}: cannot decompress ({exc})") from None
    lines = io.BytesIO(text)
    bin_path, idx_path = Path(out_base + ".bin"), Path(out_base + ".idx.npy")
    tmp_bin = bin_path.with_name(f".{bin_path.name}.tmp-{os.getpid()}")
    digest = hashlib.sha256()
    offsets = [0]
    num_bytes = 0
    lineno = 0
    cats = _Categories(shard_path)
    with open(tmp_bin, "wb") as out:
        while True:
            batch = list(itertools.islice(lines, _BATCH_DOCS))
            if not batch:
                break
            texts, names = [], []
            for line in batch:
                lineno += 1
                try:
                    record = json.loads(line)
                    texts.append(record["text"])
                except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
                    raise UserError(f"{shard_path}:{lineno}: not a JSON object with a 'text' field") from None
                names.append(category_of(record))
            ids = tok.encode_batch(texts, bos=True, eos=True, allow_special=False, num_threads=threads)
            lengths = [len(x) for x in ids]
            for name, n in zip(names, lengths):
                cats.add(name, n)
            total = sum(lengths)
            arr = np.fromiter(itertools.chain.from_iterable(ids), dtype=dtype, count=total)
            buf = arr.tobytes()
            out.write(buf)
            digest.update(buf)
            offsets.extend((offsets[-1] + np.cumsum(lengths)).tolist())
            num_bytes += sum(len(t.encode("utf-8")) for t in texts)
            if sink is not None:
                sink((total, len(texts)))
        out.flush()
        os.fsync(out.fileno())
    idx = np.array(offsets, dtype=np.int64)
    _save_npy(Path(out_base + ".cat.npy"), np.array(cats.ids, dtype=np.uint16))
    _save_npy(idx_path, idx)
    os.replace(tmp_bin, bin_path)  # last: the .bin appearing means its .idx/.cat are there
    return {"name": bin_path.name[: -len(".bin")], "num_tokens": int(idx[-1]), "num_docs": len(idx) - 1,
            "num_bytes": num_bytes, "sha256": digest.hexdigest(), **cats.entry()}


def category_totals(entries: list[dict]) -> dict[str, dict[str, int]]:
    """Category name -> {"docs", "tokens"} over every shard entry (sorted by name)."""
    totals: dict[str, dict[str, int]] = {}
    for e in entries:
        for name, docs, tokens in zip(e["categories"], e["category_docs"], e["category_tokens"]):
            t = totals.setdefault(name, {"docs": 0, "tokens": 0})
            t["docs"] += docs
            t["tokens"] += tokens
    return dict(sorted(totals.items()))


def _token_names(shard_dirs: list[Path]) -> list[tuple[Path, dict, str]]:
    """(text shard, its manifest entry, token shard name) for every shard of every directory."""
    out, seen = [], set()
    for d in shard_dirs:
        manifest = shardlib.load_manifest(d)
        for entry in manifest["shards"]:
            stem = entry["name"][: -len(shardlib.SHARD_SUFFIX)]
            name = stem if len(shard_dirs) == 1 else f"{d.resolve().name}-{stem}"
            if name in seen:
                raise UserError(f"{d}: shard name {name!r} clashes with another directory's; give the parts distinct names")
            seen.add(name)
            out.append((d / entry["name"], entry, name))
    return out


def tokenize(shard_dirs: list[str | Path], tokenizer_dir: str | Path, out_dir: str | Path, workers: int = 1,
             overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Tokenise every shard of `shard_dirs`; returns the token manifest."""
    from tqdm import tqdm

    from ..tokenizer import Tokenizer

    tok = Tokenizer.load(tokenizer_dir)
    dirs = [Path(d) for d in shard_dirs]
    jobs = _token_names(dirs)
    out = Path(out_dir)
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{out}: output directory is not empty (pass --overwrite to replace it)")
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # first: a half-rewritten directory must not look complete
    for p in itertools.chain(out.glob("*.bin"), out.glob("*.idx.npy"), out.glob("*.cat.npy")):
        p.unlink()
    workers = max(1, min(workers, len(jobs)))
    threads = max(1, (os.cpu_count() or 1) // workers)
    tasks = [(str(src), entry, str(out / name), str(Path(tokenizer_dir)), threads) for src, entry, name in jobs]
    total_docs = sum(entry["num_lines"] for _, entry, _ in jobs)
    bar = tqdm(total=total_docs, unit="doc", desc="tokenize", disable=not progress, mininterval=0.5, dynamic_ncols=True)
    counts = {"tokens": 0}
    start = time.perf_counter()

    def on_progress(update):
        counts["tokens"] += update[0]
        bar.update(update[1])
        bar.set_postfix_str(f"{counts['tokens'] / max(time.perf_counter() - start, 1e-9):,.0f} tok/s", refresh=False)

    entries = run_pool(tokenize_shard, tasks, workers, on_result=lambda e: None, on_progress=on_progress)
    bar.close()
    seconds = time.perf_counter() - start
    manifest = {
        "format": FORMAT,
        "version": 2,  # 2: per-document categories (NAME.cat.npy, "categories")
        "tokenizer": {"fingerprint": tok.fingerprint, "vocab_size": tok.vocab_size, "bos_id": tok.bos_id,
                      "eos_id": tok.eos_id},
        "dtype": token_dtype(tok.vocab_size).name,
        "shards": entries,
        "num_tokens": sum(e["num_tokens"] for e in entries),
        "num_docs": sum(e["num_docs"] for e in entries),
        "num_bytes": sum(e["num_bytes"] for e in entries),
        "categories": category_totals(entries),
        "source": {"shard_dirs": [str(d) for d in dirs],
                   "manifest_sha256": [hashlib.sha256((d / shardlib.MANIFEST).read_bytes()).hexdigest() for d in dirs],
                   "tokenizer_dir": str(tokenizer_dir)},
        "seconds": round(seconds, 3),
    }
    shardlib.write_bytes_atomic(out / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode("utf-8"))
    return manifest


# ----------------------------------------------------------------------------------------------
# reading


class TokenShards:
    """A token-shard directory, memory-mapped. `verify=True` also checks every .bin's sha256."""

    def __init__(self, directory: str | Path, verify: bool = False):
        self.directory = Path(directory)
        path = self.directory / MANIFEST
        if not path.is_file():
            raise UserError(f"{path}: no manifest (not a token-shard directory, or `data tokenize` did not finish)")
        try:
            self.manifest: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UserError(f"{path}: not valid JSON ({exc})") from None
        if self.manifest.get("format") != FORMAT:
            raise UserError(f"{path}: not an {FORMAT} manifest")
        self.dtype = np.dtype(self.manifest["dtype"])
        self.shards: list[np.ndarray] = []
        self.indices: list[np.ndarray] = []
        entries = self.manifest["shards"]
        # every category of the directory, sorted; a directory from before categories: UNKNOWN only
        self.categories: list[str] = sorted({n for e in entries for n in e.get("categories", [UNKNOWN])}) or [UNKNOWN]
        for entry in entries:
            bin_path = self.directory / f"{entry['name']}.bin"
            idx_path = self.directory / f"{entry['name']}.idx.npy"
            for p in (bin_path, idx_path):
                if not p.is_file():
                    raise UserError(f"{p}: missing (listed in {path})")
            expected = entry["num_tokens"] * self.dtype.itemsize
            if bin_path.stat().st_size != expected:
                raise UserError(f"{bin_path}: {bin_path.stat().st_size} bytes, manifest says {expected}")
            idx = np.load(idx_path, mmap_mode="r")
            if idx.ndim != 1 or len(idx) != entry["num_docs"] + 1 or (len(idx) and (idx[0] != 0 or idx[-1] != entry["num_tokens"])):
                raise UserError(f"{idx_path}: document index does not match the manifest")
            tokens = np.memmap(bin_path, dtype=self.dtype, mode="r") if expected else np.zeros(0, self.dtype)
            self.shards.append(tokens)
            self.indices.append(idx)
        if verify:
            self.verify()

    @property
    def tokenizer(self) -> dict[str, Any]:
        return self.manifest["tokenizer"]

    @property
    def num_tokens(self) -> int:
        return int(self.manifest["num_tokens"])

    def __len__(self) -> int:
        return int(self.manifest["num_docs"])

    def verify(self) -> None:
        """sha256 of every .bin against the manifest; a mismatch is a UserError naming the file."""
        for entry in self.manifest["shards"]:
            bin_path = self.directory / f"{entry['name']}.bin"
            digest = hashlib.sha256()
            with open(bin_path, "rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    digest.update(block)
            if digest.hexdigest() != entry["sha256"]:
                raise UserError(f"{bin_path}: sha256 does not match the manifest (corrupted or replaced)")

    def document_categories(self) -> np.ndarray:
        """(num_docs,) int64: each document's index into `categories` (all 0 for a directory
        without `.cat.npy`, whose one category is UNKNOWN)."""
        index = {name: i for i, name in enumerate(self.categories)}
        parts = []
        for entry in self.manifest["shards"]:
            if "categories" not in entry:
                parts.append(np.full(entry["num_docs"], index[UNKNOWN], np.int64))
                continue
            path = self.directory / f"{entry['name']}.cat.npy"
            if not path.is_file():
                raise UserError(f"{path}: missing (listed in {self.directory / MANIFEST})")
            local = np.load(path)
            if local.shape != (entry["num_docs"],) or (len(local) and int(local.max()) >= len(entry["categories"])):
                raise UserError(f"{path}: document categories do not match the manifest")
            parts.append(np.array([index[n] for n in entry["categories"]], np.int64)[local])
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def document_spans(self) -> np.ndarray:
        """(num_docs, 3) int64 rows of (shard, start, end): document i is shards[shard][start:end]."""
        parts = []
        for k, idx in enumerate(self.indices):
            idx = np.asarray(idx)
            n = len(idx) - 1
            part = np.empty((n, 3), dtype=np.int64)
            part[:, 0] = k
            part[:, 1] = idx[:-1]
            part[:, 2] = idx[1:]
            parts.append(part)
        return np.concatenate(parts) if parts else np.zeros((0, 3), np.int64)

    def document(self, i: int) -> np.ndarray:
        """Tokens of document i (bos ... eos), a view into the memmap."""
        if not hasattr(self, "_spans"):
            self._spans = self.document_spans()
        shard, start, end = self._spans[i]
        return self.shards[shard][start:end]


# ----------------------------------------------------------------------------------------------
# command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shards", nargs="+", required=True, metavar="DIR", help="prepared text shard directories")
    parser.add_argument("--tokenizer", required=True, metavar="DIR", help="tokenizer directory (openllama tokenizer train)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output token-shard directory")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    manifest = tokenize(args.shards, args.tokenizer, args.out, workers=args.workers, overwrite=args.overwrite,
                        progress=not args.no_progress)
    secs = max(manifest["seconds"], 1e-9)
    print(f"{args.out}: {len(manifest['shards'])} shards, {manifest['num_docs']} documents "
          f"in {len(manifest['categories'])} categories, "
          f"{manifest['num_tokens']:,} tokens ({manifest['dtype']}) in {secs:.1f} s "
          f"({manifest['num_tokens'] / secs:,.0f} tokens/s, {manifest['num_bytes'] / max(manifest['num_tokens'], 1):.2f} bytes/token)")
    return 0
