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

import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

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


def records_from_rows(
    task: str, rows: Iterable[tuple[str, Any]], part: str, source: str,
    max_question_chars: int = MAX_QUESTION_CHARS,
) -> list[Record]:
    """Map rows to records, one per distinct question (Mentor-KD files repeat a question once
    per rationale); a repeated question with a different answer, or a question longer than
    `max_question_chars`, is an error."""
    seen: dict[str, Record] = {}
    for where_in_source, row in rows:
        where = f"{source}: {where_in_source}"
        question, answer, extra = map_row(task, row, where)
        if len(question) > max_question_chars:
            raise DatasetError(
                f"{where}: the question has {len(question)} characters, more than the "
                f"{max_question_chars} accepted"
            )
        prior = seen.get(question)
        if prior is not None:
            if prior.answer != answer:
                raise DatasetError(
                    f"{where}: answer {answer!r} contradicts {prior.answer!r} given earlier for the same question"
                )
            continue
        meta = {"source": source, "where": where_in_source, **extra}
        seen[question] = Record(f"{task}-{part}-{len(seen)}", question, answer, meta)
    return list(seen.values())


def load_file(task: str, path: str | Path, part: str, max_question_chars: int = MAX_QUESTION_CHARS) -> list[Record]:
    task_info(task)
    return records_from_rows(task, read_rows(path), part, str(path), max_question_chars)


def records_from_hf(
    task: str, splits: Mapping[str, Iterable[Mapping[str, Any]]], source: str,
    max_question_chars: int = MAX_QUESTION_CHARS,
) -> dict[str, list[Record]]:
    """Map an HF `DatasetDict` (or any mapping of split name -> rows) to parts.

    Split names go through the task's `hf_splits`; a source with a single unnamed split is
    one "all" part; other splits are ignored.
    """
    info = task_info(task)
    parts: dict[str, list[Record]] = {}
    names = list(splits)
    for name in names:
        part = info.hf_splits.get(name) or ("all" if len(names) == 1 else None)
        if part is None:
            continue
        rows = ((f"row {i}", row) for i, row in enumerate(splits[name]))
        parts[part] = records_from_rows(task, rows, part, f"{source}[{name}]", max_question_chars)
    if not parts:
        raise DatasetError(f"{source}: no usable split among {names} (expected {sorted(info.hf_splits)})")
    return parts


def load_hf(
    task: str, name: str, config: str | None, revision: str | None, max_question_chars: int = MAX_QUESTION_CHARS,
) -> dict[str, list[Record]]:
    """Download (or read from the HF cache) a dataset by name; never called in tests."""
    import datasets

    dd = datasets.load_dataset(name, config, revision=revision)
    if not isinstance(dd, Mapping):  # a single Dataset when a split was named in `name`
        dd = {"all": dd}
    return records_from_hf(task, dd, name if config is None else f"{name}/{config}", max_question_chars)


# ---- splits -------------------------------------------------------------------------------
def _shuffled(n: int, seed: int, task: str, what: str) -> list[int]:
    idx = list(range(n))
    random.Random(f"kpod-split:{seed}:{task}:{what}").shuffle(idx)
    return idx


def assign_splits(
    task: str,
    parts: Mapping[str, list[Record]],
    *,
    seed: int,
    val_fraction: float,
    split_fractions: tuple[float, float, float],
) -> dict[str, list[Record]]:
    """Turn source parts (train/val/test, or one "all") into train/val/test (see module doc)."""
    info = task_info(task)
    if "all" in parts:
        if len(parts) > 1:
            raise DatasetError(f"{task}: a single-file source cannot be combined with per-split sources")
        rows = parts["all"]
        if info.paper_split and len(rows) == sum(info.paper_split):
            n_train, n_val, _ = info.paper_split
        else:
            n_train = round(split_fractions[0] * len(rows))
            n_val = round(split_fractions[1] * len(rows))
        order = [rows[i] for i in _shuffled(len(rows), seed, task, "all")]
        return {"train": order[:n_train], "val": order[n_train:n_train + n_val], "test": order[n_train + n_val:]}
    out = {s: list(parts.get(s, [])) for s in SPLITS}
    if "val" in parts:
        return out
    if info.val_from_test and len(out["test"]) == info.val_from_test[0]:
        n_val = info.val_from_test[1]
        out["val"], out["test"] = out["test"][:n_val], out["test"][n_val:]
        return out
    train = out["train"]
    if info.val_from_train and len(train) == info.val_from_train[0]:
        n_val = info.val_from_train[1]
    else:
        n_val = round(val_fraction * len(train))
    chosen = set(_shuffled(len(train), seed, task, "val")[:n_val])
    out["val"] = [r for i, r in enumerate(train) if i in chosen]
    out["train"] = [r for i, r in enumerate(train) if i not in chosen]
    return out
