"""Run reports: a stage scored under its own protocol is flagged as not comparable with the other rows."""

from __future__ import annotations

import json

from recalign.eval.report import protocol_note, write_report


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
