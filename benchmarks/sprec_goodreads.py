"""SPRec on SPRec's Goodreads sample: SFT vs DPO (random negatives) vs SPRec after every iteration.

Data (read in place from ../shared/data/goodreads-sprec, never copied):
- catalog: eval/Goodreads/id2name.json (4,058 books), name2genre.json; the 7 tracked genres of genre_dict.json;
- rows: sampled_ClusterExposure-DPO/{train,valid,test}.json (1,024 / 256 / 1,000 Alpaca rows). Each row is one
  "user": its quoted history titles precede its target title. The split is SPRec's (`sprec_rows`): every history
  and all train-row targets are train interactions; valid/test targets form the valid/test parts. Test rows whose
  target is not in the catalog are removed (and counted).

Budget (documented; the default run is meant to finish in <= 60 minutes on 2 CPU cores with SmolLM2-135M;
measured cost there: ~1.5 s per SFT row and ~3 s per DPO pair at ~115 prompt tokens):
  prompts hold the 5 most recent history titles; SFT 256 train rows x 1 epoch (lr 3e-4, 4x2 -> 32 steps, LoRA
  r 16); per iteration 96 sampled prompts -> pairs, an SFT step on the positives (lr 1e-4, 24 steps) and a DPO
  step (lr 1e-4, 2x2 -> 24 steps, beta 0.1); 2 iterations; evaluation on 200 rows of a seeded permutation of
  test.json; greedy decoding of <= 32 new tokens; grounding = all-MiniLM-L6-v2 embedding k-NN (L2). The learning
  rates are 5x SPRec's 2e-5 because the run takes ~1/10 of its optimizer steps.
  The paper's budget is SFT 4,096 rows x 4 epochs, 2,048 pairs per iteration, 5 iterations, Llama-3.2-1B.

    .venv/bin/python benchmarks/sprec_goodreads.py --tiny          # smoke test with a random 2-layer Llama
    .venv/bin/python benchmarks/sprec_goodreads.py --model PATH    # SmolLM2-135M(-Instruct) folder, HF id or GGUF

Writes benchmarks/results/sprec_goodreads.json (+ sprec_goodreads.png) and prints the per-iteration table.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from recalign.data.dataset import build_dataset  # noqa: E402
from recalign.data.split import Split  # noqa: E402
from recalign.methods.sprec.algorithm import run_sprec  # noqa: E402
from recalign.methods.sprec.config import SPRecConfig  # noqa: E402
from recalign.methods.sprec.report import compare_against_sft, iteration_table, plot_iterations  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "goodreads-sprec"
RESULTS = ROOT / "benchmarks" / "results"
TRACKED = ["fiction", "romance", "young-adult", "fantasy, paranormal", "mystery, thriller, crime",
           "history, historical fiction, biography", "children"]


def history_titles(text: str) -> list[str]:
    """The quoted titles of an Alpaca `input` ("...before: "A", "B", ..., please write ...")."""
    start = text.find('"')
    end = text.rfind('"')
    if start < 0 or end <= start:
        return []
    return text[start + 1:end].split('", "')


def load_goodreads(data: Path):
    """Dataset + Split from the catalog and the three row files; returns (dataset, split, info)."""
    id2name = json.loads((data / "eval/Goodreads/id2name.json").read_text())
    name2genre = json.loads((data / "eval/Goodreads/name2genre.json").read_text())
    titles = [id2name[str(i)] for i in range(len(id2name))]
    known = set(titles)
    items = pd.DataFrame({"item": titles, "title": titles,
                          "categories": [list(name2genre.get(t, [])) for t in titles]})
    frames, part_of_target, info = [], {}, {"unknown_history_titles": 0, "removed_unknown_target": {}}
    for part in ("train", "valid", "test"):
        rows = json.loads((data / "sampled_ClusterExposure-DPO" / f"{part}.json").read_text())
        removed = 0
        for index, row in enumerate(rows):
            target = row["output"].strip().strip('"')
            history = history_titles(row["input"])
            if target not in known:
                removed += 1
                continue
            kept = [t for t in history if t in known]
            info["unknown_history_titles"] += len(history) - len(kept)
            user = f"{part}-{index}"
            sequence = kept + [target]
            frames.append(pd.DataFrame({"user": user, "item": sequence, "timestamp": np.arange(len(sequence))}))
            part_of_target[user] = part
        info["removed_unknown_target"][part] = removed
    interactions = pd.concat(frames, ignore_index=True)
    dataset = build_dataset(interactions, items=items, name="goodreads-sprec", source="goodreads-sprec-rows")
    inter = dataset.interactions
    original = dataset.users.set_index("user_id")["original_id"]
    part = inter["user_id"].map(original).map(part_of_target).to_numpy()
    last = inter.groupby("user_id")["timestamp"].transform("max").to_numpy() == inter["timestamp"].to_numpy()
    in_valid, in_test = last & (part == "valid"), last & (part == "test")
    split = Split(name="sprec_rows", train=inter[~in_valid & ~in_test].reset_index(drop=True),
                  valid=inter[in_valid].reset_index(drop=True), test=inter[in_test].reset_index(drop=True),
                  info={"protocol": "sprec_rows"})
    return dataset, split, info


def tiny_model_dir(folder: Path) -> Path:
    """A random 2-layer Llama with a small byte-level BPE tokenizer (ChatML), saved for `--tiny` smoke runs."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=["<|im_start|>", "<|im_end|>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(["Given a list of items the user recently enjoyed, please recommend a new item. "
                             "Answer with one title in double quotes. The user has enjoyed: user assistant"] * 8,
                            trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<pad>",
                                        bos_token="<|im_start|>")
    tokenizer.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                               "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.bos_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def budget(tiny: bool) -> dict:
    """The documented run budget (see the module docstring); `--tiny` shrinks everything for a smoke test."""
    if tiny:
        return dict(iterations=2, n_pairs=16, sft_rows=64, max_history=10, sft={"epochs": 3, "learning_rate": 3e-3,
                                                                "batch_size": 8, "grad_accum": 1, "max_length": 1024},
                    sft_step={"epochs": 1, "learning_rate": 1e-3, "batch_size": 8, "grad_accum": 1,
                              "max_length": 1024},
                    dpo={"learning_rate": 1e-3, "batch_size": 4, "grad_accum": 1, "max_length": 1024},
                    eval_rows=32, pair_generation={"max_new_tokens": 16, "batch_size": 16},
                    eval_generation={"max_new_tokens": 16, "batch_size": 16})
    return dict(iterations=2, n_pairs=96, sft_rows=256, max_history=5,
                sft={"epochs": 1, "learning_rate": 3e-4, "batch_size": 4, "grad_accum": 2, "max_length": 512},
                sft_step={"epochs": 1, "learning_rate": 1e-4, "batch_size": 4, "grad_accum": 1, "max_length": 512},
                dpo={"learning_rate": 1e-4, "batch_size": 2, "grad_accum": 2, "beta": 0.1, "max_length": 512},
                eval_rows=200, pair_generation={"max_new_tokens": 32, "batch_size": 16},
                eval_generation={"max_new_tokens": 32, "batch_size": 16})


