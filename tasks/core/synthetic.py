"""The embedded task: seeded multi-step arithmetic word problems with a known keypoint truth.

A problem is a chain: a person starts with `start` items of one kind (the quantity noun), and
each step applies one operation with a small operand, `left op right = result`, the next step
starting from that result. The question tells the story (plus distractor sentences whose
numbers play no part); the answer is the last result.

Because the generator knows the solution, it knows which words of a rationale are keypoints:
the numbers (operands), operators (+ - * / =), results and the quantity noun of the solution.
Everything else a rationale says is filler from the templates below, whose vocabulary is kept
disjoint from the keypoint vocabulary by construction (checked at import), so the weighting
module can be scored against this truth (AUROC).

`render_rationale` is what the scripted teacher calls: one sentence per step, each stating the
step's operands, operator and result, with varied filler, then "Therefore, the answer is N.".
With `error=True` one step's arithmetic is wrong and the error propagates to the final answer.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence


from tasks.config.dataset import SyntheticConfig

SPLITS = ("train", "val", "test")
META_KIND = "synthetic_arithmetic"
META_VERSION = 1


# ---- vocabulary ---------------------------------------------------------------------------
NAMES: tuple[tuple[str, str], ...] = (
    ("Maria", "she"), ("Tom", "he"), ("Aisha", "she"), ("Ben", "he"), ("Lena", "she"),
    ("Omar", "he"), ("Sofia", "she"), ("Ravi", "he"), ("Julia", "she"), ("Kenji", "he"),
    ("Nora", "she"), ("Diego", "he"), ("Emma", "she"), ("Liam", "he"), ("Chloe", "she"),
    ("Mateo", "he"),
)
NOUNS: tuple[str, ...] = (
    "apples", "marbles", "stickers", "pencils", "cookies", "coins", "books", "shells",
    "cards", "balloons", "stamps", "oranges", "candies", "beads", "flowers", "crayons",
)
OBJ = {"she": "her", "he": "him"}
POS = {"she": "her", "he": "his"}
OP_SYMBOLS = ("+", "-", "*", "/", "=")
# Spelled-out numbers never appear in rationale filler: they would carry quantities while
# being labelled filler.
NUMBER_WORDS = frozenset(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen twenty thirty forty fifty sixty seventy "
    "eighty ninety hundred thousand million once twice thrice half double triple quarter "
    "single pair dozen".split()
)

# Question sentences ({a}: amount, {b}: operand, {n}: noun, {name}, {P}/{p}: pronoun, {o}: object
# pronoun, {pos}: possessive). Questions are not labelled, so their words are unconstrained.
Q_START = (
    "{name} has {a} {n}.",
    "{name} starts the day with {a} {n}.",
    "There are {a} {n} in {name}'s bag.",
    "{name} owns {a} {n}.",
)
Q_STEP: dict[str, tuple[str, ...]] = {
    "+": (
        "{P} buys {b} more {n}.",
        "{P} finds {b} {n} on the way home.",
        "A friend gives {o} {b} {n}.",
        "Then {p} wins {b} more {n} at a fair.",
    ),
    "-": (
        "{P} gives {b} {n} to a friend.",
        "{P} loses {b} {n}.",
        "Then {p} uses {b} of the {n}.",
        "{P} sells {b} {n} at the market.",
    ),
    "*": (
        "Then the number of {n} {p} has becomes {b} times as large.",
        "{P} trades so that {p} ends up with {b} times as many {n} as before.",
        "A machine multiplies {pos} {n} so that {p} has {b} times as many.",
    ),
    "/": (
        "{P} splits the {n} into {b} equal groups and keeps only one group.",
        "{P} shares the {n} equally among {b} boxes and keeps just one box.",
        "{P} divides {pos} {n} evenly into {b} bags and gives away all bags but one.",
    ),
}
Q_ASK = (
    "How many {n} does {name} have now?",
    "How many {n} does {name} have at the end?",
    "In the end, how many {n} does {name} have?",
)
Q_DISTRACTOR = (
    "{other} has {d} {n2}.",
    "{name}'s neighbour is {d} years old.",
    "{other} keeps {d} {n2} in a drawer.",
    "The shop nearby sells {n2} for {d} dollars each.",
)

# Rationale sentences: every template holds `{eq}` ("a op b = r") once; other placeholders are
# {a} {b} {n} {name} {p} and {so} (a filler connective). All literal words here are filler.
R_STEP: dict[str, tuple[str, ...]] = {
    "+": (
        "we add the {a} {n} and {b} {n}, {so} {p} now has {eq} {n}",
        "{p} gets {b} more {n}, {so} {p} has {eq} {n}",
        "{name} has {a} {n} and gains {b} more, {so} that makes {eq} {n}",
        "adding {b} {n} to the {a} {n} gives us {eq} {n}",
        "we know that {p} had {a} {n} and got {b} more, {so} the total is {eq} {n}",
    ),
    "-": (
        "{p} gives away {b} of the {a} {n}, {so} {p} has {eq} {n} left",
        "we subtract {b} {n} from {a} {n}, {so} we get {eq} {n}",
        "taking {b} {n} away from {a} {n} leaves {eq} {n}",
        "{name} had {a} {n} and lost {b}, {so} {p} has {eq} {n} now",
    ),
    "*": (
        "the {a} {n} become {b} times as many, {so} {p} has {eq} {n}",
        "we multiply the {a} {n} by {b}, {so} we get {eq} {n}",
        "having {b} times as many as {a} {n} means {eq} {n}",
    ),
    "/": (
        "we divide the {a} {n} into {b} equal groups, {so} each group has {eq} {n}",
        "{p} keeps a share of {a} {n} split {b} ways, {so} {p} has {eq} {n}",
        "splitting {a} {n} evenly into {b} parts gives {eq} {n} per part",
    ),
}
R_SO = ("so", "so basically", "which means", "and so", "so clearly", "so we know that")
R_LEAD = ("Let's see,", "Okay,", "Basically,", "Well,", "Alright,", "Hmm,")
R_FIRST = ("First,", "To start,", "At the beginning,")
R_MIDDLE = ("Then,", "Next,", "After that,", "Now,")
R_LAST = ("Finally,", "Lastly,", "In the end,")
R_FINAL = "Therefore, the answer is {ans}."
LEAD_PROB = 0.4


# ---- the problem --------------------------------------------------------------------------
@dataclass(frozen=True)
class Step:
    left: int
    op: str
    right: int
    result: int
    quantity: str  # the quantity noun the step's numbers count


@dataclass(frozen=True)
class Problem:
    name: str
    pronoun: str
    noun: str
    start: int
    steps: tuple[Step, ...]
    distractors: tuple[int, ...] = ()  # numbers of the distractor sentences (irrelevant)
    question: str = ""
    question_id: str = ""
    split: str = ""

    @property
    def answer(self) -> int:
        return self.steps[-1].result

    @property
    def n_steps(self) -> int:
        return len(self.steps)

    def meta(self) -> dict:
        return {
            "kind": META_KIND,
            "version": META_VERSION,
            "name": self.name,
            "pronoun": self.pronoun,
            "noun": self.noun,
            "start": self.start,
            "n_steps": self.n_steps,
            "steps": [
                {"left": s.left, "op": s.op, "right": s.right, "result": s.result, "quantity": s.quantity}
                for s in self.steps
            ],
            "answer": self.answer,
            "distractors": list(self.distractors),
        }

    def meta_json(self) -> str:
        return json.dumps(self.meta(), sort_keys=True, separators=(",", ":"))


def apply_op(left: int, op: str, right: int) -> int:
    if op == "+":
        return left + right
    if op == "-":
        return left - right
    if op == "*":
        return left * right
    if op == "/":
        if right == 0 or left % right:
            raise ValueError(f"{left} / {right} is not an exact integer division")
        return left // right
    raise ValueError(f"unknown operator {op!r}")


def problem_from_meta(meta_json: str, *, question: str = "", question_id: str = "", split: str = "") -> Problem:
    """Rebuild a `Problem` from the `meta` JSON of a synthetic question (the teacher's input)."""
    try:
        m = json.loads(meta_json)
        if m.get("kind") != META_KIND:
            raise ValueError(f"meta kind is {m.get('kind')!r}, not {META_KIND!r}")
        steps = tuple(
            Step(int(s["left"]), str(s["op"]), int(s["right"]), int(s["result"]), str(s["quantity"]))
            for s in m["steps"]
        )
        return Problem(
            name=m["name"], pronoun=m["pronoun"], noun=m["noun"], start=int(m["start"]),
            steps=steps, distractors=tuple(int(d) for d in m.get("distractors", ())),
            question=question, question_id=question_id, split=split,
        )
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"not a synthetic problem's meta: {exc}") from None


