"""Real reasoning datasets: read local files or HF `datasets`, map rows, cut the papers' splits.

Tasks and their answer types:
    numeric  gsm8k, svamp, asdiv          choice  commonsense_qa, date_understanding,
    yesno    strategy_qa, coin_flip               tracking_shuffled_objects
    string   last_letter_concatenation

Local files: JSONL (one object a line), a JSON list of objects (or an object holding the list
under "examples" / "data", the zero-shot-CoT release's layout), or Parquet. One row mapping
serves every source; it understands
- GSM8K `{question, answer}`: the gold answer follows `#### ` (commas dropped); the worked
  solution before it is kept in meta["solution"];
- Mentor-KD `{input, answer}`, `{input, chain, answer, initial_correct}` (several rationales a
  question: one question row each, first occurrence wins) and teacher6 `{instruction, output,
  label}`;
- SVAMP / ASDiv `{Body, Question, Answer}` / `{body, question, answer: "9 (apples)"}`,
  CommonsenseQA (`choices` appended to the question as "Answer choices: (A) ..."), BIG-Bench
  Hard `{input, target: "(A)"}`, StrategyQA `{question, answer: bool}`, and
  `{question, answer}` in general.
Choices stay in the question text. Gold answers are normalised with `tasks.core.answers`, the same
module that grades predictions.

Splits (`assign_splits`): sources name train / val / test parts, or one "all" part.
- GSM8K: when the test part is the full official test set (1,319 rows) and no val is given,
  its first 660 rows are val and the remaining 659 test (KPOD / MCC-KD's split).
- CommonsenseQA from HF: the labelled `validation` split is the test set (the official test
  labels are hidden); val is 1,221 rows drawn from train (8,520 / 1,221 / 1,221).
- One "all" part of the full set's size: the paper's sizes (SVAMP 1,000 -> 700/150/150,
  ASDiv 2,089 -> 1,462/313/314) in a seeded order; any other "all" part: `split_fractions`.
- Otherwise, with no val part, val is a seeded `val_fraction` of train.
Question ids are `<task>-<part>-<i>`, i the question's index in its source part, so they do
not move when val is carved out differently.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import numpy as np

from tasks.core.answers import normalize_gold

SPLITS = ("train", "val", "test")
# the longest question accepted, in characters: a runaway row (a 50 MB "question") is refused
# before it fills memory, every table below, and a paid teacher's prompt
MAX_QUESTION_CHARS = 20_000


class DatasetError(ValueError):
    """Bad input data: the one-line message names the file (or HF split) and the row."""


@dataclass(frozen=True)
class TaskInfo:
    answer_type: str  # numeric | choice | yesno | string
    # one "all" part of exactly sum(paper_split) rows is cut into these train/val/test sizes
    paper_split: tuple[int, int, int] | None = None
    # (full official test size, val rows): the first rows of the official test set become val
    val_from_test: tuple[int, int] | None = None
    # (full train size, val rows): a seeded val of this size is drawn from the full train set
    val_from_train: tuple[int, int] | None = None
    # HF split name -> our part; splits not named are ignored
    hf_splits: Mapping[str, str] = field(
        default_factory=lambda: {"train": "train", "validation": "val", "test": "test"}
    )


TASKS: dict[str, TaskInfo] = {
    "gsm8k": TaskInfo("numeric", val_from_test=(1319, 660)),
    "svamp": TaskInfo("numeric", paper_split=(700, 150, 150)),
    "asdiv": TaskInfo("numeric", paper_split=(1462, 313, 314)),
    "commonsense_qa": TaskInfo(
        "choice", val_from_train=(9741, 1221), hf_splits={"train": "train", "validation": "test"}
    ),
    "strategy_qa": TaskInfo("yesno"),
    "date_understanding": TaskInfo("choice"),
    "tracking_shuffled_objects": TaskInfo("choice"),
    "last_letter_concatenation": TaskInfo("string"),
    "coin_flip": TaskInfo("yesno"),
}


@dataclass(frozen=True)
class Record:
    question_id: str
    question: str
    answer: str  # normalised gold answer
    meta: dict[str, Any]


def task_info(task: str) -> TaskInfo:
    try:
        return TASKS[task]
    except KeyError:
        raise DatasetError(f"unknown task {task!r}; expected one of {sorted(TASKS)}") from None


# ---- reading files ------------------------------------------------------------------------
def read_rows(path: str | Path) -> Iterator[tuple[str, Any]]:
    """Rows of a JSONL / JSON / Parquet file, each with its location ("line 3", "row 2"), one at
    a time: JSONL and Parquet files are read as the rows are drawn (a JSON document is parsed
    whole). A missing file is an error here; a file that is not text, or holds no row, is an
    error naming it when the rows are drawn."""
    p = Path(path)
    if not p.is_file():
        raise DatasetError(f"{path}: no such data file")
    suffix = p.suffix.lower()
    if suffix not in (".jsonl", ".json", ".parquet"):
        raise DatasetError(f"{p}: unsupported data file type {suffix!r} (use .jsonl, .json or .parquet)")
    return _checked(p, suffix)


def _checked(p: Path, suffix: str) -> Iterator[tuple[str, Any]]:
    n = 0
    try:
        for row in _rows_of(p, suffix):
            n += 1
            yield row
    except UnicodeDecodeError as exc:  # a binary file where JSON text was expected
        raise DatasetError(f"{p}: not UTF-8 text (byte {exc.start}); is it really a {suffix} file?") from None
    if not n:
        raise DatasetError(f"{p}: no rows (the data file is empty)")


def _rows_of(p: Path, suffix: str) -> Iterator[tuple[str, Any]]:
    if suffix == ".jsonl":
        with open(p, encoding="utf-8") as fh:
            for n, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DatasetError(f"{p}: line {n}: not valid JSON ({exc.msg})") from None
                yield f"line {n}", row
    elif suffix == ".json":
        yield from _json_rows(p)
    else:
        yield from _parquet_rows(p)


def _json_rows(p: Path) -> Iterator[tuple[str, Any]]:
    text = p.read_text(encoding="utf-8")
    if not text.strip():
        return
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{p}: line {exc.lineno}: not valid JSON ({exc.msg})") from None
    if isinstance(data, dict):
        lists = [k for k in ("examples", "data") if isinstance(data.get(k), list)]
        if not lists:
            raise DatasetError(f"{p}: expected a JSON list of rows, or an object with an 'examples' list")
        data = data[lists[0]]
    if not isinstance(data, list):
        raise DatasetError(f"{p}: expected a JSON list of rows, got {type(data).__name__}")
    del text
    for i, row in enumerate(data):
        yield f"row {i}", row


def _parquet_rows(p: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(p).iter_batches(batch_size=1024)
        i = 0
        for batch in batches:
            for row in batch.to_pylist():
                yield f"row {i}", row
                i += 1
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise DatasetError(f"{p}: not a readable Parquet file ({exc})") from None


# ---- mapping one row ----------------------------------------------------------------------
_QUESTION_KEYS = ("question", "Question", "input", "instruction", "inputs", "sQuestion")
_ANSWER_KEYS = ("answer", "Answer", "label", "target", "targets", "answerKey", "lSolutions")
_BODY_KEYS = ("Body", "body")
_LEADING_NUMBER = re.compile(r"^\s*\$?\s*(-?[\d,]*\.?\d+)(?:\s*/\s*(\d+))?")


def _first(row: Mapping[str, Any], keys: Iterable[str]) -> tuple[str | None, Any]:
    for k in keys:
        if k in row and row[k] is not None:
            return k, row[k]
    return None, None


def _choices_text(choices: Any) -> str:
    """CommonsenseQA choices, HF `{label: [...], text: [...]}` or original `[{label, text}]`."""
    if isinstance(choices, Mapping):
        pairs = list(zip(choices.get("label", []), choices.get("text", [])))
    else:
        pairs = [(c["label"], c["text"]) for c in choices]
    return "Answer choices: " + ", ".join(f"({label}) {text}" for label, text in pairs) + "."


def _question_text(row: Mapping[str, Any], where: str) -> str:
    _, q = _first(row, _QUESTION_KEYS)
    choices = row.get("choices")
    if isinstance(q, Mapping):  # original CommonsenseQA: question = {stem, choices, ...}
        choices = q.get("choices", choices)
        q = q.get("stem")
    if not isinstance(q, str) or not q.strip():
        raise DatasetError(f"{where}: row has no question (expected one of {list(_QUESTION_KEYS)})")
    _, body = _first(row, _BODY_KEYS)
    text = f"{body.strip()} {q.strip()}" if isinstance(body, str) and body.strip() else q.strip()
    if choices:
        text = f"{text}\n{_choices_text(choices)}"
    return text


def _gold(task: str, raw: Any, where: str) -> tuple[str, dict[str, Any]]:
    """(normalised gold answer, meta extras) from a raw answer field."""
    info = task_info(task)
    extra: dict[str, Any] = {}
    if isinstance(raw, bool):
        raw = "yes" if raw else "no"
    if isinstance(raw, (list, tuple)):  # zero-shot-CoT / SVAMP keep lists of equal answers
        raw = raw[0] if raw else None
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        raise DatasetError(f"{where}: row has no answer (expected one of {list(_ANSWER_KEYS)})")
    text = str(raw)
    if info.answer_type == "numeric":
        if "####" in text:  # GSM8K: worked solution, then "#### 1,234"
            solution, text = text.rsplit("####", 1)
            extra["solution"] = solution.strip()
        m = _LEADING_NUMBER.match(text.replace(",", ""))
        if m is None:
            raise DatasetError(f"{where}: answer {raw!r} is not a number")
        num, den = m.groups()
        text = num if den is None else repr(float(num) / float(den))  # ASDiv "9 (apples)", "1/2"
    try:
        return normalize_gold(text, info.answer_type), extra
    except ValueError:
        raise DatasetError(f"{where}: answer {raw!r} is not a valid {info.answer_type} answer") from None


def map_row(task: str, row: Any, where: str) -> tuple[str, str, dict[str, Any]]:
    """(question, gold answer, meta) of one raw row; `where` locates it for error messages."""
    if not isinstance(row, Mapping):
        raise DatasetError(f"{where}: expected an object with question and answer fields, got {type(row).__name__}")
    question = _question_text(row, where)
    _, raw = _first(row, _ANSWER_KEYS)
    answer, extra = _gold(task, raw, where)
    return question, answer, extra


def iter_records(
    task: str, rows: Iterable[tuple[str, Any]], part: str, source: str,
    max_question_chars: int = MAX_QUESTION_CHARS,
) -> Iterator[Record]:
    """Map rows to records as they are drawn, one per distinct question (Mentor-KD files repeat a
    question once per rationale); a repeated question with a different answer, or a question
    longer than `max_question_chars`, is an error. What is held per question is a 16-byte digest
    of its text and its gold answer, not the record (a million questions stay ~100 MB)."""
    seen: dict[bytes, str] = {}
    for where_in_source, row in rows:
        where = f"{source}: {where_in_source}"
        question, answer, extra = map_row(task, row, where)
        if len(question) > max_question_chars:
            raise DatasetError(
                f"{where}: the question has {len(question)} characters, more than the "
                f"{max_question_chars} accepted"
            )
        digest = hashlib.blake2b(question.encode("utf-8"), digest_size=16).digest()
        prior = seen.get(digest)
        if prior is not None:
            if prior != answer:
                raise DatasetError(
                    f"{where}: answer {answer!r} contradicts {prior!r} given earlier for the same question"
                )
            continue
        meta = {"source": source, "where": where_in_source, **extra}
        yield Record(f"{task}-{part}-{len(seen)}", question, answer, meta)
        seen[digest] = answer


def records_from_rows(
    task: str, rows: Iterable[tuple[str, Any]], part: str, source: str,
    max_question_chars: int = MAX_QUESTION_CHARS,
) -> list[Record]:
    """`iter_records` as a list (small sources, tests)."""
    return list(iter_records(task, rows, part, source, max_question_chars))


def iter_file(task: str, path: str | Path, part: str, max_question_chars: int = MAX_QUESTION_CHARS) -> Iterator[Record]:
    """A data file's records as its rows are read."""
    task_info(task)
    return iter_records(task, read_rows(path), part, str(path), max_question_chars)


