"""CTR backbones on MovieLens-100K: DIN, DeepFM, DCNv2 alone vs + KAR (HEA adaptor) with STAND-IN knowledge.

The knowledge is a placeholder until TrackRec's generator writes real CoTs: the prompt tower embeds the candidate's
text (title and genres) and the CoT tower a deterministic summary of the history before the impression (favourite
and disliked genres, rating tendency; no LLM), both with MiniLM (cached per text). Impressions: label = rating >= 4,
history = last 10 items rated before, user features age/gender/occupation; a seeded user split 80/10/10 (seed 0,
the same for every run); `--users N` keeps a seeded sample of N users (default 300, to fit the CPU budget).
The epoch (early stop) and the grid point are chosen on VALIDATION AUC; test is scored once per run. The model seed
varies (3 seeds); mean +- std over seeds.

    .venv/bin/python benchmarks/ctr_backbones.py                  # writes benchmarks/results/ctr_backbones.json
    .venv/bin/python benchmarks/ctr_backbones.py --users 0        # every user (about 10x slower with KAR)
    .venv/bin/python benchmarks/ctr_backbones.py --quick          # 1 seed, 2 epochs: a smoke run

Data is read in place from ../shared/data/ml-100k (never copied into the repository).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from recalign.methods.trackrec.ctr.data import Impressions, build_impressions, split_users  # noqa: E402
from recalign.methods.trackrec.ctr.knowledge import DEFAULT_MODEL, history_summaries, load_knowledge, write_knowledge  # noqa: E402
from recalign.methods.trackrec.ctr.train import BACKBONES, CTRResult, CTRConfig, fit_ctr  # noqa: E402
from recalign.data.sources import prepare_source  # noqa: E402
from recalign.io import write_json  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "ml-100k"
OUT = ROOT / "benchmarks" / "results" / "ctr_backbones.json"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--raw", type=Path, default=DATA, help="ml-100k folder (u.data, u.item, u.user)")
    parser.add_argument("--users", type=int, default=300, help="seeded sample of users; 0 = all")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--backbones", nargs="+", default=sorted(BACKBONES), choices=sorted(BACKBONES))
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--patience", type=int, default=2)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[512])
    parser.add_argument("--lrs", type=float, nargs="+", default=[2e-3])
    parser.add_argument("--text-model", default=DEFAULT_MODEL)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--quick", action="store_true", help="1 seed, 2 epochs")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.quick:
        args.seeds, args.epochs = args.seeds[:1], 2
    torch.set_num_threads(1)
    started = time.perf_counter()
    dataset = prepare_source("movielens-100k", args.raw)
    impressions = sample_users(build_impressions(dataset), args.users)
    parts = {name: impressions.take(rows) for name, rows in split_users(impressions, seed=0).items()}

    t0 = time.perf_counter()
    titles, categories = dataset.titles(), dataset.item_categories()
    item_text = dataset.items["text"].tolist()
    knowledge = {}
    with tempfile.TemporaryDirectory(prefix="ctr-knowledge-") as tmp:  # the .npy files the CTR stage reads
        for name, part in parts.items():
            folder = write_knowledge(Path(tmp) / name, [item_text[i] for i in part.item],
                                     history_summaries(part, titles, categories), args.text_model)
            knowledge[name] = load_knowledge(folder, rows=len(part))
    embed_seconds = time.perf_counter() - t0
    print(f"impressions {len(impressions)} ({', '.join(f'{k} {len(v)}' for k, v in parts.items())}); "
          f"knowledge {knowledge['train'].shape[1:]} in {embed_seconds:.0f} s", flush=True)

    runs = [fit_run(backbone, variant, seed, parts, knowledge if variant != "alone" else None,
                    ctr_settings(args, seed))[0]
            for backbone in args.backbones for variant in ("alone", "+KAR (stand-in)") for seed in args.seeds]

    table = summarise(runs)
    print_table(table)
    write_json(args.out, {
        "benchmark": "ctr_backbones", "data": "MovieLens-100K (../shared/data/ml-100k)",
        "knowledge": "STAND-IN: prompt tower = candidate item text; CoT tower = deterministic history summary "
                     f"(genres liked/disliked, rating tendency), embedded with {args.text_model}; not LLM CoTs",
        "protocol": {"label": "rating >= 4", "history": 10, "user_split": [0.8, 0.1, 0.1], "split_seed": 0,
                     "users": args.users or "all", "selection": "validation AUC (epoch and grid point)",
                     "epochs": args.epochs, "patience": args.patience, "batch_sizes": args.batch_sizes,
                     "lrs": args.lrs, "seeds": args.seeds},
        "sizes": {name: len(part) for name, part in parts.items()},
        "table": table, "runs": runs,
        "seconds": {"embedding": embed_seconds, "total": time.perf_counter() - started},
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "threads": 1},
    })
    print(f"wrote {args.out} in {time.perf_counter() - started:.0f} s")


def sample_users(impressions: Impressions, users: int, seed: int = 0) -> Impressions:
    """The impressions of a seeded sample of `users` users (all impressions when `users` is 0)."""
    if not users:
        return impressions
    present = np.unique(impressions.user)
    keep = np.random.default_rng(seed).choice(present, size=min(users, len(present)), replace=False)
    return impressions.take(np.flatnonzero(np.isin(impressions.user, keep)))


def ctr_settings(args: argparse.Namespace, seed: int) -> CTRConfig:
    """CTR training settings from the command line (epochs, patience, grid) for one model seed, one thread."""
    return CTRConfig(epochs=args.epochs, patience=args.patience, batch_sizes=tuple(args.batch_sizes),
                       lrs=tuple(args.lrs), seed=seed, threads=1)


def fit_run(backbone: str, variant: str, seed: int, parts: dict[str, Impressions],
            knowledge: dict[str, np.ndarray] | None, settings: CTRConfig) -> tuple[dict, CTRResult]:
    """One backbone fit (validation-chosen epoch and grid point, test scored once), printed: (JSON row, result)."""
    started = time.perf_counter()
    result = fit_ctr(backbone, parts, settings, knowledge=knowledge)
    row = {"backbone": backbone, "variant": variant, "kar": knowledge is not None, "seed": seed,
           "seconds": time.perf_counter() - started, **result.summary()}
    print(f"{backbone:7s} {variant:18s} seed {seed}: test AUC {result.test['auc']:.4f} LogLoss "
          f"{result.test['logloss']:.4f} (valid AUC {result.valid['auc']:.4f}, epoch {result.chosen['epoch']}, "
          f"{row['seconds']:.0f} s)", flush=True)
    return row, result


def summarise(runs: list[dict]) -> list[dict]:
    """Mean and std over seeds of test AUC and LogLoss per (backbone, variant), in order of first appearance."""
    table = []
    for backbone in dict.fromkeys(r["backbone"] for r in runs):
        for variant in dict.fromkeys(r["variant"] for r in runs):
            rows = [r for r in runs if r["backbone"] == backbone and r["variant"] == variant]
            if not rows:
                continue
            entry = {"backbone": backbone, "variant": variant, "seeds": len(rows)}
            for metric in ("auc", "logloss"):
                values = [r["test"][metric] for r in rows]
                entry[metric] = statistics.fmean(values)
                entry[f"{metric}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
            table.append(entry)
    return table


def print_table(table: list[dict]) -> None:
    """The results as a Markdown table (mean +- std over seeds)."""
    print("\n| backbone | variant | test AUC | test LogLoss | seeds |\n|---|---|---|---|---|")
    for e in table:
        print(f"| {e['backbone']} | {e['variant']} | {e['auc']:.4f} ± {e['auc_std']:.4f} | "
              f"{e['logloss']:.4f} ± {e['logloss_std']:.4f} | {e['seeds']} |")


if __name__ == "__main__":
    main()
