"""SFT throughput on CPU: random batches (today's default) against length-grouped batches, one run, same examples.

The examples are RecLM-gen's SFT task mix (SeqRec, ±C control, category rate, reverse ControlRec; prompts of very
different lengths) on MovieLens-100K, labelled by a Popularity teacher (the labels do not change the lengths). Both
arms start from the same SmolLM2-135M-Instruct + fresh LoRA (seed 0) and see every example once (1 epoch, batch 8,
completion-only loss). Reported per arm: train seconds, real (non-padding) tokens and padded slots trained on,
real tokens per second, and the loss: its mean over the epoch and over its last quarter (the same examples, in
another order, so the two curves agree within noise when grouping changes nothing but the padding).

    .venv/bin/python benchmarks/sft_throughput.py            # SmolLM2, 96 examples: ~10 min on 2 threads
    .venv/bin/python benchmarks/sft_throughput.py --quick    # tiny random Llama, 32 examples: seconds

JSON: benchmarks/results/sft_throughput.json (--quick: sft_throughput_quick.json). Data is read in place from
../shared/data/ml-100k.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
DATA = ROOT.parent / "shared" / "data" / "ml-100k"


def task_mix(tokenizer, n_examples: int) -> list[dict]:
    """RecLM-gen's SFT examples (epoch 0 of the mix), a seeded sample of `n_examples`."""
    from recalign.data.sources import prepare_source
    from recalign.data.split import leave_one_out_split
    from recalign.llm.tasks import sample_rows, sft_examples
    from recalign.methods.reclmgen.tasks import SFT_TASKS, ControlSource, ControlTask, sft_rows
    from recalign.teachers.registry import get_teacher
    from recalign.teachers.service import TeacherService

    dataset = prepare_source("movielens-100k", DATA)
    split = leave_one_out_split(dataset)
    teacher = TeacherService(get_teacher("popularity")().fit(dataset, split.train, progress=False),
                             dataset.category_index())
    source = ControlSource.from_split(dataset, split, teacher, 10)
    rows = sample_rows(sft_rows(source, 0, 0, list(SFT_TASKS), 200), n_examples, 0)
    return sft_examples(ControlTask(max_history=10, seed=0), rows, dataset.titles(), tokenizer)


def padding_of(trainer) -> tuple[int, int]:
    """(real tokens, padded slots) of one pass over the trainer's train dataloader (its own sampler and collator)."""
    real = padded = 0
    for batch in trainer.get_train_dataloader():
        mask = batch["attention_mask"]
        real += int(mask.sum())
        padded += int((mask == 0).sum())
    return real, padded


def run_arm(name: str, grouped: bool, quick: bool, examples: list[dict], batch_size: int) -> dict:
    """One SFT epoch from a fresh LoRA; seconds, tokens and the loss curve."""
    from recalign.llm.models import load_model
    from recalign.llm.trainer import LoraConfig, run_trainer
    from recalign.llm.train import SFTConfig, make_sft_trainer

    model, tokenizer = load_model("tiny" if quick else "smollm2", lora=LoraConfig(r=8, alpha=16, dropout=0.0),
                                  seed=0, progress=False)
    settings = SFTConfig(epochs=1, batch_size=batch_size, learning_rate=2e-4, max_length=512, length_grouped=grouped,
                         seed=0, device="cpu")
    with tempfile.TemporaryDirectory() as scratch:
        trainer = make_sft_trainer(model, tokenizer, examples, settings, output_dir=scratch)
        real, padded = padding_of(trainer)
        load_before = os.getloadavg()
        started, cpu = time.perf_counter(), time.process_time()
        result = run_trainer(trainer, prefix="sft")
        seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu
    losses = [row["loss"] for row in result.log_history if "loss" in row]
    quarter = max(1, len(losses) // 4)
    return dict(arm=name, length_grouped=grouped, steps=len(losses), train_s=round(seconds, 2),
                cpu_s=round(cpu_seconds, 2), real_tokens=real, padded_slots=padded,
                padding_share=round(padded / max(1, real + padded), 4),
                real_tokens_per_s=round(real / seconds, 2), loss_mean=round(float(np.mean(losses)), 4),
                loss_last_quarter=round(float(np.mean(losses[-quarter:])), 4), losses=[round(x, 4) for x in losses],
                loadavg_before=list(load_before), loadavg_after=list(os.getloadavg()))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny random Llama, 32 examples")
    parser.add_argument("--examples", type=int, default=None, help="examples (default 96; quick 32)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from recalign.llm.models import load_tokenizer

    tokenizer = load_tokenizer("tiny" if args.quick else "smollm2", progress=False)
    examples = task_mix(tokenizer, args.examples or (32 if args.quick else 96))
    lengths = [len(tokenizer(e["prompt"] + e["completion"], add_special_tokens=False)["input_ids"]) + 1
               for e in examples]
    arms = [run_arm("random", False, args.quick, examples, args.batch_size),
            run_arm("length-grouped", True, args.quick, examples, args.batch_size)]
    speedup = arms[1]["real_tokens_per_s"] / arms[0]["real_tokens_per_s"]
    report = dict(date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  command="benchmarks/sft_throughput.py" + (" --quick" if args.quick else ""),
                  model="tiny random Llama" if args.quick else "SmolLM2-135M-Instruct fp32 + LoRA r8",
                  examples=len(examples), batch_size=args.batch_size, torch_threads=torch.get_num_threads(),
                  example_tokens=dict(min=min(lengths), median=float(np.median(lengths)), max=max(lengths),
                                      mean=round(float(np.mean(lengths)), 1)),
                  arms=arms, real_tokens_per_s_ratio=round(speedup, 3))
    out = RESULTS / ("sft_throughput_quick.json" if args.quick else "sft_throughput.json")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nSFT throughput ({report['model']}, {len(examples)} RecLM-gen task-mix examples, tokens per example "
          f"{report['example_tokens']}, batch {args.batch_size}, torch threads {report['torch_threads']})")
    print(f"{'arm':<15} {'steps':>5} {'train s':>8} {'real tok':>9} {'padded':>7} {'real tok/s':>10} "
          f"{'loss mean':>9} {'last 1/4':>8}  load before/after")
    for a in arms:
        print(f"{a['arm']:<15} {a['steps']:>5} {a['train_s']:>8.1f} {a['real_tokens']:>9} {a['padded_slots']:>7} "
              f"{a['real_tokens_per_s']:>10.1f} {a['loss_mean']:>9.4f} {a['loss_last_quarter']:>8.4f}  "
              f"{a['loadavg_before'][0]:.2f}/{a['loadavg_after'][0]:.2f}")
    print(f"real tokens per second, length-grouped / random: {speedup:.2f}x")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
