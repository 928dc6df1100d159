"""LLM generation throughput on CPU: today's path (`model.generate`) and the fast path side by side, one run.

Two answers the stages generate, on MovieLens-100K test prompts built by the task builders (`SeqRecTask`,
`prompts_for`), at the stages' batch size (8) and answer budgets:

- seqrec-10: a 10-title SeqRec answer (RecLM-gen's test answer: greedy, 160 new tokens per 10 titles). The new
  path may stop once 11 titles are final (`stop_after_titles=11`): the first 10 grounded titles and CorrectCount
  (titles == 10) are those of the full answer. Identity is checked on the first 10 parsed titles and on
  "exactly 10 titles"; the raw text is also checked to be a prefix of today's.
- constrained: a trie-constrained one-title answer (llm-sft's `constrained` decoding: greedy under the catalog
  trie, 32 new tokens). Identity: the exact answer text.
- beam-10: `constrained_beam_search`, 10 distinct catalog items by 10 beams (16 prompts). Old: `model.generate`
  prefills every beam's copy of the prompt (`prefill_once=False`); new: each prompt once, the cache copied to the
  beams. Identity: the 10 items in order (scores reported to float rounding).

Paths: `old` = `GenerationConfig(fast=False)` (HF `model.generate`, batch 8); `new` = the default fast path
(`recalign.llm.fastgen`: shared prefix prefilled once per task, 64-row length-sorted batches, finished rows
leave the batch); `new@8` = the fast path held to batch 8 (what prefix reuse and early stop give alone).
Reported per path: wall and CPU seconds (`time.process_time`), answers per CPU-second, the load average before
and after; the ratio new/old of answers per CPU-second.

    .venv/bin/python benchmarks/llm_throughput.py --quick     # tiny random Llama, 16 prompts: seconds
    .venv/bin/python benchmarks/llm_throughput.py             # SmolLM2-135M-Instruct fp32, 64 prompts: ~15 min

JSON: benchmarks/results/llm_throughput.json (--quick: llm_throughput_quick.json). Data is read in place from
../shared/data/ml-100k. Torch runs on one thread (the machine is shared).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from recalign.llm.answers import catalog_constraint  # noqa: E402
from recalign.llm.generate import GenerationConfig, generate  # noqa: E402
from recalign.llm.tasks import SeqRecTask, eval_rows, parse_titles, prompts_for  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
DATA = ROOT.parent / "shared" / "data" / "ml-100k"
STAGE_BATCH = 8  # llm-sft and RecLM-gen: batch_size 8


def load(quick: bool):
    """(model, tokenizer, dataset, split): tiny or SmolLM2, MovieLens-100K leave-one-out."""
    from recalign.data.sources import prepare_source
    from recalign.data.split import leave_one_out_split
    from recalign.llm.models import load_model

    model, tokenizer = load_model("tiny" if quick else "smollm2", progress=False)
    dataset = prepare_source("movielens-100k", DATA)
    return model, tokenizer, dataset, leave_one_out_split(dataset)


def cases(tokenizer, dataset, split, n_prompts: int, quick: bool) -> list[dict]:
    """The two answers: prompts, settings of the old and new paths, the logits processor, the identity rule."""
    titles = dataset.titles()
    listing, single = SeqRecTask(k=10), SeqRecTask(k=1)
    rows = eval_rows(dataset, split, "test", listing.max_history)
    rows = rows.take(list(range(min(n_prompts, len(rows)))))
    budget = 48 if quick else 160
    return [
        dict(name="seqrec-10", prompts=prompts_for(listing, rows, titles, tokenizer), processor=None,
             old=GenerationConfig(max_new_tokens=budget, fast=False),
             new=GenerationConfig(max_new_tokens=budget, stop_after_titles=11)),
        dict(name="constrained", prompts=prompts_for(single, rows, titles, tokenizer),
             processor=catalog_constraint(titles, tokenizer, single),
             old=GenerationConfig(max_new_tokens=32, fast=False), new=GenerationConfig(max_new_tokens=32)),
    ]


def beam_case(tokenizer, dataset, split, n_prompts: int) -> dict:
    """Trie-constrained beam search (`constrained_beam_search`, k = 10 distinct titles, 10 beams, batch 8): today
    every beam's copy of the prompt is prefilled; the new path prefills each prompt once and copies the cache."""
    from recalign.llm.constrained import BeamSearchConfig, CatalogTrie

    single = SeqRecTask(k=1)
    rows = eval_rows(dataset, split, "test", single.max_history)
    rows = rows.take(list(range(min(n_prompts, len(rows)))))
    prefix, suffix = single.template().title_affixes()
    trie = CatalogTrie.from_titles(list(dataset.titles()), tokenizer, prefix=prefix, suffix=suffix)
    settings = BeamSearchConfig(k=10, batch_size=STAGE_BATCH, prefix=prefix, suffix=suffix)
    return dict(name="beam-10", prompts=prompts_for(single, rows, dataset.titles(), tokenizer), processor=trie,
                old=settings.model_copy(update={"prefill_once": False}), new=settings, beam=True)


def _answers(model, tokenizer, case: dict, settings) -> list:
    if case.get("beam"):
        from recalign.llm.constrained import constrained_beam_search

        items, scores = constrained_beam_search(model, tokenizer, case["prompts"], case["processor"], settings)
        return list(zip(items.tolist(), scores.tolist()))
    return [a[0] for a in generate(model, tokenizer, case["prompts"], settings, batch_size=STAGE_BATCH,
                                   logits_processor=case["processor"])]


