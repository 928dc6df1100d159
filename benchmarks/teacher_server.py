"""The teacher server under load: SASRec on MovieLens-100K behind `recalign serve teacher` on 127.0.0.1.

An asyncio httpx client drives N single-row POST /inference requests (k = 10, a real user's last 10 training
items as history) at a fixed concurrency, once against the micro-batching server and once against `--no-batching`.
Each mode reports errors (non-200 answers or transport failures), answers that differ from the in-process
`TeacherService`, p50/p99 latency and requests/s -> benchmarks/results/teacher_server.json and a table.

The server runs in its own process (the real CLI), so the load generator does not share its interpreter.
Client and server CPU seconds are recorded beside the wall time: a side whose CPU time is close to the wall time
limited the rate (on a busy shared machine neither is, and the numbers mostly measure the machine's load).
The SASRec teacher is trained once (about two minutes on a quiet core) and cached under runs/bench-teacher-server/.

    .venv/bin/python benchmarks/teacher_server.py                  # 10,000 requests per mode, concurrency 32
    .venv/bin/python benchmarks/teacher_server.py --requests 300   # a quick check
    .venv/bin/python benchmarks/teacher_server.py --teacher runs/demo/stages/sasrec   # any finished teacher stage
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from recalign.serve.app import free_port  # noqa: E402
from recalign.teachers.service import TeacherService  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "ml-100k"
RESULTS = ROOT / "benchmarks" / "results"
CACHE = ROOT / "runs" / "bench-teacher-server" / "stages" / "sasrec"
# SASRec on ML-100K as in benchmarks/teachers_quality.py, with a shorter time budget: the server's speed, not the
# teacher's quality, is measured here.
SASREC = dict(loss="sampled_softmax", negatives=256, max_len=50, dim=64, blocks=2, heads=1, dropout=0.2, lr=1e-3,
              batch_size=64, epochs=200, eval_every=2, patience=5, valid_users=None, seed=0)
K = 10


def trained_teacher(train_seconds: float, train: bool = True) -> tuple[Path, dict]:
    """A SASRec stage folder on ML-100K (trained and cached on first use) and the users' training histories."""
    from recalign.data.sources import prepare_source
    from recalign.data.split import leave_one_out_split
    from recalign.teachers.sasrec import SASRec

    dataset = prepare_source("movielens-100k", DATA)
    split = leave_one_out_split(dataset)
    sequences = dataset.sequences(split.train)
    histories = {int(u): sequences[u].tolist() for u in range(dataset.n_users) if len(sequences[u])}
    if train and not (CACHE / "model" / "teacher.json").is_file():
        print(f"training SASRec on ML-100K (at most {train_seconds:.0f} s) -> {CACHE}", flush=True)
        model = SASRec(**SASREC, max_train_seconds=train_seconds)
        model.fit(dataset, split.train, split.valid, progress=False)
        model.save(CACHE / "model")
    return CACHE, histories


def request_rows(histories: dict[int, list[int]], n: int, seed: int) -> list[tuple[int, list[int]]]:
    """n (user, last-10 history) rows drawn with replacement."""
    users = np.random.default_rng(seed).choice(sorted(histories), size=n)
    return [(int(u), histories[int(u)][-10:]) for u in users]


