"""Tokenizer: training on real text, exact round trips, transformers parity, offsets, specials, CLI."""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
import zstandard

from openllama import cli
from openllama.errors import UserError
from openllama.tokenizer import (
    COMPRESSION_SAMPLES,
    ROLE_TOKENS,
    TOKENIZER_FILES,
    Tokenizer,
    read_documents,
    sample_documents,
    train_tokenizer,
)

SAMPLES = {
    "english": "It was the best of times, it was the worst of times; 3.14159 and 1,000,000 apples.",
    "chinese": "人工智能正在改变世界。我们需要更多的数据和计算资源！（测试）",
    "japanese": "吾輩は猫である。名前はまだ無い。カタカナとひらがな、そして漢字。",
    "code": "for (int i = 0; i < n; ++i) {\n\tsum += a[i] * b[i];\n}\n# comment: x**2 != y // 3\n",
    "emoji": "👍🏽 family: 👨‍👩‍👧‍👦, flags 🇯🇵🇨🇳, 🦙 llama",
    "whitespace": "  leading\n\n\ntrailing   \t\t mixed \r\n  \u3000full-width\u00a0nbsp   ",
    "controls": "\x00\x01\x7f\u200b\u2028\ufeff zero-width and controls \U0010fffd",
    "specials_as_text": "<s>x</s> <|user|>hi<|end|><|assistant|> <pad><unk>",
    "empty": "",
    "one_space": " ",
}

_CACHE: dict[str, Tokenizer] = {}


def _corpus_docs(shared: Path) -> list[str]:
    english = (shared / "tinyshakespeare.txt").read_text(encoding="utf-8").split("\n\n")
    chinese = []
    for line in (shared / "belle_eval_set.json").read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        chinese.append(record["question"] + "\n" + record["std_answer"])
    return english + chinese


@pytest.fixture
def tok(shared_data: Path, tmp_path_factory) -> Tokenizer:
    """Trained once per session on tinyshakespeare + BELLE (about 1.7 MB), vocab 4000."""
    if "tok" not in _CACHE:
        out = tmp_path_factory.mktemp("tok")
        _CACHE["tok"] = train_tokenizer(
            [shared_data / "tinyshakespeare.txt", shared_data / "belle_eval_set.json"], out, 4000,
            sample_bytes=4_000_000, text_keys=("question", "std_answer"))
    return _CACHE["tok"]


@pytest.fixture
def hf(tok):
    return tok.hf()


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_round_trip_and_transformers_parity(tok, hf, name):
    text = SAMPLES[name]
    ids = tok.encode(text)
    assert (tok.unk_id in ids) == ("<unk>" in text)  # only the literal special text gives the unk id
    assert tok.decode(ids) == text
    assert hf.encode(text) == ids  # stock AutoTokenizer, add_special_tokens defaults
    assert hf(text)["input_ids"] == ids
    assert hf.decode(ids) == text
    assert tok.encode_with_offsets(text)[0] == ids


def test_random_unicode_and_bytes_round_trip(tok, hf):
    rng = random.Random(0)
    texts = []
    for _ in range(150):  # arbitrary code points of every plane, minus surrogates and "▁" (see module doc)
        chars = []
        while len(chars) < rng.randint(1, 40):
            cp = rng.choice([rng.randint(0, 0x7F), rng.randint(0x80, 0xFFFF), rng.randint(0x10000, 0x10FFFF)])
            if not 0xD800 <= cp <= 0xDFFF and cp != 0x2581:
                chars.append(chr(cp))
        texts.append("".join(chars))
    for _ in range(100):  # random bytes, read as UTF-8 the lenient way
        texts.append(rng.randbytes(rng.randint(1, 64)).decode("utf-8", errors="replace"))
    batch = tok.encode_batch(texts)
    assert batch == [tok.encode(t) for t in texts]
    for text, ids in zip(texts, batch):
        assert tok.unk_id not in ids
        assert tok.decode(ids) == text
        assert hf.encode(text) == ids
        assert hf.decode(ids) == text


def test_real_corpora_encode_like_transformers(tok, hf, shared_data):
    docs = _corpus_docs(shared_data)
    ours = tok.encode_batch(docs)
    assert ours == hf(docs)["input_ids"]
    assert all(tok.unk_id not in ids for ids in ours)
    assert [tok.decode(ids) for ids in ours[:500] + ours[-500:]] == docs[:500] + docs[-500:]
    # Real text compresses: English words and Chinese characters are single pieces, not bytes.
    english_bytes = sum(len(d.encode()) for d in docs[:2000])
    assert english_bytes / sum(len(ids) for ids in ours[:2000]) > 2.5


