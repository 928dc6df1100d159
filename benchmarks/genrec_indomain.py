"""RecGPT in-domain (protocol `in_domain`) on P5 Beauty and Toys against SASRec and Popularity, same users.

Leave-one-out (last item = test, second-to-last = validation), full catalog, history excluded, through the one list
evaluator. RecGPT reads item text from p5-text (MiniLM, cached), its tokenizer (RQ-KMeans or FSQ) is fitted on the
target's item texts, its decoder trained on the target's training part only, early-stopped on the validation part
(exact scoring, NDCG@10, seeded validation users). Both list sources are scored on the same test users: the beam
and exact full-catalog scoring (per-metric differences). Also the collision rate, train seconds per epoch and
inference milliseconds per user. Writes benchmarks/results/genrec_indomain.json (+ _quick) and prints a table.

    .venv/bin/python benchmarks/genrec_indomain.py --quick                      # smoke run, a few minutes
    .venv/bin/python benchmarks/genrec_indomain.py --datasets beauty --seeds 0 1 2 --codes rq_kmeans fsq

Anchors (../shared/reference/anchors.md §1.2, §5.1): TIGER Beauty R@10 0.0648 / N@10 0.0384, Toys 0.0712 / 0.0432;
LC-Rec Beauty 0.0791 / 0.0438. Resumable: tokenizer, trained decoder and evaluations are checkpoints under --work.
"""

from __future__ import annotations

import argparse
import os
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
from recalign.data.split import leave_one_out_split  # noqa: E402
from recalign.eval.evaluate import eval_users, evaluate, relevant_items  # noqa: E402
from recalign.io import write_json  # noqa: E402
from recalign.methods.recgpt import algorithm as recgpt  # noqa: E402
from recalign.methods.recgpt.text import DEFAULT_TEXT_MODEL  # noqa: E402
from recalign.teachers.registry import get_teacher  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results"
KS = (5, 10, 20)
METRICS = [f"{m}@{k}" for m in ("recall", "ndcg") for k in KS]
ANCHORS = {"beauty": {"TIGER": (0.0648, 0.0384), "LC-Rec": (0.0791, 0.0438)}, "toys": {"TIGER": (0.0712, 0.0432)}}

# Code settings: RQ-KMeans 3 levels x 256 (TIGER's semantic-ID shape) and FSQ, the paper's, at 4 chunks.
CODES = {"rq_kmeans": {"kind": "rq_kmeans", "rq_kmeans": {"levels": 3, "codebook_size": 256, "iterations": 20}},
         "fsq": {"kind": "fsq", "levels": [8, 8, 8, 6, 5], "n_chunks": 4, "epochs": 20}}
SIZES = {  # quick: a smoke run on a subset of training users and a few epochs
    "quick": dict(users=3000, max_epochs=3, patience=2, valid_users=500, test_users=1000, sasrec_seconds=40),
    "full": dict(users=None, max_epochs=30, patience=3, valid_users=2000, test_users=None, sasrec_seconds=600),
}
# recalign's SASRec on Beauty as benchmarks/teachers_quality.py runs it (time cap set per run size)
SASREC = dict(loss="sampled_softmax", negatives=512, max_len=50, dim=64, blocks=2, heads=1, dropout=0.5, lr=1e-3,
              batch_size=128, epochs=200, eval_every=2, patience=8, valid_users=6000)


TFIDF = "tfidf-svd-256"  # --text tfidf: a TF-IDF (1-2 grams) + truncated SVD encoder of the same item texts


def tfidf_svd(texts: list[str]) -> np.ndarray:
    """256-d L2-normalised TF-IDF + SVD vectors of the item texts (seeded; seconds on the CPU, where MiniLM took
    ~0.4 s per text on the loaded machine)."""
    from sklearn.decomposition import TruncatedSVD
    from sklearn.feature_extraction.text import TfidfVectorizer

    matrix = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True).fit_transform(texts)
    vectors = TruncatedSVD(256, random_state=0).fit_transform(matrix)
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


def use_text_encoder(kind: str) -> str:
    """The `text_model` of `--text`: MiniLM (the default of the stage) or TF-IDF + SVD (patched in, cached under
    its own name)."""
    if kind == "minilm":
        return DEFAULT_TEXT_MODEL
    real = recgpt.embed_texts
    recgpt.embed_texts = lambda texts, model, **kw: real(  # noqa: E731
        texts, model, **({**kw, "encoder": tfidf_svd} if model == TFIDF else kw))
    return TFIDF


