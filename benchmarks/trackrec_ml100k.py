"""TrackRec on MovieLens-100K: SmolLM2-135M as G and V, then G's CoTs as KAR knowledge in DIN, DeepFM and DCNv2.

1. LLM side: `recipes/trackrec-ml100k.yaml`'s stage settings (STAND-IN teacher: a deterministic history summariser,
   not an LLM), sizes from the command line, run (or resumed) with `run_trackrec` in `<work>/llm`; LLM-test ACC,
   AUC, LogLoss and valid ratio per iteration (0 = distilled G0 with the un-tuned V0, then 1..N).
2. CTR side: a seeded sample of users from each part of the SAME user split as the LLM side (so no CTR validation or
   test user ever trained G or V). One CoT per user, written greedily by a G from the user's profile and the
   history before an anchor (the user's first impression with a full history); the user's impressions from the
   anchor on (at most `--per-user`, in time order) carry that CoT, so the knowledge never sees the future. Both
   G0 (after distillation) and the aligned G (last iteration) write CoTs for the same users. Knowledge = MiniLM of
   the prompt text (here the candidate's title and genres: one text per item, so cheap; TrackRec embeds its whole
   CTR prompt, whose history the backbone already reads) and of the CoT. DIN, DeepFM and DCNv2: alone vs
   + KAR(CoTs of G0) vs + KAR(CoTs of aligned G), 3 model seeds, epoch and grid point chosen on VALIDATION AUC.
3. Verdict per backbone: aligned vs alone and aligned vs G0, a paired bootstrap over test impressions (1,000
   resamples, vectorised) of the AUC of the seed-averaged predictions: "supported" when the 95% interval is above 0,
   "contradicted" when below, else "not shown".

Everything lands in `--work` (default /tmp/bench/trackrec-run) and a rerun resumes: finished LLM iterations, the CoT
files (written every `--chunk` users), the embedding cache and every finished CTR fit are kept.

    .venv/bin/python benchmarks/trackrec_ml100k.py --quick     # tiny random Llama, plumbing only (< 3 min)
    .venv/bin/python benchmarks/trackrec_ml100k.py --threads 1 # SmolLM2-135M, the defaults (sized for <= 90 min)

Defaults, sized for <= 90 min on this 2-core CPU shared with other jobs (the process gets ~0.55 of a core there).
Measured here under load (SmolLM2-135M, float32, 1 thread): a 48-token CoT from a ~210-token CoT prompt (history
10) costs ~3.2 CPU-s at batch 16; one ~310-token V prompt ~2.75 CPU-s; one LoRA SFT step of 4 x ~280 tokens ~40
CPU-s (73 s wall): the first try (history 10, 16 train x 4 samples, 32 test, 48 tokens) projected ~40 min wall per
iteration and was stopped. Hence: prompts with the last 5 rated items, 32-token CoTs, LLM loop 2 iterations x
(8 train impressions x 4 sampled CoTs scored by V, S-DPO, greedy CoTs, V Rec-tuning, 24 test impressions); CTR side
80 / 20 / 20 users (train / validation / test), <= 50 impressions per user, 240 CoTs from two Gs, one grid point
(batch 256, lr 2e-3) with the epoch chosen on validation.
JSON: benchmarks/results/trackrec_ml100k.json (--quick: trackrec_ml100k_quick.json).
Data is read in place from ../shared/data/ml-100k (never copied into the repository).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from ctr_backbones import ctr_settings, fit_run, print_table, summarise  # noqa: E402

from recalign.checkpoints import stable_hash  # noqa: E402
from recalign.methods.trackrec.ctr.data import Impressions, build_impressions, split_users  # noqa: E402
from recalign.methods.trackrec.ctr.knowledge import DEFAULT_MODEL, load_knowledge, write_knowledge  # noqa: E402
from recalign.methods.trackrec.ctr.train import BACKBONES, predict  # noqa: E402
from recalign.data.sources import prepare_source  # noqa: E402
from recalign.errors import ConfigError, RecalignError  # noqa: E402
from recalign.io import write_json  # noqa: E402
from recalign.methods.trackrec.algorithm import TitleCatalog, CtrRows, generate_cots, run_trackrec, teacher_name  # noqa: E402
from recalign.methods.trackrec.config import TrackRecConfig, TrackRecStageConfig  # noqa: E402
from recalign.methods.trackrec.stage import alternation_table  # noqa: E402


DATA = ROOT.parent / "shared" / "data" / "ml-100k"
RECIPE = ROOT / "recipes" / "trackrec-ml100k.yaml"
RESULTS = ROOT / "benchmarks" / "results"
CTR_HISTORY = 10  # the backbones' history (the CTR protocol of benchmarks/ctr_backbones.py)
VARIANTS = {"alone": None, "+KAR (G0 CoTs)": "first", "+KAR (aligned CoTs)": "aligned"}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--raw", type=Path, default=DATA, help="ml-100k folder (u.data, u.item, u.user)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench/trackrec-run"), help="resumable work folder")
    parser.add_argument("--model", default="smollm2", help="G and V base model (--quick: tiny)")
    parser.add_argument("--iterations", type=int, default=2, help="alternating iterations after distillation")
    parser.add_argument("--train-rows", type=int, default=8, help="LLM loop: train impressions (seeded sample)")
    parser.add_argument("--test-rows", type=int, default=24, help="LLM loop: test impressions (seeded sample)")
    parser.add_argument("--n-samples", type=int, default=4, help="LLM loop: CoTs sampled per train impression")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="tokens per CoT (loop and CTR side)")
    parser.add_argument("--history", type=int, default=5, help="rated items in the LLM prompts (<= 10)")
    parser.add_argument("--batch", type=int, default=16, help="prompts per generate call in the LLM loop")
    parser.add_argument("--cot-batch", type=int, default=32, help="prompts per generate call for the CTR CoTs")
    parser.add_argument("--ctr-users", type=int, nargs=3, default=[80, 40, 40], metavar=("TRAIN", "VALID", "TEST"),
                        help="CTR side: seeded sample of users per part of the user split (one CoT per user per G)")
    parser.add_argument("--per-user", type=int, default=150, help="CTR side: impressions per user from the anchor on")
    parser.add_argument("--chunk", type=int, default=32, help="users per saved chunk of CoTs")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="CTR model seeds")
    parser.add_argument("--backbones", nargs="+", default=sorted(BACKBONES), choices=sorted(BACKBONES))
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--patience", type=int, default=3)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[256])
    parser.add_argument("--lrs", type=float, nargs="+", default=[2e-3])
    parser.add_argument("--text-model", default=DEFAULT_MODEL)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--seed", type=int, default=0, help="user split, samples and the LLM loop")
    parser.add_argument("--out", type=Path, default=None, help="JSON (default benchmarks/results/trackrec_ml100k.json)")
    parser.add_argument("--quick", action="store_true", help="tiny random Llama, tiny sizes, 1 seed: plumbing")
    args = parser.parse_args()
    if args.quick:
        args.model, args.iterations, args.train_rows, args.test_rows, args.n_samples = "tiny", 2, 4, 8, 2
        args.max_new_tokens, args.ctr_users, args.per_user, args.seeds, args.epochs = 16, [24, 12, 12], 12, [0], 3
        args.lrs, args.work = [2e-3], args.work.with_name(args.work.name + "-quick")
    if not 1 <= args.history <= CTR_HISTORY:
        parser.error(f"--history: expected 1..{CTR_HISTORY}, got {args.history}")
    args.out = args.out or RESULTS / ("trackrec_ml100k_quick.json" if args.quick else "trackrec_ml100k.json")
    return args


def say(message: str) -> None:
    """A timestamped progress line."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# ---- LLM side -----------------------------------------------------------------------------------------------------

