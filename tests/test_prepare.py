"""`openllama data prepare`: Pile and WuDao samples -> verified shards whose counts add up;
determinism across worker counts; bad input stops with file and line, or is skipped and counted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import zstandard

from openllama import cli
from openllama.data import shards
from openllama.data.clean import CleanConfig
from openllama.data.prepare import PrepareOptions, expand_inputs, prepare, select_part
from openllama.errors import UserError


def _write_pile(path: Path, n: int, dup_every: int = 10) -> None:
    rows = []
    for i in range(n):
        j = i - 1 if i % dup_every == 0 and i else i  # every 10th doc repeats the previous one
        rows.append({"text": f"Pile document {j}: " + "words and more words " * (1 + j % 5),
                     "meta": {"pile_set_name": ["Pile-CC", "Github", "ArXiv"][j % 3]}})
    rows.append({"text": "short", "meta": {"pile_set_name": "Pile-CC"}})
    rows.append({"text": "same line\n" * 6, "meta": {"pile_set_name": "Github"}})
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    path.write_bytes(zstandard.ZstdCompressor(level=3).compress(data) if path.suffix == ".zst" else data)


def _write_wudao(path: Path, n: int) -> None:
    rows = [{"id": i, "dataType": ["百科", "新闻"][i % 2], "title": f"第{i}篇文章",
             "content": f"这是第{i}篇中文内容，用于测试数据管线。" * 2} for i in range(n)]
    rows.append({"id": n, "dataType": "新闻", "title": "", "content": "   "})
    path.write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")


@pytest.fixture
def corpus(tmp_path) -> list[str]:
    _write_pile(tmp_path / "pile-00.jsonl.zst", 120)
    _write_wudao(tmp_path / "wudao-00.json", 90)
    return [str(tmp_path / "pile-00.jsonl.zst"), str(tmp_path / "wudao-00.json")]


def _opts(**kw) -> PrepareOptions:
    kw.setdefault("progress", False)
    return PrepareOptions(**kw)


def test_pile_and_wudao_to_verified_shards_with_counts_that_add_up(tmp_path, corpus):
    out = tmp_path / "shards"
    manifest = prepare(corpus, out, _opts(max_lines=50))
    _, problems = shards.verify(out)
    assert problems == []
    assert [s["num_lines"] for s in manifest["shards"]] == [50, 50, 50, 49]  # rollover at max_lines
    pile, wudao = manifest["inputs"]
    assert (pile["format"], wudao["format"]) == ("pile", "wudao")
    # 122 Pile records: 11 duplicates, 1 too short, 1 repetitive; 91 WuDao records: 1 empty
    assert pile == {**pile, "read": 122, "kept": 109, "errors": 0,
                    "dropped": {"too_short": 1, "repetitive": 1, "duplicate": 11}}
    assert wudao == {**wudao, "read": 91, "kept": 90, "dropped": {"empty": 1}}
    t = manifest["totals"]
    assert t["read"] == t["kept"] + sum(t["dropped"].values()) == 213 and t["kept"] == manifest["num_lines"] == 199
    for counts in manifest["sources"].values():
        assert counts["read"] == counts["kept"] + sum(counts["dropped"].values())
    assert sum(c["kept"] for c in manifest["sources"].values()) == t["kept"]
    assert set(manifest["sources"]) == {"Pile-CC", "Github", "ArXiv", "百科", "新闻"}
    docs = [obj for p in shards.shard_paths(out) for obj in shards.iter_shard_lines(p)]
    assert docs[0] == {"text": "Pile document 0: words and more words ", "source": "Pile-CC"}
    assert docs[-1]["text"] == "第89篇文章\n" + "这是第89篇中文内容，用于测试数据管线。" * 2
    assert len({d["text"] for d in docs}) == len(docs)  # exact dedup
    assert list(shards.iter_texts(out))[5] == docs[5]["text"]


def test_byte_identical_whatever_the_worker_count(tmp_path, corpus):
    _write_pile(Path(tmp_path / "pile-01.jsonl"), 60, dup_every=7)
    inputs = corpus + [str(tmp_path / "pile-01.jsonl")]
    a = prepare(inputs, tmp_path / "a", _opts(max_lines=40, workers=1))
    b = prepare(inputs, tmp_path / "b", _opts(max_lines=40, workers=2))
    assert a["shards"] == b["shards"] and len(a["shards"]) > 3
    for s in a["shards"]:
        assert (tmp_path / "a" / s["name"]).read_bytes() == (tmp_path / "b" / s["name"]).read_bytes()
    # the duplicate of a document in an earlier file is dropped from the later file
    assert a["inputs"][2]["dropped"]["duplicate"] > 50


def test_default_cap_is_16384_lines(tmp_path):
    path = tmp_path / "many.jsonl"
    path.write_text("".join(json.dumps({"text": f"document number {i:06d}"}) + "\n" for i in range(16_500)))
    manifest = prepare([str(path)], tmp_path / "out", _opts())
    assert [s["num_lines"] for s in manifest["shards"]] == [16_384, 116]
    assert shards.verify(tmp_path / "out")[1] == []


BAD_INPUTS = {
    "nonjson.jsonl": (b'{"text": "a fine document here"}\n{"text": oops}\n', r"nonjson\.jsonl:2: not valid JSON"),
    "nofield.jsonl": (b'{"text": "a fine document here"}\n{"body": "x"}\n', r"nofield\.jsonl:2: missing text field 'text'"),
    "badutf8.jsonl": (b'{"text": "a fine document here"}\n{"text": "\xc3\x28"}\n', r"badutf8\.jsonl:2: invalid UTF-8"),
    "empty.jsonl": (b"", r"empty\.jsonl: empty file"),
    "surrogate.jsonl": (b'{"text": "a fine document here"}\n{"text": "a lone \\ud800 surrogate in here"}\n',
                        r"surrogate\.jsonl:2: text is not valid Unicode \(lone surrogate"),
    "cut.jsonl.zst": (zstandard.ZstdCompressor().compress(
        b"".join(b'{"text": "document %d of a longer file"}\n' % i for i in range(20000)))[:-50],
        r"cut\.jsonl\.zst: cannot read compressed input: truncated zstd"),
}


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_bad_input_is_an_error_naming_file_and_line_and_leaves_no_shards(tmp_path, name):
    data, message = BAD_INPUTS[name]
    (tmp_path / name).write_bytes(data)
    out = tmp_path / "out"
    with pytest.raises(UserError, match=message):
        prepare([str(tmp_path / name)], out, _opts(fmt="jsonl"))
    assert not (out / "manifest.json").exists() and not list(out.glob("*.zst")) and not list(out.glob(".spool*"))


def test_a_lone_surrogate_in_the_source_name_is_a_bad_record(tmp_path):
    path = tmp_path / "pile.jsonl"
    path.write_bytes(b'{"text": "a fine document here", "meta": {"pile_set_name": "P\\udc80"}}\n'
                     b'{"text": "another fine document", "meta": {"pile_set_name": "Pile-CC"}}\n')
    with pytest.raises(UserError, match=r"pile\.jsonl:1: source name is not valid Unicode"):
        prepare([str(path)], tmp_path / "out", _opts(fmt="pile"))
    manifest = prepare([str(path)], tmp_path / "out", _opts(fmt="pile", on_error="skip"), overwrite=True)
    assert (manifest["totals"]["errors"], manifest["totals"]["kept"], list(manifest["sources"])) == (1, 1, ["Pile-CC"])


def test_on_error_skip_counts_bad_records_in_the_manifest(tmp_path):
    for name, (data, _) in BAD_INPUTS.items():
        (tmp_path / name).write_bytes(data)
    inputs = [str(tmp_path / n) for n in sorted(BAD_INPUTS)]
    manifest = prepare(inputs, tmp_path / "out", _opts(fmt="jsonl", on_error="skip", clean=CleanConfig(dedup=False)))
    by_name = {Path(i["path"]).name: i for i in manifest["inputs"]}
    assert {n: i["errors"] for n, i in by_name.items()} == {n: 1 for n in BAD_INPUTS}
    assert "badutf8.jsonl:2: invalid UTF-8" in by_name["badutf8.jsonl"]["error_examples"][0]
    assert by_name["cut.jsonl.zst"]["kept"] > 15000  # what came before the truncation is kept
    assert manifest["totals"]["errors"] == len(BAD_INPUTS)
    assert shards.verify(tmp_path / "out")[1] == []


def test_parts_split_the_file_list_for_array_jobs(tmp_path):
    files = []
    for i in range(5):
        (tmp_path / f"in-{i}.jsonl").write_text(json.dumps({"text": f"only document of file {i}"}) + "\n")
        files.append(str(tmp_path / f"in-{i}.jsonl"))
    assert expand_inputs([str(tmp_path / "in-*.jsonl")]) == files
    parts = [select_part(files, 2, p) for p in range(2)]
    assert sorted(parts[0] + parts[1]) == files and not set(parts[0]) & set(parts[1])
    m = [prepare([str(tmp_path / "in-*.jsonl")], tmp_path / f"part-{p}", _opts(num_parts=2, part=p)) for p in range(2)]
    assert [x["num_lines"] for x in m] == [3, 2]
    with pytest.raises(UserError, match="--part must be in"):
        select_part(files, 2, 2)


def test_cli_prepare_and_verify_on_tinyshakespeare(tmp_path, shared_data, capsys):
    out = tmp_path / "shakespeare"
    src = str(shared_data / "tinyshakespeare.txt")
    argv = ["data", "prepare", src, "--out", str(out), "--text-unit", "paragraph", "--max-lines", "2000",
            "--workers", "1", "--no-progress"]
    assert cli.main(argv) == 0
    manifest = shards.load_manifest(out)
    assert manifest["totals"]["read"] > 7000 and len(manifest["shards"]) == -(-manifest["num_lines"] // 2000)
    assert cli.main(argv) == 2  # refuses to overwrite
    assert "not empty (pass --overwrite" in capsys.readouterr().err
    assert cli.main(["data", "verify", str(out)]) == 0
    assert "OK" in capsys.readouterr().out
