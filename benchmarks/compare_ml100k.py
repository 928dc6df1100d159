"""Every method side by side on MovieLens-100K: `recipes/compare-ml100k.yaml`, then a JSON table and a PNG.

Popularity, BPR-MF, SASRec, TRD over BPR-MF, TRD over SASRec and SmolLM2-135M SFT are scored by the same
full-ranking list evaluator on the same 200 seeded leave-one-out test users (every row carries the same
`users_hash`). The run folder is resumable: a finished stage is not recomputed.

    .venv/bin/python benchmarks/compare_ml100k.py                    # runs (or resumes) runs/compare-ml100k
    .venv/bin/python benchmarks/compare_ml100k.py --run DIR --no-run # only tabulate a finished run

Writes benchmarks/results/compare_ml100k.json and compare_ml100k.png (NDCG@10 against DivRatio@10 per method).
Data is read in place from ../shared/data/ml-100k (never copied into the repository).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from recalign.recipes import load_recipe  # noqa: E402
from recalign.runs import run_recipe  # noqa: E402

RECIPE = ROOT / "recipes" / "compare-ml100k.yaml"
OUT = ROOT / "benchmarks" / "results"
COLUMNS = ["hr@10", "ndcg@10", "recall@10", "mrr@10", "div_ratio@10", "avg_pop@10", "coverage@10", "valid_ratio",
           "valid_title_rate"]


def tabulate(summary: dict) -> list[dict]:
    """One row per stage: its label, users, the reported metrics and the stage's wall time."""
    rows = []
    for name, metrics in summary["stages"].items():
        rows.append({"stage": name, "model": metrics.get("model", metrics.get("kind")),
                     "n_users": metrics.get("n_users"), "users_hash": metrics.get("users_hash"),
                     "protocol": metrics.get("protocol"), "seconds": metrics.get("stage_seconds"),
                     **{c: metrics.get(c) for c in COLUMNS}})
    return rows


def plot(rows: list[dict], path: Path) -> None:
    """NDCG@10 (accuracy) against DivRatio@10 (diversity), one labelled point per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for row in rows:
        if row["ndcg@10"] is None or row["div_ratio@10"] is None:
            continue
        ax.scatter(row["div_ratio@10"], row["ndcg@10"], s=40)
        ax.annotate(row["stage"], (row["div_ratio@10"], row["ndcg@10"]), textcoords="offset points",
                    xytext=(5, 4), fontsize=9)
    ax.set_xlabel("DivRatio@10 (distinct items / list slots)")
    ax.set_ylabel("NDCG@10")
    ax.set_title("MovieLens-100K, leave-one-out, same 200 test users")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=ROOT / "runs" / "compare-ml100k", help="run folder")
    parser.add_argument("--no-run", action="store_true", help="only tabulate an existing run folder")
    parser.add_argument("--out", type=Path, default=OUT, help="folder for the JSON and PNG")
    args = parser.parse_args()

    started = time.perf_counter()
    if args.no_run:
        summary = json.loads((args.run / "metrics.json").read_text())
    else:
        summary = run_recipe(load_recipe(RECIPE), args.run)
    rows = tabulate(summary)
    hashes = {row["users_hash"] for row in rows}
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"date": time.strftime("%Y-%m-%d"), "recipe": str(RECIPE.relative_to(ROOT)), "run": str(args.run),
              "same_users_for_every_row": len(hashes) == 1, "rows": rows,
              "wall_seconds_this_call": round(time.perf_counter() - started, 1),
              "stage_seconds_total": round(sum(r["seconds"] or 0 for r in rows), 1)}
    (args.out / "compare_ml100k.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(rows, args.out / "compare_ml100k.png")

    table = Table(title="MovieLens-100K: every method on the same test users (full ranking, history excluded)")
    for column in ["stage", "users", *COLUMNS, "seconds"]:
        table.add_column(column)
    for row in rows:
        table.add_row(row["stage"], str(row["n_users"]),
                      *["-" if row[c] is None else f"{row[c]:.4f}" for c in COLUMNS],
                      "-" if row["seconds"] is None else f"{row['seconds']:.0f}")
    Console().print(table)
    print(f"same users for every row: {result['same_users_for_every_row']} ({', '.join(map(str, hashes))}); "
          f"stage time {result['stage_seconds_total']:.0f} s; wrote {args.out / 'compare_ml100k.json'} and .png")


if __name__ == "__main__":
    main()