def params_for(code: str, size: dict, args) -> recgpt.RecGPTConfig:
    """RecGPT settings of one code kind and run size."""
    return recgpt.RecGPTConfig(
        protocol="in_domain", text_model=args.text_model, text_max_tokens=64, tokenizer=CODES[code],
        decoder={"n_layers": args.layers, "dim": args.dim, "n_heads": 4, "max_items": 20, "dropout": 0.1},
        in_domain={"max_epochs": size["max_epochs"], "patience": size["patience"], "batch_size": 64,
                   "lr": args.lr, "users": args.train_users or size["users"], "valid_users": size["valid_users"],
                   "valid_inference": "exact", "max_seconds": args.max_train_seconds},
        beam={"widths": [args.beam, args.beam], "extensions": 10, "batch_size": 128, "mode": "both"},
        history=["excluded"])


def accuracy(result: dict) -> dict:
    """Recall/NDCG at KS (hr = recall with one target) and the number of users."""
    return {**{m: round(float(result[m]), 4) for m in METRICS}, "n_users": int(result["n_users"])}


def run_recgpt(ds, split, users, code: str, seed: int, size: dict, args, log) -> dict:
    """One RecGPT in-domain run: its row (beam lists), the exact lists' row and the training record."""
    params = params_for(code, size, args)
    timings = {}

    def scored(model, excluded):
        started = time.perf_counter()
        result = evaluate(model, ds, split, part="test", ks=KS, users=users, exclude_history=excluded,
                          progress=False)
        timings[type(model).__name__] = time.perf_counter() - started
        return result

    def validate(model, excluded):
        return evaluate(model, ds, split, part="valid", ks=(10,), n_users=size["valid_users"], seed=seed,
                        exclude_history=excluded, progress=False)

    key = stable_hash({"params": params.fingerprint_dump(), "data": ds.fingerprint(), "seed": seed,
                       "users": stable_hash(users.tolist())})
    work = args.work / f"{ds.name}-{code}-seed{seed}-{key[:12]}"
    result = recgpt.run_recgpt(params, ds, [], work, evaluate=scored, validate=validate, train_interactions=split.train,
                               seed=seed, fingerprint=key, log=log)
    record = result.in_domain
    beam, exact = result.zero_shot["excluded"], result.zero_shot_exact["excluded"]
    common = {"dataset": ds.name, "code": code, "seed": seed,
              "collision_rate": round(result.target.codes.collision_rate, 4),
              "disambiguation_size": result.target.codes.sizes[-1], "best_epoch": record["best_epoch"],
              "epochs": record["epochs"], "valid_ndcg@10": round(record["best_valid"], 4),
              "train_s_per_epoch": round(record["train_seconds"] / record["epochs"], 1)}
    rows = []
    for source, metrics, name in (("beam", beam, "BeamLists"), ("exact", exact, "ExactLists")):
        ms = timings.get(name)
        rows.append({**common, "model": f"RecGPT {code} ({source})", **accuracy(metrics),
                     "infer_ms_per_user": None if ms is None else round(1000 * ms / len(users), 2)})
    return {"rows": rows, "curve": record["curve"], "difference": {m: round(rows[1][m] - rows[0][m], 4)
                                                                 for m in METRICS}}


def run_baselines(ds, split, users, seed: int, size: dict, log) -> list[dict]:
    """Popularity and SASRec (teachers_quality's Beauty settings, capped at `sasrec_seconds`) on the same users."""
    rows = []
    models = {"Popularity": (get_teacher("popularity")(seed=seed), {}),
              "SASRec": (get_teacher("sasrec")(seed=seed, **SASREC, max_train_seconds=size["sasrec_seconds"]),
                         {"valid": split.valid})}
    for name, (model, extra) in models.items():
        started = time.perf_counter()
        model.fit(ds, split.train, progress=False, **extra)
        train_s = time.perf_counter() - started
        started = time.perf_counter()
        result = evaluate(model, ds, split, part="test", ks=KS, users=users, exclude_history=True, progress=False)
        rows.append({"dataset": ds.name, "model": name, "seed": seed, **accuracy(result),
                     "train_s": round(train_s, 1), "epochs": getattr(model, "epochs_trained_", None),
                     "best_epoch": getattr(model, "best_epoch_", None),
                     "infer_ms_per_user": round(1000 * (time.perf_counter() - started) / len(users), 2)})
        log(f"{ds.name} {name} seed {seed}: recall@10 {rows[-1]['recall@10']:.4f} ndcg@10 {rows[-1]['ndcg@10']:.4f}"
            f" ({train_s:.0f}s)")
    return rows


