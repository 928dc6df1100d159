"""Recipe claims (recalign.eval.claims): a row against a baseline on the same users, paired bootstrap, verdict."""

from __future__ import annotations

import pytest
import torch

from recalign.errors import ConfigError
from recalign.eval.claims import ClaimConfig, check_claim, check_claims, claims_markdown, verdict


def _keep(folder, stage: str, label: str, lists, targets, users=(0, 1, 2, 3), part: str = "test"):
    path = folder / "stages" / stage / "lists" / f"{label}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"users": torch.tensor(users), "lists": torch.tensor(lists), "relevant": torch.tensor(targets),
                "n_relevant": torch.ones(len(users), dtype=torch.long), "n_items": torch.tensor(10),
                "setting": {"part": part, "protocol": "full", "exclude_history": True}}, path)


TARGETS = [1, 2, 3, 4]


def test_claim_is_the_paired_difference_with_its_interval(tmp_path):
    # HR@1 by hand: the row hits users 0, 1, 2 (3/4), the baseline only user 3 (1/4): difference +0.5.
    _keep(tmp_path, "model", "test", [[1, 0], [2, 0], [3, 0], [9, 0]], TARGETS)
    _keep(tmp_path, "pop", "test", [[0, 1], [0, 2], [0, 3], [4, 0]], TARGETS)
    spec = ClaimConfig(method="m", claim="beats pop", row="model", baseline="pop", metric="hr@1")
    found = check_claim(tmp_path, spec, n_resamples=200, seed=0)
    assert found["value"] == pytest.approx(0.75) and found["baseline_value"] == pytest.approx(0.25)
    assert found["difference"] == pytest.approx(0.5)
    assert found["low"] <= 0.5 <= found["high"]
    # at K = 2 both hit users 0-2 and the row misses user 3's target at position 2: 3/4 against 4/4
    found2 = check_claim(tmp_path, spec.model_copy(update={"metric": "hr@2", "expect": "not_lower"}), 200)
    assert found2["difference"] == pytest.approx(-0.25)


def test_verdicts_read_the_interval_in_the_claimed_direction():
    assert verdict(0.01, 0.2, "higher") == "holds" and verdict(-0.01, 0.2, "higher") == "does not hold"
    assert verdict(-0.2, -0.01, "lower") == "holds" and verdict(-0.2, 0.01, "lower") == "does not hold"
    assert verdict(-0.2, 0.01, "not_lower") == "holds" and verdict(-0.2, -0.01, "not_lower") == "does not hold"


def test_rows_on_different_users_or_missing_rows_are_not_measured(tmp_path):
    _keep(tmp_path, "model", "test", [[1], [2], [3], [4]], TARGETS)
    _keep(tmp_path, "other", "teacher", [[1], [2], [3], [4]], TARGETS, users=(0, 1, 2, 5))
    spec = ClaimConfig(method="m", claim="c", row="model", baseline="other:teacher", metric="hr@1")
    with pytest.raises(ConfigError, match="same users"):
        check_claim(tmp_path, spec)
    (missing,) = check_claims(tmp_path, [spec.model_copy(update={"baseline": "absent"})])
    assert missing["verdict"].startswith("not measured") and "absent" in missing["verdict"]
    assert "| m | c | hr@1 | n/a |" in claims_markdown([missing])


def test_set_metrics_are_judged_by_the_permutation_test_and_settings_must_match(tmp_path):
    # DivRatio@2 by hand: the row recommends 8 distinct items over 4 users (8 / 8 = 1.0), the baseline 2 (2 / 8).
    _keep(tmp_path, "diverse", "test", [[1, 5], [2, 6], [3, 7], [4, 8]], TARGETS)
    _keep(tmp_path, "same", "test", [[1, 2], [1, 2], [2, 1], [1, 2]], TARGETS)
    spec = ClaimConfig(method="m", claim="more diverse", row="diverse", baseline="same", metric="div_ratio@2")
    found = check_claim(tmp_path, spec, n_resamples=200, seed=0)
    assert found["value"] == pytest.approx(1.0) and found["baseline_value"] == pytest.approx(0.25)
    assert "low" not in found and 0 < found["p_value"] <= 1  # no bootstrap interval for a set metric
    assert claims_markdown([found]).count("permutation p=") == 1
    _keep(tmp_path, "valid", "test", [[1, 5], [2, 6], [3, 7], [4, 8]], TARGETS, part="valid")
    with pytest.raises(ConfigError, match="different settings"):
        check_claim(tmp_path, spec.model_copy(update={"baseline": "valid"}))


def test_a_work_folder_changes_with_the_earlier_stages_it_reads(tmp_path):
    """A retrained toy LM (another config hash) must not resume the later stage's old checkpoints."""
    from recalign.stages import RunContext

    def folder(depends):
        ctx = RunContext(run_dir=tmp_path, stage_dir=tmp_path / "s", dataset=None, split=None, seed=0,
                         progress=False, recipe=None, depends=depends)
        return ctx.work_folder({"config": 1}, "sprec")

    assert folder({"toy-lm": "aaa"}) != folder({"toy-lm": "bbb"})
    assert folder({}) == folder({})
