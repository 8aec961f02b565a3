"""The one streaming record reader: files plain, `.gz` or `.zst` -> JSON records, one at a time.

`open_binary` decompresses as it reads (a truncated zstd stream is an error, not a silent end) and
counts on-disk bytes for progress. `iter_json_records` streams JSON lines or one JSON array (WuDao
ships arrays of GBs) and yields a `BadRecord` naming `file:line` (or `file: array index N`) where
the input is bad, so corpus readers (data/sources.py) can skip and count; `json_records` is the
strict form for files of records (chat, preference, task and prompt files, tokenizer input), where
the first bad record is a `UserError`. A foundation module: the tokenizer and data/ both read
through it, and it imports nothing from the project but errors.
"""

from __future__ import annotations

import codecs
import gzip
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

import orjson
import zstandard

from .errors import UserError

_CHUNK = 1 << 20
READ_ERRORS = (EOFError, OSError, zstandard.ZstdError)  # truncated or corrupt .gz / .zst


@dataclass
class BadRecord:
    where: str
    reason: str

    def message(self) -> str:
        return f"{self.where}: {self.reason}"


# ----------------------------------------------------------------------------------------------
# Opening files: plain, .gz, .zst (a truncated stream is an error, not a silent end)


class _ZstdReader(io.RawIOBase):
    """Decompress a (multi-frame) zstd stream; raises `EOFError` when the input ends mid-frame,
    which `zstandard`'s own stream_reader silently accepts."""

    def __init__(self, raw: BinaryIO):
        self._raw = raw
        self._dctx = zstandard.ZstdDecompressor()
        self._obj = self._dctx.decompressobj()
        self._buf, self._off = b"", 0
        self._in_frame = False

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while self._off >= len(self._buf):
            chunk = self._raw.read(_CHUNK)
            if not chunk:
                if self._in_frame:
                    raise EOFError("truncated zstd stream (ended in the middle of a frame)")
                return 0
            self._feed(chunk)
        n = min(len(b), len(self._buf) - self._off)
        b[:n] = memoryview(self._buf)[self._off : self._off + n]
        self._off += n
        return n

    def _feed(self, chunk: bytes) -> None:
        out = []
        while chunk:
            self._in_frame = True
            out.append(self._obj.decompress(chunk))
            if self._obj.eof:  # frame finished: anything left starts the next frame
                chunk = self._obj.unused_data
                self._obj = self._dctx.decompressobj()
                self._in_frame = False
            else:
                chunk = b""
        self._buf, self._off = b"".join(out), 0

    def close(self) -> None:
        self._raw.close()
        super().close()


class _Counted(io.RawIOBase):
    """The on-disk file, counting bytes read, so progress can be shown in input bytes."""

    def __init__(self, raw: BinaryIO, on_bytes: Callable[[int], None] | None = None):
        self._raw = raw
        self._on_bytes = on_bytes
        self.bytes_read = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = self._raw.readinto(b)
        self.bytes_read += n or 0
        if n and self._on_bytes is not None:
            self._on_bytes(n)
        return n

    def close(self) -> None:
        self._raw.close()
        super().close()


def open_binary(path: str | Path, on_bytes: Callable[[int], None] | None = None) -> BinaryIO:
    """A buffered binary stream of the decompressed content; `on_bytes(n)` hears of every n
    on-disk bytes read (progress in input bytes, whatever the compression)."""
    path = Path(path)
    counted = _Counted(open(path, "rb"), on_bytes)
    name = path.name.lower()
    if name.endswith(".gz"):
        return io.BufferedReader(gzip.GzipFile(fileobj=io.BufferedReader(counted, _CHUNK), mode="rb"), _CHUNK)
    if name.endswith(".zst") or name.endswith(".zstd"):
        return io.BufferedReader(_ZstdReader(counted), _CHUNK)
    return io.BufferedReader(counted, _CHUNK)


def strip_compression(name: str) -> str:
    low = name.lower()
    for ext in (".gz", ".zst", ".zstd"):
        if low.endswith(ext):
            return name[: -len(ext)]
    return name


# ----------------------------------------------------------------------------------------------
# JSON records: lines or one array, streamed