# ---- generation ---------------------------------------------------------------------------
def _legal_steps(value: int, cfg: SyntheticConfig) -> dict[str, list[int]]:
    """Operands each allowed op can take from `value` while results stay in 2..max_value.

    Results never drop to 0 or 1: a chain would stall there (x * 1, 1 / d) and "1 apples" reads
    badly.
    """
    out: dict[str, list[int]] = {}
    if "+" in cfg.ops:
        out["+"] = list(range(2, min(cfg.max_operand, cfg.max_value - value) + 1))
    if "-" in cfg.ops:
        out["-"] = list(range(2, min(cfg.max_operand, value - 2) + 1))
    if "*" in cfg.ops:
        out["*"] = list(range(2, min(cfg.max_factor, cfg.max_value // max(value, 1)) + 1))
    if "/" in cfg.ops:
        out["/"] = [d for d in range(2, cfg.max_factor + 1) if value % d == 0 and value // d >= 2]
    return {op: operands for op, operands in out.items() if operands}


def _chain(rng: random.Random, cfg: SyntheticConfig, noun: str) -> tuple[int, tuple[Step, ...]]:
    n_steps = rng.randint(cfg.min_steps, cfg.max_steps)
    for _ in range(1000):
        value = start = rng.randint(2, cfg.max_operand)
        steps: list[Step] = []
        for _k in range(n_steps):
            legal = _legal_steps(value, cfg)
            if not legal:
                break
            op = rng.choice(sorted(legal))
            right = rng.choice(legal[op])
            result = apply_op(value, op, right)
            steps.append(Step(value, op, right, result, noun))
            value = result
        if len(steps) == n_steps:
            return start, tuple(steps)
    raise ValueError(f"cannot build a {n_steps}-step chain with {cfg.ops} within 2..{cfg.max_value}")


def _fmt(template: str, **kw: object) -> str:
    text = template.format(**kw)
    return text[0].upper() + text[1:]


def _question(rng: random.Random, cfg: SyntheticConfig, name: str, pronoun: str, noun: str,
              start: int, steps: tuple[Step, ...]) -> tuple[str, tuple[int, ...]]:
    who = dict(name=name, n=noun, P=pronoun.capitalize(), p=pronoun, o=OBJ[pronoun], pos=POS[pronoun])
    story = [_fmt(rng.choice(Q_START), a=start, **who)]
    story += [_fmt(rng.choice(Q_STEP[s.op]), b=s.right, **who) for s in steps]
    out: list[str] = []
    distractors: list[int] = []
    others = [n for n, _ in NAMES if n != name]
    nouns2 = [x for x in NOUNS if x != noun]
    for sentence in story:
        out.append(sentence)
        if len(distractors) < cfg.max_distractors and rng.random() < cfg.distractor_prob:
            d = rng.randint(2, cfg.max_operand)
            out.append(_fmt(rng.choice(Q_DISTRACTOR), other=rng.choice(others), n2=rng.choice(nouns2), d=d, **who))
            distractors.append(d)
    out.append(_fmt(rng.choice(Q_ASK), **who))
    return " ".join(out), tuple(distractors)


def _split_rng(seed: int, split: str) -> random.Random:
    # A string seed is hashed with sha512 by `random`, so streams are stable across processes.
    return random.Random(f"kpod-synthetic:{seed}:{split}")


def generate(cfg: SyntheticConfig, split_sizes: Mapping[str, int] | None = None) -> list[Problem]:
    """Problems for each split, deterministic per `cfg.seed`; ids `syn-<split>-<i>`.

    Each split draws from its own seeded stream, test first, then val, then train, and a
    question text already drawn for an earlier split is redrawn, so no test question leaks into
    training and the test set does not change when `n_train` does.
    `split_sizes` defaults to the config's n_train / n_val / n_test. `iter_problems` yields
    the same problems one at a time.
    """
    return list(iter_problems(cfg, split_sizes))


def iter_problems(cfg: SyntheticConfig, split_sizes: Mapping[str, int] | None = None) -> Iterator[Problem]:
    """`generate`'s problems in its order (train, val, test), made as they are consumed.

    Only val and test (drawn first, emitted last) are held, and a 16-byte digest of every text
    drawn (to redraw repeats): a million train questions cost ~80 MB of digests, not their
    texts. A digest collision (p ~ 1e-27 at 10^6 texts) would redraw one distinct question.
    """
    sizes = dict(split_sizes) if split_sizes is not None else {
        "train": cfg.n_train, "val": cfg.n_val, "test": cfg.n_test}
    unknown = set(sizes) - set(SPLITS)
    if unknown:
        raise ValueError(f"unknown split(s) {sorted(unknown)}; expected {SPLITS}")
    seen: set[bytes] = set()
    held = {split: list(_draw(cfg, split, sizes.get(split, 0), seen)) for split in ("test", "val")}
    yield from _draw(cfg, "train", sizes.get("train", 0), seen)
    for split in ("val", "test"):
        yield from held[split]


def _draw(cfg: SyntheticConfig, split: str, n: int, seen: set[bytes]) -> Iterator[Problem]:
    """`n` problems of one split from its seeded stream, skipping texts in `seen` (then added)."""
    rng = _split_rng(cfg.seed, split)
    made = misses = 0
    while made < n:
        name, pronoun = rng.choice(NAMES)
        noun = rng.choice(NOUNS)
        start, steps = _chain(rng, cfg, noun)
        question, distractors = _question(rng, cfg, name, pronoun, noun, start, steps)
        digest = hashlib.blake2b(question.encode(), digest_size=16).digest()
        if digest in seen:
            misses += 1
            if misses > 100 * (made + 10):
                raise ValueError(f"this synthetic config cannot produce {n} distinct {split} questions")
            continue
        seen.add(digest)
        yield Problem(name, pronoun, noun, start, steps, distractors, question, f"syn-{split}-{made}", split)
        made += 1


# ---- rationales ---------------------------------------------------------------------------
def _wrong_chain(problem: Problem, rng: random.Random) -> tuple[Step, ...]:
    """The solution with one step's arithmetic wrong, propagated so the final answer is wrong.

    Later steps compute correctly from the wrong value; a (step, delta) is kept only if every
    later division stays exact, values stay >= 0, and the final answer differs. The last step
    always admits one, so this never fails.
    """
    steps = problem.steps
    order = list(range(len(steps)))
    rng.shuffle(order)
    order.sort(key=lambda k: k == len(steps) - 1)  # prefer an inner step when one works
    for k in order:
        lcm = 1
        for s in steps[k + 1:]:
            if s.op == "/":
                lcm *= s.right
        deltas = [1, -1, 2, -2, 3, -3, lcm, -lcm, 2 * lcm, -2 * lcm]
        rng.shuffle(deltas)
        for delta in deltas:
            wrong = steps[k].result + delta
            if wrong < 0 or delta == 0:
                continue
            out = list(steps[:k]) + [Step(steps[k].left, steps[k].op, steps[k].right, wrong, steps[k].quantity)]
            try:
                for s in steps[k + 1:]:
                    left = out[-1].result
                    res = apply_op(left, s.op, s.right)
                    if res < 0:
                        raise ValueError("negative")
                    out.append(Step(left, s.op, s.right, res, s.quantity))
            except ValueError:
                continue
            if out[-1].result != problem.answer:
                return tuple(out)
    raise AssertionError("unreachable: the last step always admits a wrong result")


def render_rationale(problem: Problem, rng: random.Random, error: bool = False) -> str:
    """A varied natural-language rationale: one sentence per step, then the answer sentence.

    Each step sentence states its operands, operator and result ("... 5 + 3 = 8 apples.");
    filler (lead-ins, connectives, ordinals) varies with `rng`. `error=True`: one step is
    miscalculated and the final answer follows from it (so it is wrong).
    """
    steps = _wrong_chain(problem, rng) if error else problem.steps
    sentences = []
    for k, s in enumerate(steps):
        if k == 0:
            conn = rng.choice(R_FIRST)
        elif k == len(steps) - 1:
            conn = rng.choice(R_LAST)
        else:
            conn = rng.choice(R_MIDDLE)
        body = rng.choice(R_STEP[s.op]).format(
            a=s.left, b=s.right, n=s.quantity, name=problem.name, p=problem.pronoun,
            so=rng.choice(R_SO), eq=f"{s.left} {s.op} {s.right} = {s.result}",
        )
        head = f"{conn} " if rng.random() >= LEAD_PROB else f"{rng.choice(R_LEAD)} {conn[0].lower()}{conn[1:]} "
        sentences.append(f"{head}{body}.")
    sentences.append(R_FINAL.format(ans=steps[-1].result))
    return " ".join(sentences)


# ---- keypoint truth -----------------------------------------------------------------------
_KIND_RANK = {"result": 0, "number": 1, "operator": 2, "quantity": 3}


def keypoint_terms(problem: Problem) -> list[tuple[str, str]]:
    """Every keypoint term of the solution as (term, kind), kind in number|operator|result|quantity.

    One row per distinct term; a number that is some step's result is a `result` (the left
    operand of step k+1 is the result of step k). "=" counts as an operator.
    """
    kinds: dict[str, str] = {}

    def add(term: str, kind: str) -> None:
        if term not in kinds or _KIND_RANK[kind] < _KIND_RANK[kinds[term]]:
            kinds[term] = kind

    add(str(problem.start), "number")
    for s in problem.steps:
        add(str(s.left), "number")
        add(str(s.right), "number")
        add(s.op, "operator")
        add(str(s.result), "result")
        add(s.quantity, "quantity")
    add("=", "operator")
    return sorted(kinds.items(), key=lambda tk: (_KIND_RANK[tk[1]], tk[0]))


# numbers (with decimals), operator symbols, words (letters, inner apostrophes); the rest is
# punctuation and whitespace, which are no words at all.
_WORD = re.compile(r"\d+(?:\.\d+)?|[+\-*/=]|[^\W\d_]+(?:'[^\W\d_]+)*")


def label_words(text: str, terms: set[str]) -> list[tuple[int, int, str, bool]]:
    """Split `text` into words (char_start, char_end, word, is_keypoint); keypoint = word in terms.

    Case-insensitive. `text[start:end] == word` for every word.
    """
    lowered = {t.lower() for t in terms}
    return [(m.start(), m.end(), m.group(), m.group().lower() in lowered) for m in _WORD.finditer(text)]


# Role of every rationale word (METHODS §2.5: the keypoint truth alone mislabels): `core` words
# decide the answer (numbers, operators, "=", results, and the template words that name the
# operation), `context` words name what is counted and by whom (quantity nouns, names,
# pronouns), `filler` is everything else (hedges, connectives, discourse words).
ROLES = ("core", "context", "filler")
OPERATION_WORDS = frozenset({
    "add", "adding", "gets", "got", "gains", "more",                      # +
    "away", "subtract", "taking", "lost", "leaves", "left",                # -  ("gives away")
    "multiply", "times",                                                   # *
    "divide", "split", "splitting", "ways", "share", "equal", "groups", "evenly", "parts",  # /
})
_CORE_KINDS = {"number", "operator", "result"}


def word_roles(text: str, kinds: dict[str, str]) -> list[tuple[int, int, str, bool, str]]:
    """Every word of a rationale as (char_start, char_end, word, is_keypoint, role).

    kinds: the question's keypoint terms -> kind (number | operator | result | quantity), as
    `keypoint_terms` gives them. is_keypoint is the old truth (word is a term); role is core,
    context or filler (ROLES). Any number or operator symbol is core; "gives" is core only in
    "gives away".
    """
    lowered = {t.lower(): k for t, k in kinds.items()}
    people = {n.lower() for n, _ in NAMES} | {p for _, p in NAMES} | set(OBJ.values()) | set(POS.values())
    words = label_words(text, set(kinds))
    out = []
    for i, (s, e, w, key) in enumerate(words):
        lw, nxt = w.lower(), words[i + 1][2].lower() if i + 1 < len(words) else ""
        if (lowered.get(lw) in _CORE_KINDS or w[0].isdigit() or w in OP_SYMBOLS or lw in OPERATION_WORDS
                or (lw == "gives" and nxt == "away")):
            role = "core"
        elif lowered.get(lw) == "quantity" or lw in people or lw.removesuffix("'s") in people:
            role = "context"
        else:
            role = "filler"
        out.append((s, e, w, key, role))
    return out


def token_roles(offsets: Sequence[tuple[int, int]], words: Sequence[tuple[int, int, str]]) -> list[str | None]:
    """Role per token (char span) from word roles (char_start, char_end, role): the strongest
    role of the words it overlaps (core > context > filler, ROLES' order), None if none."""
    out: list[str | None] = []
    for s, e in offsets:
        hit = [r for ws, we, r in words if min(e, we) > max(s, ws)]
        out.append(min(hit, key=ROLES.index) if hit else None)
    return out


def filler_vocabulary() -> set[str]:
    """Every literal word the rationale templates can emit (lower-cased), placeholders removed."""
    texts = [t for ts in R_STEP.values() for t in ts]
    texts += list(R_SO + R_LEAD + R_FIRST + R_MIDDLE + R_LAST) + [R_FINAL]
    words: set[str] = set()
    for t in texts:
        bare = re.sub(r"\{[^}]*\}", " ", t)
        words |= {w.lower() for _, _, w, _ in label_words(bare, set())}
    words |= {p for _, p in NAMES} | {n.lower() for n, _ in NAMES}  # pronouns and names
    return words


def _check_vocabulary() -> None:
    clash = filler_vocabulary() & (set(NOUNS) | NUMBER_WORDS | set(OP_SYMBOLS))
    if clash:
        raise AssertionError(f"filler words clash with keypoint vocabulary: {sorted(clash)}")


_check_vocabulary()
