"""Stage keys: pure functions of the config; a changed field invalidates exactly its readers."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest
from pydantic import Field

from storage.store import Store
from tasks.config.base import KpodModel, runtime_field
from tasks.stages.contract import StageSpec, execute, plan


class A(KpodModel):
    x: int = Field(1, description="x")
    workers: int = runtime_field(4, "runtime only")


class B(KpodModel):
    y: str = Field("b", description="y")


class Cfg(KpodModel):
    a: A = Field(default_factory=A, description="a")
    b: B = Field(default_factory=B, description="b")
    c: B = Field(default_factory=B, description="c")


def _writes(table_rows: int):
    def run(ctx) -> None:
        ctx.write_table(
            "clusters",
            pa.table({"rationale_id": ["r"] * table_rows, "question_id": ["q"] * table_rows, "cluster": [0] * table_rows}),
        )

    return run


class Reads(KpodModel):
    """A stage's typed inputs in these tests: one section, plus an optional external value."""

    section: dict = Field(description="the section read")
    file: str = Field("", description="an external fingerprint")


def reads(name: str, file: str = ""):
    return lambda c: Reads(section=getattr(c, name).hashable(), file=file)


SPECS = [
    StageSpec("one", _writes(1), reads("a"), lambda c: ()),
    StageSpec("two", _writes(2), reads("b"), lambda c: ("one",)),
    StageSpec("three", _writes(3), reads("c"), lambda c: ("two",)),
    StageSpec("side", _writes(1), reads("c"), lambda c: ("one",)),
]


def keys(cfg: Cfg) -> dict[str, str]:
    return {p.name: p.key for p in plan(cfg, SPECS)}


def test_same_config_same_keys() -> None:
    assert keys(Cfg()) == keys(Cfg())


def test_changed_field_invalidates_exactly_its_readers_and_descendants() -> None:
    base = keys(Cfg())
    changed = keys(Cfg(b=B(y="other")))
    assert changed["one"] == base["one"] and changed["side"] == base["side"]
    assert changed["two"] != base["two"] and changed["three"] != base["three"]

    changed = keys(Cfg(a=A(x=2)))
    assert all(changed[s] != base[s] for s in base)


def test_runtime_fields_do_not_enter_keys() -> None:
    assert keys(Cfg(a=A(workers=64))) == keys(Cfg())


def test_external_fingerprint_enters_key() -> None:
    spec = StageSpec("one", _writes(1), reads("a", file="abc"), lambda c: ())
    other = StageSpec("one", _writes(1), reads("a", file="abd"), lambda c: ())
    assert plan(Cfg(), [spec])[0].key != plan(Cfg(), [other])[0].key


def test_the_stage_sees_exactly_its_inputs_and_upstream(tmp_path: Path) -> None:
    seen = {}

    def run(ctx) -> None:
        seen.update(inputs=ctx.inputs, upstream=dict(ctx.upstream))
        with pytest.raises(KeyError, match="does not declare 'three'"):
            ctx.table("three", "clusters")
        _writes(1)(ctx)

    store, cfg = Store(tmp_path), Cfg(b=B(y="z"))
    ks = keys(cfg)
    execute(SPECS[0], cfg, ks, store, show_progress=False)
    execute(StageSpec("two", run, reads("b"), lambda c: ("one",)), cfg, ks, store, show_progress=False)
    assert seen["inputs"] == Reads(section={"y": "z"}) and seen["upstream"] == {"one": ks["one"]}


def test_execute_computes_then_reports_cached(tmp_path: Path) -> None:
    store, cfg = Store(tmp_path), Cfg()
    ks = keys(cfg)
    first = [execute(s, cfg, ks, store, show_progress=False) for s in SPECS]
    assert [o.status for o in first] == ["computed"] * 4
    again = [execute(s, cfg, ks, store, show_progress=False) for s in SPECS]
    assert [o.status for o in again] == ["cached"] * 4
    assert again[2].rows == {"clusters": 3}
    forced = execute(SPECS[1], cfg, ks, store, force=True, show_progress=False)
    assert forced.status == "computed" and store.is_complete("two", ks["two"])


def test_execute_refuses_missing_upstream(tmp_path: Path) -> None:
    import pytest

    cfg = Cfg()
    with pytest.raises(RuntimeError, match="needs stage 'one'"):
        execute(SPECS[1], cfg, keys(cfg), Store(tmp_path), show_progress=False)


def test_runtime_values_are_looked_up_only_when_the_stage_computes(tmp_path: Path) -> None:
    calls, seen = [], []
    spec = StageSpec("one", lambda ctx: (seen.append(ctx.runtime), _writes(1)(ctx)), reads("a"), lambda c: ())
    store, cfg = Store(tmp_path), Cfg()
    lookup = lambda: calls.append(1) or {"api_key": "k"}  # noqa: E731
    assert execute(spec, cfg, keys(cfg), store, show_progress=False, runtime=lookup).status == "computed"
    assert execute(spec, cfg, keys(cfg), store, show_progress=False, runtime=lookup).status == "cached"
    assert calls == [1] and seen == [{"api_key": "k"}]


def test_select_stages_adds_incomplete_upstream_in_dag_order(tmp_path: Path) -> None:
    """What `kpod run --stages X` and bench/stage_run.py run: X, plus every upstream stage not
    complete in the store, in DAG order; never a stage X does not read."""
    from flows.selection import StageSelectionError, select_stages
    from tasks.config.pipeline import load_config
    from tasks.stages.registry import STAGES

    cfg = load_config(None, ["train.method=kpod"])
    planned = plan(cfg, STAGES)
    store = Store(tmp_path)
    names = [p.name for p in select_stages(planned, store, ["schedule"], [])]
    assert names == ["dataset", "teacher", "rationales", "student", "weights", "difficulty", "schedule"]
    keys = {p.name: p.key for p in planned}
    with store.writing("dataset", keys["dataset"], {}):
        pass  # dataset complete: no longer selected
    assert "dataset" not in [p.name for p in select_stages(planned, store, ["schedule"], [])]
    with pytest.raises(StageSelectionError, match="unknown stage 'shedule'"):
        select_stages(planned, store, ["shedule"], [])
