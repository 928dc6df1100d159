"""SPRec's report and statistics around the loop in `recalign.methods.sprec.algorithm` (docs/systems/sprec.md).

- `iteration_table` / `plot_iterations`: one row per (variant, iteration); NDCG and DivRatio over iterations.
- `compare_against_sft` / `comparison_table`: each checkpoint minus SFT on the same evaluation rows (paired
  bootstrap interval and row-swap permutation test).

The recipe stage that writes them into a run is `recalign.methods.sprec.stage`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from recalign.errors import ConfigError
from recalign.io import atomic_path, read_json
from recalign.methods.sprec.algorithm import (
    MARKER,
    checkpoint_folders,
    load_checkpoint,
    make_evaluator,
    write_jsonl,
)
from recalign.methods.sprec.config import SPRecConfig

__all__ = [
    "COMPARED_KEYS",
    "TABLE_COLUMNS",
    "compare_against_sft",
    "comparison_table",
    "iteration_table",
    "plot_iterations",
]


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

COMPARED_KEYS = ("hr@5", "ndcg@5", "div_ratio@5", "or_ratio@5", "mgu@5", "dgu@5")  # compared with SFT by default
SFT = ("sft", 0)


def compare_against_sft(config: SPRecConfig, dataset, split, work_dir: str | Path,
                        keys: tuple[str, ...] = COMPARED_KEYS, n_resamples: int = 1000, seed: int = 0,
                        progress: bool = False, log: Callable[[str], None] | None = None,
                        eval_rows: int | None = None, evaluator=None) -> list[dict]:
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
    from recalign.llm.grounding import make_grounder

    say = log or (lambda message: None)
    own_rows = eval_rows is None or eval_rows == config.eval_rows
    if not own_rows:
        config = config.model_copy(update={"eval_rows": eval_rows})
    answers_file = "eval_answers.jsonl" if own_rows else f"eval_answers_{eval_rows}rows.jsonl"
    evaluate = evaluator or make_evaluator(config, dataset, split, make_grounder(config.grounding, dataset.titles()),
                                           progress)  # `evaluator`: the one the run used (e.g. the recipe's)
    folders = checkpoint_folders(work_dir)
    if SFT not in folders:
        raise ConfigError(f"{work_dir}: no finished SFT checkpoint to compare against")
    lists: dict[tuple[str, int], torch.Tensor] = {}
    for key, folder in folders.items():
        lists[key] = _checkpoint_lists(key, folder, answers_file, evaluate, config, keys, own_rows, say)
    return _paired_comparisons(lists, evaluate, keys, n_resamples, seed)


def _checkpoint_lists(key: tuple[str, int], folder: Path, answers_file: str, evaluate, config: SPRecConfig,
                      keys: tuple[str, ...], own_rows: bool, say: Callable[[str], None]) -> torch.Tensor:
    """The top-K lists [rows, K] of one checkpoint on the evaluation rows, from its per-row answers file.

    Without that file the checkpoint is evaluated again (and, on the run's own rows, must reproduce `keys`).
    """
    rows = evaluate.rows
    path = folder / answers_file
    if not path.is_file():
        say(f"{key[0]} iteration {key[1]}: no per-row answers on these rows yet; evaluating the checkpoint")
        model, tokenizer = load_checkpoint(folder, config)
        metrics = evaluate(model, tokenizer)
        stored = read_json(folder / MARKER)
        changed = [k for k in keys if abs(metrics[k] - stored[k]) > 1e-9] if own_rows else []
        if changed:
            raise ConfigError(f"{folder}: re-evaluation does not reproduce the stored {', '.join(changed)}")
        write_jsonl(path, evaluate.answers_)
        del model
    answers = [json.loads(line) for line in path.read_text().splitlines()]
    if [a["user"] for a in answers] != rows.users.tolist():
        raise ConfigError(f"{path}: rows differ from this config's evaluation rows")
    return torch.tensor([a["top_k"] for a in answers], dtype=torch.long)


def _paired_comparisons(lists: dict[tuple[str, int], torch.Tensor], evaluate, keys: tuple[str, ...],
                        n_resamples: int, seed: int) -> list[dict]:
    """Every checkpoint but SFT against SFT: paired bootstrap intervals and permutation tests of `keys`."""
    from recalign.eval.bootstrap import paired_bootstrap, paired_permutation_test

    def on_rows(key):
        return lambda index: evaluate.score(lists[key], index)

    out = []
    for key, top_k in lists.items():
        if key == SFT:
            continue
        out.append({"variant": key[0], "iteration": key[1],
                    "bootstrap": paired_bootstrap(on_rows(key), on_rows(SFT), len(evaluate.rows), keys,
                                                  n_resamples, seed=seed),
                    "permutation": paired_permutation_test(top_k, lists[SFT], evaluate.score, keys,
                                                           n_resamples, seed=seed)})
    return out
