"""TRD over seven teachers on MovieLens-100K, under both protocols, with paired bootstrap intervals of TRD - teacher.

Teachers: the paper's five (MostPop = `popularity`, `itemknn`, `bprmf`, `item2vec`, `neumf`) plus `sasrec` and
`ease`. For every teacher, protocol and seed, the teacher and TRD (its DQN student) are scored on the same users:

- `trd_temporal` (the paper's): `benchmarks/trd_ml100k.py`'s data (ratings binarised), global temporal split
  60/10/10/20, teacher on train1, student on train2, epoch on validation, test pools of 1000 (`run_trd`); the
  DQN settings and BPR-MF's pinned settings of that benchmark / `recipes/trd-ml100k.yaml`.
- `recipe`: the leave-one-out re-ranking of `recipes/compare-ml100k.yaml` (`fit_on_validation`, then the student
  re-ranks every test user's top-`cand_num` teacher list, history excluded; full ranking, all 943 test users);
  the TRD and teacher settings are read from that recipe's stages (`trd-bprmf` for BPR-MF, `trd-sasrec` for the
  teachers without user embeddings).

Per (teacher, protocol): per-user NDCG/HR@5/@10 averaged over the seeds, then a paired bootstrap over users
(`recalign.eval.bootstrap.paired_bootstrap`) of TRD - teacher. Verdict per metric: "holds" (interval above 0),
"does not hold" (below 0), "not shown" (contains 0). Each run also records what the student did: the share of
training episodes with a non-zero reward (and with a hit reachable at all), the selected epoch, the share of
test lists that differ from the teacher's and the share of test users whose first window has all-equal Q-values.
`--diagnose` adds the "identical lists" study (docs/systems/trd.md): the `trd` stage's own defaults under the
recipe protocol, BPR-MF teacher, with the variants of `DIAGNOSE_VARIANTS`.

    .venv/bin/python benchmarks/trd_teachers.py --quick          # 1 seed, 2 teachers -> trd_teachers_quick.json
    .venv/bin/python benchmarks/trd_teachers.py --diagnose       # 3 seeds, 7 teachers, 2 protocols + the study
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import trd_ml100k  # noqa: E402  (the paper-protocol benchmark: its data loader and pinned settings)

import recalign.methods.trd.algorithm as trd_algorithm  # noqa: E402
from recalign.config import read_yaml  # noqa: E402
from recalign.data.split import leave_one_out_split  # noqa: E402
from recalign.eval.bootstrap import paired_bootstrap  # noqa: E402
from recalign.eval.metrics import hit_ratio, ndcg  # noqa: E402
from recalign.methods.trd.algorithm import (  # noqa: E402
    fit_on_validation,
    run_trd,
    train_teacher,
    without_labels,
)
from recalign.methods.trd.config import TRDConfig  # noqa: E402
from recalign.methods.trd.dqn import DQNReranker, RerankEnv, RerankEpisodes, masked_q  # noqa: E402
from recalign.threads import set_default_threads  # noqa: E402

TEACHERS = ["popularity", "itemknn", "bprmf", "item2vec", "neumf", "sasrec", "ease"]
PROTOCOLS = ["trd_temporal", "recipe"]
KS = [1, 5, 10, 20]
TOP = ["ndcg@5", "ndcg@10", "hr@5", "hr@10"]
COMPARE = ROOT / "recipes" / "compare-ml100k.yaml"
RESULTS = ROOT / "benchmarks" / "results"
# The "identical lists" study: the trd stage's defaults (cand_num 1000, lr 0.01, pred_score off, 50 steps) and
# one change at a time, all under the recipe protocol over the recipe's BPR-MF.
DIAGNOSE_VARIANTS = {"stage defaults": {}, "lr 0.001": {"dqn": {"lr": 0.001}},
                     "init_std 0.01": {"dqn": {"init_std": 0.01}}}


# ---- instrumentation: what the student did ----------------------------------------------------------------------

class CountingReranker(DQNReranker):
    """`DQNReranker` that also records, per training episode, whether it earned any reward (`rewarded_`) and the
    share of training episodes whose relevant item lies within reach (`reachable_share_`: the first
    n_actions + train_steps - 1 teacher positions, the only ones an episode can pick)."""

    def _fit(self, episodes, *args):
        reach = self.config.n_actions + self.config.train_steps - 1
        self.reachable_share_ = float(episodes.relevant[:, :reach].any(1).float().mean())
        self.rewarded_: list[torch.Tensor] = []
        return super()._fit(episodes, *args)

    def _train_batch(self, run, batch, losses):
        returns = super()._train_batch(run, batch, losses)
        self.rewarded_.append(returns > 0)
        return returns


trd_algorithm.DQNReranker = CountingReranker  # run_trd / fit_on_validation build their student from this name


def q_tied_share(student: DQNReranker, episodes: RerankEpisodes) -> tuple[float, list[float]]:
    """(share of users whose first window, the teacher's top n_actions, gets the same Q-value for every item: the
    greedy pick then falls to slot 0, i.e. the teacher's order; share of each hidden layer's units that are
    positive for at least one of those (user, item) inputs, i.e. not dead)."""
    env = RerankEnv(without_labels(episodes), student.config.n_actions, student.pad_item)
    windows = env.window_items()
    net = student.q_net_
    alive = []
    hooks = [layer.register_forward_hook(lambda _m, _i, out: alive.append(
        float((out > 0).flatten(0, -2).any(0).float().mean()))) for layer in net.hidden[1:]]
    with torch.no_grad():
        q = masked_q(net, env.episodes.users, env.state, windows)
    for hook in hooks:
        hook.remove()
    valid = windows >= 0
    top = q.masked_fill(~valid, -torch.inf).max(1).values
    bottom = q.masked_fill(~valid, torch.inf).min(1).values
    return float((top == bottom).float().mean()), alive


def student_record(student: CountingReranker, trd_lists: torch.Tensor, teacher_lists: torch.Tensor,
                   test_episodes: RerankEpisodes) -> dict:
    """What the student did in one run (see the module docstring)."""
    rewarded = torch.cat(student.rewarded_).float() if student.rewarded_ else torch.zeros(1)
    return {"best_epoch": student.best_epoch_, "epochs": student.history_,
            "episodes_rewarded_share": float(rewarded.mean()),
            "episodes_reachable_share": student.reachable_share_,
            "lists_differ_top10": float((trd_lists[:, :10] != teacher_lists[:, :10]).any(1).float().mean()),
            "lists_differ_top20": float((trd_lists[:, :20] != teacher_lists[:, :20]).any(1).float().mean()),
            **dict(zip(("q_tied_first_window", "hidden_alive_after_first"), q_tied_share(student, test_episodes)))}


def per_user(lists: torch.Tensor, relevant: list[set[int]]) -> dict[str, np.ndarray]:
    """Per-user NDCG/HR at every K of `KS` (standard forms, docs/metrics.md)."""
    out = {}
    for k in KS:
        out[f"ndcg@{k}"] = ndcg(lists, relevant, k, reduce="none").numpy()
        out[f"hr@{k}"] = hit_ratio(lists, relevant, k, reduce="none").numpy()
    return out


# ---- settings -------------------------------------------------------------------------------------------------

def recipe_settings() -> tuple[dict, dict]:
    """(teacher params, TRD params) of compare-ml100k.yaml's stages, keyed by teacher name."""
    stages = {stage["name"]: stage.get("params", {}) for stage in read_yaml(COMPARE)["stages"]}
    teachers = {name: {k: v for k, v in stages[name].items() if k != "model"} for name in ("bprmf", "sasrec")}
    trd = {}
    for name in TEACHERS:
        source = stages["trd-bprmf" if name == "bprmf" else "trd-sasrec"]
        trd[name] = {k: v for k, v in source.items() if k != "teacher"}
    return teachers, trd


