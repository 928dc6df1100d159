"""Reading delimited raw files with errors that name the file, the line and the field."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pandas as pd

from recalign.errors import DataError


def read_delimited(path: Path, sep: str, columns: list[str], *, numeric: tuple[str, ...] = (),
                   encoding: str = "utf-8", min_columns: int | None = None, header: bool = False) -> pd.DataFrame:
    """Read a delimited file as strings; check the column count and numeric fields per line.

    `header=True` skips the first line (RecBole atomic files); `columns` always names the fields.
    `sep` may be several characters (MovieLens-1M's '::'): it is rewritten to a tab first so the fast C parser runs.
    Lines with fewer than `min_columns` (default: all) fields, or a non-numeric value in a `numeric` column, raise
    DataError naming path:line and the field.
    """
    original_sep = sep
    try:
        text = path.read_text(encoding=encoding)
    except UnicodeDecodeError as exc:
        raise DataError(f"not {encoding} text (byte {exc.start})", path=path) from None
    if len(sep) > 1:
        if "\t" in text:
            text = text.replace("\t", " ")
        text = text.replace(sep, "\t")
        sep = "\t"
    need = len(columns) if min_columns is None else min_columns
    shown = "tab" if original_sep == "\t" else repr(original_sep)
    try:
        frame = pd.read_csv(io.StringIO(text), sep=sep, header=None, names=columns, dtype=str,
                            keep_default_na=False, quoting=3, engine="c", skip_blank_lines=True,
                            skiprows=1 if header else None)
    except pd.errors.ParserError as exc:
        match = re.search(r"line (\d+)", str(exc))
        line = int(match.group(1)) + int(header) if match else None
        raise DataError(f"expected {len(columns)} {shown}-separated fields ({', '.join(columns)})",
                        path=path, line=line) from None

    def line_of(row: int) -> int:
        # only computed on error: a Python pass over the lines costs time on big files
        return int(_line_numbers(text, skip=int(header))[row])
    if need and len(frame):
        short = frame[columns[need - 1]].isna() | (frame[columns[need - 1]] == "")
        if short.any():
            row = int(np.flatnonzero(short.to_numpy())[0])
            raise DataError(f"expected {need} {shown}-separated fields", path=path, line=line_of(row),
                            field=columns[need - 1])
    for name in numeric:
        values = pd.to_numeric(frame[name], errors="coerce")
        bad = values.isna().to_numpy()
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise DataError(f"expected a number, got {frame[name].iloc[row]!r}", path=path,
                            line=line_of(row), field=name)
        frame[name] = values
    return frame


def _line_numbers(text: str, skip: int = 0) -> np.ndarray:
    """1-based file line number of each non-blank line after the first `skip` lines (pandas skips blank lines)."""
    lines = text.split("\n")
    return np.asarray([i + 1 for i, line in enumerate(lines) if i >= skip and line.strip() != ""], dtype=np.int64)