def print_intervals(console, intervals: list[dict]) -> None:
    """Table of (variant - SFT) per metric: 95% paired bootstrap interval and permutation-test p-value."""
    from rich.table import Table

    keys = list(intervals[0]["bootstrap"]) if intervals else []
    table = Table(title="difference to SFT on the same rows: diff [95% paired bootstrap] p (paired permutation)")
    for c in ("variant", "iteration", *keys):
        table.add_column(c)
    for r in intervals:
        cells = []
        for k in keys:
            boot, perm = r["bootstrap"][k], r["permutation"][k]
            cells.append(f"{boot['diff']:+.4f} [{boot['low']:+.4f}, {boot['high']:+.4f}] p={perm['p_value']:.3f}")
        table.add_row(r["variant"], str(r["iteration"]), *cells)
    console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="random 2-layer Llama, tiny budget (smoke test)")
    parser.add_argument("--model", default="smollm2",
                        help="base model: HF id, local folder or .gguf")
    parser.add_argument("--iterations", type=int, default=None, help="override the budget's iterations")
    parser.add_argument("--work", default=None, help="work folder (resumable); default: a temp folder")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", default=str(RESULTS / "sprec_goodreads.json"))
    parser.add_argument("--resamples", type=int, default=1000,
                        help="paired bootstrap resamples and permutations (each variant vs SFT)")
    parser.add_argument("--bootstrap-only", action="store_true",
                        help="train nothing: compare a finished --work folder's checkpoints against SFT (paired "
                             "bootstrap + permutation test; checkpoints saved without per-row answers are "
                             "evaluated again), written to <out>_bootstrap.json")
    parser.add_argument("--compare-rows", type=int, default=None,
                        help="with --bootstrap-only: compare on this many test rows instead of the run's "
                             "(each checkpoint is evaluated once more; output <out>_bootstrap_<n>rows.json)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 130))  # the 10-column table fits unabbreviated
    started = time.perf_counter()
    dataset, split, data_info = load_goodreads(DATA)
    settings = budget(args.tiny)
    if args.iterations is not None:
        settings["iterations"] = args.iterations
    scratch = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="sprec-goodreads-"))
    model = "tiny" if args.tiny else args.model  # recalign.llm.models names: "tiny", "smollm2", folder, HF id, GGUF
    config = SPRecConfig(model=model, train_users="train_only", ks=[1, 5, 10], genres=TRACKED, eval_part="test",
                         grounding={"kind": "embedding", "cache_dir": str(scratch / "embeddings")}, seed=0,
                         **settings)
    if args.bootstrap_only:
        if not args.work:
            parser.error("--bootstrap-only needs the --work folder of a finished run")
        intervals = compare_against_sft(config, dataset, split, scratch / "run", n_resamples=args.resamples,
                                          progress=True, log=console.print, eval_rows=args.compare_rows)
        suffix = "_bootstrap.json" if args.compare_rows is None else f"_bootstrap_{args.compare_rows}rows.json"
        out = Path(args.out).with_name(Path(args.out).stem + suffix)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"benchmark": "sprec_goodreads_bootstrap", "work": str(scratch),
                                   "resamples": args.resamples, "confidence": 0.95, "reference": "sft iteration 0",
                                   "eval_rows": args.compare_rows or config.eval_rows,
                                   "note": "bootstrap intervals are sound for hr/ndcg (per-row means); use the "
                                           "permutation p-values for the set metrics (DivRatio, ORRatio, MGU, DGU)",
                                   "seconds": round(time.perf_counter() - started, 1),
                                   "comparisons": intervals}, indent=2) + "\n")
        print_intervals(console, intervals)
        console.print(f"wrote {out}")
        return
    summary = run_sprec(config, dataset, split, scratch / "run", progress=True, log=console.print)
    seconds = time.perf_counter() - started
    intervals = compare_against_sft(config, dataset, split, scratch / "run", n_resamples=args.resamples)

    columns = ("hr@5", "ndcg@5", "div_ratio@5", "or_ratio@5", "mgu@5", "dgu@5", "avg_pop@5", "valid_ratio")
    table = Table(title=f"SPRec on Goodreads ({'tiny random model' if args.tiny else args.model})")
    for c in ("variant", "iteration", *columns):
        table.add_column(c)
    for record in summary["iterations"]:
        table.add_row(record["variant"], str(record["iteration"]), *(f"{record.get(c, float('nan')):.4f}"
                                                                       for c in columns))
    console.print(table)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    png = plot_iterations(summary, out.with_suffix(".png"))
    result = {
        "benchmark": "sprec_goodreads", "model": "tiny-random-llama" if args.tiny else args.model,
        "tiny": args.tiny, "protocol": "sprec_rows (embedding k-NN top-K of one generated title)",
        "exclude_history": False, "data": {"rows": {p: int(len(split.part(p))) for p in ("valid", "test")},
                                           "train_interactions": int(len(split.train)), **data_info},
        "config": config.model_dump(mode="json"), "seconds": round(seconds, 1),
        "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
        "cuda": torch.cuda.is_available(), "iterations": summary["iterations"],
        "paired_vs_sft": {"resamples": args.resamples, "confidence": 0.95, "comparisons": intervals},
        "table_markdown": iteration_table(summary), "plot": str(png.relative_to(ROOT) if png.is_relative_to(ROOT)
                                                                else png),
    }
    out.write_text(json.dumps(result, indent=2) + "\n")
    print_intervals(console, intervals)
    console.print(f"wrote {out} and {png} in {seconds / 60:.1f} min")


if __name__ == "__main__":
    main()
