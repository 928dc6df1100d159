"""Training curves: read the per-epoch `curves.jsonl` files trainers write and plot them as PNGs.

Each line of a curves.jsonl is one epoch: {"epoch", "loss", "valid_metric", "valid_value" (null on epochs without a
check), "seconds"}. `plot_curves` draws loss and the validation metric against the epoch (matplotlib, Agg backend);
`plot_run_curves` does it for every curves.jsonl under a run folder, writing curves.png beside each.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

from recalign.errors import DataError
from recalign.io import atomic_path, write_atomic

CURVES_FILE = "curves.jsonl"
CURVES_PNG = "curves.png"


class CurveLog:
    """Per-epoch training curve of one trainer: loss, the validation metric (None on epochs without a check)."""

    def __init__(self, valid_metric: str = "recall@10"):
        self.valid_metric = valid_metric
        self.rows: list[dict] = []
        self._last = time.perf_counter()

    def add(self, epoch: int, loss: float, valid_value: float | None = None) -> dict:
        """Record one finished epoch; `seconds` is the wall time since the previous record (or the start)."""
        now = time.perf_counter()
        row = {"epoch": epoch, "loss": float(loss), "valid_metric": self.valid_metric,
               "valid_value": None if valid_value is None else float(valid_value),
               "seconds": round(now - self._last, 4)}
        self._last = now
        self.rows.append(row)
        return row


def write_curves(rows: list[dict], path: str | os.PathLike) -> Path:
    """Write curve rows as JSON lines (one object per epoch), via a temp file renamed into place."""
    return write_atomic(path, "".join(json.dumps(row) + "\n" for row in rows))


def read_curves(path: str | os.PathLike) -> list[dict]:
    """The rows of a curves.jsonl file (one dict per epoch, in file order)."""
    path = Path(path)
    rows = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read training curve ({exc.__class__.__name__})") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise DataError(f"{path}:{number}: not a JSON object") from None
        if not isinstance(row, dict) or "epoch" not in row or "loss" not in row:
            raise DataError(f"{path}:{number}: expected an object with 'epoch' and 'loss'")
        rows.append(row)
    return rows


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def plot_curves(rows: list[dict], path: str | os.PathLike, title: str = "") -> Path:
    """Write a PNG with loss vs epoch (left) and the validation metric vs epoch (right, when any)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    losses = [(r["epoch"], r["loss"]) for r in rows if _finite(r.get("loss"))]
    valid = [(r["epoch"], r["valid_value"]) for r in rows if _finite(r.get("valid_value"))]
    metric = next((r.get("valid_metric") for r in rows if r.get("valid_metric")), "validation")
    panels = 2 if valid else 1
    figure, axes = plt.subplots(1, panels, figsize=(5 * panels, 3.4), squeeze=False)
    try:
        ax = axes[0][0]
        if losses:
            ax.plot(*zip(*losses), marker="o", markersize=3)
        ax.set_xlabel("epoch")
        ax.set_ylabel("training loss")
        ax.grid(alpha=0.3)
        if valid:
            ax = axes[0][1]
            ax.plot(*zip(*valid), marker="o", markersize=3, color="tab:green")
            best = max(valid, key=lambda point: point[1])
            ax.axvline(best[0], color="grey", linestyle=":", label=f"best epoch {best[0]}")
            ax.set_xlabel("epoch")
            ax.set_ylabel(f"valid {metric}")
            ax.legend(loc="lower right", fontsize=8)
            ax.grid(alpha=0.3)
        if title:
            figure.suptitle(title)
        figure.tight_layout()
        with atomic_path(path) as tmp:
            figure.savefig(tmp, format="png", dpi=100)
    finally:
        plt.close(figure)
    return Path(path)


def plot_curves_file(curves: str | os.PathLike, png: str | os.PathLike | None = None, title: str = "") -> Path:
    """Plot one curves.jsonl; the PNG goes beside it as curves.png unless `png` is given."""
    curves = Path(curves)
    target = Path(png) if png is not None else curves.with_name(CURVES_PNG)
    return plot_curves(read_curves(curves), target, title or curves.parent.name)


def plot_run_curves(run_dir: str | os.PathLike) -> list[Path]:
    """Plot every curves.jsonl under a run folder (curves.png beside each, when missing or older); returns PNGs."""
    written = []
    for curves in sorted(Path(run_dir).rglob(CURVES_FILE)):
        png = curves.with_name(CURVES_PNG)
        if not png.exists() or png.stat().st_mtime < curves.stat().st_mtime:
            rows = read_curves(curves)
            if not rows:
                continue
            plot_curves(rows, png, curves.parent.name)
        written.append(png)
    return written