def recipe_params(args: argparse.Namespace) -> TrackRecStageConfig:
    """The recipe's trackrec stage params with this run's sizes (model, iterations, rows, samples, tokens)."""
    stage = yaml.safe_load(RECIPE.read_text(encoding="utf-8"))["stages"][0]["params"]
    stage.update(model=args.model, iterations=args.iterations, train_rows=args.train_rows, test_rows=args.test_rows,
                 n_samples=args.n_samples, history_len=args.history, seed=args.seed)
    stage["decoding"] = {**stage.get("decoding", {}), "max_new_tokens": args.max_new_tokens,
                         "batch_size": args.batch}
    if args.quick:  # the tiny model learns nothing anyway: short steps
        for part in ("distill", "rec_tuning"):
            stage[part] = {**stage[part], "epochs": 1, "batch_size": 8, "max_length": 512}
        stage["sdpo"] = {**stage["sdpo"], "batch_size": 4, "max_length": 512}
    return TrackRecStageConfig(**stage)


def llm_rows(impressions: Impressions, history: int) -> CtrRows:
    """The LLM side's view of the impressions: the last `history` rated items (right-aligned history)."""
    rows = CtrRows.of(impressions)
    return CtrRows(rows.user, rows.item, rows.label, rows.history[:, -history:], rows.history_rating[:, -history:])


