"""`openllama data prepare`: corpora -> normalise -> filter -> exact dedup -> jsonl.zst shards.

Three phases, so the result is byte-identical whatever `--workers` is:

1. scan (parallel over input files): read, normalise, filter; each kept document becomes one JSON
   line in a per-file spool (uncompressed, in a temporary folder inside the output directory), with
   its 64-bit content hash and byte offset. The line is orjson's compact
   `{"text":...,"source":...}`, a pure function of the two strings, whichever process writes it.
2. dedup (main process): over all hashes in input order, keep each text's first occurrence.
3. write (parallel over shards): shard k holds kept lines [k * max_lines, (k + 1) * max_lines) of
   that global order, streamed from the memory-mapped spools into one zstd frame (whose bytes
   depend only on the lines, not on how the spools split them); it is hashed and renamed into
   place. The manifest comes last.

Where the time goes (tinyshakespeare in ~4 KB documents, bench/data_bench.py): per document, the
repetition filter's split into lines and set of lines costs the most, then compression, hashing,
JSON in and out; each of those runs in C, at most once per document and without text copies
that can be avoided (see clean.normalise_utf8).

Memory holds 18 bytes per document (hash, offset, source id), never the text of a whole file.
`--num-parts N --part I` keeps every N-th input file (from I), so array jobs on many machines
each prepare one part into its own directory (dedup is then per part).
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import mmap
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from ..errors import UserError
from . import shards as shardlib
from .clean import DROP_REASONS, CleanConfig, content_hash, drop_reason, normalise_utf8
from .pool import make_pool, progress_sink, run_pool
from .sources import FORMATS, TEXT_UNITS, BadRecord, Document, read_records, resolve_format

_dumps, _NEWLINE = orjson.dumps, orjson.OPT_APPEND_NEWLINE
_SPOOL_BUFFER = 1 << 20
_PROGRESS_EVERY = 4 << 20


@dataclass(frozen=True)
class PrepareOptions:
    fmt: str = "auto"
    text_field: str = "text"
    text_unit: str = "file"
    clean: CleanConfig = field(default_factory=CleanConfig)
    on_error: str = "raise"  # or "skip": count bad records in the manifest and go on
    max_lines: int = shardlib.MAX_LINES
    workers: int = 1
    zstd_level: int = shardlib.ZSTD_LEVEL
    hf_split: str = "train"
    hf_config: str | None = None
    num_parts: int = 1
    part: int = 0
    progress: bool = True


@dataclass
class ScanResult:
    """What phase 1 learned about one input file."""

    path: str
    format: str
    spool: str
    read: int = 0
    errors: int = 0
    error_examples: list[str] = field(default_factory=list)
    dropped: Counter = field(default_factory=Counter)
    sources: list[str] = field(default_factory=list)
    source_read: Counter = field(default_factory=Counter)
    source_dropped: dict[str, Counter] = field(default_factory=dict)
    hashes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))
    offsets: np.ndarray = field(default_factory=lambda: np.zeros(1, np.int64))  # len kept + 1
    source_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint32))


# ----------------------------------------------------------------------------------------------
# inputs


def expand_inputs(patterns: list[str], fmt: str = "auto") -> list[str]:
    """Files from paths, directories (recursively) and globs, in the order given (each glob and
    directory sorted), without repeats. `hf:NAME` (or any name with --format hf) passes through."""
    files: list[str] = []
    for pattern in patterns:
        if pattern.startswith("hf:") or (fmt == "hf" and not os.path.exists(pattern)):
            files.append(pattern)
        elif os.path.isdir(pattern):
            found = sorted(str(p) for p in Path(pattern).rglob("*") if p.is_file() and not p.name.startswith("."))
            if not found:
                raise UserError(f"{pattern}: directory holds no files")
            files += found
        elif glob.has_magic(pattern):
            found = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
            if not found:
                raise UserError(f"{pattern}: no file matches")
            files += found
        elif os.path.isfile(pattern):
            files.append(pattern)
        else:
            raise UserError(f"{pattern}: no such file")
    return list(dict.fromkeys(files))


def select_part(files: list[str], num_parts: int, part: int) -> list[str]:
    if num_parts < 1 or not 0 <= part < num_parts:
        raise UserError(f"--part must be in [0, --num-parts) (got part {part} of {num_parts})")
    return files[part::num_parts]


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


# ----------------------------------------------------------------------------------------------
# phase 1: scan one file (runs in a worker process)

class _Progress:
    """Batches (bytes, docs) updates for the bar: a queue put per 4 MB, not per document."""

    def __init__(self, sink):
        self.sink, self.bytes, self.docs = sink, 0, 0

    def add_bytes(self, n: int) -> None:
        self.bytes += n
        if self.bytes >= _PROGRESS_EVERY:
            self.flush()

    def flush(self) -> None:
        if self.sink is not None and (self.bytes or self.docs):
            self.sink((self.bytes, self.docs))
        self.bytes = self.docs = 0


def scan_file(path: str, spool: str, opts: PrepareOptions, sink=None) -> ScanResult:
    fmt = resolve_format(path, opts.fmt, opts.text_field)
    result = ScanResult(path=path, format=fmt, spool=spool)
    progress = _Progress(sink if sink is not None else progress_sink())
    source_index: dict[str, int] = {}
    hashes, offsets, source_ids = [], [0], []
    pos = 0
    cfg = opts.clean
    records = read_records(path, fmt, text_field=opts.text_field, text_unit=opts.text_unit,
                           hf_split=opts.hf_split, hf_config=opts.hf_config, on_bytes=progress.add_bytes)
    with open(spool, "wb", buffering=_SPOOL_BUFFER) as out:  # buffered: no per-line syscall
        for rec in records:
            if isinstance(rec, Document):
                what = "text"
                try:  # a lone surrogate (from a \ud800-style JSON escape) cannot be written as UTF-8
                    text, data = normalise_utf8(rec.text, cfg.nfkc)
                    what = "source name"
                    rec.source.encode("utf-8")
                except UnicodeEncodeError as exc:
                    rec = BadRecord(rec.where, f"{what} is not valid Unicode (lone surrogate at character {exc.start})")
            if isinstance(rec, BadRecord):
                if opts.on_error == "raise":
                    raise UserError(rec.message())
                result.errors += 1
                if len(result.error_examples) < 10:
                    result.error_examples.append(rec.message())
                continue
            result.read += 1
            progress.docs += 1
            result.source_read[rec.source] += 1
            reason = drop_reason(text, cfg, data)
            if reason is not None:
                result.dropped[reason] += 1
                result.source_dropped.setdefault(rec.source, Counter())[reason] += 1
                continue
            sid = source_index.get(rec.source)
            if sid is None:
                sid = source_index[rec.source] = len(result.sources)
                result.sources.append(rec.source)
            # compact JSON, non-ASCII as UTF-8: orjson's output is a pure function of the two strings
            line = _dumps({"text": text, "source": rec.source}, option=_NEWLINE)
            hashes.append(content_hash(data))
            source_ids.append(sid)
            pos += len(line)
            offsets.append(pos)
            out.write(line)
    progress.flush()
    result.hashes = np.array(hashes, dtype=np.uint64)
    result.offsets = np.array(offsets, dtype=np.int64)
    result.source_ids = np.array(source_ids, dtype=np.uint32)
    return result


def _scan_task(task: tuple[str, str, PrepareOptions], sink=None) -> ScanResult:
    return scan_file(*task, sink=sink)


# ----------------------------------------------------------------------------------------------
# phase 2: global exact dedup


def first_occurrences(hash_arrays: list[np.ndarray]) -> list[np.ndarray]:
    """Per file, a boolean mask of documents whose text has not appeared before (in input order)."""
    sizes = [len(h) for h in hash_arrays]
    every = np.concatenate(hash_arrays) if hash_arrays else np.zeros(0, np.uint64)
    keep = np.zeros(len(every), dtype=bool)
    if len(every):
        _, first = np.unique(every, return_index=True)  # stable: index of the first occurrence
        keep[first] = True
    return np.split(keep, np.cumsum(sizes)[:-1]) if sizes else []


# ----------------------------------------------------------------------------------------------
# phase 3: write shards (runs in worker processes)


def plan_shards(results: list[ScanResult], masks: list[np.ndarray], max_lines: int) -> list[list[tuple[str, np.ndarray, np.ndarray]]]:
    """Shard k -> its pieces: (spool file, start offsets, end offsets) of the kept lines, in order."""
    plans: list[list[tuple[str, np.ndarray, np.ndarray]]] = []
    room = 0
    for res, mask in zip(results, masks):
        kept = np.flatnonzero(mask)
        i = 0
        while i < len(kept):
            if room == 0:
                plans.append([])
                room = max_lines
            take = kept[i : i + room]
            plans[-1].append((res.spool, res.offsets[take], res.offsets[take + 1]))
            room -= len(take)
            i += len(take)
    return plans


def write_planned_shard(task: tuple[str, list[tuple[str, np.ndarray, np.ndarray]], int]) -> dict[str, Any]:
    """Compress one shard's lines straight from the memory-mapped spools (no read or join copy)."""
    path, pieces, level = task
    with contextlib.ExitStack() as stack:
        chunks = []
        for spool, starts, ends in pieces:
            f = stack.enter_context(open(spool, "rb"))
            view = memoryview(stack.enter_context(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)))
            stack.callback(view.release)  # before the map closes (LIFO)
            if len(starts) == 1 or bool(np.all(starts[1:] == ends[:-1])):
                chunks.append(view[int(starts[0]) : int(ends[-1])])  # contiguous: no duplicate in between
            else:
                chunks.extend(view[int(s) : int(e)] for s, e in zip(starts, ends))
        stack.callback(lambda: [c.release() for c in chunks])  # first of all, even on an error
        return shardlib.write_shard(Path(path), chunks, level, num_lines=sum(len(s) for _, s, _ in pieces))


