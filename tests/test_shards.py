"""`openllama data verify`: a good directory passes; every kind of damage is named by file (and line)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import zstandard

from openllama import cli
from openllama.data import shards
from openllama.data.prepare import PrepareOptions, prepare


@pytest.fixture
def shard_dir(tmp_path) -> Path:
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": f"document {i} with enough characters"}) + "\n" for i in range(30)))
    prepare([str(src)], tmp_path / "shards", PrepareOptions(max_lines=10, progress=False))
    return tmp_path / "shards"


def _rewrite(path: Path, lines: bytes, manifest_dir: Path, fix_manifest: bool) -> None:
    """Replace a shard's content; optionally make the manifest agree (so only content checks fail)."""
    entry = shards.write_shard(path, lines)
    if fix_manifest:
        m = shards.load_manifest(manifest_dir)
        m["shards"] = [entry if s["name"] == entry["name"] else s for s in m["shards"]]
        shards.write_manifest(manifest_dir, m)


def test_good_directory_verifies(shard_dir, capsys):
    manifest, problems = shards.verify(shard_dir)
    assert problems == [] and [s["num_lines"] for s in manifest["shards"]] == [10, 10, 10]
    assert cli.main(["data", "verify", str(shard_dir)]) == 0


def test_flipped_byte_is_named(shard_dir, capsys):
    path = shard_dir / "shard-000001.jsonl.zst"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    problems = shards.verify(shard_dir)[1]
    assert problems and all(p.startswith(str(path)) for p in problems)
    assert any("sha256" in p for p in problems)
    assert cli.main(["data", "verify", str(shard_dir)]) == 2
    captured = capsys.readouterr()
    assert str(path) in captured.out and "verify failed" in captured.err


def test_truncated_and_missing_shards_are_named(shard_dir):
    cut = shard_dir / "shard-000000.jsonl.zst"
    cut.write_bytes(cut.read_bytes()[:-8])
    (shard_dir / "shard-000002.jsonl.zst").unlink()
    problems = shards.verify(shard_dir)[1]
    assert any(p.startswith(f"{cut}: cannot decompress") for p in problems)
    assert any(p.startswith(f"{cut}: size") for p in problems)
    assert f"{shard_dir / 'shard-000002.jsonl.zst'}: missing" in problems


def test_bad_json_line_is_named_by_line(shard_dir):
    path = shard_dir / "shard-000001.jsonl.zst"
    lines = zstandard.ZstdDecompressor().decompress(path.read_bytes()).split(b"\n")
    lines[3] = b'{"text": "cut'
    lines[6] = b'{"no_text": 1}'
    _rewrite(path, b"\n".join(lines), shard_dir, fix_manifest=True)
    problems = shards.verify(shard_dir)[1]
    assert problems[0].startswith(f"{path}:4: not valid JSON")
    assert problems[1] == f"{path}:7: no string field 'text'"


def test_line_count_and_leftover_files(shard_dir):
    path = shard_dir / "shard-000000.jsonl.zst"
    lines = zstandard.ZstdDecompressor().decompress(path.read_bytes())
    _rewrite(path, lines + b'{"text": "one more"}\n', shard_dir, fix_manifest=False)
    (shard_dir / "shard-000009.jsonl.zst").write_bytes(b"")
    problems = shards.verify(shard_dir)[1]
    assert f"{path}: 11 lines, manifest says 10" in problems
    assert f"{shard_dir / 'shard-000009.jsonl.zst'}: not listed in the manifest (left over from another run?)" in problems


def test_directory_without_manifest_is_unfinished(tmp_path):
    (tmp_path / "shard-000000.jsonl.zst").write_bytes(b"")
    assert cli.main(["data", "verify", str(tmp_path)]) == 2
