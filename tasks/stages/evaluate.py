"""The `evaluate` stage: greedy answers of the trained student, graded like the teacher's.

For each configured split of `dataset.questions`, the student gets `Q: {question}\\nA:` (the
prompt part of the training format, tokenized by `tasks.core.formatting.encode_prompt`), generates greedily in length-sorted
batches (`tasks.core.generation`), and its completion is graded by `tasks.core.answers`, the same
extraction and comparison that filtered the teacher's rationales. Tables:
- `predictions`: one row per question (question_id, split, output, pred, answer, correct);
- `metrics`: one row per split (method, seed, split, n, correct, accuracy, 95% Wilson interval).
Model selection, if any, belongs on `val`; `test` is only reported. Completions are saved in
chunks as they finish (`tasks.core.saved_generation`), so an evaluation killed after an hour
resumes with what is left rather than from the start.
"""

from __future__ import annotations

import logging
import time

from pydantic import Field

from tasks.config.base import KpodModel
from tasks.config.evaluate import EvaluateConfig
from tasks.core.grading import grade_outputs, select_questions, split_metrics
from tasks.stages.contract import StageContext, StageSpec

log = logging.getLogger("kpod.evaluate")


# ---- the stage ----------------------------------------------------------------------------
def run(ctx: StageContext) -> None:
    from tasks.core.formatting import encode_prompt
    from tasks.core.forward import resolve_device
    from tasks.core.generation import generate_ids
    from tasks.core.models import is_seq2seq, load_model
    from tasks.core.saved_generation import generate_saved, model_stamp

    cfg: EvaluateConfig = ctx.inputs.evaluate
    questions = select_questions(ctx.table("dataset", "questions"), cfg.splits, cfg.limit)
    model_dir = ctx.file("train", "model")
    model, tokenizer = load_model(model_dir)
    model.to(resolve_device(cfg.device))
    seq2seq = is_seq2seq(model)
    # the very token ids a training example starts with (same BOS/EOS framing)
    prompts = [encode_prompt(tokenizer, q, seq2seq) for q in questions.column("question").to_pylist()]

    t0 = time.perf_counter()
    with ctx.progress(total=len(prompts), desc="evaluate", unit="q") as bar:
        # finished chunks are saved in the work dir: a rerun after a crash generates the rest only
        outputs, restored = generate_saved(
            lambda idx, progress: generate_ids(model, tokenizer, [prompts[i] for i in idx], cfg.batch_size,
                                               cfg.max_new_tokens, progress=progress),
            prompts, cfg.batch_size, ctx.work_dir / "generated", progress=bar.update,
            fingerprint=f"greedy max_new_tokens={cfg.max_new_tokens} {model_stamp(model_dir)}",
        )
    seconds = time.perf_counter() - t0
    if restored:
        log.info("evaluate: %d of %d completions read back from the interrupted run", restored, len(prompts))
        ctx.summary["resumed_completions"] = restored

    predictions = ctx.write_table("predictions", grade_outputs(questions, outputs))
    inp = ctx.inputs  # method and seed label the metrics rows for comparisons
    metrics = ctx.write_table("metrics", split_metrics(predictions, inp.method, inp.seed))
    ctx.summary["accuracy"] = {r["split"]: round(r["accuracy"], 4) for r in metrics.to_pylist()}
    generated = len(prompts) - restored  # questions per second of this run's own generation
    ctx.summary["questions_per_s"] = round(generated / seconds, 2) if seconds > 0 and generated else None


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
