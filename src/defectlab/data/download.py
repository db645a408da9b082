"""Downloads that resume and verify, and archive extraction that cannot escape its target.

``download_file(url, dest, sha256=..., md5=..., size=...)``

* streams the body in chunks into ``dest + ".part"`` with a tqdm progress bar;
* resumes an interrupted download: an existing ``.part`` file is continued with an HTTP
  ``Range: bytes=N-`` request; a server that ignores ranges (200 instead of 206) or answers
  with a different ``Content-Range`` start makes the download restart from byte 0;
* retries network errors (exponential back-off), each retry resuming where the last stopped;
* verifies size and checksums *before* the file is renamed to ``dest``: on a mismatch the
  ``.part`` file is deleted and ``DownloadError`` is raised, so a bad download never
  becomes an archive that later steps could use.

``safe_extract(archive, target)`` (tar in any compression, or zip) first checks every
member and refuses the whole archive (``UnsafeArchiveError``, nothing written) if one
has an absolute path or drive, a ``..`` component, is a symlink or hardlink whose target
lands outside ``target`` (or any link, for zip), or is a device / FIFO. Members are then
extracted into a temporary sibling directory that is renamed onto ``target``, so an
interrupted extraction leaves nothing behind. Tar extraction additionally uses Python's
``tarfile.data_filter`` (defence in depth, and it drops set-uid bits).
"""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import stat
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath, PureWindowsPath

from defectlab.errors import DatasetError, DownloadError, UnsafeArchiveError
from defectlab.io import replace_dir

CHUNK = 1 << 20
USER_AGENT = "defectlab-downloader/1.0"


# --------------------------------------------------------------------------- checksums


def file_digests(path: str | Path, algorithms: tuple[str, ...] = ("sha256",)) -> dict[str, str]:
    """Hex digests of ``path`` for each algorithm, reading it once in 1 MiB chunks."""
    hashers = {a: hashlib.new(a) for a in algorithms}
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            for h in hashers.values():
                h.update(chunk)
    return {a: h.hexdigest() for a, h in hashers.items()}


def verify_file(
    path: str | Path, *, sha256: str | None = None, md5: str | None = None, size: int | None = None
) -> dict[str, str]:
    """Raise ``DownloadError`` unless ``path`` has the given size and digests; return the digests.

    At least one of ``sha256`` / ``md5`` must be given: a file is never 'verified' by size alone.
    """
    path = Path(path)
    if sha256 is None and md5 is None:
        raise DownloadError(f"{path}: no checksum to verify against")
    actual_size = path.stat().st_size
    if size is not None and actual_size != size:
        raise DownloadError(f"{path}: size {actual_size} bytes, expected {size} bytes")
    wanted = {a: v.lower() for a, v in (("sha256", sha256), ("md5", md5)) if v}
    got = file_digests(path, tuple(wanted))
    for algo, value in wanted.items():
        if got[algo] != value:
            raise DownloadError(f"{path}: {algo} mismatch: got {got[algo]}, expected {value}")
    return got


# --------------------------------------------------------------------------- download


def _open(url: str, start: int, timeout: float):
    headers = {"User-Agent": USER_AGENT}
    if start:
        headers["Range"] = f"bytes={start}-"
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)


def _resume_offset(resp, start: int) -> int:
    """Where the response body starts: ``start`` for a matching 206, else 0 (full body)."""
    if start and resp.status == 206:
        content_range = resp.headers.get("Content-Range", "")  # "bytes 100-199/200"
        try:
            first = int(content_range.split()[1].split("-")[0])
        except (IndexError, ValueError):
            return 0
        return start if first == start else 0
    return 0


def _total_size(resp, offset: int) -> int | None:
    content_range = resp.headers.get("Content-Range")
    if content_range and "/" in content_range and not content_range.endswith("*"):
        return int(content_range.rsplit("/", 1)[1])
    length = resp.headers.get("Content-Length")
    return offset + int(length) if length is not None else None


def download_file(
    url: str,
    dest: str | Path,
    *,
    sha256: str | None = None,
    md5: str | None = None,
    size: int | None = None,
    allow_unverified: bool = False,
    retries: int = 4,
    timeout: float = 60.0,
    backoff: float = 1.0,
    progress: bool = True,
) -> Path:
    """Download ``url`` to ``dest`` (resuming ``dest.part``), verify it, then rename into place.

    ``dest`` that already exists and verifies is returned at once. Without a checksum the call
    refuses unless ``allow_unverified`` (the CLI's ``--insecure-skip-checksum``).
    Raises ``DownloadError`` (network failure after ``retries``, HTTP error, bad checksum).
    """
    from tqdm.auto import tqdm

    dest = Path(dest)
    if not url.startswith(("http://", "https://")):
        raise DownloadError(f"{url}: only http(s) URLs are downloaded")
    if sha256 is None and md5 is None and not allow_unverified:
        raise DownloadError(
            f"{url}: no published checksum is known for this file; refusing to use it unverified "
            "(pass --insecure-skip-checksum to accept it anyway)"
        )
    if dest.exists():
        if sha256 is None and md5 is None:
            return dest
        try:
            verify_file(dest, sha256=sha256, md5=md5, size=size)
            return dest
        except DownloadError:
            dest.unlink()  # a stale or damaged file: fetch again
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    attempt = 0
    while True:
        start = part.stat().st_size if part.exists() else 0
        try:
            try:
                resp = _open(url, start, timeout)
            except urllib.error.HTTPError as err:
                if err.code == 416 and start:  # range past the end: the .part may be complete
                    break
                raise
            with resp:
                offset = _resume_offset(resp, start)
                total = _total_size(resp, offset)
                mode = "ab" if offset else "wb"
                with open(part, mode) as f, tqdm(
                    total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
                    desc=dest.name, disable=not progress, leave=False,
                ) as bar:
                    for chunk in iter(lambda: resp.read(CHUNK), b""):
                        f.write(chunk)
                        bar.update(len(chunk))
            got = part.stat().st_size
            if total is not None and got < total:
                raise ConnectionError(f"connection closed at {got} of {total} bytes")
            break
        except urllib.error.HTTPError as err:
            if 400 <= err.code < 500 and err.code not in (408, 429):
                raise DownloadError(f"{url}: HTTP {err.code} {err.reason}") from None
            problem: Exception = err
        except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError, OSError) as err:
            problem = err
        attempt += 1
        if attempt > retries:
            raise DownloadError(
                f"{url}: download failed after {retries + 1} attempts ({problem}); "
                f"partial data kept in {part} and resumed next time"
            ) from None
        time.sleep(backoff * 2 ** (attempt - 1))
    if sha256 is not None or md5 is not None:
        try:
            verify_file(part, sha256=sha256, md5=md5, size=size)
        except DownloadError as err:
            part.unlink(missing_ok=True)
            raise DownloadError(f"{url}: downloaded file rejected, {err}") from None
    os.replace(part, dest)
    return dest


