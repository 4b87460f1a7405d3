"""Answer extraction and grading: one module for filtering teacher rationales AND scoring the student.

Four answer types (METHODS.md §0); `ANSWER_FORMS` below is the one table of what each accepts,
where it is read from and how it compares (README.md, Configuration, repeats it in words).

Every type looks after the answer phrases first, the last phrase first: numeric, yesno and string
read its answer segment (the text after it up to the end of its sentence or line), choice the
letter right after it. The answer phrases are the
student format's "Therefore, the answer is X", a plain "The answer is X", and Fine-tune-CoT's
"--> X"; the arrow counts only as the last arrow of the text with nothing after it but the answer
(no further sentence, no '=' equation), so an arrow used inside the reasoning ("--> $10-$3=$7
remaining") is no marker. Free-form teacher text (real chat-API output) also says "the correct
choice is (F)" or "we get "yajc"", so each type has a fallback for text without a phrase.
`answer_phrases(text)` exposes the phrase matches so the rationales stage can cut the final answer
sentence off a rationale with the same rule the extractor uses to find it.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import NamedTuple


class AnswerForm(NamedTuple):
    accepts: str  # what counts as an answer of the type
    read_from: str  # where `extract` looks for it
    equal_when: str  # how `grade` compares it with the gold answer


# The one table of what each answer type accepts; README.md (Configuration) says the same in words.
ANSWER_FORMS: dict[str, AnswerForm] = {
    "numeric": AnswerForm(
        "integers and decimals ('$1,234.50', '-3', '.5'); fractions and mixed numbers ('1/2', "
        "'-3/4', '1 1/2', never a date such as 03/04/1973); number words opening the answer "
        "segment ('twelve', 'twenty-one', 'three hundred')",
        "the first number of the answer segment, after its last '=' ('6 / 3 = 2' gives 2); "
        "without one, the last number of the text (digits only)",
        "as numbers, |a - b| < 1e-6: '18.0' equals '18', '1/2' equals '0.5'",
    ),
    "choice": AnswerForm(
        "a letter A-F: '(B)', 'B', '(c)', '[d]'",
        "the letter right after an answer phrase or 'the correct choice/option is'; else the "
        "last parenthesised letter; else a completion that is just a letter or opens with one",
        "the upper-case letter",
    ),
    "yesno": AnswerForm(
        "yes/no and true/false, read as 'yes' / 'no'; an answer segment that says the answer "
        "is undetermined ('it depends', 'unknown', 'cannot be determined', 'not enough "
        "information', 'yes or no') gives no answer",
        "the first yes/no word of the answer segment; when no segment holds a yes/no word or "
        "an undetermined answer, the last yes/no word of the text",
        "the normalised word",
    ),
    "string": AnswerForm(
        "any text, with quotes and surrounding punctuation dropped",
        "the quoted text, or the text after '=', of the answer segment (phrases: the answer "
        "is, the final result is); else the last line's quote, text after ':' or '=', or last word",
        "case-insensitively with inner whitespace dropped ('y a a n' equals 'yaan'); letters "
        "spelled out with hyphens join ('t-o-a-a' equals 'toaa')",
    ),
}
ANSWER_TYPES = tuple(ANSWER_FORMS)

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
# then a mixed number "1 1/2", a fraction "3/4", digits with an optional decimal part, or a bare
# decimal ".5". A fraction is written without spaces and touches no further '/' or digit, so a
# date "03/04/1973" stays three numbers and "6 / 3 = 2" stays an operation.
_FRACTION = r"(?<![\d/.])\d+/\d+(?![\d/]|\.\d)"
_NUMBER = re.compile(
    rf"(?:(?<![\w)\]])-)?(?:\d+ {_FRACTION}|{_FRACTION}|\d+(?:\.\d+)?|\.\d+)"
)
# A fraction as a whole string: sign, optional whole part, fraction (spaces allowed around '/'
# in gold answers such as "1 / 2").
_FRACTION_STRING = re.compile(r"^(-?)(?:(\d+)\s+)?(\d+)\s*/\s*(\d+)$")
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
# An answer segment that says there is no yes/no answer. Listed before the yes/no word so that at
# one position "no definitive answer" and "yes or no" win over the bare "no" / "yes".
_UNDETERMINED = (
    r"it\s+depends|depends\s+on|unknown|unclear|uncertain|undetermined|indeterminate|inconclusive"
    r"|unanswerable|(?:can\s*not|can't|cannot|impossible\s+to|not\s+possible\s+to)\s+(?:be\s+)?"
    r"(?:determined?|known?|said|say|tell|told|answered?|decided?)"
    r"|not\s+(?:enough|sufficient)\s+(?:information|info|data|evidence|context)"
    r"|insufficient\s+(?:information|info|data|evidence|context)|not\s+(?:sure|certain|clear)"
    r"|no\s+(?:definitive|definite|clear|certain|simple|straightforward)\b"
    r"|neither|yes\s+or\s+no|no\s+or\s+yes|true\s+or\s+false|maybe"
)
_YESNO_OR_UNDETERMINED = re.compile(
    rf"(?<![\w])(?:{_UNDETERMINED}|(yes|no|true|false))(?![\w])", re.IGNORECASE
)

# Single quotes only count at word edges, so the apostrophe of "let's" opens no quote.
_QUOTED = re.compile(r"\"([^\"\n]+)\"|“([^”\n]+)”|(?<!\w)'([^'\n]+)'(?!\w)")
_STRIP_CHARS = " \t\r\n\"'“”‘’`*.,;:!?()[]"


_ARROW = re.compile(r"(?<!-)-->")
# Fine-tune-CoT closes its answer with "END", on the same line or the next.
_END_TRAILER = re.compile(r"\s*\bEND\s*$")


def _is_answer_arrow(text: str, m: re.Match[str]) -> bool:
    """Whether an "-->" match is Fine-tune-CoT's answer marker: the last arrow of the text, with
    nothing after it but the answer. Teachers also use arrows inside their reasoning ("--> $10-$3=$7
    remaining ... left with $5"), where the number after the arrow is not the answer."""
    if not m.group().endswith("-->"):
        return True  # an "answer is" phrase, not an arrow
    if any(a.start() > m.start() for a in _ARROW.finditer(text)):
        return False
    rest = _END_TRAILER.sub("", text[m.end() :]).strip()
    return "=" not in rest and not re.search(r"\n|[.!?]\s", rest)


def answer_phrases(text: str, answer_type: str = "numeric") -> list[re.Match[str]]:
    """Every answer-phrase match in `text`, in order ('choice is' for choice, 'result is' for string).

    An "-->" is only a phrase where it is Fine-tune-CoT's final answer marker (`_is_answer_arrow`).
    """
    matches = [m for m in _PHRASE.finditer(text) if _is_answer_arrow(text, m)]
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


def _fraction_value(raw: str) -> str | None:
    """'-1 1/2' -> '-1.5' as a decimal string; None when `raw` is no fraction or divides by zero.

    Computed in floats as the dataset loader does ("1/3" -> repr(1/3)), so an extracted fraction
    and a gold one loaded from the same text have the same canonical string."""
    m = _FRACTION_STRING.match(raw)
    if m is None or int(m.group(4)) == 0:
        return None
    sign, whole, num, den = m.groups()
    value = int(whole or 0) + int(num) / int(den)
    return repr(-value if sign else value)


def _canonical_number(raw: str) -> str | None:
    """'18.0' -> '18', '-0.50' -> '-0.5', '.5' -> '0.5', '1 1/2' -> '1.5'; None when not a number."""
    raw = raw.strip().rstrip(".")
    raw = _fraction_value(raw) or raw
    try:
        d = Decimal(raw)
    except InvalidOperation:
        return None
    if not d.is_finite():
        return None
    if d == d.to_integral_value():
        return str(int(d))
    return format(d.normalize(), "f")


def _numbers(text: str) -> list[str]:
    """The numbers of `text` in order. A "mixed number" whose fraction is not proper ("5 12/4")
    is two numbers: only "3 1/2"-like pairs are read as one."""
    out = []
    for tok in _NUMBER.findall(text):
        whole, _, frac = tok.partition(" ")
        if frac and int(frac.split("/")[0]) >= int(frac.split("/")[1]):
            out += [whole, frac]
        else:
            out.append(tok)
    return out


_UNITS = {
    w: i
    for i, w in enumerate(
        ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
         "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
         "nineteen"]
    )
}
_TENS = {
    w: 10 * i
    for i, w in enumerate(["twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"], 2)
}
_SCALES = {"hundred": 100, "thousand": 1000}
_WORD_HEAD = re.compile(r"[\s\"'`*:]*([a-z]+(?:[\s-]+[a-z]+)*)", re.IGNORECASE)


