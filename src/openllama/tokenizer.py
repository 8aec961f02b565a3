"""The tokenizer: train SentencePiece BPE, write files stock `transformers` loads, encode exactly.

One vocabulary, two equal encoders:
  tokenizer.model  SentencePiece BPE (byte fallback, split digits, identity normalisation, no dummy
                   prefix, whitespace kept) -- the fast multi-threaded encoder we use for batches.
  tokenizer.json   the same model as a `tokenizers` BPE (merges ranked by piece score, " " -> "▁",
                   byte fallback) plus the special tokens as added tokens -- what transformers loads,
                   and what gives us exact character offsets.

Special tokens. `<unk>`, `<s>`, `</s>`, `<pad>` and the chat role tokens (`<|system|>`, `<|user|>`,
`<|assistant|>`, `<|end|>`) are SentencePiece control symbols and special added tokens in
tokenizer.json. With `allow_special=True` (the default, as in transformers) their text inside a
string encodes to their id, so a chat template that writes `</s>` yields the eos id; with
`allow_special=False` they encode as plain text (use it for raw corpora that may contain `</s>`).

Round trip: `decode(encode(x)) == x` for any string without U+2581 ("▁", which SentencePiece uses
to escape spaces, so it decodes as a space). No unknown ids: unseen characters become UTF-8 bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import heapq
import io
import json
import os
import random
import re
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from .atomic import write_bytes_atomic
from .chat_template import DEFAULT_CHAT_TEMPLATE
from .errors import UserError
from .records import READ_ERRORS, json_records, open_binary, strip_compression

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# what travels with a model (checkpoints, runs, HF import/export): our files plus transformers 5's chat template
COPIED_FILES = TOKENIZER_FILES + ("chat_template.jinja",)
UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
SPACE = "\u2581"  # SentencePiece's escaped space "▁"
MAX_LINE_CHARS = 4096  # SentencePiece skips training lines over max_sentence_length bytes: cut them
# SentencePiece keeps every training line in memory and its BPE trainer works over all of them, so
# at scale we train on a uniform sample of at most this many lines, as the seed (Open-Llama) did with
# input_sentence_size + shuffle_input_sentence. Measured at vocab 100k (docs/data.md, "The seed's
# tokenizer size"): peak RSS ~1.1-1.5 KB per trained line (1.47 GB at 1M lines, 2.47 GB at 2M),
# 35-85 s per 1M lines on 2 shared cores.
DEFAULT_SENTENCES = 2_000_000

# Short texts in the four kinds of language we care about, to report compression after training.
COMPRESSION_SAMPLES = {
    "english": (
        "The committee met on Tuesday to review the budget for the coming year. After a long "
        "discussion about rising costs, the members agreed to postpone two building projects and to "
        "spend the savings on teachers, books and a new roof for the library. The vote was 7 to 2.\n"
    ),
    "chinese": (
        "今天早上我们去公园散步，天气非常好。孩子们在草地上踢足球，老人们在树下下棋。"
        "中午我们在附近的小饭馆吃了面条和饺子，价格便宜，味道也不错。下午回家以后，我读了一本关于历史的书。\n"
    ),
    "japanese": (
        "昨日は友達と一緒に京都へ行きました。朝早く新幹線に乗って、お寺や神社をたくさん見ました。"
        "お昼ご飯には美味しいうどんを食べて、午後は川沿いをゆっくり散歩しました。とても楽しい一日でした。\n"
    ),
    "code": (
        "def moving_average(values, window=3):\n"
        "    \"\"\"Return the mean of each run of `window` consecutive values.\"\"\"\n"
        "    if window <= 0:\n"
        "        raise ValueError(f\"window must be positive, got {window}\")\n"
        "    total = sum(values[:window])\n"
        "    out = [total / window]\n"
        "    for i in range(window, len(values)):\n"
        "        total += values[i] - values[i - window]\n"
        "        out.append(total / window)\n"
        "    return out\n"
    ),
}


def copy_tokenizer_files(src: str | Path | None, dst: str | Path) -> list[str]:
    """Copy the COPIED_FILES that exist in `src` into `dst` (created if needed); returns their names.
    The one copy rule for checkpoints, run directories and Hugging Face import/export."""
    import shutil

    if src is None or not Path(src).is_dir():
        return []
    src, dst = Path(src), Path(dst)
    copied = [name for name in COPIED_FILES if (src / name).is_file()]
    if copied:
        dst.mkdir(parents=True, exist_ok=True)
    for name in copied:
        shutil.copy2(src / name, dst / name)
    return copied


# ---------------------------------------------------------------- reading training text


def _record_text(record: Any, text_keys: Sequence[str], where: str) -> str:
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(record).__name__}")
    parts = [record[k] for k in text_keys if record.get(k) is not None]
    if not parts:
        raise UserError(f"{where}: no text field {' or '.join(map(repr, text_keys))} "
                        f"(keys: {', '.join(sorted(record)) or 'none'}); choose one with --text-key")
    for key, value in zip(text_keys, parts):
        if not isinstance(value, str):
            raise UserError(f"{where}: field {key!r} is {type(value).__name__}, not a string")
    return "\n".join(parts)


def read_documents(path: str | Path, text_keys: Sequence[str] = ("text",)) -> Iterator[str]:
    """Documents from one input: a directory of `*.jsonl.zst` shards, JSON lines or one JSON array
    (plain, .gz or .zst; `text_keys` joined by newlines), or plain text (one document per
    paragraph, paragraphs being separated by blank lines). Streams; errors name file and line."""
    path = Path(path)
    if path.is_dir():
        shards = sorted(path.rglob("*.jsonl.zst"))
        if not shards:
            raise UserError(f"{path}: directory holds no *.jsonl.zst shards")
        for shard in shards:
            yield from read_documents(shard, text_keys)
        return
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise UserError(f"{path}: empty file")
    if strip_compression(path.name).lower().endswith((".jsonl", ".json")):
        for where, record in json_records(path):
            yield _record_text(record, text_keys, where)
    else:
        yield from _paragraphs(path)


def _paragraphs(path: Path) -> Iterator[str]:
    """Paragraphs of a plain-text file (plain, .gz or .zst), cut at 64 KiB so one huge paragraph
    never sits whole in memory."""
    paragraph: list[str] = []
    size = lineno = 0
    try:
        with open_binary(path) as stream:
            for lineno, raw in enumerate(stream, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise UserError(f"{path}:{lineno}: invalid UTF-8 ({exc.reason} at byte {exc.start})") from None
                if line.strip():
                    paragraph.append(line)
                    size += len(line)
                    if size < 1 << 16:
                        continue
                if paragraph:
                    yield "".join(paragraph)
                    paragraph, size = [], 0
    except READ_ERRORS as exc:  # the line after the last whole one is where the input broke off
        raise UserError(f"{path}:{lineno + 1}: cannot read compressed input: {exc}") from None
    if paragraph:
        yield "".join(paragraph)


def sample_documents(docs: Iterable[str], sample_bytes: int, seed: int = 0) -> list[str]:
    """A deterministic random sample of whole documents totalling about `sample_bytes` UTF-8 bytes.

    Each document gets a key from a seeded hash of its text; we keep the lowest keys, just enough
    to reach the budget (a bounded heap, so memory stays ~sample_bytes however large the corpus).
    The same documents give the same sample in any order, on any machine."""
    heap: list[tuple[int, int, str, int]] = []  # (-key, tiebreak, text, bytes): a max-heap on key
    total = 0
    salt = seed.to_bytes(8, "little", signed=True)
    for i, doc in enumerate(docs):
        if not doc:
            continue
        data = doc.encode("utf-8")
        key = int.from_bytes(hashlib.blake2b(data, digest_size=8, key=salt).digest(), "big")
        if total >= sample_bytes and key >= -heap[0][0]:
            continue  # would be dropped straight away
        heapq.heappush(heap, (-key, -i, doc, len(data)))
        total += len(data)
        while heap and total - heap[0][3] >= sample_bytes:
            total -= heapq.heappop(heap)[3]
    return [doc for _, _, doc, _ in sorted(heap, reverse=True)]


def _training_lines(docs: Iterable[str], counts: dict[str, int] | None = None) -> Iterator[str]:
    """SentencePiece learns from lines: newlines are never inside a piece (they encode as a byte).
    Empty lines are left out (SentencePiece drops them anyway); `counts["lines"]` counts the rest."""
    counts = counts if counts is not None else {}
    counts.setdefault("lines", 0)
    for doc in docs:
        for line in doc.split("\n"):
            for start in range(0, len(line), MAX_LINE_CHARS):
                counts["lines"] += 1
                yield line[start:start + MAX_LINE_CHARS]


def _sample_lines(lines: Iterator[str], k: int, seed: int) -> Iterator[str]:
    """A uniform random sample of at most `k` lines (reservoir, Algorithm R, `random.Random(seed)`),
    handed on one by one and dropped here as they go. SentencePiece's own sampler
    (input_sentence_size) ignores set_random_generator_seed in 0.2.x: another sample in every process.
    Fewer than `k` lines pass through whole and in order."""
    if not k:
        yield from lines
        return
    rng = random.Random(seed)
    kept: list[str | None] = []
    for i, line in enumerate(lines):
        if i < k:
            kept.append(line)
        elif (j := rng.randrange(i + 1)) < k:
            kept[j] = line
    for i, line in enumerate(kept):
        kept[i] = None  # SentencePiece holds its own copy now
        yield line


class _Stream:
    """Documents passed straight through (no byte sample), counted, with the first `keep_bytes`
    of them kept to report the compression on training text."""

    def __init__(self, docs: Iterable[str], keep_bytes: int = 4_000_000):
        self.docs, self.keep_bytes = docs, keep_bytes
        self.documents = self.bytes = 0
        self.head: list[str] = []

    def __iter__(self) -> Iterator[str]:
        for doc in self.docs:
            if not doc:
                continue
            size = len(doc.encode("utf-8"))
            if self.bytes < self.keep_bytes:
                self.head.append(doc)
            self.documents += 1
            self.bytes += size
            yield doc


# ---------------------------------------------------------------- building the HF tokenizer


def _model_proto(model_bytes: bytes):
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_bytes)
    return proto


def build_hf_tokenizer(model_bytes: bytes):
    """The SentencePiece BPE model as a `tokenizers.Tokenizer` that encodes to the same ids.

    SentencePiece BPE merges, anywhere in the text, the adjacent pair whose joined piece has the
    best score; `tokenizers` merges the pair with the lowest merge rank. So every split of a
    normal piece into two normal pieces becomes a merge, ranked by the piece's score (then id).
    No pre-tokenizer: like SentencePiece, BPE runs over the whole (space-escaped) text."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers
    from tokenizers.models import BPE

    proto = _model_proto(model_bytes)
    spec = proto.normalizer_spec
    if spec.add_dummy_prefix or spec.remove_extra_whitespaces or spec.precompiled_charsmap:
        raise UserError("tokenizer.model: only identity normalisation without a dummy prefix is supported "
                        "(train it with `openllama tokenizer train`)")
    if proto.trainer_spec.model_type != 2:  # sentencepiece_model.proto: BPE = 2
        raise UserError("tokenizer.model: not a BPE SentencePiece model")
    vocab = {piece.piece: i for i, piece in enumerate(proto.pieces)}
    normal = {p.piece: (p.score, i) for i, p in enumerate(proto.pieces) if p.type == 1}  # type NORMAL
    ranked = []
    for piece, (score, i) in normal.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                ranked.append((-score, i, left, right))
    merges = [(left, right) for _, _, left, right in sorted(ranked)]
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token=proto.trainer_spec.unk_piece, fuse_unk=True,
                        byte_fallback=proto.trainer_spec.byte_fallback, dropout=None))
    tok.normalizer = normalizers.Replace(" ", SPACE)
    tok.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
    # unknown (2) and control (3) pieces are special; SentencePiece never matches them in text.
    specials = [p.piece for p in proto.pieces if p.type in (2, 3)]
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    return tok


