"""`openllama data download`: resumable, checksummed HTTP(S) downloads of a URL list.

Each file is fetched into `NAME.part`; after a dropped connection the next attempt asks for the
rest with a `Range` header (and starts over if the server ignores it). Attempts back off
exponentially. A finished file is checked against its sha256 before it is renamed into place; a
mismatch is deleted and reported, never kept. At the end a table (and `download_report.json`)
says what was downloaded, skipped or failed, and why; the exit code is 1 if anything failed.

URL list: one entry per line, `URL [SHA256] [FILENAME]`; blank lines and `#` comments are skipped.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import UserError

_SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")
_CHUNK = 1 << 20
_RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}


@dataclass
class Entry:
    url: str
    sha256: str | None = None
    filename: str | None = None

    @property
    def name(self) -> str:
        return self.filename or os.path.basename(urllib.parse.urlparse(self.url).path) or "index.html"


@dataclass
class Result:
    url: str
    path: str
    status: str  # "downloaded", "present" or "failed"
    bytes: int = 0
    attempts: int = 0
    resumed: bool = False
    error: str | None = None


def parse_url_list(path: str | Path) -> list[Entry]:
    entries = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read URL list ({exc})") from None
    for lineno, line in enumerate(lines, 1):
        parts = line.split("#", 1)[0].split()
        if not parts:
            continue
        url, rest = parts[0], parts[1:]
        if urllib.parse.urlparse(url).scheme not in ("http", "https"):
            raise UserError(f"{path}:{lineno}: not an http(s) URL: {url!r}")
        sha = rest.pop(0) if rest and _SHA256.match(rest[0]) else None
        if len(rest) > 1:
            raise UserError(f"{path}:{lineno}: expected `URL [SHA256] [FILENAME]`")
        if rest and ("/" in rest[0] or rest[0] in (".", "..")):
            raise UserError(f"{path}:{lineno}: file name {rest[0]!r} must not contain '/'")
        entries.append(Entry(url, sha.lower() if sha else None, rest[0] if rest else None))
    return entries


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


class _Permanent(Exception):
    """A failure retrying will not fix (404, checksum mismatch)."""


def _fetch_once(url: str, part: Path, timeout: float) -> bool:
    """One attempt to complete `part`; True if it resumed. Raises on any failure."""
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "openllama-download/1"})
    if have:
        request.add_header("Range", f"bytes={have}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # asked past the end: the part is already complete (or too long)
            return _check_complete_after_416(exc, part, have)
        if exc.code in _RETRY_STATUS:
            raise
        raise _Permanent(f"HTTP {exc.code} {exc.reason}") from None
    with response:
        resumed = have > 0 and response.status == 206
        if have and not resumed:
            have = 0  # the server sent the whole file: start over
        if resumed:
            match = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
            if not match or int(match.group(1)) != have:
                raise _Permanent(f"server answered a range request with {response.headers.get('Content-Range')!r}")
        length = response.headers.get("Content-Length")
        expected = have + int(length) if length is not None else None
        with open(part, "ab" if resumed else "wb") as out:
            while True:
                block = response.read(_CHUNK)
                if not block:
                    break
                out.write(block)
        size = part.stat().st_size
        if expected is not None and size != expected:
            raise http.client.IncompleteRead(b"", expected - size)
    return resumed


def _check_complete_after_416(exc: urllib.error.HTTPError, part: Path, have: int) -> bool:
    match = re.match(r"bytes \*/(\d+)", exc.headers.get("Content-Range", "") if exc.headers else "")
    if match and int(match.group(1)) == have:
        return True
    part.unlink(missing_ok=True)  # longer than the remote file: start over next attempt
    raise OSError("partial file did not match the remote size; starting over")


def download_one(entry: Entry, out_dir: Path, retries: int = 5, backoff: float = 1.0, timeout: float = 60.0) -> Result:
    target = out_dir / entry.name
    part = target.with_name(target.name + ".part")
    result = Result(entry.url, str(target), "failed")
    if target.exists():
        if entry.sha256 is None or sha256_file(target) == entry.sha256:
            result.status, result.bytes = "present", target.stat().st_size
            return result
        result.error = f"{target} exists with a different sha256; remove it to download again"
        return result
    for attempt in range(retries + 1):
        result.attempts = attempt + 1
        try:
            result.resumed |= _fetch_once(entry.url, part, timeout)
            break
        except _Permanent as exc:
            result.error = str(exc)
            return result
        except (OSError, http.client.HTTPException, urllib.error.URLError) as exc:
            result.error = f"{type(exc).__name__}: {exc}"
            if attempt < retries:
                time.sleep(backoff * 2**attempt)
    else:
        return result  # retries exhausted; the .part stays for a later resume
    if entry.sha256 is not None:
        got = sha256_file(part)
        if got != entry.sha256:
            part.unlink()
            result.error = f"sha256 mismatch: expected {entry.sha256}, got {got} (file deleted)"
            return result
    os.replace(part, target)
    result.status, result.bytes, result.error = "downloaded", target.stat().st_size, None
    return result


def download(entries: list[Entry], out_dir: str | Path, retries: int = 5, backoff: float = 1.0,
             timeout: float = 60.0, progress: bool = True) -> list[Result]:
    from tqdm import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise UserError(f"two URLs would both be saved as {dup!r}; give one a FILENAME in the URL list")
    results = [download_one(e, out, retries, backoff, timeout)
               for e in tqdm(entries, unit="file", desc="download", disable=not progress)]
    report = {"ok": all(r.status != "failed" for r in results), "results": [asdict(r) for r in results]}
    (out / "download_report.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    return results


def format_report(results: list[Result]) -> str:
    lines = []
    for r in results:
        extra = f" after {r.attempts} attempt(s)" + (" (resumed)" if r.resumed else "")
        lines.append(f"{r.status:10s} {r.path}  {r.bytes} bytes{extra if r.status == 'downloaded' else ''}"
                     + (f"  <- {r.url}: {r.error}" if r.status == "failed" else ""))
    failed = sum(r.status == "failed" for r in results)
    lines.append(f"{len(results) - failed} of {len(results)} ok, {failed} failed")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("url_list", help="text file: `URL [SHA256] [FILENAME]` per line")
    parser.add_argument("--out", required=True, help="download directory")
    parser.add_argument("--retries", type=int, default=5)
    parser.add_argument("--backoff", type=float, default=1.0, help="seconds before the first retry (doubles each time)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds without data before an attempt fails")
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    results = download(parse_url_list(args.url_list), args.out, args.retries, args.backoff, args.timeout,
                       progress=not args.no_progress)
    print(format_report(results))
    return 1 if any(r.status == "failed" for r in results) else 0
