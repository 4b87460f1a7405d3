"""`kpod export`: one recorded run as Hugging Face folders a person can take away.

Layout of the export (default `store.export_dir(run_id)`):
- `datasets/rationales`, `datasets/steps`, `datasets/token_weights` (the last only when the run
  has a weights stage): `datasets.Dataset.save_to_disk` of the run's tables, loadable with
  `datasets.load_from_disk`; `datasets/README.md`, the dataset card;
- `model/`: the trained student, loaded with the project's own loader (`tasks.core.models`) and
  saved with `save_pretrained` next to its tokenizer; `model/README.md`, the model card;
- `kpod-export.json`: the run id and stage keys it came from (also the mark that lets `--force`
  replace a directory: a directory without it is never deleted).

The export is written into a temp dir beside `out` and renamed into place, so a crash leaves
no half export. Nothing here touches the network; `push_to_hub` does, and only when called.
The config in the cards is the config sections in the stages' manifest `inputs`: runtime
fields (where the name of the API key's environment variable lives) are never there, and URLs
lose any user:password.
"""

from __future__ import annotations

import json
import re
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa

from storage.catalog import default_run
from storage.keys import digest
from storage.lineage import used_stages
from storage.store import Store

MARK = "kpod-export.json"
DATASET_TABLES = ("rationales", "steps", "token_weights")
REQUIRED = ("dataset", "teacher", "rationales", "train")  # what an export cannot do without

Progress = Callable[[str], None]


class ExportError(ValueError):
    """The run or the output directory does not allow an export (a one-line message)."""


# ---- which run, which stages -------------------------------------------------------------
def resolve_run(store: Store, run_id: str | None) -> tuple[dict[str, Any], dict[str, str]]:
    """The run record (default: the latest completed run) and the stages its result used -> key."""
    runs = store.list_runs() if store.root.is_dir() else []
    if not runs:
        raise ExportError(f"no run recorded in {store.root}; run `kpod run CONFIG` first")
    run = default_run(runs) if run_id is None else store.load_run(run_id)
    keys = used_stages(store, run)  # not every stage the run lists: those its student read
    missing = [s for s in REQUIRED if s not in keys]
    if missing:
        raise ExportError(
            f"run {run['run_id']} has no complete {', '.join(missing)} stage(s); an export needs "
            f"a trained student (`kpod run CONFIG` first, or --run another run)"
        )
    return run, keys


def run_table(store: Store, keys: dict[str, str], table: str) -> pa.Table | None:
    """`table` over every stage of the run that wrote it (teacher and mentor rationales), or None."""
    parts = [
        store.read_table(stage, key, table)
        for stage, key in sorted(keys.items())
        if table in store.manifest(stage, key).get("tables", {})
    ]
    return pa.concat_tables(parts) if parts else None


# ---- the output directory ----------------------------------------------------------------
def check_out(out: Path, force: bool) -> None:
    """Refuse a non-empty `out`, except a previous kpod export with `force` (then replaced)."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ExportError(f"--out {out} exists and is not a directory")
    if not any(out.iterdir()):
        return
    if not (out / MARK).is_file():
        raise ExportError(f"--out {out} is not empty and holds no kpod export; choose an empty or new directory")
    if not force:
        raise ExportError(f"{out} already holds an export; pass --force to replace it")


def _swap_in(tmp: Path, out: Path) -> None:
    """Rename `tmp` to `out`; an old export there is moved aside first, then deleted."""
    trash = None
    if out.exists():
        trash = out.with_name(f".old-export-{uuid.uuid4().hex[:6]}")
        out.rename(trash)
    tmp.rename(out)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


def export_run(
    store: Store, run_id: str | None = None, out: str | Path | None = None, force: bool = False,
    progress: Progress = lambda line: None,
) -> Path:
    """Write the export of one run (see the module doc); returns its directory."""
    run, keys = resolve_run(store, run_id)
    out = Path(out).resolve() if out is not None else store.export_dir(run["run_id"])
    check_out(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".tmp-export-{uuid.uuid4().hex[:8]}"
    try:
        rows = write_datasets(store, keys, tmp / "datasets", progress)
        progress("model: loading the trained student and saving it with save_pretrained")
        write_model(store, keys["train"], tmp / "model")
        facts = card_facts(store, run, keys, rows)
        (tmp / "datasets" / "README.md").write_text(dataset_card(facts))
        (tmp / "model" / "README.md").write_text(model_card(facts))
        (tmp / MARK).write_text(json.dumps({"run_id": run["run_id"], "stages": keys, "rows": rows}, indent=1))
        _swap_in(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    progress(f"wrote {out}")
    return out


def write_datasets(store: Store, keys: dict[str, str], directory: Path, progress: Progress) -> dict[str, int]:
    """`save_to_disk` of each dataset table the run has; returns table -> rows."""
    from datasets import Dataset, disable_progress_bars

    disable_progress_bars()  # one line per table below instead of a bar per shard
    rows = {}
    for table in DATASET_TABLES:
        data = run_table(store, keys, table)
        if data is None:  # token_weights: only KPOD methods run the weights stage
            continue
        progress(f"datasets/{table}: {data.num_rows} rows")
        Dataset(data).save_to_disk(str(directory / table))
        rows[table] = data.num_rows
    return rows


def write_model(store: Store, train_key: str, directory: Path) -> None:
    """The student of the train stage, through the project's loader and saver (one of each)."""
    from tasks.core.models import load_model, save_model

    model, tokenizer = load_model(store.file_path("train", train_key, "model"))
    save_model(model, tokenizer, directory)


