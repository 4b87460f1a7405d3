"""Looking at token weights: each token shaded by its weight (like KPOD's Figure 2).

`render_html(rows, path)` and `render_png(rows, path)` take `token_weights` rows (dicts with
rationale_id, pos, token, char_start, char_end, step, weight, and optionally role: core,
context or filler, marked by an underline); `show_weights(store, keys, ...)` reads the table of
a run's `weights` stage (and, for synthetic data, the word roles of its `rationales` stage) and
writes both pages under the store's reports.
The gap between one token's char_end and the next one's char_start is whitespace the tokenizer
put in no token; it is drawn as spaces.
"""

from __future__ import annotations

import html
from pathlib import Path
from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from storage.store import Store
from tasks.core.synthetic import token_roles


def by_rationale(rows: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Token rows grouped by rationale_id (first-seen order), each group in `pos` order."""
    out: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        out.setdefault(r["rationale_id"], []).append(r)
    for toks in out.values():
        toks.sort(key=lambda r: r["pos"])
    return out


# underline colour per word role (synthetic data only): what decides the answer, what it is about
ROLE_MARK = {"core": "#1f4fbf", "context": "#2e9d4a"}


def _shade(w: float) -> str:
    """White (w = 0) to deep red (w = 1)."""
    w = min(max(float(w), 0.0), 1.0)
    g = int(round(255 - 200 * w))
    return f"rgb(255,{g},{g})"


def token_spans(toks: Sequence[Mapping[str, Any]]) -> str:
    """One rationale's tokens (in `pos` order) as HTML: each on a background shaded by its
    weight, underlined by its word role, a grey | at each step boundary, the original spacing
    between tokens kept; hovering shows w, step, position and role."""
    parts: list[str] = []
    prev_end, prev_step = None, None
    for t in toks:
        if prev_step is not None and t["step"] != prev_step:
            parts.append("<span class='s'> | </span>")
        elif prev_end is not None and t["char_start"] > prev_end:
            parts.append(" " * (t["char_start"] - prev_end))
        role = t.get("role")
        title = f"w={t['weight']:.3f} step {t['step']} pos {t['pos']}" + (f" {role}" if role else "")
        mark = f";border-bottom:3px solid {ROLE_MARK[role]}" if role in ROLE_MARK else ""
        data = f" data-role='{html.escape(role)}'" if role else ""
        parts.append(
            f"<span class='t' style='background:{_shade(t['weight'])}{mark}' title='{html.escape(title)}'{data}>"
            f"{html.escape(t['token'])}</span>"
        )
        prev_end, prev_step = t["char_end"], t["step"]
    return "".join(parts)


def render_html(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """One block per rationale; each token's background = its weight; hover shows w and step."""
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>kpod token weights</title>",
        "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}"
        ".r{margin:1.5em 0;line-height:1.9;font-family:monospace;white-space:pre-wrap}"
        ".t{padding:1px 0;border-radius:2px}.s{color:#999}</style></head><body>",
        "<h1>Token weights</h1><p>Background: the keep probability w<sub>j</sub> of each token "
        "(white 0 &rarr; red 1). A grey | marks a step boundary. Hover a token for its weight.",
        " Underline (synthetic data): <span style='border-bottom:3px solid #1f4fbf'>core</span> "
        "(numbers, operators, results, operation words), <span style='border-bottom:3px solid "
        "#2e9d4a'>context</span> (quantity nouns, names); no underline: filler.</p>",
    ]
    for rid, toks in by_rationale(rows).items():
        mean = sum(t["weight"] for t in toks) / len(toks)
        parts.append(f"<h3>{html.escape(rid)} <small>({len(toks)} tokens, mean w {mean:.3f})</small></h3><div class='r'>")
        parts.append(token_spans(toks))
        parts.append("</div>")
    parts.append("</body></html>")
    path = Path(path)
    path.write_text("".join(parts), encoding="utf-8")
    return path


