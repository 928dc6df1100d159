"""SPRec's report, statistics and recipe-stage glue around the loop in `recalign.methods.sprec.algorithm`.

- `iteration_table` / `plot_iterations`: one row per (variant, iteration); NDCG and DivRatio over iterations.
- `compare_against_sft` / `comparison_table`: each checkpoint minus SFT on the same evaluation rows (paired
  bootstrap interval and row-swap permutation test).
- `run_stage`: the recipe stage "sprec" (work folder, the loop, report files, final adapters, flat metrics).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from recalign.errors import ConfigError
from recalign.io import atomic_path
from recalign.methods.sprec.algorithm import (
    MARKER,
    SPRecConfig,
    _load_checkpoint,
    _make_evaluator,
    _write_jsonl,
    checkpoint_folders,
)

__all__ = ["TABLE_COLUMNS", "iteration_table", "comparison_table", "plot_iterations", "compare_against_sft",
           "run_stage", "SPREC_STAGE"]


# ---- tables and plots ------------------------------------------------------------------------------------

TABLE_COLUMNS = ("hr@5", "ndcg@5", "div_ratio@5", "or_ratio@5", "mgu@5", "dgu@5", "avg_pop@5", "valid_ratio",
                 "pairs")


def iteration_table(summary: dict, columns: tuple[str, ...] = TABLE_COLUMNS) -> str:
    """Markdown table: one row per (variant, iteration)."""
    head = "| variant | iteration | " + " | ".join(columns) + " |"
    lines = [head, "|" + "---|" * (len(columns) + 2)]
    for record in summary["iterations"]:
        cells = []
        for c in columns:
            value = record.get(c)
            cells.append("" if value is None else (f"{value:.4f}" if isinstance(value, float) else str(value)))
        lines.append(f"| {record['variant']} | {record['iteration']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def comparison_table(comparisons: list[dict]) -> str:
    """Markdown: per checkpoint and metric, the difference to SFT, its 95% paired bootstrap interval (read it for
    HR/NDCG) and the permutation-test p-value (valid for every metric)."""
    keys = list(comparisons[0]["bootstrap"]) if comparisons else []
    lines = ["| variant | iteration | " + " | ".join(keys) + " |", "|" + "---|" * (len(keys) + 2)]
    for r in comparisons:
        cells = [f"{r['bootstrap'][k]['diff']:+.4f} [{r['bootstrap'][k]['low']:+.4f}, {r['bootstrap'][k]['high']:+.4f}]"
                 f" p={r['permutation'][k]['p_value']:.3f}" for k in keys]
        lines.append(f"| {r['variant']} | {r['iteration']} | " + " | ".join(cells) + " |")
    return ("Difference to SFT on the same rows: diff [95% paired bootstrap interval] p = paired permutation test\n\n"
            + "\n".join(lines) + "\n")


def plot_iterations(summary: dict, path: str | Path, metrics: tuple[str, ...] = ("ndcg@5", "div_ratio@5")) -> Path:
    """PNG of each metric over iterations, one line per variant; every variant starts from the SFT model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = summary["iterations"]
    sft = next((r for r in records if r["variant"] == "sft"), None)
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.6))
    for axis, metric in zip(np.atleast_1d(axes), metrics):
        for variant in ("dpo_random", "sprec"):
            points = sorted((r["iteration"], r[metric]) for r in records if r["variant"] == variant and metric in r)
            if sft is not None and points:
                points = [(0, sft[metric])] + points
            if points:
                xs, ys = zip(*points)
                axis.plot(xs, ys, marker="o", label={"dpo_random": "DPO (random negatives)", "sprec": "SPRec"}[variant])
        if sft is not None and metric in sft:
            axis.axhline(sft[metric], color="grey", linestyle="--", label="SFT")
        axis.set_xlabel("iteration")
        axis.set_title(metric.replace("_", " ").replace("div ratio", "DivRatio").upper().replace("DIVRATIO", "DivRatio"))
        axis.grid(alpha=0.3)
        axis.xaxis.get_major_locator().set_params(integer=True)
    np.atleast_1d(axes)[0].legend(fontsize=8)
    fig.tight_layout()
    out = Path(path)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return out


