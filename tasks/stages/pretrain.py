"""The `pretrain` stage: the pretrained miniature's tokenizer and base model (issue 13).

Generates the generic corpus (tasks/core/corpus.py), trains a byte-level BPE tokenizer on part
of it together with the task's training text (the student stage's tokenizer text), and trains
a base of the student's shape on the corpus with the shared recipe (checkpoints, resume after
kill -9). Its key holds the pretrain section and the student's shape only, so every method and
seed of a store shares one base. `student.init: base` starts the student from it.

Outputs: `base/` (model + tokenizer), `pretrain_log`, `pretrain_eval` (held-out perplexity,
single-operation accuracy, and the 8-grams the corpus shares with the task: 0 expected).
"""

from __future__ import annotations

import time

import pyarrow as pa
from pydantic import Field

from storage.schemas import schema_for
from tasks.config.base import KpodModel
from tasks.config.pretrain import PretrainConfig
from tasks.config.student import EmbeddedShape
from tasks.core.corpus import documents, held_out_documents, shared_ngrams, task_ngrams
from tasks.core.models import count_parameters, embedded_llama, save_model, train_tokenizer
from tasks.stages.contract import StageContext, StageSpec
from tasks.stages.student import tokenizer_corpus
from tasks.training.data import TrainMethod
from tasks.training.pretraining import (
    document_example, evaluate_base, operation_probes, probe_example, train_config,
)
from tasks.training.recipe import Recipe, train_log_table


def _tokenizer(ctx: StageContext, corpus: list[str]):
    """Train the tokenizer once per key: a resumed run reloads the one its checkpoints used."""
    from transformers import AutoTokenizer

    saved = ctx.work_dir / "tokenizer"
    if (saved / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(str(saved))
    task = tokenizer_corpus(ctx.table("dataset", "questions"), ctx.table("rationales", "rationales"))
    tok = train_tokenizer(corpus[: ctx.inputs.pretrain.tokenizer_documents] + task, ctx.inputs.vocab_size)
    tok.save_pretrained(str(saved))
    return tok


def _contamination(ctx: StageContext, corpus: list[str]) -> tuple[int, int]:
    """(8-grams the corpus shares with the task's questions and rationales, task 8-grams)."""
    texts = ctx.table("dataset", "questions", columns=["question"]).column("question").to_pylist()
    texts += ctx.table("rationales", "rationales", columns=["text"]).column("text").to_pylist()
    task = task_ngrams(texts)
    return len(shared_ngrams(corpus, task)), len(task)


def run(ctx: StageContext) -> None:
    cfg: PretrainConfig = ctx.inputs.pretrain
    corpus = [text for _, text in documents(cfg.seed, cfg.documents, cfg.max_value)]
    shared, task_grams = _contamination(ctx, corpus)
    tok = _tokenizer(ctx, corpus)
    model = embedded_llama(ctx.inputs.shape.model_copy(update={"seed": cfg.seed}), tok)
    examples = [document_example(tok, d, cfg.max_tokens) for d in corpus]
    t0 = time.perf_counter()
    recipe = Recipe(train_config(cfg), model, tok, TrainMethod(examples, tok.pad_token_id), ctx.work_dir, progress=ctx.progress)
    recipe.setup()
    log = recipe.train()
    train_s = time.perf_counter() - t0
    base = recipe.final_model()
    if not recipe.accelerator.is_main_process:
        return
    save_model(base, tok, ctx.output_path("base"))
    ctx.write_table("pretrain_log", train_log_table(log))
    held = [document_example(tok, d, cfg.max_tokens) for d in held_out_documents(cfg.seed, cfg.held_out, set(corpus), cfg.max_value)]
    probes = [probe_example(tok, p, t) for p, t in operation_probes(cfg.seed, cfg.probes, cfg.max_value)]
    text_eval, op_eval = evaluate_base(base, held, tok.pad_token_id), evaluate_base(base, probes, tok.pad_token_id)
    rows = [
        dict(model="student", metric="heldout_nll", value=text_eval["nll"], n=len(held)),
        dict(model="student", metric="heldout_perplexity", value=text_eval["perplexity"], n=len(held)),
        dict(model="student", metric="operation_accuracy", value=op_eval["exact"], n=len(probes)),
        dict(model="student", metric="task_8grams_shared", value=float(shared), n=task_grams),
    ]
    ctx.write_table("pretrain_eval", pa.Table.from_pylist(rows, schema=schema_for("pretrain_eval")))
    ctx.summary.update(
        {r["metric"]: round(r["value"], 4) for r in rows},
        documents=len(corpus), corpus_tokens=sum(len(e.labels) - 1 for e in examples),
        vocab=len(tok), parameters=count_parameters(base), steps=recipe.global_step,
        resumed_from=recipe.resumed_from, first_loss=round(log[0]["loss"], 4) if log else None,
        final_loss=round(log[-1]["loss"], 4) if log else None, train_seconds=round(train_s, 1),
    )


class PretrainInputs(KpodModel):
    pretrain: PretrainConfig = Field(description="The pretrain section.")
    shape: EmbeddedShape = Field(description="The student's shape (hidden, layers, heads, ...): the base is built in it (initialised from pretrain.seed).")
    vocab_size: int = Field(description="student.vocab_size: most BPE tokens of the shared tokenizer.")


def _inputs(cfg) -> PretrainInputs:
    s = cfg.student
    shape = EmbeddedShape(**{k: getattr(s, k) for k in ("hidden", "layers", "heads", "intermediate", "max_len")})
    return PretrainInputs(pretrain=cfg.pretrain, shape=shape, vocab_size=s.vocab_size)


SPEC = StageSpec(
    name="pretrain",
    run=run,
    inputs=_inputs,
    # the task's training text enters the tokenizer, and its texts the contamination check
    upstream=lambda cfg: ("dataset", "rationales"),
    description="pretrained miniature: a generic corpus, a shared tokenizer and a base of the student's shape",
    enabled=lambda cfg: cfg.student.init == "base",
)
