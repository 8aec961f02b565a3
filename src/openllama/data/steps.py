"""`data prepare`'s work as datatrove pipeline steps, in four stages (see data/pipeline.py).

scan (N tasks; task r takes input files r, r + N, ...):
    ReadInputs -> [ExtractText -> IdentifyLanguage -> FilterQuality]  (warc/wet only)
               -> Clean -> [Signature] (near-dedup) -> Spool
dedup (1 task): Dedup - exact dedup (first occurrence in input order) and MinHash clustering over
    every input, then the shard plan.
write (N tasks): WriteShards - shard j of the plan by task j mod N.
manifest (1 task): WriteManifest - per output directory, then removes the spools.

Documents travel as datatrove `Document`s. A step never removes one: a dropped document carries
`metadata["drop"] = reason` to the end of the scan, where `Spool` counts it (by file, source,
language and reason) - the one place that counts. Marker documents (`metadata["mark"]`: "open" at
each input file, "error" for a bad record) pass every step untouched. Everything a stage hands to
the next is a file under OUT/.work (spools, pickled results, the plan), so stages can run on
different machines that share the output file system (Slurm, Ray).
"""

from __future__ import annotations

import pickle
import shutil
from collections import Counter
from pathlib import Path
from typing import Iterator

import numpy as np
import orjson
from datatrove.data import Document
from datatrove.pipeline.base import PipelineStep

from ..errors import UserError
from . import shards as shardlib
from .clean import content_hash, drop_reason, normalise_utf8
from .dedup import Minhasher, near_duplicates
from .sources import BadRecord, read_records
from .web import LanguageId, QualityFilters, extract_main_text, read_warc

_dumps, _NEWLINE = orjson.dumps, orjson.OPT_APPEND_NEWLINE
_SPOOL_BUFFER = 1 << 20


def save_pickle(path: Path, obj) -> None:
    """Not fsynced: a task killed while writing is not marked complete, so it runs again and
    rewrites the file before any later stage reads it."""
    Path(path).write_bytes(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))


def drain(data) -> None:
    """Run the steps before (when stages are chained in one task, the stage before)."""
    if data is not None:
        for _ in data:
            pass


def load_pickle(path: Path):
    with open(path, "rb") as f:
        return pickle.load(f)


class Step(PipelineStep):
    """A step that judges each live document: `judge(doc)` returns a drop reason or None (and may
    change the document). Marked and dropped documents pass through untouched."""

    type = "openllama"

    def __init__(self, job):
        super().__init__()
        self.job = job

    def judge(self, doc: Document) -> str | None:
        raise NotImplementedError

    def run(self, data, rank: int = 0, world_size: int = 1) -> Iterator[Document]:
        judge = self.judge
        for doc in data:
            md = doc.metadata
            if "drop" not in md and "mark" not in md:
                reason = judge(doc)
                if reason is not None:
                    md["drop"] = reason
            yield doc


# ----------------------------------------------------------------------------------------------
# scan


class ReadInputs(PipelineStep):
    """Input files r, r + N, ... of `job.files` -> documents (our readers: data/sources.py for
    corpus formats, data/web.py for WARC/WET)."""

    name, type = "read inputs", "openllama"

    def __init__(self, job):
        super().__init__()
        self.job = job

    def run(self, data, rank: int = 0, world_size: int = 1) -> Iterator[Document]:
        for i in range(rank, len(self.job.files), world_size):
            yield from self.read_file(i)

    def _bad(self, i: int, message: str) -> Document:
        if self.job.opts.on_error == "raise":
            raise UserError(message)
        return Document("", str(i), metadata={"f": i, "mark": "error", "message": message})

    def read_file(self, i: int) -> Iterator[Document]:
        path, opts = self.job.files[i], self.job.opts
        fmt = self.job.formats[i]
        yield Document("", str(i), metadata={"f": i, "mark": "open", "format": fmt})
        if fmt in ("warc", "wet"):
            yield from self.read_web(i, path, fmt)
            return
        records = read_records(path, fmt, text_field=opts.text_field, text_unit=opts.text_unit,
                               hf_split=opts.hf_split, hf_config=opts.hf_config)
        for rec in records:
            if isinstance(rec, BadRecord):
                yield self._bad(i, rec.message())
            else:
                yield Document(rec.text, rec.where, metadata={"f": i, "source": rec.source})

    def read_web(self, i: int, path: str, fmt: str) -> Iterator[Document]:
        from warcio.exceptions import ArchiveLoadFailed

        stem = Path(path).name.split(".")[0]
        try:
            for rec in read_warc(path, fmt):
                md = {"f": i, "source": stem, "url": rec.url}
                if rec.drop:
                    md["drop"] = rec.drop
                elif fmt == "warc":
                    md["html"] = True
                yield Document(rec.text, rec.where, metadata=md)
        except (ArchiveLoadFailed, OSError, EOFError, ValueError) as exc:
            yield self._bad(i, f"{path}: not a readable {fmt.upper()} file ({exc})")


