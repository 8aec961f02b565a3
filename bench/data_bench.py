"""Data pipeline throughput on tinyshakespeare repeated to ~N MB (default 50).

    .venv/bin/python bench/data_bench.py [--mb 50] [--workers 2] [--vocab-size 8000] [--prepare-only]
        [--baseline-ref 637dc97] [--cc-pages 2000] [--dedup-mb 10,50,200]

Measures, in one run on the same bytes (medians of --repeats runs):
  - `openllama data prepare` input MB/s against the `zstd -3` CLI compressing the same input
    (single-threaded, to /dev/null); falls back to python-zstandard level 3 if the CLI is missing
    (Debian: `apt-get install zstd`), and says so; each prepare runs in a fresh Python, today's
    (datatrove stages) and, interleaved, the one at --baseline-ref (taken from git);
  - with --cc-pages N: a synthetic Common Crawl WARC of N HTML pages through our pipeline and
    through the same pipeline built from datatrove's own blocks (needs spaCy), pages/s per core;
  - with --dedup-mb: MinHash signatures and clustering, seconds and memory per GB at each size;
  - tokenizer training time (SentencePiece BPE through openllama.tokenizer.train_tokenizer);
  - tokenisation tokens/s: our Tokenizer.encode_batch vs Hugging Face `tokenizers` encode_batch
    with the same tokenizer.json, on the same texts; and the whole `data tokenize` stage.
Prints a table. Documents are ~4 KB (--doc-kb), The Pile's average; each copy of the play is
tagged with its number, so dedup keeps the work real.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from openllama.data.shards import iter_texts  # noqa: E402
from openllama.data.tokens import tokenize  # noqa: E402
from openllama.tokenizer import Tokenizer, train_tokenizer  # noqa: E402

SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"


def make_input(paths: list[Path], mb: float, doc_kb: float) -> int:
    """Pile-format jsonl: tinyshakespeare's paragraphs grouped into documents of ~doc_kb KB (The
    Pile averages ~4 KB), each copy tagged with its number so no two documents are equal."""
    paragraphs = [p for p in SHAKESPEARE.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    docs, cur = [], []
    for p in paragraphs:
        cur.append(p)
        if sum(map(len, cur)) >= doc_kb * 1000:
            docs.append("\n\n".join(cur))
            cur = []
    docs += ["\n\n".join(cur)] if cur else []
    target = int(mb * 1e6)
    size, copy = 0, 0
    files = [open(p, "w", encoding="utf-8") for p in paths]
    while size < target:
        for d in docs:
            line = json.dumps({"text": f"[copy {copy}]\n{d}", "meta": {"pile_set_name": "shakespeare"}}) + "\n"
            files[copy % len(files)].write(line)  # copies spread over the files, like a corpus' parts
            size += len(line)
        copy += 1
    for f in files:
        f.close()
    return sum(p.stat().st_size for p in paths)


def timed(fn, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def zstd_command(path: Path) -> tuple[object, str]:
    """One run of the baseline (a callable) and its name."""
    cli = shutil.which("zstd")
    if cli:
        def run():
            with open(os.devnull, "wb") as null:
                subprocess.run([cli, "-3", "-T1", "-q", "-c", str(path)], stdout=null, check=True)
        version = subprocess.run([cli, "--version"], capture_output=True, text=True).stdout.split(",")[0].strip()
        return run, f"zstd CLI -3 -T1 ({version})"
    import zstandard

    data = path.read_bytes()
    return (lambda: zstandard.ZstdCompressor(level=3).compress(data)), \
        "python-zstandard level 3 (zstd CLI not found: apt-get install zstd)"


_RUN_ONE = """
import sys, time
from openllama.data.prepare import PrepareOptions, prepare
try:  # imports are excluded from the timing on both sides
    import openllama.data.steps, datatrove.executor
except ImportError:
    pass