def load_file(task: str, path: str | Path, part: str, max_question_chars: int = MAX_QUESTION_CHARS) -> list[Record]:
    return list(iter_file(task, path, part, max_question_chars))


def iter_hf_parts(
    task: str, splits: Mapping[str, Iterable[Mapping[str, Any]]], source: str,
    max_question_chars: int = MAX_QUESTION_CHARS,
) -> Iterator[tuple[str, Iterator[Record]]]:
    """(part, its records as they are read) of an HF `DatasetDict` (or any mapping of split
    name -> rows). Split names go through the task's `hf_splits`; a source with a single unnamed
    split is one "all" part; other splits are ignored. A source with no usable split is an error
    before any part is yielded."""
    info = task_info(task)
    names = list(splits)
    chosen = [(name, info.hf_splits.get(name) or ("all" if len(names) == 1 else None)) for name in names]
    chosen = [(name, part) for name, part in chosen if part is not None]
    if not chosen:
        raise DatasetError(f"{source}: no usable split among {names} (expected {sorted(info.hf_splits)})")
    for name, part in chosen:
        rows = ((f"row {i}", row) for i, row in enumerate(splits[name]))
        yield part, iter_records(task, rows, part, f"{source}[{name}]", max_question_chars)


def records_from_hf(
    task: str, splits: Mapping[str, Iterable[Mapping[str, Any]]], source: str,
    max_question_chars: int = MAX_QUESTION_CHARS,
) -> dict[str, list[Record]]:
    """`iter_hf_parts` as lists (small sources, tests)."""
    return {part: list(records) for part, records in iter_hf_parts(task, splits, source, max_question_chars)}


