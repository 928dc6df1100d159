"""report.html: one self-contained page per run folder, written next to report.md by `recalign run` (`runs.py`)
and `recalign report`.

The page needs no network: its style and its one script are inline and every image is a `data:` URI (PNG,
base64). It reads without JavaScript (plain HTML tables, native <details>); where JavaScript runs, the results
table sorts by any column (click or Enter on a header; `report.html#sort=ndcg@10` opens it sorted). Sections:
the results table (the `eval.table` columns, with intervals where the metrics carry them), accuracy against
beyond-accuracy (NDCG@K against DivRatio@K, else coverage@K, one point per stage), the training curves side by side,
the claims when the metrics carry any, every metric per stage, and the run's settings (config.yaml). All text is
escaped with `html.escape`.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
from pathlib import Path

from recalign.eval.report import (
    choose_columns,
    collect_claims,
    column_title,
    other_task_note,
    protocol_note,
    read_run_metrics,
    recipe_columns,
    split_rows,
    stage_seconds,
)
from recalign.io import read_json, write_atomic

HTML_REPORT = "report.html"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ACCURACY = "ndcg"  # the scatter's y axis
BEYOND = ("div_ratio", "coverage")  # the scatter's x axis: the first one the stages report
LOW_HIGH = ((".low", ".high"), ("_low", "_high"), (".ci_low", ".ci_high"), ("_ci_low", "_ci_high"))

STYLE = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;max-width:1200px;
padding:1.5em 2em;color:#1d1d1f;background:#fff}
h1{font-size:1.6em;margin:.2em 0}h2{font-size:1.25em;margin-top:1.8em;border-bottom:1px solid #ddd;padding-bottom:.2em}
p.meta{color:#555;margin:.2em 0 1em}
table{border-collapse:collapse;margin:.6em 0;font-variant-numeric:tabular-nums}
th,td{border:1px solid #d8d8d8;padding:.3em .6em;text-align:right;vertical-align:top}
th{background:#f3f4f6;white-space:nowrap}th:first-child,td:first-child,td.text,th.text{text-align:left}
tbody tr:nth-child(even){background:#fafafa}
.ci{display:block;color:#666;font-size:.82em}
html.js th.sortable{cursor:pointer}html.js th.sortable:after{content:" \\2195";color:#999}
html.js th[aria-sort=ascending]:after{content:" \\2191";color:#111}
html.js th[aria-sort=descending]:after{content:" \\2193";color:#111}
.note{background:#fff8e1;border-left:4px solid #f0b400;padding:.4em .8em}
.figures{display:grid;grid-template-columns:repeat(auto-fill,minmax(460px,1fr));gap:1em}
figure{margin:0;border:1px solid #e3e3e3;padding:.5em}figure img{max-width:100%;height:auto}
figcaption{color:#555;font-size:.9em}figure.single{display:inline-block;max-width:100%}
pre{background:#f6f8fa;border:1px solid #e1e4e8;padding:.8em;overflow:auto;font-size:12.5px}
details{margin:.4em 0}summary{cursor:pointer;font-weight:600}
.js-only{display:none}html.js .js-only{display:inline}
"""

