"""The HTML page of `kpod report`: plain data in, one self-contained HTML string out.

`run_page(RunData)` shows one run; `comparison_page(ComparisonData)` shows a `kpod compare`
(methods x seeds). Every image is a PNG from `report_plots`, embedded as base64; the page has
no script and no external reference, so it opens anywhere (a mail attachment, a Prefect
artifact, a file:// URL). Every string that comes from data is HTML-escaped here. A section
whose table the run lacks is replaced by a one-line note, never an error.
"""

from __future__ import annotations

import base64
import html
import json
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tasks.core import report_plots as plots
from tasks.core.weights_view import by_rationale, token_spans as weight_spans

STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:64em;margin:1.5em auto;padding:0 1em;color:#222}"
    "h1{margin-bottom:.2em}h2{margin-top:1.6em;border-bottom:1px solid #ddd;padding-bottom:.2em}"
    ".sub{color:#666;margin-top:0}.note{color:#777;font-style:italic}"
    "img{max-width:100%;display:block;margin:.6em 0}"
    "table{border-collapse:collapse;font-size:.9em;margin:.6em 0}"
    "th,td{border:1px solid #ddd;padding:.25em .6em;text-align:left}td.n{text-align:right}"
    "th{background:#f4f4f4}.wide{overflow-x:auto}code,pre,.key{font-family:monospace}"
    "pre{background:#f7f7f7;padding:.8em;overflow-x:auto;font-size:.85em}summary{cursor:pointer;margin:.6em 0}"
    ".r{margin:.8em 0;line-height:1.9;font-family:monospace;white-space:pre-wrap}"
    ".t{padding:1px 0;border-radius:2px}.s{color:#999}"
)
WEIGHT_BINS = 20  # the token-weight histogram's bins over [0, 1] (report_data counts them)


@dataclass
class RunData:
    """One run's tables, as `report_data.run_data` reads them; None: the run lacks the table."""

    run: dict[str, Any]  # the run record: run_id, name, status, started_at, stages, outcomes
    config: dict[str, Any]  # config sections, as the run's stages hashed them (their manifests)
    metrics: list[dict[str, Any]] | None = None  # rows of `metrics`
    val_curve: list[dict[str, Any]] | None = None  # rows of `val_selection`
    train_loss: list[dict[str, Any]] | None = None  # step, stage, loss, nll, kd of `train_log`
    schedule_stages: list[dict[str, Any]] | None = None  # rows of `schedule_stages`
    input_steps: list[tuple[int, int, int]] | None = None  # (stage, input_steps, rationales) of `schedule`
    role_hist: list[tuple[str, int, int]] | None = None  # (role, weight bin of 20, tokens)
    token_sample: list[dict[str, Any]] | None = None  # `token_weights` rows of a few rationales, with role
    teacher: dict[str, Any] | None = None  # calls, tokens_in, tokens_out, cost_usd, errors, models
    teacher_errors: list[tuple[str, int]] = field(default_factory=list)  # (error, calls)


@dataclass
class ComparisonData:
    """A comparison's record and tables, and what its page needs of each run."""

    record: dict[str, Any]  # `Store.load_comparison`: comparison_id, name, config, methods, seeds, runs
    rows: list[dict[str, Any]]  # its `comparisons` rows
    steps: list[dict[str, Any]]  # its `comparison_steps` rows
    val_curves: dict[str, list[tuple[int, float]]]  # run id -> (epoch, val accuracy)
    train_loss: dict[str, list[tuple[int, float]]]  # run id -> (step, loss)
    stage_keys: dict[str, dict[str, str]]  # run id -> stage -> key


# ---- building blocks -------------------------------------------------------------------------
def esc(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f"<img alt='{esc(alt)}' src='data:image/png;base64,{data}'>"


def table(header: Sequence[str], rows: Iterable[Sequence[Any]], numeric: Iterable[int] = ()) -> str:
    """An HTML table; the cells of columns in `numeric` align right."""
    right = set(numeric)
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td class='n'>{esc(c)}</td>" if i in right else f"<td>{esc(c)}</td>" for i, c in enumerate(r)) + "</tr>"
        for r in rows
    )
    return f"<div class='wide'><table><tr>{head}</tr>{body}</table></div>"


