"""Readers (data/sources.py) and cleaning (data/clean.py) on fixtures written here and real files."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from openllama import records
from openllama.data.clean import (CleanConfig, content_hash, drop_reason, dup_line_fraction, normalise,
                                  normalise_utf8)
from openllama.data.sources import Document, iter_documents, read_records, resolve_format
from openllama.errors import UserError
from openllama.records import BadRecord, json_records

PILE = [{"text": f"pile doc {i}\nsecond line", "meta": {"pile_set_name": ["Pile-CC", "Github"][i % 2]}} for i in range(5)]
WUDAO = [{"id": i, "dataType": "百科", "title": f"标题{i}", "content": f"内容，第{i}篇。"} for i in range(7)]


def _jsonl(rows) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")


@pytest.mark.parametrize("suffix", ["", ".gz", ".zst"])
def test_pile_jsonl_in_every_compression(tmp_path, suffix):
    data = _jsonl(PILE)
    data = gzip.compress(data) if suffix == ".gz" else zstandard.ZstdCompressor().compress(data) if suffix else data
    path = tmp_path / f"00.jsonl{suffix}"
    path.write_bytes(data)
    assert resolve_format(str(path)) == "pile"
    docs = list(iter_documents(str(path)))
    assert [d.text for d in docs] == [r["text"] for r in PILE]
    assert [d.source for d in docs] == [r["meta"]["pile_set_name"] for r in PILE]
    assert docs[3].where == f"{path}:4"


def test_wudao_array_is_streamed_across_chunk_boundaries(tmp_path, monkeypatch):
    path = tmp_path / "part-1.json"
    path.write_text(json.dumps(WUDAO, ensure_ascii=False, indent=2), encoding="utf-8")
    monkeypatch.setattr(records, "_CHUNK", 5)  # every element and many UTF-8 characters straddle chunks
    assert resolve_format(str(path)) == "wudao"
    docs = list(iter_documents(str(path)))
    assert [d.text for d in docs] == [f"{r['title']}\n{r['content']}" for r in WUDAO]
    assert {d.source for d in docs} == {"百科"}
    assert docs[6].where == f"{path}: array index 6"


def test_json_array_errors_name_the_index(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(WUDAO[:3], ensure_ascii=False)[:-40], encoding="utf-8")  # cut inside element 2
    recs = list(read_records(str(path), "wudao"))
    assert [type(r) for r in recs] == [Document, Document, BadRecord]
    assert recs[-1].where == f"{path}: array index 2"
    with pytest.raises(UserError, match=r"broken\.json: array index 2"):
        list(iter_documents(str(path), "wudao"))


def test_generic_jsonl_with_nested_field_and_missing_field(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"doc": {"body": "one"}}\n\n{"doc": {"title": "no body"}}\n{"doc": {"body": "three"}}\n')
    recs = list(read_records(str(path), "jsonl", text_field="doc.body"))
    assert [r.text for r in recs if isinstance(r, Document)] == ["one", "three"]
    bad = [r for r in recs if isinstance(r, BadRecord)]
    assert len(bad) == 1 and bad[0].where == f"{path}:3" and "missing text field 'doc.body'" in bad[0].reason


def test_bad_lines_are_named_by_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "good"}\n{"text": broken}\n{"text": "bad \xff utf8"}\n{"txt": "no field"}\n')
    recs = list(read_records(str(path), "jsonl"))
    assert isinstance(recs[0], Document)
    assert [(r.where, r.reason.split(" ")[0]) for r in recs[1:]] == [
        (f"{path}:2", "not"), (f"{path}:3", "invalid"), (f"{path}:4", "missing")]
    with pytest.raises(UserError, match=r"bad\.jsonl:2: not valid JSON"):
        list(iter_documents(str(path), "jsonl"))


def test_truncated_zst_and_empty_file_are_errors(tmp_path):
    data = zstandard.ZstdCompressor().compress(_jsonl(PILE * 200))
    trunc = tmp_path / "cut.jsonl.zst"
    trunc.write_bytes(data[: len(data) // 2])
    recs = list(read_records(str(trunc), "pile"))
    assert isinstance(recs[-1], BadRecord) and "truncated zstd" in recs[-1].reason
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    with pytest.raises(UserError, match=r"empty\.jsonl: empty file"):
        list(iter_documents(str(empty), "jsonl"))


def test_json_records_reads_every_compression_and_names_what_it_cannot_read(tmp_path):
    rows = [{"i": i, "text": f"记录 {i}"} for i in range(300)]
    lines = _jsonl(rows)
    files = {"a.jsonl": lines, "a.jsonl.gz": gzip.compress(lines), "a.jsonl.zst": zstandard.ZstdCompressor().compress(lines),
             "a.json.gz": gzip.compress(json.dumps(rows).encode()), "bom.jsonl": b"\xef\xbb\xbf" + lines}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        got = list(json_records(tmp_path / name))
        assert [obj for _, obj in got] == rows, name
        where = f"{tmp_path / name}: array index 4" if name.endswith(".json.gz") else f"{tmp_path / name}:5"
        assert got[4][0] == where
    (tmp_path / "bad.jsonl.gz").write_bytes(gzip.compress(b'{"i": 0}\n\n{"i": \xff}\n'))
    with pytest.raises(UserError, match=r"bad\.jsonl\.gz:3: invalid UTF-8"):
        list(json_records(tmp_path / "bad.jsonl.gz"))
    cut = zstandard.ZstdCompressor().compress(_jsonl(rows * 200))
    (tmp_path / "cut.jsonl.zst").write_bytes(cut[: len(cut) // 2])
    whole_lines = zstandard.ZstdDecompressor().decompressobj().decompress(cut[: len(cut) // 2]).count(b"\n")
    # named: the first line that could not be read whole
    with pytest.raises(UserError, match=rf"cut\.jsonl\.zst:{whole_lines + 1}: cannot read compressed input: truncated"):
        list(json_records(tmp_path / "cut.jsonl.zst"))
    with pytest.raises(UserError, match=r"nowhere\.jsonl: no such file"):
        list(json_records(tmp_path / "nowhere.jsonl"))


def test_format_detection_asks_for_a_field_when_unsure(shared_data):
    belle = str(shared_data / "belle_eval_set.json")
    with pytest.raises(UserError, match=r"belle_eval_set\.json:1: cannot tell the format.*--text-field"):
        resolve_format(belle)
    docs = list(iter_documents(belle, text_field="question"))
    assert len(docs) == 1000 and all(d.text for d in docs)
    assert any("\u4e00" <= ch <= "\u9fff" for ch in docs[0].text)  # Chinese text, decoded


def test_plain_text_units_on_tinyshakespeare(shared_data):
    path = str(shared_data / "tinyshakespeare.txt")
    raw = (shared_data / "tinyshakespeare.txt").read_text(encoding="utf-8")
    whole = list(iter_documents(path, text_unit="file"))
    assert len(whole) == 1 and whole[0].text == raw
    paras = list(iter_documents(path, text_unit="paragraph"))
    assert len(paras) == len([p for p in raw.split("\n\n") if p.strip()])
    assert paras[0].text.startswith("First Citizen:\nBefore we proceed") and paras[0].where.endswith(":1")
    lines = list(iter_documents(path, text_unit="line"))
    assert len(lines) == sum(1 for line in raw.splitlines() if line.strip())


def test_parquet_by_row_groups(tmp_path):
    path = tmp_path / "t.parquet"
    table = pa.table({"content": [f"row {i}" if i != 5 else None for i in range(10)], "n": list(range(10))})
    pq.write_table(table, path, row_group_size=3)
    recs = list(read_records(str(path), text_field="content"))
    assert [r.text for r in recs if isinstance(r, Document)] == [f"row {i}" for i in range(10) if i != 5]
    assert [r.where for r in recs if isinstance(r, BadRecord)] == [f"{path}: row 5"]
    with pytest.raises(UserError, match="no column 'text'"):
        list(read_records(str(path)))


def test_hf_datasets_on_a_local_file(tmp_path):
    path = tmp_path / "local.jsonl"
    path.write_bytes(_jsonl([{"text": f"hf doc {i}"} for i in range(4)]))
    docs = list(iter_documents(str(path), "hf"))
    assert [d.text for d in docs] == [f"hf doc {i}" for i in range(4)]
    with pytest.raises(UserError, match="cannot load with `datasets`"):
        list(iter_documents("hf:no-such-user/no-such-dataset", "hf"))


def test_normalise_and_filters():
    assert normalise("a\x00b\r\nc\td\x1b[0m\x85") == "ab\nc\td[0m"
    assert normalise("ｆｕｌｌ ﬁ", nfkc=True) == "full fi" and normalise("ｆｕｌｌ") == "ｆｕｌｌ"
    cfg = CleanConfig(min_chars=5, max_chars=50)
    assert drop_reason(" \n\t ", cfg) == "empty"
    assert drop_reason("abc", cfg) == "too_short"
    assert drop_reason("x" * 51, cfg) == "too_long"
    assert dup_line_fraction("a\nb\na\na\nc") == pytest.approx(0.4)
    assert drop_reason("a\nb\na\na\nc", CleanConfig(min_chars=1)) == "repetitive"
    assert drop_reason("a\nb\nc\nd\ne", CleanConfig(min_chars=1)) is None
    assert content_hash("same") == content_hash("same".encode()) != content_hash("Same")


FAST_PATH_TEXTS = [
    "plain ascii\nlines\nplain ascii\n\n \t\nend", "a\x00b\r\nc\td\x1b[0m\x85\x7f", "\x1c\n\x1c\n\x1c\nx\ny",
    "caf\u00e9 \u00a9 \u00a0nbsp\n\u00a0\n\u3000\n\u3000\nline", "\u4e2d\u6587\n\u4e2d\u6587\n\u4e2d\u6587\n\u6587",
    "\uff46\uff55\uff4c\uff4c \ufb01\x01", "   \n\n\t\n  \n", "x\ny\nx\ny\nx\ny", "\u0085\u0080\u009f\u00a0",
]


@pytest.mark.parametrize("nfkc", [False, True])
def test_fast_paths_agree_with_the_plain_definitions(nfkc):
    """normalise_utf8 and dup_line_fraction(clean_utf8=...) are speed-ups: same answers as the
    str-only definitions, on ASCII, Latin-1 (0xC2 lead bytes), CJK, C0/C1 controls and blanks."""
    for raw in FAST_PATH_TEXTS:
        text, data = normalise_utf8(raw, nfkc)
        assert text == normalise(raw, nfkc) and data == text.encode("utf-8")
        for min_lines in (1, 4):
            assert dup_line_fraction(text, min_lines, data) == dup_line_fraction(text, min_lines)
    assert dup_line_fraction("x\ny\nx\ny\nx\ny", 4, b"x\ny\nx\ny\nx\ny") == pytest.approx(4 / 6)


def test_json_lines_the_fast_parser_rejects_still_parse_as_the_standard_library_does(tmp_path):
    path = tmp_path / "odd.jsonl"
    path.write_bytes(b'{"text": "nan meta", "meta": {"score": NaN, "big": 123456789012345678901234567890}}\n'
                     b'{"text": "lone \\udc80 escape"}\n{"text": "fine"}\n')
    recs = list(read_records(str(path), "jsonl"))
    assert [r.text for r in recs] == ["nan meta", "lone \udc80 escape", "fine"]
