"""The docs' "where is ..." tables name files and functions that exist, and no module cites reference documents
outside the repository (docs/architecture.md and docs/systems/*.md are the repository's own)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.fast  # the quick loop: `make test-fast`

ROOT = Path(__file__).resolve().parents[1]
TICKED = re.compile(r"`([^`]+)`")


def table_rows(page: Path, heading: str) -> list[list[str]]:
    """The cells of the Markdown table under the first heading that starts with `heading`."""
    lines = page.read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("#") and heading in line)
    rows = []
    for line in lines[start + 1:]:
        if line.startswith("#"):
            break
        if line.startswith("|") and not set(line) <= set("|-: "):
            rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows[1:]  # without the header row


def row_files(cell: str, base: str) -> list[Path]:
    """The files a cell names; `bprmf.py` after `recalign/teachers/popularity.py` is in the same folder."""
    files, folder = [], None
    for path in TICKED.findall(cell):
        if "<" in path or not path.endswith(".py"):
            continue
        full = Path(path) if path.startswith("recalign/") else None
        if full is None:
            full = (folder / path) if folder is not None and "/" not in path else Path(base) / path
        files.append(ROOT / full)
        folder = full.parent
    return files


def defined(name: str, files: list[Path]) -> bool:
    """Whether `name` is defined (def, class, assignment or attribute) in one of `files`."""
    pattern = re.compile(rf"^\s*(def|class)\s+{re.escape(name)}\b|^\s*{re.escape(name)}\s*[:=]", re.M)
    return any(pattern.search(file.read_text(encoding="utf-8")) for file in files if file.is_file())


def checked_tables() -> list[tuple[Path, str, str]]:
    pages = [(ROOT / "docs" / "architecture.md", "Where is", "recalign")]
    pages += [(page, "Where in the code", ".") for page in sorted((ROOT / "docs" / "systems").glob("*.md"))
              if "\n## Where in the code" in page.read_text(encoding="utf-8")]
    return pages


@pytest.mark.parametrize("page, heading, base", checked_tables(), ids=lambda v: getattr(v, "name", None))
def test_where_is_tables_name_what_exists(page, heading, base):
    missing = []
    for cells in table_rows(page, heading):
        if len(cells) < 3:
            continue
        files = row_files(cells[1], base)
        if not files:
            continue
        assert all(file.exists() for file in files), (page.name, cells[1], [str(f) for f in files])
        names = [n.split("(")[0].split(".")[-1].strip() for n in TICKED.findall(re.sub(r"\([^)]*\)", "", cells[2]))]
        missing += [f"{cells[0]}: {name}" for name in names
                    if re.fullmatch(r"[A-Za-z_]\w*", name) and not defined(name, files)]
    assert missing == []


def test_no_module_cites_a_file_outside_the_repository():
    cited = [f"{path.relative_to(ROOT)}:{n + 1}" for path in sorted((ROOT / "recalign").rglob("*.py"))
             for n, line in enumerate(path.read_text(encoding="utf-8").splitlines())
             if re.search(r"systems\.md|ARCHITECTURE\.md|anchors\.md|reference/", line)
             and "docs/systems" not in line]
    assert cited == []
