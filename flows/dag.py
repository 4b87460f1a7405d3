"""Run planned stages as a DAG of Prefect tasks: each stage starts when its upstream stages are done.

A stage is submitted only once every upstream stage that runs this time has finished
(an upstream stage not run this time is complete in the store), still with `wait_for=` their
futures so the server and the UI record the edges. Submitting lazily rather than all at once
means:
- at most `parallel` stages run at once, whatever the task runner's size;
- a stage below a failed one is never submitted, so no task run waits for ever as
  `Pending(NotReady)`, and independent branches go on to the end.
"""

from __future__ import annotations

from typing import Callable

from prefect.futures import PrefectFuture, as_completed

from tasks.stages.contract import PlannedStage

Submit = Callable[[PlannedStage, list[PrefectFuture]], PrefectFuture]


def run_dag(todo: list[PlannedStage], submit: Submit, parallel: int) -> dict[str, PrefectFuture]:
    """Run `todo` (in DAG order); returns stage -> its finished future, for the stages submitted."""
    this_run = {p.name for p in todo}
    futures: dict[str, PrefectFuture] = {}
    running: dict[PrefectFuture, str] = {}
    done: set[str] = set()  # finished Completed (or Cached)
    blocked: set[str] = set()  # failed, or below a failure

    def submit_ready() -> None:
        for p in todo:  # DAG order: an upstream stage is blocked before its downstream is looked at
            if len(running) >= parallel:
                return
            if p.name in futures or p.name in blocked:
                continue
            ups = [u for u in p.upstream if u in this_run]
            if any(u in blocked for u in ups):
                blocked.add(p.name)
            elif all(u in done for u in ups):
                futures[p.name] = submit(p, [futures[u] for u in ups])
                running[futures[p.name]] = p.name

    submit_ready()
    while running:
        finished = next(as_completed(list(running)))
        # as_completed does not settle the future's state: without wait(), .state is a read
        # from the API that may still say Running
        finished.wait()
        name = running.pop(finished)
        (done if finished.state.is_completed() else blocked).add(name)
        submit_ready()
    return futures


def raise_first_failure(todo: list[PlannedStage], futures: dict[str, PrefectFuture]) -> None:
    """Re-raise the original exception of the first stage (in DAG order) that did not complete."""
    for p in todo:
        future = futures.get(p.name)
        if future is not None and not future.state.is_completed():
            future.state.result()  # raises the task's exception (Failed, Crashed or Cancelled)
            raise RuntimeError(f"stage {p.name!r} ended {future.state.name}")


def can_overlap(todo: list[PlannedStage], planned: list[PlannedStage]) -> bool:
    """Whether two stages to run are independent (neither reads the other, directly or through
    other stages), so they could run at once; a chain of stages never can."""
    ups = {p.name: set(p.upstream) for p in planned}
    ancestors: dict[str, set[str]] = {}
    for p in planned:  # DAG order: a stage's upstream stages are done before it
        ancestors[p.name] = set().union(*({u} | ancestors[u] for u in ups[p.name])) if ups[p.name] else set()
    names = [p.name for p in todo]
    return any(
        a not in ancestors[b] and b not in ancestors[a] for i, a in enumerate(names) for b in names[i + 1 :]
    )