# ----------------------------------------------------------------------------------------------
# the whole run


def _prepare_out_dir(out: Path, overwrite: bool) -> None:
    existing = [p for p in out.iterdir()] if out.is_dir() else []
    if existing and not overwrite:
        raise UserError(f"{out}: output directory is not empty (pass --overwrite to replace its shards)")
    out.mkdir(parents=True, exist_ok=True)
    # The manifest goes first, so a directory caught halfway never looks complete.
    (out / shardlib.MANIFEST).unlink(missing_ok=True)
    for p in out.glob(f"*{shardlib.SHARD_SUFFIX}"):
        p.unlink()
    for p in out.glob(".spool-*"):
        shutil.rmtree(p, ignore_errors=True)


def _counts(read: int, kept: int, dropped: Counter, errors: int = 0) -> dict[str, Any]:
    return {"read": read, "kept": kept, "dropped": {r: dropped[r] for r in DROP_REASONS if dropped[r]}, "errors": errors}


def prepare(inputs: list[str], out_dir: str | Path, opts: PrepareOptions, overwrite: bool = False) -> dict[str, Any]:
    """Prepare shards from input paths/globs into out_dir; returns the manifest."""
    from tqdm import tqdm

    if opts.on_error not in ("raise", "skip"):
        raise UserError(f"--on-error must be 'raise' or 'skip' (got {opts.on_error!r})")
    if not 1 <= opts.max_lines <= shardlib.MAX_LINES:
        raise UserError(f"--max-lines must be between 1 and {shardlib.MAX_LINES} (got {opts.max_lines})")
    if opts.fmt not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)} (got {opts.fmt!r})")
    files = select_part(expand_inputs(inputs, opts.fmt), opts.num_parts, opts.part)
    if not files:
        raise UserError(f"part {opts.part} of {opts.num_parts} has no input files")
    out = Path(out_dir)
    _prepare_out_dir(out, overwrite)
    spool_dir = out / f".spool-{os.getpid()}"
    spool_dir.mkdir()
    start = time.perf_counter()
    pool = None
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, spool_dir, ignore_errors=True)
        total_in = sum(_size(f) for f in files)
        bar = tqdm(total=total_in or None, unit="B", unit_scale=True, desc="prepare", disable=not opts.progress,
                   mininterval=0.5, dynamic_ncols=True)
        docs = 0

        def on_progress(update):
            nonlocal docs
            bar.update(update[0])
            docs += update[1]
            bar.set_postfix(docs=docs, refresh=False)

        tasks = [(f, str(spool_dir / f"{i:06d}.jsonl"), opts) for i, f in enumerate(files)]
        if opts.workers > 1:
            pool = make_pool(opts.workers, preload=[__name__])
            stack.callback(pool[0].shutdown, cancel_futures=True)
        results = run_pool(_scan_task, tasks, opts.workers, on_result=lambda r: None, on_progress=on_progress, pool=pool)
        bar.close()
        scan_s = time.perf_counter() - start

        masks = first_occurrences([r.hashes for r in results]) if opts.clean.dedup else \
            [np.ones(len(r.hashes), bool) for r in results]
        plans = plan_shards(results, masks, opts.max_lines)
        names = [shardlib.shard_name(k) for k in range(len(plans))]
        wbar = tqdm(total=len(plans), unit="shard", desc="write", disable=not opts.progress, dynamic_ncols=True)
        entries = run_pool(write_planned_shard, [(str(out / n), p, opts.zstd_level) for n, p in zip(names, plans)],
                           opts.workers, on_result=lambda e: wbar.update(1), pool=pool)
        wbar.close()

    manifest = build_manifest(results, masks, entries, opts)
    manifest["seconds"] = {"scan": round(scan_s, 3), "total": round(time.perf_counter() - start, 3)}
    shardlib.write_manifest(out, manifest)
    return manifest


