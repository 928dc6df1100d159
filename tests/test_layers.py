"""The house rules hold: the import layers and method independence (.importlinter), `recalign.config` imports no
method, no function over 60 lines, no two classes with one name, settings classes named `*Config`."""

import ast
import collections
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.fast  # the quick loop: `make test-fast`

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_are_kept():
    """cli > serve > runs > recipes > methods > stages > ... > io, methods independent, and no sibling cycles."""
    lint = Path(sys.executable).with_name("lint-imports")
    command = str(lint) if lint.exists() else shutil.which("lint-imports")
    if command is None:
        pytest.skip("import-linter is not installed (pip install -e '.[test]')")
    result = subprocess.run([command, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "3 kept, 0 broken" in result.stdout


def test_config_imports_no_method():
    code = "import recalign.config, sys; print([m for m in sys.modules if m.startswith('recalign.methods')])"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


def _definitions():
    for path in sorted((ROOT / "recalign").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            yield path.relative_to(ROOT), node


def long_functions(limit: int = 60) -> list[str]:
    """Functions longer than `limit` lines (def line to last line)."""
    return [f"{path}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for path, node in _definitions() if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > limit]


def test_no_function_is_longer_than_60_lines():
    assert long_functions() == []


def test_the_length_rule_sees_a_long_function(tmp_path, monkeypatch):
    """The rule above can fail: a 61-line function in a scratch copy of the tree is reported."""
    package = tmp_path / "recalign"
    package.mkdir()
    (package / "long.py").write_text("def f():\n" + "    x = 1\n" * 60)
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert long_functions() == ["recalign/long.py:1 f (61 lines)"]


def test_class_names_are_unique_and_settings_classes_end_in_config():
    seen = collections.defaultdict(list)
    for path, node in _definitions():
        if isinstance(node, ast.ClassDef):
            seen[node.name].append(str(path))
    assert {name: paths for name, paths in seen.items() if len(paths) > 1} == {}
    assert [name for name in seen if name.endswith(("Settings", "Params", "Spec", "Options"))] == []
