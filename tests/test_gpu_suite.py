"""benchmarks/gpu_suite.py --tiny: the GPU suite's code path on CPU (tiny random Llama), then a resuming second call."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_suite.py"
PARTS = {"reclmgen", "sprec", "trackrec", "compare-llm"}
DATA = ROOT.parent / "shared" / "data"


def _run(*args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], check=False, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
@pytest.mark.skipif(not (DATA / "ml-100k").is_dir() or not (DATA / "goodreads-sprec").is_dir(),
                    reason="needs ../shared/data/ml-100k and goodreads-sprec")
def test_tiny_suite_runs_every_part_then_resumes_them_all(tmp_path):
    out = tmp_path / "suite"
    first = _run("--tiny", "--out", str(out), "--quiet", timeout=600)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "planned budget per part" in first.stdout
    result = json.loads((out / "gpu_suite.json").read_text())
    assert result["tiny"] is True and set(result["parts"]) == PARTS
    for name, part in result["parts"].items():
        assert part["status"] == "ran" and part["headline"] and part["verdict"], name
        assert (out / name / "metrics.json").is_file() and (out / name / "gpu_suite_part.json").is_file()
    assert set(result["parts"]["reclmgen"]["verdict"]) == {"PPO", "GRPO"}
    assert set(result["parts"]["trackrec"]["verdict"]) == {"dcnv2", "deepfm", "din"}

    second = _run("--tiny", "--out", str(out), "--quiet", timeout=120)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    again = json.loads((out / "gpu_suite.json").read_text())
    assert {p["status"] for p in again["parts"].values()} == {"already done"} and set(again["parts"]) == PARTS
    assert second.stdout.count("already done") >= 2 * len(PARTS)  # in the plan and in the run
    assert again["wall_seconds_this_call"] < 30


def test_refuses_without_cuda_unless_tiny(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    refused = _run("--out", str(tmp_path / "suite"), timeout=120)
    assert refused.returncode == 2
    assert refused.stderr.strip().count("\n") == 0 and "CUDA is not available" in refused.stderr
    assert not (tmp_path / "suite").exists()
