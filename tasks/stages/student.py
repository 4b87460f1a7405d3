"""The `student` stage: build (or load) the student model and its tokenizer once.

With `student.init: base` the student is the `pretrain` stage's base, with its tokenizer; with
`student.tokenizer: base` a fresh model on that tokenizer.
Otherwise the embedded student's tokenizer is trained on the training text in the serialized form every
method trains on (METHODS.md §0): each training question, and each correct teacher rationale of
a training question with its answer phrase. The untrained model saved here is what the token
weighting, difficulty and mentor stages start from; `train` reads it too.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
from pydantic import Field

from tasks.config.base import KpodModel
from tasks.config.pipeline import ConfigError
from tasks.config.student import StudentConfig
from tasks.core.formatting import encode_prompt
from tasks.stages.contract import StageContext, StageSpec
from tasks.stages.sources import tokenizer_corpus


def check_prompt_lengths(tokenizer: Any, questions: pa.Table, limit: int) -> None:
    """Refuse (ConfigError naming the question and the field) a question whose prompt, tokenized
    as the student sees it, is longer than `limit` (student.max_prompt_tokens): the config check
    made room for that many prompt tokens beside every generation length."""
    ids, texts = questions.column("question_id").to_pylist(), questions.column("question").to_pylist()
    lengths = [len(encode_prompt(tokenizer, q, False)) for q in texts]
    worst = max(range(len(lengths)), key=lengths.__getitem__, default=None)
    if worst is not None and lengths[worst] > limit:
        over = sum(n > limit for n in lengths)
        raise ConfigError(
            f"dataset.questions: the prompt of {ids[worst]!r} is {lengths[worst]} tokens ({over} "
            f"question(s) over the limit), more than student.max_prompt_tokens ({limit}); raise it "
            f"(and student.max_len with it) or lower the generation lengths"
        )


def run(ctx: StageContext) -> None:
    from tasks.core.models import build_student, count_parameters, embedded_llama, load_model, load_tokenizer, mix_weights, save_model

    cfg: StudentConfig = ctx.inputs.student
    corpus: list[str] = []
    if cfg.init == "base":  # the pretrained miniature: the base and its shared tokenizer, as they are
        model, tokenizer = load_model(ctx.file("pretrain", "base"))
        if cfg.base_mix < 1:  # shrink and perturb: part of the way back to a fresh init
            model = mix_weights(model, embedded_llama(cfg, tokenizer), cfg.base_mix)
    elif cfg.base_tokenizer:  # from scratch, on the base's tokenizer
        tokenizer = load_tokenizer(ctx.file("pretrain", "base"))
        model = embedded_llama(cfg, tokenizer)
    else:
        if cfg.kind == "embedded":
            corpus = tokenizer_corpus(
                ctx.table("dataset", "questions"), ctx.table("rationales", "rationales")
            )
        model, tokenizer = build_student(cfg, corpus)
    if cfg.kind == "embedded":
        check_prompt_lengths(tokenizer, ctx.table("dataset", "questions", columns=["question_id", "question"]),
                             cfg.max_prompt_tokens)
    save_model(model, tokenizer, ctx.output_path("model"))
    ctx.summary.update(
        kind=cfg.kind,
        init=cfg.init,
        base_mix=cfg.base_mix,
        tokenizer="base" if cfg.base_tokenizer else ("task" if cfg.kind == "embedded" else "hf"),
        parameters=count_parameters(model),
        vocab=len(tokenizer),
        corpus_texts=len(corpus),
    )


class StudentInputs(KpodModel):
    student: StudentConfig = Field(description="The student section.")


SPEC = StageSpec(
    name="student",
    run=run,
    inputs=lambda cfg: StudentInputs(student=cfg.student),
    upstream=lambda cfg: ("dataset", "rationales", *(("pretrain",) if cfg.student.base_tokenizer else ())),
    description="build the student model and tokenizer (embedded LLaMA, the pretrained base, or any HF model)",
)