def start_server(stage: Path, port: int, batching: bool, max_wait_ms: float) -> subprocess.Popen:
    """`recalign serve teacher` in its own process; returns once /health answers."""
    import httpx

    command = [sys.executable, "-m", "recalign.cli", "serve", "teacher", str(stage), "--port", str(port),
               "--max-wait-ms", str(max_wait_ms)] + ([] if batching else ["--no-batching"])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("RECALIGN_TOKEN", None)
    server = subprocess.Popen(command, cwd=ROOT, env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with code {server.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            time.sleep(0.2)
    server.terminate()
    raise SystemExit("the server did not answer /health within 120 s")


async def drive(url: str, rows: list[tuple[int, list[int]]], concurrency: int,
                expected: dict[int, list[int]]) -> dict:
    """Send every row as one request with `concurrency` in flight; latencies, errors and wrong answers."""
    import httpx

    latencies: list[float] = []
    errors: list[str] = []
    wrong = 0
    cursor = iter(range(len(rows)))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal wrong
        for index in cursor:
            user, history = rows[index]
            body = {"users": [user], "item_lengths": [len(history)], "item_lists": [history], "k": K}
            started = time.perf_counter()
            try:
                answer = await client.post("/inference", json=body)
            except httpx.HTTPError as exc:
                errors.append(type(exc).__name__)
                continue
            latencies.append(time.perf_counter() - started)
            if answer.status_code != 200:
                errors.append(f"{answer.status_code}: {answer.text[:200]}")
            elif answer.json()["inference"][0] != expected[user]:
                wrong += 1

    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as client:
        started, cpu = time.perf_counter(), time.process_time()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    ms = np.asarray(latencies) * 1000 if latencies else np.zeros(1)
    return {"requests": len(rows), "errors": len(errors), "first_errors": sorted(set(errors))[:3],
            "wrong_answers": wrong, "wall_seconds": round(wall, 3), "requests_per_second": round(len(rows) / wall, 1),
            "client_cpu_seconds": round(cpu, 2),
            "latency_ms": {"p50": round(float(np.percentile(ms, 50)), 2), "p90": round(float(np.percentile(ms, 90)), 2),
                           "p99": round(float(np.percentile(ms, 99)), 2), "mean": round(float(ms.mean()), 2),
                           "max": round(float(ms.max()), 2)}}


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (Linux /proc); NaN elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")


def run_mode(stage: Path, batching: bool, rows: list, warmup: list, concurrency: int, max_wait_ms: float,
             expected: dict) -> dict:
    """Start a server in one mode, warm it up, measure, and report its /health counters."""
    import httpx

    port = free_port()
    server = start_server(stage, port, batching, max_wait_ms)
    url = f"http://127.0.0.1:{port}"
    try:
        asyncio.run(drive(url, warmup, concurrency, expected))
        before, server_cpu = httpx.get(f"{url}/health").json(), cpu_seconds(server.pid)
        result = asyncio.run(drive(url, rows, concurrency, expected))
        after, server_cpu = httpx.get(f"{url}/health").json(), cpu_seconds(server.pid) - server_cpu
    finally:
        server.terminate()
        server.wait(30)
    batches = after["batches"] - before["batches"]
    # client or server CPU close to the wall time says which side limited the rate (on a quiet machine)
    result["server_cpu_seconds"] = round(server_cpu, 2) if server_cpu == server_cpu else None
    result["model_calls"] = batches if batching else len(rows)
    result["mean_requests_per_call"] = round(len(rows) / batches, 2) if batching and batches else 1.0
    return result


def print_table(results: dict, info: dict) -> None:
    """One row per mode."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"teacher server: {info['requests']} /inference requests, concurrency {info['concurrency']}, "
                        f"SASRec on ML-100K ({info['items']} items)")
    for column in ("mode", "errors", "wrong", "p50 ms", "p99 ms", "req/s", "requests/model call", "client CPU s",
                   "server CPU s", "wall s"):
        table.add_column(column, justify="right")
    for mode, r in results.items():
        table.add_row(mode, str(r["errors"]), str(r["wrong_answers"]), f"{r['latency_ms']['p50']:.1f}",
                      f"{r['latency_ms']['p99']:.1f}", f"{r['requests_per_second']:.0f}",
                      f"{r['mean_requests_per_call']:.1f}", f"{r['client_cpu_seconds']:.1f}",
                      "-" if r["server_cpu_seconds"] is None else f"{r['server_cpu_seconds']:.1f}",
                      f"{r['wall_seconds']:.1f}")
    Console(width=160).print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=10000, help="measured requests per mode")
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight")
    parser.add_argument("--max-wait-ms", type=float, default=5.0, help="the batching server's --max-wait-ms")
    parser.add_argument("--teacher", type=Path, default=None, help="a finished teacher stage to serve instead "
                        "of the cached ML-100K SASRec (its histories must fit its catalog)")
    parser.add_argument("--train-seconds", type=float, default=120.0, help="SASRec training budget (first run)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS / "teacher_server.json")
    args = parser.parse_args()
    if args.requests < 1 or args.concurrency < 1:
        parser.error("--requests and --concurrency must be positive")

    stage, histories = trained_teacher(args.train_seconds, train=args.teacher is None)
    stage = args.teacher or stage
    service = TeacherService.from_stage(stage)
    users = sorted(histories)
    top = service.topk([histories[u][-10:] for u in users], K).tolist()  # the in-process answers, one batch
    expected = {u: [i for i in row if i >= 0] for u, row in zip(users, top)}
    rows = request_rows(histories, args.requests, args.seed)
    warmup = request_rows(histories, min(200, max(20, args.requests // 20)), args.seed + 1)

    results = {}
    for mode, batching in (("micro-batching", True), ("no batching", False)):
        print(f"{mode}: {args.requests} requests at concurrency {args.concurrency} ...", flush=True)
        results[mode] = run_mode(stage, batching, rows, warmup, args.concurrency, args.max_wait_ms, expected)
    info = {"requests": args.requests, "concurrency": args.concurrency, "max_wait_ms": args.max_wait_ms,
            "k": K, "teacher": service.name, "stage": str(stage), "items": service.n_items,
            "request": "one row per POST /inference: a ML-100K user's last 10 training items, k=10, history excluded",
            "client": "asyncio httpx.AsyncClient, keep-alive connections", "server": "recalign serve teacher "
            "(uvicorn, one process, one model thread)", "machine": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "load_average": [round(x, 2) for x in os.getloadavg()],
            "command": " ".join(sys.argv)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"info": info, "modes": results}, indent=2) + "\n")
    print_table(results, info)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