def render_png(rows: Sequence[dict[str, Any]], path: str | Path, width: int = 90) -> Path:
    """The same picture as a PNG: monospace tokens on shaded boxes, `width` characters a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import LinearSegmentedColormap
    from matplotlib.patches import Rectangle

    groups = by_rationale(rows)
    placed = []  # (rationale index, line, col, text, weight)
    headers = []
    line = 0
    for rid, toks in groups.items():
        headers.append((line, rid))
        line += 1
        col = 0
        prev_end = None
        for t in toks:
            text = t["token"].replace("\n", " ")
            gap = t["char_start"] - prev_end if prev_end is not None else 0
            col += max(gap, 0)
            if col + len(text) > width and col > 0:
                line, col = line + 1, 0
                text = text.lstrip()
            placed.append((line, col, text, t["weight"], t.get("role")))
            col += len(text)
            prev_end = t["char_end"]
        line += 2
    fig_h = max(1.5, 0.28 * line + 0.6)
    fig, ax = plt.subplots(figsize=(0.11 * width + 1, fig_h))
    ax.set_xlim(0, width)
    ax.set_ylim(line, -1)
    ax.axis("off")
    # the HTML page's shading: white (w = 0) to rgb(255, 55, 55) (w = 1)
    cmap = LinearSegmentedColormap.from_list("kpod_w", [(1, 1, 1), (1, 55 / 255, 55 / 255)])
    for ln, rid in headers:
        ax.text(0, ln, rid, fontsize=9, fontweight="bold", va="center", family="monospace")
    for ln, col, text, w, role in placed:
        if text:
            ax.add_patch(Rectangle((col, ln - 0.42), len(text), 0.84, color=cmap(w), lw=0))
            if role in ROLE_MARK:  # the HTML page's underline
                ax.add_patch(Rectangle((col, ln + 0.30), len(text), 0.12, color=ROLE_MARK[role], lw=0))
            ax.text(col, ln, text, fontsize=8, va="center", family="monospace")
    sm = ScalarMappable(cmap=cmap)
    sm.set_clim(0, 1)
    fig.colorbar(sm, ax=ax, fraction=0.02, pad=0.01, label="token weight w")
    path = Path(path)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def examples_markdown(rows: Sequence[dict[str, Any]], limit: int = 3, threshold: float = 0.5) -> str:
    """A few rationales as markdown for the Prefect UI: tokens with w >= threshold in bold."""
    out = []
    for rid, toks in list(by_rationale(rows).items())[:limit]:
        text, prev_end = "", None
        for t in toks:
            if prev_end is not None and t["char_start"] > prev_end:
                text += " " * (t["char_start"] - prev_end)
            tok = t["token"]
            core = tok.strip()
            if core and t["weight"] >= threshold:
                lead = tok[: len(tok) - len(tok.lstrip())]
                tok = f"{lead}**{core}**"
            text += tok
            prev_end = t["char_end"]
        out.append(f"`{rid}`: {text.strip()}")
    return "\n\n".join(out)


def show_weights(
    store: Store, keys: dict[str, str], rationale_id: str | None = None, limit: int = 5,
) -> tuple[Path, Path]:
    """Render a run's token weights: one rationale, or the first `limit` ones (table order).

    keys: stage -> key of the run (as `Store.load_run()["keys"]` or `plan` gives them).
    Returns (html path, png path) under the store's reports.
    """
    if "weights" not in keys:
        raise KeyError("this run has no `weights` stage; run `kpod run <config> --stages weights` first")
    key = keys["weights"]
    table = store.read_table("weights", key, "token_weights")
    if rationale_id is not None:
        table = table.filter(pc.equal(table["rationale_id"], rationale_id))
        if table.num_rows == 0:
            raise KeyError(f"token_weights ({key}) has no rationale {rationale_id!r}")
        tag = rationale_id.replace(":", "_").replace("/", "_")
    else:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        ids = pc.unique(table["rationale_id"]).to_pylist()[:limit]
        table = table.filter(pc.is_in(table["rationale_id"], value_set=pa.array(ids)))
        tag = f"first{limit}"
    rows = with_roles(table.to_pylist(), store, keys)
    html_path = render_html(rows, store.page_path(f"weights-{key}-{tag}.html"))
    png_path = render_png(rows, store.page_path(f"weights-{key}-{tag}.png"))
    return html_path, png_path


def with_roles(rows: list[dict[str, Any]], store: Store, keys: dict[str, str]) -> list[dict[str, Any]]:
    """`rows` with each token's role from the run's `word_labels` (the strongest role of the
    words the token overlaps: core > context > filler); unchanged when there are none."""
    ids = {r["rationale_id"] for r in rows}
    try:
        labels = store.read_table(
            "rationales", keys.get("rationales", ""), "word_labels", columns=["rationale_id", "char_start", "char_end", "role"]
        )
    except FileNotFoundError:  # real data: no word roles are known
        return rows
    words: dict[str, list[tuple[int, int, str]]] = {}
    for w in labels.filter(pc.is_in(labels["rationale_id"], value_set=pa.array(sorted(ids)))).to_pylist():
        words.setdefault(w["rationale_id"], []).append((w["char_start"], w["char_end"], w["role"]))
    return [
        {**r, "role": token_roles([(r["char_start"], r["char_end"])], words.get(r["rationale_id"], []))[0]}
        for r in rows
    ]