def run_llm_side(args, params: TrackRecStageConfig, impressions: Impressions, parts: dict[str, np.ndarray],
                 catalog: TitleCatalog) -> tuple[TrackRecConfig, list[dict]]:
    """Distillation and the alternating loop (resumed from `<work>/llm`); the per-iteration records."""
    config = TrackRecConfig(**params.model_dump(exclude={"history_len", "threshold", "split", "noun"}))
    check_prompt_settings(args.work / "llm-prompts.json", {"history": args.history, "threshold": params.threshold,
                                                          "split": params.split, "noun": params.noun})
    rows = llm_rows(impressions, args.history)
    say(f"LLM side: G and V = {config.model}, teacher = {teacher_name(config.teacher)}, {config.iterations} "
        f"iterations, {config.train_rows} train x {config.n_samples} samples, {config.test_rows} test")
    summary = run_trackrec(config, rows.take(parts["train"]), rows.take(parts["test"]), catalog, args.work / "llm",
                           progress=True, log=say)
    records = summary["iterations"]
    print(alternation_table(records), flush=True)
    return config, records


def check_prompt_settings(path: Path, settings: dict) -> None:
    """The loop's store keys on its config only: a work folder made with other prompt/impression settings is refused."""
    if path.is_file():
        before = json.loads(path.read_text(encoding="utf-8"))
        if before != settings:
            raise ConfigError(f"--work {path.parent}: made with {before}, this run asks for {settings}; "
                              "give another --work folder")
    else:
        write_json(path, settings)


# ---- CTR side: impressions, CoTs, knowledge -----------------------------------------------------------------------

def ctr_impressions(impressions: Impressions, parts: dict[str, np.ndarray], users: list[int], per_user: int,
                    seed: int) -> tuple[dict[str, Impressions], dict[str, Impressions]]:
    """(impressions per part, one anchor row per user per part): seeded users per part, rows from the anchor on.

    The anchor is a user's first impression (in time) whose history is full; the user's CoT is written from the
    anchor's history only, and the user's impressions from the anchor on (at most `per_user`) carry it.
    """
    rng = np.random.default_rng(seed)
    out, anchors = {}, {}
    for (name, rows), count in zip(parts.items(), users):
        part = impressions.take(rows)
        full = (part.history >= 0).all(axis=1)
        present = np.unique(part.user[full])
        chosen = rng.choice(present, size=min(count, len(present)), replace=False)
        order = np.lexsort((np.arange(len(part)), part.timestamp, part.user))  # by user, then time
        order = order[np.isin(part.user[order], chosen)]
        user, full = part.user[order], full[order]
        starts = np.flatnonzero(np.r_[True, user[1:] != user[:-1]])
        group = np.cumsum(np.r_[True, user[1:] != user[:-1]]) - 1
        position = np.arange(len(order))
        anchor = np.minimum.reduceat(np.where(full, position, len(order)), starts)[group]
        rank = position - anchor
        take = (rank >= 0) & (rank < per_user)
        out[name] = part.take(order[take])
        anchors[name] = part.take(order[rank == 0])
    return out, anchors