def teacher_params(protocol: str, name: str, cap: float | None) -> dict:
    """The teacher's settings: trd_ml100k's pinned BPR-MF under trd_temporal, compare-ml100k's BPR-MF / SASRec
    under recipe, else the teacher's defaults; fitting is capped at `cap` seconds where the teacher has epochs."""
    from recalign.teachers.registry import get_teacher

    if protocol == "trd_temporal":
        params = dict(trd_ml100k.TEACHER_PARAMS) if name == "bprmf" else {}
    else:
        params = dict(recipe_settings()[0].get(name, {}))
    if cap is not None and "max_train_seconds" in get_teacher(name).Config.model_fields:
        params["max_train_seconds"] = min(cap, params.get("max_train_seconds") or cap)
    return params


def trd_params(protocol: str, name: str) -> dict:
    """TRD settings: trd_ml100k's DQN settings under trd_temporal, compare-ml100k's trd stages under recipe."""
    if protocol == "trd_temporal":
        return {"cand_num": 1000, "dqn": dict(trd_ml100k.DQN_DEFAULTS)}
    return recipe_settings()[1][name]


# ---- one run -------------------------------------------------------------------------------------------------

def run_temporal(data: tuple, name: str, seed: int, cap: float | None, settings: dict) -> dict:
    """Protocol trd_temporal: teacher on train1, `run_trd` (T3-T7), both scored on the same test pools."""
    dataset, split = data
    started = time.perf_counter()
    teacher = train_teacher(name, dataset, split, teacher_params("trd_temporal", name, cap), seed)
    teacher_seconds = time.perf_counter() - started
    config = TRDConfig(**settings, teacher=name, ks=KS)
    started = time.perf_counter()
    result = run_trd(dataset, split, teacher, config, seed=seed)
    trd_seconds = time.perf_counter() - started
    users = result.test_users
    states = dataset.sequences(split.history("test")).padded(users.numpy(), config.dqn.state_len,
                                                             pad=dataset.n_items)
    test_episodes = RerankEpisodes(users, result.test_pools, None, torch.zeros(result.test_pools.shape), states)
    return {"users": users.numpy(), "teacher": per_user(result.teacher_test_lists, result.test_relevant),
            "trd": per_user(result.student_test_lists, result.test_relevant),
            "student": student_record(result.student, result.student_test_lists, result.teacher_test_lists,
                                      test_episodes),
            "seconds": {"teacher_train": teacher_seconds, "trd": trd_seconds, **result.seconds}}


