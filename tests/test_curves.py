"""Training curves: every trainer writes one row per epoch; curves.jsonl files become PNGs."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from recalign.data.dataset import build_dataset
from recalign.errors import DataError
from recalign.eval.curves import CurveLog, plot_curves_file, plot_run_curves, read_curves, write_curves
from recalign.teachers.bprmf import BPRMF
from recalign.teachers.sasrec import SASRec

pytestmark = pytest.mark.fast  # the quick loop: `make test-fast`

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def grouped():
    """120 users in 4 taste groups of 10 items each; each user saw 8 items of their group, in a random order."""
    rng = np.random.default_rng(0)
    rows = []
    for u in range(120):
        items = rng.choice(10, size=8, replace=False) + 10 * (u % 4)
        rows += [(f"u{u}", f"i{i}", t) for t, i in enumerate(items)]
    frame = pd.DataFrame(rows, columns=["user", "item", "timestamp"])
    dataset = build_dataset(frame, name="grouped", source="test")
    order = dataset.interactions.sort_values(["user_id", "timestamp"], kind="stable")
    last = order.groupby("user_id").cumcount(ascending=False)
    return dataset, order[last >= 1], order[last == 0]


def test_curve_log_rows_and_jsonl_round_trip(tmp_path):
    log = CurveLog("ndcg@10")
    log.add(1, 0.7)
    log.add(2, 0.5, 0.25)
    assert [r["epoch"] for r in log.rows] == [1, 2]
    assert log.rows[0]["valid_value"] is None and log.rows[1]["valid_value"] == 0.25
    assert all(r["valid_metric"] == "ndcg@10" and r["seconds"] >= 0 for r in log.rows)
    path = write_curves(log.rows, tmp_path / "curves.jsonl")
    lines = path.read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[1])["loss"] == 0.5
    assert read_curves(path) == log.rows


@pytest.mark.parametrize("model", ["bprmf", "sasrec"])
def test_trainers_write_one_row_per_epoch_with_a_falling_loss(grouped, model, tmp_path):
    dataset, train, valid = grouped
    if model == "bprmf":
        teacher = BPRMF(dim=8, epochs=12, lr=0.05, batch_size=256, patience=100)
    else:
        teacher = SASRec(dim=16, blocks=1, max_len=8, epochs=12, lr=0.01, batch_size=32, negatives=16,
                         patience=100, dropout=0.0)
    teacher.fit(dataset, train, valid, progress=False)
    rows = teacher.curve_
    assert [r["epoch"] for r in rows] == list(range(1, 13))
    assert rows[-1]["loss"] < 0.7 * rows[0]["loss"], [r["loss"] for r in rows]
    assert all(r["valid_metric"] == "recall@10" and 0.0 <= r["valid_value"] <= 1.0 for r in rows)
    png = plot_curves_file(write_curves(rows, tmp_path / "curves.jsonl"))
    assert png == tmp_path / "curves.png" and png.read_bytes()[:8] == PNG_MAGIC


def test_plot_run_curves_finds_every_curve_file(tmp_path):
    rows = [{"epoch": e, "loss": 1.0 / e, "valid_metric": "recall@10", "valid_value": None, "seconds": 0.1}
            for e in (1, 2, 3)]
    write_curves(rows, tmp_path / "stages" / "a" / "curves.jsonl")
    write_curves(rows, tmp_path / "stages" / "b" / "teacher" / "curves.jsonl")
    (tmp_path / "stages" / "c").mkdir()
    (tmp_path / "stages" / "c" / "curves.jsonl").write_text("")  # an empty curve: nothing to plot
    pngs = plot_run_curves(tmp_path)
    assert pngs == [tmp_path / "stages" / "a" / "curves.png", tmp_path / "stages" / "b" / "teacher" / "curves.png"]
    assert all(p.read_bytes()[:8] == PNG_MAGIC for p in pngs)
    assert plot_run_curves(tmp_path) == pngs  # up to date: nothing redrawn, same list


def test_a_broken_curve_file_is_a_data_error(tmp_path):
    path = tmp_path / "curves.jsonl"
    path.write_text('{"epoch": 1, "loss": 0.5}\nnot json\n')
    with pytest.raises(DataError, match=r"curves.jsonl:2"):
        read_curves(path)
    path.write_text('{"epoch": 1}\n')
    with pytest.raises(DataError, match="'loss'"):
        read_curves(path)