def hot_path(args, log) -> dict:
    """Seconds per training epoch and validation NDCG@10 of the decoder trained the old way (random batches,
    logits for every slot and every position's full width, a new AdamW per epoch) and the new way (length-grouped
    batches, sparse per-position logits, one AdamW), on a fixed small setting: Beauty, 2,000 seeded training users,
    2 epochs, seed 0, validation on 1,000 seeded users (exact lists)."""
    from recalign.methods.recgpt.training import DecoderTraining, train_decoder

    ds = load("beauty")
    split = leave_one_out_split(ds)
    sequences = [s.tolist() for s in recgpt.sample_sequences(ds, split.train, 2000, 0)]
    out = {}
    for code in args.codes:
        params = params_for(code, SIZES["quick"], args)
        _, catalogs = recgpt.build_catalogs({"target": (ds, np.arange(ds.n_items))}, ["target"], params, 0)
        catalog = catalogs["target"]
        for variant, new in (("before", False), ("after", True)):
            decoder = recgpt.new_decoder(catalog, params.decoder, 0)
            optimizer = torch.optim.AdamW(decoder.parameters(), lr=args.lr, weight_decay=0.01) if new else None
            seconds = []
            for epoch in (1, 2):
                settings = DecoderTraining(epochs=1, batch_size=64, lr=args.lr, seed=epoch, length_grouped=new,
                                           sparse_logits=new)
                seconds.append(train_decoder(decoder, sequences, catalog.codes, catalog.vectors, settings,
                                             optimizer).seconds)
            with torch.no_grad():
                valid = evaluate(recgpt.exact_recommender(decoder, catalog, True), ds, split, part="valid", ks=(10,),
                                 n_users=1000, seed=0, progress=False)
            out[f"{code}/{variant}"] = {"s_per_epoch": round(float(np.mean(seconds)), 2),
                                        "valid_ndcg@10": round(float(valid["ndcg@10"]), 4),
                                        "valid_recall@10": round(float(valid["recall@10"]), 4)}
            log(f"hot path {code} {variant}: {out[f'{code}/{variant}']}")
    return out


def load(name: str):
    """P5 Beauty or Toys with item text (p5-text source)."""
    return prepare_source("p5-text", DATA / "p5-text" / name, name=name.capitalize())


def summary(rows: list[dict]) -> list[dict]:
    """Mean and standard deviation over seeds per (dataset, model)."""
    out = []
    for key in dict.fromkeys((r["dataset"], r["model"]) for r in rows):
        group = [r for r in rows if (r["dataset"], r["model"]) == key]
        entry = {"dataset": key[0], "model": key[1], "seeds": [r["seed"] for r in group]}
        for m in METRICS + ["collision_rate", "train_s_per_epoch", "infer_ms_per_user", "best_epoch", "train_s"]:
            values = [r[m] for r in group if r.get(m) is not None]
            if values:
                entry[m] = round(float(np.mean(values)), 4)
                if m in METRICS and len(values) > 1:
                    entry[m + "_std"] = round(float(np.std(values)), 4)
        out.append(entry)
    return out


