"""RecGPT zero-shot: pre-train on several text-bearing domains, recommend on held-out Amazon Office and Scientific.

Against SASRec and Popularity trained on the target domain (leave-one-out train part), RecGPT fine-tuned on the same
part, all on the same seeded test users through the one list evaluator (full catalog, HR/NDCG @1,3,5,10), on the
leave-one-out test and on cold-start windows (2-4 items: history = the window minus its last item). Also the FSQ
collision rate per catalog and the speed of the vectorised beam search against the original's per-sample Python loop
on the same log-prob tables. Writes benchmarks/results/recgpt_zeroshot.json (+ _quick) and prints a table and a
verdict on the paper's claim (zero-shot close to in-domain baselines).

    .venv/bin/python benchmarks/recgpt_zeroshot.py --quick     # a few minutes
    .venv/bin/python benchmarks/recgpt_zeroshot.py             # <= 60 minutes on the 2-core CPU

Resumable: the tokenizer, every decoder epoch and every fine-tuning epoch are checkpoints under --work.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from recalign.checkpoints import stable_hash  # noqa: E402
from recalign.data.sources import prepare_source  # noqa: E402
from recalign.data.split import cold_start_split, leave_one_out_split  # noqa: E402
from recalign.eval.evaluate import eval_users, evaluate, relevant_items  # noqa: E402
from recalign.io import write_json  # noqa: E402
from recalign.methods.recgpt import algorithm as recgpt  # noqa: E402
from recalign.checkpoints import IterationStore  # noqa: E402
from recalign.teachers.registry import get_teacher  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results"
KS = (1, 3, 5, 10)

PRETRAIN = {  # name: (source, raw folder, options)
    "Beauty": ("p5-text", "p5-text/beauty", {"name": "Beauty"}),
    "Toys": ("p5-text", "p5-text/toys", {"name": "Toys"}),
    "Games": ("recbole", "amazon-games-llmrank", {"name": "Games-6k"}),
    "Goodreads": ("goodreads-sprec", "goodreads-sprec", {}),
    "ML-100K": ("movielens-100k", "ml-100k", {}),
}
TARGETS = {
    "Office": ("lcrec", "amazon-office-lcrec", {"name": "Office"}),
    "Scientific": ("unisrec", "amazon-scientific-unisrec", {"name": "Scientific"}),
}

# Sizes that fit the budgets on the shared 2-core CPU (decoder cost grows with users x epochs x max_items).
SIZES = {
    "quick": dict(pretrain=["Beauty", "Toys", "Games"], pretrain_users=400, epochs=1, finetune_epochs=1,
                  finetune_users=600, eval_users=100, fsq_epochs=10, speed_users=30, sasrec_seconds=60),
    "full": dict(pretrain=list(PRETRAIN), pretrain_users=1500, epochs=2, finetune_epochs=1,
                 finetune_users=2000, eval_users=500, fsq_epochs=20, speed_users=100, sasrec_seconds=240),
}


def load(spec: tuple) -> "recgpt.Dataset":
    """One shared dataset through its source."""
    source, folder, options = spec
    return prepare_source(source, DATA / folder, **options)


def params_for(size: dict) -> recgpt.RecGPTConfig:
    """The RecGPT settings of this run size."""
    return recgpt.RecGPTConfig(
        text_max_tokens=64, tokenizer={"epochs": size["fsq_epochs"]},
        decoder={"n_layers": 2, "dim": 64, "n_heads": 4, "max_items": 20},
        pretrain={"epochs": size["epochs"], "users": size["pretrain_users"], "batch_size": 32},
        finetune={"epochs": size["finetune_epochs"], "users": size["finetune_users"], "batch_size": 32},
        beam={"widths": [10, 20], "extensions": 5, "temperature": 0.1})


def accuracy(result: dict) -> dict:
    """HR/NDCG at KS plus the number of users and their hash."""
    out = {f"{m}@{k}": round(float(result[f"{m}@{k}"]), 4) for m in ("hr", "ndcg") for k in KS}
    out["n_users"] = int(result["n_users"])
    return out


def beam_speed(decoder, catalog, histories: list[np.ndarray], beam: recgpt.RecGPTBeamConfig) -> dict:
    """Seconds of the vectorised beam search vs the original-style Python loop on the same log-prob tables."""
    from recalign.methods.recgpt.beam import CodeBeamConfig, compare_with_python_loop
    from recalign.methods.recgpt.decoder import pad_histories

    settings = CodeBeamConfig(widths=tuple(beam.widths), extensions=beam.extensions, temperature=beam.temperature)
    rows = [h.tolist() for h in histories]
    with torch.no_grad():
        padded = pad_histories(rows, decoder.config.max_items, side="left")
        log_probs = decoder.next_item_log_probs(padded, catalog.codes, catalog.vectors, beam.temperature)
    found = compare_with_python_loop(log_probs, catalog.codes, settings, rows)
    return {"users": found["users"], "vectorised_s": round(found["vectorised_s"], 4),
            "python_loop_s": round(found["python_loop_s"], 4), "speedup": round(found["speedup"], 1),
            "same_items": bool(found["same_items"])}


def baselines(dataset, loo, size: dict, seed: int) -> dict:
    """Popularity and SASRec trained on the target's leave-one-out train part (SASRec early-stopped on valid)."""
    models = {"Popularity": get_teacher("popularity")(seed=seed).fit(dataset, loo.train, progress=False)}
    sasrec = get_teacher("sasrec")(seed=seed, loss="sampled_softmax", negatives=256, max_len=20, dim=64, blocks=2,
                                   dropout=0.5, lr=1e-3, batch_size=128, epochs=100, eval_every=2, patience=4,
                                   valid_users=2000, max_train_seconds=size["sasrec_seconds"])
    models["SASRec"] = sasrec.fit(dataset, loo.train, loo.valid, progress=False)
    return models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few minutes: 3 domains, fewer users and epochs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=None, help="checkpoint folder (default runs/bench-recgpt-...)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--progress", action="store_true", help="progress bars")
    args = parser.parse_args()
    torch.set_num_threads(1)  # measured faster than 2 on the shared 2-core machine (BENCHMARKS.md, threads)
    name = "quick" if args.quick else "full"
    size, seed = SIZES[name], args.seed
    params = params_for(size)
    out = args.out or RESULTS / f"recgpt_zeroshot{'_quick' if args.quick else ''}.json"
    started = time.perf_counter()
    log = lambda message: print(f"[{time.perf_counter() - started:7.1f}s] {message}", flush=True)  # noqa: E731

    # data: pre-training domains (a seeded subset of users each) and the held-out targets
    pretrain = {n: load(PRETRAIN[n]) for n in size["pretrain"]}
    targets = {n: load(spec) for n, spec in TARGETS.items()}
    log("data: " + ", ".join(f"{n} {d.n_users}u/{d.n_items}i" for n, d in {**pretrain, **targets}.items()))
    sequences, domains = [], {}
    for i, (n, ds) in enumerate(pretrain.items()):
        seqs = recgpt.sample_sequences(ds, users=size["pretrain_users"], seed=seed + i)
        used = np.unique(np.concatenate(seqs))
        remap = np.full(ds.n_items, -1, dtype=np.int64)
        remap[used] = np.arange(len(used))
        sequences.append([remap[s] for s in seqs])
        domains[n] = (ds, used)
    for n, ds in targets.items():
        domains[n] = (ds, np.arange(ds.n_items))

    key = stable_hash({"params": params.model_dump(mode="json"), "size": size, "seed": seed,
                       "data": {n: d.fingerprint() for n, (d, _) in domains.items()}})
    work = args.work or ROOT / "runs" / f"bench-recgpt-{name}-{key}"
    store = IterationStore(work, key)

    # 1-2. item text -> embeddings -> FSQ codes (tokenizer fit on the pre-training catalogs only)
    t0 = time.perf_counter()
    tokenizer, catalogs = recgpt.build_catalogs(domains, list(pretrain), params, seed, progress=args.progress)
    tokenize_s = time.perf_counter() - t0
    collisions = {n: {"items": c.codes.n_items, "collision_rate": round(c.codes.collision_rate, 4),
                      "largest_group": int(torch.unique(c.codes.codes[:, :4], dim=0, return_counts=True)[1].max())}
                  for n, c in catalogs.items()}
    log(f"codes ({tokenize_s:.0f}s): " + ", ".join(f"{n} {v['collision_rate']:.3f}" for n, v in collisions.items()))

    # 3. pre-training
    t0 = time.perf_counter()
    decoder = recgpt.pretrain_decoder([catalogs[n] for n in pretrain], sequences, params, seed, store,
                                      progress=args.progress, log=log)
    pretrain_s = time.perf_counter() - t0

    # 4-5. each target: zero-shot, fine-tuned, in-domain baselines; leave-one-out and cold-start users
    rows, speed = [], None
    for n, ds in targets.items():
        loo = leave_one_out_split(ds)
        cold = cold_start_split(ds, 2, 4, seed=seed)
        protocols = {}
        for proto, split in (("loo", loo), ("cold", cold)):
            eligible, _, _ = relevant_items(split.test, ds.n_users)
            protocols[proto] = (split, eval_users(eligible, size["eval_users"], seed))
        catalog = catalogs[n]
        t0 = time.perf_counter()
        tuned = recgpt.finetune_decoder(decoder, catalog, recgpt.sample_sequences(
            ds, loo.train, size["finetune_users"], seed), params, seed, store, loop=f"finetune-{n}", log=log)
        finetune_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        trained = baselines(ds, loo, size, seed)
        baseline_s = time.perf_counter() - t0
        log(f"{n}: fine-tuned in {finetune_s:.0f}s, baselines in {baseline_s:.0f}s")
        models = {"RecGPT zero-shot": (decoder, True), "RecGPT zero-shot (history allowed)": (decoder, False),
                  "RecGPT fine-tuned": (tuned, True), **{b: (m, True) for b, m in trained.items()}}
        for proto, (split, users) in protocols.items():
            for label, (model, excluded) in models.items():
                if label.startswith("RecGPT"):
                    model = recgpt.beam_recommender(model, catalog, params.beam, excluded)
                t0 = time.perf_counter()
                result = evaluate(model, ds, split, ks=KS, users=users, exclude_history=excluded, progress=False)
                rows.append({"target": n, "protocol": proto, "model": label, **accuracy(result),
                             "users_hash": stable_hash(users.tolist()), "eval_s": round(time.perf_counter() - t0, 1)})
                log(f"{n} {proto:4s} {label:36s} HR@10 {rows[-1]['hr@10']:.4f} NDCG@10 {rows[-1]['ndcg@10']:.4f}")
        if speed is None:  # beam speed on the first target's leave-one-out users
            split, users = protocols["loo"]
            history = ds.sequences(split.history("test"))
            speed = beam_speed(decoder, catalog, [history[int(u)] for u in users[:size["speed_users"]]],
                               params.beam)
            log(f"beam: vectorised {speed['vectorised_s']}s vs Python loop {speed['python_loop_s']}s "
                f"(x{speed['speedup']}), same items {speed['same_items']}")

    verdict = make_verdict(rows)
    report = {"benchmark": "recgpt_zeroshot", "size": name, "settings": size, "params": params.model_dump(mode="json"),
              "seed": seed, "machine": {"python": platform.python_version(), "torch": torch.__version__,
                                        "threads": torch.get_num_threads()},
              "pretrain_domains": list(pretrain), "pretrain_sequences": sum(len(s) for s in sequences),
              "collisions": collisions, "beam_speed": speed, "rows": rows, "verdict": verdict,
              "seconds": {"tokenize": round(tokenize_s, 1), "pretrain": round(pretrain_s, 1),
                          "total": round(time.perf_counter() - started, 1)},
              "pretrain_losses": [r for r in store.records if r.get("loop") == "pretrain"]}
    write_json(out, report)
    print(table(rows))
    print(verdict)
    print(f"wrote {out}")