# ---- what the cards say ------------------------------------------------------------------
_URL_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")


def _clean(value: Any) -> Any:
    """Config values as shown in a card: a URL's user:password@ dropped (runtime fields, where
    key names live, are never in a manifest's inputs)."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    if isinstance(value, str):
        return _URL_USERINFO.sub("", value)
    return value


def _seeds(inputs: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Every field named `seed` in a stage's inputs, by dotted path."""
    out: dict[str, Any] = {}
    for name, value in inputs.items():
        path = f"{prefix}.{name}" if prefix else name
        if isinstance(value, dict):
            out.update(_seeds(value, path))
        elif name == "seed":
            out[path] = value
    return out


def template_hash(teacher: dict[str, Any]) -> str:
    """sha256 (16 hex) of the teacher's prompt as rendered for a placeholder question: template
    name and version, exemplars, system prompt and API form all change it."""
    from tasks.core.prompts import Exemplar, get_template

    template = get_template(teacher["template"])
    exemplars = [Exemplar(e["question"], e["rationale"], e["answer"]) for e in teacher.get("exemplars", [])]
    rendered = template.render("{question}", exemplars, teacher.get("system_prompt"))
    body = list(rendered.messages) if teacher.get("api", "chat") == "chat" else rendered.prompt
    return digest({"template": [template.name, template.version], "body": body}, length=16)


def card_facts(store: Store, run: dict[str, Any], keys: dict[str, str], rows: dict[str, int]) -> dict[str, Any]:
    """Everything the two cards state, from the run's manifests and tables."""
    from importlib.metadata import PackageNotFoundError, version

    from tasks.config.pipeline import PipelineConfig

    sections = set(PipelineConfig.model_fields)
    # the config's sections as the stages read them (one section is read by several stages,
    # always the same values in one run); derived labels (beta, method) are left to their section
    config: dict[str, Any] = {}
    for stage, key in keys.items():
        for name, value in store.manifest(stage, key).get("inputs", {}).items():
            if name in sections and isinstance(value, dict):
                config.setdefault(name, _clean(value))
    calls = run_table(store, keys, "teacher_calls")
    metrics = run_table(store, keys, "metrics")
    try:
        kpod_version = version("kpod")
    except PackageNotFoundError:  # run from a checkout that was never installed
        kpod_version = "unknown (not installed)"
    teacher = config["teacher"]
    return {
        "run_id": run["run_id"], "run_name": run.get("name"), "stages": keys, "rows": rows,
        "kpod_version": kpod_version, "config": config, "seeds": _seeds(config),
        "teacher": {
            "backend": teacher["backend"], "models": sorted(set(calls.column("model").to_pylist())),
            "template": f"{teacher['template']}", "template_sha256": template_hash(teacher),
            "calls": calls.num_rows,
            "errors": sum(e is not None for e in calls.column("error").to_pylist()),
            "tokens_in": sum(v or 0 for v in calls.column("tokens_in").to_pylist()),
            "tokens_out": sum(v or 0 for v in calls.column("tokens_out").to_pylist()),
            "cost_usd": sum(v or 0.0 for v in calls.column("cost_usd").to_pylist()),
        },
        "method": config["train"]["method"],
        "metrics": metrics.to_pylist() if metrics is not None else [],
    }


# ---- the cards ---------------------------------------------------------------------------
def _metrics_lines(facts: dict[str, Any]) -> list[str]:
    if not facts["metrics"]:
        return ["Not evaluated: this run has no complete evaluate stage."]
    lines = ["| split | n | accuracy | 95% CI (Wilson) |", "|---|---:|---:|---|"]
    for m in facts["metrics"]:
        lines.append(f"| {m['split']} | {m['n']} | {m['accuracy']:.3f} | [{m['ci_low']:.3f}, {m['ci_high']:.3f}] |")
    return lines