def build_manifest(results: list[ScanResult], masks: list[np.ndarray], entries: list[dict], opts: PrepareOptions) -> dict:
    inputs, total_dropped = [], Counter()
    src_read, src_kept, src_dropped = Counter(), Counter(), {}
    for res, mask in zip(results, masks):
        dropped = Counter(res.dropped)
        dups = int((~mask).sum())
        if dups:
            dropped["duplicate"] += dups
        kept = int(mask.sum())
        inputs.append({"path": res.path, "format": res.format, **_counts(res.read, kept, dropped, res.errors),
                       "error_examples": res.error_examples})
        total_dropped.update(dropped)
        src_read.update(res.source_read)
        for name, c in res.source_dropped.items():
            src_dropped.setdefault(name, Counter()).update(c)
        if res.sources:
            kept_per = np.bincount(res.source_ids[mask], minlength=len(res.sources))
            dup_per = np.bincount(res.source_ids[~mask], minlength=len(res.sources))
            for sid, name in enumerate(res.sources):
                src_kept[name] += int(kept_per[sid])
                if dup_per[sid]:
                    src_dropped.setdefault(name, Counter())["duplicate"] += int(dup_per[sid])
    sources = {name: _counts(src_read[name], src_kept[name], src_dropped.get(name, Counter()))
               for name in sorted(src_read)}
    for counts in sources.values():
        del counts["errors"]  # bad records have no source; they are counted per input
    num_lines = sum(e["num_lines"] for e in entries)
    return {
        "format": shardlib.FORMAT,
        "version": 1,
        "max_lines": opts.max_lines,
        "num_lines": num_lines,
        "num_bytes": sum(e["num_bytes"] for e in entries),
        "text_bytes": sum(e["text_bytes"] for e in entries),
        "shards": entries,
        "totals": _counts(sum(r.read for r in results), num_lines, total_dropped, sum(r.errors for r in results)),
        "sources": sources,
        "inputs": inputs,
        "settings": {"format": opts.fmt, "text_field": opts.text_field, "text_unit": opts.text_unit,
                     "on_error": opts.on_error, "clean": opts.clean.to_dict(), "zstd_level": opts.zstd_level,
                     "num_parts": opts.num_parts, "part": opts.part},
    }