def section(title: str, body: str) -> str:
    return f"<section><h2>{esc(title)}</h2>{body}</section>"


def omitted(title: str, why: str) -> str:
    """A section the data cannot fill: its heading and one line saying why."""
    return section(title, f"<p class='note'>{esc(why)}</p>")


def document(title: str, subtitle: str, sections: Sequence[str]) -> str:
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>{esc(title)}</title><style>{STYLE}</style></head><body>"
        f"<h1>{esc(title)}</h1><p class='sub'>{esc(subtitle)}</p>{''.join(sections)}</body></html>"
    )


def fmt(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def pre_json(data: Any, summary: str) -> str:
    """`data` as JSON in a block that opens on a click (a <details>: no script needed); a full
    config is a few hundred lines, longer than the rest of a page."""
    text = esc(json.dumps(data, indent=2, sort_keys=True, default=str))
    return f"<details><summary>{esc(summary)}</summary><pre>{text}</pre></details>"


def mean_std(values: Sequence[float]) -> tuple[float, float] | None:
    """Mean and sample std (n - 1; 0 for one value) of the values; None for none."""
    if not values:
        return None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def mean_by_x(curves: Iterable[Sequence[tuple[float, float]]]) -> list[tuple[float, float]]:
    """Several curves (seeds) -> their mean at each x that any of them has."""
    at: dict[float, list[float]] = {}
    for curve in curves:
        for x, y in curve:
            if y is not None:
                at.setdefault(x, []).append(y)
    return sorted((x, statistics.fmean(ys)) for x, ys in at.items())


def token_spans(rows: Sequence[Mapping[str, Any]]) -> str:
    """Rationales as text, each token on a background shaded by its weight (`kpod show weights`'
    colours) and underlined by its word role; hovering a token shows its weight."""
    parts = []
    for rid, toks in by_rationale(list(rows)).items():
        parts.append(f"<h3><code>{esc(rid)}</code></h3><div class='r'>")
        parts.append(weight_spans(toks))
        parts.append("</div>")
    return "".join(parts)


# ---- the run page ----------------------------------------------------------------------------
def run_page(data: RunData) -> str:
    run = data.run
    sections = [
        _run_accuracy(data), _run_val(data), _run_loss(data), _run_schedule(data), _run_weights(data),
        _run_teacher(data), _run_config(data),
    ]
    subtitle = (f"{run.get('name')} · {run.get('status')} · started {run.get('started_at')}"
                f" · finished {run.get('finished_at') or '-'}")
    return document(f"kpod run {run['run_id']}", subtitle, sections)


def _interval(row: Mapping[str, Any], prefix: str = "") -> str:
    acc = row.get(f"{prefix}accuracy")
    if acc is None:
        return "-"
    return f"{acc:.3f} [{row[f'{prefix}ci_low']:.3f}, {row[f'{prefix}ci_high']:.3f}]"


def _run_accuracy(data: RunData) -> str:
    title = "Accuracy (95% Wilson intervals)"
    if not data.metrics:
        return omitted(title, "This run has no metrics table: its evaluate stage did not run.")
    order = sorted({m["method"] for m in data.metrics})
    points = [dict(m, label=m["method"]) for m in data.metrics]
    rows = [(m["method"], m["seed"], m["split"], m["n"], m["correct"], _interval(m)) for m in data.metrics]
    header = ["method", "seed", "split", "n", "correct", "accuracy [95% CI]"]
    return section(title, img(plots.accuracy_png(points, order), "accuracy per split") + table(header, rows, {1, 3, 4, 5}))


def _run_val(data: RunData) -> str:
    title = "Val accuracy per epoch"
    if not data.val_curve:
        return omitted(title, "This run has no val_selection table: train.select_every was 0 (no selection on val).")
    curve = [(r["epoch"] + 1, r["accuracy"]) for r in data.val_curve]
    kept = [r["epoch"] + 1 for r in data.val_curve if r["selected"]]
    note = f"<p>The weights of epoch {kept[0]} were kept (best on val).</p>" if kept else ""
    png = plots.lines_png({"val accuracy": curve}, "epoch", "val accuracy", ylim=(0, 1.02))
    return section(title, img(png, "val accuracy per epoch") + note)


def _run_loss(data: RunData) -> str:
    title = "Training loss"
    if not data.train_loss:
        return omitted(title, "This run has no train_log table: its train stage did not run.")
    series = {"loss": [(r["step"], r["loss"]) for r in data.train_loss]}
    if any(r.get("kd") for r in data.train_loss):  # the KD term is on: show both of its parts
        series["nll"] = [(r["step"], r["nll"]) for r in data.train_loss if r["nll"] is not None]
        series["kd"] = [(r["step"], r["kd"]) for r in data.train_loss if r["kd"] is not None]
    png = plots.lines_png(series, "optimiser step", "loss", order=["loss", "nll", "kd"], markers=False)
    stages = sorted({r["stage"] for r in data.train_loss if r.get("stage") is not None})
    note = f"<p>Curriculum stages in the log: {esc(', '.join(map(str, stages)))}.</p>" if len(stages) > 1 else ""
    return section(title, img(png, "training loss per step") + note)


def _run_schedule(data: RunData) -> str:
    title = "Progressive schedule"
    if not data.schedule_stages:
        return omitted(title, "This run has no schedule_stages table: its method trains on whole rationales.")
    st = data.schedule_stages
    budget = plots.lines_png(
        {"budget D(t)": [(s["stage"], s["budget"]) for s in st], "used": [(s["stage"], s["used"]) for s in st]},
        "curriculum stage t", "output difficulty", order=["budget D(t)", "used"],
    )
    body = img(budget, "difficulty budget against used per stage")
    if data.input_steps:
        counts: dict[int, dict[int, int]] = {}
        for stage, steps, n in data.input_steps:
            counts.setdefault(stage, {})[steps] = n
        body += img(plots.stacked_bars_png(counts, "curriculum stage t", "rationales", "input steps"),
                    "input steps per stage")
    rows = [(s["stage"], fmt(s["budget"], 2), fmt(s["used"], 2), s["selected"], s["output_steps"]) for s in st]
    return section(title, body + table(["stage", "budget D(t)", "used", "selected", "output steps"], rows, {0, 1, 2, 3, 4}))


def _run_weights(data: RunData) -> str:
    title = "Token weights by role"
    if not data.token_sample and not data.role_hist:
        return omitted(title, "This run has no token_weights table: its method does not weight tokens.")
    body = ""
    if data.role_hist:
        totals: dict[str, int] = {}
        for role, _, n in data.role_hist:
            totals[role] = totals.get(role, 0) + n
        share = {(role, b): n / totals[role] for role, b, n in data.role_hist}
        # every bin of every role, empty ones at 0, so each line spans w = 0..1
        series = {role: [((b + 0.5) / WEIGHT_BINS, share.get((role, b), 0.0)) for b in range(WEIGHT_BINS)]
                  for role in totals}
        png = plots.lines_png(series, "token weight w", "share of the role's tokens", order=["core", "context", "filler"])
        body += img(png, "distribution of token weights by word role")
    if data.token_sample:
        body += ("<p>A sample: background = weight (white 0 to red 1), underline = role "
                 "(<span style='border-bottom:3px solid #1f4fbf'>core</span>, "
                 "<span style='border-bottom:3px solid #2e9d4a'>context</span>, none: filler); "
                 "a grey | marks a step boundary.</p>" + token_spans(data.token_sample))
    return section(title, body)


def _run_teacher(data: RunData) -> str:
    title = "Teacher calls"
    if data.teacher is None:
        return omitted(title, "This run has no teacher_calls table.")
    t = data.teacher
    rows = [(t["models"], t["calls"], t["tokens_in"], t["tokens_out"], f"{t['cost_usd']:.4f}", t["errors"])]
    body = table(["model", "calls", "tokens in", "tokens out", "cost (USD)", "errors"], rows, {1, 2, 3, 4, 5})
    if data.teacher_errors:
        body += "<p>Errors by message:</p>" + table(["error", "calls"], data.teacher_errors, {1})
    return section(title, body)


def ran_stages(run: Mapping[str, Any]) -> dict[str, str]:
    """stage -> key of what a run submitted, in DAG order (its outcomes' order); a run record's
    `stages` also holds planned stages its method skips, and is stored in name order."""
    outcomes = run.get("outcomes") or []
    if outcomes:
        return {o["stage"]: o["key"] for o in outcomes}
    return dict(run.get("stages") or {})


def _run_config(data: RunData) -> str:
    outcomes = {o["stage"]: o for o in data.run.get("outcomes") or []}
    stages = {**ran_stages(data.run), **(data.run.get("stages") or {})}  # what ran first, then the rest
    rows = []
    for stage, key in stages.items():
        o = outcomes.get(stage, {})
        status = o.get("status", "not run" if outcomes else "-")
        rows.append((stage, key, status, sum((o.get("rows") or {}).values()), fmt(o.get("seconds"), 2)))
    body = table(["stage", "key", "status", "rows", "seconds"], rows, {3, 4})
    body += pre_json(data.config, "Config, as the stages hashed it (click to open)")
    return section("Config and stage keys", body)


# ---- the comparison page ---------------------------------------------------------------------
def comparison_page(data: ComparisonData) -> str:
    rec = data.record
    methods = list(rec.get("methods") or [])
    methods += sorted({r["method"] for r in data.rows} - set(methods))
    sections = [
        _cmp_accuracy(data, methods), _cmp_curves(data, methods), _cmp_steps(data, methods),
        _cmp_numbers(data, methods), _cmp_config(data),
    ]
    subtitle = (f"{rec.get('name')} · methods {', '.join(map(str, methods))} · seeds "
                f"{', '.join(map(str, rec.get('seeds') or []))} · {rec.get('status')} · started "
                f"{rec.get('started_at')} · finished {rec.get('finished_at') or '-'}")
    return document(f"kpod comparison {rec['comparison_id']}", subtitle, sections)


def _cmp_accuracy(data: ComparisonData, methods: list[str]) -> str:
    title = "Accuracy per method (95% intervals; each dot a seed)"
    points = [
        {"label": r["method"], "seed": r["seed"], "split": split, "accuracy": r[f"{split}_accuracy"],
         "ci_low": r[f"{split}_ci_low"], "ci_high": r[f"{split}_ci_high"]}
        for r in data.rows for split in plots.SPLITS
    ]
    if not any(p["accuracy"] is not None for p in points):
        return omitted(title, "No run of this comparison has been evaluated yet.")
    return section(title, img(plots.accuracy_png(points, methods), "accuracy per method and split"))


def _by_method(data: ComparisonData, curves: Mapping[str, list[tuple[int, float]]]) -> dict[str, list[tuple[float, float]]]:
    """Per-run curves -> each method's mean over its seeds at each x."""
    method_of = {r["run_id"]: r["method"] for r in data.record.get("runs", [])}
    grouped: dict[str, list[list[tuple[int, float]]]] = {}
    for run_id, curve in curves.items():
        if run_id in method_of and curve:
            grouped.setdefault(method_of[run_id], []).append(curve)
    return {m: mean_by_x(cs) for m, cs in grouped.items()}


def _cmp_curves(data: ComparisonData, methods: list[str]) -> str:
    val = _by_method(data, {r: [(e + 1, a) for e, a in c] for r, c in data.val_curves.items()})
    loss = _by_method(data, data.train_loss)
    parts = []
    if val:
        png = plots.lines_png(val, "epoch", "val accuracy (mean over seeds)", order=methods, ylim=(0, 1.02))
        parts.append(section("Val accuracy per epoch", img(png, "val accuracy per epoch per method")))
    else:
        parts.append(omitted("Val accuracy per epoch", "No run scored val per epoch (train.select_every was 0)."))
    if loss:
        png = plots.lines_png(loss, "optimiser step", "training loss (mean over seeds)", order=methods, markers=False)
        parts.append(section("Training loss", img(png, "training loss per method")))
    else:
        parts.append(omitted("Training loss", "No run of this comparison has a train_log table."))
    return "".join(parts)


def _cmp_steps(data: ComparisonData, methods: list[str]) -> str:
    title = "Test accuracy by number of reasoning steps"
    per_run: dict[tuple[str, int], list[tuple[int, float]]] = {}
    for r in data.steps:
        if r["split"] == "test" and r["n_steps"] is not None:
            per_run.setdefault((r["method"], r["seed"]), []).append((r["n_steps"], r["accuracy"]))
    if not per_run:
        return omitted(title, "This comparison has no comparison_steps rows for test.")
    series = {m: mean_by_x([c for (mm, _), c in per_run.items() if mm == m]) for m in {k[0] for k in per_run}}
    png = plots.lines_png(series, "reasoning steps in the question", "test accuracy (mean over seeds)",
                          order=methods, ylim=(0, 1.02))
    xs = sorted({x for pts in series.values() for x, _ in pts})
    rows = [[m] + [fmt(dict(series[m]).get(x)) for x in xs] for m in methods if m in series]
    return section(title, img(png, "test accuracy by number of steps") + table(["method"] + [f"{x} steps" for x in xs], rows, range(1, len(xs) + 1)))


def _cmp_numbers(data: ComparisonData, methods: list[str]) -> str:
    summary = []
    for m in methods:
        mine = sorted((r for r in data.rows if r["method"] == m), key=lambda r: r["seed"])
        cells = [m, f"{sum(r['status'] == 'completed' for r in mine)}/{len(mine)}"]
        for split in plots.SPLITS:
            ms = mean_std([r[f"{split}_accuracy"] for r in mine if r[f"{split}_accuracy"] is not None])
            cells.append("-" if ms is None else f"{ms[0]:.3f} ± {ms[1]:.3f}")
        cells.append(", ".join(fmt(r["test_accuracy"]) for r in mine))
        secs = mean_std([r["train_seconds"] for r in mine if r["train_seconds"] is not None])
        cells.append("-" if secs is None else f"{secs[0]:.1f}")
        summary.append(cells)
    header = ["method", "seeds done", "val mean ± std", "test mean ± std", "test per seed", "train s (mean)"]
    runs = [
        (r["method"], r["seed"], r["run_id"], r["status"], _interval(r, "val_"), _interval(r, "test_"),
         fmt(r["train_seconds"], 1), r["train_tokens"], _last_line(r.get("error")))
        for r in sorted(data.rows, key=lambda r: (methods.index(r["method"]) if r["method"] in methods else len(methods), r["seed"]))
    ]
    run_header = ["method", "seed", "run", "status", "val [95% CI]", "test [95% CI]", "train s", "train tokens", "error"]
    body = table(header, summary, {1, 5}) + "<p>Mean ± std over seeds (sample std, n - 1). Per run:</p>" + table(run_header, runs, {1, 6, 7})
    return section("The numbers", body)


def _last_line(text: str | None) -> str:
    """A failed run's error tail, shortened to its last line (the exception)."""
    lines = (text or "").strip().splitlines()
    return lines[-1] if lines else ""


def _cmp_config(data: ComparisonData) -> str:
    stages: list[str] = []
    for keys in sorted(data.stage_keys.values(), key=len, reverse=True):  # the fullest DAG's order first
        stages += [s for s in keys if s not in stages]
    method_seed = {r["run_id"]: (r["method"], r["seed"]) for r in data.record.get("runs", [])}
    rows = [
        [*method_seed.get(run_id, ("?", "?")), run_id] + [keys.get(s, "-") for s in stages]
        for run_id, keys in data.stage_keys.items()
    ]
    body = "<p>Stage keys per run (equal keys: one stage computed once, shared):</p>"
    body += table(["method", "seed", "run"] + stages, rows, {1})
    body += pre_json(data.record.get("config"), "Config of the comparison (click to open)")
    return section("Config and stage keys", body)
