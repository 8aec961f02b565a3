"""Data pipeline throughput on tinyshakespeare repeated to ~N MB (default 50).

    .venv/bin/python bench/data_bench.py [--mb 50] [--workers 2] [--vocab-size 8000] [--prepare-only]

Measures, in one run on the same bytes (medians of --repeats runs):
  - `openllama data prepare` input MB/s against the `zstd -3` CLI compressing the same input
    (single-threaded, to /dev/null); falls back to python-zstandard level 3 if the CLI is missing
    (Debian: `apt-get install zstd`), and says so;
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

from openllama.data.prepare import PrepareOptions, prepare  # noqa: E402
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


def prepare_vs_zstd(srcs: list[Path], all_in_one: Path, out: Path, worker_counts: list[int], repeats: int) -> tuple[str, dict]:
    """Interleaved runs (zstd, then prepare at each worker count, per repeat), so a noisy machine
    slows both sides alike; per worker count: median seconds, median per-repeat ratio, manifest."""
    run_zstd, name = zstd_command(all_in_one)
    z_times, runs = [], {w: ([], []) for w in worker_counts}
    manifest = {}
    for _ in range(repeats):
        start = time.perf_counter()
        run_zstd()
        z_times.append(time.perf_counter() - start)
        for w in worker_counts:
            start = time.perf_counter()
            manifest[w] = prepare([str(p) for p in srcs], out, PrepareOptions(workers=w, progress=False), overwrite=True)
            seconds = time.perf_counter() - start
            runs[w][0].append(seconds)
            runs[w][1].append(z_times[-1] / seconds)
    results = {"zstd": statistics.median(z_times)}
    for w, (times, ratios) in runs.items():
        results[w] = (statistics.median(times), statistics.median(ratios), manifest[w])
    return name, results


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

        z_name, res = prepare_vs_zstd(srcs, src, tmp / "shards", sorted({1, args.workers}), args.repeats)
        rows.append(("compress baseline", z_name, f"{mb / res['zstd']:.1f} MB/s"))
        for workers in sorted({1, args.workers}):
            p_s, ratio, manifest = res[workers]
            rows.append((f"prepare --workers {workers}", f"{manifest['num_lines']} docs, {len(manifest['shards'])} shards",
                         f"{mb / p_s:.1f} MB/s = {ratio:.0%} of zstd"))
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