class ExtractText(Step):
    """HTML -> main text with trafilatura, in datatrove's extractor sandbox (a page that takes
    longer than `timeout` seconds is dropped as `extract_timeout`)."""

    name = "extract main text (trafilatura)"

    def run(self, data, rank: int = 0, world_size: int = 1) -> Iterator[Document]:
        from datatrove.pipeline.extractors.base import ExtractorSandbox

        with ExtractorSandbox(timeout=self.job.web.extract_timeout, warmup_text="") as sandbox:
            self.sandbox = sandbox
            yield from super().run(data, rank, world_size)

    def judge(self, doc: Document) -> str | None:
        if not doc.metadata.pop("html", False):
            return None
        try:
            doc.text = self.sandbox.process_document(doc.text, extract_main_text)
        except TimeoutError:
            return "extract_timeout"
        except EOFError:
            return "extract_failed"
        except Exception:  # trafilatura raising on a pathological page
            return "extract_failed"
        return None if doc.text.strip() else "no_text"


class IdentifyLanguage(Step):
    """fastText lid.176 -> metadata language/score; routes the document to its language's output
    (`--languages`), or drops it as `language` (another language, or below the threshold)."""

    name = "identify language (fastText lid.176)"

    def __init__(self, job):
        super().__init__(job)
        self.lid = LanguageId()

    def judge(self, doc: Document) -> str | None:
        lang, score = self.lid.predict(doc.text)
        web = self.job.web
        doc.metadata["language"], doc.metadata["language_score"] = lang, round(score, 4)
        if score < web.language_threshold or (web.languages and lang not in web.languages):
            return "language"
        if web.languages:
            doc.metadata["route"] = lang
        return None


class FilterQuality(Step):
    """Gopher repetition, Gopher quality, C4 and FineWeb rules (data/web.py), per language."""

    name = "quality filters (Gopher, C4, FineWeb)"

    def __init__(self, job):
        super().__init__(job)
        self.filters = QualityFilters(job.web.quality)

    def judge(self, doc: Document) -> str | None:
        reason, doc.text = self.filters.apply(doc.text, doc.metadata.get("language", ""))
        return reason


class Clean(Step):
    """Normalise (control characters, optional NFKC) and the cheap filters of data/clean.py."""

    name = "normalise and filter"

    def run(self, data, rank: int = 0, world_size: int = 1) -> Iterator[Document]:
        cfg, raise_ = self.job.opts.clean, self.job.opts.on_error == "raise"
        for doc in data:
            md = doc.metadata
            if "drop" in md or "mark" in md:
                yield doc
                continue
            what = "text"
            try:  # a lone surrogate (from a \ud800-style JSON escape) cannot be written as UTF-8
                doc.text, data_ = normalise_utf8(doc.text, cfg.nfkc)
                what = "source name"
                md["source"].encode("utf-8")
            except UnicodeEncodeError as exc:
                message = f"{doc.id}: {what} is not valid Unicode (lone surrogate at character {exc.start})"
                if raise_:
                    raise UserError(message) from None
                yield Document("", doc.id, metadata={"f": md["f"], "mark": "error", "message": message})
                continue
            reason = drop_reason(doc.text, cfg, data_)
            if reason is None:
                md["utf8"] = data_
            else:
                md["drop"] = reason
            yield doc


class Signature(Step):
    """MinHash signature of each kept document (data/dedup.py)."""

    name = "minhash signature"

    def __init__(self, job):
        super().__init__(job)
        self.hasher = Minhasher(job.minhash)

    def judge(self, doc: Document) -> str | None:
        doc.metadata["sig"] = self.hasher.signature(doc.text)
        return None


class ScanResult:
    """What the scan learned about one input file's documents of one route (output directory):
    counts by reason, source and language, and per kept document its content hash, spool offsets,
    source, language and MinHash signature."""

    def __init__(self, path: str, fmt: str, spool: str):
        self.path, self.format, self.spool = path, fmt, spool
        self.read = self.errors = 0
        self.error_examples: list[str] = []
        self.dropped: Counter = Counter()
        self.sources: list[str] = []
        self.source_read: Counter = Counter()
        self.source_dropped: dict[str, Counter] = {}
        self.languages: list[str] = []
        self.language_read: Counter = Counter()
        self.language_dropped: dict[str, Counter] = {}
        self.hashes = np.zeros(0, np.uint64)
        self.offsets = np.zeros(1, np.int64)  # kept + 1
        self.source_ids = np.zeros(0, np.uint32)
        self.language_ids = np.zeros(0, np.uint32)
        self.signatures: np.ndarray | None = None  # uint32[kept, hashes] with near-dedup
        self.has_signature = np.zeros(0, bool)