def user_cots(args, config: TrackRecConfig, checkpoint: Path, anchors: Impressions, catalog: TitleCatalog,
              path: Path) -> dict[int, str]:
    """{user: CoT} of the G in `checkpoint` for every anchor, generated in chunks saved to `path` (resumable)."""
    import pandas as pd

    done = pd.read_parquet(path) if path.is_file() else pd.DataFrame({"user": [], "cot": []})
    cots = dict(zip(done["user"].astype(int).tolist(), done["cot"].tolist()))
    todo = np.flatnonzero(~np.isin(anchors.user, list(cots)))
    rows = llm_rows(anchors, args.history)
    for start in range(0, len(todo), args.chunk):
        chunk = todo[start:start + args.chunk]
        t = time.perf_counter()
        texts = generate_cots(config, checkpoint, rows.take(chunk), catalog)
        cots.update(zip(anchors.user[chunk].tolist(), texts))
        _write_parquet(path, cots)
        have = int(np.isin(anchors.user, list(cots)).sum())
        say(f"  CoTs {path.stem}: {have}/{len(anchors.user)} users ({time.perf_counter() - t:.0f} s for "
            f"{len(chunk)})")
    return cots


def _write_parquet(path: Path, cots: dict[int, str]) -> None:
    """The {user: CoT} table as Parquet, written atomically."""
    import pandas as pd

    from recalign.io import atomic_path

    with atomic_path(path) as tmp:
        pd.DataFrame({"user": list(cots), "cot": list(cots.values())}).to_parquet(tmp, index=False)


def ctr_prompts(part: Impressions, item_text: list[str]) -> list[str]:
    """The prompt-tower text of every impression: the candidate's title and genres (one text per item: cheap)."""
    return [item_text[i] for i in part.item]


def knowledge_of(args, folder: Path, parts: dict[str, Impressions], prompts: dict[str, list[str]],
                 cots: dict[int, str]) -> dict[str, np.ndarray]:
    """[N, 2, d] (prompt, CoT) vectors per part: MiniLM (cached per text, recalign's cache), .npy per part."""
    knowledge = {}
    for name, part in parts.items():
        written = write_knowledge(folder / name, prompts[name], [cots[int(u)] for u in part.user], args.text_model)
        knowledge[name] = load_knowledge(written, rows=len(part))
    return knowledge


# ---- CTR side: fits and the verdict -------------------------------------------------------------------------------

def fit_all(args, folder: Path, parts: dict[str, Impressions], knowledge: dict[str, dict | None]) -> list[dict]:
    """Every (backbone, variant, seed) fit; finished fits are read back from `runs.jsonl` (test probabilities .npy)."""
    from recalign.methods.trackrec.ctr.data import to_batch

    log = folder / "runs.jsonl"
    runs = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
    done = {(r["backbone"], r["variant"], r["seed"]) for r in runs}
    for backbone in args.backbones:
        for variant in VARIANTS:
            for seed in args.seeds:
                if (backbone, variant, seed) in done:
                    continue
                row, result = fit_run(backbone, variant, seed, parts, knowledge[variant], ctr_settings(args, seed))
                test = knowledge[variant]["test"] if knowledge[variant] is not None else None
                probs = predict(result.model, to_batch(parts["test"], test))
                np.save(folder / f"probs-{backbone}-{VARIANTS[variant] or 'alone'}-{seed}.npy", probs)
                runs.append(row)
                with open(log, "a", encoding="utf-8") as handle:  # one finished fit per line: a rerun skips it
                    handle.write(json.dumps(row) + "\n")
    return runs


def bootstrap_auc(labels: np.ndarray, probs: list[np.ndarray], resamples: int = 1000,
                  seed: int = 0) -> np.ndarray:
    """[resamples, len(probs)] AUCs on the same row resamples (with replacement), all at once; ties count ½."""
    y = np.asarray(labels) > 0.5
    n = len(y)
    index = np.random.default_rng(seed).integers(0, n, (resamples, n))
    counts = np.bincount((index + n * np.arange(resamples)[:, None]).ravel(), minlength=resamples * n)
    counts = counts.reshape(resamples, n).astype(np.float64)
    out = []
    for p in probs:
        order = np.argsort(p, kind="stable")
        starts = np.flatnonzero(np.r_[True, np.diff(p[order]) != 0])  # groups of tied scores, ascending
        positives = np.add.reduceat((counts * y)[:, order], starts, axis=1)
        negatives = np.add.reduceat((counts * ~y)[:, order], starts, axis=1)
        below = np.cumsum(negatives, axis=1) - negatives
        pairs = positives.sum(1) * negatives.sum(1)
        out.append((positives * (below + 0.5 * negatives)).sum(1) / np.where(pairs > 0, pairs, np.nan))
    return np.stack(out, axis=1)


