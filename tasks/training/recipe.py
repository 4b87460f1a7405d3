"""The training recipe every model of kpod is trained with (student, mentor, difficulty warm-up).

A recipe in the torchtune shape: `setup` (accelerator, optimiser, schedule, resume), `train`
(epochs of length-grouped batches, one `loss_step` per micro-batch) and `save_checkpoint`.
It runs in one process or under `accelerate launch` (DDP, CPU or GPU). What a method changes
lives in its `TrainMethod` (tasks/training/data.py): the examples of each epoch, the batch and
the final loss.

Checkpoints (every `checkpoint_every` optimiser steps, into the stage's work dir): model,
optimiser and scheduler state, RNG states of torch, `random` and numpy per process, and the
data position (epoch, micro-batch within the epoch, that epoch's batch order) plus the log so
far. Tensors go to safetensors, the rest to JSON; where and how the files are written (a temp
dir renamed into place, `state.json` last, the two newest kept) is storage.checkpoints'. A rerun
after kill -9 resumes from the newest and, on CPU with a fixed seed, computes the same losses
an uninterrupted run would.
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import torch

from storage import checkpoints
from storage.schemas import schema_for
from tasks.config.train import TrainConfig
from tasks.core.formatting import Example, build_example
from tasks.core.forward import IGNORE, aligned_logits, is_seq2seq, resolve_device
from tasks.core.losses import weighted_token_nll
from tasks.training.data import TrainMethod, length_grouped_batches
from tasks.training.lr_schedule import lr_lambda

# ---- the recipe ------------------------------------------------------------------------------
class Recipe:
    """setup / train / save_checkpoint around one `loss_step(model, batch)`."""

    def __init__(
        self,
        cfg: TrainConfig,
        model: Any,
        tokenizer: Any,
        method: TrainMethod,
        work_dir: str | Path,
        progress: Callable[..., Any] | None = None,
        on_step: Callable[[dict[str, Any]], None] | None = None,
        on_epoch_end: Callable[["Recipe", int], None] | None = None,
    ):
        self.cfg, self.model, self.tokenizer, self.method = cfg, model, tokenizer, method
        self.work_dir = Path(work_dir)
        self.progress, self.on_step, self.on_epoch_end = progress, on_step, on_epoch_end
        self.seq2seq = is_seq2seq(model)
        self.log: list[dict[str, Any]] = []
        self.global_step = 0
        self.epoch = 0
        self.micro = 0  # next micro-batch (this process's index) within the epoch
        self.order: list[list[int]] | None = None  # this epoch's global batch order
        self.resumed_from: int | None = None
        # resumed from a checkpoint taken at the very end of this epoch: its end-of-epoch
        # hook may not have run before the kill, so `train` runs it first
        self._ended_epoch: int | None = None

    # -- setup ----------------------------------------------------------------------------
    def setup(self) -> None:
        from accelerate import Accelerator

        cfg = self.cfg
        # accelerate picks the GPU itself; it is only told to stay on the CPU (resolve_device
        # fails on an explicit "cuda" without CUDA)
        on_cpu = resolve_device(cfg.device).type == "cpu"
        if cfg.bf16 and on_cpu:
            raise RuntimeError("train.bf16 needs a GPU; set train.bf16=false on CPU")
        self.accelerator = Accelerator(cpu=on_cpu, mixed_precision="bf16" if cfg.bf16 else "no")
        self.rank = self.accelerator.process_index
        self.world = self.accelerator.num_processes

        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)

        model = self.model
        if cfg.lora is not None:
            from peft import LoraConfig, TaskType, get_peft_model

            model = get_peft_model(
                model,
                LoraConfig(
                    r=cfg.lora.r,
                    lora_alpha=cfg.lora.alpha,
                    lora_dropout=cfg.lora.dropout,
                    target_modules=list(cfg.lora.targets),
                    task_type=TaskType.SEQ_2_SEQ_LM if self.seq2seq else TaskType.CAUSAL_LM,
                ),
            )
        model.train()
        # decay only matrices: norms and biases are scale parameters, decaying them hurts
        params = [p for p in model.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)

        n_examples = len(self.method.examples_for_epoch(0))
        self.steps_per_epoch = self._steps_in_epoch(n_examples)
        self.total_steps = self.steps_per_epoch * cfg.epochs
        # train.curriculum_lr = hold: the peak lasts through KPOD's curriculum epochs (0 otherwise)
        hold = self.method.curriculum_epochs * self.steps_per_epoch if cfg.curriculum_lr == "hold" else 0
        # the scheduler is not `prepare`d: accelerate would step it once per process
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda(int(cfg.warmup_ratio * self.total_steps), self.total_steps, cfg.scheduler, hold)
        )
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self._load_latest_checkpoint()

    def _steps_in_epoch(self, n_examples: int) -> int:
        batches = len(length_grouped_batches([0] * n_examples, self.cfg.batch_size, 0, 0, self.world))
        return math.ceil(batches // self.world / self.cfg.grad_accum)

    # -- one loss ---------------------------------------------------------------------------
    def loss_step(self, model: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Forward one batch; the method's loss over the weighted token NLL."""
        aligned = aligned_logits(model, batch, extra=self.method.per_token)
        nll, parts = weighted_token_nll(aligned.logits, aligned.labels, aligned.extras["weights"])
        return self.method.loss(nll, parts, batch, aligned)

    # -- the loop ---------------------------------------------------------------------------
    def train(self) -> list[dict[str, Any]]:
        cfg, acc = self.cfg, self.accelerator
        bar = None
        if self.progress is not None and acc.is_main_process:
            bar = self.progress(total=self.total_steps, initial=self.global_step, desc="train", unit="step")
        try:
            if self._ended_epoch is not None and self.on_epoch_end is not None:
                self.on_epoch_end(self, self._ended_epoch)
            while self.epoch < cfg.epochs:
                self._run_epoch(bar)
                if self.on_epoch_end is not None:
                    self.on_epoch_end(self, self.epoch)
                self.epoch, self.micro, self.order = self.epoch + 1, 0, None
        finally:
            if bar is not None:
                bar.close()
        acc.wait_for_everyone()
        return self.log

    def _run_epoch(self, bar: Any) -> None:
        cfg, acc = self.cfg, self.accelerator
        examples = self.method.examples_for_epoch(self.epoch)
        stage = self.method.stage_for_epoch(self.epoch)
        if self.order is None:  # a resumed epoch keeps the order it was checkpointed with
            lengths = [e.length for e in examples]
            self.order = length_grouped_batches(lengths, cfg.batch_size, cfg.seed, self.epoch, self.world)
        mine = self.order[self.rank :: self.world]
        window: list[dict[str, torch.Tensor]] = []  # per micro-batch stats of this step
        t0 = time.perf_counter()
        while self.micro < len(mine):
            batch = self.method.collate([examples[i] for i in mine[self.micro]])
            batch = {k: v.to(acc.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            self.micro += 1
            last = self.micro % cfg.grad_accum == 0 or self.micro == len(mine)
            n_micro = (self.micro - 1) % cfg.grad_accum + 1 if last else None
            sync = acc.no_sync(self.model) if not last and self.world > 1 else _null()
            with sync:
                with acc.autocast():
                    loss, parts = self.loss_step(self.model, batch)
                acc.backward(loss / cfg.grad_accum)
            real = batch["attention_mask"].sum() + (
                (batch["labels"] != IGNORE).sum() if self.seq2seq else 0
            )
            window.append({"loss": loss.detach(), "nll": parts["nll"], "kd": parts.get("kd"), "tokens": real})
            if not last:
                continue
            if n_micro < cfg.grad_accum:  # a short last step of the epoch: rescale its gradient
                for p in self.model.parameters():
                    if p.grad is not None:
                        p.grad.mul_(cfg.grad_accum / n_micro)
            acc.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
            self.optimizer.step()
            lr = self.scheduler.get_last_lr()[0]
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.global_step += 1
            row = self._log_row(window, stage, lr, time.perf_counter() - t0)
            window, t0 = [], time.perf_counter()
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:.0f}")
            if self.global_step % cfg.checkpoint_every == 0:
                self.save_checkpoint()
            if self.on_step is not None:
                self.on_step(row)

    def _log_row(self, window: list[dict[str, Any]], stage: int, lr: float, seconds: float) -> dict[str, Any]:
        acc = self.accelerator
        loss = acc.reduce(torch.stack([w["loss"] for w in window]).mean(), "mean")
        nll = acc.reduce(torch.stack([w["nll"] for w in window]).mean(), "mean")
        kds = [w["kd"] for w in window if w["kd"] is not None]
        kd = acc.reduce(torch.stack(kds).mean(), "mean").item() if kds else None
        tokens = int(acc.reduce(torch.stack([torch.as_tensor(w["tokens"]) for w in window]).sum(), "sum").item())
        row = {
            "step": self.global_step,
            "epoch": self.epoch,
            "stage": stage,
            "loss": float(loss.item()),
            "nll": float(nll.item()),
            "kd": kd,
            "lr": float(lr),
            "tokens": tokens,
            "tokens_per_s": tokens / max(seconds, 1e-9),
        }
        self.log.append(row)
        return row

    # -- checkpoints ------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """Write checkpoint `ckpt-<step>` atomically (storage.checkpoints: temp dir, state.json last)."""
        acc, step = self.accelerator, self.global_step
        if acc.is_main_process:
            checkpoints.begin(self.work_dir, step)
        acc.wait_for_everyone()
        tmp = checkpoints.temp_dir(self.work_dir, step)
        self._save_rng(tmp)  # every process has its own RNG streams
        acc.wait_for_everyone()
        if acc.is_main_process:
            checkpoints.write_weights(tmp, acc.unwrap_model(self.model))
            opt = self.optimizer.state_dict()
            tensors = {
                f"{pid}.{name}": v.contiguous()
                for pid, st in opt["state"].items()
                for name, v in st.items()
                if torch.is_tensor(v)
            }
            checkpoints.write_tensors(tmp, checkpoints.OPTIMIZER_TENSORS, tensors)
            checkpoints.write_json(tmp, checkpoints.OPTIMIZER, {"param_groups": opt["param_groups"]})
            checkpoints.write_json(tmp, checkpoints.SCHEDULER, self.scheduler.state_dict())
            state = {
                "global_step": step,
                "epoch": self.epoch,
                "micro": self.micro,
                "order": self.order,
                "world": self.world,
                "log": self.log,
            }
            checkpoints.commit(self.work_dir, step, state)
        acc.wait_for_everyone()
        return checkpoints.checkpoint_dir(self.work_dir, step)

    def _load_latest_checkpoint(self) -> None:
        ckpt = checkpoints.latest(self.work_dir)
        if ckpt is None:
            return
        state = checkpoints.read_json(ckpt, checkpoints.STATE)
        if state["world"] != self.world:
            raise RuntimeError(
                f"checkpoint {ckpt} was written by {state['world']} processes, this run has "
                f"{self.world}; resume with the same number or remove {self.work_dir}"
            )
        checkpoints.read_weights(ckpt, self.accelerator.unwrap_model(self.model))
        opt_state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in checkpoints.read_tensors(ckpt, checkpoints.OPTIMIZER_TENSORS).items():
            pid, name = key.split(".", 1)
            opt_state.setdefault(int(pid), {})[name] = value
        groups = checkpoints.read_json(ckpt, checkpoints.OPTIMIZER)["param_groups"]
        self.optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
        self.scheduler.load_state_dict(checkpoints.read_json(ckpt, checkpoints.SCHEDULER))
        self._restore_rng(ckpt)
        self.global_step, self.epoch, self.micro = state["global_step"], state["epoch"], state["micro"]
        self.order, self.log = state["order"], state["log"]
        if self.micro >= len(self.order[self.rank :: self.world]):  # saved at an epoch's end
            self._ended_epoch = self.epoch
            self.epoch, self.micro, self.order = self.epoch + 1, 0, None
        self.resumed_from = self.global_step

    def _save_rng(self, directory: Path) -> None:
        """This process's torch, `random` and numpy streams, into its own two files."""
        torch_rng = {"torch": torch.get_rng_state()}
        checkpoints.write_tensors(directory, checkpoints.rng_file(self.rank, "safetensors"), torch_rng)
        np_state = np.random.get_state()
        checkpoints.write_json(
            directory,
            checkpoints.rng_file(self.rank, "json"),
            {
                "python": _listify(random.getstate()),
                "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            },
        )

    def _restore_rng(self, ckpt: Path) -> None:
        """This process's torch, `random` and numpy streams as `save_checkpoint` left them."""
        torch_rng = checkpoints.read_tensors(ckpt, checkpoints.rng_file(self.rank, "safetensors"))
        torch.set_rng_state(torch_rng["torch"])
        rng = checkpoints.read_json(ckpt, checkpoints.rng_file(self.rank, "json"))
        random.setstate(_tupleify(rng["python"]))
        npst = rng["numpy"]
        np.random.set_state((npst[0], np.array(npst[1], dtype=np.uint32), *npst[2:]))

    # -- the result -------------------------------------------------------------------------
    def final_model(self) -> Any:
        """The trained model without DDP or LoRA wrappers (adapters merged)."""
        model = self.accelerator.unwrap_model(self.model)
        if self.cfg.lora is not None:
            model = model.merge_and_unload()
        model.eval()
        return model


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _listify(value: Any) -> Any:
    return [_listify(v) for v in value] if isinstance(value, (tuple, list)) else value


def _tupleify(value: Any) -> Any:
    return tuple(_tupleify(v) for v in value) if isinstance(value, list) else value



def std_cot_examples(
    questions: pa.Table, rationales: pa.Table, tokenizer: Any, seq2seq: bool, max_len: int,
    sources: tuple[str, ...] = ("teacher",),
) -> list[Example]:
    """One example per correct rationale of a training question from `sources` (teacher; Mentor-KD
    adds mentor), by rationale_id."""
    qs = {
        r["question_id"]: r
        for r in questions.select(["question_id", "split", "question", "answer"]).to_pylist()
        if r["split"] == "train"
    }
    rows = rationales.select(["rationale_id", "question_id", "source", "text", "correct"]).to_pylist()
    out = []
    for r in sorted(rows, key=lambda r: r["rationale_id"]):
        q = qs.get(r["question_id"])
        if q is None or not r["correct"] or r["source"] not in sources:
            continue
        out.append(
            build_example(
                tokenizer, q["question"], r["text"], q["answer"],
                seq2seq=seq2seq, max_len=max_len, rationale_id=r["rationale_id"],
            )
        )
    return out


def train_log_table(log: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(log, schema=schema_for("train_log"))


