"""The teacher stage: ask a teacher model for chain-of-thought rationales, paying once per request.

A thin shell over `tasks.teacher_backends.teach.teach`: requests and their ids are built in
`teacher_backends/requests.py`, sent by `teacher_backends/dispatcher.py` (concurrency, budget,
retries, rate limits) and recorded in an append-only ledger shared by every stage key, so a
rerun sends only what the ledger lacks. The table `teacher_calls` is the ledger rows of this
key's request ids, one per id.

The API key, when the flow looked one up (a Prefect Secret block), arrives in
`ctx.runtime["api_key"]` and goes straight to the backend: never into the inputs, a table, a
log line or a manifest. With `teacher.shards` > 1 the flow hands in `ctx.runtime["map_shards"]`,
which runs each shard as a Prefect task on its thread pool or a Dask cluster
(`teacher_backends/shards.py`); without it the shards run in-process.
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any

import pyarrow as pa

from pydantic import Field

from tasks.config.base import KpodModel
from tasks.config.teacher import TeacherConfig
from tasks.stages.contract import StageContext, StageSpec
from tasks.teacher_backends.logprobs import LogprobRows
from tasks.teacher_backends.requests import backend_source
from tasks.teacher_backends.teach import REQUEST_BATCH, teach_stream


class TeacherInputs(KpodModel):
    teacher: TeacherConfig = Field(description="The teacher section (runtime fields excluded from the key).")
    source: dict[str, Any] = Field(
        description="What identifies a free backend's output: its code version and data (a replay file's sha256)."
    )

    def hashable(self) -> dict[str, Any]:
        # the teacher section's own rule: another backend's fields stay out, and openai_batch
        # hashes as openai (same requests, same rows), so switching between them reuses the cache
        return {**super().hashable(), "teacher": self.teacher.hashable()}


def run(ctx: StageContext) -> None:
    cfg: TeacherConfig = ctx.inputs.teacher
    columns = ["question_id", "split", "question", "answer_type", "meta"]
    logprobs = LogprobRows(cfg.top_logprobs)
    with ExitStack() as stack:
        calls = stack.enter_context(ctx.table_writer("teacher_calls"))
        # the table exists when log-probs were asked for
        lp = stack.enter_context(ctx.table_writer("teacher_logprobs")) if cfg.top_logprobs is not None else None

        def sink(batch: pa.RecordBatch) -> None:
            calls.write(batch)
            if lp is not None:
                lp.write(logprobs.add(batch))

        _, summary = teach_stream(
            lambda: ctx.batches("dataset", "questions", columns=columns, batch_rows=REQUEST_BATCH),
            cfg,
            ctx.store,
            sink,
            ctx.work_dir,
            progress=lambda total: ctx.progress(total=total, desc="teacher", unit="req"),
            api_key=ctx.runtime.get("api_key"),
            map_shards=ctx.runtime.get("map_shards"),
        )
        logprobs.warn()
    ctx.summary.update(summary)


SPEC = StageSpec(
    name="teacher",
    run=run,
    inputs=lambda cfg: TeacherInputs(teacher=cfg.teacher, source=backend_source(cfg.teacher)),
    upstream=lambda cfg: ("dataset",),
    description="Ask the teacher for rationales (ledgered, resumable, budgeted).",
)