def hf_parts(
    task: str, name: str, config: str | None, revision: str | None, max_question_chars: int = MAX_QUESTION_CHARS,
) -> Iterator[tuple[str, Iterator[Record]]]:
    """Download (or read from the HF cache) a dataset by name, its parts as `iter_hf_parts`
    reads them; never called in tests."""
    import datasets

    dd = datasets.load_dataset(name, config, revision=revision)
    if not isinstance(dd, Mapping):  # a single Dataset when a split was named in `name`
        dd = {"all": dd}
    return iter_hf_parts(task, dd, name if config is None else f"{name}/{config}", max_question_chars)


# ---- splits -------------------------------------------------------------------------------
def _shuffled(n: int, seed: int, task: str, what: str) -> list[int]:
    idx = list(range(n))
    random.Random(f"kpod-split:{seed}:{task}:{what}").shuffle(idx)
    return idx


# the indices (into one source part) a split takes, in the split's order
Segment = tuple[str, np.ndarray]


def split_plan(
    task: str,
    counts: Mapping[str, int],
    *,
    seed: int,
    val_fraction: float,
    split_fractions: tuple[float, float, float],
) -> dict[str, list[Segment]]:
    """Which rows of the source parts (train/val/test, or one "all", with `counts` rows each)
    make train/val/test (see module doc), as (part, row indices) segments in each split's order.
    Only counts are needed, so a source's records can be spilled and read back in this order."""
    info = task_info(task)
    whole = {p: np.arange(n, dtype=np.int64) for p, n in counts.items()}
    if "all" in counts:
        if len(counts) > 1:
            raise DatasetError(f"{task}: a single-file source cannot be combined with per-split sources")
        n = counts["all"]
        if info.paper_split and n == sum(info.paper_split):
            n_train, n_val, _ = info.paper_split
        else:
            n_train = round(split_fractions[0] * n)
            n_val = round(split_fractions[1] * n)
        order = np.asarray(_shuffled(n, seed, task, "all"), dtype=np.int64)
        cuts = {"train": order[:n_train], "val": order[n_train:n_train + n_val], "test": order[n_train + n_val:]}
        return {s: [("all", idx)] for s, idx in cuts.items()}
    plan: dict[str, list[Segment]] = {s: [(s, whole[s])] if s in whole else [] for s in SPLITS}
    if "val" in counts:
        return plan
    n_test = counts.get("test", 0)
    if info.val_from_test and n_test == info.val_from_test[0]:
        n_val = info.val_from_test[1]
        plan["val"], plan["test"] = [("test", whole["test"][:n_val])], [("test", whole["test"][n_val:])]
        return plan
    n_train = counts.get("train", 0)
    if info.val_from_train and n_train == info.val_from_train[0]:
        n_val = info.val_from_train[1]
    else:
        n_val = round(val_fraction * n_train)
    chosen = np.zeros(n_train, dtype=bool)
    chosen[np.asarray(_shuffled(n_train, seed, task, "val")[:n_val], dtype=np.int64)] = True
    plan["val"] = [("train", np.flatnonzero(chosen))]
    plan["train"] = [("train", np.flatnonzero(~chosen))]
    return plan


def assign_splits(
    task: str,
    parts: Mapping[str, list[Record]],
    *,
    seed: int,
    val_fraction: float,
    split_fractions: tuple[float, float, float],
) -> dict[str, list[Record]]:
    """Turn source parts (train/val/test, or one "all") into train/val/test records (see module
    doc): `split_plan` applied to records held in memory."""
    plan = split_plan(task, {p: len(r) for p, r in parts.items()}, seed=seed, val_fraction=val_fraction,
                      split_fractions=split_fractions)
    return {s: [parts[p][int(i)] for p, idx in segments for i in idx] for s, segments in plan.items()}
