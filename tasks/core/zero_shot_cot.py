"""Kojima et al.'s (2022) answer cleansing: how two-stage zero-shot-CoT graded its answer call.

The released teacher files of Fine-tune-CoT and Mentor-KD were flagged correct with this rule
applied to the second call's text ("Therefore, the answer (arabic numerals) is ..."), not with
kpod's reader (`tasks.core.answers`). `rationales.teacher_grading: zero_shot_cot` uses it on a
teacher's answer call, so kpod can grade released data exactly as its authors did. The rule, per
answer type, on the answer call's text:
- choice: every capital letter of the question's choice range, anywhere ("August" gives "A");
- numeric: every number (commas dropped) matching -?digits, an optional point and digits;
- yesno: every word "yes" or "no" after lower-casing and blanking quotes, periods, colons,
  commas and whitespace;
- string: the whole text with quotes, newlines, periods and whitespace removed (hyphens stay).
The first candidate is the answer, less one trailing period; no candidate is no answer. It is
then compared with the gold answer as a string (numbers as numbers), case and all.
"""

from __future__ import annotations

import re

from tasks.core.prompts import choice_letters

_NUMBER = re.compile(r"-?\d+\.?\d*")
_YESNO_BLANKS = re.compile(r"[\"'\n.\s:,]")
_STRING_DROPS = re.compile(r"[\"'\n.\s]")


def cleanse(text: str, answer_type: str, question: str) -> str | None:
    """The answer Kojima et al.'s cleansing reads from an answer call's `text` (None: none)."""
    if answer_type == "choice":
        found = re.findall("|".join(choice_letters(question)), text)
    elif answer_type == "numeric":
        found = _NUMBER.findall(text.replace(",", ""))
    elif answer_type == "yesno":
        found = [w for w in _YESNO_BLANKS.sub(" ", text.lower()).split(" ") if w in ("yes", "no")]
    else:
        found = [_STRING_DROPS.sub("", text)]
    pred = found[0] if found else ""
    pred = pred[:-1] if pred.endswith(".") else pred
    return pred or None


def same_answer(pred: str | None, gold: str, answer_type: str) -> bool:
    """The cleansed answer against gold: equal strings; numbers equal as numbers."""
    if pred is None:
        return False
    if answer_type == "numeric":
        try:
            return float(pred) == float(gold)
        except ValueError:
            return False
    return pred == gold