# ---------------------------------------------------------------- the tokenizer


class Tokenizer:
    """Our tokenizer (see the module docstring). Build it with `Tokenizer.load(dir)` or
    `train_tokenizer(...)`."""

    def __init__(self, model_bytes: bytes, hf_json: bytes | None = None, *, chat_template: str | None = None,
                 model_max_length: int = 2048, directory: str | Path | None = None):
        import sentencepiece as spm
        from tokenizers import Tokenizer as HFTokenizer

        self._model_bytes = model_bytes
        self._sp = spm.SentencePieceProcessor(model_proto=model_bytes)
        if hf_json is None:
            hf_json = build_hf_tokenizer(model_bytes).to_str(pretty=True).encode("utf-8")
        self._hf_json = hf_json
        self._hf = HFTokenizer.from_str(hf_json.decode("utf-8"))
        self._hf_plain = HFTokenizer.from_str(hf_json.decode("utf-8"))
        self._hf_plain.encode_special_tokens = True  # special-token text encodes as plain text
        self.chat_template = chat_template if chat_template is not None else DEFAULT_CHAT_TEMPLATE
        self.model_max_length = model_max_length
        self.directory = Path(directory) if directory is not None else None
        self._hf_tokenizer = None

        sp = self._sp
        self.vocab_size: int = sp.get_piece_size()
        self.unk_id: int = sp.unk_id()
        self.bos_id: int = sp.bos_id()
        self.eos_id: int = sp.eos_id()
        self.pad_id: int = sp.pad_id()
        if min(self.bos_id, self.eos_id, self.pad_id) < 0:
            raise UserError("tokenizer.model: needs bos, eos and pad pieces (train it with `openllama tokenizer train`)")
        self.special_tokens: list[str] = [sp.id_to_piece(i) for i in range(self.vocab_size)
                                          if sp.is_control(i) or sp.is_unknown(i)]
        core = {self.unk_id, self.bos_id, self.eos_id, self.pad_id}
        self.role_tokens: list[str] = [t for t in self.special_tokens if sp.piece_to_id(t) not in core]
        ordered = sorted(self.special_tokens, key=len, reverse=True)  # leftmost-longest, like tokenizers
        self._special_re = re.compile("(" + "|".join(map(re.escape, ordered)) + ")")
        self._special_ids = {t: sp.piece_to_id(t) for t in self.special_tokens}
        self.fingerprint: str = hashlib.sha256(hf_json).hexdigest()

    # ---- files

    @classmethod
    def load(cls, directory: str | Path) -> "Tokenizer":
        directory = Path(directory)
        model = directory / "tokenizer.model"
        if not model.is_file():
            raise UserError(f"{directory}: no tokenizer.model (train one with `openllama tokenizer train`)")
        hf_path = directory / "tokenizer.json"
        config: dict[str, Any] = {}
        if (directory / "tokenizer_config.json").is_file():
            try:
                config = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise UserError(f"{directory / 'tokenizer_config.json'}: invalid JSON ({exc})") from None
        template = config.get("chat_template")
        if template is None and (directory / "chat_template.jinja").is_file():  # transformers 5 writes this
            template = (directory / "chat_template.jinja").read_text(encoding="utf-8")
        try:
            return cls(model.read_bytes(), hf_path.read_bytes() if hf_path.is_file() else None,
                       chat_template=template, model_max_length=int(config.get("model_max_length", 2048)),
                       directory=directory)
        except RuntimeError as exc:  # sentencepiece / tokenizers could not parse a file
            raise UserError(f"{directory}: cannot load tokenizer ({exc})") from None

    def save(self, directory: str | Path, chat_template: str | None = None) -> Path:
        """Write the four tokenizer files, with `chat_template` (default: this tokenizer's own)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        piece = self._sp.id_to_piece
        names = {"bos_token": piece(self.bos_id), "eos_token": piece(self.eos_id),
                 "unk_token": piece(self.unk_id), "pad_token": piece(self.pad_id)}
        special_map = {**names, "additional_special_tokens": self.role_tokens}
        config = {
            # The plain fast tokenizer: it takes tokenizer.json as it is (LlamaTokenizer in
            # transformers 5 would rebuild its own pre-tokenizer and add a dummy prefix).
            "tokenizer_class": "PreTrainedTokenizerFast",
            **names,
            "additional_special_tokens": self.role_tokens,
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": self.model_max_length,
            "chat_template": chat_template if chat_template is not None else self.chat_template,
        }
        write_bytes_atomic(directory / "tokenizer.model", self._model_bytes)
        write_bytes_atomic(directory / "tokenizer.json", self._hf_json)
        write_bytes_atomic(directory / "tokenizer_config.json", _json_bytes(config))
        write_bytes_atomic(directory / "special_tokens_map.json", _json_bytes(special_map))
        return directory

    def hf(self):
        """The same tokenizer as transformers loads it from our files (`AutoTokenizer`)."""
        if self._hf_tokenizer is None:
            from transformers import AutoTokenizer

            if self.directory is not None and (self.directory / "tokenizer.json").is_file():
                self._hf_tokenizer = AutoTokenizer.from_pretrained(str(self.directory))
            else:
                with tempfile.TemporaryDirectory() as tmp:
                    self._hf_tokenizer = AutoTokenizer.from_pretrained(str(self.save(tmp)))
        return self._hf_tokenizer

    # ---- encoding

    def encode(self, text: str, bos: bool = False, eos: bool = False, allow_special: bool = True) -> list[int]:
        return self.encode_batch([text], bos=bos, eos=eos, allow_special=allow_special)[0]

    def encode_batch(self, texts: Iterable[str], bos: bool = False, eos: bool = False,
                     allow_special: bool = True, num_threads: int | None = None) -> list[list[int]]:
        """Encode many texts with SentencePiece's multi-threaded encoder (faster than `tokenizers`
        here, same ids). Special-token text is cut out first, as tokenizers' added tokens are."""
        texts = texts if isinstance(texts, list) else list(texts)
        if allow_special:
            splits = [self._special_re.split(t) for t in texts]  # [text, special, text, ..., text]
            flat = [part for parts in splits for part in parts[::2]]
        else:
            splits, flat = None, texts
        threads = num_threads or min(len(flat), os.cpu_count() or 1) or 1
        encoded = self._sp.encode(flat, num_threads=threads)
        out: list[list[int]] = []
        pos = 0
        for i in range(len(texts)):
            ids = [self.bos_id] if bos else []
            if splits is None:
                ids += encoded[i]
            else:
                parts = splits[i]
                for j, part in enumerate(parts):
                    if j % 2:
                        ids.append(self._special_ids[part])
                    else:
                        ids += encoded[pos]
                        pos += 1
            if eos:
                ids.append(self.eos_id)
            out.append(ids)
        return out

    def encode_with_offsets(self, text: str, allow_special: bool = True) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids and, per id, the (start, end) character span of `text` it covers. A character that
        falls back to UTF-8 bytes gives each of its byte tokens that character's span."""
        enc = (self._hf if allow_special else self._hf_plain).encode(text, add_special_tokens=False)
        return list(enc.ids), [tuple(span) for span in enc.offsets]

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        """Exact inverse of encode; special tokens appear as their text unless `skip_special`."""
        return self._hf.decode(list(ids), skip_special_tokens=skip_special)

    def token_to_id(self, piece: str) -> int | None:
        return self._hf.token_to_id(piece)

    def id_to_token(self, token_id: int) -> str | None:
        return self._hf.id_to_token(token_id)

    def bytes_per_token(self, texts: Iterable[str]) -> float:
        texts = list(texts)
        n_bytes = sum(len(t.encode("utf-8")) for t in texts)
        n_tokens = sum(len(ids) for ids in self.encode_batch(texts, allow_special=False))
        return n_bytes / max(n_tokens, 1)

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, fingerprint={self.fingerprint[:12]})"


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


