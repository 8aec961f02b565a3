"""Text shards: `jsonl.zst` files of at most 16,384 lines, a `manifest.json`, and `verify`.

A shard directory holds `shard-NNNNNN.jsonl.zst` files (one JSON object per line, at least a
string "text") and `manifest.json`, written last: a directory without a manifest is unfinished.
Every file is written to a temporary name and renamed, so a crash never leaves a shard that looks
complete. `openllama data verify DIR...` checks each shard against the manifest (size, sha256,
complete zstd frames, valid JSON per line, line count) and names every bad file and line.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import zstandard

from ..atomic import write_bytes_atomic
from ..errors import UserError

MAX_LINES = 16_384
MANIFEST = "manifest.json"
FORMAT = "openllama-shards"
ZSTD_LEVEL = 3
SHARD_SUFFIX = ".jsonl.zst"


def shard_name(index: int) -> str:
    return f"shard-{index:06d}{SHARD_SUFFIX}"


def write_shard(path: Path, lines: bytes | Sequence[bytes | memoryview], level: int = ZSTD_LEVEL,
                num_lines: int | None = None) -> dict[str, Any]:
    """Compress newline-terminated JSON lines (one buffer, or several that together hold them,
    e.g. memoryviews into a spool) into one zstd frame, atomically; its manifest entry.

    Streaming compression: no copy joins the pieces, and the frame's bytes depend only on the
    concatenated lines (and level), not on how they are split into pieces. `num_lines`: the
    caller's count of the lines, if it knows it (else they are counted)."""
    pieces = [lines] if isinstance(lines, (bytes, bytearray, memoryview)) else lines
    size = sum(memoryview(p).nbytes for p in pieces)
    cobj = zstandard.ZstdCompressor(level=level).compressobj(size=size)
    out = [cobj.compress(p) for p in pieces]
    out.append(cobj.flush())
    digest = hashlib.sha256()
    for chunk in out:
        digest.update(chunk)
    write_bytes_atomic(path, out)
    if num_lines is None:
        num_lines = sum(bytes(p).count(b"\n") for p in pieces)
    return {"name": path.name, "num_lines": num_lines,
            "num_bytes": sum(map(len, out)), "sha256": digest.hexdigest(), "text_bytes": size}


def write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    text = json.dumps(manifest, indent=1, ensure_ascii=False, sort_keys=False) + "\n"
    write_bytes_atomic(Path(directory) / MANIFEST, text.encode("utf-8"))


def load_manifest(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise UserError(f"{path}: no manifest (not a shard directory, or `prepare` did not finish)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(manifest.get("shards"), list):
        raise UserError(f"{path}: not an {FORMAT} manifest")
    return manifest


def _decompress(data: bytes) -> bytes:
    """All frames of a zstd file; EOFError when it ends inside a frame."""
    dctx = zstandard.ZstdDecompressor()
    out = []
    while data:
        obj = dctx.decompressobj()
        out.append(obj.decompress(data))
        if not obj.eof:
            raise EOFError("truncated zstd data (ends inside a frame)")
        data = obj.unused_data
    return b"".join(out)


def iter_shard_lines(path: str | Path) -> Iterator[dict[str, Any]]:
    """The JSON objects of one shard, in order (a bad shard is a UserError naming file and line)."""
    path = Path(path)
    try:
        data = _decompress(path.read_bytes())
    except (EOFError, zstandard.ZstdError) as exc:
        raise UserError(f"{path}: cannot decompress ({exc})") from None
    for lineno, line in enumerate(io.BytesIO(data), 1):
        try:
            yield json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UserError(f"{path}:{lineno}: not valid JSON ({exc})") from None


def shard_paths(directory: str | Path) -> list[Path]:
    """The shards the manifest lists, in order."""
    manifest = load_manifest(directory)
    return [Path(directory) / s["name"] for s in manifest["shards"]]


def iter_texts(directories: str | Path | Iterable[str | Path]) -> Iterator[str]:
    """Every document text of one or more shard directories, in manifest order."""
    if isinstance(directories, (str, Path)):
        directories = [directories]
    for directory in directories:
        for path in shard_paths(directory):
            for obj in iter_shard_lines(path):
                yield obj["text"]


# ----------------------------------------------------------------------------------------------
# verify


def verify_shard(path: Path, entry: dict[str, Any], max_problems: int = 20) -> list[str]:
    """Problems of one shard (empty list when it is good), each naming the file and, where it
    applies, the line."""
    if not path.is_file():
        return [f"{path}: missing"]
    data = path.read_bytes()
    problems = []
    if len(data) != entry.get("num_bytes"):
        problems.append(f"{path}: size {len(data)} bytes, manifest says {entry.get('num_bytes')}")
    digest = hashlib.sha256(data).hexdigest()
    if digest != entry.get("sha256"):
        problems.append(f"{path}: sha256 {digest[:16]}... does not match the manifest's {str(entry.get('sha256'))[:16]}...")
    try:
        text = _decompress(data)
    except (EOFError, zstandard.ZstdError) as exc:
        return problems + [f"{path}: cannot decompress ({exc})"]
    lines = 0
    for lineno, line in enumerate(io.BytesIO(text), 1):
        lines = lineno
        if len(problems) >= max_problems:
            continue
        try:
            obj = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            problems.append(f"{path}:{lineno}: not valid JSON ({exc})")
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            problems.append(f"{path}:{lineno}: no string field 'text'")
    if text and not text.endswith(b"\n"):
        problems.append(f"{path}:{lines}: last line has no newline (truncated?)")
    if lines != entry.get("num_lines"):
        problems.append(f"{path}: {lines} lines, manifest says {entry.get('num_lines')}")
    return problems


def verify(directory: str | Path) -> tuple[dict[str, Any], list[str]]:
    """Check every shard of a directory against its manifest; (manifest, problems)."""
    directory = Path(directory)
    manifest = load_manifest(directory)
    problems: list[str] = []
    total = 0
    limit = manifest.get("max_lines", MAX_LINES)
    listed = set()
    for entry in manifest["shards"]:
        listed.add(entry["name"])
        problems += verify_shard(directory / entry["name"], entry)
        total += entry.get("num_lines", 0)
        if entry.get("num_lines", 0) > limit:
            problems.append(f"{directory / entry['name']}: {entry['num_lines']} lines, more than the limit {limit}")
    if total != manifest.get("num_lines"):
        problems.append(f"{directory / MANIFEST}: shards hold {total} lines, manifest total says {manifest.get('num_lines')}")
    kept = manifest.get("totals", {}).get("kept")
    if kept is not None and kept != total:
        problems.append(f"{directory / MANIFEST}: {kept} documents kept but {total} lines in shards")
    for path in sorted(directory.glob(f"*{SHARD_SUFFIX}")):
        if path.name not in listed:
            problems.append(f"{path}: not listed in the manifest (left over from another run?)")
    return manifest, problems


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dirs", nargs="+", metavar="DIR", help="shard directories (e.g. the parts of a Slurm array job)")


def run(args: argparse.Namespace) -> int:
    bad = 0
    for directory in args.dirs:
        manifest, problems = verify(directory)
        for problem in problems:
            print(problem)
        bad += len(problems)
        status = "OK" if not problems else f"{len(problems)} problem(s)"
        print(f"{directory}: {len(manifest['shards'])} shards, {manifest.get('num_lines', 0)} documents: {status}")
    if bad:
        raise UserError(f"verify failed: {bad} problem(s), listed above")
    return 0