# ----------------------------------------------------------------------------------------------
# command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="files, directories or globs (plain, .gz, .zst); hf:NAME for a hub dataset")
    parser.add_argument("--out", required=True, help="output shard directory")
    parser.add_argument("--format", default="auto", choices=FORMATS,
                        help="input format (auto: from the file name and the first record)")
    parser.add_argument("--text-field", default="text", help="text field of jsonl/parquet/hf records (a.b for nested)")
    parser.add_argument("--text-unit", default="file", choices=TEXT_UNITS,
                        help="plain text: one document per file, blank-line-separated paragraph, or line")
    parser.add_argument("--nfkc", action="store_true", help="apply Unicode NFKC normalisation")
    parser.add_argument("--min-chars", type=int, default=CleanConfig.min_chars)
    parser.add_argument("--max-chars", type=int, default=CleanConfig.max_chars)
    parser.add_argument("--max-dup-line-fraction", type=float, default=CleanConfig.max_dup_line_fraction,
                        help="drop documents whose repeated lines exceed this share of their lines")
    parser.add_argument("--no-dedup", action="store_true", help="keep exact duplicates")
    parser.add_argument("--max-lines", type=int, default=shardlib.MAX_LINES, help="documents per shard (at most 16384)")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    parser.add_argument("--num-parts", type=int, default=1, help="split the input file list into this many parts")
    parser.add_argument("--part", type=int, default=0, help="which part to prepare (e.g. $SLURM_ARRAY_TASK_ID)")
    parser.add_argument("--on-error", default="raise", choices=("raise", "skip"),
                        help="bad records: stop with an error naming file and line, or skip and count them")
    parser.add_argument("--overwrite", action="store_true", help="replace shards already in --out")
    parser.add_argument("--hf-split", default="train")
    parser.add_argument("--hf-config", default=None)
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    clean = CleanConfig(nfkc=args.nfkc, min_chars=args.min_chars, max_chars=args.max_chars,
                        max_dup_line_fraction=args.max_dup_line_fraction, dedup=not args.no_dedup)
    opts = PrepareOptions(fmt=args.format, text_field=args.text_field, text_unit=args.text_unit, clean=clean,
                          on_error=args.on_error, max_lines=args.max_lines, workers=args.workers,
                          hf_split=args.hf_split, hf_config=args.hf_config, num_parts=args.num_parts,
                          part=args.part, progress=not args.no_progress)
    manifest = prepare(args.inputs, args.out, opts, overwrite=args.overwrite)
    t = manifest["totals"]
    secs = manifest["seconds"]["total"]
    in_mb = sum(_size(i["path"]) for i in manifest["inputs"]) / 1e6
    dropped = ", ".join(f"{k} {v}" for k, v in t["dropped"].items()) or "none"
    print(f"{args.out}: {len(manifest['shards'])} shards, kept {t['kept']} of {t['read']} documents "
          f"(dropped: {dropped}; bad records skipped: {t['errors']}); {in_mb:.1f} MB in {secs:.1f} s "
          f"({in_mb / max(secs, 1e-9):.1f} MB/s)")
    return 0