# ---------------------------------------------------------------- training


def train_tokenizer(inputs: Iterable[str | os.PathLike], out_dir: str | Path, vocab_size: int = 100_000, *,
                    sample_bytes: int | None = 100_000_000, sentences: int | None = DEFAULT_SENTENCES,
                    text_keys: Sequence[str] = ("text",), seed: int = 0,
                    character_coverage: float = 0.9995, role_tokens: Sequence[str] = ROLE_TOKENS,
                    model_max_length: int = 2048, chat_template: str | None = None,
                    num_threads: int | None = None, verbose: bool = False) -> Tokenizer:
    """Train SentencePiece BPE on a deterministic sample of `inputs` and write the tokenizer files,
    plus `training_report.json` (sample size, time, bytes per token per language), to `out_dir`.

    `inputs`: `pathlib.Path`s (files or shard directories, see `read_documents`) and/or `str`s,
    each str being one document's text. Two samples, both seeded by `seed`:
      sample_bytes  whole documents, about this many UTF-8 bytes, held in memory here
                    (`sample_documents`); None streams every document instead.
      sentences     then SentencePiece trains on at most this many lines, a uniform (reservoir) sample
                    of all the lines (the seed's way; None or 0: every line), see `_sample_lines`."""
    import sentencepiece as spm

    if vocab_size < 256 + 4 + len(role_tokens) + 1:
        raise UserError(f"vocab size {vocab_size} is too small: byte fallback alone needs "
                        f"{256 + 4 + len(role_tokens)} ids; use at least 512")
    if not 0.98 <= character_coverage <= 1.0:  # SentencePiece BPE rejects less than 0.98
        raise UserError(f"character coverage {character_coverage} must be within [0.98, 1]")
    if sample_bytes is not None and sample_bytes <= 0:
        raise UserError(f"sample size {sample_bytes} must be positive (or None: every document)")
    if sentences is not None and sentences < 0:
        raise UserError(f"sentence sample {sentences} must be positive (or 0: every line)")
    sources: list[str] = []

    def documents() -> Iterator[str]:
        for item in inputs:
            if isinstance(item, str):
                yield item
            else:
                sources.append(str(item))
                yield from read_documents(item, text_keys)

    start = time.perf_counter()
    if sample_bytes is None:  # nothing read yet: SentencePiece pulls the documents while it loads lines
        sample: Any = _Stream(_progress(documents(), verbose))
    else:
        sample = sample_documents(_progress(documents(), verbose), sample_bytes, seed)
        if not sample:
            raise UserError("no training text: the inputs hold no documents")
    read_seconds = time.perf_counter() - start

    options = _trainer_options(vocab_size, character_coverage, role_tokens, num_threads, verbose)
    counts: dict[str, int] = {}
    start = time.perf_counter()
    model = io.BytesIO()
    try:
        training = _sample_lines(_training_lines(sample, counts), sentences or 0, seed)
        spm.SentencePieceTrainer.train(sentence_iterator=training, model_writer=model, **options)
    except RuntimeError as exc:
        raise UserError(_explain_training_error(str(exc), vocab_size, _sample_stats(sample)[1])) from None
    train_seconds = time.perf_counter() - start
    n_docs, n_bytes, measured = _sample_stats(sample)

    tok = Tokenizer(model.getvalue(), chat_template=chat_template, model_max_length=model_max_length)
    out_dir = Path(out_dir)
    tok.save(out_dir)
    tok.directory = out_dir
    lines = counts.get("lines", 0)
    report = {
        "vocab_size": tok.vocab_size,
        "fingerprint": tok.fingerprint,
        "sample": {"documents": n_docs, "bytes": n_bytes, "requested_bytes": sample_bytes, "seed": seed,
                   "lines": lines, "lines_trained": min(lines, sentences) if sentences else lines,
                   "sentences": sentences or None,
                   "sources": sources},
        "seconds": {"read_and_sample": round(read_seconds, 3), "train": round(train_seconds, 3)},
        "bytes_per_token": {"training_sample": round(tok.bytes_per_token(measured), 4),
                            **{lang: round(tok.bytes_per_token([text]), 4)
                               for lang, text in COMPRESSION_SAMPLES.items()}},
        "special_tokens": {t: tok.token_to_id(t) for t in tok.special_tokens},
        "options": {k: v for k, v in options.items() if k not in ("num_threads", "minloglevel")},
    }
    write_bytes_atomic(out_dir / "training_report.json", _json_bytes(report))
    tok.training_report = report
    return tok