def table(rows: list[dict]) -> str:
    """A markdown table of every row."""
    cols = [f"{m}@{k}" for m in ("hr", "ndcg") for k in KS]
    lines = ["| target | users | model | " + " | ".join(cols) + " |", "|---|---|---|" + "---:|" * len(cols)]
    for r in rows:
        lines.append(f"| {r['target']} | {r['protocol']} ({r['n_users']}) | {r['model']} | "
                     + " | ".join(f"{r[c]:.4f}" for c in cols) + " |")
    return "\n".join(lines)


def make_verdict(rows: list[dict]) -> str:
    """One plain line: RecGPT zero-shot NDCG@10 as a share of the best in-domain baseline, per target and protocol."""
    parts, close = [], []
    for target in dict.fromkeys(r["target"] for r in rows):
        for proto in ("loo", "cold"):
            pick = {r["model"]: r for r in rows if r["target"] == target and r["protocol"] == proto}
            best = max(("SASRec", "Popularity"), key=lambda m: pick[m]["ndcg@10"])
            ratio = pick["RecGPT zero-shot"]["ndcg@10"] / max(pick[best]["ndcg@10"], 1e-9)
            close.append(ratio >= 0.8)
            parts.append(f"{target}/{proto} {ratio:.0%} of {best}")
    claim = ("holds" if all(close) else "holds only partly" if any(close) else "does not hold")
    return (f"Verdict: the claim 'zero-shot close to in-domain baselines' (>= 80% of the best in-domain NDCG@10) "
            f"{claim} here: zero-shot RecGPT NDCG@10 = " + "; ".join(parts) + ".")


if __name__ == "__main__":
    main()