def verdicts(args, folder: Path, labels: np.ndarray, table: list[dict]) -> list[dict]:
    """Per backbone: aligned vs alone and aligned vs G0, paired bootstrap of the AUC of seed-averaged predictions."""
    from sklearn.metrics import roc_auc_score

    def probs(backbone: str, variant: str) -> np.ndarray:
        tag = VARIANTS[variant] or "alone"
        return np.mean([np.load(folder / f"probs-{backbone}-{tag}-{s}.npy") for s in args.seeds], axis=0)

    out = []
    aligned, first = "+KAR (aligned CoTs)", "+KAR (G0 CoTs)"
    for backbone in args.backbones:
        mean = {e["variant"]: e for e in table if e["backbone"] == backbone}
        entry = {"backbone": backbone}
        for name, other in (("aligned_vs_alone", "alone"), ("aligned_vs_g0", first)):
            a, b = probs(backbone, aligned), probs(backbone, other)
            boot = bootstrap_auc(labels, [a, b])
            low, high = np.nanpercentile(boot[:, 0] - boot[:, 1], [2.5, 97.5])
            call = "supported" if low > 0 else "contradicted" if high < 0 else "not shown"
            entry[name] = {"seed_mean_diff": mean[aligned]["auc"] - mean[other]["auc"],
                           "ensemble_diff": float(roc_auc_score(labels, a) - roc_auc_score(labels, b)),
                           "low": float(low), "high": float(high), "verdict": call}
        n = len(args.seeds)
        entry["line"] = (f"{backbone}: aligned CoTs vs plain backbone: {_phrase(entry['aligned_vs_alone'], n)}; "
                         f"vs G0 CoTs: {_phrase(entry['aligned_vs_g0'], n)}")
        out.append(entry)
    return out


def _phrase(d: dict, seeds: int) -> str:
    return (f"{d['verdict'].upper()} (mean test AUC {d['seed_mean_diff']:+.4f} over {seeds} seed{'s' if seeds != 1 else ''}; seed-averaged "
            f"{d['ensemble_diff']:+.4f}, 95% CI [{d['low']:+.4f}, {d['high']:+.4f}])")


# ---- main ---------------------------------------------------------------------------------------------------------

