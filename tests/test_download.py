"""Offline tests of download (progress, resume, retries, checksum), safe extraction and
``prepare_dataset`` end to end, against an http.server on 127.0.0.1 serving archives the
tests build."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import socket
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from defectlab.data import registry, scan_category
from defectlab.data.download import download_file, safe_extract, verify_file
from defectlab.errors import ConfigError, DatasetError, DownloadError, ResourceMissingError, UnsafeArchiveError

# --------------------------------------------------------------------------- test server


class _Server:
    """Serves ``files`` (path -> bytes). ``truncate_first``: the first GET of a path sends
    half its body and drops the connection. ``ranges``: honour Range headers."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.requests: list[tuple[str, str | None]] = []
        self.truncate_first = False
        self.ranges = True
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                rng = self.headers.get("Range")
                server.requests.append((self.path, rng))
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                start = 0
                if rng and server.ranges:
                    start = int(rng.split("=")[1].split("-")[0])
                    if start >= len(body):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(body)}")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                payload = body[start:]
                first = sum(1 for p, _ in server.requests if p == self.path) == 1
                if server.truncate_first and first:
                    self.wfile.write(payload[: len(payload) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.wfile.write(payload)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = _Server()
    yield s
    s.close()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------- download


def test_download_verifies_and_renames(server, tmp_path):
    data = os.urandom(300_000)
    server.files["/a.bin"] = data
    out = download_file(f"{server.url}/a.bin", tmp_path / "a.bin", sha256=_sha(data), progress=False)
    assert out.read_bytes() == data
    assert not (tmp_path / "a.bin.part").exists()
    # a second call finds the verified file and does not download again
    download_file(f"{server.url}/a.bin", tmp_path / "a.bin", sha256=_sha(data), progress=False)
    assert len(server.requests) == 1


def test_download_resumes_after_dropped_connection(server, tmp_path):
    data = os.urandom(3 * (1 << 20) + 123)
    server.files["/big.bin"] = data
    server.truncate_first = True
    out = download_file(f"{server.url}/big.bin", tmp_path / "big.bin", sha256=_sha(data), progress=False,
                        backoff=0.0)
    assert out.read_bytes() == data
    assert len(server.requests) == 2
    assert server.requests[0][1] is None
    resumed_at = int(server.requests[1][1].split("=")[1].rstrip("-"))
    assert 0 < resumed_at < len(data)  # the second request continued, it did not restart


def test_download_resumes_existing_part_file(server, tmp_path):
    data = os.urandom(200_000)
    server.files["/p.bin"] = data
    (tmp_path / "p.bin.part").write_bytes(data[:70_000])
    download_file(f"{server.url}/p.bin", tmp_path / "p.bin", sha256=_sha(data), progress=False)
    assert server.requests == [("/p.bin", "bytes=70000-")]
    assert (tmp_path / "p.bin").read_bytes() == data


def test_server_without_ranges_restarts_from_zero(server, tmp_path):
    data = os.urandom(100_000)
    server.files["/r.bin"] = data
    server.ranges = False
    (tmp_path / "r.bin.part").write_bytes(b"garbage" * 1000)
    download_file(f"{server.url}/r.bin", tmp_path / "r.bin", sha256=_sha(data), progress=False)
    assert (tmp_path / "r.bin").read_bytes() == data


def test_checksum_mismatch_leaves_no_output(server, tmp_path):
    server.files["/c.bin"] = b"tampered content"
    with pytest.raises(DownloadError, match="sha256 mismatch"):
        download_file(f"{server.url}/c.bin", tmp_path / "c.bin", sha256=_sha(b"original"), progress=False)
    assert list(tmp_path.iterdir()) == []


def test_size_and_md5_checked(tmp_path):
    f = tmp_path / "x"
    f.write_bytes(b"abc")
    verify_file(f, md5=hashlib.md5(b"abc").hexdigest(), size=3)
    with pytest.raises(DownloadError, match="size 3 bytes, expected 4"):
        verify_file(f, md5=hashlib.md5(b"abc").hexdigest(), size=4)
    with pytest.raises(DownloadError, match="md5 mismatch"):
        verify_file(f, md5="0" * 32)
    with pytest.raises(DownloadError, match="no checksum"):
        verify_file(f)


def test_unverified_download_needs_explicit_flag(server, tmp_path):
    server.files["/u.bin"] = b"no checksum published"
    with pytest.raises(DownloadError, match="insecure-skip-checksum"):
        download_file(f"{server.url}/u.bin", tmp_path / "u.bin", progress=False)
    assert server.requests == []
    download_file(f"{server.url}/u.bin", tmp_path / "u.bin", allow_unverified=True, progress=False)
    assert (tmp_path / "u.bin").read_bytes() == b"no checksum published"


def test_http_404_and_unreachable_host_fail_clearly(server, tmp_path):
    with pytest.raises(DownloadError, match="HTTP 404"):
        download_file(f"{server.url}/missing", tmp_path / "m", sha256="0" * 64, progress=False)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DownloadError, match="failed after 2 attempts"):
        download_file(f"http://127.0.0.1:{port}/x", tmp_path / "x", sha256="0" * 64, retries=1, backoff=0.0,
                      timeout=2, progress=False)
    with pytest.raises(DownloadError, match="only http"):
        download_file("file:///etc/passwd", tmp_path / "y", sha256="0" * 64, progress=False)


# --------------------------------------------------------------------------- safe extraction


def _tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]], mode: str = "w:gz") -> Path:
    with tarfile.open(path, mode) as tf:
        for info, data in members:
            if data is not None:
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
            else:
                tf.addfile(info)
    return path


