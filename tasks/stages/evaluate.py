"""The `evaluate` stage: greedy answers of the trained student, graded like the teacher's.

For each configured split of `dataset.questions`, the student gets `Q: {question}\\nA:` (the
prompt part of the training format, tokenized by `tasks.core.formatting.encode_prompt`), generates greedily in length-sorted
batches (`tasks.core.generation`), and its completion is graded by `tasks.core.answers`, the same
extraction and comparison that filtered the teacher's rationales. Tables:
- `predictions`: one row per question (question_id, split, output, pred, answer, correct);
- `metrics`: one row per split (method, seed, split, n, correct, accuracy, 95% Wilson interval).
Model selection, if any, belongs on `val`; `test` is only reported.
"""

from __future__ import annotations

import time

from pydantic import Field

from tasks.config.base import KpodModel
from tasks.config.evaluate import EvaluateConfig
from tasks.core.grading import grade_outputs, select_questions, split_metrics
from tasks.stages.contract import StageContext, StageSpec


# ---- the stage ----------------------------------------------------------------------------
def run(ctx: StageContext) -> None:
    from tasks.core.formatting import encode_prompt
    from tasks.core.forward import resolve_device
    from tasks.core.generation import generate_ids
    from tasks.core.models import is_seq2seq, load_model

    cfg: EvaluateConfig = ctx.inputs.evaluate
    questions = select_questions(ctx.table("dataset", "questions"), cfg.splits, cfg.limit)
    model, tokenizer = load_model(ctx.file("train", "model"))
    model.to(resolve_device(cfg.device))
    seq2seq = is_seq2seq(model)
    # the very token ids a training example starts with (same BOS/EOS framing)
    prompts = [encode_prompt(tokenizer, q, seq2seq) for q in questions.column("question").to_pylist()]

    t0 = time.perf_counter()
    with ctx.progress(total=len(prompts), desc="evaluate", unit="q") as bar:
        outputs = generate_ids(
            model, tokenizer, prompts, cfg.batch_size, cfg.max_new_tokens, progress=bar.update
        )
    seconds = time.perf_counter() - t0

    predictions = ctx.write_table("predictions", grade_outputs(questions, outputs))
    inp = ctx.inputs  # method and seed label the metrics rows for comparisons
    metrics = ctx.write_table("metrics", split_metrics(predictions, inp.method, inp.seed))
    ctx.summary["accuracy"] = {r["split"]: round(r["accuracy"], 4) for r in metrics.to_pylist()}
    ctx.summary["questions_per_s"] = round(len(prompts) / seconds, 2) if seconds > 0 else None


class EvaluateInputs(KpodModel):
    evaluate: EvaluateConfig = Field(description="The evaluate section.")
    method: str = Field(description="train.method: labels the metrics rows for comparisons.")
    seed: int = Field(description="train.seed: labels the metrics rows for comparisons.")


SPEC = StageSpec(
    name="evaluate",
    run=run,
    inputs=lambda cfg: EvaluateInputs(evaluate=cfg.evaluate, method=cfg.train.method, seed=cfg.train.seed),
    upstream=lambda cfg: ("dataset", "train"),
    description="Greedy answers of the trained student on val/test, graded; accuracy with 95% CI.",
)
