"""Opening raw files in one place: Git LFS pointers, fake `.gz` files, NUL bytes, UTF-16 text and bad encodings
become DataErrors.

Every source reads its raw files through `read_raw_bytes`, `read_raw_text` or `open_raw_lines` (or calls
`check_raw_file` before handing the path to pandas), so each of these mistakes gets the same one-line message that
names the file and, for text, the line.
"""

from __future__ import annotations

import gzip
import json
import os
import shlex
import zlib
from pathlib import Path
from typing import Iterator

from recalign.errors import DataError

LFS_PREFIX = b"version https://git-lfs.github.com/spec/v1"
GZIP_MAGIC = b"\x1f\x8b"
_LFS_MESSAGE = "this is a Git LFS pointer, not the data: fetch the real file (git lfs pull)"
UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")


def check_raw_file(path: str | os.PathLike) -> Path:
    """`path` as a Path after checking it is a readable file, not a Git LFS pointer, and gzip when named `.gz`."""
    path = Path(path)
    if not path.is_file():
        raise DataError("missing file" if not path.exists() else "not a file", path=path)
    try:
        with open(path, "rb") as handle:
            head = handle.read(len(LFS_PREFIX))
    except OSError as exc:
        raise DataError(f"cannot read ({exc.strerror})", path=path) from None
    _check_head(path, head)
    return path


def _check_head(path: Path, head: bytes) -> None:
    if head.startswith(LFS_PREFIX):
        raise DataError(_LFS_MESSAGE, path=path)
    if path.suffix == ".gz" and not head.startswith(GZIP_MAGIC):
        raise DataError("named .gz but not gzip-compressed", path=path)


def read_raw_bytes(path: str | os.PathLike) -> bytes:
    """The bytes of a raw file (gunzipped when named `.gz`), refusing Git LFS pointers and broken gzip."""
    path = check_raw_file(path)
    data = path.read_bytes()
    if path.suffix == ".gz":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as exc:
            raise DataError(f"broken gzip data ({exc})", path=path) from None
        if data.startswith(LFS_PREFIX):
            raise DataError(_LFS_MESSAGE, path=path)
    return data


def decode_text(data: bytes, path: Path, encoding: str = "utf-8", fallback: str | None = None) -> str:
    """Decode `data` (trying `fallback` when `encoding` fails); NUL bytes and undecodable bytes name the line."""
    nul = data.find(b"\x00")
    if nul >= 0:
        _refuse_utf16(data[:4096], path, encoding)
        raise DataError("NUL byte: a binary file, not text", path=path, line=data.count(b"\n", 0, nul) + 1)
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as exc:
        if fallback is not None:
            return data.decode(fallback)
        _refuse_utf16(data[:4096], path, encoding)
        raise DataError(f"not {encoding} text (byte {exc.start})", path=path,
                        line=data.count(b"\n", 0, exc.start) + 1) from None


def read_raw_text(path: str | os.PathLike, encoding: str = "utf-8", fallback: str | None = None) -> str:
    """The text of a raw file (see `read_raw_bytes`, `decode_text`)."""
    path = Path(path)
    return decode_text(read_raw_bytes(path), path, encoding, fallback)


def read_raw_json(path: str | os.PathLike):
    """Parse a raw JSON file (checked as `read_raw_text`); a missing file or a syntax error names file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataError("missing file", path=path)
    try:
        return json.loads(read_raw_text(path))
    except json.JSONDecodeError as exc:
        raise DataError(f"invalid JSON: {exc.msg}", path=path, line=exc.lineno) from None


def open_raw_lines(path: str | os.PathLike, encoding: str = "utf-8") -> Iterator[tuple[int, str]]:
    """(1-based line number, text) for each line of a possibly large raw file, streamed, with checked decoding."""
    path = check_raw_file(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            for number, line in enumerate(handle, start=1):
                if b"\x00" in line:
                    if number == 1:
                        _refuse_utf16(line[:4096], path, encoding)
                    raise DataError("NUL byte: a binary file, not text", path=path, line=number)
                try:
                    yield number, line.decode(encoding)
                except UnicodeDecodeError as exc:
                    if number == 1:
                        _refuse_utf16(line[:4096], path, encoding)
                    raise DataError(f"not {encoding} text (byte {exc.start} of the line)", path=path,
                                    line=number) from None
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"cannot read ({exc})", path=path) from None


def utf16_flavour(head: bytes) -> str | None:
    """"UTF-16" (with a byte-order mark), "UTF-16LE" or "UTF-16BE" (mostly ASCII text without one: a NUL byte at
    every other position and none in between) when the first bytes of a file are UTF-16 text, else None."""
    if head.startswith(UTF16_BOMS):
        return "UTF-16"
    if len(head) < 4:
        return None
    for flavour, zeros, others in (("UTF-16LE", head[1::2], head[0::2]), ("UTF-16BE", head[0::2], head[1::2])):
        if zeros.count(0) >= 0.9 * len(zeros) and others.count(0) == 0:
            return flavour
    return None


def _refuse_utf16(head: bytes, path: Path, encoding: str) -> None:
    """A DataError saying `path` is UTF-16 and how to convert it, when its first bytes `head` look so."""
    flavour = utf16_flavour(head)
    if flavour is None or encoding.lower().replace("_", "-").startswith("utf-16"):
        return
    name = shlex.quote(str(path))
    if path.suffix == ".gz":
        converted = shlex.quote(str(path.with_suffix("")) + ".utf8.gz")
        convert = f"gunzip -c {name} | iconv -f {flavour} -t UTF-8 | gzip > {converted}"
    else:
        convert = f"iconv -f {flavour} -t UTF-8 {name} > {shlex.quote(str(path) + '.utf8')}"
    raise DataError(f"UTF-16 text, not {encoding.upper()}: convert it first, e.g. `{convert}`, and use the "
                    "converted file in its place", path=path)