def _file(name: str, data: bytes = b"x") -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), data


def _link(name: str, target: str, kind=tarfile.SYMTYPE) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info, None


def test_safe_extract_tar_and_zip(tmp_path):
    tar = _tar(tmp_path / "ok.tar.xz", [_file("top/a.txt", b"A"), _file("top/sub/b.txt", b"B"),
                                        _link("top/sub/link", "../a.txt")], mode="w:xz")
    out = safe_extract(tar, tmp_path / "t")
    assert (out / "top" / "a.txt").read_bytes() == b"A"
    assert (out / "top" / "sub" / "b.txt").read_bytes() == b"B"
    assert (out / "top" / "sub" / "link").resolve() == (out / "top" / "a.txt").resolve()
    zpath = tmp_path / "ok.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        zf.writestr("d/c.txt", b"C")
    assert (safe_extract(zpath, tmp_path / "z") / "d" / "c.txt").read_bytes() == b"C"


@pytest.mark.parametrize("member, message", [
    (_file("/etc/evil"), "absolute path"),
    (_file("a/../../evil"), r"contains '\.\.'"),
    (_file("C:/evil"), "absolute path"),
    (_link("a/link", "../../outside"), "symlink .* points outside"),
    (_link("a/link", "/etc/passwd"), "symlink .* points outside"),
    (_link("a/hard", "../outside", tarfile.LNKTYPE), "hardlink .* points outside"),
])
def test_malicious_tar_refused_and_nothing_written(tmp_path, member, message):
    tar = _tar(tmp_path / "bad.tar.gz", [_file("a/fine.txt"), member])
    with pytest.raises(UnsafeArchiveError, match=message):
        safe_extract(tar, tmp_path / "out" / "t")
    assert not (tmp_path / "out" / "t").exists()
    assert list((tmp_path / "out").iterdir()) == []  # no temporary leftovers either
    assert not (tmp_path / "evil").exists() and not (tmp_path / "outside").exists()


def test_device_member_refused(tmp_path):
    dev = tarfile.TarInfo("a/null")
    dev.type, dev.devmajor, dev.devminor = tarfile.CHRTYPE, 1, 3
    with pytest.raises(UnsafeArchiveError, match="device"):
        safe_extract(_tar(tmp_path / "dev.tar", [(dev, None)], mode="w"), tmp_path / "t")


@pytest.mark.parametrize("name, symlink, message", [
    ("../evil.txt", False, r"contains '\.\.'"),
    ("/abs/evil.txt", False, "absolute path"),
    ("link", True, "symlink"),
])
def test_malicious_zip_refused(tmp_path, name, symlink, message):
    zpath = tmp_path / "bad.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        zf.writestr("fine.txt", b"ok")
        info = zipfile.ZipInfo(name)
        if symlink:
            info.external_attr = (0o120777 << 16)
        zf.writestr(info, b"/etc/passwd")
    with pytest.raises(UnsafeArchiveError, match=message):
        safe_extract(zpath, tmp_path / "t")
    assert not (tmp_path / "t").exists()


def test_extract_size_limit_and_non_archive(tmp_path):
    tar = _tar(tmp_path / "big.tar", [_file("a", b"x" * 5000)], mode="w")
    with pytest.raises(UnsafeArchiveError, match="expands to 5000 bytes"):
        safe_extract(tar, tmp_path / "t", max_bytes=1000)
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"this is not an archive")
    with pytest.raises(DatasetError, match="not a tar or zip"):
        safe_extract(junk, tmp_path / "t")


# --------------------------------------------------------------------------- prepare_dataset


def _png(size=32, value=128) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _mask_png(size=32) -> bytes:
    m = np.zeros((size, size), np.uint8)
    m[8:16, 8:16] = 255
    buf = io.BytesIO()
    Image.fromarray(m).save(buf, format="PNG")
    return buf.getvalue()


def _fake_mvtec_archive(path: Path) -> Path:
    members = [_file(f"bottle/train/good/{i:03d}.png", _png(value=100 + i)) for i in range(3)]
    members += [_file("bottle/test/good/000.png", _png()), _file("bottle/test/broken_large/000.png", _png(value=30)),
                _file("bottle/ground_truth/broken_large/000_mask.png", _mask_png()),
                _file("license.txt", b"CC BY-NC-SA 4.0")]
    return _tar(path, members, mode="w:xz")


