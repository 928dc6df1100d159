"""Are two runs' metrics identical? Every metric of every stage, timings and paths aside.

    python benchmarks/same_metrics.py RUN_A RUN_B [--json out.json]

RUN_A / RUN_B are run folders (their metrics.json is read) or metrics.json files. A refactor proves it moved no
number this way: keep the metrics.json of a run before it, run the same recipe again after it from an empty run
folder, and compare. Values are compared exactly (floats included); keys that measure time, throughput or name a
folder are left out, as are the `recipe` section (paths) and the dataset's cached location. Exit code 0 when every
compared value is equal, 1 otherwise (the differing keys are listed), 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

# keys that measure the machine or name a place, not the result
IGNORED = re.compile(r"(seconds|_time|time_|per_second|per_s$|_dir$|^path$|_path$|load_avg|wall)", re.I)


def flatten(value: object, prefix: str = "") -> dict[str, object]:
    """{dotted key: leaf value} of a nested JSON value."""
    if isinstance(value, dict):
        out: dict[str, object] = {}
        for key, inner in value.items():
            out.update(flatten(inner, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def compared(metrics: dict) -> dict[str, object]:
    """The values a refactor must not move: every stage's metrics and the dataset fingerprint."""
    flat = flatten({"stages": metrics.get("stages", {}), "dataset": metrics.get("dataset", {}),
                    "seed": metrics.get("seed")})
    return {key: value for key, value in flat.items() if not IGNORED.search(key.rsplit(".", 1)[-1])}


def read_metrics(path: str) -> dict:
    """The metrics.json of a run folder, or the file itself."""
    file = Path(path)
    if file.is_dir():
        file = file / "metrics.json"
    try:
        return json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        print(f"same_metrics: error: {file}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def compare(a: dict, b: dict) -> dict:
    """Keys equal, differing, and present on one side only."""
    left, right = compared(a), compared(b)
    common = sorted(set(left) & set(right))
    differ = [key for key in common if left[key] != right[key]]
    return {"equal": len(common) - len(differ), "differ": [[k, left[k], right[k]] for k in differ],
            "only_a": sorted(set(left) - set(right)), "only_b": sorted(set(right) - set(left))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_a", help="run folder or metrics.json (before)")
    parser.add_argument("run_b", help="run folder or metrics.json (after)")
    parser.add_argument("--json", help="also write the comparison to this JSON file")
    args = parser.parse_args(argv)
    result = compare(read_metrics(args.run_a), read_metrics(args.run_b))
    stages = sorted({key.split(".")[1] for key in compared(read_metrics(args.run_a)) if key.startswith("stages.")})
    print(f"{args.run_a} vs {args.run_b}: {len(stages)} stages ({', '.join(stages)})")
    print(f"  equal values: {result['equal']}   differing: {len(result['differ'])}   "
          f"only in A: {len(result['only_a'])}   only in B: {len(result['only_b'])}")
    for key, left, right in result["differ"]:
        print(f"  DIFFER {key}: {left!r} -> {right!r}")
    for key in result["only_a"]:
        print(f"  ONLY A {key}")
    for key in result["only_b"]:
        print(f"  ONLY B {key}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))
    same = not (result["differ"] or result["only_a"] or result["only_b"])
    print("  identical" if same else "  NOT identical")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
