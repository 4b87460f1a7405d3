"""Released teacher files graded as their authors graded them (issue 15): `rationales.source_labels`.

For every shared Mentor-KD file whose rows carry a correctness flag (`initial_correct`), replay
it through the real teacher stage (`teach`, replay backend, a scratch store) and the rationales
stage (`build`) once per `source_labels` mode, and report:
- trust: the share of the rationales the file flags correct that are trained on
  (`rationales.correct`, kept by `min_steps`);
- regrade: agreement of kpod's own grade (`own_correct`) with the file's flags, and every
  disagreement (written to --out as JSONL for reading by hand);
- regrade with `rationales.teacher_grading: zero_shot_cot` (Kojima et al.'s cleansing of the
  answer call, the rule the flags were set with): its agreement.

    python -m bench.source_labels [--data ../shared/data/mentor-kd] [--out /tmp/disagreements.jsonl]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import pyarrow as pa

from storage.store import Store
from tasks.config.rationales import RationalesConfig
from tasks.config.teacher import TeacherConfig
from tasks.core.real_datasets import load_file, task_info
from tasks.stages.rationales import build
from tasks.teacher_backends.teach import teach

TASKS = ("svamp", "date_understanding", "last_letter_concatenation", "tracking_shuffled_objects")


def questions_of(task: str, path: Path) -> pa.Table:
    records = load_file(task, path, "train")
    kind = task_info(task).answer_type
    return pa.table({
        "question_id": [r.question_id for r in records],
        "split": ["train"] * len(records),
        "question": [r.question for r in records],
        "answer": [r.answer for r in records],
        "answer_type": [kind] * len(records),
        "meta": ["{}"] * len(records),
    })


def measure(task: str, path: Path, out: list[dict]) -> dict:
    questions = questions_of(task, path)
    rows = json.loads(path.read_text())
    samples = max(sum(1 for r in rows if r["input"].strip() == q) for q in set(r["input"].strip() for r in rows))
    cfg = TeacherConfig(backend="replay", model="released", replay_path=str(path), replay_format="mentor_kd",
                        samples=samples, max_error_fraction=1.0, concurrency=64)
    with tempfile.TemporaryDirectory() as tmp:
        calls, _, _ = teach(questions.select(["question_id", "split", "question", "meta"]), cfg, Store(Path(tmp)))
    got = {}
    for mode in ("trust", "regrade"):
        got[mode] = build(questions, calls, RationalesConfig(source_labels=mode)).get("rationales").to_pylist()
    zsc = build(questions, calls, RationalesConfig(source_labels="regrade", teacher_grading="zero_shot_cot"))
    zsc_graded = [r for r in zsc.get("rationales").to_pylist() if r["source_correct"] is not None]
    flagged = [c for c in calls.to_pylist() if c["error"] is None and c["source_correct"]]
    trained = sum(r["correct"] for r in got["trust"] if r["source_correct"])
    graded = [r for r in got["regrade"] if r["source_correct"] is not None]
    agree = sum(r["own_correct"] == r["source_correct"] for r in graded)
    for r in graded:
        if r["own_correct"] != r["source_correct"]:
            call = next(c for c in calls.to_pylist() if c["question_id"] == r["question_id"] and c["sample"] == r["sample"])
            gold = questions.filter(pa.compute.equal(questions["question_id"], r["question_id"]))["answer"][0].as_py()
            out.append(dict(file=path.name, rationale_id=r["rationale_id"], flag=r["source_correct"],
                            pred=r["pred"], gold=gold, teacher_answer=call["teacher_answer"],
                            completion=call["completion"]))
    return dict(file=path.name, rows=len(rows), flagged_correct=len(flagged), trained_trust=trained,
                graded=len(graded), agree_regrade=agree,
                agree_zero_shot_cot=sum(r["own_correct"] == r["source_correct"] for r in zsc_graded))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data/mentor-kd")
    ap.add_argument("--out", default=None, help="write every regrade disagreement here (JSONL)")
    args = ap.parse_args()
    out: list[dict] = []
    print("| file | rows | flagged correct | trained on (trust) | agreement (regrade) | agreement (regrade, zero_shot_cot) |")
    print("|---|---|---|---|---|---|")
    for name in sorted(p.name for p in Path(args.data).glob("*.json")):
        task = next((t for t in TASKS if name.startswith(t)), None)
        if task is None or "teacher6" in name:
            continue
        path = Path(args.data) / name
        if "initial_correct" not in json.loads(path.read_text())[0]:
            continue  # no flags (svamp_test.json)
        m = measure(task, path, out)
        print(f"| {m['file']} | {m['rows']} | {m['flagged_correct']} | {m['trained_trust']} "
              f"({m['trained_trust'] / max(m['flagged_correct'], 1):.1%}) | {m['agree_regrade']}/{m['graded']} "
              f"({m['agree_regrade'] / max(m['graded'], 1):.1%}) | {m['agree_zero_shot_cot']}/{m['graded']} "
              f"({m['agree_zero_shot_cot'] / max(m['graded'], 1):.1%}) |")
    if args.out:
        Path(args.out).write_text("".join(json.dumps(d) + "\n" for d in out))


if __name__ == "__main__":
    main()
