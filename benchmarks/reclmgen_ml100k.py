"""RecLM-gen on MovieLens-100K: SFT vs PPO vs GRPO on every §5.6 test task, with teacher rows for scale.

Runs (or resumes) `recipes/reclmgen-ml100k.yaml` (popularity and SASRec teachers; SmolLM2-135M SFT on the §5.3
task mix from SASRec's labels; PPO and GRPO from the SFT model), then:
- one table of every §5.6 metric (recall, mrr, ndcg, non_exist, repeat, in_history, correct_count,
  target_category_rate, sr_target_category_rate, category_rate_correct, not_in_candidate) per variant and task,
  for SFT, PPO, GRPO, SASRec-with-category-filter and Popularity-with-category-filter (the teacher rows answer
  +C with their top-10 inside C, -C outside C, LP/MP/EP with the top m inside and the top k - m outside);
- paired bootstrap intervals (recalign.eval.bootstrap, the same users) of each variant minus SFT;
- a verdict on the paper's claim: RL raises +C TargetCategoryRate and CategoryRateCorrect (LP_20, EP_30, MP_30)
  without losing Recall@10 (the SeqRec task's recall over the 10-title answer).
JSON: benchmarks/results/reclmgen_ml100k.json (--quick: reclmgen_ml100k_quick.json).

    python benchmarks/reclmgen_ml100k.py --quick          # tiny random Llama, 24 users: plumbing, ~10-20 minutes
    python benchmarks/reclmgen_ml100k.py --users 24       # SmolLM2-135M on 24 users (see the budget below)
    python benchmarks/reclmgen_ml100k.py                  # the recipe as written: 200 users (GPU-sized)

Cost on this 2-core CPU (SmolLM2-135M, float32, torch on 1 thread, machine shared with other jobs), measured with
`--measure` (8 users, 128-token answers; benchmarks/results/reclmgen_ml100k_cost.json when it finished):
- test answer (greedy, batch 8, 128 new tokens = ~9 MovieLens titles): 6.8 CPU-s (SeqRec) and 7.1 CPU-s (+C) per
  answer, 13.8 s wall under load; a 10-title answer needs ~160 tokens, so ~8.5 CPU-s; SeqRanking prompts (101
  candidate titles, ~1,600 tokens) cost more.
- SFT: 16 rows of the §5.3 mix (prompts up to 512 tokens), 2 optimizer steps: 6.5 min wall under load, roughly
  9 CPU-s per row.
- PPO iteration (4 prompts x (1 greedy + 1 sampled) = 8 answers of ~100 tokens, π_old/π_ref/V passes, 2 PPO
  epochs = 4 updates of actor + critic + value head): 791 s wall under load, ~6 CPU-min.
- GRPO iteration (2 prompts x 4 sampled answers = 8 answers, 2 TRL steps): 129 s wall.
Estimate for the recipe as written (200 users): 8 tasks x 200 users x 3 variants = 4,800 answers x ~8.5 CPU-s =
~11 CPU-hours for the test tasks alone, plus SFT (2 x 256 rows x ~9 CPU-s = ~77 CPU-min), so not 90 minutes here
(a GPU run: device cuda). `--users 24` is 576 answers (~80 CPU-min) + SFT + RL = roughly 3 CPU-hours (~2 h wall on
2 quiet cores); within 90 minutes on this CPU fit about `--users 8` with the recipe's SFT/RL, or lower
stages.sft.params.sft_rows / rl_iterations as well (the table then only shows plumbing-level differences).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RECIPE = ROOT / "recipes" / "reclmgen-ml100k.yaml"
RESULTS = ROOT / "benchmarks" / "results"
VARIANTS = {"SFT": "sft", "PPO": "ppo", "GRPO": "grpo"}
RATE_TASKS = ("lp_20", "ep_30", "mp_30")

QUICK = [  # a tiny random Llama and small sizes: the whole pipeline in minutes (numbers mean nothing)
    "stages.sft.params.model=tiny",
    "stages.sasrec.params.epochs=6", "stages.sasrec.params.max_train_seconds=60",
    "stages.sft.params.sft_epochs=1", "stages.sft.params.sft_rows=24", "stages.sft.params.control_re_items=8",
    "stages.sft.params.sft.max_steps=6",
    "stages.ppo.params.rl_iterations=2", "stages.ppo.params.prompts_per_iteration=4", "stages.ppo.params.rl_rows=32",
    "stages.ppo.params.ppo.max_new_tokens=32",
    "stages.grpo.params.rl_iterations=2", "stages.grpo.params.prompts_per_iteration=2",
    "stages.grpo.params.rl_rows=32", "stages.grpo.params.grpo.max_new_tokens=32",
    "stages.sft.params.max_new_tokens=48", "stages.ppo.params.max_new_tokens=48",
    "stages.grpo.params.max_new_tokens=48",
]
MEASURE = [  # SmolLM2 at the smallest scale that still times every part: one SFT epoch, 1 PPO and 1 GRPO iteration
    "stages.sasrec.params.epochs=6", "stages.sasrec.params.max_train_seconds=60",
    "stages.sft.params.sft_epochs=1", "stages.sft.params.sft_rows=16", "stages.sft.params.control_re_items=8",
    "stages.ppo.params.rl_iterations=1", "stages.ppo.params.prompts_per_iteration=4",
    "stages.grpo.params.rl_iterations=1", "stages.grpo.params.prompts_per_iteration=2",
    "stages.sft.params.test_tasks=[seqrec,+c]", "stages.ppo.params.test_tasks=[seqrec]",
    "stages.grpo.params.test_tasks=[seqrec]",
    # 128-token answers (9 MovieLens titles): the cost is per token, so the estimate scales to 160
    "stages.sft.params.max_new_tokens=128", "stages.ppo.params.max_new_tokens=128",
    "stages.grpo.params.max_new_tokens=128", "stages.ppo.params.ppo.max_new_tokens=128",
    "stages.grpo.params.grpo.max_new_tokens=128",
]

BUDGET = [  # SmolLM2 scaled to about 90 CPU-minutes: 3 test tasks (the claim's SeqRec, +C and EP_30), short SFT and RL
    "stages.sasrec.params.max_train_seconds=180",
    "stages.sft.params.sft_epochs=2", "stages.sft.params.sft_rows=64", "stages.sft.params.control_re_items=32",
    "stages.ppo.params.rl_iterations=2", "stages.ppo.params.prompts_per_iteration=4",
    "stages.grpo.params.rl_iterations=1", "stages.grpo.params.prompts_per_iteration=2",
    "stages.sft.params.test_tasks=[seqrec,+c,ep_30]", "stages.ppo.params.test_tasks=[seqrec,+c,ep_30]",
    "stages.grpo.params.test_tasks=[seqrec,+c,ep_30]",
]


def run(users: int, overrides: list[str], run_dir: Path, progress: bool) -> dict:
    """Run or resume the recipe with `eval.users` = users; returns the run summary."""
    from recalign.recipes import load_recipe
    from recalign.runs import run_recipe

    recipe = load_recipe(RECIPE, [f"eval.users={users}", *overrides])
    return run_recipe(recipe, run_dir, progress=progress, echo=print if progress else None)


def collect(run_dir: Path, n_resamples: int, seed: int) -> dict:
    """Every §5.6 metric per variant and task, bootstrap vs SFT, and the verdict."""
    from recalign.methods.reclmgen.metrics import CategoryTable
    from recalign.methods.reclmgen.algorithm import score_answers
    from recalign.methods.reclmgen.baselines import compare_tasks, teacher_baseline
    from recalign.methods.reclmgen.stage import stage_answers
    from recalign.runs import open_run
    from recalign.teachers.service import TeacherService

    recipe, dataset, split = open_run(run_dir)
    categories = CategoryTable.from_item_categories(dataset.item_categories())
    systems = {label: stage_answers(run_dir / "stages" / name) for label, name in VARIANTS.items()
               if (run_dir / "stages" / name / "DONE").is_file()}
    if "SFT" not in systems:
        raise SystemExit(f"{run_dir}: the sft stage has not finished")
    sft = systems["SFT"]
    users = sft["seqrec"].users
    params = next(s.params for s in recipe.stages if s.name == "sft")
    for label, stage in (("SASRec+filter", "sasrec"), ("Popularity+filter", "popularity")):
        teacher = TeacherService.from_stage(run_dir / "stages" / stage)
        systems[label] = teacher_baseline(teacher, dataset, split, users, list(sft), recipe.seed,
                                          params.get("max_history", 10), params.get("n_negatives", 100))
    table = {label: {task: score_answers(answers, categories, tasks.get("seqrec"))[0]
                     for task, answers in tasks.items()} for label, tasks in systems.items()}
    comparisons = {label: compare_tasks(tasks, sft, categories, n_resamples, seed)
                   for label, tasks in systems.items() if label != "SFT"}
    stages = json.loads((run_dir / "metrics.json").read_text())["stages"]
    return {"table": table, "vs_sft": comparisons, "verdicts": {v: verdict(comparisons[v]) for v in ("PPO", "GRPO")
                                                                if v in comparisons},
            "users": len(users), "stages": stages, "cost": cost(run_dir, stages)}


def verdict(comparison: dict) -> dict:
    """The paper's claim for one RL variant vs SFT: +C TCR up, CategoryRateCorrect up, Recall@10 not down."""
    def interval(task: str, key: str) -> dict | None:
        return comparison.get(task, {}).get(key)

    tcr = interval("+c", "target_category_rate")
    rates = [interval(t, "category_rate_correct") for t in RATE_TASKS if interval(t, "category_rate_correct")]
    recall = interval("seqrec", "recall")
    if tcr is None or not rates or recall is None:
        return {"claim": "not tested", "line": "not tested (a task is missing)"}
    tcr_up = tcr["low"] > 0
    rate_diff = sum(r["diff"] for r in rates) / len(rates)
    rates_up = rate_diff > 0 and any(r["low"] > 0 for r in rates) and not any(r["high"] < 0 for r in rates)
    recall_kept = recall["high"] >= 0  # not significantly lower
    if tcr_up and rates_up and recall_kept:
        claim = "supported"
    elif tcr["high"] < 0 or any(r["high"] < 0 for r in rates) or not recall_kept:
        claim = "contradicted"
    else:
        claim = "not shown"
    line = (f"{claim}: +C TargetCategoryRate {tcr['diff']:+.3f} [{tcr['low']:+.3f}, {tcr['high']:+.3f}], "
            f"CategoryRateCorrect (mean of {len(rates)}) {rate_diff:+.3f}, "
            f"Recall@10 {recall['diff']:+.3f} [{recall['low']:+.3f}, {recall['high']:+.3f}]")
    return {"claim": claim, "line": line, "tcr": tcr, "category_rate_correct_mean_diff": rate_diff,
            "recall": recall}


