"""`openllama data prepare`: corpora -> normalise -> filter -> dedup -> jsonl.zst shards + manifest.

The work is a datatrove pipeline in four stages (data/pipeline.py; the steps: data/steps.py), run by
datatrove's local, Slurm or Ray executor (`--executor`):

1. scan (parallel over input files): read (data/sources.py; WARC/WET through data/web.py:
   trafilatura, fastText language ID, Gopher/C4/FineWeb filters), normalise, filter; each kept
   document becomes one JSON line in a per-file spool (OUT/.work), with its 64-bit content hash,
   byte offset and, with near-dedup, its MinHash signature. The line is orjson's compact
   `{"text":...,"source":...}`, a pure function of its fields, whichever process writes it.
2. dedup (one task): over all hashes in input order, keep each text's first occurrence; then
   MinHash LSH over every input (data/dedup.py); then the shard plan.
3. write (parallel over shards): shard k holds kept lines [k * max_lines, (k + 1) * max_lines) of
   that global order, streamed from the memory-mapped spools into one zstd frame (whose bytes
   depend only on the lines); it is hashed and renamed into place.
4. manifest (one task): per output directory; the spools go.

So the result is byte-identical whatever the executor, `--tasks` and `--workers` are.

Where the time goes (tinyshakespeare in ~4 KB documents, bench/data_bench.py): per document, the
repetition filter's split into lines and set of lines costs the most, then compression, hashing,
JSON in and out; each of those runs in C, at most once per document and without text copies
that can be avoided (see clean.normalise_utf8).

Memory holds 18 bytes per document (hash, offset, source id) plus 448 with near-dedup, never the
text of a whole file. `--num-parts N --part I` keeps every N-th input file (from I), so array jobs
can also prepare parts into separate directories by hand (dedup is then per part); `--executor
slurm` is the way to run one preparation over many machines.
"""

from __future__ import annotations

import argparse
import glob
import os
import pickle
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import UserError
from . import shards as shardlib
from .clean import CleanConfig
from .dedup import MinhashConfig
from .pipeline import EXECUTORS, WEB_FORMATS, ExecutorOptions, Job, WebOptions, Work
from .sources import FORMATS, TEXT_UNITS, resolve_format
from ..records import strip_compression

ALL_FORMATS = FORMATS + WEB_FORMATS


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
    progress: bool = True  # datatrove logs progress per task; kept for the API
    executor: ExecutorOptions = field(default_factory=ExecutorOptions)
    web: WebOptions = field(default_factory=WebOptions)
    near_dedup: bool | None = None  # MinHash near-dedup; None: on for warc/wet inputs, off otherwise
    minhash: MinhashConfig = field(default_factory=MinhashConfig)


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
# the whole run


def input_format(path: str, opts: PrepareOptions) -> str:
    """The concrete format of one input: warc/wet from --format or the name (`.warc[.gz]`,
    `.wet[.gz]`), else data/sources.py's resolution."""
    if opts.fmt in WEB_FORMATS:
        return opts.fmt
    if opts.fmt == "auto" and not path.startswith("hf:"):
        name = strip_compression(Path(path).name).lower()
        if name.endswith(".wet"):
            return "wet"
        if name.endswith(".warc"):
            return "warc"
    return resolve_format(path, opts.fmt, opts.text_field)


def _fingerprint(files: list[str], opts: PrepareOptions) -> bytes:
    """What makes a run resumable: the same inputs (names, sizes, times) and the same options."""
    stats = [(os.stat(f).st_size, os.stat(f).st_mtime_ns) if os.path.isfile(f) else None for f in files]
    key = replace(opts, workers=0, progress=False, executor=replace(opts.executor, workers=0))
    return pickle.dumps((files, stats, repr(key)))


def _resumable(work: Work, fingerprint: bytes) -> bool:
    from .steps import load_pickle

    if (work.out / shardlib.MANIFEST).exists() or not work.fingerprint().is_file():
        return False
    try:
        return load_pickle(work.fingerprint()) == fingerprint
    except (OSError, pickle.UnpicklingError, EOFError):
        return False


def _prepare_out_dir(out: Path, overwrite: bool) -> None:
    existing = [p for p in out.iterdir()] if out.is_dir() else []
    if existing and not overwrite:
        raise UserError(f"{out}: output directory is not empty (pass --overwrite to replace its shards)")
    out.mkdir(parents=True, exist_ok=True)
    # The manifest goes first, so a directory caught halfway never looks complete.
    (out / shardlib.MANIFEST).unlink(missing_ok=True)
    for p in out.glob(f"*{shardlib.SHARD_SUFFIX}"):
        p.unlink()
    for p in [out / ".work", out / ".logs", *out.glob(".spool-*")]:
        shutil.rmtree(p, ignore_errors=True)
    for p in out.iterdir():  # per-language outputs of an earlier run
        if p.is_dir() and (p / shardlib.MANIFEST).is_file():
            shutil.rmtree(p)


def _check(opts: PrepareOptions) -> None:
    if opts.on_error not in ("raise", "skip"):
        raise UserError(f"--on-error must be 'raise' or 'skip' (got {opts.on_error!r})")
    if not 1 <= opts.max_lines <= shardlib.MAX_LINES:
        raise UserError(f"--max-lines must be between 1 and {shardlib.MAX_LINES} (got {opts.max_lines})")
    if opts.fmt not in ALL_FORMATS:
        raise UserError(f"--format must be one of {', '.join(ALL_FORMATS)} (got {opts.fmt!r})")
    if opts.executor.kind not in EXECUTORS:
        raise UserError(f"--executor must be one of {', '.join(EXECUTORS)} (got {opts.executor.kind!r})")


