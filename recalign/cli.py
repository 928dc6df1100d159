"""The `recalign` command line: data, teacher, eval, run, report.

Every error a user can cause prints one line `recalign: error: ...` on stderr and exits with code 2,
leaving no half-written output folder behind.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import sys
from pathlib import Path
from typing import Any, Iterator, List, Optional

import typer
from rich.console import Console
from rich.table import Table
from typer.core import TyperGroup

from recalign.errors import ConfigError, OutputError, RecalignError, quoted, shorten, writing
from recalign.io import LOCK_NAME, unwritable_reason

try:  # typer >= 0.20 carries its own copy of click
    from typer._click import exceptions as click_errors
except ImportError:  # pragma: no cover - older typer on top of click
    from click import exceptions as click_errors


class _OneLineUsageErrors(TyperGroup):
    """The top-level group: usage errors (unknown option, missing argument) print one line and exit 2, like every
    other error a user can cause."""

    def main(self, args: Any = None, prog_name: Any = None, complete_var: Any = None, standalone_mode: bool = True,
             **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click_errors.NoArgsIsHelpError as exc:
            exc.show()  # a bare group prints its help, as before
            sys.exit(exc.exit_code)
        except click_errors.UsageError as exc:
            where = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx is not None else ""
            _echo_error(exc.format_message() + where)
            sys.exit(2)
        except click_errors.ClickException as exc:
            _echo_error(exc.format_message())
            sys.exit(exc.exit_code)
        except typer.Abort:
            _echo_error("aborted")
            sys.exit(1)
        sys.exit(result if isinstance(result, int) else 0)


app = typer.Typer(
    cls=_OneLineUsageErrors,
    help="recalign: LLM- and RL-based recommendation on one data model and one evaluator.\n\n"
         "Quick start: `recalign run recipes/demo.yaml` trains Popularity, BPR-MF, SASRec, TRD and tiny LLM-SFT and "
         "SPRec models on synthetic data and prints one results table, every row scored on the same test users.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None,
)
data_app = typer.Typer(help="Prepare, inspect and download datasets.", no_args_is_help=True)
teacher_app = typer.Typer(help="Train classical teachers (popularity, bprmf, sasrec, itemknn, item2vec, neumf, ease).", no_args_is_help=True)
train_app = typer.Typer(help="Train LLM recommenders from a recipe (e.g. llm-sft).", no_args_is_help=True)
serve_app = typer.Typer(help="Serve a trained model over HTTP (teacher: the RecLM-gen API; llm: OpenAI-compatible).", no_args_is_help=True)


def _version(value: bool) -> None:
    if value:
        from recalign import __version__

        typer.echo(f"recalign {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="print the version and exit")) -> None:
    """recalign: LLM- and RL-based recommendation on one data model and one evaluator."""


app.add_typer(data_app, name="data")
app.add_typer(teacher_app, name="teacher")
app.add_typer(train_app, name="train")
app.add_typer(serve_app, name="serve")

err = Console(stderr=True)


class _Out:
    """stdout console; wide when stdout is not a terminal, so piped tables are not squeezed to 80 columns."""

    def print(self, *objects, **kwargs) -> None:
        console = Console()
        if not console.is_terminal:
            console = Console(width=200)
        console.print(*objects, **kwargs)


out = _Out()


# OSErrors that mean "this output cannot be written" wherever they surface (read-only mount, disk full, quota)
WRITE_ERRNOS = {errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EEXIST, errno.EFBIG}


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn errors a user can cause into one line on stderr and exit code 2."""
    try:
        yield
    except RecalignError as exc:
        _fail(str(exc), getattr(exc, "exit_code", 2))
    except OSError as exc:
        if exc.errno in WRITE_ERRNOS:
            _fail(f"cannot write {shorten(exc.filename or 'output', 200)}: {exc.strerror}", 2)
        if exc.filename is None:  # not about a path the user named: a bug, keep the traceback
            raise
        _fail(f"{shorten(exc.filename, 200)}: {exc.strerror or exc}", 2)  # missing, too long, a loop, no access
    except KeyboardInterrupt:
        _fail("interrupted (finished stages are kept; re-run the same command to resume)", 130)


def _fail(message: str, code: int) -> None:
    _echo_error(message)
    raise typer.Exit(code)


