"""Claims: "this row beats that row on this metric", measured user by user with a paired bootstrap interval.

A recipe lists its claims (`claims:`); each names two evaluated rows of the run (a stage, or one of a stage's
labelled evaluations: "trd:teacher"), one list metric and the expected direction. Both rows were scored on the
same users by the same evaluator, which kept their lists (`RunContext.evaluate` -> <stage>/lists/<label>.pt), so
the difference is recomputed on resampled users (the same resample for both rows) and read against its interval:

    higher     holds when the whole interval is above 0        (e.g. llm-sft above Popularity on HR@10)
    lower      holds when the whole interval is below 0        (e.g. SPRec's ORRatio below its SFT's)
    not_lower  holds unless the whole interval is below 0      (e.g. "HR not significantly lower")

Set metrics (Coverage, DivRatio, ORRatio) are not means over users, and a bootstrap resample's duplicated users
would bias them; they are judged by the paired permutation test instead (the observed direction, p < 0.05).

Stages may also report claims they checked themselves (a `claims` list in their metrics, same keys).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from recalign.errors import ConfigError

COLUMNS = ("method", "claim", "metric", "value", "baseline", "baseline_value", "difference", "interval", "verdict")


SET_METRICS = ("coverage", "div_ratio", "or_ratio")  # properties of the set of lists, not means over users
CLAIM_METRIC = r"^(hr|recall|precision|ndcg|mrr|map|coverage|div_ratio|or_ratio)@[1-9][0-9]*$|^valid_ratio$"


class ClaimConfig(BaseModel):
    """One claim of a recipe: `row` against `baseline` on `metric`, expected `expect`."""

    model_config = ConfigDict(extra="forbid")
    method: str = Field(description="the method whose claim it is, as the table shows it (e.g. SPRec)")
    claim: str = Field(description="the claim in words")
    row: str = Field(description="the evaluated row: a stage name, or stage:label for a labelled evaluation")
    baseline: str = Field(description="the row it is compared with (same forms)")
    metric: str = Field(description="a list metric: hr, recall, precision, ndcg, mrr, map, coverage, div_ratio or "
                                    "or_ratio @K (K at most the largest eval.ks), or valid_ratio",
                        pattern=CLAIM_METRIC)
    expect: Literal["higher", "lower", "not_lower"] = Field("higher", description="direction that makes it hold")


def lists_path(run_dir: Path, row: str) -> Path:
    """<run>/stages/<stage>/lists/<label>.pt of a row "stage" (label "test") or "stage:label"."""
    stage, _, label = row.partition(":")
    return run_dir / "stages" / stage / "lists" / f"{label or 'test'}.pt"


def load_lists(path: Path) -> dict:
    """The tensors an evaluation kept (weights_only: no arbitrary unpickling)."""
    import torch

    if not path.is_file():
        raise ConfigError(f"claims: {path} is missing (the row was not evaluated in this run)")
    return torch.load(path, weights_only=True)


def metric_on_rows(kept: dict, metric: str):
    """index -> {metric: value} on those rows (repeats allowed) of a kept evaluation, for a metric that is a mean
    over users (hr, recall, precision, ndcg, mrr, map @K, valid_ratio): the per-user values are computed once, as
    `score_lists` computes them (users without a known target left out), and each resample averages them."""
    from recalign.eval import metrics as m

    lists, relevant = kept["lists"], kept["relevant"]
    name, k = metric.split("@", 1)[0], metric_k(metric)
    if name == "valid_ratio":
        values = (lists >= 0).any(dim=1).double().numpy()
    else:
        functions = {"hr": m.hit_ratio, "recall": m.recall, "precision": m.precision, "ndcg": m.ndcg, "mrr": m.mrr,
                     "map": m.map_at_k}
        values = functions[name](lists, relevant, k, n_relevant=kept["n_relevant"], reduce="none").double().numpy()
    known = (relevant.reshape(len(relevant), -1) >= 0).any(dim=1).numpy()

    def means(index: np.ndarray) -> dict:
        chosen = index[known[index]]
        return {metric: float(values[chosen].mean()) if len(chosen) else 0.0}

    return means


def metric_k(metric: str) -> int:
    """The cut-off of "name@K" (1 for valid_ratio)."""
    return int(metric.split("@", 1)[1]) if "@" in metric else 1


def set_metric(kept: dict, metric: str):
    """lists -> {metric: value} for a set metric (DivRatio, ORRatio, Coverage) of a kept evaluation's rows."""
    from recalign.eval.lists import ListInputs, score_lists

    k = metric_k(metric)

    def scores(lists) -> dict:
        inputs = ListInputs(lists, kept["relevant"], int(kept["n_items"]), n_relevant=kept["n_relevant"])
        return score_lists(inputs, [k], metrics=["coverage"])

    return scores


def permutation_verdict(difference: float, p_value: float, expect: str, alpha: float = 0.05) -> str:
    """The verdict of a set metric from the paired permutation test: the observed direction, significant at
    `alpha` (`not_lower` holds unless the row is significantly lower)."""
    significant = p_value < alpha
    holds = {"higher": significant and difference > 0, "lower": significant and difference < 0,
             "not_lower": not (significant and difference < 0)}[expect]
    return "holds" if holds else "does not hold"


