"""`openllama data tokenize` and `TokenShards`: prepared shards of real English and Chinese text ->
memory-mapped token files that decode back to the documents, identical for any worker count."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from openllama import cli
from openllama.data import shards
from openllama.data.prepare import PrepareOptions, prepare
from openllama.data.tokens import TokenShards, token_dtype, tokenize
from openllama.errors import UserError
from openllama.tokenizer import Tokenizer, train_tokenizer

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"  # as conftest's shared_data


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> tuple[Path, Path]:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder not found at {SHARED_DATA} (CI always has it)")
    root = tmp_path_factory.mktemp("tokens")
    english = (SHARED_DATA / "tinyshakespeare.txt").read_text(encoding="utf-8")[:120_000]
    (root / "en.txt").write_text(english, encoding="utf-8")
    prepare([str(root / "en.txt"), str(SHARED_DATA / "belle_eval_set.json")], root / "shards",
            PrepareOptions(text_unit="paragraph", text_field="question", max_lines=300, progress=False))
    tok = train_tokenizer([root / "shards"], root / "tok", vocab_size=2000, sample_bytes=400_000, character_coverage=0.98)
    assert tok.vocab_size == 2000
    return root / "shards", root / "tok"


def test_tokens_decode_back_to_the_documents(prepared, tmp_path):
    shard_dir, tok_dir = prepared
    manifest = tokenize([shard_dir], tok_dir, tmp_path / "t", workers=1, progress=False)
    tok = Tokenizer.load(tok_dir)
    texts = list(shards.iter_texts(shard_dir))
    ts = TokenShards(tmp_path / "t", verify=True)
    assert manifest == ts.manifest
    assert manifest["tokenizer"] == {"fingerprint": tok.fingerprint, "vocab_size": 2000, "bos_id": tok.bos_id,
                                     "eos_id": tok.eos_id}
    assert manifest["dtype"] == "uint16" and ts.shards[0].dtype == np.uint16 and isinstance(ts.shards[0], np.memmap)
    assert len(ts) == manifest["num_docs"] == len(texts)
    assert manifest["num_bytes"] == sum(len(t.encode("utf-8")) for t in texts)
    spans = ts.document_spans()
    assert spans.shape == (len(texts), 3)
    assert manifest["num_tokens"] == int((spans[:, 2] - spans[:, 1]).sum())
    for i in (0, 1, len(texts) // 2, len(texts) - 1):  # English first, Chinese at the end
        ids = ts.document(i)
        assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
        assert tok.decode(ids[1:-1].tolist()) == texts[i]
    assert any("\u4e00" <= ch <= "\u9fff" for ch in texts[-1])
    first = json.loads((tmp_path / "t" / "manifest.json").read_text())["shards"][0]
    idx = np.load(tmp_path / "t" / f"{first['name']}.idx.npy")
    assert idx[0] == 0 and idx[-1] == first["num_tokens"] and np.all(np.diff(idx) >= 2)


def test_same_bytes_with_two_workers_and_corruption_is_named(prepared, tmp_path):
    shard_dir, tok_dir = prepared
    a = tokenize([shard_dir], tok_dir, tmp_path / "a", workers=1, progress=False)
    b = tokenize([shard_dir], tok_dir, tmp_path / "b", workers=2, progress=False)
    assert a["shards"] == b["shards"] and len(a["shards"]) > 1
    for s in a["shards"]:
        assert (tmp_path / "a" / f"{s['name']}.bin").read_bytes() == (tmp_path / "b" / f"{s['name']}.bin").read_bytes()
    bad = tmp_path / "b" / f"{a['shards'][1]['name']}.bin"
    data = bytearray(bad.read_bytes())
    data[10] ^= 1
    bad.write_bytes(bytes(data))
    TokenShards(tmp_path / "b")  # sizes still agree: opening without verify works
    with pytest.raises(UserError, match=f"{bad}: sha256 does not match"):
        TokenShards(tmp_path / "b", verify=True)
    bad.write_bytes(bytes(data[:-2]))
    with pytest.raises(UserError, match=f"{bad}: .* bytes, manifest says"):
        TokenShards(tmp_path / "b")


def test_cli_tokenize_refuses_a_corrupt_text_shard(prepared, tmp_path, capsys):
    shard_dir, tok_dir = prepared
    out = tmp_path / "cli"
    argv = ["data", "tokenize", "--shards", str(shard_dir), "--tokenizer", str(tok_dir), "--out", str(out),
            "--workers", "1", "--no-progress"]
    assert cli.main(argv) == 0
    assert "tokens/s" in capsys.readouterr().out
    assert cli.main(argv) == 2  # not empty: refuses to overwrite
    copy = tmp_path / "copy"
    copy.mkdir()
    for p in shard_dir.iterdir():
        (copy / p.name).write_bytes(p.read_bytes())
    victim = copy / "shard-000000.jsonl.zst"
    victim.write_bytes(victim.read_bytes()[:-3])
    argv[3], argv[7] = str(copy), str(tmp_path / "cli2")
    assert cli.main(argv) == 2
    assert f"{victim}: sha256 does not match" in capsys.readouterr().err
    assert not (tmp_path / "cli2" / "manifest.json").exists()


def test_dtype_follows_the_vocabulary():
    assert token_dtype(65_536) == np.uint16 and token_dtype(65_537) == np.uint32 and token_dtype(100_000) == np.uint32


# -- data categories ---------------------------------------------------------------------------------


def _category_inputs(root: Path) -> list[str]:
    """A Pile-style jsonl (`meta.pile_set_name`, one record without it), a WuDao-style JSON array
    (`dataType`) and a plain jsonl (no category): every document's text names its category."""
    root.mkdir(parents=True, exist_ok=True)
    pile = [{"text": f"Pile document {i} from {name}: the quick brown fox jumps over the lazy dog {i}.",
             "meta": {"pile_set_name": name}} for i, name in enumerate(["Pile-CC", "Wikipedia (en)"] * 6)]
    pile.append({"text": "Pile document without a set name: it takes the file's stem.", "meta": {}})
    (root / "pile_part.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pile), encoding="utf-8")
    wudao = [{"id": i, "dataType": kind, "title": f"标题{i}", "content": f"WuDao {kind} 第{i}篇文章的内容，讲了一些事情。"}
             for i, kind in enumerate(["百科", "新闻"] * 4)]
    (root / "wudao_part.json").write_text(json.dumps(wudao, ensure_ascii=False), encoding="utf-8")
    plain = [{"text": f"Plain document {i} in a file of its own, with no category field at all."} for i in range(5)]
    (root / "notes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in plain), encoding="utf-8")
    return [str(root / n) for n in ("pile_part.jsonl", "wudao_part.json", "notes.jsonl")]


def _expected_category(text: str) -> str:
    for name in ("Pile-CC", "Wikipedia (en)", "百科", "新闻"):
        if f"from {name}:" in text or f"WuDao {name} " in text:
            return name
    return "pile_part" if text.startswith("Pile") else "notes"


def test_category_survives_prepare_and_tokenize(tmp_path):
    prepare(_category_inputs(tmp_path / "raw"), tmp_path / "text", PrepareOptions(max_lines=10, progress=False))
    train_tokenizer([tmp_path / "text"], tmp_path / "tok", vocab_size=400, sample_bytes=None)
    manifest = tokenize([tmp_path / "text"], tmp_path / "tok", tmp_path / "t", workers=2, progress=False)
    ts = TokenShards(tmp_path / "t")
    assert len(manifest["shards"]) == 3  # 26 documents, 10 a shard: categories cross shard borders
    texts = list(shards.iter_texts(tmp_path / "text"))
    names = [ts.categories[k] for k in ts.document_categories()]
    assert names == [_expected_category(t) for t in texts]
    assert ts.categories == sorted({"Pile-CC", "Wikipedia (en)", "pile_part", "百科", "新闻", "notes"})
    spans = ts.document_spans()
    for name, counts in manifest["categories"].items():
        mine = [i for i, n in enumerate(names) if n == name]
        assert counts == {"docs": len(mine), "tokens": int(sum(spans[i, 2] - spans[i, 1] for i in mine))}
    # the per-shard ids are uint16 indexes into the shard's own list (first appearance)
    first = manifest["shards"][0]
    local = np.load(tmp_path / "t" / f"{first['name']}.cat.npy")
    assert local.dtype == np.uint16 and [first["categories"][k] for k in local] == names[:first["num_docs"]]


def test_category_names_and_old_directories(tmp_path):
    from openllama.data.tokens import UNKNOWN, category_of
    from test_packing import write_token_shards

    # web text is categorised by its language (Common Crawl per language), then by source
    assert category_of({"text": "x", "source": "CC-MAIN-2023", "language": "zh"}) == "zh"
    assert category_of({"text": "x", "source": "Github"}) == "Github"
    assert category_of({"text": "x"}) == UNKNOWN == "unknown"
    old = TokenShards(write_token_shards(tmp_path / "old", [[5, 6, 7]] * 4))  # no .cat.npy: before categories
    assert old.categories == ["unknown"] and old.document_categories().tolist() == [0, 0, 0, 0]
    new = write_token_shards(tmp_path / "new", [[5, 6, 7]] * 4, categories=["a", "b", "a", "b"])
    assert TokenShards(new).document_categories().tolist() == [0, 1, 0, 1]
    (new / "shard_00000.cat.npy").unlink()
    with pytest.raises(UserError, match=r"shard_00000.cat.npy: missing"):
        TokenShards(new).document_categories()