class _Tally:
    """One route's ScanResult being filled, with its spool open."""

    def __init__(self, result: ScanResult, num_hashes: int):
        self.r = result
        self.out = None
        self.hashes, self.offsets, self.sids, self.lids, self.sigs = [], [0], [], [], []
        self.src_index: dict[str, int] = {}
        self.lang_index: dict[str, int] = {}
        self.pos, self.num_hashes = 0, num_hashes

    def _id(self, index: dict, names: list, name: str) -> int:
        i = index.get(name)
        if i is None:
            i = index[name] = len(names)
            names.append(name)
        return i

    def add(self, md: dict, line: bytes | None) -> None:
        r, source, lang = self.r, md["source"], md.get("language")
        r.read += 1
        r.source_read[source] += 1
        if lang is not None:
            r.language_read[lang] += 1
        reason = md.get("drop")
        if reason is not None:
            r.dropped[reason] += 1
            r.source_dropped.setdefault(source, Counter())[reason] += 1
            if lang is not None:
                r.language_dropped.setdefault(lang, Counter())[reason] += 1
            return
        if self.out is None:
            self.out = open(r.spool, "wb", buffering=_SPOOL_BUFFER)  # buffered: no per-line syscall
        self.hashes.append(content_hash(md["utf8"]))
        self.sids.append(self._id(self.src_index, r.sources, source))
        self.lids.append(self._id(self.lang_index, r.languages, lang) if lang is not None else 0)
        if "sig" in md:
            self.sigs.append(md["sig"])
        self.pos += len(line)
        self.offsets.append(self.pos)
        self.out.write(line)

    def finish(self) -> ScanResult:
        if self.out is not None:
            self.out.close()
        r = self.r
        r.hashes = np.array(self.hashes, dtype=np.uint64)
        r.offsets = np.array(self.offsets, dtype=np.int64)
        r.source_ids = np.array(self.sids, dtype=np.uint32)
        r.language_ids = np.array(self.lids, dtype=np.uint32)
        if self.sigs:
            r.has_signature = np.array([s is not None for s in self.sigs], dtype=bool)
            empty = np.zeros(self.num_hashes, np.uint32)
            r.signatures = np.stack([s if s is not None else empty for s in self.sigs])
        return r


class Spool(PipelineStep):
    """The end of the scan: counts every document and writes each kept one as a JSON line
    (orjson's compact `{"text", "source", ...}`, a pure function of its fields) to a spool per
    input file and route; then pickles the file's results (`work.result(i)`)."""

    name, type = "spool kept documents", "openllama"

    def __init__(self, job):
        super().__init__()
        self.job = job

    def run(self, data, rank: int = 0, world_size: int = 1) -> Iterator[Document]:
        current, tallies = None, {}
        for doc in data:
            md = doc.metadata
            mark = md.get("mark")
            if mark == "open":
                if current is not None:
                    self.finish(current, tallies)
                current, tallies = md["f"], {}
                fmt = md["format"]
                continue
            if mark == "error":
                r = self.tally(tallies, current, fmt, "").r
                r.errors += 1
                if len(r.error_examples) < 10:
                    r.error_examples.append(md["message"])
                continue
            route = md.get("route", "")
            line = None
            if "drop" not in md:
                obj = {"text": doc.text, "source": md["source"]}
                if "language" in md:
                    obj["language"], obj["url"] = md["language"], md.get("url", "")
                line = _dumps(obj, option=_NEWLINE)
            self.tally(tallies, current, fmt, route).add(md, line)
        if current is not None:
            self.finish(current, tallies)
        return
        yield

    def tally(self, tallies: dict, i: int, fmt: str, route: str) -> _Tally:
        t = tallies.get(route)
        if t is None:
            spool = str(self.job.work.spool(i, route))
            t = tallies[route] = _Tally(ScanResult(self.job.files[i], fmt, spool), self.job.minhash.num_hashes)
        return t

    def finish(self, i: int, tallies: dict) -> None:
        self.tally(tallies, i, self.job.formats[i], "")  # every file appears in the main output's counts
        save_pickle(self.job.work.result(i), {route: t.finish() for route, t in tallies.items()})
        self.stat_update("files")


# ----------------------------------------------------------------------------------------------
# dedup: exact (first occurrence in input order), then MinHash clustering, then the shard plan


def first_occurrences(hash_arrays: list[np.ndarray]) -> list[np.ndarray]:
    """Per file, a boolean mask of documents whose text has not appeared before (in input order)."""
    sizes = [len(h) for h in hash_arrays]
    every = np.concatenate(hash_arrays) if hash_arrays else np.zeros(0, np.uint64)
    keep = np.zeros(len(every), dtype=bool)
    if len(every):
        _, first = np.unique(every, return_index=True)  # stable: index of the first occurrence
        keep[first] = True
    return np.split(keep, np.cumsum(sizes)[:-1]) if sizes else []


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