def _number_words(segment: str) -> str | None:
    """The value of number words opening an answer segment ("twelve", "twenty-one", "two hundred
    and five") as a digit string; None when the segment does not open with one. Only the opening
    counts: in "the answer is that one of them has 5" the "one" is no answer."""
    head = _WORD_HEAD.match(segment)
    if head is None:
        return None
    total, current, seen, prev = 0, 0, False, ""
    for word in re.split(r"[\s-]+", head.group(1).lower()):
        if word in _UNITS and prev not in _UNITS and not (prev in _TENS and _UNITS[word] >= 10):
            current += _UNITS[word]
        elif word in _TENS and prev not in _UNITS and prev not in _TENS:
            current += _TENS[word]
        elif word == "and" and prev in _SCALES:
            pass  # "two hundred and five"
        elif word in _SCALES and prev in {**_UNITS, **_TENS, "hundred": 1}:
            if word == "thousand":
                total, current = (total + current) * 1000, 0
            else:
                current *= 100
        else:
            break
        seen, prev = True, word
    return str(total + current) if seen else None


def _answer_segment(text: str, phrase: re.Match[str]) -> str:
    """The phrase's own sentence/line after it: "the answer is below." must not reach into the
    next paragraph."""
    rest = text[phrase.end() :]
    end = re.search(r"\n|\.(?:\s|$)", rest)
    return rest[: end.start()] if end else rest


def _extract_numeric(text: str) -> str | None:
    text = _clean_numeric(text)
    for m in reversed(answer_phrases(text)):
        # In "the answer is 15 * 8 = 120" the result is after '='.
        result = _answer_segment(text, m).rsplit("=", 1)[-1]
        nums = _numbers(result)
        if nums:
            return _canonical_number(nums[0])
        words = _number_words(result)
        if words is not None:
            return words
    nums = _numbers(text)
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
        # The first of a yes/no word or an "undetermined" expression in the answer segment decides:
        # 'the answer is "it depends."' gives None, never a stray "no" from the reasoning before it.
        hit = _YESNO_OR_UNDETERMINED.search(_answer_segment(text, m))
        if hit:
            return _YESNO_MAP[hit.group(1).lower()] if hit.group(1) else None
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
