"""Fetch public datasets' raw archives, verify their checksums, and unpack them without leaving half-written files.

Checksums. The GroupLens archives have been frozen for years; their MD5 sums are published next to them
(`ml-100k.zip.md5`, `ml-1m.zip.md5`) and their SHA-256 sums below were cross-checked against several independent
public projects that pin them. For MovieLens-100K we also pin the SHA-256 of the extracted `u.data`, `u.item` and
`u.genre` (the files recalign reads), which are always checked, so a repackaged zip (other bytes, same files) is
still accepted. Any other mismatch is a DataError and nothing is written.

Order of work: download into a temporary file beside the destination (hashing while reading), verify, extract into a
temporary folder, verify the members, then rename the folder into place.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from recalign.data.dataset import sha256_file
from recalign.data.rawfile import check_raw_file
from recalign.errors import ConfigError, DataError
from recalign.io import atomic_folder


@dataclass(frozen=True)
class Archive:
    """A downloadable zip: where it lives, what it must hash to, and which folder inside it holds the files."""

    name: str
    url: str
    sha256: str | None
    folder: str
    md5: str | None = None
    size: int | None = None
    members: dict[str, str] = field(default_factory=dict)  # file inside `folder` -> expected SHA-256


DOWNLOADS: dict[str, Archive] = {
    "movielens-100k": Archive(
        name="movielens-100k",
        url="https://files.grouplens.org/datasets/movielens/ml-100k.zip",
        sha256="50d2a982c66986937beb9ffb3aa76efe955bf3d5c6b761f4e3a7cd717c6a3229",
        md5="0e33842e24a9c977be4e0107933c0723",
        size=4_924_029,
        folder="ml-100k",
        members={"u.data": "06416e597f82b7342361e41163890c81036900f418ad91315590814211dca490",
                 "u.item": "553841ebc7de3a0fd0d6b62a204ea30c1e651aacfb2814c7a6584ac52f2c5701",
                 "u.genre": "9757e0d3e6b298159a80dd48eaf938114690e911e39af97a76949ef1663610bb"},
    ),
    "movielens-1m": Archive(
        name="movielens-1m",
        url="https://files.grouplens.org/datasets/movielens/ml-1m.zip",
        sha256="a6898adb50b9ca05aa231689da44c217cb524e7ebd39d264c56e2832f2c54e20",
        md5="c4d9eecfca2ab87c1945afe126590906",
        folder="ml-1m",
    ),
}
ALIASES = {"ml-100k": "movielens-100k", "ml-1m": "movielens-1m"}


def get_archive(name: str) -> Archive:
    """The archive registered under `name` (or an alias such as ml-100k); unknown names list the choices."""
    key = ALIASES.get(name, name)
    if key not in DOWNLOADS:
        raise ConfigError(f"unknown dataset '{name}' to download; choose one of: "
                          f"{', '.join(sorted(DOWNLOADS) + sorted(ALIASES))}")
    return DOWNLOADS[key]


def download_dataset(name: str, out_dir: str | os.PathLike, from_file: str | os.PathLike | None = None,
                     url: str | None = None, progress: bool = True) -> Path:
    """Put dataset `name`'s raw files into `out_dir` (downloaded from its official URL, `url`, or `from_file`)."""
    return fetch_archive(get_archive(name), out_dir, from_file=from_file, url=url, progress=progress)


download = download_dataset  # the CLI's name for it


