"""The `replay` teacher: recorded teacher output served as if a model had just written it.

Recorded files are read once into {question: [completion, ...]} and a request is answered by
finding its question in the rendered prompt. Sample index i takes the question's i-th recorded
completion (in file order), so three recorded rationales per question replay as samples
0, 1, 2; asking for more than were recorded is an error result, not a silent repeat. Formats
(`teacher.replay_format`; `auto` tells them apart by a row's fields):

- `gsm8k` (`{"question", "answer"}` with `#### X`): the human solution, calculator annotations
  `<<16-3-4=9>>` removed and `#### X` written as "Therefore, the answer is X.".
- `mentor_kd`: Mentor-KD `*_3_train.json` (`{"input", "chain", ...}`): one rationale per row, several rows
  per question.
- Mentor-KD `*_test.json` rows that carry both `chain` and `completion`: Kojima et al.'s two
  calls (reasoning, then "Therefore, the answer is" + answer), joined into one text; the second
  call's text is also returned as the teacher's answer (`TeacherResult.teacher_answer`), since the
  files' `initial_correct` flags were computed on it.
- Every Mentor-KD row's `initial_correct` flag is returned as `TeacherResult.source_correct`
  (the rationales stage trusts it or regrades, `rationales.source_labels`).
- `mentor_kd_raw`: Mentor-KD raw `*_teacher6.json` (`{"instruction", "output": [6 str]}`).
- `jsonl`: any JSON list or JSONL of `{"question", "completion"}` or `{"question", "completions": [..]}`;
  a `{"question", "completion"}` row may add the teacher's separate `teacher_answer` and a boolean
  `correct` flag.

Lookup compares whitespace-normalised text. A template wraps the question ("Q: ...\\nA: Let's
think step by step."), and few-shot exemplars put other recorded questions before it, so the
question is the recorded question whose occurrence ends last in the request's final user
message (the longest one on a tie). Replay costs nothing, so tokens are reported as 0.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, NamedTuple, Sequence

from tasks.teacher_backends.base import TeacherInputError, TeacherRequest, TeacherResult

if TYPE_CHECKING:
    from tasks.config.teacher import TeacherConfig

_WS = re.compile(r"\s+")
_CALC = re.compile(r"<<[^<>]*>>")
_GSM_FINAL = re.compile(r"\n?####\s*(.+?)\s*$", re.S)
_PREFIX = 32  # chars of a question indexed for the substring search


class Recorded(NamedTuple):
    """One recorded completion and what its file says beside it."""

    completion: str
    teacher_answer: str | None = None  # the answer as its own field (a two-stage second call)
    correct: bool | None = None  # the file's correctness flag


Row = tuple[str, list[Recorded]]  # a recorded row: (question, completions)


def normalize(text: str) -> str:
    return _WS.sub(" ", text).strip()


def gsm8k_rationale(solution: str) -> str:
    """A GSM8K solution as a rationale: no calculator annotations, the answer as a sentence."""
    text = _CALC.sub("", solution)
    m = _GSM_FINAL.search(text)
    if m is None:
        raise TeacherInputError(f"GSM8K solution has no '#### answer' line: {solution[-80:]!r}")
    body = text[: m.start()].rstrip()
    return f"{body}\nTherefore, the answer is {m.group(1).strip()}."


def _flag(row: dict[str, Any], name: str) -> bool | None:
    """A row's correctness flag: a JSON boolean, or the strings "True"/"False"; else None."""
    value = row.get(name)
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    return None


def _gsm8k(row: dict[str, Any]) -> Row | None:
    if "question" in row and isinstance(row.get("answer"), str) and "####" in row["answer"]:
        return row["question"], [Recorded(gsm8k_rationale(row["answer"]))]
    return None


def _mentor_kd(row: dict[str, Any]) -> Row | None:
    if "input" not in row or "chain" not in row:
        return None
    flag = _flag(row, "initial_correct")
    if "completion" in row:  # the two-call test rows: reasoning, then the answer call
        joined = f"{row['chain'].rstrip()}\nTherefore, the answer is{row['completion']}"
        return row["input"], [Recorded(joined, row["completion"], flag)]
    return row["input"], [Recorded(row["chain"], None, flag)]


def _mentor_kd_raw(row: dict[str, Any]) -> Row | None:
    if "instruction" not in row or "output" not in row:
        return None
    outs = row["output"]
    return row["instruction"], [Recorded(o) for o in (outs if isinstance(outs, list) else [outs])]


def _jsonl(row: dict[str, Any]) -> Row | None:
    if "question" in row and "completions" in row:
        return row["question"], [Recorded(c) for c in row["completions"]]
    if "question" in row and "completion" in row:
        return row["question"], [Recorded(row["completion"], row.get("teacher_answer"), _flag(row, "correct"))]
    return None


_FORMATS = {
    "gsm8k": (_gsm8k, "question, answer with '#### X'"),
    "mentor_kd": (_mentor_kd, "input, chain"),
    "mentor_kd_raw": (_mentor_kd_raw, "instruction, output"),
    "jsonl": (_jsonl, "question, completion or completions"),
}
REPLAY_FORMATS = ("auto", *_FORMATS)