def _parse_json_line(raw: bytes, where: str) -> Any:
    """A line as the standard library parses it, or a BadRecord saying why it cannot be.

    orjson (several times faster, parsing the bytes without a separate decode) answers for every
    line it accepts; what it rejects goes to the standard library, which keeps the last word (it
    also takes NaN, >64-bit integers and lone surrogates) and words the error message."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        pass
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return BadRecord(where, f"invalid UTF-8 at byte {exc.start}")
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        return BadRecord(where, f"not valid JSON ({exc.msg} at column {exc.colno})")


def _iter_json_lines(stream: BinaryIO, path: str) -> Iterator[tuple[str, Any] | BadRecord]:
    lineno = 0
    try:
        for raw in stream:
            lineno += 1
            if raw.isspace():  # blank line (the iterator never yields b"")
                continue
            where = f"{path}:{lineno}"
            obj = _parse_json_line(raw, where)
            yield obj if isinstance(obj, BadRecord) else (where, obj)
    except READ_ERRORS as exc:
        exc.where = f"{path}:{lineno + 1}"  # the first line that could not be read whole
        raise


def _iter_json_array(stream: BinaryIO, path: str) -> Iterator[tuple[str, Any] | BadRecord]:
    """Elements of a top-level JSON array, decoded incrementally from chunks (a multi-GB WuDao
    file is never held whole). A syntax error ends the file: nothing after it can be trusted."""
    decoder = json.JSONDecoder()
    utf8 = codecs.getincrementaldecoder("utf-8")()
    buf, pos, eof, index = "", 0, False, 0

    def more() -> bool:
        nonlocal buf, pos, eof
        if eof:
            return False
        chunk = stream.read(_CHUNK)
        eof = not chunk
        buf = buf[pos:] + utf8.decode(chunk, final=eof)
        pos = 0
        return True

    def skip_ws() -> bool:  # False at end of input
        nonlocal pos
        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n":
                pos += 1
            if pos < len(buf):
                return True
            if not more():
                return False

    try:
        if not skip_ws() or buf[pos] != "[":
            yield BadRecord(f"{path}: array index 0", "expected a JSON array")
            return
        pos += 1
        first = True
        while True:
            if not skip_ws():
                yield BadRecord(f"{path}: array index {index}", "file ends inside the JSON array (truncated?)")
                return
            if buf[pos] == "]":
                return
            if not first:
                if buf[pos] != ",":
                    yield BadRecord(f"{path}: array index {index}", f"expected ',' or ']' but found {buf[pos]!r}")
                    return
                pos += 1
                if not skip_ws():
                    yield BadRecord(f"{path}: array index {index}", "file ends inside the JSON array (truncated?)")
                    return
            first = False
            while True:
                try:
                    value, end = decoder.raw_decode(buf, pos)
                    # a number or literal at the very end of the buffer may continue in the next chunk
                    if end == len(buf) and not eof and not isinstance(value, (dict, list, str)):
                        raise json.JSONDecodeError("incomplete", buf, end)
                    break
                except json.JSONDecodeError as exc:
                    if not more():
                        yield BadRecord(f"{path}: array index {index}", f"not valid JSON ({exc.msg})")
                        return
            pos = end
            yield f"{path}: array index {index}", value
            index += 1
    except UnicodeDecodeError as exc:
        yield BadRecord(f"{path}: array index {index}", f"invalid UTF-8 ({exc.reason})")
    except READ_ERRORS as exc:
        exc.where = f"{path}: array index {index}"  # the first element that could not be read whole
        raise


def iter_json_records(stream: BinaryIO, path: str) -> Iterator[tuple[str, Any] | BadRecord]:
    """JSON lines or one JSON array, told apart by the first non-blank byte. A read error of the
    input (truncated or corrupt .gz / .zst) propagates with `.where` set to the line / index."""
    try:
        head = stream.peek(64) if hasattr(stream, "peek") else b""
    except READ_ERRORS as exc:
        exc.where = f"{path}:1"  # not even the start could be read
        raise
    if head.startswith(codecs.BOM_UTF8):  # editors on Windows write one; JSON parsers reject it
        stream.read(len(codecs.BOM_UTF8))
        head = head[len(codecs.BOM_UTF8):]
    first = head.lstrip()[:1]
    if first == b"[":
        return _iter_json_array(stream, path)
    return _iter_json_lines(stream, path)


def json_records(path: str | Path) -> Iterator[tuple[str, Any]]:
    """(where, value) for every record of a JSON-lines or JSON-array file, plain, .gz or .zst,
    streamed; `where` is "path:LINE" or "path: array index N". Whatever cannot be read (no file,
    bad JSON, bad UTF-8, a truncated or corrupt compressed stream) is a UserError naming it.
    The one reader for files of records (chat, preference, task and prompt files, tokenizer input)."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file")
    try:
        stream = open_binary(path)
    except OSError as exc:
        raise UserError(f"{path}: cannot open ({exc.strerror or exc})") from None
    try:
        with stream:
            for item in iter_json_records(stream, str(path)):
                if isinstance(item, BadRecord):
                    raise UserError(item.message())
                yield item
    except READ_ERRORS as exc:
        raise UserError(f"{getattr(exc, 'where', path)}: cannot read compressed input: {exc}") from None