def run_recipe(data: tuple, name: str, seed: int, cap: float | None, settings: dict) -> dict:
    """Protocol recipe: teacher on the leave-one-out train part, `fit_on_validation` (R3-R6), then teacher and
    student lists for every test user (R7), history excluded."""
    dataset, split = data
    started = time.perf_counter()
    teacher = train_teacher(name, dataset, split, teacher_params("recipe", name, cap), seed)
    teacher_seconds = time.perf_counter() - started
    config = TRDConfig(**settings, teacher=name, ks=KS)
    started = time.perf_counter()
    student, lists, counts, seconds = fit_on_validation(dataset, split, teacher, config, seed)
    users = np.sort(split.test["user_id"].unique()).astype(np.int64)
    history = dataset.sequences(split.history("test"))
    trd_lists = lists.recommend(users, history, max(KS))
    trd_seconds = time.perf_counter() - started
    teacher_lists = teacher.recommend(users, history, k=max(KS), exclude_history=True)[0]
    by_user = split.test.groupby("user_id")["item_id"].agg(set)
    relevant = [by_user[int(u)] for u in users]
    return {"users": users, "teacher": per_user(teacher_lists, relevant), "trd": per_user(trd_lists, relevant),
            "student": {**student_record(student, trd_lists, teacher_lists, lists.episodes(users, history)),
                        **counts},
            "seconds": {"teacher_train": teacher_seconds, "trd": trd_seconds, **seconds}}


