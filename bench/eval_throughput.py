"""Evaluation throughput: batched greedy generation vs one question at a time.

The student is the embedded default (a ~1M-parameter LLaMA built from `StudentConfig` with a
BPE tokenizer trained on the synthetic rationales; nothing is downloaded), briefly trained
with Std-CoT so that its completions look like real answers and end at EOS at varied lengths
(an untrained model would always run to `max_new_tokens`, which flatters batching). Both
paths decode the same test questions greedily with the same `max_new_tokens`:
- batched: `tasks.core.generation.generate_ids` (length-sorted batches, left padding, KV cache);
- one at a time: the same function with batch size 1, i.e. one `model.generate` per question.
It reports questions/s of each, the speed-up, and how many outputs agree (greedy decoding
should give identical text; float rounding in a differently shaped batch may rarely flip a
near-tie). Figures go to bench/out/eval_throughput.json; docs/benchmarks.md records them.

    .venv/bin/python bench/eval_throughput.py                 # defaults: 120 questions
    .venv/bin/python bench/eval_throughput.py --questions 50 --train-steps 0
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from pathlib import Path

import torch

from tasks.core import synthetic
from tasks.core.answers import extract, grade
from tasks.core.formatting import build_example, encode_prompt, serialize
from tasks.core.generation import generate_ids
from tasks.core.losses import weighted_token_nll
from tasks.core.models import build_student, count_parameters
from tasks.config.student import StudentConfig
from tasks.training.data import collate_examples, length_grouped_batches

OUT = Path(__file__).resolve().parent / "out" / "eval_throughput.json"


def train_briefly(model, tokenizer, problems, steps: int, batch_size: int, seed: int) -> float:
    """A few hundred Std-CoT steps on scripted rationales; returns the last loss."""
    rng = random.Random(seed)
    examples = [
        build_example(
            tokenizer, p.question, synthetic.render_rationale(p, rng), str(p.answer),
            seq2seq=False, max_len=256,
        )
        for p in problems
    ]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    model.train()
    step, epoch, loss = 0, 0, float("nan")
    while step < steps:
        for idx in length_grouped_batches([e.length for e in examples], batch_size, seed, epoch):
            batch = collate_examples([examples[i] for i in idx], tokenizer.pad_token_id)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            out, _ = weighted_token_nll(logits[:, :-1], batch["labels"][:, 1:], batch["weights"][:, 1:])
            opt.zero_grad()
            out.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step, loss = step + 1, out.item()
            if step >= steps:
                break
        epoch += 1
    model.eval()
    return loss


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--questions", type=int, default=120, help="test questions to answer")
    ap.add_argument("--batch-size", type=int, default=32, help="batched generation batch size")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--train-questions", type=int, default=600)
    ap.add_argument("--train-steps", type=int, default=300, help="0: an untrained model")
    ap.add_argument("--train-batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (1: on a busy 2-core box, 2 threads ran 15x slower)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    cfg = synthetic.SyntheticConfig(
        seed=args.seed, n_train=args.train_questions, n_val=0, n_test=args.questions
    )
    problems = synthetic.generate(cfg)
    train = [p for p in problems if p.split == "train"]
    test = [p for p in problems if p.split == "test"]
    rng = random.Random(args.seed)
    corpus = [serialize(p.question, synthetic.render_rationale(p, rng), str(p.answer)) for p in train]
    model, tokenizer = build_student(StudentConfig(seed=args.seed), corpus)

    loss, train_s = timed(
        lambda: train_briefly(model, tokenizer, train, args.train_steps, args.train_batch, args.seed)
        if args.train_steps
        else float("nan")
    )
    print(f"trained {args.train_steps} steps in {train_s:.0f} s, loss {loss:.3f}", file=sys.stderr)
    prompts = [encode_prompt(tokenizer, p.question, seq2seq=False) for p in test]

    batched, batched_s = timed(
        lambda: generate_ids(model, tokenizer, prompts, args.batch_size, args.max_new_tokens)
    )
    print(f"batched: {batched_s:.1f} s", file=sys.stderr)
    single, single_s = timed(
        lambda: generate_ids(model, tokenizer, prompts, 1, args.max_new_tokens)
    )

    def accuracy(outputs: list[str]) -> float:
        ok = [grade(extract(o, "numeric"), str(p.answer), "numeric") for o, p in zip(outputs, test)]
        return sum(ok) / len(ok)

    new_tokens = [len(tokenizer(o, add_special_tokens=False)["input_ids"]) for o in batched]
    result = {
        "benchmark": "eval_throughput",
        "model": {
            "parameters": count_parameters(model),
            "student_config": StudentConfig(seed=args.seed).model_dump(),
            "train_steps": args.train_steps,
            "train_seconds": round(train_s, 1),
            "final_train_loss": round(loss, 4),
        },
        "questions": len(prompts),
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        "mean_output_tokens": round(sum(new_tokens) / len(new_tokens), 1),
        "prompt_tokens": {"min": min(map(len, prompts)), "max": max(map(len, prompts))},
        "batched": {"seconds": round(batched_s, 2), "questions_per_s": round(len(prompts) / batched_s, 2),
                    "accuracy": round(accuracy(batched), 4)},
        "one_at_a_time": {"seconds": round(single_s, 2), "questions_per_s": round(len(prompts) / single_s, 2),
                          "accuracy": round(accuracy(single), 4)},
        "speedup": round(single_s / batched_s, 2),
        "identical_outputs": sum(a == b for a, b in zip(batched, single)),
        "machine": {"threads": args.threads, "platform": platform.platform(),
                    "processor": platform.processor() or platform.machine(), "torch": torch.__version__},
        "command": "python bench/eval_throughput.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