if __name__ == "__main__":
    srcs, out, workers = sys.argv[4].split(","), sys.argv[2], int(sys.argv[3])
    start = time.perf_counter()
    m = prepare(srcs, out, PrepareOptions(workers=workers, progress=False), overwrite=True)
    print("RESULT", time.perf_counter() - start, m["num_lines"], len(m["shards"]))
"""


def baseline_tree(ref: str, tmp: Path) -> Path:
    """src/ of `ref` (the process-pool prepare before datatrove) extracted from git, for the
    before/after rows."""
    dest = tmp / f"baseline-{ref}"
    dest.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "src"], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest / "src"


def prepare_once(src_dir: Path, srcs: list[Path], out: Path, workers: int) -> tuple[float, int, int]:
    """One `prepare` in a fresh Python (as the CLI runs it): seconds of the call itself (imports
    excluded, pool start included), documents, shards."""
    script = out.parent / "run_one.py"
    script.write_text(_RUN_ONE)
    env = dict(os.environ, PYTHONPATH=str(src_dir))  # not sys.path: the forkserver re-imports the script
    res = subprocess.run([sys.executable, str(script), "-", str(out), str(workers), ",".join(map(str, srcs))],
                         capture_output=True, text=True, env=env)
    line = [x for x in res.stdout.splitlines() if x.startswith("RESULT")]
    if res.returncode or not line:
        raise SystemExit(f"prepare failed ({src_dir}):\n{res.stderr[-3000:]}")
    _, secs, docs, n = line[0].split()
    return float(secs), int(docs), int(n)


def prepare_vs_zstd(srcs: list[Path], all_in_one: Path, out: Path, worker_counts: list[int], repeats: int,
                    baseline: Path | None) -> tuple[str, dict]:
    """Interleaved runs (zstd, then before/after prepare at each worker count, per repeat), so a
    noisy machine slows every side alike; per (version, workers): median seconds, median
    per-repeat ratio to zstd, (docs, shards)."""
    run_zstd, name = zstd_command(all_in_one)
    versions = {"now": ROOT / "src", **({"before": baseline} if baseline else {})}
    z_times, runs, info = [], {}, {}
    for _ in range(repeats):
        start = time.perf_counter()
        run_zstd()
        z_times.append(time.perf_counter() - start)
        for w in worker_counts:
            for version, src_dir in versions.items():
                seconds, docs, n = prepare_once(src_dir, srcs, out, w)
                runs.setdefault((version, w), ([], []))
                runs[(version, w)][0].append(seconds)
                runs[(version, w)][1].append(z_times[-1] / seconds)
                info[(version, w)] = (docs, n)
    results = {"zstd": statistics.median(z_times)}
    for key, (times, ratios) in runs.items():
        results[key] = (statistics.median(times), statistics.median(ratios), info[key])
    return name, results


# ----------------------------------------------------------------------------------------------
# Common Crawl: ours against the same pipeline built from datatrove's own blocks


def _datatrove_blocks_run(warc_dir: Path, work: Path) -> tuple[float, int]:
    """WarcReader -> Trafilatura -> LanguageFilter -> Gopher repetition -> Gopher quality -> C4 ->
    FineWeb -> MinHash (signature, buckets, cluster, filter) -> JsonlWriter, one task, as in
    datatrove's FineWeb example; language ID from the same offline lid.176.ftz."""
    import datatrove.utils.lid as lid
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import (MinhashDedupBuckets, MinhashDedupCluster, MinhashDedupFilter,
                                                  MinhashDedupSignature)
    from datatrove.pipeline.extractors import Trafilatura
    from datatrove.pipeline.filters import (C4QualityFilter, FineWebQualityFilter, GopherQualityFilter,
                                            GopherRepetitionFilter, LanguageFilter)
    from datatrove.pipeline.readers import JsonlReader, WarcReader
    from datatrove.pipeline.writers import JsonlWriter

    from openllama.data.web import lid_model_path

    lid.cached_asset_path_or_download = lambda *a, **k: str(lid_model_path())  # no download (one process)
    shutil.rmtree(work, ignore_errors=True)
    start = time.perf_counter()
    stats = LocalPipelineExecutor([
        WarcReader(str(warc_dir), glob_pattern="*.warc.gz"),
        Trafilatura(favour_precision=True, deduplicate=False, timeout=5),
        LanguageFilter(languages=["en", "zh"]), GopherRepetitionFilter(), GopherQualityFilter(),
        C4QualityFilter(filter_no_terminal_punct=False), FineWebQualityFilter(),
        JsonlWriter(str(work / "filtered")), MinhashDedupSignature(output_folder=str(work / "sigs")),
    ], tasks=1, workers=1, logging_dir=str(work / "logs1")).run()
    LocalPipelineExecutor([MinhashDedupBuckets(str(work / "sigs"), str(work / "buckets"))], tasks=14, workers=1,
                          logging_dir=str(work / "logs2")).run()
    LocalPipelineExecutor([MinhashDedupCluster(str(work / "buckets"), str(work / "remove"))], tasks=1, workers=1,
                          logging_dir=str(work / "logs3")).run()
    LocalPipelineExecutor([JsonlReader(str(work / "filtered")), MinhashDedupFilter(str(work / "remove")),
                           JsonlWriter(str(work / "out"))], tasks=1, workers=1, logging_dir=str(work / "logs4")).run()
    seconds = time.perf_counter() - start
    read = stats.stats[0].stats["documents"].total if stats and stats.stats else 0
    return seconds, int(read)