def _provenance_lines(facts: dict[str, Any]) -> list[str]:
    """The part both cards share: teacher, cost, seeds, run, stage keys, config."""
    import yaml

    t = facts["teacher"]
    return [
        "## Provenance",
        (f"- Teacher: `{', '.join(t['models'])}` ({t['backend']} backend), prompt template "
         f"`{t['template']}`, rendered-template sha256 `{t['template_sha256']}`."),
        (f"- Teacher calls: {t['calls']} ({t['errors']} failed), {t['tokens_in']} tokens in, "
         f"{t['tokens_out']} tokens out, ${t['cost_usd']:.4f}."),
        f"- Seeds: {', '.join(f'{k}={v}' for k, v in sorted(facts['seeds'].items()) if v is not None) or 'none'}.",
        f"- kpod {facts['kpod_version']}, run `{facts['run_id']}` ({facts['run_name']}).",
        "- Stage keys: " + ", ".join(f"{s} `{k}`" for s, k in facts["stages"].items()) + ".",
        "",
        "## Config (as the stages read it; runtime settings and secrets are never part of it)",
        "```yaml",
        yaml.safe_dump(facts["config"], sort_keys=True).rstrip(),
        "```",
    ]


def dataset_card(facts: dict[str, Any]) -> str:
    """datasets/README.md (`push_to_hub` adds the Hub's `configs:` front matter)."""
    front = ["---", "tags: [kpod, chain-of-thought, distillation]", "---"]
    tables = ", ".join(f"`{t}` ({n} rows)" for t, n in facts["rows"].items())
    return "\n".join(front + [
        f"# Chain-of-thought rationales from kpod run {facts['run_id']}",
        "",
        (f"Tables: {tables}. `rationales` holds every graded teacher (and mentor) rationale with its "
         "extracted answer and `correct` flag; `steps` splits each into reasoning steps (character "
         "spans); `token_weights`, when present, is KPOD's learned weight per student token."),
        "Load one with `datasets.load_from_disk(\"datasets/rationales\")`.",
        "",
        f"## Student trained on them ({facts['method']})",
        *_metrics_lines(facts),
        "",
        *_provenance_lines(facts),
    ]) + "\n"


def model_card(facts: dict[str, Any]) -> str:
    """model/README.md."""
    return "\n".join([
        "---",
        "library_name: transformers",
        "tags: [kpod, chain-of-thought, distillation]",
        "---",
        f"# Student distilled by kpod ({facts['method']}), run {facts['run_id']}",
        "",
        ("A small model trained to answer with a chain of thought, on the teacher rationales in "
         "`../datasets`. Prompt it as it was trained: `Q: {question}\\nA:` and decode greedily."),
        ("Load with `AutoModelForCausalLM.from_pretrained` (`AutoModelForSeq2SeqLM` for a T5-family "
         "student) and `AutoTokenizer.from_pretrained` on this directory."),
        "",
        "## Accuracy (greedy decoding)",
        *_metrics_lines(facts),
        "",
        *_provenance_lines(facts),
    ]) + "\n"


# ---- the Hub (network: only behind --push-to-hub, never in tests) ---------------------------
def push_to_hub(out: Path, repo_prefix: str, progress: Progress = lambda line: None) -> dict[str, str]:
    """Push an export: the tables as configs of `<prefix>-data` (a dataset repo) and the model
    folder to `<prefix>-student`. The token is huggingface_hub's own (HF_TOKEN, or a login);
    kpod never reads, prints or writes it."""
    from datasets import load_from_disk
    from huggingface_hub import HfApi, get_token

    if get_token() is None:
        raise ExportError("--push-to-hub needs a Hugging Face token: set HF_TOKEN or run `hf auth login`")
    mark = json.loads((out / MARK).read_text())
    data_repo, model_repo = f"{repo_prefix}-data", f"{repo_prefix}-student"
    api = HfApi()
    for table in mark["rows"]:
        progress(f"pushing datasets/{table} to {data_repo} (config {table})")
        load_from_disk(str(out / "datasets" / table)).push_to_hub(data_repo, config_name=table)
    # our card last, with the configs' front matter, so it is the README the Hub shows
    card = (out / "datasets" / "README.md").read_text()
    card = card.replace("---\ntags:", "---\n" + _hub_configs(mark["rows"]) + "tags:", 1)
    api.upload_file(path_or_fileobj=card.encode(), path_in_repo="README.md", repo_id=data_repo, repo_type="dataset")
    progress(f"pushing model/ to {model_repo}")
    api.create_repo(model_repo, exist_ok=True)
    api.upload_folder(folder_path=str(out / "model"), repo_id=model_repo)
    return {"datasets": data_repo, "model": model_repo}


def _hub_configs(rows: dict[str, int]) -> str:
    """The dataset card's `configs:` front matter for the files push_to_hub(config_name=) wrote."""
    lines = ["configs:"]
    for table in rows:
        lines += [f"- config_name: {table}", "  data_files:", "  - split: train", f"    path: {table}/train-*"]
    return "\n".join(lines) + "\n"
