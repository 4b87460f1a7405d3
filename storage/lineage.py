"""Lineage: which stages, and which rows of them, fed a run's student and its predictions.

- `used_stages(store, run)`: the stages a run's result was computed from: the closure of the
  evaluate (else train) stage over the `upstream` keys in the manifests. A run record lists
  every stage its config plans, some of them unused by its method (a Std-CoT run still names a
  weights key, which another run of the store may have computed); the manifests say what was read.
- `lineage_sql(store, run)`: the SELECT of the `lineage` view (storage/catalog.py creates it per
  run): one row per (question, teacher call or rationale), following teacher_calls ->
  rationales -> steps -> token_weights -> schedule -> training examples -> predictions, with
  the key of every stage each value came from. Valid whatever stages the run used: a table the
  run lacks (a Std-CoT run has no token_weights, no schedule) reads as no rows, so its columns
  are NULL.
"""

from __future__ import annotations

from typing import Any

from storage.store import Store

# the stage whose result a run is about, best first: its upstream closure is what the run used
_RESULT_STAGES = ("evaluate", "train")


def used_stages(store: Store, run: dict[str, Any]) -> dict[str, str]:
    """stage -> key of the complete stages the run's result read, directly or not. A run with
    neither a complete evaluate nor train stage: every complete stage it lists."""
    listed = run.get("stages", {})
    complete = {s: k for s, k in listed.items() if store.is_complete(s, k)}
    result = next((s for s in _RESULT_STAGES if s in complete), None)
    if result is None:
        return complete
    used, todo = {}, [(result, complete[result])]
    while todo:
        stage, key = todo.pop()
        if stage in used or not store.is_complete(stage, key):
            continue
        used[stage] = key
        todo.extend(store.manifest(stage, key).get("upstream", {}).items())
    return {s: used[s] for s in listed if s in used} | {s: k for s, k in used.items() if s not in listed}