def _completions_of(row: dict[str, Any], where: str, fmt: str) -> Row:
    """(question, completions) of one recorded row, read as `fmt` ('auto': by its fields)."""
    for name in _FORMATS if fmt == "auto" else (fmt,):
        got = _FORMATS[name][0](row)
        if got is not None:
            return got
    expected = "; ".join(f"{n}: {d}" for n, (_, d) in _FORMATS.items() if fmt in ("auto", n))
    raise TeacherInputError(f"{where}: no recorded completion in fields {sorted(row)} (expected {expected})")


def _rows(path: Path) -> Iterable[tuple[str, Any]]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise TeacherInputError(f"{path}: not UTF-8 text (byte {exc.start}); a replay file is JSON or JSONL") from None
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise TeacherInputError(f"{path} line {exc.lineno}: not JSON ({exc.msg})") from None
        for i, row in enumerate(data):
            yield f"{path} row {i}", row
        return
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TeacherInputError(f"{path} line {i}: not JSON ({exc.msg})") from None
        yield f"{path} line {i}", row


def load_recorded(
    paths: Sequence[str | Path], fmt: str = "auto", max_chars: int | None = None
) -> dict[str, list[Recorded]]:
    """{normalised question: recorded completions in file order} from every file, in the given order.
    A completion longer than `max_chars` is refused, naming its file and row: a recorded file
    is read whole, and a runaway one would flood memory and every table below."""
    if fmt not in REPLAY_FORMATS:
        raise TeacherInputError(f"unknown replay format {fmt!r}; known: {list(REPLAY_FORMATS)}")
    table: dict[str, list[Recorded]] = defaultdict(list)
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise FileNotFoundError(f"replay file {path} does not exist")
        for where, row in _rows(path):
            if not isinstance(row, dict):
                raise TeacherInputError(f"{where}: expected a JSON object, got {type(row).__name__}")
            question, outs = _completions_of(row, where, fmt)
            texts = [t for o in outs for t in (o.completion, o.teacher_answer) if t is not None]
            if not isinstance(question, str) or not all(isinstance(t, str) for t in texts):
                raise TeacherInputError(f"{where}: question, completions and answers must be strings")
            longest = max((len(o.completion) for o in outs), default=0)
            if max_chars is not None and longest > max_chars:
                raise TeacherInputError(
                    f"{where}: a recorded rationale of {longest} characters is longer than "
                    f"teacher.replay_max_chars ({max_chars})"
                )
            table[normalize(question)].extend(outs)
    return dict(table)


class QuestionIndex:
    """Finds which recorded question a request text contains, in time linear in the text."""

    def __init__(self, questions: Iterable[str]):
        self.questions = set(questions)
        self._by_prefix: dict[str, list[str]] = defaultdict(list)
        self._short: list[str] = []
        for q in self.questions:
            (self._by_prefix[q[:_PREFIX]] if len(q) >= _PREFIX else self._short).append(q)

    def find(self, text: str) -> str | None:
        text = normalize(text)
        if text in self.questions:
            return text
        best: tuple[int, int] | None = None  # (end, length) of the best occurrence
        found: str | None = None

        def consider(q: str, start: int) -> None:
            nonlocal best, found
            cand = (start + len(q), len(q))
            if best is None or cand > best:
                best, found = cand, q

        for i in range(len(text) - _PREFIX + 1):
            for q in self._by_prefix.get(text[i : i + _PREFIX], ()):
                if text.startswith(q, i):
                    consider(q, i)
        for q in self._short:
            at = text.rfind(q)
            if at >= 0:
                consider(q, at)
        return found


def request_text(request: TeacherRequest) -> str:
    """The text that holds the question: the last user message, else the whole prompt."""
    users = [m["content"] for m in request.messages if m.get("role") == "user"]
    return users[-1] if users else request.prompt


class ReplayBackend:
    def __init__(self, recorded: dict[str, list[Recorded]], source: str = "replay"):
        if not recorded:
            raise TeacherInputError(f"{source}: no recorded completions")
        self.recorded = recorded
        self.source = source
        self.index = QuestionIndex(recorded)

    @classmethod
    def from_files(cls, paths: Sequence[str | Path], fmt: str = "auto", max_chars: int | None = None) -> "ReplayBackend":
        return cls(load_recorded(paths, fmt, max_chars), source=", ".join(str(p) for p in paths))

    def lookup(self, request: TeacherRequest) -> TeacherResult:
        text = request_text(request)
        question = self.index.find(text)
        if question is None:
            return TeacherResult(
                None,
                error=f"replay: no recorded completion for question {normalize(text)[:100]!r} "
                f"({request.question_id}) in {self.source}",
            )
        outs = self.recorded[question]
        if request.sample >= len(outs):
            return TeacherResult(
                None,
                error=f"replay: question {request.question_id} has {len(outs)} recorded "
                f"completion(s); sample {request.sample} was asked for",
            )
        rec = outs[request.sample]
        return TeacherResult(
            rec.completion, finish_reason="stop", teacher_answer=rec.teacher_answer, source_correct=rec.correct
        )

    async def complete(self, request: TeacherRequest) -> TeacherResult:
        return self.lookup(request)

    async def aclose(self) -> None:
        return None


def make_backend(cfg: "TeacherConfig") -> ReplayBackend:
    if not cfg.replay_path:
        raise TeacherInputError("teacher.replay_path: the replay backend needs a recorded output file")
    return ReplayBackend.from_files([cfg.replay_path], cfg.replay_format, cfg.replay_max_chars)