def _echo_error(message: str) -> None:
    """The one stderr line every user error becomes."""
    first_line = " ".join(message.split("\n")[0].split()) or "failed"
    typer.echo(f"recalign: error: {first_line}", err=True)


def _existing(path: Path, what: str) -> Path:
    if not path.exists():
        raise RecalignError(f"{path}: no such {what}")
    return path


def _parse_options(pairs: list[str]) -> dict:
    """`key=value` pairs (values parsed as YAML scalars) into a nested dict."""
    from recalign.config import parse_override

    options: dict = {}
    for pair in pairs:
        parts, value = parse_override(pair)
        node = options
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"option {quoted(pair)} conflicts with an earlier option")
        node[parts[-1]] = value
    return options


def _check_output(target: Path, markers: tuple[str, ...] = ()) -> None:
    """Refuse an --out we cannot write, or a non-empty folder that is not ours to replace (one without `markers`)."""
    problem = unwritable_reason(target)
    if problem is not None:
        raise OutputError(target, problem)
    if markers and target.exists() and (not target.is_dir() or any(p.name != LOCK_NAME for p in target.iterdir())) \
            and not all((target / marker).is_file() for marker in markers):
        raise RecalignError(f"{target}: exists and is not a prepared dataset; choose another --out")


# ---- data ----------------------------------------------------------------------------------------

def _source_names() -> str:
    try:
        from recalign.data.sources import SOURCES
        return ", ".join(sorted(SOURCES))
    except (ImportError, AttributeError):
        return "see recalign/data/sources"


@data_app.command("prepare")
def data_prepare(
    source: str = typer.Argument(..., help="dataset source; one of: " + _source_names()),
    raw: Optional[Path] = typer.Option(None, "--raw", help="raw file or folder the source reads"),
    out_dir: Path = typer.Option(..., "--out", help="folder to write the prepared dataset into"),
    options: Optional[List[str]] = typer.Argument(None, help="source options as key=value"),
) -> None:
    """Convert raw files into a prepared dataset folder (Parquet tables + dataset.json).

    The folder is written to a temp path and renamed at the end, so a bad raw file leaves nothing behind.
    It is locked meanwhile: a second command writing the same --out is refused.

    \b
    Examples:
        recalign data prepare movielens-100k --raw ../shared/data/ml-100k --out data/ml-100k
        recalign data prepare synthetic --out data/synth n_users=200 n_items=100
    """
    with user_errors():
        from recalign.data.sources import prepare_source  # it checks --raw and says how to get missing data
        from recalign.runs import lock_folder

        kwargs = _parse_options(options or [])
        _check_output(out_dir, markers=("dataset.json", "interactions.parquet"))  # never replace a run folder
        with lock_folder(out_dir, "data prepare"):  # one command at a time writes --out
            dataset = prepare_source(source, str(raw) if raw is not None else None, **kwargs)
            with writing(out_dir):
                dataset.save(out_dir)  # atomic: a temp folder renamed into place
        stats = dataset.stats()
        out.print(f"prepared {source} -> {out_dir}: {stats['users']} users, {stats['items']} items, "
                  f"{stats['interactions']} interactions (fingerprint {dataset.fingerprint()})")


@data_app.command("sources")
def data_sources(
    name: Optional[str] = typer.Argument(None, help="show only this source's options"),
) -> None:
    """List the dataset sources, what raw files each reads, and its key=value options.

    \b
    Examples:
        recalign data sources
        recalign data sources synthetic
    """
    with user_errors():
        from recalign.data.sources import SOURCES, get_source

        names = [name] if name is not None else list(SOURCES)
        for source_name in names:
            source = get_source(source_name)
            raw = "--raw PATH" if source.needs_raw else "no raw files"
            out.print(f"[bold]{source_name}[/bold] ({raw}): {source.description}", highlight=False)
            for field_name, info in source.options.model_fields.items():
                default = info.get_default(call_default_factory=True)
                out.print(f"    {field_name}={default!r}  {info.description or ''}", markup=False, highlight=False)


