"""Downloads against a local HTTP server on 127.0.0.1 (never the internet)."""

import hashlib
import io
import json
import subprocess
import sys
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from sd4match.data.check import check_dataset
from sd4match.errors import DataError
from sd4match.data.download import EXTRACT_PREFIX, DownloadError, Source, download


class Server:
    """Serves ``files`` (name -> bytes) with HTTP Range support; can cut a response short."""

    def __init__(self, files):
        self.files = dict(files)
        self.requests = []  # (path, Range header or None)
        self.cut_after = None  # bytes to send before dropping the next full response
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                name = self.path.lstrip("/")
                rng = self.headers.get("Range")
                outer.requests.append((name, rng))
                data = outer.files.get(name)
                if data is None:
                    self.send_error(404)
                    return
                start = int(rng.split("=")[1].split("-")[0]) if rng else 0
                if start >= len(data):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.end_headers()
                    return
                body = data[start:]
                self.send_response(206 if rng else 200)
                if rng:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if outer.cut_after is not None:
                    self.wfile.write(body[: outer.cut_after])
                    outer.cut_after = None
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def spair_archive(spair_with_images: Path) -> bytes:
    """A small SPair-71k.tar.gz in the official layout (top folder SPair-71k/)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        t.add(spair_with_images, arcname="SPair-71k")
    return buf.getvalue()


@pytest.fixture
def served(spair_with_images):
    data = spair_archive(spair_with_images)
    srv = Server({"SPair-71k.tar.gz": data})
    yield srv, data
    srv.close()


def source(srv, data, **kw):
    kw.setdefault("sha256", hashlib.sha256(data).hexdigest())
    return Source(f"{srv.url}/SPair-71k.tar.gz", "SPair-71k.tar.gz", "tar", strip="SPair-71k", size=len(data), **kw)


def test_download_extract_check_and_idempotent(tmp_path, served):
    srv, data = served
    root = tmp_path / "download" / "SPair-71k"
    download("spair", root, sources=[source(srv, data)], progress=False)
    assert check_dataset("spair", root).ok
    assert not list(root.glob(EXTRACT_PREFIX + "*"))
    done = json.loads((root / ".sd4match-downloads/done.json").read_text())
    assert done["SPair-71k.tar.gz"]["sha256"] == hashlib.sha256(data).hexdigest()
    assert not (root / ".sd4match-downloads/SPair-71k.tar.gz").exists()  # archive removed after extraction
    n = len(srv.requests)
    download("spair", root, sources=[source(srv, data)], progress=False)
    assert len(srv.requests) == n  # second run: nothing fetched


def test_resume_after_dropped_connection(tmp_path, served):
    srv, data = served
    root = tmp_path / "download" / "SPair-71k"
    srv.cut_after = len(data) // 3
    with pytest.raises(DownloadError, match="run again to resume"):
        download("spair", root, sources=[source(srv, data)], progress=False)
    part = root / ".sd4match-downloads/SPair-71k.tar.gz.part"
    assert part.stat().st_size == len(data) // 3
    assert not (root / "JPEGImages").exists()
    download("spair", root, sources=[source(srv, data)], progress=False)
    assert srv.requests[-1] == ("SPair-71k.tar.gz", f"bytes={len(data) // 3}-")
    assert check_dataset("spair", root).ok


def test_checksum_mismatch_extracts_nothing(tmp_path, served):
    srv, data = served
    root = tmp_path / "download" / "SPair-71k"
    with pytest.raises(DownloadError, match="does not match the expected"):
        download("spair", root, sources=[source(srv, data, sha256="0" * 64)], progress=False)
    assert not (root / "JPEGImages").exists() and not (root / "Layout").exists()
    assert not list((root / ".sd4match-downloads").glob("SPair-71k.tar.gz*"))


@pytest.mark.parametrize("crash_at", [1, 5])
def test_crash_during_extraction_never_passes_check(tmp_path, served, monkeypatch, crash_at):
    srv, data = served
    root = tmp_path / "download" / "SPair-71k"
    real_replace = Path.replace
    moved = []

    def crashing_replace(self, target):
        if self.parent.name.startswith(EXTRACT_PREFIX) or self.parent.parent.name.startswith(EXTRACT_PREFIX):
            moved.append(self.name)
            if len(moved) == crash_at:  # of the five top-level entries
                raise KeyboardInterrupt("simulated crash")
        return real_replace(self, target)

    monkeypatch.setattr(Path, "replace", crashing_replace)
    with pytest.raises(KeyboardInterrupt):
        download("spair", root, sources=[source(srv, data)], progress=False)
    monkeypatch.setattr(Path, "replace", real_replace)
    with pytest.raises(DataError, match=r"\.sd4match-extract-.*: interrupted extraction"):
        check_dataset("spair", root)
    download("spair", root, sources=[source(srv, data)], progress=False)
    assert check_dataset("spair", root).ok


def test_unsafe_archive_is_refused(tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("../evil.txt", "x")
    data = buf.getvalue()
    srv = Server({"evil.zip": data})
    try:
        with pytest.raises(DownloadError, match="unsafe path"):
            download("pfwillow", tmp_path / "r", sources=[Source(f"{srv.url}/evil.zip", "evil.zip", "zip")], progress=False)
    finally:
        srv.close()
    assert not (tmp_path / "evil.txt").exists()


def test_cli_download_from_mirror(tmp_path, willow_root):
    """PF-Willow as published: PF-dataset.zip (top folder PF-dataset/) plus test_pairs.csv."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for p in sorted((willow_root / "PF-dataset").rglob("*")):
            if p.is_file():
                z.write(p, p.relative_to(willow_root).as_posix())
    srv = Server({"PF-dataset.zip": buf.getvalue(), "test_pairs.csv": (willow_root / "test_pairs.csv").read_bytes()})
    root = tmp_path / "pf-willow"
    try:
        p = subprocess.run([sys.executable, "-m", "sd4match", "download", "pfwillow", "--root", str(root), "--mirror", srv.url, "--no-progress"], capture_output=True, text=True)
    finally:
        srv.close()
    assert p.returncode == 0, p.stderr
    p = subprocess.run([sys.executable, "-m", "sd4match", "datasets", "check", "--dataset", "pfwillow", "--root", str(root)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "450 pairs" in p.stdout


def _zip(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
    return buf.getvalue()


@pytest.mark.parametrize("wrong, says", [
    (_zip({"x.txt": b"hello"}), r"not the expected archive: it has no PF-dataset \(it holds x\.txt\)"),
    (b"<html>moved</html>", r"cannot extract \(File is not a zip file\)"),
])
def test_wrong_archive_is_removed_not_recorded(tmp_path, willow_root, wrong, says):
    """A mirror that serves another file under PF-dataset.zip: nothing of it is placed or
    recorded as done, so the run with the right file fetches it again and completes."""
    pairs = (willow_root / "test_pairs.csv").read_bytes()
    root = tmp_path / "pf-willow"
    srv = Server({"PF-dataset.zip": wrong, "test_pairs.csv": pairs})
    try:
        with pytest.raises(DownloadError, match=r"PF-dataset\.zip \(from http://127.*\): " + says + "; the file was removed, run again"):
            download("pfwillow", root, mirror=srv.url, progress=False)  # the published sources' expectations
    finally:
        srv.close()
    assert sorted(p.name for p in root.iterdir()) == [".sd4match-downloads"]  # no x.txt, no extraction folder
    assert list((root / ".sd4match-downloads").iterdir()) == []  # archive removed, nothing recorded as done
    right = {p.relative_to(willow_root).as_posix(): p.read_bytes() for p in (willow_root / "PF-dataset").rglob("*") if p.is_file()}
    srv = Server({"PF-dataset.zip": _zip(right), "test_pairs.csv": pairs})
    try:
        download("pfwillow", root, mirror=srv.url, progress=False)
    finally:
        srv.close()
    assert check_dataset("pfwillow", root).ok


def test_unreachable_server_is_one_line(tmp_path):
    p = subprocess.run(
        [sys.executable, "-m", "sd4match", "download", "pfwillow", "--root", str(tmp_path / "r"), "--mirror", "http://127.0.0.1:9", "--no-progress"],
        capture_output=True, text=True,
    )
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "cannot connect" in p.stderr
    assert "nothing was downloaded" in p.stderr and "partial download" not in p.stderr  # nothing came: no partial file is claimed
