"""The `pretrain` stage: the pretrained miniature's tokenizer and base models (issue 13).

Generates the generic corpus (tasks/core/corpus.py), trains a byte-level BPE tokenizer on part
of it together with the task's training text (the student stage's tokenizer text), and trains
a base of each requested shape (the student's; the mentor's for Mentor-KD) on the corpus with
the shared recipe (checkpoints, resume after kill -9). Its key holds the pretrain section and
the shapes only, so every method and seed of a store shares the bases. `student.init: base`
and `mentor.model.init: base` start from them.

Outputs: `base/` (the student's shape) and `base_mentor/` (model + tokenizer each),
`pretrain_log`, `pretrain_eval` (per base: held-out perplexity and single-operation accuracy;
the 8-grams the corpus shares with the task's questions and rationales: 0 expected).
"""

from __future__ import annotations

import time
from typing import Any

import pyarrow as pa
from pydantic import Field

from storage.schemas import schema_for
from tasks.config.base import KpodModel
from tasks.config.pretrain import PretrainConfig
from tasks.config.student import EmbeddedShape
from tasks.core.corpus import documents, held_out_documents, shared_ngrams, task_ngrams, task_vocabulary
from tasks.core.formatting import ANSWER_PHRASE
from tasks.stages.contract import StageContext, StageSpec
from tasks.stages.sources import tokenizer_corpus

OUTPUT = {"student": "base", "mentor": "base_mentor"}  # model -> output directory