def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    started, seconds = time.perf_counter(), {}
    args.work.mkdir(parents=True, exist_ok=True)
    dataset = prepare_source("movielens-100k", args.raw)
    params = recipe_params(args)
    impressions = build_impressions(dataset, CTR_HISTORY, params.threshold)
    split = split_users(impressions, params.split, params.seed)  # the stage's split: one for both sides
    catalog = TitleCatalog.of(dataset, params.noun)

    t = time.perf_counter()
    config, records = run_llm_side(args, params, impressions, split, catalog)
    seconds["llm_loop"] = time.perf_counter() - t

    # CoTs depend on G and the prompt only (one file per G and part: any user sample reuses them); the knowledge and
    # the fits on the impression set as well
    llm_key = stable_hash({"llm": config.model_dump(mode="json"), "history": args.history})[:12]
    cot_folder = args.work / f"cots-{llm_key}"
    folder = args.work / f"ctr-{stable_hash([llm_key, args.ctr_users, args.per_user, args.seed])[:12]}"
    parts, anchors = ctr_impressions(impressions, split, args.ctr_users, args.per_user, args.seed)
    say("CTR impressions: " + ", ".join(f"{k} {len(v)} ({len(anchors[k])} users)" for k, v in parts.items()))
    checkpoints = {"first": args.work / "llm" / "distill",
                   "aligned": args.work / "llm" / "align" / f"iter_{records[-1]['iteration']}"}
    cots = {}
    cot_config = config.model_copy(update={"decoding": config.decoding.model_copy(
        update={"batch_size": args.cot_batch})})
    for tag, checkpoint in checkpoints.items():
        t = time.perf_counter()
        cots[tag] = {}
        for name in parts:
            cots[tag].update(user_cots(args, cot_config, checkpoint, anchors[name], catalog,
                                       cot_folder / f"cots_{tag}_{name}.parquet"))
        seconds[f"cots_{tag}"] = time.perf_counter() - t
        say(f"CoTs of {tag} G ready: e.g. {next(iter(cots[tag].values()))[:200]!r}")

    t = time.perf_counter()
    item_text = dataset.items["text"].tolist()
    prompts = {name: ctr_prompts(part, item_text) for name, part in parts.items()}
    knowledge = {variant: None if tag is None else knowledge_of(args, folder / "knowledge" / tag, parts, prompts,
                                                                cots[tag])
                 for variant, tag in VARIANTS.items()}
    seconds["embedding"] = time.perf_counter() - t
    say(f"knowledge ready in {seconds['embedding']:.0f} s")

    t = time.perf_counter()
    fit_key = stable_hash({k: getattr(args, k) for k in ("seeds", "epochs", "patience", "batch_sizes", "lrs",
                                                         "text_model")})[:12]
    fits = folder / f"fits-{fit_key}"
    fits.mkdir(parents=True, exist_ok=True)
    runs = fit_all(args, fits, parts, knowledge)
    seconds["ctr_fits"] = time.perf_counter() - t
    table = summarise(runs)
    print_table(table)
    verdict = verdicts(args, fits, parts["test"].label, table)
    print("\nLLM test per iteration (0 = distilled G0 with the un-tuned V0):\n" + alternation_table(records))
    for entry in verdict:
        print(entry["line"])
    for name in parts:
        same = np.mean([cots["first"][u] == cots["aligned"][u] for u in anchors[name].user.tolist()])
        print(f"{name}: the aligned G wrote the same CoT as G0 for {same:.0%} of the users")
    seconds["total_this_invocation"] = time.perf_counter() - started
    with open(args.work / "invocations.jsonl", "a", encoding="utf-8") as handle:  # every attempt on this folder
        handle.write(json.dumps({"finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "seconds": seconds,
                                 "ctr_users": args.ctr_users, "per_user": args.per_user}) + "\n")
    invocations = [json.loads(line) for line in (args.work / "invocations.jsonl").read_text().splitlines()]
    write_json(args.out, {
        "benchmark": "trackrec_ml100k", "data": "MovieLens-100K (../shared/data/ml-100k)",
        "llm": {"model": f"G {config.model}, V {config.verifier_model or config.model}",
                "teacher": teacher_name(config.teacher), "config": config.model_dump(mode="json"),
                "history_in_prompts": args.history, "iterations": records},
        "ctr": {"protocol": {"label": f"rating >= {params.threshold:g}", "history": CTR_HISTORY,
                             "user_split": params.split, "split_seed": params.seed,
                             "users_per_part": dict(zip(parts, args.ctr_users)), "per_user": args.per_user,
                             "cot": "one greedy CoT per user per G, from the history before the user's anchor "
                                    "(first full-history impression); impressions from the anchor on",
                             "knowledge": "prompt tower = the candidate's title and genres, CoT tower = the user's "
                                          f"CoT; both embedded with {args.text_model}",
                             "selection": "validation AUC (epoch and grid point)", "epochs": args.epochs,
                             "patience": args.patience, "batch_sizes": args.batch_sizes, "lrs": args.lrs,
                             "seeds": args.seeds},
                "sizes": {name: len(part) for name, part in parts.items()},
                "test_positive_rate": float(parts["test"].label.mean()),
                "cot_examples": {tag: dict(list(c.items())[:3]) for tag, c in cots.items()},
                "cots_identical_share": {name: float(np.mean([cots["first"][u] == cots["aligned"][u]
                                                              for u in anchors[name].user.tolist()]))
                                         for name in parts},
                "table": table, "verdict": verdict, "runs": runs},
        "seconds": seconds, "invocations": invocations, "work": str(args.work),
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "threads": args.threads},
    })
    print(f"wrote {args.out} in {seconds['total_this_invocation']:.0f} s")


if __name__ == "__main__":
    try:
        main()
    except RecalignError as exc:  # a user's mistake (bad folder, bad sizes): one line, exit 2
        print(f"trackrec_ml100k: error: {exc}", file=sys.stderr)
        sys.exit(2)
