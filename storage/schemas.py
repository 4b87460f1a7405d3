"""Declared Parquet schemas of every table kpod writes.

Every stage writes through `StageWriter.write_table`, which casts to the schema declared here
(and refuses a table whose columns differ), so the DuckDB views are stable and IDs join across
stages. A new table is added here first.
"""

from __future__ import annotations

import pyarrow as pa

S, I, F, B = pa.string(), pa.int64(), pa.float64(), pa.bool_()

SCHEMAS: dict[str, pa.Schema] = {
    # dataset
    "questions": pa.schema(
        [
            ("question_id", S),
            ("split", S),  # train | val | test
            ("question", S),
            ("answer", S),
            ("answer_type", S),  # numeric | choice | yesno | string
            ("meta", S),  # JSON text; generator facts (steps, numbers) for synthetic data
        ]
    ),
    # dataset (synthetic only): every keypoint term of a question. A word of any rationale
    # about that question is a keypoint iff `tasks.core.synthetic.label_words` says so from these.
    "keypoint_terms": pa.schema([("question_id", S), ("term", S), ("kind", S)]),
    # teacher
    "teacher_calls": pa.schema(
        [
            ("request_id", S),
            ("question_id", S),
            ("sample", I),
            ("prompt", S),
            ("completion", S),
            ("model", S),
            ("finish_reason", S),
            ("tokens_in", I),
            ("tokens_out", I),
            ("cost_usd", F),
            ("latency_s", F),
            ("error", S),  # null when the request succeeded
            ("finished_at", S),
            # replay only: the teacher's answer as a released file records it apart from the
            # chain (a two-stage file's second call), and the file's correctness flag
            ("teacher_answer", S),
            ("source_correct", B),
            # completion (one stage) | reasoning | answer: teacher.protocol two_stage's two requests
            ("part", S),
            # teacher.top_logprobs: each generated token's log-prob and its position's top-k, as the
            # server returned them (null: none asked, or the server ignored the request; ledger
            # parts written before the column existed read as null)
            ("logprobs", pa.list_(pa.struct([
                ("token", S), ("logprob", pa.float32()),
                ("top_tokens", pa.list_(S)), ("top_logprobs", pa.list_(pa.float32())),
            ]))),
        ]
    ),
    # teacher (teacher.top_logprobs): teacher_calls.logprobs one row per generated token
    "teacher_logprobs": pa.schema(
        [
            ("request_id", S),
            ("question_id", S),
            ("sample", I),
            ("part", S),  # completion | reasoning (answer-extraction calls ask for none)
            ("pos", I),  # index of the token in the completion, in the teacher's tokenizer
            ("token", S),  # its text as the server returned it
            ("logprob", pa.float32()),  # null where the server sent none
            ("top_tokens", pa.list_(S)),  # the k most likely tokens there, most likely first
            ("top_logprobs", pa.list_(pa.float32())),
        ]
    ),
    # teacher, backend openai_batch: one row per step of a submitted batch, the last per chunk_id
    # counting (tasks/teacher_backends/openai_batch.py); never the API key
    "teacher_batches": pa.schema(
        [
            ("chunk_id", S),  # one input file's submission
            ("endpoint", S),  # teacher.base_url (or api.openai.com): batches live there
            ("url", S),  # /v1/chat/completions | /v1/completions
            ("input_file_id", S),
            ("batch_id", S),  # null until batches.create answered
            ("status", S),  # uploaded | submitted | collected | failed | lost
            ("request_ids", pa.list_(S)),  # the custom_ids of its lines
            ("recorded_at", S),
        ]
    ),
    # rationales
    "rationales": pa.schema(
        [
            ("rationale_id", S),
            ("question_id", S),
            ("source", S),  # teacher | mentor
            ("sample", I),
            ("text", S),
            ("pred", S),  # extracted answer, null when none found
            ("correct", B),  # the verdict trained on (which one: correct_from)
            ("n_steps", I),
            ("own_correct", B),  # kpod's own grade of pred against the gold answer
            ("source_correct", B),  # the released file's flag (replay), null when it has none
            ("correct_from", S),  # kpod | source: where `correct` came from (rationales.source_labels)
        ]
    ),
    "steps": pa.schema(
        [("rationale_id", S), ("step", I), ("char_start", I), ("char_end", I), ("text", S)]
    ),
    "word_labels": pa.schema(
        [
            ("rationale_id", S),
            ("word", I),
            ("char_start", I),
            ("char_end", I),
            ("text", S),
            ("keypoint", B),
            ("role", S),  # core | context | filler (tasks.core.synthetic.word_roles)
        ]
    ),
    # weights
    "token_weights": pa.schema(
        [
            ("rationale_id", S),
            ("pos", I),  # token position within the rationale (student tokenizer)
            ("token", S),
            ("char_start", I),
            ("char_end", I),
            ("step", I),
            ("weight", F),
        ]
    ),
    "weights_log": pa.schema(
        [("step", I), ("phase", S), ("lp", F), ("lm", F), ("loss", F), ("kept_ratio", F)]
    ),
    # pretrain: the base's checks (held-out perplexity, operation accuracy, contamination)
    "pretrain_eval": pa.schema([("model", S), ("metric", S), ("value", F), ("n", I)]),
    "weights_quality": pa.schema(
        [("metric", S), ("value", F), ("tokens", I)]
    ),
    # difficulty / schedule
    "step_difficulty": pa.schema(
        [("rationale_id", S), ("step", I), ("difficulty", F), ("tokens", I)]
    ),
    "clusters": pa.schema([("rationale_id", S), ("question_id", S), ("cluster", I)]),
    "schedule": pa.schema(
        [("stage", I), ("rationale_id", S), ("input_steps", I), ("output_difficulty", F)]
    ),
    "schedule_stages": pa.schema(
        [
            ("stage", I),
            ("budget", F),
            ("used", F),
            ("selected", I),
            ("output_steps", I),  # steps in the targets at this stage (of sum n_i in all)
            ("cluster_counts", S),  # JSON {cluster: count}
        ]
    ),
    # train / evaluate
    "train_log": pa.schema(
        [
            ("step", I),
            ("epoch", I),
            ("stage", I),
            ("loss", F),
            ("nll", F),
            ("kd", F),
            ("lr", F),
            ("tokens", I),
            ("tokens_per_s", F),
        ]
    ),
    "val_selection": pa.schema(
        [
            ("epoch", I),  # 0-based epoch whose end was scored
            ("step", I),
            ("n", I),
            ("correct", I),
            ("accuracy", F),
            ("selected", pa.bool_()),
        ]
    ),
    "predictions": pa.schema(
        [
            ("question_id", S),
            ("split", S),
            ("output", S),
            ("pred", S),
            ("answer", S),
            ("correct", B),
        ]
    ),
    "metrics": pa.schema(
        [
            ("method", S),
            ("seed", I),
            ("split", S),
            ("n", I),
            ("correct", I),
            ("accuracy", F),
            ("ci_low", F),
            ("ci_high", F),
        ]
    ),
    # mentor
    "mentor_logits": pa.schema(
        [
            ("rationale_id", S),
            ("pos", I),  # index among the full-rationale example's labelled tokens (incl. answer, EOS)
            ("token_ids", pa.list_(pa.int32())),
            ("logprobs", pa.list_(pa.float32())),
        ]
    ),
}