def common_crawl_rows(tmp: Path, pages: int, repeats: int) -> list[tuple[str, str, str]]:
    from openllama.data.pipeline import WebOptions
    from openllama.data.prepare import PrepareOptions, prepare
    from openllama.data.synthetic_web import make_warc

    warc_dir = tmp / "warc"
    warc_dir.mkdir()
    truth = make_warc(warc_dir / "CC-bench.warc.gz", english=pages // 2, chinese=pages // 4,
                      near_duplicates=pages // 5, spam=pages // 20, seed=7)
    html_pages = len(truth.english) + len(truth.chinese) + len(truth.near_duplicates) + len(truth.spam)
    try:
        import spacy  # noqa: F401  (datatrove's Gopher filters tokenise words with spaCy)
        have_spacy = True
    except ImportError:
        have_spacy = False
    ours, theirs, kept = [], [], (0, 0)
    for _ in range(min(repeats, 3)):
        start = time.perf_counter()
        m = prepare([str(warc_dir / "CC-bench.warc.gz")], tmp / "cc-ours",
                    PrepareOptions(workers=1, progress=False, web=WebOptions(languages=())), overwrite=True)
        ours.append(time.perf_counter() - start)
        if have_spacy:
            theirs.append(_datatrove_blocks_run(warc_dir, tmp / "cc-datatrove")[0])
        kept = (m["totals"]["kept"], m["totals"]["dropped"].get("near_duplicate", 0))
    o = statistics.median(ours)
    rows = [("Common Crawl: ours (1 core)", f"{html_pages} HTML pages: extract, LID, filters, MinHash, shards; "
             f"kept {kept[0]}, near-dups dropped {kept[1]}", f"{html_pages / o:.1f} pages/s")]
    if have_spacy:
        t = statistics.median(theirs)
        rows.append(("Common Crawl: datatrove blocks (1 core)", "same steps from datatrove (spaCy word tokenizer)",
                     f"{html_pages / t:.1f} pages/s; ours = x{t / o:.2f} of it"))
    else:
        rows.append(("Common Crawl: datatrove blocks", "skipped: needs spaCy (pip install spacy)", "-"))
    return rows


# ----------------------------------------------------------------------------------------------
# near-dedup scaling


def near_dedup_rows(tmp: Path, sizes_mb: list[float]) -> list[tuple[str, str, str]]:
    """MinHash signatures + LSH clustering on ~4 KB English documents (10% near-duplicates), one
    core: seconds and peak memory per GB of text at each size."""
    import random
    import tracemalloc

    import numpy as np

    from openllama.data.dedup import Minhasher, near_duplicates
    from openllama.data.synthetic_web import edit, english_article

    rows = []
    rng = random.Random(0)
    docs: list[str] = []
    size = 0
    hasher = Minhasher()
    sigs: list[np.ndarray] = []
    sig_seconds = 0.0
    for target in sorted(sizes_mb):
        while size < target * 1e6:
            if docs and rng.random() < 0.1:
                text = "\n".join(edit(docs[rng.randrange(len(docs))].split("\n"), rng))
            else:
                text = "\n".join(english_article(rng, 10))
            docs.append(text)
            size += len(text.encode())
            start = time.perf_counter()
            sigs.append(hasher.signature(text))
            sig_seconds += time.perf_counter() - start
        matrix = np.stack(sigs)
        tracemalloc.start()
        start = time.perf_counter()
        dropped = near_duplicates(matrix, np.ones(len(matrix), bool))
        cluster_s = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        gb = size / 1e9
        rows.append((f"near-dedup {size / 1e6:.0f} MB", f"{len(docs)} docs, {int(dropped.sum())} near-dups dropped",
                     f"signatures {sig_seconds / gb:.0f} s/GB, clustering {cluster_s / gb:.1f} s/GB; memory "
                     f"{(matrix.nbytes + peak) / 1e6 / gb:.0f} MB/GB (signatures {matrix.nbytes / 1e6:.1f} MB "
                     f"+ clustering peak {peak / 1e6:.1f} MB)"))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=50.0, help="input size in MB (default 50; 5 for a quick run)")
    ap.add_argument("--doc-kb", type=float, default=4.0, help="document size in KB (paragraphs grouped)")
    ap.add_argument("--files", type=int, default=4, help="input files (prepare is parallel over files)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--vocab-size", type=int, default=8000)
    ap.add_argument("--sample-mb", type=float, default=20.0, help="tokenizer training sample")
    ap.add_argument("--encode-mb", type=float, default=10.0, help="text for the encode_batch comparison")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prepare-only", action="store_true", help="stop after prepare vs zstd (skip the tokenizer rows)")
    ap.add_argument("--baseline-ref", default="637dc97",
                    help="git revision whose prepare is the 'before' row (637dc97: the last process-pool prepare; '' skips)")
    ap.add_argument("--cc-pages", type=int, default=0,
                    help="Common Crawl rows: pages in a synthetic WARC, ours vs datatrove's own blocks (0 skips)")
    ap.add_argument("--dedup-mb", default="", help="near-dedup rows at these text sizes in MB, e.g. 10,50,200")
    args = ap.parse_args()
    if not SHAKESPEARE.is_file():
        sys.exit(f"{SHAKESPEARE} not found (the shared data folder)")
    rows: list[tuple[str, str, str]] = []
    with tempfile.TemporaryDirectory(prefix="data_bench_") as tmp:
        tmp = Path(tmp)
        srcs = [tmp / f"input-{i:02d}.jsonl" for i in range(args.files)]
        size = make_input(srcs, args.mb, args.doc_kb)
        mb = size / 1e6
        src = tmp / "input-all.jsonl"  # the zstd baseline compresses the same bytes as one file
        with open(src, "wb") as f:
            for p in srcs:
                f.write(p.read_bytes())
        print(f"input: {mb:.1f} MB of jsonl in {args.files} files", file=sys.stderr)

        baseline = baseline_tree(args.baseline_ref, tmp) if args.baseline_ref else None
        z_name, res = prepare_vs_zstd(srcs, src, tmp / "shards", sorted({1, args.workers}), args.repeats, baseline)
        rows.append(("compress baseline", z_name, f"{mb / res['zstd']:.1f} MB/s"))
        for workers in sorted({1, args.workers}):
            for version in ("before", "now"):
                if (version, workers) not in res:
                    continue
                p_s, ratio, (docs, n) = res[(version, workers)]
                label = f"prepare --workers {workers}" + (f" ({args.baseline_ref}: process pool)" if version == "before"
                                                          else " (datatrove local)")
                extra = ""
                if version == "now" and ("before", workers) in res:
                    extra = f", x{res[('before', workers)][0] / p_s:.2f} of before"
                rows.append((label, f"{docs} docs, {n} shards", f"{mb / p_s:.1f} MB/s = {ratio:.0%} of zstd{extra}"))
        if args.cc_pages:
            rows += common_crawl_rows(tmp, args.cc_pages, args.repeats)
        if args.dedup_mb:
            rows += near_dedup_rows(tmp, [float(x) for x in args.dedup_mb.split(",")])
        if args.prepare_only:
            _print_table(rows, mb, args.repeats)
            return

        start = time.perf_counter()
        tok = train_tokenizer([tmp / "shards"], tmp / "tok", vocab_size=args.vocab_size,
                              sample_bytes=int(args.sample_mb * 1e6))
        train_s = time.perf_counter() - start
        rep = tok.training_report
        rows.append(("tokenizer train", f"vocab {tok.vocab_size}, sample {rep['sample']['bytes'] / 1e6:.1f} MB",
                     f"{train_s:.1f} s total ({rep['seconds']['train']:.1f} s SentencePiece)"))

        texts, total = [], 0
        for t in iter_texts(tmp / "shards"):
            texts.append(t)
            total += len(t.encode("utf-8"))
            if total >= args.encode_mb * 1e6:
                break
        from tokenizers import Tokenizer as HFTokenizer

        hf = HFTokenizer.from_file(str(tmp / "tok" / "tokenizer.json"))
        ours = Tokenizer.load(tmp / "tok")
        o_s, o_ids = timed(lambda: ours.encode_batch(texts, allow_special=False), args.repeats)
        h_s, h_enc = timed(lambda: hf.encode_batch(texts, add_special_tokens=False), args.repeats)
        n_tok = sum(len(x) for x in o_ids)
        same = all(list(a) == b.ids for a, b in zip(o_ids, h_enc))
        rows.append(("encode_batch: ours", f"{len(texts)} docs, {total / 1e6:.1f} MB, ids equal to HF: {same}",
                     f"{n_tok / o_s:,.0f} tokens/s"))
        rows.append(("encode_batch: HF tokenizers", "same tokenizer.json", f"{n_tok / h_s:,.0f} tokens/s = ours x{h_s / o_s:.2f}"))
        t_s, tm = timed(lambda: tokenize([tmp / "shards"], tmp / "tok", tmp / "tokens", workers=args.workers,
                                         overwrite=True, progress=False), 1)
        rows.append((f"data tokenize --workers {args.workers}", f"{tm['num_tokens']:,} tokens, {tm['num_bytes'] / tm['num_tokens']:.2f} bytes/token",
                     f"{tm['num_tokens'] / t_s:,.0f} tokens/s"))

    _print_table(rows, mb, args.repeats)


def _print_table(rows: list[tuple[str, str, str]], mb: float, repeats: int) -> None:
    print(f"\nData pipeline benchmark: {mb:.1f} MB, {os.cpu_count()} CPUs, medians of {repeats} "
          f"(prepare vs zstd: median of per-repeat ratios, runs interleaved)\n")
    widths = [max(len(r[i]) for r in rows + [("step", "what", "result")]) for i in range(3)]
    for row in [("step", "what", "result"), tuple("-" * w for w in widths)] + rows:
        print(" | ".join(c.ljust(w) for c, w in zip(row, widths)))


if __name__ == "__main__":
    main()