def prepare(inputs: list[str], out_dir: str | Path, opts: PrepareOptions, overwrite: bool = False) -> dict[str, Any] | None:
    """Prepare shards from input paths/globs into out_dir; returns the manifest (None with the
    Slurm executor, which only submits the jobs). The same call on an unfinished output directory
    of the same inputs and options resumes it: finished tasks are not run again."""
    from . import pipeline
    from .steps import save_pickle

    _check(opts)
    files = select_part(expand_inputs(inputs, opts.fmt), opts.num_parts, opts.part)
    if not files:
        raise UserError(f"part {opts.part} of {opts.num_parts} has no input files")
    out, formats = Path(out_dir), [input_format(f, opts) for f in files]
    work, fingerprint = Work(out), _fingerprint(files, opts)
    near = opts.near_dedup if opts.near_dedup is not None else any(f in WEB_FORMATS for f in formats)
    job = Job(files, formats, opts, opts.web, opts.minhash, near, work)
    if not (not overwrite and _resumable(work, fingerprint)):
        _prepare_out_dir(out, overwrite)
        (work.root / "scan").mkdir(parents=True)
        (work.root / "entries").mkdir()
        save_pickle(work.started(), time.time())
        save_pickle(work.fingerprint(), fingerprint)
    try:
        pipeline.run(job, replace(opts.executor, workers=opts.workers))
    except UserError:  # bad input: nothing to resume, the next run starts afresh
        shutil.rmtree(work.root, ignore_errors=True)
        shutil.rmtree(work.logs, ignore_errors=True)
        raise
    if opts.executor.kind == "slurm":
        return None  # OUT/.logs stays: Slurm's logs and the completion markers a rerun resumes from
    shutil.rmtree(work.logs, ignore_errors=True)  # a finished directory holds its shards and manifest only
    return shardlib.load_manifest(out)


# ----------------------------------------------------------------------------------------------
# command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="files, directories or globs (plain, .gz, .zst); hf:NAME for a hub dataset")
    parser.add_argument("--out", required=True, help="output shard directory")
    parser.add_argument("--format", default="auto", choices=ALL_FORMATS,
                        help="input format (auto: from the file name and the first record; warc/wet: Common Crawl)")
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
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                        help="tasks run at a time (local, ray; slurm: array throttle)")
    parser.add_argument("--executor", default="local", choices=EXECUTORS, help="datatrove executor")
    parser.add_argument("--tasks", type=int, default=0,
                        help="scan/write tasks (default: local --workers; slurm/ray one per input file, <= 1000)")
    web = parser.add_argument_group("Common Crawl (--format warc/wet)")
    web.add_argument("--languages", default="", help="keep these languages (e.g. en,zh), each routed to OUT/LANG")
    web.add_argument("--language-threshold", type=float, default=WebOptions.language_threshold,
                     help="fastText probability below which a page is dropped")
    web.add_argument("--no-quality-filters", action="store_true", help="skip the Gopher/C4/FineWeb filters")
    web.add_argument("--near-dedup", action=argparse.BooleanOptionalAction, default=None,
                     help="MinHash near-deduplication across all inputs (default: on for warc/wet)")
    slurm = parser.add_argument_group("--executor slurm")
    slurm.add_argument("--slurm-partition", default=None)
    slurm.add_argument("--slurm-time", default="24:00:00")
    slurm.add_argument("--slurm-cpus-per-task", type=int, default=1)
    slurm.add_argument("--slurm-mem-per-cpu-gb", type=int, default=2)
    slurm.add_argument("--slurm-env-command", default=None,
                       help="shell line that activates the environment in each job (default: this Python's bin on PATH)")
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
    executor = ExecutorOptions(kind=args.executor, tasks=args.tasks, slurm_partition=args.slurm_partition,
                               slurm_time=args.slurm_time, slurm_cpus_per_task=args.slurm_cpus_per_task,
                               slurm_mem_per_cpu_gb=args.slurm_mem_per_cpu_gb, slurm_env_command=args.slurm_env_command)
    languages = tuple(x.strip() for x in args.languages.split(",") if x.strip())
    web = WebOptions(languages=languages, language_threshold=args.language_threshold,
                     quality_filters=not args.no_quality_filters)
    opts = PrepareOptions(fmt=args.format, text_field=args.text_field, text_unit=args.text_unit, clean=clean,
                          on_error=args.on_error, max_lines=args.max_lines, workers=args.workers,
                          hf_split=args.hf_split, hf_config=args.hf_config, num_parts=args.num_parts,
                          part=args.part, progress=not args.no_progress, executor=executor, web=web,
                          near_dedup=args.near_dedup)
    manifest = prepare(args.inputs, args.out, opts, overwrite=args.overwrite)
    if manifest is None:
        print(f"{args.out}: Slurm jobs submitted (logs and completion markers in {Path(args.out) / '.logs'}); "
              f"run the same command again to resume after a failure")
        return 0
    t = manifest["totals"]
    secs = manifest["seconds"]["total"]
    in_mb = sum(_size(i["path"]) for i in manifest["inputs"]) / 1e6
    dropped = ", ".join(f"{k} {v}" for k, v in t["dropped"].items()) or "none"
    routes = f"; languages routed to {', '.join(manifest['routes'])}" if manifest.get("routes") else ""
    print(f"{args.out}: {len(manifest['shards'])} shards, kept {t['kept']} of {t['read']} documents "
          f"(dropped: {dropped}; bad records skipped: {t['errors']}){routes}; {in_mb:.1f} MB in {secs:.1f} s "
          f"({in_mb / max(secs, 1e-9):.1f} MB/s)")
    return 0