def merged(base: dict, overrides: dict) -> dict:
    """`base` with `overrides` applied (the nested `dqn` dict merged key by key)."""
    out = {**base, **{k: v for k, v in overrides.items() if k != "dqn"}}
    out["dqn"] = {**base.get("dqn", {}), **overrides.get("dqn", {})}
    return out


# ---- paired comparison over seeds -------------------------------------------------------------------------------

def verdict(low: float, high: float) -> str:
    """The plain verdict of one interval of TRD - teacher."""
    return "holds" if low > 0 else "does not hold" if high < 0 else "not shown"


def overall(verdicts: dict[str, str]) -> str:
    """One verdict over the top-position metrics: unanimous, else "mixed" with the per-metric verdicts."""
    values = set(verdicts.values())
    if len(values) == 1:
        return values.pop()
    return "mixed (" + ", ".join(f"{k}: {v}" for k, v in verdicts.items()) + ")"


def compare(runs: list[dict], resamples: int) -> dict:
    """Seed-averaged per-user metrics of teacher and TRD, their means and the paired bootstrap of TRD - teacher."""
    users = runs[0]["users"]
    if any(not np.array_equal(run["users"], users) for run in runs):
        raise RuntimeError("the seeds were scored on different users")
    mean_over = lambda who: {m: np.mean([run[who][m] for run in runs], axis=0) for m in runs[0][who]}  # noqa: E731
    teacher, trd = mean_over("teacher"), mean_over("trd")
    boot = paired_bootstrap(lambda idx: {m: float(trd[m][idx].mean()) for m in TOP},
                            lambda idx: {m: float(teacher[m][idx].mean()) for m in TOP},
                            len(users), TOP, n_resamples=resamples, seed=0)
    verdicts = {m: verdict(boot[m]["low"], boot[m]["high"]) for m in TOP}
    per_seed = [{"teacher": {m: float(v.mean()) for m, v in run["teacher"].items()},
                 "trd": {m: float(v.mean()) for m, v in run["trd"].items()},
                 "student": run["student"], "seconds": run["seconds"]} for run in runs]
    return {"n_users": len(users), "teacher": {m: float(v.mean()) for m, v in teacher.items()},
            "trd": {m: float(v.mean()) for m, v in trd.items()}, "bootstrap": boot, "verdicts": verdicts,
            "verdict": overall(verdicts), "per_seed": per_seed,
            "student_summary": student_summary(per_seed)}


def student_summary(per_seed: list[dict]) -> dict:
    """Means over seeds of the student's record, and its selected epochs."""
    keys = ("episodes_rewarded_share", "episodes_reachable_share", "lists_differ_top10", "lists_differ_top20",
            "q_tied_first_window")
    out = {k: statistics.fmean(run["student"][k] for run in per_seed) for k in keys}
    out["best_epochs"] = [run["student"]["best_epoch"] for run in per_seed]
    out["hidden_alive_after_first"] = [run["student"].get("hidden_alive_after_first") for run in per_seed]
    out["trd_seconds"] = statistics.fmean(run["seconds"]["trd"] for run in per_seed)
    out["teacher_seconds"] = statistics.fmean(run["seconds"]["teacher_train"] for run in per_seed)
    return out


# ---- driver ---------------------------------------------------------------------------------------------------

def load_data(protocol: str) -> tuple:
    """(dataset, split) of a protocol: trd_ml100k's binarised data and temporal split, or leave-one-out."""
    if protocol == "trd_temporal":
        return trd_ml100k.load_ml100k()
    from recalign.data.sources import prepare_source

    dataset = prepare_source("movielens-100k", trd_ml100k.DATA)
    return dataset, leave_one_out_split(dataset)


