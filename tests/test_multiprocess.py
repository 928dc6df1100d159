"""Multi-process training (issue 14, acceptance 3): two accelerate CPU processes (gloo) with per-process batch b
follow the same loss trajectory (within 1e-4) as one process with batch 2b, for SFT and for DPO on the tiny Llama.

The file is also the worker: `accelerate launch --cpu --num_processes N tests/test_multiprocess.py OUT B` trains
SFT then DPO (LoRA, dropout 0, examples in order) with per-process batch B and rank 0 writes the losses to OUT.
With examples in order, step k of one process with batch 2b sees examples [2bk, 2bk + 2b); with two processes
accelerate hands rank r the batch [2bk + rb, 2bk + rb + b): the same union. SFT answers have different lengths, so
a per-process token mean would differ from the global one: the Trainer's token count across processes must be used.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

STEPS, BATCH = 3, 2  # 3 optimizer steps; per-process batch b = 2 (one process: 2b = 4)
TITLES = ["Dune", "Emma", "Ulysses", "Beloved", "Hamlet", "Walden", "Middlemarch", "Persuasion"]


def sft_examples() -> list[dict]:
    """2b·STEPS prompts whose answers differ in length (1 to 3 titles), so token counts differ per process."""
    n = 2 * BATCH * STEPS
    return [{"prompt": f"{TITLES[i % 8]} {TITLES[(i + 1) % 8]} ->",
             "completion": " " + ", ".join(TITLES[(i + 2 + j) % 8] for j in range(1 + i % 3))} for i in range(n)]


def dpo_pairs() -> list[dict]:
    """2b·STEPS preference pairs: the next title is chosen over a far one."""
    n = 2 * BATCH * STEPS
    return [{"prompt": f"{TITLES[i % 8]} ->", "chosen": f" {TITLES[(i + 1) % 8]}",
             "rejected": f" {TITLES[(i + 5) % 8]} {TITLES[(i + 3) % 8]}"} for i in range(n)]


def worker(out: Path, batch_size: int) -> None:
    """Train SFT then DPO with per-process `batch_size`; the main process writes both loss lists to `out`."""
    import torch

    from recalign.llm.dpo import DPOSettings, train_dpo
    from recalign.llm.models import tiny_model
    from recalign.llm.train import SFTSettings, train_sft
    from recalign.llm.trainer import LoraSettings, attach_lora, is_main_process

    torch.set_num_threads(1)
    lora = LoraSettings(r=4, alpha=8, dropout=0.0)
    common = dict(max_steps=STEPS, batch_size=batch_size, grad_accum=1, shuffle=False, seed=0, device="cpu")
    model, tokenizer = tiny_model(seed=0)
    sft = train_sft(attach_lora(model, lora, seed=0), tokenizer, sft_examples(),
                    SFTSettings(learning_rate=3e-2, max_length=64, **common), output_dir=out.parent / "sft")
    model, tokenizer = tiny_model(seed=1)
    dpo = train_dpo(attach_lora(model, lora, seed=1), tokenizer, dpo_pairs(),
                    DPOSettings(learning_rate=3e-2, beta=0.5, max_length=64, **common), output_dir=out.parent / "dpo")
    if is_main_process():
        out.write_text(json.dumps({"sft": sft.losses, "dpo": dpo.losses}))


def _launch(tmp_path: Path, processes: int, batch_size: int) -> dict:
    out = tmp_path / f"p{processes}" / "losses.json"
    out.parent.mkdir(parents=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    # `--cpu` with N > 1 would ask for mpirun; `--multi_gpu` starts N torchrun processes, which train on the CPU
    # (gloo) because the trainers set `use_cpu` (device "cpu").
    mode = ["--multi_gpu"] if processes > 1 else ["--cpu"]
    command = [sys.executable, "-m", "accelerate.commands.launch", *mode, "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               str(Path(__file__).resolve()), str(out), str(batch_size)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_two_processes_batch_b_match_one_process_batch_2b(tmp_path):
    pytest.importorskip("trl")
    pytest.importorskip("accelerate")
    one = _launch(tmp_path, processes=1, batch_size=2 * BATCH)
    two = _launch(tmp_path, processes=2, batch_size=BATCH)
    for kind in ("sft", "dpo"):
        assert len(one[kind]) == len(two[kind]) == STEPS
        assert one[kind][-1] != pytest.approx(one[kind][0], abs=1e-2)  # training moved: the trajectory says something
        assert two[kind] == pytest.approx(one[kind], abs=1e-4), kind
    assert one["dpo"][0] == pytest.approx(0.6931, abs=1e-4)  # step 1: policy == reference, loss ln 2


if __name__ == "__main__":
    worker(Path(sys.argv[1]), int(sys.argv[2]))