def table(means: list[dict]) -> str:
    """Markdown table of the seed means."""
    lines = ["| dataset | model | seeds | R@10 | N@10 | R@20 | N@20 | collisions | train s/epoch | ms/user |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in means:
        std = f" ± {r['recall@10_std']:.4f}" if "recall@10_std" in r else ""
        nstd = f" ± {r['ndcg@10_std']:.4f}" if "ndcg@10_std" in r else ""
        opt = lambda k, f: (f.format(r[k]) if k in r else "")  # noqa: E731
        lines.append(f"| {r['dataset']} | {r['model']} | {len(r['seeds'])} | {r['recall@10']:.4f}{std} | "
                     f"{r['ndcg@10']:.4f}{nstd} | {r['recall@20']:.4f} | {r['ndcg@20']:.4f} | "
                     f"{opt('collision_rate', '{:.4f}')} | {opt('train_s_per_epoch', '{:.1f}')} | "
                     f"{opt('infer_ms_per_user', '{:.2f}')} |")
    return "\n".join(lines)


def verdict(means: list[dict]) -> str:
    """Per dataset, the RecGPT row chosen on validation (seed-mean valid NDCG@10, exact lists on a tie) vs the
    anchors."""
    parts = []
    for ds in dict.fromkeys(r["dataset"] for r in means):
        rec = [r for r in means if r["dataset"] == ds and r["model"].startswith("RecGPT")]
        if not rec:
            continue
        best = max(rec, key=lambda r: (r.get("valid_ndcg@10", 0.0), r["model"].endswith("(exact)")))
        versus = [f"{'at or above' if best['recall@10'] >= r10 and best['ndcg@10'] >= n10 else 'below'} {anchor} "
                  f"{r10} / {n10}" for anchor, (r10, n10) in ANCHORS.get(ds.lower(), {}).items()]
        parts.append(f"{ds}: {best['model']} R@10 {best['recall@10']:.4f} / N@10 {best['ndcg@10']:.4f}, "
                     + ", ".join(versus))
    return "; ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 3,000 training users, 3 epochs")
    parser.add_argument("--datasets", nargs="+", default=["beauty", "toys"], choices=["beauty", "toys"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--seeds-for", nargs="+", default=[], metavar="DATASET=S,S",
                        help="seeds of one dataset instead of --seeds, e.g. toys=0 (one seed of Toys beside three "
                             "of Beauty: the 90-minute budget run)")
    parser.add_argument("--codes", nargs="*", default=["rq_kmeans", "fsq"], choices=list(CODES),
                        help="code kinds to run (none: baselines only)")
    parser.add_argument("--code-seeds", type=int, default=None, help="seeds run for codes after the first "
                                                                     "(default: all)")
    parser.add_argument("--baselines", choices=["all", "first-seed", "none"], default="first-seed")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--beam", type=int, default=20, help="beams kept per code position")
    parser.add_argument("--max-epochs", type=int, default=None)
    parser.add_argument("--sasrec-seconds", type=float, default=None)
    parser.add_argument("--test-users", type=int, default=None, help="seeded subset of test users (default all)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--text", choices=["tfidf", "minilm"], default="tfidf", help="item text encoder")
    parser.add_argument("--train-users", type=int, default=None, help="seeded subset of training users")
    parser.add_argument("--max-train-seconds", type=float, default=None, help="RecGPT training time cap per run")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-genrec-indomain")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--merge", nargs="+", type=Path, default=None,
                        help="merge reports of runs done in parallel processes into --out")
    parser.add_argument("--hot-path", action="store_true", help="only the before/after epoch-time comparison "
                                                                "(-> genrec_indomain_hotpath.json)")
    args = parser.parse_args()
    for spec in args.seeds_for:
        key, eq, seeds = spec.partition("=")
        if key not in ("beauty", "toys") or not eq or not all(x.strip().isdigit() for x in seeds.split(",")):
            parser.error(f"--seeds-for {spec!r}: expected DATASET=S[,S...] with DATASET beauty or toys")
    torch.set_num_threads(args.threads)
    args.text_model = use_text_encoder(args.text)
    if args.merge:
        merged = merge_reports(args.merge, args.out or RESULTS / "genrec_indomain.json")
        print(table(merged["summary"]))
        print("Verdict:", merged["verdict"])
        return
    if args.hot_path:
        started = time.perf_counter()
        found = hot_path(args, lambda m: print(f"[{time.perf_counter() - started:7.1f}s] {m}", flush=True))
        write_json(RESULTS / "genrec_indomain_hotpath.json", {
            "benchmark": "genrec_indomain hot path", "command": " ".join(sys.argv), "results": found,
            "settings": {"layers": args.layers, "dim": args.dim, "lr": args.lr, "users": 2000, "epochs": 2},
            "machine": {"threads": torch.get_num_threads(), "load_average": list(os.getloadavg())}})
        return
    size = dict(SIZES["quick" if args.quick else "full"])
    for key, value in (("max_epochs", args.max_epochs), ("sasrec_seconds", args.sasrec_seconds),
                       ("test_users", args.test_users)):
        if value is not None:
            size[key] = value
    out = args.out or RESULTS / f"genrec_indomain{'_quick' if args.quick else ''}.json"
    started = time.perf_counter()
    log = lambda m: print(f"[{time.perf_counter() - started:7.1f}s] {m}", flush=True)  # noqa: E731
    rows, curves, differences = [], {}, {}
    for name in args.datasets:
        run_dataset(name, args, size, (rows, curves, differences), lambda: write_report(
            out, args, size, rows, curves, differences, started), log)
    report = write_report(out, args, size, rows, curves, differences, started)
    print(table(report["summary"]))
    print("Exact minus beam (per run):", differences)
    print("Verdict:", report["verdict"])
    print(f"wrote {out}")


