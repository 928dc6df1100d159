"""Downloads against a local HTTP server serving a synthetic archive: verify, extract, refuse mismatches."""

from __future__ import annotations

import functools
import hashlib
import http.server
import threading
import zipfile

import pytest

from recalign.data.download import Archive, download_dataset, fetch_archive
from recalign.errors import ConfigError, DataError

pytestmark = pytest.mark.fast  # the quick loop: `make test-fast`

U_DATA = b"1\t1\t5\t100\n1\t2\t3\t200\n2\t1\t4\t150\n"


def _make_zip(path, members):
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


@pytest.fixture()
def served(tmp_path):
    """A folder served over http://127.0.0.1:PORT/ for the duration of one test."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args, **kwargs: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _leftovers(parent):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_download_verifies_and_extracts(served, tmp_path):
    root, base = served
    zip_path = _make_zip(root / "toy.zip", {"toy/u.data": U_DATA, "toy/README": b"hello"})
    archive = Archive(name="toy", url=f"{base}/toy.zip", sha256=hashlib.sha256(zip_path.read_bytes()).hexdigest(),
                      folder="toy", members={"u.data": hashlib.sha256(U_DATA).hexdigest()})
    out = tmp_path / "raw" / "toy"
    assert fetch_archive(archive, out, progress=False) == out
    assert sorted(p.name for p in out.iterdir()) == ["README", "u.data"]
    assert (out / "u.data").read_bytes() == U_DATA
    assert _leftovers(out.parent) == []
    # a second call finds the verified files and does nothing (even with the server gone)
    assert fetch_archive(Archive(**{**archive.__dict__, "url": "http://127.0.0.1:9/none.zip"}), out,
                         progress=False) == out


def test_checksum_mismatch_writes_nothing(served, tmp_path):
    root, base = served
    _make_zip(root / "ml-100k.zip", {"ml-100k/u.data": U_DATA})
    out = tmp_path / "raw" / "ml-100k"
    with pytest.raises(DataError) as err:
        download_dataset("ml-100k", out, url=f"{base}/ml-100k.zip", progress=False)
    message = str(err.value)
    assert "checksum mismatch" in message and "50d2a982" in message and "\n" not in message
    assert not out.exists() and _leftovers(out.parent) == []


def test_from_file_and_repackaged_zip_accepted_by_member_checksums(tmp_path):
    # different zip bytes (extra file), same pinned member: accepted through the member check
    zip_path = _make_zip(tmp_path / "mine.zip", {"toy/u.data": U_DATA, "toy/extra.txt": b"x"})
    archive = Archive(name="toy", url="http://127.0.0.1:9/unused.zip", sha256="0" * 64, folder="toy",
                      members={"u.data": hashlib.sha256(U_DATA).hexdigest()})
    out = fetch_archive(archive, tmp_path / "out", from_file=zip_path, progress=False)
    assert (out / "u.data").read_bytes() == U_DATA
    # a changed member fails with the archive-level message and leaves nothing behind
    bad = _make_zip(tmp_path / "bad.zip", {"toy/u.data": U_DATA + b"3\t3\t1\t1\n"})
    with pytest.raises(DataError, match="bad.zip: checksum mismatch for toy: expected sha256 0000"):
        fetch_archive(archive, tmp_path / "out2", from_file=bad, progress=False)
    assert not (tmp_path / "out2").exists() and _leftovers(tmp_path) == []


def test_bad_inputs(served, tmp_path):
    root, base = served
    with pytest.raises(ConfigError, match="unknown dataset 'nope'.*ml-100k"):
        download_dataset("nope", tmp_path / "x")
    with pytest.raises(DataError, match="missing.zip: no such file"):
        download_dataset("ml-100k", tmp_path / "x", from_file=tmp_path / "missing.zip")
    with pytest.raises(DataError, match="HTTP 404"):
        download_dataset("ml-1m", tmp_path / "x", url=f"{base}/absent.zip", progress=False)
    (root / "junk.zip").write_bytes(b"not a zip")
    junk = Archive(name="junk", url=f"{base}/junk.zip", sha256=hashlib.sha256(b"not a zip").hexdigest(), folder="j")
    with pytest.raises(DataError, match="not a zip archive"):
        fetch_archive(junk, tmp_path / "x", progress=False)
    slip = _make_zip(root / "slip.zip", {"../evil.txt": b"x"})
    unsafe = Archive(name="slip", url=f"{base}/slip.zip", sha256=hashlib.sha256(slip.read_bytes()).hexdigest(),
                     folder="slip")
    with pytest.raises(DataError, match="unsafe path"):
        fetch_archive(unsafe, tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists() and not (tmp_path / "evil.txt").exists()
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "file").write_text("mine")
    with pytest.raises(DataError, match="not empty"):
        download_dataset("ml-100k", occupied, url=f"{base}/absent.zip", progress=False)
    assert (occupied / "file").read_text() == "mine"


def test_from_file_git_lfs_pointer_is_named(tmp_path):
    pointer = tmp_path / "ml-100k.zip"
    pointer.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:" + "0" * 64 + "\nsize 4924029\n")
    with pytest.raises(DataError, match=r"ml-100k\.zip: this is a Git LFS pointer.*git lfs pull"):
        download_dataset("ml-100k", tmp_path / "out", from_file=pointer)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ml-100k.zip"]
