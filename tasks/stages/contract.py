"""The stage contract: what a stage declares, what it receives, and how it is executed.

A stage module in `tasks/stages/` is a thin shell: `run(ctx)` reads its inputs through the
context, calls core/training code and writes its outputs through the context. Its `SPEC` names
- `inputs(config)`: the typed model of every config value the stage reads (its own section,
  values of other sections, external fingerprints such as a data file's sha256). It is the
  only part of the config the stage sees (`ctx.inputs`) and exactly what is hashed into its key;
- `upstream(config)`: the stages whose outputs it reads (they may depend on the method);
- `enabled(config)`: whether a default run of this config needs it.
Its code version is computed from the module defining `run` and every project module that
module imports (storage.keys.import_closure), so no list of modules is kept by hand.
Nothing here imports Prefect: `execute` is what the Prefect wrapper calls and tests call.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Iterable, Iterator

import pyarrow as pa

from storage.keys import code_version, import_closure, stage_key
from storage.store import StageWriter, Store
from storage.stream import BATCH_ROWS, TableSink
from tasks.config.base import KpodModel

if TYPE_CHECKING:
    from tasks.config.pipeline import PipelineConfig

log = logging.getLogger("kpod")


def _always(cfg: "PipelineConfig") -> bool:
    return True


@dataclass(frozen=True)
class StageSpec:
    name: str
    run: Callable[["StageContext"], None]
    # the typed values the stage reads, built from the config; hashed into the key
    inputs: Callable[["PipelineConfig"], KpodModel]
    upstream: Callable[["PipelineConfig"], tuple[str, ...]]
    description: str = ""
    enabled: Callable[["PipelineConfig"], bool] = _always

    @property
    def modules(self) -> tuple[str, ...]:
        """The project modules whose source versions this stage (found from its imports)."""
        return import_closure(self.run.__module__)

    def code_version(self) -> str:
        return code_version(self.modules)


@dataclass
class PlannedStage:
    name: str
    key: str
    upstream: dict[str, str]  # upstream stage -> key
    enabled: bool = True  # part of a default run of this config


@dataclass
class StageContext:
    """What a running stage sees: its typed inputs, its upstream stages' outputs by name, and its writer."""

    store: Store
    spec: StageSpec
    key: str
    inputs: Any  # the stage's typed inputs model (spec.inputs(config)); all of the config it sees
    upstream: dict[str, str]  # upstream stage -> key: the only stages whose outputs it may read
    writer: StageWriter
    show_progress: bool = True
    # called with a percentage as long work advances (the Prefect wrapper shows it in the UI)
    progress_hook: Callable[[float], None] | None = None
    # runtime-only values the orchestrator hands in, never hashed (e.g. an API key from a
    # Prefect Secret block, looked up by flows/)
    runtime: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.spec.name

    # ---- inputs --------------------------------------------------------------------------
    def _key_of(self, stage: str) -> str:
        if stage not in self.upstream:
            raise KeyError(f"stage {self.name!r} does not declare {stage!r} as upstream")
        return self.upstream[stage]

    def reads(self, stage: str) -> bool:
        """Whether `stage` is one of this stage's upstream stages (for this config)."""
        return stage in self.upstream

    def table(self, stage: str, name: str, columns: list[str] | None = None) -> pa.Table:
        return self.store.read_table(stage, self._key_of(stage), name, columns=columns)

    def table_path(self, stage: str, name: str) -> Path:
        return self.store.table_path(stage, self._key_of(stage), name)

    def batches(self, stage: str, name: str, columns: list[str] | None = None,
                batch_rows: int = BATCH_ROWS) -> Iterator[pa.RecordBatch]:
        """An upstream table's rows in order, a record batch at a time (memory: one batch)."""
        return self.store.iter_batches(stage, self._key_of(stage), name, columns, batch_rows)

    def query(self, tables: dict[str, tuple[str, str]]) -> ContextManager[Any]:
        """A DuckDB connection with a view per upstream table ({view: (stage, table)}), spilling
        into this key's work dir: joins and sorts over tables larger than memory."""
        named = {v: (stage, self._key_of(stage), t) for v, (stage, t) in tables.items()}
        return self.store.query(named, self.work_dir)

    def file(self, stage: str, name: str) -> Path:
        return self.store.file_path(stage, self._key_of(stage), name)

    # ---- outputs -------------------------------------------------------------------------
    def write_table(self, name: str, data: pa.Table) -> pa.Table:
        return self.writer.write_table(name, data)

    def table_writer(self, name: str) -> ContextManager[TableSink]:
        """Write a table batch by batch; it exists once the block ends without error."""
        return self.writer.table_writer(name)

    def output_path(self, name: str) -> Path:
        return self.writer.path(name)

    @property
    def work_dir(self) -> Path:
        """Scratch that survives a crash (checkpoints, partial results) for this key."""
        return self.store.work_dir(self.name, self.key)

    def progress(self, iterable: Iterable | None = None, **kw: Any):
        """A tqdm bar on stderr; with a `progress_hook`, its percentage is reported too.

        Into a file or a worker's log (not a terminal) it writes at most every
        NON_TTY_INTERVAL_S: each write there is a line kept forever (a teacher run's bar, redrawn
        on every `set_postfix`, once filled 449 KB of log)."""
        from tqdm.auto import tqdm

        hook = self.progress_hook
        kw.setdefault("file", sys.stderr)
        tty = _isatty(kw["file"])

        class _Reporting(tqdm):
            _last = 0.0

            def update(self, n: float | None = 1) -> bool | None:
                out = super().update(n)
                now = time.monotonic()
                if hook is not None and self.total and now - self._last >= 2.0:
                    self._last = now
                    hook(min(100.0, 100.0 * self.n / self.total))
                return out

            def set_postfix(self, ordered_dict: Any = None, refresh: bool = True, **kwargs: Any) -> None:
                # a forced redraw ignores mininterval; off a terminal, the next timed one shows it
                super().set_postfix(ordered_dict, refresh=refresh and tty, **kwargs)

        kw.setdefault("desc", self.name)
        kw.setdefault("disable", not self.show_progress)
        kw.setdefault("dynamic_ncols", True)
        kw.setdefault("mininterval", 1.0 if tty else NON_TTY_INTERVAL_S)  # cheap in tight loops too
        return _Reporting(iterable, **kw)


