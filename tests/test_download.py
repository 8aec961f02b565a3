"""`openllama data download` against a real HTTP server on 127.0.0.1 that honours Range requests."""

from __future__ import annotations

import hashlib
import os
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from openllama import cli
from openllama.data.download import Entry, download, download_one, parse_url_list
from openllama.errors import UserError

FILES = {"a.jsonl": os.urandom(300_000), "b.txt": b"hello world\n" * 1000}


class RangeServer(ThreadingHTTPServer):
    """Serves FILES; honours `Range: bytes=N-`; drops the connection after `drop_after[name]`
    bytes the first time a file is asked for (to test resuming)."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.drop_after: dict[str, int] = {}
        self.requests: list[tuple[str, str | None]] = []


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep test output quiet
        pass

    def do_GET(self):
        name = self.path.lstrip("/")
        rng = self.headers.get("Range")
        self.server.requests.append((name, rng))
        if name not in FILES:
            self.send_error(404)
            return
        data = FILES[name]
        start = 0
        if rng:
            m = re.fullmatch(r"bytes=(\d+)-", rng)
            start = int(m.group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        cut = self.server.drop_after.pop(name, None)
        self.wfile.write(body if cut is None else body[:cut])
        if cut is not None:
            self.close_connection = True


@pytest.fixture
def server():
    srv = RangeServer()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _url(srv, name):
    return f"http://127.0.0.1:{srv.server_address[1]}/{name}"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_interrupted_download_resumes_with_a_range_request(server, tmp_path):
    server.drop_after["a.jsonl"] = 100_000
    entry = Entry(_url(server, "a.jsonl"), _sha(FILES["a.jsonl"]))
    result = download_one(entry, tmp_path, retries=3, backoff=0.01)
    assert result.status == "downloaded" and result.resumed and result.attempts == 2
    assert (tmp_path / "a.jsonl").read_bytes() == FILES["a.jsonl"]
    assert not (tmp_path / "a.jsonl.part").exists()
    assert server.requests == [("a.jsonl", None), ("a.jsonl", "bytes=100000-")]
    again = download_one(entry, tmp_path)  # present and verified: no request
    assert again.status == "present" and len(server.requests) == 2


def test_existing_part_file_is_resumed(server, tmp_path):
    (tmp_path / "b.txt.part").write_bytes(FILES["b.txt"][:5000])
    result = download_one(Entry(_url(server, "b.txt")), tmp_path, backoff=0.01)
    assert result.status == "downloaded" and result.resumed and result.attempts == 1
    assert (tmp_path / "b.txt").read_bytes() == FILES["b.txt"]


def test_checksum_mismatch_is_reported_and_not_kept(server, tmp_path):
    result = download_one(Entry(_url(server, "b.txt"), "0" * 64), tmp_path, backoff=0.01)
    assert result.status == "failed" and "sha256 mismatch" in result.error
    assert not (tmp_path / "b.txt").exists() and not (tmp_path / "b.txt.part").exists()


def test_url_list_cli_reports_failures(server, tmp_path, capsys):
    server.drop_after["b.txt"] = 10
    url_list = tmp_path / "urls.txt"
    url_list.write_text(f"# corpus files\n{_url(server, 'a.jsonl')} {_sha(FILES['a.jsonl'])}\n"
                        f"{_url(server, 'b.txt')}  {_sha(FILES['b.txt'])}  renamed.txt\n"
                        f"{_url(server, 'missing.bin')}\n"
                        f"{_url(server, 'a.jsonl')} {'f' * 64} wrong.jsonl\n")
    out = tmp_path / "dl"
    code = cli.main(["data", "download", str(url_list), "--out", str(out), "--backoff", "0.01", "--no-progress"])
    assert code == 1
    report = capsys.readouterr().out
    assert "2 of 4 ok, 2 failed" in report
    assert "missing.bin: HTTP 404" in report and "sha256 mismatch" in report
    assert (out / "renamed.txt").read_bytes() == FILES["b.txt"]
    assert sorted(p.name for p in out.iterdir()) == ["a.jsonl", "download_report.json", "renamed.txt"]
    # the 404 is permanent: one request, no retries
    assert sum(1 for name, _ in server.requests if name == "missing.bin") == 1


def test_retries_are_exhausted_on_a_dead_server(tmp_path):
    srv = RangeServer()
    port = srv.server_address[1]
    srv.server_close()  # nothing listens there now
    result = download_one(Entry(f"http://127.0.0.1:{port}/x"), tmp_path, retries=2, backoff=0.01, timeout=2)
    assert result.status == "failed" and result.attempts == 3 and "Connection refused" in result.error


def test_bad_url_list_names_the_line(tmp_path):
    path = tmp_path / "urls.txt"
    path.write_text("http://example.com/a\nftp://example.com/b\n")
    with pytest.raises(UserError, match=r"urls\.txt:2: not an http\(s\) URL"):
        parse_url_list(path)
    with pytest.raises(UserError, match="both be saved as 'a'"):
        download([Entry("http://h/a"), Entry("http://g/a")], tmp_path, progress=False)