# `kpod compare` (flows/compare.py): one row per (method, seed) run of a comparison
SCHEMAS["comparisons"] = pa.schema(
    [
        ("comparison_id", S),
        ("method", S),
        ("seed", I),
        ("run_id", S),
        ("status", S),  # the run's: completed | failed
        ("val_accuracy", F),
        ("val_ci_low", F),
        ("val_ci_high", F),
        ("test_accuracy", F),
        ("test_ci_low", F),
        ("test_ci_high", F),
        ("train_seconds", F),  # the train stage's compute time (when it was computed, not served)
        ("train_tokens", I),  # target tokens the student trained on (sum of train_log.tokens)
        ("error", S),  # the run's error tail when it failed
    ]
)
# test (and val) accuracy by the question's number of steps, per run of a comparison
SCHEMAS["comparison_steps"] = pa.schema(
    [("comparison_id", S), ("method", S), ("seed", I), ("split", S), ("n_steps", I), ("n", I), ("accuracy", F)]
)
# the mentor's own training log (not unioned with the student's `train_log` in the catalog)
SCHEMAS["mentor_train_log"] = SCHEMAS["train_log"]
# the pretrained miniature's training log (issue 13): the train_log columns and which base
SCHEMAS["pretrain_log"] = SCHEMAS["train_log"].append(pa.field("model", S))


def schema_for(table: str) -> pa.Schema:
    try:
        return SCHEMAS[table]
    except KeyError:
        raise KeyError(f"table {table!r} has no declared schema in storage/schemas.py") from None


def conform(table: str, data: pa.Table) -> pa.Table:
    """Cast `data` to the declared schema; a missing or extra column is an error."""
    schema = schema_for(table)
    have, want = set(data.column_names), set(schema.names)
    if have != want:
        raise ValueError(
            f"table {table!r}: columns {sorted(have)} differ from the declared "
            f"{sorted(want)} (missing {sorted(want - have)}, extra {sorted(have - want)})"
        )
    return data.select(schema.names).cast(schema)
