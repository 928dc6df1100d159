"""Multi-process training (issue 14, acceptance 3): two accelerate CPU processes (gloo) with per-process batch b
follow the same loss trajectory (within 1e-4) as one process with batch 2b, for SFT and for DPO (TRL) and for our
S-DPO loop, on the tiny Llama; under our PPO loop both processes end with the same weights.

The file is also the worker: `accelerate launch ... tests/test_multiprocess.py OUT B` trains SFT, DPO, S-DPO
(LoRA, dropout 0, examples in order) and PPO with per-process batch B; rank r writes its numbers to OUT.rank<r>.
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


def sdpo_samples() -> list[dict]:
    """2b·STEPS S-DPO samples with two negatives each."""
    return [{"prompt": f"{TITLES[i % 8]} ->", "chosen": f" {TITLES[(i + 1) % 8]}",
             "rejected": [f" {TITLES[(i + 5) % 8]}", f" {TITLES[(i + 3) % 8]} {TITLES[i % 8]}"]}
            for i in range(2 * BATCH * STEPS)]


def ppo_weights() -> dict:
    """Two PPO iterations on the toy policy (4 prompts, split over the processes; reward 1 when the first answer
    token has w3's id parity): the actor's LoRA weight sum, the value head's and the mean rewards, as this process
    sees them."""
    import torch
    from conftest import toy_policy

    from recalign.methods.reclmgen.ppo import ACTOR, PPOConfig, PPOTrainer, rewards_on_last_token

    model, tokenizer = toy_policy()
    target = tokenizer.convert_tokens_to_ids("w3")

    def reward_fn(prompts, responses, response_ids):
        return rewards_on_last_token([1.0 if ids and ids[0] % 2 == target % 2 else 0.0 for ids in response_ids],
                                     response_ids)

    settings = PPOConfig(samples=2, max_new_tokens=3, learning_rate=1e-2, kl_coef=0.05, mini_batch_size=4,
                           ppo_epochs=2, target_kl=None, device="cpu", seed=0)
    trainer = PPOTrainer(model, tokenizer, settings)

    def actor_sum(peft_model) -> float:
        return sum(float(p.detach().double().sum()) for n, p in peft_model.named_parameters()
                   if f".{ACTOR}." in n and "lora_" in n)

    start = actor_sum(trainer.model)
    result = trainer.train([f"p{i} :" for i in range(4)], reward_fn, 2, progress=False)
    with torch.no_grad():
        actor = actor_sum(result.model)
        head = float(result.value_head.weight.double().sum())
    return {"start": start, "actor": actor, "value_head": head,
            "rewards": [r["mean_reward"] for r in result.records]}


def worker(out: Path, batch_size: int) -> None:
    """Train SFT, DPO, S-DPO with per-process `batch_size`, then PPO; rank r writes its numbers to OUT.rank<r>."""
    import torch

    from recalign.llm.dpo import DPOConfig, train_dpo
    from recalign.llm.models import tiny_model
    from recalign.methods.trackrec.sdpo import SDPOConfig, train_sdpo
    from recalign.llm.train import SFTConfig, train_sft
    from recalign.llm.trainer import LoraConfig, attach_lora

    torch.set_num_threads(1)
    lora = LoraConfig(r=4, alpha=8, dropout=0.0)
    common = dict(max_steps=STEPS, batch_size=batch_size, grad_accum=1, shuffle=False, seed=0, device="cpu")
    model, tokenizer = tiny_model(seed=0)
    sft = train_sft(attach_lora(model, lora, seed=0), tokenizer, sft_examples(),
                    SFTConfig(learning_rate=3e-2, max_length=64, **common), output_dir=out.parent / "sft")
    model, tokenizer = tiny_model(seed=1)
    dpo = train_dpo(attach_lora(model, lora, seed=1), tokenizer, dpo_pairs(),
                    DPOConfig(learning_rate=3e-2, beta=0.5, max_length=64, **common), output_dir=out.parent / "dpo")
    model, tokenizer = tiny_model(seed=2)
    sdpo = train_sdpo(attach_lora(model, lora, seed=2), tokenizer, sdpo_samples(),
                      SDPOConfig(learning_rate=3e-2, beta=0.5, max_length=64, warmup_ratio=0.0, **common),
                      output_dir=out.parent / "sdpo")
    numbers = {"sft": sft.losses, "dpo": dpo.losses, "sdpo": sdpo.losses, "ppo": ppo_weights()}
    Path(f"{out}.rank{os.environ.get('RANK', '0')}").write_text(json.dumps(numbers))


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
    return [json.loads(Path(f"{out}.rank{r}").read_text()) for r in range(processes)]


@pytest.mark.slow
def test_two_processes_batch_b_match_one_process_batch_2b(tmp_path):
    pytest.importorskip("trl")
    pytest.importorskip("accelerate")
    [one] = _launch(tmp_path, processes=1, batch_size=2 * BATCH)
    two, two_rank1 = _launch(tmp_path, processes=2, batch_size=BATCH)
    for kind in ("sft", "dpo", "sdpo"):
        assert len(one[kind]) == len(two[kind]) == STEPS
        assert one[kind][-1] != pytest.approx(one[kind][0], abs=1e-2)  # training moved: the trajectory says something
        assert two[kind] == pytest.approx(one[kind], abs=1e-4), kind
        assert two_rank1[kind] == pytest.approx(two[kind], abs=1e-6), kind  # every process logs the global loss
    assert one["dpo"][0] == pytest.approx(0.6931, abs=1e-4)  # step 1: policy == reference, loss ln 2
    assert one["sdpo"][0] == pytest.approx(1.0986, abs=1e-4)  # step 1, two negatives: −log σ(−log 2) = ln 3
    # PPO: each process rolled out 2 of the 4 prompts, yet both hold the same weights (averaged gradients) and
    # see the same (gathered) mean rewards; the weights moved.
    assert two_rank1["ppo"]["actor"] == pytest.approx(two["ppo"]["actor"], abs=1e-9)
    assert two_rank1["ppo"]["value_head"] == pytest.approx(two["ppo"]["value_head"], abs=1e-9)
    assert two_rank1["ppo"]["rewards"] == two["ppo"]["rewards"]
    assert two["ppo"]["actor"] != pytest.approx(two["ppo"]["start"], abs=1e-4)


if __name__ == "__main__":
    worker(Path(sys.argv[1]), int(sys.argv[2]))


RECIPE = """
name: mp
seed: 0
data: {source: synthetic, options: {n_users: 30, n_items: 20, min_length: 5, max_length: 8, seed: 0}}
split: {kind: leave_one_out}
eval: {ks: [1, 5], users: 6}
stages:
  - {name: popularity, kind: teacher, params: {model: popularity}}
  - name: sft
    kind: llm-sft
    params: {model: tiny, device: cpu, train_rows: 8, batch_size: 3, task: {max_history: 3},
             lora: {r: 2, alpha: 4, dropout: 0.0}, sft: {max_steps: 2, batch_size: 2, max_length: 160},
             generation: {max_new_tokens: 8}, decodings: [greedy], grounding: {kind: fuzzy}}
"""


def test_launch_command_runs_recalign_under_accelerate():
    from recalign.cli import launch_command

    command = launch_command(3, ["r.yaml", "seed=1", "--out", "runs/x"])
    assert command[1:3] == ["-m", "accelerate.commands.launch"]
    assert command[command.index("--num_processes") + 1] == "3" and "--multi_gpu" in command
    assert command[-7:] == ["-m", "recalign.cli", "run", "r.yaml", "seed=1", "--out", "runs/x"]


@pytest.mark.slow
def test_recalign_run_with_two_processes_writes_the_run_folder_once(tmp_path):
    pytest.importorskip("trl")
    recipe = tmp_path / "mp.yaml"
    recipe.write_text(RECIPE)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-m", "recalign.cli", "run", str(recipe), "--out", str(tmp_path / "run"),
                           "--processes", "2", "--quiet"], env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "[popularity] a teacher stage does not train data-parallel: it runs once, in rank 0" in done.stderr
    assert done.stdout.count("run folder:") == 1  # one results table, from rank 0
    run = tmp_path / "run"
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml", "data", "dataset.json", "log.txt",
                                                     "metrics.json", "report.html", "report.md", "stages"]  # no .ranks left
    log = (run / "log.txt").read_text()
    assert log.count("[popularity] start") == 1 and log.count("[sft] start") == 1  # only rank 0 logged
    metrics = json.loads((run / "metrics.json").read_text())["stages"]
    assert metrics["sft"]["sft_steps"] == 2 and (run / "stages" / "sft" / "DONE").is_file()
