"""One clean console: a tiny `recalign run` shows recalign's own progress only, never a library's tqdm bar.

The run (popularity, a tiny LLM SFT stage saving the merged model, RecGPT over the real MiniLM text encoder) goes
through the command line in a subprocess, so the libraries start with their progress bars on, as in `make demo`.
The control test turns recalign's silencing off and sees the bars come back: the capture would notice a leak.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

# What transformers, sentence-transformers, huggingface_hub and datasets print when their bars are on.
LIBRARY_BARS = ("Loading weights", "Writing model shards", "Batches", "Fetching", "Map:", "Tokenizing",
                "it/s]", "s/it]")

RECIPE = {
    "name": "console-tiny", "seed": 0,
    "data": {"source": "synthetic", "options": {"n_users": 24, "n_items": 30, "min_length": 4, "max_length": 8,
                                                "seed": 9}},
    "datasets": {"pretrain": [{"source": "synthetic", "options": {"n_users": 16, "n_items": 20, "min_length": 4,
                                                                  "max_length": 8, "seed": 1}}]},
    "split": {"kind": "leave_one_out"}, "eval": {"ks": [5, 10], "users": 10},
    "stages": [
        {"name": "popularity", "kind": "teacher", "params": {"model": "popularity"}},
        {"name": "llm-sft", "kind": "llm-sft", "params": {
            "model": "tiny", "train_rows": 8, "batch_size": 8, "save": "merged", "task": {"max_history": 3},
            "lora": {"r": 2, "alpha": 4, "dropout": 0.0}, "sft": {"max_steps": 1, "batch_size": 8, "max_length": 96},
            "generation": {"max_new_tokens": 4}, "grounding": {"kind": "fuzzy"}}},
        {"name": "recgpt", "kind": "recgpt", "params": {
            "text_max_tokens": 16, "tokenizer": {"epochs": 1, "hidden": 16},
            "decoder": {"n_layers": 1, "dim": 16, "n_heads": 2, "max_items": 6},
            "pretrain": {"epochs": 1, "batch_size": 8}, "finetune": {"epochs": 0},
            "beam": {"widths": [4], "extensions": 2}}},
    ],
}

RUN = textwrap.dedent("""
    import sys
    import recalign.llm.models as models
    if sys.argv[1] == "loud":  # the control: recalign's silencing switched off
        models.quiet_library_progress = lambda: None
    from recalign.cli import main
    sys.argv = ["recalign", "run", *sys.argv[2:]]
    main()
""")


def fresh_embeddings_cache(folder: Path) -> Path:
    """A recalign cache whose models come from the real one but whose text embeddings are empty, so RecGPT loads
    the sentence-transformers model and embeds for real (the "Loading weights" and "Batches" bars' moment)."""
    from recalign.llm.models import cache_root

    folder.mkdir(parents=True)
    real = cache_root()
    for entry in sorted(real.iterdir()) if real.is_dir() else []:
        if entry.name != "genrec":
            (folder / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
    return folder


def run_console(tmp_path: Path, mode: str) -> str:
    """stdout + stderr of `recalign run` on the tiny recipe, in a fresh process with library bars enabled."""
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE, sort_keys=False))
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_DISABLE_PROGRESS_BARS", "TQDM_DISABLE", "HF_DATASETS_DISABLE_PROGRESS_BARS")}
    env["RECALIGN_CACHE"] = str(fresh_embeddings_cache(tmp_path / "cache"))
    done = subprocess.run([sys.executable, "-c", RUN, mode, str(recipe), "--out", str(tmp_path / "run")],
                          capture_output=True, text=True, env=env, timeout=600)
    console = done.stdout + done.stderr
    assert done.returncode == 0, console[-3000:]
    return console


def test_a_tiny_run_prints_no_library_progress_bar(tmp_path):
    console = run_console(tmp_path, "quiet")
    leaked = [bar for bar in LIBRARY_BARS if bar in console]
    assert not leaked, f"third-party progress output {leaked} in the console:\n{console[-3000:]}"
    assert "[recgpt] done" in console and "run folder:" in console  # recalign's own lines are still there
    assert (tmp_path / "run" / "report.html").is_file()  # `recalign run` writes the page beside report.md


def test_the_capture_sees_library_bars_when_silencing_is_off(tmp_path):
    console = run_console(tmp_path, "loud")
    assert "Loading weights" in console and "Writing model shards" in console