def verdict(low: float, high: float, expect: str) -> str:
    """"holds" or "does not hold" for an interval of row - baseline."""
    holds = {"higher": low > 0, "lower": high < 0, "not_lower": high >= 0}[expect]
    return "holds" if holds else "does not hold"


def measured_claim(method: str, claim: str, row: str, baseline: str, metric: str, expect: str, found: dict) -> dict:
    """A claims-table entry from one paired comparison `found` ({a, b, diff} with the bootstrap interval's low and
    high, or with a permutation test's p_value) and its verdict."""
    out = {"method": method, "claim": claim, "row": row, "baseline": baseline, "metric": metric, "expect": expect,
           "value": found["a"], "baseline_value": found["b"], "difference": found["diff"]}
    if "low" in found:
        return {**out, "low": found["low"], "high": found["high"],
                "verdict": verdict(found["low"], found["high"], expect)}
    return {**out, "p_value": found["p_value"], "verdict": permutation_verdict(found["diff"], found["p_value"], expect)}


def check_claim(run_dir: Path, spec: ClaimConfig, n_resamples: int = 1000, seed: int = 0) -> dict:
    """The measured claim: both values, their difference with a 95% paired-bootstrap interval (a permutation
    test's p-value for set metrics), the verdict."""
    from recalign.eval.bootstrap import paired_bootstrap, paired_permutation_test

    a, b = load_lists(lists_path(run_dir, spec.row)), load_lists(lists_path(run_dir, spec.baseline))
    if a["users"].shape != b["users"].shape or not bool((a["users"] == b["users"]).all()):
        raise ConfigError(f"claims: {spec.row} and {spec.baseline} were not scored on the same users")
    if a.get("setting") != b.get("setting"):
        raise ConfigError(f"claims: {spec.row} ({a.get('setting')}) and {spec.baseline} ({b.get('setting')}) were "
                          "scored under different settings")
    k = metric_k(spec.metric)
    if k > min(a["lists"].shape[1], b["lists"].shape[1]):
        raise ConfigError(f"claims: {spec.metric} needs lists of {k}; the rows kept "
                          f"{min(a['lists'].shape[1], b['lists'].shape[1])} (raise eval.ks)")
    if spec.metric.split("@", 1)[0] in SET_METRICS:  # not a mean over users: resampling duplicates would bias it
        found = paired_permutation_test(a["lists"], b["lists"], set_metric(a, spec.metric), [spec.metric],
                                        n_permutations=n_resamples, seed=seed)[spec.metric]
    else:
        found = paired_bootstrap(metric_on_rows(a, spec.metric), metric_on_rows(b, spec.metric), len(a["users"]),
                                 [spec.metric], n_resamples=n_resamples, seed=seed)[spec.metric]
    return {**measured_claim(spec.method, spec.claim, spec.row, spec.baseline, spec.metric, spec.expect, found),
            "n_users": int(len(a["users"]))}


def check_claims(run_dir: Path, specs: Sequence[ClaimConfig], n_resamples: int = 1000, seed: int = 0) -> list[dict]:
    """Every claim of the recipe, in order; a claim whose rows are missing reports why instead of a number."""
    out = []
    for spec in specs:
        try:
            out.append(check_claim(run_dir, spec, n_resamples, seed))
        except Exception as exc:  # one claim that cannot be measured must not cost the run its summary
            out.append({"method": spec.method, "claim": spec.claim, "row": spec.row, "baseline": spec.baseline,
                        "metric": spec.metric, "expect": spec.expect, "verdict": f"not measured: {exc}"})
    return out


def claim_cells(claim: dict) -> list[str]:
    """One table row of a claim (COLUMNS), numbers with 4 decimals."""
    def number(key: str) -> str:
        value = claim.get(key)
        return f"{value:.4f}" if isinstance(value, (int, float)) else "n/a"

    interval = f"[{claim['low']:+.4f}, {claim['high']:+.4f}]" if "low" in claim else \
        f"permutation p={claim['p_value']:.3f}" if "p_value" in claim else "n/a"
    difference = f"{claim['difference']:+.4f}" if "difference" in claim else "n/a"
    return [str(claim.get("method", "")), str(claim.get("claim", "")), str(claim.get("metric", "")),
            number("value"), str(claim.get("baseline", "")), number("baseline_value"), difference, interval,
            str(claim.get("verdict", ""))]


def claims_markdown(claims: Sequence[dict]) -> str:
    """The claims as a Markdown table (empty string when there are none)."""
    if not claims:
        return ""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell.replace("|", "/") for cell in claim_cells(c)) + " |" for c in claims]
    return "\n".join(lines)


__all__ = ["COLUMNS", "ClaimConfig", "SET_METRICS", "check_claim", "check_claims", "claim_cells", "claims_markdown",
           "lists_path", "load_lists", "measured_claim", "metric_k", "metric_on_rows", "permutation_verdict",
           "set_metric", "verdict"]
