"""Content-addressed stage keys.

A stage's key is a hash of everything that can change its output: the stage's name, the
source of the code that computes it, the config sections it reads, the fingerprints of any
external inputs (a local data file's bytes) and the keys of the stages it reads. Keys are
pure functions of the config, so a whole run's keys are known before anything executes.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from functools import lru_cache
from typing import Any, Iterable, Mapping

KEY_LENGTH = 16  # hex chars; 64 bits is plenty for a per-stage namespace


def canonical_json(value: Any) -> str:
    """One byte-stable JSON text for hashing: sorted keys, no whitespace."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def digest(value: Any, length: int = KEY_LENGTH) -> str:
    text = value if isinstance(value, str) else canonical_json(value)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:length]


@lru_cache(maxsize=None)
def module_source_hash(module: str) -> str:
    """Hash of one module's source file: editing the code invalidates the stages it serves."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ValueError(f"cannot find module {module!r} to version a stage")
    with open(spec.origin, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()[:KEY_LENGTH]


def code_version(modules: Iterable[str]) -> str:
    return digest({m: module_source_hash(m) for m in sorted(set(modules))})


def file_fingerprint(path: str) -> str:
    """sha256 of a file's bytes (streamed), so an edited data file changes the key."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:KEY_LENGTH]


def stage_key(
    stage: str,
    code: str,
    sections: Mapping[str, Any],
    upstream: Mapping[str, str],
    external: Mapping[str, Any] | None = None,
) -> str:
    """hash(stage name, code version, own config sections, external inputs, upstream keys)."""
    return digest(
        {
            "stage": stage,
            "code": code,
            "sections": dict(sections),
            "external": dict(external or {}),
            "upstream": dict(upstream),
        }
    )
