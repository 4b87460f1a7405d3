"""Where a student's answers go wrong, on synthetic arithmetic: the first gold equation missed.

For every evaluation in a store (every complete `evaluate` stage), each prediction of the split
is compared equation by equation ("a op b = c", in order) with the generator's solution, which
the `questions` table keeps in `meta`. The first gold step the output does not reproduce names
the error: `left operand` (not the previous result or the question's first number), `operation`,
`right operand` (a number copied wrongly from the question), `arithmetic` (right operands, wrong
result), `stopped early`; `ok` when every step is reproduced (`extra steps` when more follow).
METHODS §2.5 and docs/benchmarks.md use it to tell copying errors from arithmetic ones.

    .venv/bin/python bench/error_kinds.py STORE [--split val]
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from storage.store import Store  # noqa: E402

EQUATION = re.compile(r"(-?\d+)\s*([-+*/x×÷])\s*(-?\d+)\s*=\s*(-?\d+)")
SAME_OP = {"x": "*", "×": "*", "÷": "/"}


def error_kind(output: str, steps: list[dict]) -> str:
    """The kind of the first gold step (dicts with left, op, right, result) `output` misses."""
    found = [(int(a), SAME_OP.get(o, o), int(b), int(c)) for a, o, b, c in EQUATION.findall(output)]
    for k, s in enumerate(steps):
        if k >= len(found):
            return "stopped early"
        got, want = found[k], (s["left"], s["op"], s["right"], s["result"])
        if got == want:
            continue
        for i, name in enumerate(("left operand", "operation", "right operand")):
            if got[i] != want[i]:
                return name
        return "arithmetic"
    return "extra steps" if len(found) > len(steps) else "ok"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("store", type=Path, help="a kpod store")
    ap.add_argument("--split", default="val", help="split to classify (default val)")
    args = ap.parse_args(argv)
    store = Store(args.store)
    print("| evaluate key | method | accuracy | " + " | ".join(KINDS) + " |")
    print("|---|---|---:|" + "---:|" * len(KINDS))
    for key in store.complete_keys("evaluate"):
        manifest = store.manifest("evaluate", key)
        qs = store.read_table("dataset", manifest["upstream"]["dataset"], "questions").to_pylist()
        meta = {q["question_id"]: json.loads(q["meta"] or "{}") for q in qs}
        preds = [p for p in store.read_table("evaluate", key, "predictions").to_pylist() if p["split"] == args.split]
        if not preds or "steps" not in meta[preds[0]["question_id"]]:
            continue  # not synthetic arithmetic
        kinds = collections.Counter(error_kind(p["output"], meta[p["question_id"]]["steps"]) for p in preds)
        acc = sum(p["correct"] for p in preds) / len(preds)
        train = store.manifest("train", manifest["upstream"]["train"])
        method = train["summary"].get("method", "?") + (
            f" ({train['inputs']['train'].get('scheduler')}, {train['inputs']['train'].get('curriculum_lr', '-')})")
        print(f"| {key} | {method} | {acc:.3f} | " + " | ".join(str(kinds.get(k, 0)) for k in KINDS) + " |")
    return 0


KINDS = ("ok", "arithmetic", "right operand", "left operand", "operation", "stopped early", "extra steps")

if __name__ == "__main__":
    sys.exit(main())