@data_app.command("stats")
def data_stats(
    folder: Path = typer.Argument(..., help="a prepared dataset folder"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
) -> None:
    """Users, items, interactions, density, sequence-length quantiles and timestamp ties of a prepared dataset.

    \b
    Example:
        recalign data stats data/ml-100k --json
    """
    with user_errors():
        from recalign.data.dataset import Dataset

        stats = Dataset.load(_existing(folder, "dataset folder")).stats()
        if as_json:
            typer.echo(json.dumps(stats, indent=2))
            return
        table = Table(title=f"{stats['name']} ({stats.get('source')})")
        table.add_column("statistic")
        table.add_column("value", justify="right")
        for key in ("users", "items", "interactions"):
            table.add_row(key, f"{stats[key]:,}")
        table.add_row("density", f"{stats['density']:.5f}")
        table.add_row("timestamp ties", f"{stats['timestamp_ties']:.1%}")
        for key in ("items_with_title", "categories"):
            if key in stats:
                table.add_row(key.replace("_", " "), f"{stats[key]:,}")
        for key, value in stats["sequence_length"].items():
            table.add_row(f"sequence length {key}", f"{value:.1f}" if isinstance(value, float) else str(value))
        for warning in stats.get("warnings", []):  # e.g. duplicated rows dropped, a missing genre file
            table.add_row("warning", warning)
        out.print(table)


@data_app.command("download")
def data_download(
    name: str = typer.Argument(..., help="dataset name (see the list printed for an unknown name)"),
    out_dir: Path = typer.Option(..., "--out", help="folder to put the raw files into"),
    from_file: Optional[Path] = typer.Option(None, "--from", help="use an already downloaded archive/file instead"),
) -> None:
    """Fetch a public dataset's raw files (checked against known SHA-256 sums), or unpack a local copy.

    \b
    Examples:
        recalign data download ml-100k --out raw/ml-100k
        recalign data download ml-100k --out raw/ml-100k --from ~/Downloads/ml-100k.zip
    """
    with user_errors():
        if from_file is not None:
            _existing(from_file, "file")
        from recalign.data import download as downloads

        result = downloads.download(name, out_dir, from_file=from_file)
        out.print(f"{name} -> {result if result is not None else out_dir}")


# ---- teachers, evaluation, runs ------------------------------------------------------------------------

@teacher_app.command("train")
def teacher_train(
    model: str = typer.Argument(..., help="teacher name: popularity, bprmf or sasrec"),
    data: Path = typer.Option(..., "--data", help="a prepared dataset folder"),
    run_dir: Path = typer.Option(..., "--out", help="run folder to write (model, metrics.json, report.md)"),
    overrides: Optional[List[str]] = typer.Argument(None, help="teacher settings as key=value, e.g. epochs=5"),
    split: str = typer.Option("leave_one_out", "--split", help="leave_one_out | global_temporal | random"),
    seed: int = typer.Option(0, "--seed", help="random seed"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars"),
) -> None:
    """Train one teacher on a prepared dataset, evaluate it, and save it in a run folder.

    The model is saved under RUN/stages/MODEL/model and its metrics in RUN/metrics.json.

    \b
    Examples:
        recalign teacher train sasrec --data data/ml-100k --out runs/sasrec-ml100k epochs=20
        recalign teacher train bprmf --data data/ml-100k --out runs/bprmf --split global_temporal
    """
    with user_errors():
        from recalign.recipes import recipe_from_dict

        _existing(data, "dataset folder")
        params = {"model": model, **_parse_options(overrides or [])}
        try:
            recipe = recipe_from_dict({
                "name": run_dir.name, "seed": seed, "data": {"path": str(data)}, "split": {"kind": split},
                "stages": [{"name": model, "kind": "teacher", "params": params}],
            }, source=f"teacher train {model}")
        except ConfigError as exc:  # speak in this command's terms, not the generated recipe's keys
            message = str(exc)
            for key in (f"stages.{model}.params.", f"stages.{model}.params: ", f"stages.{model}."):
                message = message.replace(key, "")
            raise ConfigError(message) from None
        _run(recipe, run_dir, quiet)


@serve_app.command("teacher")
def serve_teacher(
    stage: Path = typer.Argument(..., metavar="RUN/stages/NAME", help="a finished teacher stage folder"),
    host: str = typer.Option("127.0.0.1", "--host", help="address to bind; anything but loopback needs "
                             "$RECALIGN_TOKEN"),
    port: int = typer.Option(12621, "--port", help="TCP port (12621 as the original RecLM-gen server)"),
    max_wait_ms: float = typer.Option(5.0, "--max-wait-ms", help="micro-batching: wait at most this long to "
                                      "gather concurrent requests into one batched teacher call"),
    max_rows: int = typer.Option(20480, "--max-rows", help="micro-batching: at most this many rows per batch"),
    no_batching: bool = typer.Option(False, "--no-batching", help="answer each request on its own"),
) -> None:
    """Serve a teacher stage over HTTP: POST /inference, POST /ranking, GET /health.

    /inference: {"item_lists": [[...]], "k": K} plus optional "users", "candidate_item_lists",
    "target_category" (["+C" | "-C" | null per row]), "exclude_history" (default true), "immediately" (1: no
    batching) -> {"inference": [[items]]}. /ranking: the same with "candidate_item_lists" -> {"ranking": [[ranks]]},
    0-based ranks among all items. The teacher reads the last 10 items of a history (all of them are excluded).
    Set RECALIGN_TOKEN to require 'Authorization: Bearer <token>' (401 when missing, 403 when wrong); binding
    off loopback needs it.

    \b
    Example:
        recalign serve teacher runs/demo/stages/sasrec --port 12621
    """
    with user_errors():
        from recalign.serve.teacher import serve_teacher as serve

        _existing(stage, "teacher stage folder")
        serve(stage, host, port, batching=not no_batching, max_wait_ms=max_wait_ms, max_rows=max_rows)


@serve_app.command("llm")
def serve_llm(
    stage: Path = typer.Argument(..., metavar="RUN/stages/NAME", help="a finished llm-sft stage folder"),
    host: str = typer.Option("127.0.0.1", "--host", help="address to bind; anything but loopback needs "
                             "$RECALIGN_TOKEN"),
    port: int = typer.Option(8000, "--port", help="TCP port"),
    max_wait_ms: float = typer.Option(5.0, "--max-wait-ms", help="micro-batching: wait at most this long to "
                                      "gather concurrent requests into one batched generate"),
    max_rows: int = typer.Option(64, "--max-rows", help="micro-batching: at most this many prompts per batched "
                                 "generate (1: one request at a time)"),
    backend: str = typer.Option("transformers", "--backend", help="generation engine: transformers | vllm | "
                                "openai | auto (vllm/openai: /v1/recommend answers grounded, no trie)"),
    base_url: Optional[str] = typer.Option(None, "--base-url", help="--backend openai: the upstream server"),
    api_key_env: Optional[str] = typer.Option(None, "--api-key-env", help="--backend openai: NAME of the "
                                              "environment variable holding the upstream key"),
    served_model: Optional[str] = typer.Option(None, "--served-model", help="--backend openai: the upstream "
                                               "model name (default: its only model)"),
) -> None:
    """Serve an llm-sft stage (base model + adapter): OpenAI-compatible /v1/models, /v1/chat/completions,
    /v1/completions, and POST /v1/recommend {"history": [ids or titles], "k": K, "control": "+C"|"-C",
    "candidates": [ids]} -> {"items": [{"id", "title", "score"}]} (trie-constrained: only catalog items, never a
    history item, never an item of C under "-C"). Set RECALIGN_TOKEN to require 'Authorization: Bearer <token>'.

    \b
    Example:
        recalign serve llm runs/goodreads/stages/sft --port 8000
    """
    with user_errors():
        from recalign.serve.llm import serve_llm as serve

        _existing(stage, "llm-sft stage folder")
        serve(stage, host, port, max_wait_ms=max_wait_ms, max_rows=max_rows, backend=backend, base_url=base_url,
              api_key_env=api_key_env, served_model=served_model)


@app.command("run")
def run(
    recipe_yaml: Path = typer.Argument(..., metavar="RECIPE", help="a recipe YAML, e.g. recipes/demo.yaml"),
    overrides: Optional[List[str]] = typer.Argument(None, help="key=value overrides, e.g. seed=3"),
    run_dir: Optional[Path] = typer.Option(None, "--out", help="run folder (default runs/<recipe name>)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars"),
    processes: int = typer.Option(1, "--processes", min=1,
                                  help="training processes: re-run under `accelerate launch` (LLM training stages "
                                       "train data-parallel; other stages run once, in rank 0)"),
    seeds: Optional[str] = typer.Option(None, "--seeds", help="a seed sweep, e.g. 0,1,2: one run folder per seed "
                                        "under --out (PARENT/seed-N; default runs/<recipe name>-seeds), then "
                                        "mean ± std per stage over the seeds"),
) -> None:
    """Run a recipe: prepare data, split, run every stage, print one results table.

    Finished stages with an unchanged config are skipped, so a killed run resumes where it stopped.
    The run folder is locked while a run writes it: a second command on it is refused, naming the first.
    Overrides use dotted keys; stages are addressed by name.

    \b
    Examples:
        recalign run recipes/demo.yaml
        recalign run recipes/demo.yaml seed=3 stages.sasrec.params.epochs=5 eval.ks=[5,10] --out runs/demo-s3
        recalign run recipes/demo.yaml --processes 2
        recalign run recipes/demo.yaml --seeds 0,1,2 --out runs/demo-seeds
    """
    with user_errors():
        from recalign.recipes import load_recipe

        if seeds is not None:  # a sweep: one run per seed, each resumable, listed in PARENT/sweep.json
            _run_seeds(recipe_yaml, overrides or [], seeds, run_dir, quiet, processes)
            return
        recipe = load_recipe(recipe_yaml, overrides or [])
        run_dir = run_dir if run_dir is not None else Path("runs") / recipe.name
        if processes > 1 and "WORLD_SIZE" not in os.environ:  # not yet inside a launch: start one
            from recalign.runs import LOCK_HELD_ENV, lock_folder

            with lock_folder(run_dir, "run"):  # held here for the launch, whose rank 0 writes the folder
                _relaunch(recipe, processes, [str(recipe_yaml), *(overrides or []), "--out", str(run_dir),
                                              *(["--quiet"] if quiet else [])], {LOCK_HELD_ENV: str(run_dir.resolve())})
            return
        _run(recipe, run_dir, quiet)


def _comma_list(value: Optional[str]) -> Optional[list[str]]:
    """`a,b,c` -> ["a", "b", "c"] (None stays None)."""
    return None if value is None else [part.strip() for part in value.split(",") if part.strip()]


def _run_seeds(recipe_yaml: Path, overrides: list[str], seeds_option: str, parent: Optional[Path], quiet: bool,
               processes: int) -> None:
    """`recalign run RECIPE --seeds 0,1,2`: the sweep, then its comparison table (when its runs are comparable)."""
    from recalign.eval.compare import compare_runs, rich_tables
    from recalign.runs import run_sweep, sweep_recipes

    if processes > 1:
        raise ConfigError("--seeds runs the seeds one after the other in one process; drop --processes")
    try:
        seeds = [int(part) for part in _comma_list(seeds_option) or []]
    except ValueError:
        raise ConfigError(f"--seeds: expected comma-separated integers, e.g. --seeds 0,1,2 (got "
                          f"{quoted(seeds_option)})") from None
    recipes = sweep_recipes(recipe_yaml, overrides, seeds)
    parent = parent if parent is not None else Path("runs") / f"{next(iter(recipes.values())).name}-seeds"
    echo = lambda line: err.print(line, highlight=False, markup=False)  # noqa: E731
    run_sweep(recipes, parent, progress=not quiet, echo=echo)
    try:
        for table in rich_tables(compare_runs([parent])):
            out.print(table)
    except RecalignError as exc:  # the runs finished; only the table cannot be made
        err.print(f"no comparison table: {exc}", highlight=False, markup=False, soft_wrap=True)
    out.print(f"sweep folder: {parent} (sweep.json, one run folder per seed); compare: recalign compare {parent}")


def launch_command(processes: int, run_args: list[str]) -> list[str]:
    """`accelerate launch` of `recalign run RUN_ARGS` with `processes` processes on this machine.

    `--multi_gpu` starts the processes through torchrun; without CUDA they train on the CPU (gloo), because the
    trainers set `use_cpu` there (accelerate's `--cpu` with several processes would need mpirun)."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "-m", "recalign.cli", "run", *run_args]


def _relaunch(recipe, processes: int, run_args: list[str], env: dict[str, str]) -> None:
    import importlib.util
    import subprocess

    from recalign.methods import get_stage

    if importlib.util.find_spec("accelerate") is None:
        raise ConfigError("--processes needs the accelerate package (pip install accelerate)")
    for stage in recipe.stages:
        if not get_stage(stage.kind).multi_process:
            err.print(f"[{stage.name}] a {stage.kind} stage does not train data-parallel: it runs once, in rank 0",
                      highlight=False, markup=False, soft_wrap=True)
    done = subprocess.run(launch_command(processes, run_args),
                          env={**os.environ, "TOKENIZERS_PARALLELISM": "false", **env})
    if done.returncode != 0:
        raise RecalignError(f"the {processes}-process run failed (exit code {done.returncode}); "
                            "see the messages above")


@train_app.command("llm-sft")
def train_llm_sft(
    recipe_yaml: Path = typer.Argument(..., metavar="RECIPE", help="a recipe with an llm-sft stage, "
                                                                    "e.g. recipes/llm-sft-goodreads.yaml"),
    overrides: Optional[List[str]] = typer.Argument(None, help="key=value overrides, e.g. seed=3"),
    run_dir: Optional[Path] = typer.Option(None, "--out", help="run folder (default runs/<recipe name>)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars"),
) -> None:
    """SFT an LLM recommender (history titles -> next title) as the recipe's llm-sft stage(s), then evaluate.

    The same as `recalign run`, but the recipe must contain at least one stage of kind llm-sft.

    \b
    Examples:
        recalign train llm-sft recipes/llm-sft-goodreads.yaml
        recalign train llm-sft recipes/llm-sft-goodreads.yaml stages.llm-sft.params.train_rows=64 --out runs/sft-small
    """
    with user_errors():
        from recalign.recipes import load_recipe

        recipe = load_recipe(recipe_yaml, overrides or [])
        if not any(stage.kind == "llm-sft" for stage in recipe.stages):
            raise ConfigError(f"{recipe_yaml}: no stage of kind 'llm-sft' (use `recalign run` for other recipes)")
        _run(recipe, run_dir if run_dir is not None else Path("runs") / recipe.name, quiet)


def _run(recipe, run_dir: Path, quiet: bool) -> None:
    from recalign.eval.report import claims_table, results_table
    from recalign.processes import process_rank
    from recalign.runs import run_recipe

    summary = run_recipe(recipe, run_dir, progress=not quiet, echo=lambda line: err.print(line, highlight=False, markup=False))
    if process_rank() > 0:  # one table, from rank 0
        return
    out.print(results_table(summary, recipe.eval.table))
    claims = claims_table(summary)
    if claims is not None:
        out.print(claims)
    out.print(f"run folder: {run_dir} (report.md, report.html, metrics.json)")


@app.command("eval")
def evaluate_run(
    run_dir: Path = typer.Argument(..., metavar="RUN", help="a run folder with teacher stages"),
    protocol: Optional[str] = typer.Option(None, "--protocol", help="full | sampled (default: the run's)"),
    part: str = typer.Option("test", "--part", help="test | valid"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars"),
) -> None:
    """Re-evaluate the saved models of a run folder (teachers, LLM SFT stages) and print the results table.

    \b
    Example:
        recalign eval runs/demo --protocol sampled
    """
    with user_errors():
        from recalign.eval.report import results_table
        from recalign.stages import DONE, RunContext
        from recalign.runs import open_run

        _existing(run_dir, "run folder")
        recipe, dataset, split = open_run(run_dir)
        if protocol is not None:
            if protocol not in ("full", "sampled"):
                raise ConfigError(f"--protocol: expected full or sampled, got {quoted(protocol)}")
            recipe.eval.protocol = protocol
        if part not in ("test", "valid"):
            raise ConfigError(f"--part: expected test or valid, got {quoted(part)}")
        rows: dict[str, dict] = {}
        for stage in recipe.stages:
            stage_dir = run_dir / "stages" / stage.name
            if not (stage_dir / DONE).is_file():
                continue
            ctx = RunContext(run_dir=run_dir, stage_dir=stage_dir, dataset=dataset, split=split, seed=recipe.seed,
                             progress=not quiet, recipe=recipe, stage=stage, keep_lists=False)  # a finished run
            if stage.kind == "teacher":
                model = ctx.load_teacher(stage.name)
                rows[stage.name] = {"model": getattr(model, "name", stage.kind), **ctx.evaluate(model, part=part)}
            elif stage.kind == "llm-sft":
                from recalign.methods.llm_sft.stage import reevaluate_llm_stage
                from recalign.methods import get_stage

                from recalign.stages import resolve_model_reference

                params = resolve_model_reference(get_stage(stage.kind).params.model_validate(stage.params), run_dir)
                rows[stage.name] = reevaluate_llm_stage(ctx, params, part=part)
            else:
                err.print(f"[{stage.name}] {stage.kind} stages are not re-evaluated; see {run_dir}/metrics.json",
                          markup=False, highlight=False)
        if not rows:
            raise RecalignError(f"{run_dir}: no finished teacher or llm-sft stage to evaluate")
        summary = {"recipe": recipe.name, "dataset": dataset.fingerprint(), "stages": rows}
        out.print(results_table(summary, recipe.eval.table,
                                title=f"{recipe.name}: {part} ({recipe.eval.protocol} ranking)"))


@app.command("compare")
def compare(
    runs: List[Path] = typer.Argument(..., metavar="RUN", help="run folders, or sweep folders of "
                                      "`recalign run --seeds` (their seed runs)"),
    rows: Optional[str] = typer.Option(None, "--rows", help="comma-separated stages (default: every stage)"),
    metrics: Optional[str] = typer.Option(None, "--metrics", help="comma-separated metrics, e.g. hr@10,ndcg@10 "
                                          "(default: the recipe's eval.table)"),
    pair: Optional[str] = typer.Option(None, "--pair", help="two stages A,B: A - B per run, the paired t-test "
                                       "(mean, 95% interval, p) and the Wilcoxon p over runs"),
    html_out: Optional[Path] = typer.Option(None, "--html", help="also write the tables to this HTML file"),
) -> None:
    """Compare runs scored on the same users: mean ± std (ddof=1) per stage over the runs (seeds), and with
    --pair a paired test between two stages. Runs whose stages were scored on different users are refused.

    \b
    Examples:
        recalign compare runs/demo-seeds
        recalign compare runs/demo-seeds --metrics hr@10,ndcg@10 --pair sasrec,bprmf --html compare.html
        recalign compare runs/demo runs/demo-s1 runs/demo-s2 --rows popularity,sasrec
    """
    with user_errors():
        from recalign.eval.compare import compare_runs, rich_tables, write_comparison_html

        pair_rows = _comma_list(pair)
        if pair_rows is not None and len(pair_rows) != 2:
            raise ConfigError(f"--pair: expected two stages A,B, e.g. --pair sasrec,bprmf (got {quoted(pair)})")
        comparison = compare_runs(runs, rows=_comma_list(rows), metrics=_comma_list(metrics),
                                  pair=(pair_rows[0], pair_rows[1]) if pair_rows is not None else None)
        for table in rich_tables(comparison):
            out.print(table)
        if html_out is not None:
            with writing(html_out):
                out.print(f"wrote {write_comparison_html(comparison, html_out)}")


@app.command("report")
def report(
    run_dir: Path = typer.Argument(..., metavar="RUN", help="a run folder"),
    columns: Optional[str] = typer.Option(None, "--columns", help="comma-separated metrics, e.g. hr@10,ndcg@10"),
) -> None:
    """(Re)write RUN/report.md and RUN/report.html from its metrics.json and print the results table.

    \b
    Example:
        recalign report runs/demo --columns hr@5,ndcg@5,hr@10,ndcg@10
    """
    with user_errors():
        from recalign.eval.html_report import write_html_report
        from recalign.eval.report import check_columns, read_run_metrics, recipe_columns, results_table, write_report

        _existing(run_dir, "run folder")
        summary = read_run_metrics(run_dir)
        if columns is not None:
            chosen = check_columns(summary.get("stages", {}), columns.split(","), option="--columns")
        else:
            chosen = recipe_columns(run_dir)
        with writing(run_dir / "report.md"):
            path = write_report(run_dir, chosen)
            write_html_report(run_dir, chosen)
        out.print(results_table(summary, chosen))
        out.print(f"wrote {path} and {path.with_name('report.html')}")


def main() -> None:
    """Entry point of the `recalign` console script."""
    app()


if __name__ == "__main__":
    main()