@pytest.fixture
def fake_mvtec(server, tmp_path, monkeypatch):
    archive = _fake_mvtec_archive(tmp_path / "built.tar.xz")
    data = archive.read_bytes()
    server.files["/mvtec.tar.xz"] = data
    spec = registry.REGISTRY["mvtec_ad"]
    fake = dataclasses.replace(spec, archives=(dataclasses.replace(
        spec.archives[0], url=f"{server.url}/mvtec.tar.xz", sha256=_sha(data)),))
    monkeypatch.setitem(registry.REGISTRY, "mvtec_ad", fake)
    return data


def test_prepare_downloads_verifies_extracts_converts(server, fake_mvtec, tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "prepared"
    summary = registry.prepare_dataset("mvtec_ad", raw, out, download=True, categories=["bottle"], progress=False)
    assert summary["bottle"] == {"train/good": 3, "test/good": 1, "test/broken_large": 1}
    data = scan_category(out, "bottle")
    assert len(data.train) == 3 and [s.label for s in data.test] == [1, 0]
    assert data.test[0].kind == "structural"
    assert (out / "SOURCE.json").exists()
    assert (raw / "mvtec_anomaly_detection.tar.xz").read_bytes() == fake_mvtec
    # the second run uses the extracted tree: no network, same result
    n = len(server.requests)
    registry.prepare_dataset("mvtec_ad", raw, out, download=False, categories=["bottle"], progress=False)
    assert len(server.requests) == n
    assert len(scan_category(out, "bottle").train) == 3


def test_prepare_offline_says_where_and_how(tmp_path):
    with pytest.raises(ResourceMissingError) as err:
        registry.prepare_dataset("mvtec_ad", tmp_path / "raw", tmp_path / "out", download=False)
    msg = str(err.value)
    assert "mvtec_anomaly_detection.tar.xz" in msg and str(tmp_path / "raw") in msg
    assert "defectlab download mvtec_ad" in msg
    assert not (tmp_path / "out").exists()


def test_prepare_refuses_tampered_local_archive(fake_mvtec, tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "mvtec_anomaly_detection.tar.xz").write_bytes(fake_mvtec[:-10] + b"0123456789")
    with pytest.raises(DownloadError, match="sha256 mismatch"):
        registry.prepare_dataset("mvtec_ad", raw, tmp_path / "out", download=False)
    assert not (tmp_path / "out").exists() and not (raw / "extracted").exists()


def test_dataset_without_checksum_needs_insecure_flag(server, tmp_path, monkeypatch):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for i in range(5):
            zf.writestr(f"repo-master/MT_Free/Imgs/exp{i}.jpg", _jpg())
        for d in ("Blowhole", "Break", "Crack", "Fray", "Uneven"):
            zf.writestr(f"repo-master/MT_{d}/Imgs/exp0.jpg", _jpg())
            zf.writestr(f"repo-master/MT_{d}/Imgs/exp0.png", _mask_png())
    server.files["/mtd.zip"] = buf.getvalue()
    spec = registry.REGISTRY["mtd"]
    assert spec.archives[0].sha256 is None and spec.archives[0].md5 is None
    monkeypatch.setitem(registry.REGISTRY, "mtd", dataclasses.replace(
        spec, archives=(dataclasses.replace(spec.archives[0], url=f"{server.url}/mtd.zip"),)))
    with pytest.raises(DownloadError, match="insecure-skip-checksum"):
        registry.prepare_dataset("mtd", tmp_path / "raw", tmp_path / "out", download=True, progress=False)
    assert not (tmp_path / "out").exists()
    registry.prepare_dataset("mtd", tmp_path / "raw", tmp_path / "out", download=True, insecure_skip_checksum=True,
                             progress=False)
    data = scan_category(tmp_path / "out", "magnetic_tile")
    assert len(data.train) + sum(s.label == 0 for s in data.test) == 5
    assert sorted({s.defect_type for s in data.test if s.label}) == ["blowhole", "break", "crack", "fray", "uneven"]


def _jpg(size=32) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size), 90, np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def test_unknown_dataset_lists_registry(tmp_path):
    with pytest.raises(ConfigError, match="mvtec_ad.*visa"):
        registry.prepare_dataset("mvtec", tmp_path, tmp_path / "o")


def test_registry_entries_are_complete():
    for name, spec in registry.REGISTRY.items():
        assert spec.name == name and spec.license and spec.homepage.startswith("https://")
        for a in spec.archives:
            assert a.url.startswith("https://") and a.source
            assert a.sha256 is None or (len(a.sha256) == 64 and int(a.sha256, 16) >= 0)
            assert a.md5 is None or len(a.md5) == 32
    verified = {n for n, s in registry.REGISTRY.items() if all(a.verifiable for a in s.archives)}
    assert verified == {"mvtec_ad", "mvtec_loco", "btad", "ksdd2", "visa"}


def test_cli_download_offline_error(tmp_path):
    from typer.testing import CliRunner

    from defectlab.cli import app

    result = CliRunner().invoke(app, ["download", "nonexistent", "--raw-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert "unknown dataset 'nonexistent'" in result.output