def _tokenizer(ctx: StageContext, corpus: list[str], task: list[str]):
    """Train the tokenizer once per key: a resumed run reloads the one its checkpoints used."""
    from tasks.core.models import train_tokenizer
    from transformers import AutoTokenizer

    saved = ctx.work_dir / "tokenizer"
    if (saved / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(str(saved))
    cfg = ctx.inputs.pretrain
    tok = train_tokenizer(corpus[: cfg.tokenizer_documents] + task * cfg.tokenizer_task_weight, ctx.inputs.vocab_size)
    tok.save_pretrained(str(saved))
    return tok


def _contamination(questions: pa.Table, rationales: pa.Table, corpus: list[str]) -> dict[str, Any]:
    """The 8-grams the corpus shares with the task's questions and rationales (a pretrain_eval row)."""
    task = task_ngrams(questions.column("question").to_pylist() + rationales.column("text").to_pylist())
    return dict(model="corpus", metric="task_8grams_shared", value=float(len(shared_ngrams(corpus, task))), n=len(task))


def _pretrain(ctx: StageContext, name: str, tok: Any, examples: list) -> tuple[Any, list[dict], dict]:
    """Train one base (its checkpoints in its own work dir); (base, log rows, summary figures)."""
    from tasks.core.models import count_parameters, embedded_llama
    from tasks.training.data import TrainMethod
    from tasks.training.pretraining import train_config
    from tasks.training.recipe import Recipe

    cfg: PretrainConfig = ctx.inputs.pretrain
    model = embedded_llama(ctx.inputs.shapes[name].model_copy(update={"seed": cfg.seed}), tok)
    t0 = time.perf_counter()
    recipe = Recipe(train_config(cfg), model, tok, TrainMethod(examples, tok.pad_token_id), ctx.work_dir / name, progress=ctx.progress)
    recipe.setup()
    log = [{**row, "model": name} for row in recipe.train()]
    figures = dict(
        parameters=count_parameters(model), steps=recipe.global_step, resumed_from=recipe.resumed_from,
        first_loss=round(log[0]["loss"], 4) if log else None, final_loss=round(log[-1]["loss"], 4) if log else None,
        train_seconds=round(time.perf_counter() - t0, 1),
    )
    return recipe.final_model(), log, figures


def _check_examples(tok: Any, cfg: PretrainConfig, corpus: list[str]) -> tuple[list, list]:
    """(held-out documents, single-operation probes) as examples: built once, every base is scored on them."""
    from tasks.training.pretraining import document_example, operation_probes, probe_example

    held = [document_example(tok, d, cfg.max_tokens) for d in held_out_documents(cfg.seed, cfg.held_out, set(corpus), cfg.max_value, cfg.kinds)]
    probes = [probe_example(tok, p, t) for p, t in operation_probes(cfg.seed, cfg.probes, cfg.max_value)]
    return held, probes


def _checks(name: str, base: Any, tok: Any, held: list, probes: list) -> list[dict[str, Any]]:
    """pretrain_eval rows of one base: held-out perplexity and single-operation accuracy."""
    from tasks.training.pretraining import evaluate_base

    text, ops = evaluate_base(base, held, tok.pad_token_id), evaluate_base(base, probes, tok.pad_token_id)
    return [
        dict(model=name, metric="heldout_nll", value=text["nll"], n=len(held)),
        dict(model=name, metric="heldout_perplexity", value=text["perplexity"], n=len(held)),
        dict(model=name, metric="operation_accuracy", value=ops["exact"], n=len(probes)),
    ]


def run(ctx: StageContext) -> None:
    from tasks.core.models import save_model
    from tasks.training.pretraining import packed_examples

    cfg: PretrainConfig = ctx.inputs.pretrain
    questions, rationales = ctx.table("dataset", "questions"), ctx.table("rationales", "rationales")
    task = tokenizer_corpus(questions, rationales)
    # the task's words, never its word order; the answer phrase and the Q:/A: prompt stay out
    vocabulary = task_vocabulary(task, drop=["Q", "A", *ANSWER_PHRASE.replace(",", "").split()]) if cfg.task_vocabulary else ()
    corpus = [text for _, text in documents(cfg.seed, cfg.documents, cfg.max_value, vocabulary=vocabulary, kinds=cfg.kinds)]
    rows = [_contamination(questions, rationales, corpus)]
    tok = _tokenizer(ctx, corpus, task)
    examples = packed_examples(tok, corpus, cfg.max_tokens, cfg.pack_tokens)
    held, probes = _check_examples(tok, cfg, corpus)
    logs: list[dict] = []
    for name in cfg.models:
        base, log, figures = _pretrain(ctx, name, tok, examples)
        save_model(base, tok, ctx.output_path(OUTPUT[name]))
        logs += log
        rows += _checks(name, base, tok, held, probes)
        ctx.summary[name] = figures
    ctx.write_table("pretrain_log", pa.Table.from_pylist(logs, schema=schema_for("pretrain_log")))
    ctx.write_table("pretrain_eval", pa.Table.from_pylist(rows, schema=schema_for("pretrain_eval")))
    ctx.summary.update(
        {f"{r['model']}_{r['metric']}": round(r["value"], 4) for r in rows},
        documents=len(corpus), vocabulary_words=len(vocabulary), sequences=len(examples), tokens=sum(len(e.labels) - 1 for e in examples), vocab=len(tok),
    )


class PretrainInputs(KpodModel):
    pretrain: PretrainConfig = Field(description="The pretrain section.")
    shapes: dict[str, EmbeddedShape] = Field(description="The shape (hidden, layers, heads, ...) of each base in pretrain.models: the student's, the mentor's; each initialised from pretrain.seed.")
    vocab_size: int = Field(description="student.vocab_size: most BPE tokens of the shared tokenizer.")


SHAPE_FIELDS = ("hidden", "layers", "heads", "intermediate", "max_len")


def _inputs(cfg) -> PretrainInputs:
    sections = {"student": cfg.student, "mentor": cfg.mentor.model}
    shapes = {m: EmbeddedShape(**{k: getattr(sections[m], k) for k in SHAPE_FIELDS}) for m in cfg.pretrain.models}
    return PretrainInputs(pretrain=cfg.pretrain, shapes=shapes, vocab_size=cfg.student.vocab_size)


SPEC = StageSpec(
    name="pretrain",
    run=run,
    inputs=_inputs,
    # the task's training text enters the tokenizer, and its texts the contamination check
    upstream=lambda cfg: ("dataset", "rationales"),
    description="pretrained miniature: a generic corpus, a shared tokenizer and bases of the student's (and mentor's) shape",
    enabled=lambda cfg: cfg.student.base_tokenizer,
)
