"""Streaming readers: corpus files -> `Document`s, one at a time, never a whole corpus in memory.

Formats: The Pile (`{"text", "meta": {"pile_set_name"}}`), WuDao (`{"id", "dataType", "title",
"content"}`, text = title + newline + content), generic JSON lines with a configurable text
field, plain text, parquet, and Hugging Face `datasets` (local files or a hub name). JSON inputs
may be JSON lines or one JSON array (WuDao ships arrays), plain, `.gz` or `.zst`.

A bad record is not an exception here: readers yield a `BadRecord` naming the file and line (or
array index / row) and go on where they can. `iter_documents(..., on_error="raise")` turns the first
one into a `UserError`; `prepare --on-error skip` counts them instead.

Files are opened and JSON records streamed by `openllama.records` (the one record reader).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from ..errors import UserError
from ..records import READ_ERRORS, BadRecord, iter_json_records, open_binary, strip_compression

FORMATS = ("auto", "pile", "wudao", "jsonl", "text", "parquet", "hf")
TEXT_UNITS = ("file", "paragraph", "line")
_JSON_SUFFIXES = (".json", ".jsonl", ".ndjson")
_TEXT_SUFFIXES = (".txt", ".text", ".md")


@dataclass
class Document:
    text: str
    source: str  # corpus subset: the Pile's pile_set_name, WuDao's dataType, else the file's stem
    where: str  # "file:line" (or ":index N", ":row N"), for messages
    meta: dict[str, Any] = field(default_factory=dict)


Record = Document | BadRecord


# ----------------------------------------------------------------------------------------------
# Record -> Document, per format


def _pile_doc(obj: Any, where: str, stem: str) -> Record:
    if not isinstance(obj, dict):
        return BadRecord(where, f"expected a JSON object, found {type(obj).__name__}")
    text = obj.get("text")
    if not isinstance(text, str):
        return BadRecord(where, "missing text field 'text'" if text is None else "field 'text' is not a string")
    meta = obj.get("meta") if isinstance(obj.get("meta"), dict) else {}
    return Document(text, str(meta.get("pile_set_name") or stem), where, meta)


def _wudao_doc(obj: Any, where: str, stem: str) -> Record:
    if not isinstance(obj, dict):
        return BadRecord(where, f"expected a JSON object, found {type(obj).__name__}")
    title, content = obj.get("title"), obj.get("content")
    if not isinstance(content, str):
        return BadRecord(where, "missing text field 'content'" if content is None else "field 'content' is not a string")
    if title is not None and not isinstance(title, str):
        return BadRecord(where, "field 'title' is not a string")
    text = f"{title}\n{content}" if title else content
    meta = {k: obj[k] for k in ("id", "dataType") if k in obj}
    return Document(text, str(obj.get("dataType") or stem), where, meta)


def _jsonl_doc(text_field: str) -> Callable[[Any, str, str], Record]:
    keys = text_field.split(".")

    def make(obj: Any, where: str, stem: str) -> Record:
        value = obj
        for key in keys:
            if not isinstance(value, dict):
                return BadRecord(where, f"expected a JSON object holding {text_field!r}")
            if key not in value:
                return BadRecord(where, f"missing text field {text_field!r}")
            value = value[key]
        if not isinstance(value, str):
            return BadRecord(where, f"field {text_field!r} is not a string")
        return Document(value, stem, where)

    return make


def detect_format(obj: Any, text_field: str) -> str | None:
    """pile / wudao / jsonl from the first record, or None when it fits none."""
    if not isinstance(obj, dict):
        return None
    if isinstance(obj.get("text"), str) and isinstance(obj.get("meta"), dict) and "pile_set_name" in obj["meta"]:
        return "pile"
    if "content" in obj and "title" in obj:
        return "wudao"
    if text_field.split(".")[0] in obj:
        return "jsonl"
    return None


def _read_json(path: str, fmt: str, text_field: str, on_bytes) -> Iterator[Record]:
    stream = open_binary(path, on_bytes)
    stem = Path(strip_compression(Path(path).name)).stem
    with stream:
        make = None if fmt == "auto" else {"pile": _pile_doc, "wudao": _wudao_doc}.get(fmt) or _jsonl_doc(text_field)
        seen_any = False
        try:
            for item in iter_json_records(stream, path):
                if isinstance(item, BadRecord):
                    yield item
                    continue
                seen_any = True
                where, obj = item
                if make is None:
                    found = detect_format(obj, text_field)
                    if found is None:
                        keys = ", ".join(sorted(obj)) if isinstance(obj, dict) else type(obj).__name__
                        raise UserError(f"{where}: cannot tell the format (keys: {keys}); "
                                        f"pass --format and/or --text-field")
                    make = {"pile": _pile_doc, "wudao": _wudao_doc}.get(found) or _jsonl_doc(text_field)
                yield make(obj, where, stem)
        except READ_ERRORS as exc:
            yield BadRecord(path, f"cannot read compressed input: {exc}")
            return
        if not seen_any:
            yield BadRecord(f"{path}", "empty file (no records)")


def _read_text(path: str, unit: str, on_bytes) -> Iterator[Record]:
    stream = open_binary(path, on_bytes)
    stem = Path(strip_compression(Path(path).name)).stem
    with stream:
        try:
            if unit == "file":
                data = stream.read()
                try:
                    text = data.decode("utf-8")
                except UnicodeDecodeError as exc:
                    line = data.count(b"\n", 0, exc.start) + 1
                    yield BadRecord(f"{path}:{line}", "invalid UTF-8")
                    return
                if not text.strip():
                    yield BadRecord(path, "empty file")
                    return
                yield Document(text, stem, f"{path}:1")
                return
            lineno, start, para, seen = 0, 1, [], False
            for raw in stream:
                lineno += 1
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    yield BadRecord(f"{path}:{lineno}", "invalid UTF-8")
                    continue
                if unit == "line":
                    if line.strip():
                        seen = True
                        yield Document(line.rstrip("\r\n"), stem, f"{path}:{lineno}")
                    continue
                if line.strip():
                    if not para:
                        start = lineno
                    para.append(line)
                elif para:
                    seen = True
                    yield Document("".join(para).rstrip("\r\n"), stem, f"{path}:{start}")
                    para = []
            if para:
                seen = True
                yield Document("".join(para).rstrip("\r\n"), stem, f"{path}:{start}")
            if not seen:
                yield BadRecord(path, "empty file")
        except READ_ERRORS as exc:
            yield BadRecord(path, f"cannot read compressed input: {exc}")


def _read_parquet(path: str, text_field: str, on_bytes) -> Iterator[Record]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for a bad file
        yield BadRecord(path, f"not a readable parquet file ({exc})")
        return
    if text_field not in pf.schema_arrow.names:
        raise UserError(f"{path}: no column {text_field!r} (columns: {', '.join(pf.schema_arrow.names)}); "
                        f"pass --text-field")
    stem = Path(path).stem
    row = 0
    size = os.path.getsize(path)
    for group in range(pf.num_row_groups):
        column = pf.read_row_group(group, columns=[text_field]).column(0)
        if on_bytes is not None:
            on_bytes(size * (group + 1) // pf.num_row_groups - size * group // pf.num_row_groups)
        for value in column.to_pylist():
            where = f"{path}: row {row}"
            row += 1
            if isinstance(value, str):
                yield Document(value, stem, where)
            else:
                yield BadRecord(where, f"column {text_field!r} is {'null' if value is None else type(value).__name__}")
    if row == 0:
        yield BadRecord(path, "empty file (no rows)")


_HF_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text", ".csv": "csv"}


def _read_hf(spec: str, text_field: str, split: str, config: str | None) -> Iterator[Record]:
    """A local data file through `datasets`' own builders, or `hf:NAME` / a hub name (streamed)."""
    import datasets

    name = spec[3:] if spec.startswith("hf:") else spec
    local = Path(name).exists()
    try:
        if local:
            builder = _HF_BUILDERS.get(Path(strip_compression(name)).suffix.lower())
            if builder is None:
                raise UserError(f"{name}: no `datasets` builder for this file type ({', '.join(_HF_BUILDERS)})")
            ds = datasets.load_dataset(builder, data_files=str(name), split=split, streaming=True)
        else:
            ds = datasets.load_dataset(name, config, split=split, streaming=True)
        label = Path(name).stem if local else name.replace("/", "_")
        for row, example in enumerate(ds):
            where = f"{name}: row {row}"
            value = example.get(text_field)
            if isinstance(value, str):
                yield Document(value, label, where)
            else:
                yield BadRecord(where, f"missing text field {text_field!r}" if value is None
                                else f"field {text_field!r} is not a string")
    except UserError:
        raise
    except Exception as exc:  # datasets wraps network/format errors in many types
        raise UserError(f"{name}: cannot load with `datasets` ({type(exc).__name__}: {exc})") from None


