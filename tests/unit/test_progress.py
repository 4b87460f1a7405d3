"""Stage progress bars (tasks/stages/contract.py): readable on a terminal, quiet in logs."""

from __future__ import annotations

import io
from pathlib import Path

from storage.store import Store
from tasks.config.base import KpodModel
from tasks.stages.contract import NON_TTY_INTERVAL_S, StageContext, StageSpec


def test_progress_off_a_terminal_writes_at_most_every_few_seconds(tmp_path: Path) -> None:
    """tqdm into a log (not a TTY): a bar updated and re-labelled thousands of times in a
    second writes its first and last state only, not a line per update (issue 14, point 10)."""
    spec = StageSpec("teacher", lambda ctx: None, lambda c: KpodModel(), lambda c: ())
    ctx = StageContext(Store(tmp_path), spec, "k", None, {}, None)
    log = io.StringIO()
    with ctx.progress(total=2000, file=log, desc="teacher") as bar:
        for i in range(2000):
            bar.update(1)
            bar.set_postfix(errors=i)  # the teacher's dispatcher does this per request
    assert bar.mininterval == NON_TTY_INTERVAL_S >= 5
    writes = [w for w in log.getvalue().split("\r") if w.strip()]
    assert 1 <= len(writes) <= 3, len(writes)
    assert "2000/2000" in writes[-1]