SORT_SCRIPT = """
(function () {
  "use strict";
  var table = document.getElementById("results");
  if (!table || !table.tHead || !table.tBodies.length) { return; }
  var body = table.tBodies[0], heads = table.tHead.rows[0].cells;
  function value(row, col) {
    var cell = row.cells[col], v = cell.getAttribute("data-value");
    if (v === null) { return cell.textContent.trim().toLowerCase(); }
    return v === "" ? NaN : parseFloat(v);
  }
  function compare(x, y, descending) {
    if (typeof x === "number") {
      if (isNaN(x)) { return isNaN(y) ? 0 : 1; }
      if (isNaN(y)) { return -1; }
      return descending ? y - x : x - y;
    }
    var order = x < y ? -1 : (x > y ? 1 : 0);
    return descending ? -order : order;
  }
  function sortBy(col, descending) {
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) { return compare(value(a, col), value(b, col), descending); });
    for (var i = 0; i < heads.length; i++) { heads[i].removeAttribute("aria-sort"); }
    heads[col].setAttribute("aria-sort", descending ? "descending" : "ascending");
    rows.forEach(function (row) { body.appendChild(row); });
  }
  function toggle(col) {
    var th = heads[col], state = th.getAttribute("aria-sort");
    var numeric = th.getAttribute("data-type") === "number";
    sortBy(col, state ? state === "ascending" : numeric);
  }
  Array.prototype.forEach.call(heads, function (th, col) {
    th.tabIndex = 0;
    th.classList.add("sortable");
    th.title = "sort by this column";
    th.addEventListener("click", function () { toggle(col); });
    th.addEventListener("keydown", function (event) {
      if (event.key === "Enter" || event.key === " ") { event.preventDefault(); toggle(col); }
    });
  });
  document.documentElement.classList.add("js");
  window.addEventListener("load", function () {  // each figure's decoded width, and a console error if none
    Array.prototype.forEach.call(document.images, function (img) {
      img.setAttribute("data-natural-width", String(img.naturalWidth));
      if (!img.naturalWidth) { console.error("report.html: an image did not load: " + img.alt); }
    });
  });
  var wanted = decodeURIComponent(window.location.hash.replace(/^#sort=/, ""));
  Array.prototype.forEach.call(heads, function (th, col) {
    if (wanted && th.getAttribute("data-key") === wanted) { toggle(col); }
  });
})();
"""


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _number(value: object) -> float | None:
    """A finite int/float (not bool), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def png_data_uri(data: bytes) -> str:
    """A PNG as a data: URI (base64)."""
    if not data.startswith(PNG_MAGIC):
        raise ValueError("not a PNG")
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def metric_interval(metrics: dict, key: str) -> tuple[str, float, float] | None:
    """The interval a stage reports for metric `key`, when any: ("ci", low, high) from `key.low`/`key.high` (or
    `_low`/`_high`, `.ci_low`/`.ci_high`), a `key.ci` / `key_ci` pair, or `intervals: {key: {low, high} | [low,
    high]}`; ("std", mean - std, mean + std) from `key.std` / `key_std`. None when the metrics carry none."""
    for low_suffix, high_suffix in LOW_HIGH:
        low, high = _number(metrics.get(key + low_suffix)), _number(metrics.get(key + high_suffix))
        if low is not None and high is not None:
            return "ci", low, high
    nested = metrics.get("intervals")
    candidates = [metrics.get(key + ".ci"), metrics.get(key + "_ci"),
                  nested.get(key) if isinstance(nested, dict) else None]
    for pair in candidates:
        if isinstance(pair, dict):
            pair = [pair.get("low"), pair.get("high")]
        if isinstance(pair, (list, tuple)) and len(pair) == 2:
            low, high = _number(pair[0]), _number(pair[1])
            if low is not None and high is not None:
                return "ci", low, high
    for suffix in (".std", "_std"):
        std, mean = _number(metrics.get(key + suffix)), _number(metrics.get(key))
        if std is not None and mean is not None:
            return "std", mean - std, mean + std
    return None


def _metric_cell(metrics: dict, key: str) -> str:
    value = _number(metrics.get(key))
    if value is None:
        raw = metrics.get(key)
        return f'<td data-value="">{_e("-" if raw is None else raw)}</td>'
    text = f"{value:.4f}"
    interval = metric_interval(metrics, key)
    if interval is not None:
        kind, low, high = interval
        detail = f"± {(high - low) / 2:.4f}" if kind == "std" else f"[{low:.4f}, {high:.4f}]"
        text += f'<span class="ci">{_e(detail)}</span>'
    return f'<td data-value="{value!r}">{text}</td>'


def _model_name(metrics: dict) -> str:
    return str(metrics.get("model") or metrics.get("teacher") or metrics.get("kind") or "")


def results_section(summary: dict, columns: list[str] | None) -> str:
    """The sortable results table: one row per stage, the chosen metric columns and the train time."""
    stages = summary.get("stages", {})
    columns = choose_columns(stages, columns)
    stages, others = split_rows(stages, columns)
    times = {name: stage_seconds(m) for name, m in stages.items()}
    with_time = any(t is not None for t in times.values())
    heads = ['<th class="text" data-key="stage">stage</th>', '<th class="text" data-key="model">model</th>']
    heads += [f'<th data-type="number" data-key="{_e(c)}">{_e(column_title(c))}</th>' for c in columns]
    heads += ['<th data-type="number" data-key="train_seconds">train s</th>'] if with_time else []
    rows = []
    for name, metrics in stages.items():
        cells = [f'<td class="text">{_e(name)}</td>', f'<td class="text">{_e(_model_name(metrics))}</td>']
        cells += [_metric_cell(metrics, c) for c in columns]
        if with_time:
            seconds = times[name]
            cells.append(f'<td data-value="">-</td>' if seconds is None else
                         f'<td data-value="{seconds!r}">{seconds:.1f}</td>')
        rows.append("<tr>" + "".join(cells) + "</tr>")
    note = protocol_note(stages)
    parts = ["<h2 id=\"results-heading\">Results</h2>", _users_line(stages),
             '<table id="results"><thead><tr>' + "".join(heads) + "</tr></thead><tbody>",
             "\n".join(rows), "</tbody></table>"]
    parts += [f'<p class="note">{_e(n)}</p>' for n in (note, other_task_note(others)) if n]
    return "\n".join(p for p in parts if p)


def _users_line(stages: dict[str, dict]) -> str:
    """Which users the rows were scored on (the recipe's `eval.users`), when the stages record it."""
    hashes = {m.get("users_hash") for m in stages.values() if m.get("users_hash")}
    counts = sorted({m.get("n_users") for m in stages.values() if isinstance(m.get("n_users"), int)})
    if not hashes:
        return ""
    same = "the same users" if len(hashes) == 1 else f"{len(hashes)} different user sets (rows not comparable)"
    users = ", ".join(map(str, counts)) or "?"
    return f'<p class="meta">Rows are scored on {_e(same)} ({_e(users)} users; hash {_e(", ".join(sorted(hashes)))}).' \
           ' <span class="js-only">Click a column header to sort.</span></p>'


def scatter_axes(stages: dict[str, dict]) -> tuple[str, str] | None:
    """(x, y) metric keys of the accuracy vs beyond-accuracy plot: ndcg@K against div_ratio@K (else coverage@K),
    K = 10 when reported, else the largest K at which two stages report both; None when no K fits."""
    ks = sorted({int(k) for m in stages.values() for key in m for name, _, k in [key.partition("@")]
                 if name == ACCURACY and k.isdigit()}, key=lambda k: (k != 10, -k))
    for k in ks:
        for beyond in BEYOND:
            x, y = f"{beyond}@{k}", f"{ACCURACY}@{k}"
            both = [m for m in stages.values() if _number(m.get(x)) is not None and _number(m.get(y)) is not None]
            if len(both) >= 2:
                return x, y
    return None


def scatter_points(stages: dict[str, dict], x: str, y: str) -> list[tuple[float, float, str]]:
    """One point per stage that reports both metrics; stages on the same spot share one labelled point."""
    spots: dict[tuple[float, float], list[str]] = {}
    for name, metrics in stages.items():
        vx, vy = _number(metrics.get(x)), _number(metrics.get(y))
        if vx is not None and vy is not None:
            spots.setdefault((round(vx, 6), round(vy, 6)), []).append(name)
    return [(vx, vy, ", ".join(names)) for (vx, vy), names in spots.items()]


def scatter_png(points: list[tuple[float, float, str]], x: str, y: str) -> bytes:
    """The scatter plot as PNG bytes (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, ax = plt.subplots(figsize=(7.5, 4.8))
    try:
        for vx, vy, label in points:
            ax.scatter([vx], [vy], s=40, zorder=3)
            ax.annotate(label, (vx, vy), textcoords="offset points", xytext=(6, 4), fontsize=8)
        ax.set_xlabel(column_title(x).replace("div_ratio", "DivRatio") + " (beyond accuracy: higher = more diverse)")
        ax.set_ylabel(column_title(y) + " (accuracy)")
        ax.grid(alpha=0.3)
        ax.margins(0.15)
        figure.tight_layout()
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=100)
    finally:
        plt.close(figure)
    return buffer.getvalue()


def scatter_section(stages: dict[str, dict]) -> str:
    """Accuracy against beyond-accuracy, one point per stage; empty when fewer than two stages report both."""
    axes = scatter_axes(stages)
    if axes is None:
        return ""
    x, y = axes
    points = scatter_points(stages, x, y)
    missing = [name for name, m in stages.items() if _number(m.get(x)) is None or _number(m.get(y)) is None]
    title = f"{column_title(y)} against {column_title(x).replace('div_ratio', 'DivRatio')}"
    caption = f"{title}, one point per stage (stages on the same spot share a label)."
    if missing:
        caption += " Not shown (no " + x + " or " + y + "): " + ", ".join(missing) + "."
    return "\n".join(["<h2>Accuracy against beyond-accuracy</h2>", '<figure class="single">',
                      _img(scatter_png(points, x, y), title), f"<figcaption>{_e(caption)}</figcaption>",
                      "</figure>"])


def _img(data: bytes, alt: str) -> str:
    return f'<img src="{png_data_uri(data)}" alt="{_e(alt)}">'


def _figure(png: Path, caption: str) -> str:
    """An inline <figure> of a PNG file; empty when the file is not a readable PNG."""
    try:
        data = png.read_bytes()
    except OSError:
        return ""
    if not data.startswith(PNG_MAGIC):
        return ""
    return f"<figure>{_img(data, caption)}<figcaption>{_e(caption)}</figcaption></figure>"


def figures_sections(folder: Path) -> str:
    """The training curves (curves.png beside each curves.jsonl, drawn when missing) side by side, then the other
    PNGs the stages wrote (e.g. SPRec's NDCG/DivRatio per iteration)."""
    from recalign.eval.curves import CURVES_PNG, plot_run_curves

    curves = plot_run_curves(folder)
    others = sorted(p for p in (folder / "stages").glob("*/*.png") if p.name != CURVES_PNG) \
        if (folder / "stages").is_dir() else []
    parts = []
    for title, pngs in (("Training curves", curves), ("Other figures of the stages", others)):
        figures = [_figure(png, png.relative_to(folder).as_posix()) for png in pngs]
        figures = [f for f in figures if f]
        if figures:
            parts += [f"<h2>{_e(title)}</h2>", '<div class="figures">', *figures, "</div>"]
    return "\n".join(parts)


def _plain(value: object) -> str:
    number = _number(value)
    if isinstance(value, bool):
        return "yes" if value else "no"
    if number is not None and isinstance(value, float):
        return f"{number:.4f}"
    if isinstance(value, (list, tuple)) and all(_number(v) is not None for v in value) and value:
        return "[" + ", ".join(f"{float(v):.4f}" for v in value) + "]"
    return "-" if value is None else str(value)


def claims_section(summary: dict) -> str:
    """A table of the claims the metrics carry (as they are: nothing is computed here); empty when none."""
    claims = collect_claims(summary)
    if not claims:
        return ""
    keys = list(dict.fromkeys(key for claim in claims for key in claim))
    rows = ["<tr>" + "".join(f'<td class="text">{_e(_plain(c.get(k)))}</td>' for k in keys) + "</tr>"
            for c in claims]
    return "\n".join(["<h2>Claims</h2>", '<table id="claims"><thead><tr>',
                      "".join(f'<th class="text">{_e(k)}</th>' for k in keys), "</tr></thead><tbody>", *rows,
                      "</tbody></table>"])


def all_metrics_section(summary: dict) -> str:
    """Every scalar metric of every stage, one collapsed <details> per stage."""
    parts = ["<h2>All metrics</h2>"]
    for name, metrics in summary.get("stages", {}).items():
        rows = [f'<tr><td class="text">{_e(k)}</td><td>{_e(_plain(v))}</td></tr>' for k, v in metrics.items()
                if not isinstance(v, (dict, list))]
        parts.append(f"<details><summary>{_e(name)} ({len(rows)} values)</summary><table><tbody>"
                     + "".join(rows) + "</tbody></table></details>")
    return "\n".join(parts)


def settings_section(folder: Path) -> str:
    """The run's settings: the resolved recipe, config.yaml, verbatim."""
    config = folder / "config.yaml"
    if not config.is_file():
        return ""
    text = config.read_text(encoding="utf-8", errors="replace")
    return "\n".join(["<h2>Settings</h2>", "<p class=\"meta\">The resolved recipe (<code>config.yaml</code>): "
                      "re-run it with <code>recalign run config.yaml</code>.</p>",
                      f"<details open><summary>config.yaml</summary><pre>{_e(text)}</pre></details>"])


def _intro(folder: Path, summary: dict) -> str:
    name = summary.get("recipe", folder.name)
    lines = [f"<h1>Run {_e(name)}</h1>"]
    dataset = read_json(folder / "dataset.json") if (folder / "dataset.json").is_file() else {}
    if dataset:
        counts = dataset.get("counts", {})
        text = (f"Dataset {dataset.get('name')} (source {dataset.get('source')}, fingerprint "
                f"{dataset.get('fingerprint')}): {counts.get('users')} users, {counts.get('items')} items, "
                f"{counts.get('interactions')} interactions; split {dataset.get('split', {}).get('kind')}; "
                f"seed {summary.get('seed')}.")
        lines.append(f'<p class="meta">{_e(text)}</p>')
    return "\n".join(lines)


def render_html(folder: Path, summary: dict, columns: list[str] | None) -> str:
    """The whole page as one string."""
    stages = summary.get("stages", {})
    body = [_intro(folder, summary), results_section(summary, columns), scatter_section(stages),
            figures_sections(folder), claims_section(summary), all_metrics_section(summary),
            settings_section(folder)]
    title = f"recalign run {summary.get('recipe', folder.name)}"
    return "\n".join(["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
                      '<meta name="viewport" content="width=device-width, initial-scale=1">',
                      f"<title>{_e(title)}</title>", f"<style>{STYLE}</style>", "</head>", "<body>",
                      *[part for part in body if part], f"<script>{SORT_SCRIPT}</script>", "</body>", "</html>", ""])


def write_html_report(run_dir: str | os.PathLike, columns: list[str] | None = None) -> Path:
    """Write run_dir/report.html (see the module docstring); `columns` default to the recipe's `eval.table`."""
    folder = Path(run_dir)
    summary = read_run_metrics(folder)
    if columns is None:
        columns = recipe_columns(folder)
    return write_atomic(folder / HTML_REPORT, render_html(folder, summary, columns))