def guess_format(path: str) -> str:
    """From the file name: parquet and text by suffix, JSON kinds from their first record."""
    if path.startswith("hf:"):
        return "hf"
    base = strip_compression(Path(path).name).lower()
    if base.endswith(".parquet"):
        return "parquet"
    if base.endswith(_TEXT_SUFFIXES):
        return "text"
    return "auto"


def resolve_format(path: str, fmt: str = "auto", text_field: str = "text") -> str:
    """The concrete format of one input: `fmt` unless "auto", else from the name and, for JSON,
    from the first record. An input whose first record cannot be read resolves to "jsonl", and
    reading it then reports the bad record with its line."""
    if fmt != "auto":
        return fmt
    fmt = guess_format(path)
    if fmt != "auto":
        return fmt
    try:
        with open_binary(path) as stream:
            for item in iter_json_records(stream, path):
                if isinstance(item, BadRecord):
                    return "jsonl"
                where, obj = item
                found = detect_format(obj, text_field)
                if found is None:
                    keys = ", ".join(sorted(obj)) if isinstance(obj, dict) else type(obj).__name__
                    raise UserError(f"{where}: cannot tell the format (keys: {keys}); pass --format and/or --text-field")
                return found
    except READ_ERRORS:
        pass
    return "jsonl"


