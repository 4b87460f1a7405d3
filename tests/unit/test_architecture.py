"""Guards on the shape of the code: import arrows, no cycle, short functions, code versions.

DESIGN.md: arrows only point down (flows -> stages -> training -> core -> config; storage
beside them); nothing under tasks/ imports Prefect; no function over 60 lines; a stage's code
version covers every project module it imports, so an edit to any of them changes its key.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

import storage.keys as keys_module
from tasks.config.pipeline import PipelineConfig
from tasks.stages.contract import plan
from tasks.stages.registry import STAGES

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("flows", "tasks", "storage")
MAX_LINES = 60
# which project packages each layer may import (its own included)
ALLOWED = {
    "tasks.config": ("tasks.config",),
    "tasks.core": ("tasks.config", "tasks.core", "storage"),
    "tasks.training": ("tasks.config", "tasks.core", "tasks.training", "storage"),
    "tasks.teacher_backends": ("tasks.config", "tasks.core", "tasks.teacher_backends", "storage"),
    "tasks.stages": ("tasks.config", "tasks.core", "tasks.training", "tasks.teacher_backends", "tasks.stages", "storage"),
    "storage": ("storage",),
}
# a stage module may import these stage modules (the contract, shared readers, launching a
# stage's ranks), never another stage
STAGE_SHARED = ("tasks.stages.contract", "tasks.stages.sources", "tasks.stages.ranks")


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = path
    return out


MODULES = _modules()


def _imports(path: Path) -> set[str]:
    """Every module named by an import anywhere in the file (TYPE_CHECKING and in-function too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return found


def _project_edges() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = defaultdict(set)
    for mod, path in MODULES.items():
        for name in _imports(path):
            while name and name not in MODULES:
                name = name.rpartition(".")[0]
            if name and name != mod and not mod.startswith(name + "."):
                edges[mod].add(name)
    return edges


def test_no_import_cycle_counting_every_import() -> None:
    edges = _project_edges()
    state: dict[str, int] = {}  # 1 on the path, 2 done

    def visit(mod: str, path: list[str]) -> None:
        state[mod] = 1
        for nxt in sorted(edges[mod]):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[mod] = 2

    for mod in sorted(MODULES):
        if mod not in state:
            visit(mod, [mod])


def _layer(mod: str) -> str | None:
    return next((layer for layer in sorted(ALLOWED, key=len, reverse=True) if mod == layer or mod.startswith(layer + ".")), None)


def test_arrows_point_down() -> None:
    bad = []
    for mod, targets in _project_edges().items():
        layer = _layer(mod)
        if layer is None:
            continue  # flows/ may import anything below it
        for t in targets:
            if t.startswith("flows") or not any(t == a or t.startswith(a + ".") for a in ALLOWED[layer]):
                bad.append(f"{mod} -> {t}")
            elif layer == "tasks.stages" and t.startswith("tasks.stages.") and t not in STAGE_SHARED and mod != "tasks.stages.registry":
                bad.append(f"{mod} -> {t} (a stage imports another stage)")
    assert not bad, "imports against the layering:\n" + "\n".join(sorted(bad))


def test_nothing_under_tasks_or_storage_imports_prefect() -> None:
    bad = [m for m, p in MODULES.items() if not m.startswith("flows") and any(n.split(".")[0] == "prefect" for n in _imports(p))]
    assert not bad


def test_no_function_over_60_lines() -> None:
    long = []
    for path in MODULES.values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.name} ({n} lines)")
    assert not long, "functions over 60 lines:\n" + "\n".join(long)


def test_code_versions_are_found_from_imports() -> None:
    by_name = {s.name: s for s in STAGES}
    # the two modules the old hand-kept lists missed are now found
    assert "tasks.core.weights_view" in by_name["weights"].modules
    assert "tasks.core.models" in by_name["schedule"].modules
    # and a stage does not depend on code it never imports
    assert not any(m.startswith("tasks.stages.") and m not in STAGE_SHARED + ("tasks.stages.dataset",) for m in by_name["dataset"].modules)


@pytest.mark.parametrize("method", ["std_cot", "kpod_mentor"])
def test_an_edit_to_any_imported_module_changes_the_stage_key(monkeypatch, method: str) -> None:
    cfg = PipelineConfig.model_validate({"train": {"method": method}, "mentor": {"kd": {"source": "cached_topk"}}})
    planned = plan(cfg, STAGES)
    base = {p.name: p.key for p in planned}
    upstream = {p.name: p.upstream for p in planned}  # the config's, not the code's: planned once
    real = keys_module.module_source
    for spec in STAGES:
        for mod in spec.modules:
            monkeypatch.setattr(keys_module, "module_source", lambda m, mod=mod: real(m) + (b"\n# edit\n" if m == mod else b""))
            edited = {p.name: p.key for p in plan(cfg, STAGES)}
            assert edited[spec.name] != base[spec.name], f"editing {mod} does not change the key of {spec.name}"
            # stages that neither import it nor read a stage that does keep their key
            for other in STAGES:
                if mod not in other.modules and not any(edited[u] != base[u] for u in upstream[other.name]):
                    assert edited[other.name] == base[other.name], f"editing {mod} changed {other.name}"
    monkeypatch.setattr(keys_module, "module_source", real)