def _sample_stats(sample: "list[str] | _Stream") -> tuple[int, int, list[str]]:
    """Documents, UTF-8 bytes, and the documents to measure compression on."""
    if isinstance(sample, _Stream):
        if not sample.documents:
            raise UserError("no training text: the inputs hold no documents")
        return sample.documents, sample.bytes, sample.head
    return len(sample), sum(len(d.encode("utf-8")) for d in sample), sample


def _trainer_options(vocab_size: int, character_coverage: float, role_tokens: Sequence[str],
                     num_threads: int | None, verbose: bool) -> dict[str, Any]:
    return dict(
        model_type="bpe", vocab_size=vocab_size, character_coverage=character_coverage,
        byte_fallback=True, split_digits=True, allow_whitespace_only_pieces=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
        split_by_whitespace=True, max_sentence_length=4 * MAX_LINE_CHARS,  # bytes: a cut line always fits
        unk_id=0, bos_id=1, eos_id=2, pad_id=3, unk_piece=UNK, bos_piece=BOS, eos_piece=EOS, pad_piece=PAD,
        control_symbols=list(role_tokens), unk_surface=UNK,
        num_threads=num_threads or os.cpu_count() or 1, minloglevel=0 if verbose else 2,
    )


def _explain_training_error(message: str, vocab_size: int, sample_size: int) -> str:
    if m := re.search(r"Please set it to a value <= (\d+)", message):
        return (f"vocab size {vocab_size} is too large for {sample_size:,} bytes of training text: at most "
                f"{m.group(1)} pieces can be learned from it; lower --vocab-size or give more text (--sample-bytes)")
    if m := re.search(r"smaller than required_chars\. (\d+) vs (\d+)", message):
        return (f"vocab size {vocab_size} cannot hold the {m.group(2)} distinct characters needed for "
                f"the coverage asked: raise --vocab-size above {m.group(2)} or lower --character-coverage")
    return f"sentencepiece training failed: {message.splitlines()[-1] if message else 'unknown error'}"