# ---- statistics: paired comparison with SFT ---------------------------------------------------------

def compare_against_sft(config: SPRecConfig, dataset, split, work_dir: str | Path,
                          keys: tuple[str, ...] = ("hr@5", "ndcg@5", "div_ratio@5", "or_ratio@5", "mgu@5", "dgu@5"),
                          n_resamples: int = 1000, seed: int = 0, progress: bool = False,
                          log: Callable[[str], None] | None = None, eval_rows: int | None = None,
                          evaluator=None) -> list[dict]:
    """(checkpoint - SFT) on the same evaluation rows, for every finished checkpoint of a run.

    `eval_rows` (optional) compares on a different number of evaluation rows than the run used (e.g. more, for
    tighter intervals): every checkpoint is then evaluated on them once, into eval_answers_<n>rows.jsonl.

    Two paired analyses: a bootstrap interval (sound for the per-row means HR and NDCG; resampling duplicates rows,
    which biases set metrics such as DivRatio) and a permutation test that swaps the two models' lists row by row
    (sound for every metric). Uses each checkpoint's eval_answers.jsonl; a checkpoint saved without one (older
    runs) is evaluated again from its adapter, and the recomputed metrics must equal the stored ones.
    Returns [{"variant", "iteration", "bootstrap": {key: {a, b, diff, low, high}},
              "permutation": {key: {a, b, diff, p_value}}}].
    """
    from recalign.eval.bootstrap import paired_bootstrap, paired_permutation_test
    from recalign.llm.grounding import make_grounder

    say = log or (lambda message: None)
    own_rows = eval_rows is None or eval_rows == config.eval_rows
    if not own_rows:
        config = config.model_copy(update={"eval_rows": eval_rows})
    answers_file = "eval_answers.jsonl" if own_rows else f"eval_answers_{eval_rows}rows.jsonl"
    evaluate = evaluator or _make_evaluator(config, dataset, split, make_grounder(config.grounding, dataset.titles()),
                                            progress)  # `evaluator`: the one the run used (e.g. the recipe's)
    folders = checkpoint_folders(work_dir)
    if ("sft", 0) not in folders:
        raise ConfigError(f"{work_dir}: no finished SFT checkpoint to compare against")
    rows = evaluate.rows
    lists: dict[tuple[str, int], torch.Tensor] = {}
    for key, folder in folders.items():
        path = folder / answers_file
        if not path.is_file():
            say(f"{key[0]} iteration {key[1]}: no per-row answers on these rows yet; evaluating the checkpoint")
            model, tokenizer = _load_checkpoint(folder, config)
            metrics = evaluate(model, tokenizer)
            stored = json.loads((folder / MARKER).read_text())
            changed = [k for k in keys if abs(metrics[k] - stored[k]) > 1e-9] if own_rows else []
            if changed:
                raise ConfigError(f"{folder}: re-evaluation does not reproduce the stored {', '.join(changed)}")
            _write_jsonl(path, evaluate.answers_)
            del model
        answers = [json.loads(line) for line in path.read_text().splitlines()]
        if [a["user"] for a in answers] != rows.users.tolist():
            raise ConfigError(f"{path}: rows differ from this config's evaluation rows")
        lists[key] = torch.tensor([a["top_k"] for a in answers], dtype=torch.long)

    def on_rows(key):
        return lambda index: evaluate.score(lists[key], index)

    out = []
    for key in folders:
        if key == ("sft", 0):
            continue
        out.append({"variant": key[0], "iteration": key[1],
                    "bootstrap": paired_bootstrap(on_rows(key), on_rows(("sft", 0)), len(rows), keys, n_resamples,
                                                  seed=seed),
                    "permutation": paired_permutation_test(lists[key], lists[("sft", 0)], evaluate.score, keys,
                                                           n_resamples, seed=seed)})
    return out