def timed(model, tokenizer, case: dict, settings) -> tuple[list, dict]:
    """Answers and the cost of one path: wall, CPU seconds, load average before/after."""
    load_before = os.getloadavg()
    wall, cpu = time.perf_counter(), time.process_time()
    answers = _answers(model, tokenizer, case, settings)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    cost = dict(wall_s=round(wall, 2), cpu_s=round(cpu, 2), answers=len(answers),
                answers_per_cpu_s=round(len(answers) / cpu, 4), loadavg_before=[round(x, 2) for x in load_before],
                loadavg_after=[round(x, 2) for x in os.getloadavg()])
    return answers, cost


def identity(name: str, old: list[str], new: list[str]) -> dict:
    """How many new answers equal today's: exact text (constrained), or the first 10 titles and the
    'exactly 10 titles' flag (seqrec-10), plus the raw-text prefix check."""
    if name == "constrained":
        same = sum(a == b for a, b in zip(old, new))
        return dict(identical=same, of=len(old), rule="exact text")
    if name == "beam-10":
        same = sum(a[0] == b[0] for a, b in zip(old, new))
        gap = max(abs(x - y) for a, b in zip(old, new) for x, y in zip(a[1], b[1]) if abs(x) != float("inf"))
        return dict(identical=same, of=len(old), rule="the 10 items in order", max_score_gap=gap)
    titles = sum(parse_titles(a)[:10] == parse_titles(b)[:10] and (len(parse_titles(a)) == 10)
                 == (len(parse_titles(b)) == 10) for a, b in zip(old, new))
    prefix = sum(a.startswith(b) for a, b in zip(old, new))
    return dict(identical=titles, of=len(old), rule="first 10 parsed titles and CorrectCount",
                text_is_prefix=prefix, new_chars=sum(map(len, new)), old_chars=sum(map(len, old)))


def run_case(model, tokenizer, case: dict) -> dict:
    """old, new and new@8 on one case, with identity and ratios."""
    old, old_cost = timed(model, tokenizer, case, case["old"])
    new, new_cost = timed(model, tokenizer, case, case["new"])
    small_cost = None if case.get("beam") else \
        timed(model, tokenizer, case, case["new"].model_copy(update={"fast_batch_size": None}))[1]
    encoded = tokenizer(case["prompts"], add_special_tokens=False)["input_ids"]
    from recalign.llm.fastgen import shared_prefix_length

    return dict(prompt_tokens_mean=round(sum(map(len, encoded)) / len(encoded), 1),
                shared_prefix_tokens=shared_prefix_length(encoded),
                old=old_cost, new=new_cost, new_batch8=small_cost,
                ratio=round(new_cost["answers_per_cpu_s"] / old_cost["answers_per_cpu_s"], 2),
                ratio_batch8=None if small_cost is None else
                round(small_cost["answers_per_cpu_s"] / old_cost["answers_per_cpu_s"], 2),
                identity=identity(case["name"], old, new), example_old=str(old[0])[:300],
                example_new=str(new[0])[:300])


def print_table(report: dict) -> None:
    print(f"\nLLM generation throughput ({report['model']}, {report['n_prompts']} prompts, stage batch "
          f"{STAGE_BATCH}, torch threads {report['torch_threads']})")
    print(f"{'case':<12} {'path':<7} {'wall s':>8} {'CPU s':>8} {'ans/CPU-s':>10} {'x old':>6}  load before/after")
    for name, case in report["cases"].items():
        for path, label in (("old", "old"), ("new", "new"), ("new_batch8", "new@8")):
            c = case[path]
            if c is None:  # beam-10 runs at batch 8 already
                continue
            ratio = c["answers_per_cpu_s"] / case["old"]["answers_per_cpu_s"]
            print(f"{name:<12} {label:<7} {c['wall_s']:>8.1f} {c['cpu_s']:>8.1f} {c['answers_per_cpu_s']:>10.3f} "
                  f"{ratio:>6.2f}  {c['loadavg_before'][0]:.2f}/{c['loadavg_after'][0]:.2f}")
        ident = case["identity"]
        print(f"{'':<12} identical answers: {ident['identical']}/{ident['of']} ({ident['rule']})")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny random Llama, 16 prompts")
    parser.add_argument("--prompts", type=int, default=None, help="prompts per case (default 64; quick 16)")
    parser.add_argument("--beam-prompts", type=int, default=None, help="prompts of the beam case (default 16; "
                                                                       "quick 8)")
    parser.add_argument("--cases", default="seqrec-10,constrained,beam-10", help="comma-separated cases to run")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    n_prompts = args.prompts or (16 if args.quick else 64)
    model, tokenizer, dataset, split = load(args.quick)
    report = dict(date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  model="tiny random Llama" if args.quick else "SmolLM2-135M-Instruct fp32",
                  n_prompts=n_prompts, torch_threads=torch.get_num_threads(), cpu_count=os.cpu_count(),
                  command="benchmarks/llm_throughput.py" + (" --quick" if args.quick else ""), cases={})
    chosen = cases(tokenizer, dataset, split, n_prompts, args.quick) + \
        [beam_case(tokenizer, dataset, split, args.beam_prompts or (8 if args.quick else 16))]
    for case in [c for c in chosen if c["name"] in args.cases.split(",")]:
        report["cases"][case["name"]] = run_case(model, tokenizer, case)
        print(f"{case['name']}: done", flush=True)
    out = RESULTS / ("llm_throughput_quick.json" if args.quick else "llm_throughput.json")
    RESULTS.mkdir(parents=True, exist_ok=True)
    for case in report["cases"].values():
        case["run"] = dict(date=report["date"], command=report["command"] + f" --cases {args.cases}")
    if out.is_file() and set(report["cases"]) != set(c["name"] for c in chosen):  # a subset: merge into the file
        merged = json.loads(out.read_text())
        merged["cases"].update(report["cases"])
        report = merged
    out.write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
