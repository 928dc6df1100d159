"""Run reports: a stage scored under its own protocol is flagged as not comparable with the other rows."""

from __future__ import annotations

import pytest
import json

from recalign.eval.report import protocol_note, write_report

pytestmark = pytest.mark.fast  # the quick loop: `make test-fast`


def test_protocol_note_names_only_stages_with_their_own_protocol():
    stages = {"pop": {"hr@10": 0.1, "protocol": "full"}, "trd": {"protocol": "trd_temporal", "hr@10": 0.4},
              "sprec": {"protocol": "sprec_rows", "hr@5": 0.03}}
    note = protocol_note(stages)
    assert note.startswith("Not comparable across rows")
    assert "trd (trd_temporal: re-ranks candidate pools" in note and "sprec (sprec_rows" in note
    assert "pop" not in note
    assert protocol_note({"pop": {"hr@10": 0.1}, "bpr": {"hr@10": 0.2, "protocol": "sampled"}}) is None


def test_report_carries_the_note_only_when_needed(tmp_path):
    def report(stages):
        (tmp_path / "metrics.json").write_text(json.dumps({"recipe": "r", "stages": stages}))
        return write_report(tmp_path).read_text()

    assert "Not comparable" not in report({"pop": {"hr@10": 0.1}})
    text = report({"pop": {"hr@10": 0.1}, "trd": {"protocol": "trd_temporal", "hr@10": 0.4}})
    assert "| trd |  | 0.4000 |" in text and "Not comparable across rows: trd (trd_temporal" in text


def test_check_columns_matches_case_insensitively_and_lists_the_choices():
    import pytest

    from recalign.errors import ConfigError
    from recalign.eval.report import check_columns

    stages = {"pop": {"hr@10": 0.1, "ndcg@10": 0.05, "model": "popularity", "exact": True},
              "bpr": {"hr@10": 0.2, "mrr@5": 0.01}}
    assert check_columns(stages, ["HR@10", " mrr@5 "]) == ["hr@10", "mrr@5"]
    with pytest.raises(ConfigError, match=r"^--columns: unknown metric 'foo@3'; available: hr@10, mrr@5, ndcg@10$"):
        check_columns(stages, ["hr@10", "foo@3"], option="--columns")
    with pytest.raises(ConfigError, match="unknown metric 'model'"):  # text and flags are not metrics
        check_columns(stages, ["model"])
    with pytest.raises(ConfigError, match="expected comma-separated metrics"):
        check_columns(stages, ["", " "])


def test_default_columns_fall_back_to_the_largest_k():
    from recalign.eval.report import choose_columns

    stages = {"a": {"avg_pop@5": 3.0, "hr@5": 0.1, "ndcg@5": 0.05, "hr@20": 0.3, "recall@20": 0.3, "coverage@20": 1}}
    assert choose_columns(stages) == ["hr@20", "recall@20"]
    assert choose_columns({"a": {"avg_pop@5": 3.0, "dgu@5": 0.1}}) == ["avg_pop@5", "dgu@5"]
    assert choose_columns({"a": {"hr@10": 0.1, "hr@20": 0.2}}) == ["hr@10"]