def _progress(docs: Iterator[str], enabled: bool) -> Iterator[str]:
    if not enabled:
        yield from docs
        return
    from tqdm import tqdm

    with tqdm(desc="reading", unit="B", unit_scale=True, unit_divisor=1024) as bar:
        for doc in docs:
            bar.update(len(doc.encode("utf-8")))
            yield doc


# ---------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", nargs="+", required=True, type=Path, metavar="PATH",
                        help="shard directories (*.jsonl.zst), JSON lines / JSON array files (.gz/.zst too) "
                             "or plain text files")
    parser.add_argument("--out", required=True, type=Path, metavar="DIR", help="where the tokenizer files go")
    parser.add_argument("--vocab-size", type=int, default=100_000, help="number of pieces (default: 100000)")
    parser.add_argument("--sample-bytes", type=int, default=100_000_000,
                        help="UTF-8 bytes of whole documents to sample and hold in memory for training; "
                             "0: stream every document (default: 100000000)")
    parser.add_argument("--sentences", type=int, default=DEFAULT_SENTENCES,
                        help="SentencePiece then trains on a seeded random sample of at most this many "
                             f"lines, bounding its memory; 0: every line (default: {DEFAULT_SENTENCES})")
    parser.add_argument("--text-key", action="append", dest="text_keys", metavar="KEY",
                        help="JSON field(s) holding the text, joined by newlines when several (default: text)")
    parser.add_argument("--character-coverage", type=float, default=0.9995,
                        help="share of characters covered by pieces; the rest fall back to bytes (default: 0.9995)")
    parser.add_argument("--model-max-length", type=int, default=2048,
                        help="context length written to tokenizer_config.json (default: 2048)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the document and line samples (default: 0)")
    parser.add_argument("--quiet", action="store_true",
                        help="no SentencePiece training log and no reading progress (only the summary)")


def run(args: argparse.Namespace) -> int:
    tok = train_tokenizer(args.input, args.out, args.vocab_size, sample_bytes=args.sample_bytes or None,
                          sentences=args.sentences, text_keys=args.text_keys or ("text",), seed=args.seed,
                          character_coverage=args.character_coverage, model_max_length=args.model_max_length,
                          verbose=not args.quiet)
    report = tok.training_report
    sample = report["sample"]
    print(f"tokenizer: {tok.vocab_size} pieces, trained on {sample['documents']:,} documents "
          f"({sample['bytes'] / 1e6:.1f} MB; {sample['lines_trained']:,} of {sample['lines']:,} lines) "
          f"in {report['seconds']['train']:.1f} s -> {args.out}")
    print("bytes per token: " + ", ".join(f"{k} {v:.2f}" for k, v in report["bytes_per_token"].items()))
    print(f"fingerprint: {tok.fingerprint}")
    return 0