def _check_offsets(tok: Tokenizer, text: str) -> None:
    ids, offsets = tok.encode_with_offsets(text)
    assert len(ids) == len(offsets)
    # Spans tile the text in order; the byte tokens of one character share its span.
    pos = 0
    for i, (start, end) in enumerate(offsets):
        if i and offsets[i - 1] == (start, end):
            continue
        assert start == pos and end > start
        pos = end
    assert pos == len(text)
    # Each distinct span decodes, from its own tokens, back to exactly that slice of the text.
    groups: dict[tuple[int, int], list[int]] = {}
    for token_id, span in zip(ids, offsets):
        groups.setdefault(span, []).append(token_id)
    for (start, end), group in groups.items():
        assert tok.decode(group) == text[start:end]


@pytest.mark.parametrize("name", sorted(set(SAMPLES) - {"empty"}))
def test_offsets_are_exact_character_spans(tok, name):
    _check_offsets(tok, SAMPLES[name])


def test_offsets_of_a_rendered_conversation(tok):
    text = "<s>Be brief.\nuser: 你好 😀\nsystem: Hi  there!</s>user: 2+2?\nsystem: 4</s>"
    _check_offsets(tok, text)
    ids, offsets = tok.encode_with_offsets(text)
    eos_spans = [span for i, span in zip(ids, offsets) if i == tok.eos_id]
    assert [text[s:e] for s, e in eos_spans] == ["</s>", "</s>"]


def test_special_tokens(tok, hf):
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, 3)
    assert tok.role_tokens == list(ROLE_TOKENS)
    assert [tok.token_to_id(t) for t in ROLE_TOKENS] == [4, 5, 6, 7]
    assert tok.token_to_id("no such piece") is None
    assert (hf.unk_token_id, hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (0, 1, 2, 3)
    assert tok.vocab_size == len(hf) == 4000

    text = "answer</s>next<|user|>"
    ids = tok.encode(text)
    assert ids.count(tok.eos_id) == 1 and tok.token_to_id("<|user|>") in ids
    plain = tok.encode(text, allow_special=False)
    assert tok.eos_id not in plain and tok.token_to_id("<|user|>") not in plain
    assert tok.decode(plain) == text
    assert tok.encode_with_offsets(text, allow_special=False)[0] == plain
    assert tok.encode_batch([text], allow_special=False) == [plain]

    wrapped = tok.encode("hello", bos=True, eos=True)
    assert wrapped == [tok.bos_id] + tok.encode("hello") + [tok.eos_id]
    assert tok.decode(wrapped, skip_special=True) == "hello"


def test_transformers_renders_the_default_chat_template(tok, hf):
    from openllama.chat_template import DEFAULT_CHAT_TEMPLATE

    assert tok.chat_template == DEFAULT_CHAT_TEMPLATE == hf.chat_template
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi  there"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "再见"},
    ]
    text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert "Be brief.\n" in text and "user: Hi  there\n" in text and "system: Hello!</s>" in text
    assert text.index("Be brief.") < text.index("Hi  there") < text.index("Hello!") < text.index("再见")
    assert text.endswith("user: 再见\nsystem: ")
    out = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    ids = out["input_ids"] if isinstance(out, Mapping) else out
    assert ids == tok.encode(text)
    assert tok.eos_id in ids


def test_files_save_and_load(tok, tmp_path):
    for name in TOKENIZER_FILES + ("training_report.json",):
        assert (tok.directory / name).is_file(), name
    config = json.loads((tok.directory / "tokenizer_config.json").read_text())
    assert config["add_bos_token"] is False and config["add_eos_token"] is False
    assert (config["bos_token"], config["eos_token"], config["pad_token"], config["unk_token"]) == \
        ("<s>", "</s>", "<pad>", "<unk>")

    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{{ eos_token }}{% endfor %}"
    tok.save(tmp_path, chat_template=template)
    again = Tokenizer.load(tmp_path)
    assert again.fingerprint == tok.fingerprint
    assert again.fingerprint == hashlib.sha256((tmp_path / "tokenizer.json").read_bytes()).hexdigest()
    assert again.chat_template == template
    assert again.encode(SAMPLES["code"]) == tok.encode(SAMPLES["code"])
    rendered = again.hf().apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert rendered == "[user] hi</s>"
    assert tok.chat_template != template  # saving with another template leaves this one alone


