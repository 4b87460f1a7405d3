"""Training tokens/s of the `train` recipe vs plain HF `Trainer`: same model, data, batch size.

Both train one epoch from the same initial weights on the same examples (synthetic problems,
scripted-teacher rationales, the embedded tokenizer and student). The recipe batches by length
(no compute on padding beyond each batch's longest sequence); the Trainer uses its defaults:
random batches padded to their longest sequence. Throughput counts real (non-pad) tokens per
wall second of the training loop (and per CPU second of the process, which a shared machine's
other load disturbs less). Runs alternate (recipe, Trainer, recipe, ...) so background
load on a shared machine hits both alike; the reported ratio is the median of per-pair ratios.

    .venv/bin/python bench/train_throughput.py [--examples 384] [--batch-size 32] [--repeats 2]

Writes bench/out/train_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from tasks.core import synthetic  # noqa: E402
from tasks.core.formatting import build_example, prompt_text, serialize  # noqa: E402
from tasks.core.models import build_student, embedded_llama  # noqa: E402
from tasks.config.student import StudentConfig
from tasks.core.rationale_rows import rationale_text  # noqa: E402
from tasks.stages.train import Recipe  # noqa: E402
from tasks.config.train import TrainConfig
from tasks.training.data import TrainMethod, collate_examples  # noqa: E402


def make_data(n: int, student: StudentConfig, max_len: int):
    problems = [p for p in synthetic.generate(synthetic.SyntheticConfig(n_train=n, n_val=0, n_test=0))]
    rng = random.Random(0)
    pairs = [(p, rationale_text(synthetic.render_rationale(p, rng), "numeric")) for p in problems]
    corpus = [prompt_text(p.question) for p, _ in pairs] + [serialize(p.question, r, str(p.answer)) for p, r in pairs]
    model, tok = build_student(student, corpus)
    examples = [
        build_example(tok, p.question, r, str(p.answer), seq2seq=False, max_len=max_len) for p, r in pairs
    ]
    return model, tok, examples


def real_tokens(examples) -> int:
    return sum(len(e.input_ids) for e in examples)


def run_recipe(model, tok, examples, cfg: TrainConfig) -> tuple[float, float]:
    """(tokens per wall second, tokens per CPU second of this process)."""
    with tempfile.TemporaryDirectory() as work:
        recipe = Recipe(cfg, model, tok, TrainMethod(examples, tok.pad_token_id), work)
        recipe.setup()
        t0, c0 = time.perf_counter(), time.process_time()
        log = recipe.train()
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    tokens = sum(r["tokens"] for r in log)
    return tokens / seconds, tokens / cpu


def run_trainer(model, tok, examples, cfg: TrainConfig) -> tuple[float, float]:
    from transformers import Trainer, TrainingArguments

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return len(examples)

        def __getitem__(self, i):
            return examples[i]

    def collate(batch):
        b = collate_examples(batch, tok.pad_token_id)
        return {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"], "labels": b["labels"]}

    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out,
            per_device_train_batch_size=cfg.batch_size,
            num_train_epochs=cfg.epochs,
            learning_rate=cfg.lr,
            weight_decay=cfg.weight_decay,
            lr_scheduler_type=cfg.scheduler,
            max_grad_norm=cfg.max_grad_norm,
            seed=cfg.seed,
            use_cpu=True,
            save_strategy="no",
            logging_strategy="no",
            report_to=[],
            disable_tqdm=True,
            dataloader_num_workers=0,
            remove_unused_columns=False,
        )
        trainer = Trainer(model=model, args=args, train_dataset=Rows(), data_collator=collate)
        t0, c0 = time.perf_counter(), time.process_time()
        trainer.train()
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    tokens = real_tokens(examples) * cfg.epochs
    return tokens / seconds, tokens / cpu


def padded_tokens(examples, batches) -> int:
    return sum(len(b) * max(len(examples[i].input_ids) for i in b) for b in batches)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=384)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--out", default=str(ROOT / "bench" / "out" / "train_throughput.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    student = StudentConfig()  # the embedded default
    cfg = TrainConfig(epochs=1, batch_size=args.batch_size, checkpoint_every=10**9, device="cpu")
    _, tok, examples = make_data(args.examples, student, cfg.max_len)

    from tasks.training.data import length_grouped_batches

    grouped = length_grouped_batches([e.length for e in examples], cfg.batch_size, cfg.seed, 0)
    order = list(range(len(examples)))
    random.Random(0).shuffle(order)
    plain = [order[i : i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]
    ours_runs, hf_runs = [], []
    for _ in range(args.repeats):
        # fresh, identical initial weights for every run
        ours_runs.append(run_recipe(embedded_llama(student, tok), tok, examples, cfg))
        hf_runs.append(run_trainer(embedded_llama(student, tok), tok, examples, cfg))
    ratios = [a[0] / b[0] for a, b in zip(ours_runs, hf_runs)]
    cpu_ratios = [a[1] / b[1] for a, b in zip(ours_runs, hf_runs)]
    result = {
        "benchmark": "train_throughput",
        "ratio": round(statistics.median(ratios), 3),
        "ratios": [round(r, 3) for r in ratios],
        # per CPU second: less sensitive to other processes on a shared machine
        "cpu_time_ratio": round(statistics.median(cpu_ratios), 3),
        "cpu_time_ratios": [round(r, 3) for r in cpu_ratios],
        "recipe_tokens_per_s": [round(x[0], 1) for x in ours_runs],
        "trainer_tokens_per_s": [round(x[0], 1) for x in hf_runs],
        "recipe_tokens_per_cpu_s": [round(x[1], 1) for x in ours_runs],
        "trainer_tokens_per_cpu_s": [round(x[1], 1) for x in hf_runs],
        "padding_fraction_recipe": round(1 - real_tokens(examples) / padded_tokens(examples, grouped), 3),
        "padding_fraction_random_batches": round(1 - real_tokens(examples) / padded_tokens(examples, plain), 3),
        "examples": len(examples),
        "mean_tokens": round(real_tokens(examples) / len(examples), 1),
        "batch_size": cfg.batch_size,
        "model": student.hashable(),
        "threads": args.threads,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