def fetch_archive(archive: Archive, out_dir: str | os.PathLike, from_file: str | os.PathLike | None = None,
                  url: str | None = None, progress: bool = True) -> Path:
    """Download (or take `from_file`), verify, extract `archive.folder`'s files into `out_dir`; returns `out_dir`."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        if _complete(out, archive):
            return out  # already there and verified: nothing to do
        raise DataError("folder exists and is not empty; remove it or choose another --out", path=out)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.download-", dir=out.parent))
    try:
        if from_file is not None:
            zip_path = Path(from_file)
            if not zip_path.is_file():
                raise DataError("no such file", path=zip_path)
            check_raw_file(zip_path)  # a Git LFS pointer is named as such, not as "not a zip archive"
            digests = _hash_file(zip_path)
            where = str(zip_path)
        else:
            where = url or archive.url
            zip_path = work / PurePosixPath(where.split("?")[0]).name
            digests = _fetch(where, zip_path, progress=progress)
        mismatch = _archive_mismatch(archive, digests, where)
        if mismatch is not None and not archive.members:
            raise mismatch
        with atomic_folder(out) as staged:  # `out` is absent or empty (checked above)
            extracted = _extract(zip_path, archive.folder, staged)
            # A repackaged archive (different zip bytes) is accepted only when every pinned member file matches.
            _verify_members(archive, extracted, mismatch)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


# ---- steps ---------------------------------------------------------------------------------------------

def _fetch(url: str, target: Path, progress: bool) -> dict[str, str | int]:
    """Stream `url` into `target`, hashing on the way; network problems become DataError."""
    sha, md5, size = hashlib.sha256(), hashlib.md5(), 0
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(target, "wb") as handle:
            total = int(response.headers.get("Content-Length") or 0) or None
            with _ProgressBar(progress, total, target.name) as advance:
                for block in iter(lambda: response.read(1 << 16), b""):
                    handle.write(block)
                    sha.update(block)
                    md5.update(block)
                    size += len(block)
                    advance(len(block))
    except urllib.error.HTTPError as exc:
        raise DataError(f"download failed: HTTP {exc.code} {exc.reason}", path=url) from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DataError(f"download failed: {reason}".replace("\n", " "), path=url) from None
    return {"sha256": sha.hexdigest(), "md5": md5.hexdigest(), "size": size}


def _hash_file(path: Path) -> dict[str, str | int]:
    sha, md5 = hashlib.sha256(), hashlib.md5()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            sha.update(block)
            md5.update(block)
    return {"sha256": sha.hexdigest(), "md5": md5.hexdigest(), "size": path.stat().st_size}


def _archive_mismatch(archive: Archive, digests: dict, where: str) -> DataError | None:
    """A DataError describing how the archive differs from the registry (SHA-256, MD5, size), or None."""
    for key in ("sha256", "md5", "size"):
        expected = getattr(archive, key)
        if expected is not None and digests[key] != expected:
            return DataError(f"checksum mismatch for {archive.name}: expected {key} {expected}, got {digests[key]} "
                             f"(corrupt or different file; nothing was written)", path=where)
    return None


def _extract(zip_path: Path, folder: str, target: Path) -> Path:
    """Extract the files under `folder/` (or the archive root when `folder` is absent) into `target`."""
    try:
        with zipfile.ZipFile(zip_path) as zf:
            names = [n for n in zf.namelist() if not n.endswith("/")]
            prefix = f"{folder}/" if any(n.startswith(f"{folder}/") for n in names) else ""
            target.mkdir(parents=True, exist_ok=True)
            for name in names:
                if not name.startswith(prefix) or name.startswith("__MACOSX/"):
                    continue
                relative = PurePosixPath(name[len(prefix):])
                if relative.is_absolute() or ".." in relative.parts:
                    raise DataError(f"refusing archive member with an unsafe path {name!r}", path=zip_path)
                destination = target.joinpath(*relative.parts)
                destination.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(name) as src, open(destination, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
    except zipfile.BadZipFile as exc:
        raise DataError(f"not a zip archive ({exc})", path=zip_path) from None
    return target


def _verify_members(archive: Archive, folder: Path, archive_mismatch: DataError | None = None) -> None:
    """Check the pinned member files; on failure raise the archive-level mismatch if there was one."""
    for name, expected in archive.members.items():
        path = folder / name
        if not path.is_file():
            raise archive_mismatch or DataError(f"archive for {archive.name} lacks '{archive.folder}/{name}'",
                                                path=folder)
        got = sha256_file(path)
        if got != expected:
            raise archive_mismatch or DataError(
                f"checksum mismatch for {archive.folder}/{name}: expected sha256 {expected}, got {got}", path=path)


def _complete(folder: Path, archive: Archive) -> bool:
    """True when `folder` already holds the archive's pinned members with the right checksums."""
    return bool(archive.members) and all(
        (folder / n).is_file() and sha256_file(folder / n) == h for n, h in archive.members.items())


class _ProgressBar:
    """Context manager yielding `advance(n_bytes)`; a rich bar when `enabled`, else a no-op."""

    def __init__(self, enabled: bool, total: int | None, label: str):
        self.enabled, self.total, self.label = enabled, total, label
        self._progress = None

    def __enter__(self):
        if not self.enabled:
            return lambda n: None
        from rich.progress import (BarColumn, DownloadColumn, Progress, TimeRemainingColumn,
                                   TransferSpeedColumn)

        self._progress = Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                                  TransferSpeedColumn(), TimeRemainingColumn())
        self._progress.start()
        task = self._progress.add_task(f"download {self.label}", total=self.total)
        return lambda n: self._progress.advance(task, n)

    def __exit__(self, *exc):
        if self._progress is not None:
            self._progress.stop()
        return False