def cost(run_dir: Path, stages: dict) -> dict:
    """Seconds per test answer, per PPO/GRPO iteration and per SFT row, from the stages' saved records."""
    from recalign.methods.reclmgen.stage import stage_answers

    out: dict = {}
    for name in VARIANTS.values():
        folder = run_dir / "stages" / name
        if not (folder / "DONE").is_file():
            continue
        answers = stage_answers(folder)
        timed = [(a.seconds, a.cpu_seconds, len(a.users), a.task) for a in answers.values() if a.seconds]
        training = json.loads((folder / "training.json").read_text())
        entry = {"stage_seconds": stages[name].get("stage_seconds"),
                 "answer_seconds": {task: round(s / max(n, 1), 3) for s, _, n, task in timed},
                 "answer_cpu_seconds": {task: round(c / max(n, 1), 3) for _, c, n, task in timed if c}}
        if training["sft"]:
            rows = sum(r.get("rows", 0) for r in training["sft"])
            secs = sum(r.get("sft_seconds", 0.0) for r in training["sft"])
            entry["sft_seconds_per_row"] = round(secs / max(rows, 1), 3)
        if training["rl"]:
            secs = [r.get("seconds", r.get("grpo_seconds")) for r in training["rl"]]
            entry["rl_seconds_per_iteration"] = [s for s in secs if s is not None]
        out[name] = entry
    return out


