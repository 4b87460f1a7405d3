"""Step segmentation of a rationale, and the map from student tokens to steps (METHODS.md §0).

A step ends at a newline, at a period followed by whitespace or the end of the text, and a
"Step k:" marker begins a new one. Periods that do not end a sentence are not boundaries:
- inside a number ("1.50", "110*.3": never followed by whitespace anyway);
- after a list enumerator that opens a line or follows a sentence end ("1. Lucky - y",
  "... 03/04/1973. 3. The correct answer"): the enumerator belongs to the step it numbers, as
  "Step 1:" does;
- after titles and abbreviations that never end a sentence ("Dr.", "Mr.", "Mrs.", "Ms.",
  "Prof.", "e.g.", "i.e.", "vs.", "sq.", "approx."), and after "etc." and unit abbreviations
  ("ft.", "lb.", "oz.", "min.", ...) unless the next word is capitalised ("14 sq. ft. ÷ 7");
- after initials in a run ("J. P. Morgan", "Dr. J. Smith"). A lone capital letter before a period
  is a boundary: in teacher text it ends a sentence far more often than it abbreviates a name
  ("let the cost be X. Then", "the answer is C. Next").
A step that is nothing but a list marker ("3." or "3)" alone on its line) is joined to the step
after it, so the marker opens the step it numbers; that joined step is the one kind that spans
a newline.
Each step is a character span with surrounding whitespace stripped; whitespace-only pieces are
dropped, so the spans plus whitespace gaps reconstruct the text exactly.

Tokens are mapped to steps through a fast tokenizer's offset mapping, never by position:
`token_steps(offsets, spans)`.
"""

from __future__ import annotations

import re
from bisect import bisect_right

_STEP_MARKER = re.compile(r"(?<![\w])Step\s+\d+\s*[:.)]", re.IGNORECASE)
# An enumerator opens a line ("1. ...", any number) or follows a sentence end on the same line
# ("... 1973. 3. The ...": one or two digits, so "in 2019. 2020. Then" keeps its years apart).
_ENUMERATOR = re.compile(r"(?m)(?:^[ \t]*\d+|(?<=[.!?])[ \t]+\d{1,2})\.(?=\s)")
_ABBREVIATION = re.compile(
    r"(?<![\w.])(?:e\.g|i\.e|Mr|Mrs|Ms|Dr|Prof|vs|sq|approx)\.(?=\s)", re.IGNORECASE
)
# These end a sentence when it ends on them ("... and so on, etc. Then"), so they keep their
# period only before a word that is not capitalised.
_MID_ABBREVIATION = re.compile(r"(?<![\w.])(?i:etc|ft|yd|lbs?|oz|hrs?|min|sec)\.(?=[ \t]+[^\sA-Z])")
_LETTER_DOT = re.compile(r"(?<![\w.])[A-Z]\.(?=[ \t])")
_INITIAL_NEXT = re.compile(r"[ \t]+[A-Z]\.(?:\s|$)")  # "J." before "P."
_INITIAL_BEFORE = re.compile(r"(?:(?<![\w.])[A-Z]|(?<![\w.])(?:Mr|Mrs|Ms|Dr|Prof))\.[ \t]+$")
_NAME_NEXT = re.compile(r"[ \t]+[A-Z]")
_LONE_MARKER = re.compile(r"\(?\d{1,2}[.)]")


def _initial_periods(text: str) -> set[int]:
    """Periods of initials in a run: "J." before another initial, or "P." after an initial or a
    title and before a capitalised name ("J. P. Morgan", "Dr. J. Smith")."""
    keep = set()
    for m in _LETTER_DOT.finditer(text):
        if _INITIAL_NEXT.match(text, m.end()) or (
            _INITIAL_BEFORE.search(text, max(0, m.start() - 8), m.start())
            and _NAME_NEXT.match(text, m.end())
        ):
            keep.add(m.end() - 1)
    return keep


def _cuts(text: str) -> list[int]:
    """Sorted positions where one step ends and the next may begin."""
    keep = {m.end() - 1 for m in _ENUMERATOR.finditer(text)}  # periods that are not boundaries
    keep |= {m.end() - 1 for m in _ABBREVIATION.finditer(text)}
    keep |= {m.end() - 1 for m in _MID_ABBREVIATION.finditer(text)}
    keep |= _initial_periods(text)
    cuts = {m.start() for m in _STEP_MARKER.finditer(text)}
    for i, ch in enumerate(text):
        if ch == "\n":
            cuts.add(i)
        elif ch == "." and i not in keep and (i + 1 == len(text) or text[i + 1].isspace()):
            cuts.add(i + 1)
    return sorted(cuts)


def segment(text: str) -> list[tuple[int, int]]:
    """Character spans [start, end) of the steps of `text`, in order, whitespace-stripped.

    >>> segment("Tom has 3.5 apples. He eats 1.\\nStep 2: 2.5 left")
    [(0, 19), (20, 30), (31, 47)]
    """
    spans: list[tuple[int, int]] = []
    start = 0
    for cut in [*_cuts(text), len(text)]:
        piece = text[start:cut]
        lead = len(piece) - len(piece.lstrip())
        body = piece.strip()
        if body:
            s = start + lead
            spans.append((s, s + len(body)))
        start = cut
    return _join_lone_markers(text, spans)


def _join_lone_markers(text: str, spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """A step that is only a list marker ("3." on its own line) becomes the start of the next step,
    so no step ends with a marker that numbers what follows it."""
    out: list[tuple[int, int]] = []
    for s, e in spans:
        if out and _LONE_MARKER.fullmatch(text[out[-1][0] : out[-1][1]]):
            s = out.pop()[0]
        out.append((s, e))
    return out


def token_steps(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """The step index (0-based) of every token, from a fast tokenizer's offset mapping.

    offsets: one (char_start, char_end) per token, relative to the same text as `spans`, as
    `tokenizer(text, return_offsets_mapping=True)["offset_mapping"]` gives them.
    A token belongs to the first step that ends after the token starts, so:
    - a token inside a step gets that step; one straddling a boundary (".\\n") gets the step it
      starts in;
    - a token in the whitespace between two steps goes to the following step;
    - a token after the last step (trailing whitespace) goes to the last step.
    The one exception: a zero-width token at (0, 0) is a special token (BOS, EOS, padding)
    that covers no text, and gets -1. Callers that want it counted assign it themselves.
    Indices are non-decreasing whenever the offsets are (as a tokenizer produces them).
    """
    if not spans:
        if any((s, e) != (0, 0) for s, e in offsets):
            raise ValueError("token_steps: tokens cover text but the text has no steps")
        return [-1] * len(offsets)
    ends = [e for _, e in spans]
    last = len(spans) - 1
    out = []
    for s, e in offsets:
        if s == 0 and e == 0:
            out.append(-1)
        else:
            out.append(min(bisect_right(ends, s), last))
    return out
