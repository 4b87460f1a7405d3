"""Model selection on the validation split: keep the weights of the best-scoring epoch.

With `train.select_every = N > 0` the `train` stage scores the student on `val` after every
N-th epoch and after the last one (greedy generation, graded by `tasks.core.answers`, exactly as
the `evaluate` stage grades), and the model it saves is the one with the highest val
accuracy (ties go to the later epoch, the one trained longer). `test` is never looked at
here: selecting on it would make the reported test accuracy optimistic.

Everything lives in the stage's work dir (files named by storage.checkpoints), so a run killed
and resumed keeps its history:
- the history: one record per scored epoch (epoch, step, n, correct, accuracy);
- the weights of the best epoch so far.
An epoch scored again after a resume (its end came after the checkpoint resumed from)
replaces its old record; on CPU with a fixed seed it gets the same score.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import pyarrow as pa
import torch

from storage import checkpoints
from tasks.core.grading import grade_outputs
from tasks.core.formatting import encode_prompt
from tasks.core.generation import generate_ids


def due(epoch: int, every: int, epochs: int) -> bool:
    """Whether the end of (0-based) `epoch` is scored: every `every`-th epoch and the last."""
    return every > 0 and ((epoch + 1) % every == 0 or epoch + 1 == epochs)


def best_record(history: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The record with the highest accuracy; among equals, the latest epoch."""
    if not history:
        return None
    return max(history, key=lambda r: (r["accuracy"], r["epoch"]))


class ValSelection:
    """Scores the model at epoch ends (`Recipe.on_epoch_end`) and keeps the best weights."""

    def __init__(
        self,
        val_questions: pa.Table,
        tokenizer: Any,
        every: int,
        epochs: int,
        work_dir: str | Path,
        max_new_tokens: int,
        batch_size: int = 64,
    ):
        splits = set(val_questions.column("split").to_pylist())
        if splits != {"val"}:
            raise ValueError(f"model selection scores val questions only, got splits {sorted(splits)}")
        self.questions, self.tokenizer = val_questions, tokenizer
        self.every, self.epochs = every, epochs
        self.work_dir = Path(work_dir)
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        self.history: list[dict[str, Any]] = checkpoints.read_selection_history(self.work_dir)

    def __call__(self, recipe: Any, epoch: int) -> None:
        if not due(epoch, self.every, self.epochs):
            return
        acc = recipe.accelerator
        if acc.is_main_process:
            self._score(acc.unwrap_model(recipe.model), epoch, recipe.global_step, recipe.seq2seq)
        acc.wait_for_everyone()

    def _score(self, model: Any, epoch: int, step: int, seq2seq: bool) -> None:
        prompts = [encode_prompt(self.tokenizer, q, seq2seq) for q in self.questions.column("question").to_pylist()]
        model.eval()
        try:
            with torch.no_grad():
                outputs = generate_ids(model, self.tokenizer, prompts, self.batch_size, self.max_new_tokens)
        finally:
            model.train()
        correct = sum(grade_outputs(self.questions, outputs).column("correct").to_pylist())
        record = {"epoch": epoch, "step": step, "n": len(prompts), "correct": correct,
                  "accuracy": correct / len(prompts)}
        self.history = [r for r in self.history if r["epoch"] != epoch] + [record]
        self.history.sort(key=lambda r: r["epoch"])
        if best_record(self.history) is record:
            checkpoints.write_best_weights(self.work_dir, model)
        # the history goes last: a kill between the two leaves an older history, never one
        # naming a best epoch whose weights were not written
        checkpoints.write_selection_history(self.work_dir, self.history)

    def restore_best(self, model: Any) -> dict[str, Any] | None:
        """Load the best epoch's weights into `model` (unwrapped); returns its record."""
        best = best_record(self.history)
        if best is not None:
            checkpoints.read_best_weights(self.work_dir, model)
        return best

    def table(self) -> pa.Table:
        """The `val_selection` table: every scored epoch, the kept one marked `selected`."""
        from storage.schemas import schema_for

        best = best_record(self.history)
        rows = [dict(r, selected=r is best) for r in self.history]
        return pa.Table.from_pylist(rows, schema=schema_for("val_selection"))