def run_cell(data: tuple, protocol: str, name: str, seeds: list[int], args, settings: dict,
             console: Console) -> dict:
    """All seeds of one (teacher, protocol, TRD settings) cell, compared."""
    runner = run_temporal if protocol == "trd_temporal" else run_recipe
    runs = []
    for seed in seeds:
        runs.append(runner(data, name, seed, args.teacher_cap, settings))
        s = runs[-1]["student"]
        console.print(f"{protocol:12s} {name:10s} seed {seed}: ndcg@10 teacher "
                      f"{runs[-1]['teacher']['ndcg@10'].mean():.4f} trd {runs[-1]['trd']['ndcg@10'].mean():.4f} "
                      f"| epoch {s['best_epoch']}, rewarded {s['episodes_rewarded_share']:.3f}, lists differ "
                      f"{s['lists_differ_top10']:.3f}, Q tied {s['q_tied_first_window']:.3f} "
                      f"| {runs[-1]['seconds']['teacher_train']:.0f}s + {runs[-1]['seconds']['trd']:.0f}s "
                      f"(load {os.getloadavg()[0]:.1f})")
    cell = compare(runs, args.resamples)
    cell.update({"teacher_params": teacher_params(protocol, name, args.teacher_cap),
                 "trd_params": settings, "seeds": seeds})
    return cell


def diagnose(data: tuple, seeds: list[int], args, console: Console) -> dict:
    """The identical-lists study: the trd stage's defaults under the recipe protocol (BPR-MF teacher), and the
    variants of `DIAGNOSE_VARIANTS`."""
    defaults = TRDConfig().model_dump(exclude={"ks", "teacher", "teacher_source", "teacher_params"})
    return {label: run_cell(data, "recipe", "bprmf", seeds, args, merged(defaults, change), console)
            for label, change in DIAGNOSE_VARIANTS.items() if label in args.diagnose_variants}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--teachers", nargs="*", default=TEACHERS, choices=TEACHERS,
                        help="teachers of the main table (none: only the study, with --diagnose)")
    parser.add_argument("--protocols", nargs="+", default=PROTOCOLS, choices=PROTOCOLS)
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 seed, popularity and bprmf, 2 epochs")
    parser.add_argument("--diagnose", action="store_true", help="add the identical-lists study (BPR-MF, recipe)")
    parser.add_argument("--diagnose-seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--diagnose-variants", nargs="+", default=list(DIAGNOSE_VARIANTS),
                        choices=list(DIAGNOSE_VARIANTS))
    parser.add_argument("--teacher-cap", type=float, default=60.0,
                        help="max_train_seconds of every teacher that has epochs (budget; recorded in the JSON)")
    parser.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--tabulate", type=Path, nargs="+", default=None,
                        help="only print the tables (and markdown rows) of finished result files")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.teachers, args.teacher_cap = args.seeds[:1], ["popularity", "bprmf"], 10.0
    if args.out is None:
        args.out = RESULTS / ("trd_teachers_quick.json" if args.quick else "trd_teachers.json")
    return args


def main() -> None:
    args = parse_args()
    if args.tabulate:
        for path in args.tabulate:
            print_tables(Console(width=220), json.loads(path.read_text()))
        return
    torch.set_num_threads(args.threads)
    set_default_threads(args.threads)
    console = Console(width=220)
    started, load_start = time.perf_counter(), os.getloadavg()
    overrides = {"dqn": {"epochs": 2}} if args.quick else {}
    cells, study = {}, None
    for protocol in args.protocols:
        if not args.teachers and not (args.diagnose and protocol == "recipe"):
            continue
        data = load_data(protocol)
        for name in args.teachers:
            settings = merged(trd_params(protocol, name), overrides)
            cells[f"{protocol}/{name}"] = run_cell(data, protocol, name, args.seeds, args, settings, console)
            write_report(args, cells, study, started, load_start)
        if args.diagnose and protocol == "recipe":
            study = diagnose(data, args.diagnose_seeds, args, console)
    report = write_report(args, cells, study, started, load_start)
    print_tables(console, report)


