"""Answer extraction and grading: one module for filtering teacher rationales AND scoring the student.

Four answer types (METHODS.md §0):
- `numeric`  gsm8k, svamp, asdiv, synthetic arithmetic. Thousands commas and `$` are dropped; the
  answer is the first number after the last answer phrase, else the last number in the text;
  numbers compare with |a - b| < 1e-6, so "18.0" equals "18".
- `choice`   multiple choice (A-F): a letter with or without parentheses, "(B)", "B", "(c)".
- `yesno`    yes/no or true/false, normalised to "yes" / "no".
- `string`   last_letter_concatenation and the like: compared case-insensitively with quotes,
  surrounding punctuation and inner whitespace removed ("y a a n" equals "yaan").

The answer phrases are the student format's "Therefore, the answer is X", a plain "The answer is
X", and Fine-tune-CoT's "--> X". Free-form teacher text (real chat-API output) also says "the
correct choice is (F)" or "we get "yajc"", so each type has a fallback for text without a phrase.
`answer_phrases(text)` exposes the phrase matches so the rationales stage can cut the final answer
sentence off a rationale with the same rule the extractor uses to find it.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

ANSWER_TYPES = ("numeric", "choice", "yesno", "string")

# "Therefore, the answer is", "The final answer is:", "answer: ", "--> ". Case-insensitive.
# "answer" must start a word ("reanswer is" is no phrase); "-->" must not be the tail of "--->".
_PHRASE = re.compile(
    r"(?:(?<![\w])(?:the\s+)?(?:final\s+|correct\s+|right\s+)?answer(?:\s+choice)?"
    r"(?:\s+(?:is|would\s+be|will\s+be|should\s+be)|\s*:|\s*=)|(?<!-)-->)",
    re.IGNORECASE,
)
# Free strings also come as "the final result is "berl"".
_STRING_PHRASE = re.compile(r"(?<![\w])(?:the\s+)?(?:final\s+)?result\s+is", re.IGNORECASE)
# Multiple choice also names the letter with "the correct choice is (F)", "the best option is C".
_CHOICE_PHRASE = re.compile(
    r"(?<![\w])(?:choice|option)(?:\s+(?:is|would\s+be|will\s+be|should\s+be)|\s*:)",
    re.IGNORECASE,
)

# A number: optional sign (a '-' glued to a previous word or digit is an operator, not a sign),
# digits with an optional decimal part, or a bare decimal ".5".
_NUMBER = re.compile(r"(?:(?<![\w)\]])-)?(?:\d+(?:\.\d+)?|\.\d+)")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")

_LETTER_AFTER = re.compile(  # used with .match(text, pos): anchored at pos
    r"[\s:*\"'`]*(?:(?:option|choice|letter)\s+)?(?:\(\s*([A-Fa-f])\s*\)|\[([A-Fa-f])\]|([A-F])(?![\w/']))"
)
_PAREN_LETTER = re.compile(r"\(([A-F])\)")
_BARE_LETTER = re.compile(r"^[\s(\[\"']*([A-Fa-f])[\s)\]\"'.:,]*$")
# A completion that opens with the letter: "A: Rodrigo.", "(C) 08/03/1996.", "B. blue ball"
_LEADING_LETTER = re.compile(r"^\s*(?:\(([A-Fa-f])\)|([A-F])[:.)](?:\s|$))")

_YESNO = re.compile(r"(?<![\w])(yes|no|true|false)(?![\w])", re.IGNORECASE)
_YESNO_MAP = {"yes": "yes", "true": "yes", "no": "no", "false": "no"}

# Single quotes only count at word edges, so the apostrophe of "let's" opens no quote.
_QUOTED = re.compile(r"\"([^\"\n]+)\"|“([^”\n]+)”|(?<!\w)'([^'\n]+)'(?!\w)")
_STRIP_CHARS = " \t\r\n\"'“”‘’`*.,;:!?()[]"


def answer_phrases(text: str, answer_type: str = "numeric") -> list[re.Match[str]]:
    """Every answer-phrase match in `text`, in order ('choice is' for choice, 'result is' for string)."""
    matches = list(_PHRASE.finditer(text))
    extra = {"choice": _CHOICE_PHRASE, "string": _STRING_PHRASE}.get(answer_type)
    if extra is not None:
        matches += list(extra.finditer(text))
        matches.sort(key=lambda m: m.start())
    return matches


def _check_type(answer_type: str) -> None:
    if answer_type not in ANSWER_TYPES:
        raise ValueError(f"unknown answer_type {answer_type!r}; expected one of {ANSWER_TYPES}")


# ---- numbers ------------------------------------------------------------------------------
def _clean_numeric(text: str) -> str:
    return _THOUSANDS.sub("", text).replace("$", "")


def _canonical_number(raw: str) -> str | None:
    """'18.0' -> '18', '-0.50' -> '-0.5', '.5' -> '0.5'; None when not a number."""
    raw = raw.strip().rstrip(".")
    try:
        d = Decimal(raw)
    except InvalidOperation:
        return None
    if not d.is_finite():
        return None
    if d == d.to_integral_value():
        return str(int(d))
    return format(d.normalize(), "f")


def _extract_numeric(text: str) -> str | None:
    text = _clean_numeric(text)
    for m in reversed(answer_phrases(text)):
        # Only the phrase's own sentence/line counts ("the answer is below." must not reach
        # into the next paragraph); in "the answer is 15 * 8 = 120" the result is after '='.
        end = re.search(r"\n|\.(?:\s|$)", text[m.end() :])
        sentence = text[m.end() : m.end() + end.start()] if end else text[m.end() :]
        num = _NUMBER.search(sentence.rsplit("=", 1)[-1])
        if num is not None:
            return _canonical_number(num.group())
    nums = _NUMBER.findall(text)
    return _canonical_number(nums[-1]) if nums else None


# ---- multiple choice ----------------------------------------------------------------------
def _extract_choice(text: str) -> str | None:
    for m in reversed(answer_phrases(text, "choice")):
        hit = _LETTER_AFTER.match(text, m.end())
        if hit:
            return next(g for g in hit.groups() if g).upper()
    parens = _PAREN_LETTER.findall(text)
    if parens:
        return parens[-1]
    bare = _BARE_LETTER.match(text)  # a whole completion that is just "B." or " (c)"
    if bare:
        return bare.group(1).upper()
    lead = _LEADING_LETTER.match(text)
    return next(g for g in lead.groups() if g).upper() if lead else None


# ---- yes / no -----------------------------------------------------------------------------
def _extract_yesno(text: str) -> str | None:
    for m in reversed(answer_phrases(text)):
        hit = _YESNO.search(text, m.end())
        if hit and not re.search(r"\n|\.\s", text[m.end() : hit.start()]):
            return _YESNO_MAP[hit.group(1).lower()]
    hits = _YESNO.findall(text)
    return _YESNO_MAP[hits[-1].lower()] if hits else None


# ---- free string --------------------------------------------------------------------------
def _clean_string(s: str) -> str:
    return " ".join(s.strip(_STRIP_CHARS).split())


def _first_sentence(s: str) -> str:
    s = s.split("\n", 1)[0]
    cut = re.search(r"\.(\s|$)", s)
    return s[: cut.start()] if cut else s


def _after_equals(s: str) -> str:
    """'n + d + o + a = ndoa' -> 'ndoa'."""
    return s.rsplit("=", 1)[1] if "=" in s else s


def _extract_string(text: str) -> str | None:
    phrases = answer_phrases(text, "string")
    if phrases:
        rest = _first_sentence(text[phrases[-1].end() :])
        quoted = _QUOTED.search(rest)
        ans = _clean_string(next(g for g in quoted.groups() if g) if quoted else _after_equals(rest))
        if ans:
            return ans
    lines = [ln for ln in text.splitlines() if ln.strip()]
    # Chat models close with "Let me know if you need anything else!": not the answer line.
    while len(lines) > 1 and lines[-1].rstrip().endswith(("!", "?")):
        lines.pop()
    if not lines:
        return None
    last = lines[-1]
    quoted = _QUOTED.findall(last)
    if quoted:
        return _clean_string(next(g for g in quoted[-1] if g)) or None
    if ":" in last or "=" in last:
        return _clean_string(_after_equals(last.rsplit(":", 1)[-1])) or None
    words = last.split()
    return _clean_string(words[-1]) or None


def _string_key(s: str) -> str:
    """What string answers compare on: casefolded, no whitespace (zero-shot-CoT's cleansing for
    last letters), and letters spelled out with hyphens joined ("t-o-a-a" -> "toaa")."""
    s = "".join(_clean_string(s).split()).casefold()
    return s.replace("-", "") if _SPELLED.fullmatch(s) else s


_SPELLED = re.compile(r"\w(?:-\w)+")


_EXTRACTORS = {
    "numeric": _extract_numeric,
    "choice": _extract_choice,
    "yesno": _extract_yesno,
    "string": _extract_string,
}


def extract(text: str, answer_type: str) -> str | None:
    """The answer a completion gives, normalised for its type; None when none is found."""
    _check_type(answer_type)
    if text is None:
        return None
    return _EXTRACTORS[answer_type](text)


def normalize_gold(answer: str, answer_type: str) -> str:
    """A gold answer in the form `extract` returns: '$1,000.0' -> '1000', '(B)' -> 'B', 'True' -> 'yes'.

    Raises ValueError (naming the value) when the gold answer is not of its type.
    """
    _check_type(answer_type)
    raw = str(answer).strip()
    if answer_type == "numeric":
        s = _clean_numeric(raw).strip().removeprefix("####").strip()
        out = _canonical_number(s)
    elif answer_type == "choice":
        m = _BARE_LETTER.match(raw)
        out = m.group(1).upper() if m else None
    elif answer_type == "yesno":
        out = _YESNO_MAP.get(raw.strip(_STRIP_CHARS).lower())
    else:
        out = _clean_string(raw) or None
    if out is None:
        raise ValueError(f"gold answer {answer!r} is not a valid {answer_type} answer")
    return out


def grade(pred: str | None, gold: str, answer_type: str) -> bool:
    """Whether `pred` (an extracted answer, or None) matches the gold answer."""
    _check_type(answer_type)
    if pred is None:
        return False
    g = normalize_gold(gold, answer_type)
    if answer_type == "numeric":
        p = _canonical_number(_clean_numeric(str(pred)))
        return p is not None and abs(Decimal(p) - Decimal(g)) < Decimal("1e-6")
    if answer_type == "string":
        return _string_key(str(pred)) == _string_key(g)
    try:
        return normalize_gold(pred, answer_type) == g
    except ValueError:
        return False