def print_report(result: dict) -> None:
    """The metric table, the differences to SFT and the verdict lines."""
    from recalign.methods.reclmgen.baselines import control_table
    from recalign.methods.reclmgen.metrics import CONTROL_KEYS

    print(control_table(result["table"], CONTROL_KEYS))
    for label, tasks in result["vs_sft"].items():
        print(f"\n{label} - SFT (95% paired bootstrap, {result['users']} users):")
        for task, keys in tasks.items():
            cells = [f"{k} {v['diff']:+.3f} [{v['low']:+.3f},{v['high']:+.3f}]" for k, v in keys.items()
                     if k in ("recall", "ndcg", "target_category_rate", "category_rate_correct", "non_exist")]
            print(f"  {task}: " + "; ".join(cells))
    for label, v in result["verdicts"].items():
        print(f"\nverdict ({label} vs SFT, the paper's claim): {v['line']}")
    print("\ncost:", json.dumps(result["cost"], indent=1))


def main(argv: list[str] | None = None) -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--users", type=int, default=None, help="evaluated test users (default 200; --quick 24)")
    parser.add_argument("--quick", action="store_true", help="tiny random Llama and small sizes (minutes)")
    parser.add_argument("--measure", action="store_true", help="SmolLM2 at the smallest scale: timings only")
    parser.add_argument("--budget", action="store_true",
                        help="SmolLM2 scaled to ~90 CPU-minutes (32 users, 3 test tasks, short SFT/PPO/GRPO)")
    parser.add_argument("--out", type=Path, default=None, help="run folder (default runs/reclmgen-ml100k[-quick])")
    parser.add_argument("--resamples", type=int, default=None, help="bootstrap resamples (default 1000; --quick 200)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--json", type=Path, default=None, help="result file (default benchmarks/results/...)")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    parser.add_argument("--report-only", action="store_true", help="no training: tables from the finished stages")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    mode = "quick" if args.quick else "measure" if args.measure else "budget" if args.budget else "full"
    users = args.users or {"quick": 24, "measure": 8, "budget": 32, "full": 200}[mode]
    suffix = {"quick": "-quick", "measure": "-measure", "budget": "-budget", "full": ""}[mode]
    run_dir = args.out or ROOT / "runs" / f"reclmgen-ml100k{suffix}"
    overrides = {"quick": QUICK, "measure": MEASURE, "budget": BUDGET, "full": []}[mode]
    started = time.perf_counter()
    if not args.report_only:
        run(users, overrides, run_dir, progress=not args.quiet)
    resamples = args.resamples or {"quick": 200, "measure": 50, "budget": 1000, "full": 1000}[mode]
    result = collect(run_dir, resamples, seed=0)
    result.update({"mode": mode, "overrides": overrides, "resamples": resamples, "run_dir": str(run_dir),
                   "wall_seconds": round(time.perf_counter() - started, 1)})
    print_report(result)
    name = {"quick": "reclmgen_ml100k_quick.json", "measure": "reclmgen_ml100k_cost.json",
            "budget": "reclmgen_ml100k_budget.json", "full": "reclmgen_ml100k.json"}[mode]
    from recalign.io import write_json

    path = write_json(args.json or RESULTS / name, result)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
