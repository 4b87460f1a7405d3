"""Answer extraction and grading (tasks/core/answers.py), on hand-made cases and on real teacher text."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tasks.core.answers import (
    ANSWER_FORMS,
    ANSWER_TYPES,
    answer_phrases,
    extract,
    grade,
    normalize_gold,
)
from tasks.core.real_datasets import map_row

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
MENTOR = DATA / "mentor-kd"
TASK_TYPES = {
    "svamp": "numeric",
    "last_letter_concatenation": "string",
    "date_understanding": "choice",
    "tracking_shuffled_objects": "choice",
}


# ---- numeric ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, want",
    [
        ("He has 3 + 4 = 7 apples. Therefore, the answer is 7.", "7"),
        ("Therefore, the answer is 18.0.", "18"),
        ("The answer is $1,234.50", "1234.5"),
        ("It costs $1,000,000 in total.", "1000000"),
        ("5 - 8 = -3. The answer is -3.", "-3"),
        ("The temperature fell to -12 degrees", "-12"),
        ("10 apples and 5-3 = 2 pears", "2"),  # '-3' glued to '5' is an operator, not a sign
        ("So she pays 0.5 * 3 = 1.5 dollars.", "1.5"),
        ("She has .75 of it", "0.75"),
        ("The answer is 42 apples. Then 7 more people came.", "42"),  # phrase beats last number
        ("The final answer is 15 * 8 = 120 pints", "120"),  # the result after '=' in the phrase
        ("The answer is below.\n\n3 + 4 = 7", "7"),  # a phrase with no number in its sentence
        ("Tom has 5 apples --> 5", "5"),  # Fine-tune-CoT
        ("Tom has 5 apples. Answer: 6", "6"),
        ("1,234 + 2,345 = 3,579", "3579"),
        ("no numbers here", None),
        ("", None),
    ],
)
def test_extract_numeric(text, want):
    assert extract(text, "numeric") == want


@pytest.mark.parametrize(
    "pred, gold, ok",
    [
        ("18.0", "18", True),
        ("18", "18.000", True),
        ("$1,000", "1000", True),
        ("17.9999999", "18", True),  # within 1e-6
        ("17.99", "18", False),
        ("-3", "3", False),
        ("0.5", ".5", True),
        (None, "5", False),
        ("abc", "5", False),
    ],
)
def test_grade_numeric(pred, gold, ok):
    assert grade(pred, gold, "numeric") is ok


@pytest.mark.parametrize(
    "text, want",
    [
        ("Therefore, the answer is 1/2.", "0.5"),
        ("A: 1/5", "0.2"),  # no answer phrase: the last number, a fraction
        ("The answer is 1 1/2 cups.", "1.5"),
        ("She gave away -3/4 of it", "-0.75"),
        ("Therefore, the answer is -1 1/2.", "-1.5"),
        ("Therefore, the answer is 1/3.", "0.3333333333333333"),
        ("Today is 03/04/1973", "1973"),  # a date is no fraction
        ("The answer is 6 / 3 = 2", "2"),  # a spaced '/' is an operation; the result after '='
        ("Each gets 6/3 = 2 apples", "2"),
        ("Then 12/4 = 3", "3"),
        ("He has 5 12/4 boxes", "3"),  # an improper "mixed number" is two numbers
        ("It is 2/3.5 of that", "3.5"),  # a '/' before a decimal makes no fraction
        ("The answer is 5/0", None),  # no number divides by zero
    ],
)
def test_extract_numeric_fractions(text, want):
    assert extract(text, "numeric") == want


@pytest.mark.parametrize(
    "text, want",
    [
        ("Therefore, the answer is twelve.", "12"),
        ("The answer is Twenty-one apples", "21"),
        ("The answer is: ninety nine", "99"),
        ("The answer is zero.", "0"),
        ("The answer is two hundred and five.", "205"),
        ("The answer is one thousand two hundred", "1200"),
        ("The answer is twelve and five more", "12"),  # "and" joins only after hundred/thousand
        ("The answer is that one of them has 5 left.", "5"),  # only an opening number word counts
        ("The answer is 7 (seven).", "7"),
        ("She has five apples and eats one.", None),  # no phrase: words are no fallback
    ],
)
def test_extract_numeric_number_words(text, want):
    assert extract(text, "numeric") == want


@pytest.mark.parametrize(
    "text, want",
    [
        ("He had $10 --> $10-$3=$7 remaining. Then he spent $2 and was left with $5", "5"),
        ("So --> 7 apples. Then 3 + 4 = 8 pears, the answer is 8.", "8"),
        ("Adding 3 and 4 gives 7 --> 7 END", "7"),
        ("Adding 3 and 4 gives 7 --> 7\nEND", "7"),
        ("a --> 3 and b --> 4", "4"),  # only the last arrow can be the marker
    ],
)
def test_extract_numeric_arrow_is_a_marker_only_at_the_end(text, want):
    assert extract(text, "numeric") == want


def test_answer_phrases_skip_an_arrow_inside_the_reasoning():
    assert answer_phrases("x --> $10-$3=$7 remaining. So $5 left") == []
    assert answer_phrases("x --> 5 left. Then more reasoning.") == []
    (m,) = answer_phrases("x = 5 --> 5")
    assert m.group() == "-->"


@pytest.mark.parametrize(
    "pred, gold, ok",
    [
        ("1/2", "0.5", True),
        ("0.5", "1/2", True),
        ("1 1/2", "1.5", True),
        ("0.3333333", "1/3", True),  # within 1e-6
        ("0.33", "1/3", False),
        ("-3/4", "-0.75", True),
        ("1/2", "1", False),
    ],
)
def test_grade_numeric_fractions(pred, gold, ok):
    assert grade(pred, gold, "numeric") is ok


def test_extracted_fraction_equals_the_gold_the_loader_stores():
    """A dataset loads gold "1/2" as "0.5" and "1/3" as repr(1/3): an extracted fraction has the
    same canonical string, not only the same value within 1e-6."""
    for frac in ("1/2", "1/3", "2/3", "7/4"):
        _, gold, _ = map_row("asdiv", {"question": "q", "answer": frac}, "row")
        assert extract(f"Therefore, the answer is {frac}.", "numeric") == gold
        assert grade(extract(f"Therefore, the answer is {frac}.", "numeric"), gold, "numeric")
        assert normalize_gold(frac, "numeric") == gold


def test_numeric_comparison_matches_naive_float_reference():
    """grade agrees with |float(a) - float(b)| < 1e-6 on a grid of values."""
    values = ["0", "1", "1.0", "1.0000001", "1.00001", "-1", "2.5", "2.50", "1e3", "1000"]
    for a in values:
        for b in values:
            if "e" in a or "e" in b:
                continue
            assert grade(a, b, "numeric") == (abs(float(a) - float(b)) < 1e-6), (a, b)


# ---- choice -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, want",
    [
        ("Therefore, the answer is (B).", "B"),
        ("So the answer is (c) 12/01/2019", "C"),
        ("The answer is B.", "B"),
        ("Therefore, the correct choice is (F) 04/21/2021.", "F"),
        ("the closest option is (D) 05/01/2020.", "D"),
        ("We eliminate (A) and (B). It must be (E) 11/12/2018", "E"),  # last parenthesised
        (" A: Rodrigo.", "A"),
        (" B.", "B"),
        ("(c)", "C"),
        ("The answer is a blue ball.", None),  # an article is not a choice
        ("no letters in here", None),
    ],
)
def test_extract_choice(text, want):
    assert extract(text, "choice") == want


def test_grade_choice_gold_forms():
    assert grade("B", "(B)", "choice")
    assert grade("(b)", "B", "choice")
    assert not grade("C", "(B)", "choice")


# ---- yes/no and string --------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, want",
    [
        ("Therefore, the answer is yes.", "yes"),
        ("So the answer is False.", "no"),
        ("No, it cannot. The coin is still heads up. So yes.", "yes"),
        ("The answer is: no", "no"),
        ("I cannot tell", None),
        # The answer segment decides; an "undetermined" answer gives None, not a stray yes/no.
        ('There is no definitive answer.\nTherefore, the answer is "it depends."', None),
        ("No rain was seen. So the answer is unknown.", None),
        ("Yes, some say so. The answer is that it cannot be determined.", None),
        ("The answer is: not enough information to say no.", None),
        ("The answer is neither yes nor no.", None),
        ("The answer is not a simple yes or no.", None),
        ("No. The answer is maybe.", None),
        ("It is not known. The answer is no, because it is unknown whether it rains.", "no"),
        ("No, it does not. Therefore, the answer is yes.", "yes"),
        ("The answer is:\nYes", "yes"),  # nothing in the phrase's line: the last yes/no word
    ],
)
def test_extract_yesno(text, want):
    assert extract(text, "yesno") == want


def test_grade_yesno():
    assert grade("yes", "True", "yesno")
    assert grade("no", "false", "yesno")
    assert not grade("yes", "no", "yesno")


@pytest.mark.parametrize(
    "text, want",
    [
        ('Step 1: Lucky - y\nStep 2: Kc - c\n\nConcatenate all the letters together: "yc"', "yc"),
        ("1. Lucky - y\n2. Kc - c\n\nPutting them all together, we get: yc", "yc"),
        ("Therefore, the answer is 'nl'.", "nl"),
        ("So, the final result is \"eek\".", "eek"),
        ("we get: oaes\n\nLet me know if you need help with anything else!", "oaes"),
        ("Now, let's concatenate these last letters: 'aeoy'", "aeoy"),  # "let's" opens no quote
        ("Concatenate the last letters: n + d + o + a = ndoa", "ndoa"),
    ],
)
def test_extract_string(text, want):
    assert extract(text, "string") == want


def test_grade_string():
    assert grade('"YAJC"', "yajc", "string")  # case-insensitive, quotes stripped
    assert grade("y a j c", "yajc", "string")  # inner whitespace dropped
    assert grade("y-a-j-c", "yajc", "string")  # letters spelled out with hyphens
    assert not grade("yajd", "yajc", "string")
    assert not grade("co-op", "coop", "string")  # a hyphen inside a word stays


def test_normalize_gold_and_errors():
    assert normalize_gold("$1,000.0", "numeric") == "1000"
    assert normalize_gold("#### 72", "numeric") == "72"
    assert normalize_gold("(B)", "choice") == "B"
    assert normalize_gold("True", "yesno") == "yes"
    assert normalize_gold(' "Yajc" ', "string") == "Yajc"
    with pytest.raises(ValueError, match="'abc' is not a valid numeric"):
        normalize_gold("abc", "numeric")
    with pytest.raises(ValueError, match="unknown answer_type"):
        extract("x", "essay")
    with pytest.raises(ValueError, match="not a valid choice"):
        grade("A", "maybe", "choice")


def test_answer_forms_table_names_every_type():
    assert tuple(ANSWER_FORMS) == ANSWER_TYPES == ("numeric", "choice", "yesno", "string")
    assert all(row.accepts and row.read_from and row.equal_when for row in ANSWER_FORMS.values())


def test_answer_phrases_find_the_student_format():
    text = "3 + 4 = 7. Therefore, the answer is 7."
    (m,) = answer_phrases(text)
    assert text[m.start() :].startswith("the answer is")
    assert answer_phrases("The answers are below") == []


# ---- real data ----------------------------------------------------------------------------
def _need(path: Path) -> None:
    if not path.exists():
        pytest.skip(f"real data not found at {path} (../shared/data relative to the repo)")


def _gsm8k_rows() -> list[dict]:
    path = DATA / "gsm8k" / "train.jsonl"
    _need(path)
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_gsm8k_reference_solutions_grade_correct():
    """Every GSM8K solution graded against its own '#### N' answer, both as released (the last
    number) and in the student format; the one known mismatch is a data error (48+16=64 vs 66)."""
    wrong_full, wrong_student = [], []
    rows = _gsm8k_rows()
    for r in rows:
        body, gold = r["answer"].split("####")
        if not grade(extract(r["answer"], "numeric"), gold, "numeric"):
            wrong_full.append(r["answer"][-60:])
        student = re.sub(r"<<.*?>>", "", body).strip() + f" Therefore, the answer is {gold.strip()}."
        if not grade(extract(student, "numeric"), gold, "numeric"):
            wrong_student.append(student[-60:])
    assert wrong_student == []
    assert len(wrong_full) <= 1, wrong_full


# Agreement of grade(extract(chain)) with the release's `initial_correct`, measured on the files:
# last_letter 0.990, date 0.980, tracking 0.989. svamp is 0.773: its `initial_correct` comes
# from a second "the answer (arabic numerals) is" completion that the file does not hold, and
# many chains end on a number other than their answer ("... 52 x 2 = 104 beads for her 44
# friends", gold 52), which no reading of the chain alone recovers.
AGREEMENT_FLOOR = {
    "svamp": 0.76,
    "last_letter_concatenation": 0.98,
    "date_understanding": 0.97,
    "tracking_shuffled_objects": 0.98,
}


@pytest.mark.parametrize("task", sorted(TASK_TYPES))
def test_mentor_kd_train_chains_agree_with_initial_correct(task):
    path = MENTOR / f"{task}_3_train.json"
    _need(path)
    kind = TASK_TYPES[task]
    rows = json.loads(path.read_text())
    agree = sum(grade(extract(r["chain"], kind), r["answer"], kind) == r["initial_correct"] for r in rows)
    rate = agree / len(rows)
    print(f"{task}: agreement {rate:.4f} ({agree}/{len(rows)})")
    assert rate >= AGREEMENT_FLOOR[task]


@pytest.mark.parametrize("task", ["last_letter_concatenation", "date_understanding", "tracking_shuffled_objects"])
def test_mentor_kd_test_completions_agree_with_initial_correct(task):
    """The test files keep the short answer completion (' (B).', ' "yob".', ' A: Sam.') with
    its grade: measured 0.973 / 0.991 / 1.000 (the rest: "h-e-e-o" graded wrong there, right here)."""
    path = MENTOR / f"{task}_test.json"
    _need(path)
    kind = TASK_TYPES[task]
    rows = json.loads(path.read_text())
    agree = sum(
        grade(extract(r["completion"], kind), r["answer"], kind) == r["initial_correct"] for r in rows
    )
    assert agree / len(rows) >= 0.97


@pytest.mark.parametrize(
    "task, lo, hi",
    # gpt-3.5 is near-perfect on these; measured 0.987 and 0.989
    [("last_letter_concatenation", 0.95, 1.0), ("date_understanding", 0.95, 1.0)],
)
def test_mentor_kd_raw_teacher_completions_grade_plausibly(task, lo, hi):
    path = MENTOR / f"{task}_teacher6.json"
    _need(path)
    kind = TASK_TYPES[task]
    rows = json.loads(path.read_text())
    grades = [grade(extract(o, kind), r["label"], kind) for r in rows for o in r["output"]]
    none = sum(extract(o, kind) is None for r in rows for o in r["output"])
    assert len(grades) == sum(len(r["output"]) for r in rows) > 0
    assert lo <= sum(grades) / len(grades) <= hi
    assert none / len(grades) < 0.01


def test_svamp_chain_with_an_arrow_inside_the_reasoning_grades_right():
    """A real svamp chain uses "-->" mid-reasoning ("Jake = Steven - 11  --> we can rewrite this as
    Steven = Jake + 11"); it used to be read as the answer marker (11); the answer is 28."""
    path = MENTOR / "svamp_3_train.json"
    _need(path)
    (row,) = [r for r in json.loads(path.read_text()) if "-->" in r["chain"] and "Steven = 28" in r["chain"]]
    assert extract(row["chain"], "numeric") == "28"
    assert grade(extract(row["chain"], "numeric"), row["answer"], "numeric") is row["initial_correct"] is True


# ---- Kojima et al.'s answer cleansing (rationales.teacher_grading: zero_shot_cot) -------------
DATE_Q = "Today is 8/20/2020. What is the date?\nAnswer choices: (A) 08/20/2020 (B) 08/21/2020 (C) 01/01/2021 (D) 07/20/2020 (E) 08/19/2020 (F) 09/20/2020."
TRACK_Q = "Alice, Bob and Eve swap balls. What does Eve have?\nAnswer choices: (A) red (B) blue (C) green."


@pytest.mark.parametrize("text, kind, question, pred", [
    (" August 20th, 2020, which would be written 08/20/2020.", "choice", DATE_Q, "A"),  # the "A" of August
    (" (D) 07/20/2020.", "choice", DATE_Q, "D"),
    (" Eve has the (B) blue ball.", "choice", TRACK_Q, "B"),  # E is outside A-C
    (" nothing here", "choice", TRACK_Q, None),
    (" $1,234.5.", "numeric", "", "1234.5"),
    (" 18 apples, then 3 more.", "numeric", "", "18"),  # the first number, not the last
    (" -7.", "numeric", "", "-7"),
    (" twelve", "numeric", "", None),
    (' "Yes." because no', "yesno", "", "yes"),
    (" It depends.", "yesno", "", None),
    (' "l-a-h-y".', "string", "", "l-a-h-y"),  # hyphens stay
    (" y a a n.\n", "string", "", "yaan"),
])
def test_zero_shot_cot_cleansing(text, kind, question, pred):
    from tasks.core.zero_shot_cot import cleanse

    assert cleanse(text, kind, question) == pred


def test_zero_shot_cot_comparison_is_exact_but_numeric():
    from tasks.core.zero_shot_cot import same_answer

    assert same_answer("18.0", "18", "numeric") and not same_answer("18.5", "18", "numeric")
    assert not same_answer("l-a-h-y", "lahy", "string") and same_answer("lahy", "lahy", "string")
    assert not same_answer("Lahy", "lahy", "string")  # case counts, as in the released grading
    assert not same_answer(None, "A", "choice") and same_answer("A", "A", "choice")
    assert not same_answer("x", "3", "numeric")