# --------------------------------------------------------------------------- safe extraction


def _member_path(name: str, archive: Path) -> PurePosixPath:
    """The member's path relative to the target, or ``UnsafeArchiveError``."""
    if "\x00" in name:
        raise UnsafeArchiveError(f"{archive}: member {name!r} has a NUL byte in its name")
    win = PureWindowsPath(name)
    if name.startswith(("/", "\\")) or win.drive or win.root:
        raise UnsafeArchiveError(f"{archive}: member {name!r} has an absolute path")
    parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchiveError(f"{archive}: member {name!r} contains '..'")
    return PurePosixPath(*parts) if parts else PurePosixPath(".")


def _inside(rel: PurePosixPath) -> bool:
    """Whether a relative path (possibly with '..') stays inside the target once normalised."""
    depth = 0
    for part in rel.parts:
        depth += -1 if part == ".." else (0 if part == "." else 1)
        if depth < 0:
            return False
    return True


def _check_tar(tf: tarfile.TarFile, archive: Path) -> list[tarfile.TarInfo]:
    members = tf.getmembers()
    for m in members:
        rel = _member_path(m.name, archive)
        if m.ischr() or m.isblk() or m.isfifo() or m.isdev():
            raise UnsafeArchiveError(f"{archive}: member {m.name!r} is a device or FIFO")
        if m.issym():
            link = m.linkname
            if link.startswith("/") or PureWindowsPath(link).drive or not _inside(rel.parent / link):
                raise UnsafeArchiveError(
                    f"{archive}: symlink {m.name!r} -> {link!r} points outside the target"
                )
        elif m.islnk():
            link = m.linkname
            if link.startswith("/") or not _inside(PurePosixPath(link)):
                raise UnsafeArchiveError(
                    f"{archive}: hardlink {m.name!r} -> {link!r} points outside the target"
                )
        elif not (m.isfile() or m.isdir()):
            raise UnsafeArchiveError(f"{archive}: member {m.name!r} has an unsupported type")
    return members


def _check_zip(zf: zipfile.ZipFile, archive: Path) -> list[zipfile.ZipInfo]:
    infos = zf.infolist()
    for info in infos:
        _member_path(info.filename, archive)
        mode = info.external_attr >> 16
        if stat.S_ISLNK(mode):
            raise UnsafeArchiveError(f"{archive}: member {info.filename!r} is a symlink")
        if stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):  # 0: no type recorded
            raise UnsafeArchiveError(f"{archive}: member {info.filename!r} is not a regular file")
    return infos


def safe_extract(archive: str | Path, target: str | Path, *, max_bytes: int | None = None) -> Path:
    """Extract a tar (any compression) or zip ``archive`` into ``target`` (replaced atomically).

    Every member is checked before anything is written; one unsafe member refuses the whole
    archive with ``UnsafeArchiveError``. ``max_bytes`` bounds the total uncompressed size
    (zip-bomb guard). Returns ``target``.
    """
    archive, target = Path(archive), Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if zipfile.is_zipfile(archive):
        kind = "zip"
    elif tarfile.is_tarfile(archive):
        kind = "tar"
    else:
        raise DatasetError(archive, "not a tar or zip archive (or damaged)")
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".extract", dir=target.parent))
    try:
        if kind == "zip":
            with zipfile.ZipFile(archive) as zf:
                infos = _check_zip(zf, archive)
                total = sum(i.file_size for i in infos)
                if max_bytes is not None and total > max_bytes:
                    raise UnsafeArchiveError(f"{archive}: expands to {total} bytes (limit {max_bytes})")
                for info in infos:
                    zf.extract(info, tmp)
        else:
            with tarfile.open(archive, "r:*") as tf:
                members = _check_tar(tf, archive)
                total = sum(m.size for m in members if m.isfile())
                if max_bytes is not None and total > max_bytes:
                    raise UnsafeArchiveError(f"{archive}: expands to {total} bytes (limit {max_bytes})")
                try:
                    tf.extractall(tmp, members=members, filter="data")
                except tarfile.FilterError as err:  # pragma: no cover - our checks run first
                    raise UnsafeArchiveError(f"{archive}: {err}") from None
        replace_dir(tmp, target)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError) as err:
        raise DatasetError(archive, f"damaged archive ({err})") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