def write_report(args, cells: dict, study: dict | None, started: float, load_start: tuple) -> dict:
    """benchmarks/results/trd_teachers*.json (rewritten after every cell, so a cut-short run keeps its cells)."""
    report = {
        "benchmark": "trd_teachers", "dataset": "ml-100k", "ks": KS, "top_metrics": TOP,
        "protocols": {"trd_temporal": "benchmarks/trd_ml100k.py's: global temporal 60/10/10/20, pools of 1000, "
                                      "ratings binarised", "recipe": "compare-ml100k.yaml's leave-one-out "
                                      "re-ranking, full ranking, history excluded, all test users"},
        "comparison": "per-user metrics averaged over the seeds; paired bootstrap over users of TRD - teacher "
                      f"({args.resamples} resamples, 95%); verdict: holds = interval above 0, does not hold = "
                      "below 0, not shown = contains 0",
        "seeds": args.seeds, "teachers": args.teachers, "teacher_cap_seconds": args.teacher_cap,
        "quick": args.quick, "cells": cells, "identical_lists_study": study,
        "wall_seconds": time.perf_counter() - started,
        "load_average": {"start": load_start, "end": os.getloadavg()},
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "threads": args.threads,
                    "cpus": os.cpu_count(), "nice": os.nice(0)},
        "command": "python benchmarks/trd_teachers.py " + " ".join(sys.argv[1:]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2, default=float) + "\n")
    tmp.replace(args.out)
    return report


def interval(cell: dict, metric: str) -> str:
    b = cell["bootstrap"][metric]
    return f"{b['diff']:+.4f} [{b['low']:+.4f}, {b['high']:+.4f}]"


def print_tables(console: Console, report: dict) -> None:
    """The comparison table, the student's record and the study, as printed tables."""
    table = Table(title=f"TRD - teacher on ML-100K, {len(report['seeds'])} seed(s), paired bootstrap 95%")
    for column in ("protocol", "teacher", "N@10 teacher", "N@10 TRD", "Δ N@5", "Δ N@10", "Δ HR@5", "Δ HR@10",
                   "verdict", "epochs", "rewarded", "differ@10", "Q tied"):
        table.add_column(column)
    rows = [(key, cell) for key, cell in report["cells"].items()]
    rows += [(f"recipe/bprmf ({label})", cell) for label, cell in (report["identical_lists_study"] or {}).items()]
    for key, cell in rows:
        protocol, name = key.split("/", 1)
        s = cell["student_summary"]
        table.add_row(protocol, name, f"{cell['teacher']['ndcg@10']:.4f}", f"{cell['trd']['ndcg@10']:.4f}",
                      *[interval(cell, m) for m in TOP], cell["verdict"],
                      ",".join(map(str, s["best_epochs"])), f"{s['episodes_rewarded_share']:.3f}",
                      f"{s['lists_differ_top10']:.3f}", f"{s['q_tied_first_window']:.3f}")
    console.print(table)
    for key, cell in rows:  # the same rows as markdown, for BENCHMARKS.md
        s = cell["student_summary"]
        console.print(f"| {key} | {cell['teacher']['ndcg@10']:.4f} | {cell['trd']['ndcg@10']:.4f} | "
                      + " | ".join(interval(cell, m) for m in TOP) + f" | {cell['verdict']} | "
                      f"{','.join(map(str, s['best_epochs']))} | {s['episodes_rewarded_share']:.2f} | "
                      f"{s['lists_differ_top10']:.2f} | {s['q_tied_first_window']:.2f} |", soft_wrap=True)
    console.print(f"wall {report['wall_seconds']:.0f}s; load average start {report['load_average']['start']}, "
                  f"end {report['load_average']['end']}")


if __name__ == "__main__":
    main()
