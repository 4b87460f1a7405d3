"""storage/keys.py: parsing a module's source survives CPython 3.11's thread-unsafe AST check."""

from __future__ import annotations

import ast
import threading

import pytest

from storage import keys


def test_parse_retries_the_interpreter_wide_recursion_check(monkeypatch) -> None:
    """The first two parses fail as CPython 3.11 does when another thread parses at the same
    moment; the third succeeds and the closure is the same as without the failures."""
    real, calls = ast.parse, []

    def flaky(source, *args, **kwargs):
        calls.append(1)
        if len(calls) <= 2:
            raise SystemError("AST constructor recursion depth mismatch (before=48, after=78)")
        return real(source, *args, **kwargs)

    monkeypatch.setattr(keys.ast, "parse", flaky)
    tree = keys.parse_source(b"import storage.store\n")
    assert isinstance(tree, ast.Module) and len(calls) == 3
    monkeypatch.setattr(keys.ast, "parse", lambda *a, **k: (_ for _ in ()).throw(SystemError("mismatch")))
    with pytest.raises(SystemError):  # a real, lasting error still surfaces
        keys.parse_source(b"x = 1\n", attempts=2)


def test_closures_computed_from_many_threads_agree() -> None:
    """Eight threads compute stage closures at once (the flow's thread pool does); every one
    gets the single-threaded answer."""
    keys._imported.cache_clear()
    want = keys.import_closure("tasks.stages.train")
    keys._imported.cache_clear()
    got, errors = [], []

    def work() -> None:
        try:
            got.append(keys.import_closure("tasks.stages.train"))
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and got == [want] * 8 and "storage.keys" in want