NON_TTY_INTERVAL_S = 10.0  # seconds between progress lines written to a file or a log


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def plan(config: "PipelineConfig", specs: Iterable[StageSpec]) -> list[PlannedStage]:
    """Every stage's key, in DAG order. Pure: computed from the config alone.

    Stages the config does not need (`enabled` false, e.g. KPOD's weights under Std-CoT) are
    planned too, so a user can still run one by name; a default run skips them.
    """
    keys: dict[str, str] = {}
    out: list[PlannedStage] = []
    for spec in specs:
        ups = spec.upstream(config)
        missing = [u for u in ups if u not in keys]
        if missing:
            raise ValueError(f"stage {spec.name!r} reads {missing}, which come later in the DAG")
        upstream = {u: keys[u] for u in ups}
        key = stage_key(spec.name, spec.code_version(), hashed_inputs(spec, config), upstream)
        keys[spec.name] = key
        out.append(PlannedStage(spec.name, key, upstream, spec.enabled(config)))
    return out


def hashed_inputs(spec: StageSpec, config: "PipelineConfig") -> dict[str, Any]:
    """The stage's inputs as hashed: JSON data without runtime-only fields."""
    return spec.inputs(config).hashable()


@dataclass
class Outcome:
    stage: str
    key: str
    status: str  # "cached" | "computed"
    rows: dict[str, int]
    seconds: float
    summary: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return dict(
            stage=self.stage,
            key=self.key,
            status=self.status,
            rows=self.rows,
            seconds=self.seconds,
            summary=self.summary,
        )


def execute(
    spec: StageSpec,
    config: "PipelineConfig",
    keys: dict[str, str],
    store: Store,
    force: bool = False,
    show_progress: bool = True,
    progress_hook: Callable[[float], None] | None = None,
    runtime: Callable[[], dict[str, Any]] | None = None,
    keep_work: bool = False,
) -> Outcome:
    """Compute one stage unless its artifact exists; at most one process computes a key.

    `runtime` gives the never-hashed values the stage needs (an API key); it is called only
    when the stage computes, so a cached stage costs no secret lookup. A forced stage starts
    from nothing (its work dir, where training resumes from, is cleared first); a committed
    stage's work dir is deleted unless `keep_work`. A committed stage whose files no longer
    match its manifest is corrupt: never served, recomputed here.

    Two concurrent runs of the same stage: the second waits on the lock, then finds the
    manifest and returns it as cached.
    """
    key = keys[spec.name]
    t0 = time.perf_counter()
    if not force and store.is_complete(spec.name, key):
        return cached_outcome(spec.name, key, store, t0)
    with store.lock(spec.name, key):
        if not force and store.is_complete(spec.name, key):
            return cached_outcome(spec.name, key, store, t0)
        _prepare(spec, key, store, force)
        upstream = {u: keys[u] for u in spec.upstream(config)}
        for up, up_key in upstream.items():
            if not store.is_complete(up, up_key):
                raise RuntimeError(f"stage {spec.name!r} needs stage {up!r} ({up_key}), which is not complete")
        inputs = spec.inputs(config)
        manifest = {
            "code_version": code_version(modules := spec.modules),
            "code_modules": list(modules),
            "inputs": inputs.hashable(),
            "upstream": upstream,
        }
        with store.writing(spec.name, key, manifest) as writer:
            ctx = StageContext(
                store, spec, key, inputs, upstream, writer, show_progress, progress_hook, runtime() if runtime else {}
            )
            spec.run(ctx)
            writer.summary.update(ctx.summary)
        if not keep_work:  # committed: its checkpoints are worth nothing more
            store.clear_work_dir(spec.name, key)
        rows = {t: v["rows"] for t, v in writer.tables.items()}
        return Outcome(spec.name, key, "computed", rows, time.perf_counter() - t0, dict(writer.summary))


def _prepare(spec: StageSpec, key: str, store: Store, force: bool) -> None:
    """Before computing (under the key's lock): say why a committed stage is recomputed, and
    make a forced one start from nothing rather than resume from its last checkpoint."""
    check = store.integrity(spec.name, key)
    if check.state == "corrupt":
        log.warning("kpod: stage %s (%s) is corrupt (%s); recomputing it", spec.name, key, check.problem)
    if force and store.clear_work_dir(spec.name, key):
        log.info("kpod: stage %s (%s) forced: its checkpoints were cleared", spec.name, key)


def cached_outcome(stage: str, key: str, store: Store, t0: float) -> Outcome:
    """A committed stage's outcome, from its manifest (seconds: since `t0`)."""
    m = store.manifest(stage, key)
    rows = {t: v["rows"] for t, v in m.get("tables", {}).items()}
    return Outcome(stage, key, "cached", rows, time.perf_counter() - t0, m.get("summary", {}))