def read_records(path: str, fmt: str = "auto", *, text_field: str = "text", text_unit: str = "file",
                 hf_split: str = "train", hf_config: str | None = None,
                 on_bytes: Callable[[int], None] | None = None) -> Iterator[Record]:
    """Every record of one input: `Document`s, and `BadRecord`s where the input is bad.
    `on_bytes(n)` is called as on-disk bytes are consumed (for progress bars)."""
    if fmt not in FORMATS:
        raise UserError(f"unknown format {fmt!r} (choose from {', '.join(FORMATS)})")
    if fmt == "auto":
        fmt = guess_format(path)
    if fmt == "hf":
        return _read_hf(path, text_field, hf_split, hf_config)
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file")
    if fmt == "parquet":
        return _read_parquet(path, text_field, on_bytes)
    if fmt == "text":
        if text_unit not in TEXT_UNITS:
            raise UserError(f"unknown text unit {text_unit!r} (choose from {', '.join(TEXT_UNITS)})")
        return _read_text(path, text_unit, on_bytes)
    return _read_json(path, fmt, text_field, on_bytes)


def iter_documents(path: str, fmt: str = "auto", *, on_error: str = "raise", **kwargs) -> Iterator[Document]:
    """Only the good `Document`s; with on_error="raise" the first bad record is a `UserError`."""
    for rec in read_records(path, fmt, **kwargs):
        if isinstance(rec, BadRecord):
            if on_error == "raise":
                raise UserError(rec.message())
            continue
        yield rec