def test_training_report(tok):
    report = json.loads((tok.directory / "training_report.json").read_text())
    assert report["vocab_size"] == 4000 and report["fingerprint"] == tok.fingerprint
    assert 1_500_000 < report["sample"]["bytes"] <= 4_000_000
    bpt = report["bytes_per_token"]
    assert set(COMPRESSION_SAMPLES) <= set(bpt)
    assert bpt["english"] > 2.0  # trained on (old) English; modern prose still compresses
    assert bpt["chinese"] > 2.0  # trained on Chinese: whole characters (3 bytes) and words
    assert bpt["japanese"] >= 1.0  # kana unseen in training fall back to bytes, kanji shared with Chinese
    assert bpt["english"] == pytest.approx(tok.bytes_per_token([COMPRESSION_SAMPLES["english"]]), abs=1e-3)


def test_sampling_is_deterministic_and_sized():
    docs = [f"document number {i} " * (1 + i % 7) for i in range(2000)]
    total = sum(len(d.encode()) for d in docs)
    sample = sample_documents(docs, total // 4, seed=1)
    size = sum(len(d.encode()) for d in sample)
    assert total // 4 <= size < total // 4 + max(len(d) for d in docs)
    assert sample == sample_documents(list(reversed(docs)), total // 4, seed=1)  # order-independent
    assert sample != sample_documents(docs, total // 4, seed=2)
    assert sorted(sample_documents(docs, 10 * total)) == sorted(docs)  # small corpus: all of it


def _write_zst_lines(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(zstandard.ZstdCompressor().compress(b"".join(line + b"\n" for line in lines)))


def test_reads_shard_directories_and_names_bad_input(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    _write_zst_lines(shards / "b.jsonl.zst", [json.dumps({"text": f"beta {i}"}).encode() for i in range(3)])
    _write_zst_lines(shards / "a.jsonl.zst", [json.dumps({"text": "alpha\n  two lines"}).encode()])
    assert list(read_documents(shards)) == ["alpha\n  two lines", "beta 0", "beta 1", "beta 2"]

    whole = (shards / "b.jsonl.zst").read_bytes()
    (tmp_path / "cut.jsonl.zst").write_bytes(whole[: len(whole) - 6])
    with pytest.raises(UserError, match=r"cut\.jsonl\.zst:\d+: cannot read compressed input: truncated zstd"):
        list(read_documents(tmp_path / "cut.jsonl.zst"))
    _write_zst_lines(tmp_path / "bad.jsonl.zst", [b'{"text": "ok"}', b'{"text": oops}'])
    with pytest.raises(UserError, match=r"bad\.jsonl\.zst:2: not valid JSON"):
        list(read_documents(tmp_path / "bad.jsonl.zst"))
    (tmp_path / "nokey.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(UserError, match=r"nokey\.jsonl:1: no text field 'text'.*body"):
        list(read_documents(tmp_path / "nokey.jsonl"))
    (tmp_path / "latin1.txt").write_bytes(b"fine\ncaf\xe9\n")
    with pytest.raises(UserError, match=r"latin1\.txt:2: invalid UTF-8"):
        list(read_documents(tmp_path / "latin1.txt"))
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(UserError, match=r"empty\.txt: empty file"):
        list(read_documents(tmp_path / "empty.txt"))
    (tmp_path / "array.json").write_text(json.dumps([{"instruction": "a", "output": "b"}, {"output": "c"}]))
    assert list(read_documents(tmp_path / "array.json", ("instruction", "output"))) == ["a\nb", "c"]
    (tmp_path / "plain.txt").write_text("para one\nline two\n\n\npara two\n")
    assert list(read_documents(tmp_path / "plain.txt")) == ["para one\nline two\n", "para two\n"]
    # compressed text and a compressed JSON array go through the same readers
    (tmp_path / "plain.txt.gz").write_bytes(gzip.compress((tmp_path / "plain.txt").read_bytes()))
    assert list(read_documents(tmp_path / "plain.txt.gz")) == ["para one\nline two\n", "para two\n"]
    (tmp_path / "array.json.gz").write_bytes(gzip.compress((tmp_path / "array.json").read_bytes()))
    assert list(read_documents(tmp_path / "array.json.gz", ("instruction", "output"))) == ["a\nb", "c"]
    text = zstandard.ZstdCompressor().compress(b"line\n" * 50_000)
    (tmp_path / "cut.txt.zst").write_bytes(text[: len(text) // 2])
    with pytest.raises(UserError, match=r"cut\.txt\.zst:\d+: cannot read compressed input: truncated zstd"):
        list(read_documents(tmp_path / "cut.txt.zst"))


def test_vocab_size_errors_give_advice(tmp_path):
    text = ["the quick brown fox jumps over the lazy dog " * 3 + str(i) for i in range(50)]
    with pytest.raises(UserError, match=r"too large for .* lower --vocab-size"):
        train_tokenizer(text, tmp_path / "big", 6000)
    chinese = ["".join(chr(0x4E00 + (i * 7 + j) % 3000) for j in range(200)) for i in range(100)]
    with pytest.raises(UserError, match=r"distinct characters.*raise --vocab-size"):
        train_tokenizer(chinese, tmp_path / "cjk", 600)
    with pytest.raises(UserError, match=r"too small"):
        train_tokenizer(text, tmp_path / "tiny", 100)


def test_cli_trains_a_small_tokenizer(shared_data, tmp_path, capsys):
    out = tmp_path / "tok"
    argv = ["tokenizer", "train", "--input", str(shared_data / "tinyshakespeare.txt"), "--out", str(out),
            "--vocab-size", "600", "--sample-bytes", "300000"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "bytes per token" in printed and "english" in printed
    tok = Tokenizer.load(out)
    assert tok.vocab_size == 600
    assert json.loads((out / "training_report.json").read_text())["sample"]["bytes"] >= 300_000
    # Same inputs and options: the same tokenizer, byte for byte.
    again = train_tokenizer([shared_data / "tinyshakespeare.txt"], tmp_path / "again", 600, sample_bytes=300_000)
    assert again.fingerprint == tok.fingerprint

    assert cli.main(["tokenizer", "train", "--input", str(tmp_path / "missing.txt"), "--out", str(out),
                     "--vocab-size", "600"]) == 2
    assert "missing.txt: no such file" in capsys.readouterr().err


# ---------------------------------------------------------------- sentence sampling (the seed's size)


def _two_alphabet_lines(n: int) -> list[str]:
    """n lines: the first half Latin words only, the second half Greek words only."""
    rng = random.Random(3)
    latin = ["".join(rng.choice("abcdefghij") for _ in range(rng.randint(3, 7))) for _ in range(300)]
    greek = ["".join(rng.choice("αβγδεζηθικ") for _ in range(rng.randint(3, 7))) for _ in range(300)]
    return [" ".join(rng.choices(latin if i < n // 2 else greek, k=10)) for i in range(n)]


def _multi_char_pieces(tok: Tokenizer, alphabet: str) -> int:
    pieces = (tok.id_to_token(i) for i in range(tok.vocab_size))
    return sum(1 for p in pieces if p and len(p.strip("▁")) > 1 and set(p.strip("▁")) <= set(alphabet))


def test_sentence_sampling_is_a_seeded_sample_of_all_lines(tmp_path):
    lines = _two_alphabet_lines(4000)
    docs = ["\n".join(lines[i:i + 4]) for i in range(0, len(lines), 4)]  # 1000 documents of 4 lines
    sampled = train_tokenizer(docs, tmp_path / "s0", 700, sentences=1000, num_threads=1)
    sample = sampled.training_report["sample"]
    assert (sample["lines"], sample["lines_trained"]) == (4000, 1000)
    assert sample["sentences"] == 1000
    # A reservoir over the whole stream, not its first 1000 lines (which hold no Greek at all).
    assert _multi_char_pieces(sampled, "αβγδεζηθικ") > 50 and _multi_char_pieces(sampled, "abcdefghij") > 50
    again = train_tokenizer(docs, tmp_path / "s0b", 700, sentences=1000, num_threads=1)
    assert again.fingerprint == sampled.fingerprint  # seeded: the same lines, the same tokenizer
    # ... in another process too (SentencePiece's own input_sentence_size sampler was not)
    code = ("import sys; from tests.test_tokenizer import _two_alphabet_lines as f; "
            "from openllama.tokenizer import train_tokenizer as t; ls = f(4000); "
            "print(t(['\\n'.join(ls[i:i + 4]) for i in range(0, 4000, 4)], sys.argv[1], 700, sentences=1000, "
            "num_threads=1).fingerprint)")
    child = subprocess.run([sys.executable, "-c", code, str(tmp_path / "child")], capture_output=True, text=True,
                           cwd=Path(__file__).resolve().parents[1], check=True)
    assert child.stdout.strip() == sampled.fingerprint
    other = train_tokenizer(docs, tmp_path / "s1", 700, sentences=1000, seed=1, num_threads=1)
    assert other.fingerprint != sampled.fingerprint
    # Fewer lines than the limit: every line, in order, exactly as with no limit at all.
    everything = train_tokenizer(docs, tmp_path / "all", 700, sentences=0, num_threads=1)
    roomy = train_tokenizer(docs, tmp_path / "roomy", 700, sentences=4000, num_threads=1)
    assert everything.fingerprint == roomy.fingerprint != sampled.fingerprint
    assert roomy.training_report["sample"]["lines_trained"] == 4000


def test_streaming_without_a_byte_sample_and_the_cli_options(tmp_path, capsys):
    lines = _two_alphabet_lines(2000)
    (tmp_path / "corpus.jsonl").write_text(
        "".join(json.dumps({"text": "\n".join(lines[i:i + 2])}) + "\n" for i in range(0, 2000, 2)), encoding="utf-8")
    out = tmp_path / "tok"
    argv = ["tokenizer", "train", "--input", str(tmp_path / "corpus.jsonl"), "--out", str(out), "--vocab-size", "600",
            "--sample-bytes", "0", "--sentences", "500", "--quiet"]
    assert cli.main(argv) == 0
    assert "500 of 2,000 lines" in capsys.readouterr().out
    report = json.loads((out / "training_report.json").read_text())
    assert report["sample"]["requested_bytes"] is None  # streamed: no document sample held in memory
    assert report["sample"]["documents"] == 1000
    assert report["sample"]["bytes"] == sum(len("\n".join(lines[i:i + 2]).encode()) for i in range(0, 2000, 2))
    same = train_tokenizer([tmp_path / "corpus.jsonl"], tmp_path / "api", 600, sample_bytes=None, sentences=500)
    assert same.fingerprint == Tokenizer.load(out).fingerprint
    with pytest.raises(UserError, match="sentence sample -1"):
        train_tokenizer(lines, tmp_path / "bad", 600, sentences=-1)


def test_vocab_over_65536_gives_uint32_token_files_and_transformers_parity(tmp_path):
    """The 100k path at the smallest size past uint16: 65,600 pieces learned from 22k random words."""
    from openllama.data import shards
    from openllama.data.prepare import PrepareOptions, prepare
    from openllama.data.tokens import TokenShards, tokenize

    rng = random.Random(0)
    words = sorted({"".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(4, 10)))
                    for _ in range(22_000)})
    lines = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(9000)]
    tok = train_tokenizer(lines, tmp_path / "tok", 65_600, sentences=8000, num_threads=2)
    assert tok.vocab_size == 65_600 and tok.training_report["sample"]["lines_trained"] == 8000

    docs = ["\n".join(lines[i:i + 3]) for i in range(0, 3000, 3)] + [SAMPLES["chinese"], SAMPLES["emoji"]]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    prepare([str(tmp_path / "docs.jsonl")], tmp_path / "text", PrepareOptions(progress=False))
    manifest = tokenize([tmp_path / "text"], tmp_path / "tok", tmp_path / "tokens", workers=1, progress=False)
    ts = TokenShards(tmp_path / "tokens", verify=True)
    assert manifest["dtype"] == "uint32" and ts.shards[0].dtype == np.uint32
    texts = list(shards.iter_texts(tmp_path / "text"))
    assert len(ts) == len(texts) >= 1000
    high = 0
    for i, text in enumerate(texts):
        ids = ts.document(i)
        assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
        assert tok.decode(ids[1:-1].tolist()) == text
        high += int((ids > 65_535).sum())
    assert high > 0  # ids that uint16 would have wrapped

    hf = tok.hf()  # stock AutoTokenizer on the written files
    assert len(hf) == 65_600
    probe = docs[:300] + list(SAMPLES.values()) + lines[8500:]  # lines 8500+ may be outside the sample
    assert hf(probe)["input_ids"] == tok.encode_batch(probe)