def dataset_seeds(args, name: str) -> list[int]:
    """`--seeds`, unless `--seeds-for NAME=...` names other seeds for this dataset."""
    for spec in args.seeds_for:
        key, _, seeds = spec.partition("=")
        if key == name:
            return [int(s) for s in seeds.split(",") if s]
    return list(args.seeds)


def run_dataset(name: str, args, size: dict, found: tuple[list, dict, dict], save, log) -> None:
    """Baselines and every RecGPT run of one dataset on its test users; `found` (rows, curves, differences) grows
    and `save()` rewrites the report after each run."""
    rows, curves, differences = found
    ds = load(name)
    split = leave_one_out_split(ds)
    eligible, _, _ = relevant_items(split.test, ds.n_users)
    users = eval_users(eligible, size["test_users"], 0)  # the same users for every model and seed
    log(f"{ds.name}: {ds.n_users} users, {ds.n_items} items, {len(users)} test users")
    for i, seed in enumerate(dataset_seeds(args, name)):
        if args.baselines == "all" or (args.baselines == "first-seed" and i == 0):
            rows += run_baselines(ds, split, users, seed, size, log)
            save()
        for j, code in enumerate(args.codes):
            if j > 0 and args.code_seeds is not None and i >= args.code_seeds:
                continue
            run = run_recgpt(ds, split, users, code, seed, size, args, log)
            rows += run["rows"]
            curves[f"{ds.name}/{code}/seed{seed}"] = run["curve"]
            differences[f"{ds.name}/{code}/seed{seed}"] = run["difference"]
            for r in run["rows"]:
                log(f"{ds.name} {r['model']} seed {seed}: recall@10 {r['recall@10']:.4f} "
                    f"ndcg@10 {r['ndcg@10']:.4f} (best epoch {r['best_epoch']}/{r['epochs']}, "
                    f"{r['train_s_per_epoch']}s/epoch, {r['infer_ms_per_user']} ms/user)")
            save()


def merge_reports(paths: list[Path], out: Path) -> dict:
    """One report from several (their rows, curves and differences joined; summary and verdict recomputed)."""
    from recalign.io import read_json

    parts = [read_json(p) for p in paths]
    rows = [r for p in parts for r in p["rows"]]
    means = summary(rows)
    add_valid(means, rows)
    report = {"benchmark": "genrec_indomain", "merged_from": [str(p) for p in paths],
              "commands": [p["command"] for p in parts], "settings": [p["settings"] for p in parts],
              "machine": [p["machine"] for p in parts], "anchors": ANCHORS, "rows": rows, "summary": means,
              "exact_minus_beam": {k: v for p in parts for k, v in p["exact_minus_beam"].items()},
              "curves": {k: v for p in parts for k, v in p["curves"].items()}, "verdict": verdict(means),
              "seconds": [p["seconds"] for p in parts]}
    write_json(out, report)
    return report


def add_valid(means: list[dict], rows: list[dict]) -> None:
    """The seed-mean validation NDCG@10 of each RecGPT summary row (what chooses between code settings)."""
    for m in means:
        valid = [r["valid_ndcg@10"] for r in rows if (r["dataset"], r["model"]) == (m["dataset"], m["model"])
                 and "valid_ndcg@10" in r]
        if valid:
            m["valid_ndcg@10"] = round(float(np.mean(valid)), 4)


def write_report(out: Path, args, size: dict, rows, curves, differences, started: float) -> dict:
    """The JSON report so far (rewritten after every run, so a stopped benchmark keeps what finished)."""
    means = summary(rows)
    add_valid(means, rows)
    report = {"benchmark": "genrec_indomain", "quick": args.quick, "command": " ".join(sys.argv),
              "settings": {**size, "text": args.text, "train_users": args.train_users,
                           "max_train_seconds": args.max_train_seconds, "layers": args.layers, "dim": args.dim,
                           "lr": args.lr, "beam": args.beam,
                           "codes": {c: CODES[c] for c in args.codes}, "sasrec": SASREC, "seeds": args.seeds,
                           "seeds_for": args.seeds_for},
              "machine": {"python": platform.python_version(), "torch": torch.__version__,
                          "threads": torch.get_num_threads(), "load_average": list(os.getloadavg())},
              "anchors": ANCHORS, "rows": rows, "summary": means, "exact_minus_beam": differences,
              "curves": curves, "verdict": verdict(means), "seconds": round(time.perf_counter() - started, 1)}
    write_json(out, report)
    return report


if __name__ == "__main__":
    main()