def load_results(job) -> dict[str, list[ScanResult]]:
    """Route -> one ScanResult per input file (empty where the file has none of that route)."""
    per_file = [load_pickle(job.work.result(i)) for i in range(len(job.files))]
    routes = sorted(set().union(*per_file), key=lambda r: (r == "", r))  # the main output last
    return {route: [res.get(route) or ScanResult(job.files[i], job.formats[i], "") for i, res in enumerate(per_file)]
            for route in routes}


def near_duplicate_masks(results: list[ScanResult], exact: list[np.ndarray], minhash) -> list[np.ndarray]:
    sizes = [len(r.hashes) for r in results]
    if not any(r.signatures is not None for r in results):
        return [np.zeros(n, bool) for n in sizes]
    empty = np.zeros((0, minhash.num_hashes), np.uint32)
    sigs = np.concatenate([r.signatures if r.signatures is not None else empty for r in results])
    has = np.concatenate([r.has_signature if r.signatures is not None else np.zeros(0, bool) for r in results])
    near = near_duplicates(sigs, np.concatenate(exact) & has, minhash)
    return np.split(near, np.cumsum(sizes)[:-1])


class Dedup(PipelineStep):
    name, type = "dedup (exact + MinHash) and shard plan", "openllama"

    def __init__(self, job):
        super().__init__()
        self.job = job

    def run(self, data, rank: int = 0, world_size: int = 1):
        import time

        drain(data)
        job, plan = self.job, {"scan_end": time.time(), "routes": {}}
        for route, results in load_results(job).items():
            exact = first_occurrences([r.hashes for r in results]) if job.opts.clean.dedup else \
                [np.ones(len(r.hashes), bool) for r in results]
            near = near_duplicate_masks(results, exact, job.minhash) if job.near_dedup else \
                [np.zeros(len(r.hashes), bool) for r in results]
            keep = [e & ~n for e, n in zip(exact, near)]
            plan["routes"][route] = {"exact": exact, "near": near,
                                     "shards": plan_shards(results, keep, job.opts.max_lines)}
            self.stat_update("near_duplicates", value=int(sum(n.sum() for n in near)))
        save_pickle(job.work.plan(), plan)
        return
        yield


# ----------------------------------------------------------------------------------------------
# write: shards in parallel, then the manifests


def write_planned_shard(task: tuple[str, list[tuple[str, np.ndarray, np.ndarray]], int]) -> dict:
    """Compress one shard's lines straight from the memory-mapped spools (no read or join copy)."""
    import contextlib
    import mmap

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


def shard_jobs(plan: dict) -> list[tuple[str, int]]:
    return [(route, k) for route, p in plan["routes"].items() for k in range(len(p["shards"]))]


class WriteShards(PipelineStep):
    name, type = "write shards", "openllama"

    def __init__(self, job):
        super().__init__()
        self.job = job

    def run(self, data, rank: int = 0, world_size: int = 1):
        drain(data)
        job = self.job
        plan = load_pickle(job.work.plan())
        jobs = shard_jobs(plan)
        for j in range(rank, len(jobs), world_size):
            route, k = jobs[j]
            out = job.work.route_dir(route)
            out.mkdir(parents=True, exist_ok=True)
            entry = write_planned_shard((str(out / shardlib.shard_name(k)), plan["routes"][route]["shards"][k],
                                         job.opts.zstd_level))
            save_pickle(job.work.entry(route, k), entry)
            self.stat_update("shards")
        return
        yield


class WriteManifest(PipelineStep):
    """One manifest per output directory (each language's first, the main one last: the main
    manifest is what marks the run finished), then the spools go."""

    name, type = "write manifests", "openllama"

    def __init__(self, job):
        super().__init__()
        self.job = job

    def run(self, data, rank: int = 0, world_size: int = 1):
        import time

        from .manifest import build_manifest

        drain(data)
        job = self.job
        plan = load_pickle(job.work.plan())
        start = load_pickle(job.work.started())
        seconds = {"scan": round(plan["scan_end"] - start, 3), "total": round(time.time() - start, 3)}
        routes = [r for r in plan["routes"] if r]
        for route, results in load_results(job).items():
            p = plan["routes"][route]
            entries = [load_pickle(job.work.entry(route, k)) for k in range(len(p["shards"]))]
            manifest = build_manifest(results, p["exact"], p["near"], entries, job)
            if route == "" and routes:
                manifest["routes"] = {r: r for r in routes}
            manifest["seconds"] = seconds
            out = job.work.route_dir(route)
            out.mkdir(parents=True, exist_ok=True)
            shardlib.write_manifest(out, manifest)
        shutil.rmtree(job.work.root, ignore_errors=True)
        return
        yield
