"""Content-addressed stage keys.

A stage's key is a hash of everything that can change its output: the stage's name, the
source of the code that computes it (its module and every project module that module imports,
found by reading the imports, never from a hand-kept list), the typed inputs it declares (its
config values and any external fingerprint, such as a data file's bytes) and the keys of the
stages it reads. Keys are pure functions of the config, so a whole run's keys are known before
anything executes.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
import threading
import time
from functools import lru_cache
from typing import Any, Iterable, Mapping

KEY_LENGTH = 16  # hex chars; 64 bits is plenty for a per-stage namespace
PROJECT_PACKAGES = ("tasks", "storage")  # imports of these version a stage; flows/ only wire


def canonical_json(value: Any) -> str:
    """One byte-stable JSON text for hashing: sorted keys, no whitespace."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def digest(value: Any, length: int = KEY_LENGTH) -> str:
    text = value if isinstance(value, str) else canonical_json(value)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:length]


def module_source(module: str) -> bytes:
    """The source bytes of one project module (tests replace this to simulate an edit)."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ValueError(f"cannot find module {module!r} to version a stage")
    with open(spec.origin, "rb") as fh:
        return fh.read()


@lru_cache(maxsize=None)
def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


@lru_cache(maxsize=None)
def _is_package(name: str) -> bool:
    """Whether `name` is a package (finding it imports only its parents' __init__ files)."""
    try:
        spec = importlib.util.find_spec(name)
    except ModuleNotFoundError:
        return False
    return spec is not None and spec.submodule_search_locations is not None


_PARSE_LOCK = threading.Lock()


def parse_source(source: bytes, attempts: int = 5) -> ast.Module:
    """`ast.parse`, safe beside other threads. CPython 3.11's parser keeps its recursion-depth
    check in interpreter-wide state, so two threads parsing at once can fail with "SystemError:
    AST constructor recursion depth mismatch" (it made a deployment run fail in CI, while
    Prefect's threads were busy). Our own parses take a lock; one that still collides with
    another library's parse is retried."""
    for attempt in range(attempts):
        try:
            with _PARSE_LOCK:
                return ast.parse(source)
        except SystemError:
            if attempt == attempts - 1:
                raise
            time.sleep(0.01 * (attempt + 1))
    raise AssertionError("unreachable")


@lru_cache(maxsize=4096)
def _imported(module: str, source: bytes) -> frozenset[str]:
    """Project modules `module` imports anywhere in its file, top level or inside functions,
    since each can change what it computes; imports under `if TYPE_CHECKING:` only name types
    and are skipped."""
    found: set[str] = set()
    package = module.rsplit(".", 1)[0]
    for node in _runtime_nodes(parse_source(source)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if base.split(".")[0] not in PROJECT_PACKAGES:
                continue  # never probe third-party packages (find_spec would import them)
            # `from tasks.core import answers` imports the module tasks.core.answers; a name from
            # a module (not a package) is never a submodule, and probing for one would import the
            # module itself (torch with it, when a command only plans stages)
            names = [f"{base}.{a.name}" if _is_package(base) and _is_module(f"{base}.{a.name}") else base
                     for a in node.names]
        else:
            continue
        found.update(n for n in names if n.split(".")[0] in PROJECT_PACKAGES)
    return frozenset(found)


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node of `tree` except the bodies of `if TYPE_CHECKING:` blocks."""
    out, todo = [], [tree]
    while todo:
        node = todo.pop()
        out.append(node)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))
    return out


def import_closure(root: str) -> tuple[str, ...]:
    """`root` and every project module it imports, directly or through others, sorted."""
    seen: set[str] = set()
    todo = [root]
    while todo:
        mod = todo.pop()
        if mod in seen:
            continue
        seen.add(mod)
        todo.extend(_imported(mod, module_source(mod)) - seen)
    return tuple(sorted(seen))


def code_version(modules: Iterable[str]) -> str:
    """Hash of the sources of `modules` (each by name): an edit to any of them changes it."""
    return digest({m: hashlib.sha256(module_source(m)).hexdigest() for m in sorted(set(modules))})


def file_fingerprint(path: str) -> str:
    """sha256 of a file's bytes (streamed), so an edited data file changes the key."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:KEY_LENGTH]


def stage_key(stage: str, code: str, inputs: Mapping[str, Any], upstream: Mapping[str, str]) -> str:
    """hash(stage name, code version, the stage's declared inputs, upstream keys)."""
    return digest({"stage": stage, "code": code, "inputs": dict(inputs), "upstream": dict(upstream)})
