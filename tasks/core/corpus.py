"""A generic pretraining corpus for the pretrained miniature (issue 13, DESIGN "The embedded default").

Both papers distil into pretrained students; nothing can be downloaded here, so kpod writes
its own small corpus of the skills a word-problem student needs before it ever sees the task:

- `facts`: arithmetic facts in many phrasings, digits and number words, + - * /;
- `recall`: documents that introduce people, objects and quantities and refer back to them
  sentences later, so that copying a number from far earlier in the text pays off (the skill
  the first lab base lacked: it copied operands from the question worse than a fresh model);
- `story`: single-operation stories whose result is stated in prose;
- `quiz`: generic question-answer text in templates that are not the task's;
- `retell` (opt-in, `pretrain.kinds`): one person's actions, each with a count, among other
  people's, then those actions retold in order: following one person through a text sentence
  by sentence, copying each count and skipping everyone else's (the skill a Std-CoT student
  lacks: its wrong answers on bench-arith reuse or skip a question's quantities; none has a
  wrong sum). No arithmetic and no chain of results, only the order;
- `words` (when the caller gives a vocabulary: the task's training words): those words in
  random order and in neutral frames, so that no token of the task is one the base never saw
  (without them a quarter of bench-arith's target tokens - " so", " more", " does" - never
  occur in the corpus, and the base scores task text at ~10 nats per token; with them ~7).

What it never holds: the task's multi-step chains, its "Q: ... A:" prompt, its answer phrase
("Therefore, the answer is"), or the task generator's sentence templates. `task_ngrams` and
`shared_ngrams` measure that (the `pretrain` stage records it, a test asserts 0 shared 8-grams
with the demo and bench-arith questions and rationales). Names and quantity nouns are the
task's (tasks/core/synthetic.py): knowing the words is the point, their order is not shared.
"""

from __future__ import annotations

import random
import re
from typing import Callable, Iterable, Iterator, Sequence

from tasks.core.synthetic import NAMES, NOUNS, OBJ, POS

KINDS = ("facts", "recall", "story", "quiz")
ALL_KINDS = KINDS + ("retell",)
CONTAINERS = ("basket", "jar", "box", "crate", "tin", "pouch", "shelf", "drawer", "tray", "case")
PLACES = ("the garden", "the library", "the park", "the kitchen", "the station", "the beach", "school")
ASIDES = (
    "The weather was warm and bright.",
    "It rained for a while in the afternoon.",
    "A dog barked somewhere down the street.",
    "The radio played an old song.",
    "Nobody was in a hurry that day.",
    "The clock on the wall ticked slowly.",
    "Lunch was soup and bread.",
    "The bus came a little late.",
    "Someone left a window open.",
    "It was the first Monday of the month.",
)

_ONES = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen nineteen".split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def number_words(n: int) -> str:
    """0 <= n < 1000 in words: 42 -> "forty-two", 305 -> "three hundred five"."""
    if not 0 <= n < 1000:
        raise ValueError(f"number_words covers 0..999, got {n}")
    if n < 20:
        return _ONES[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return _TENS[tens] + (f"-{_ONES[ones]}" if ones else "")
    hundreds, rest = divmod(n, 100)
    return f"{_ONES[hundreds]} hundred" + (f" {number_words(rest)}" if rest else "")


def _num(rng: random.Random, n: int, words_prob: float = 0.3) -> str:
    return number_words(n) if n < 100 and rng.random() < words_prob else str(n)


# ---- one operation ---------------------------------------------------------------------------
def operation(rng: random.Random, max_value: int) -> tuple[int, str, int, int]:
    """(a, op, b, r) with a op b = r exact, every number in 0..max_value."""
    op = rng.choice("+-*/")
    if op == "+":
        a = rng.randint(0, max_value // 2)
        b = rng.randint(0, max_value // 2)
        return a, op, b, a + b
    if op == "-":
        a = rng.randint(1, max_value)
        b = rng.randint(0, a)
        return a, op, b, a - b
    b = rng.randint(2, 12)
    r = rng.randint(0, max(1, max_value // b))
    if op == "*":
        return r, op, b, r * b
    return r * b, op, b, r


FACT_FORMS: dict[str, tuple[str, ...]] = {
    "+": ("{a} + {b} = {r}", "{A} plus {B} is {R}", "the sum of {a} and {b} is {r}",
          "{A} and {B} together make {R}", "{a} added to {b} equals {r}"),
    "-": ("{a} - {b} = {r}", "{A} minus {B} is {R}", "take {b} from {a} and {r} remain",
          "the difference between {a} and {b} is {r}", "{b} less than {a} is {r}"),
    "*": ("{a} * {b} = {r}", "{a} x {b} = {r}", "{A} times {B} is {R}",
          "the product of {a} and {b} is {r}", "{b} groups of {a} come to {r}"),
    "/": ("{a} / {b} = {r}", "{A} divided by {B} is {R}", "{a} shared among {b} is {r} each",
          "{a} split into {b} equal parts gives parts of {r}", "the quotient of {a} and {b} is {r}"),
}
FACT_JOINERS = ("; ", ". ", "\n", ", and ")


def facts_doc(rng: random.Random, max_value: int) -> str:
    """Three to eight arithmetic facts, each in a random phrasing."""
    out = []
    for _ in range(rng.randint(3, 8)):
        a, op, b, r = operation(rng, max_value)
        form = rng.choice(FACT_FORMS[op])
        out.append(form.format(a=a, b=b, r=r, A=_num(rng, a), B=_num(rng, b), R=_num(rng, r)))
    text = rng.choice(FACT_JOINERS).join(out)
    return text[0].upper() + text[1:] + "."


# ---- recall: introduce, digress, refer back ---------------------------------------------------
INTRO = (
    "{name} put {a} {n} into a {c}.",
    "On the table by the door, {name} lined up {a} {n}.",
    "{name} was looking after {a} {n} for a cousin.",
    "In {pos} {c}, {name} kept exactly {a} {n}.",
    "{name} counted {a} {n} while waiting at {place}.",
)
RECALL = (
    "Later, someone asked how many {n} {name} had been looking after, and the reply was {a}.",
    "When {name} checked the {c} again, the count of {n} was still {a}.",
    "So the number of {n} that belonged to this part of the story was {a}.",
    "Remember: {name} had {a} {n} in all.",
    "If we look back, {name} started with {a} {n}.",
)


def recall_doc(rng: random.Random, max_value: int) -> str:
    """Two to four people with quantities, a digression, then one of them recalled by name."""
    people = rng.sample(NAMES, rng.randint(2, 4))
    nouns = rng.sample(NOUNS, len(people))
    facts = []
    sentences = []
    for (name, pronoun), noun in zip(people, nouns):
        a = rng.randint(2, max_value)
        facts.append(dict(name=name, n=noun, a=_num(rng, a, 0.15), c=rng.choice(CONTAINERS),
                          place=rng.choice(PLACES), pos=POS[pronoun], p=pronoun))
        sentences.append(_cap(rng.choice(INTRO).format(**facts[-1])))
        if rng.random() < 0.5:
            sentences.append(rng.choice(ASIDES))
    sentences += rng.sample(ASIDES, rng.randint(1, 3))
    sentences.append(_cap(rng.choice(RECALL).format(**rng.choice(facts))))
    return " ".join(sentences)


# ---- stories of one operation --------------------------------------------------------------------
STORY_START = ("{name} collected {a} {n}.", "At first, {name} held {a} {n}.",
               "{name} had a pile of {a} {n} at {place}.", "There were {a} {n} on {pos} desk.")
STORY_OP: dict[str, tuple[str, ...]] = {
    "+": ("Later {p} picked up another {b}.", "A neighbour handed {o} {b} extra.",
          "{P} was given {b} further {n} the next morning."),
    "-": ("Then {b} of them went missing.", "{P} donated {b} to a school fair.",
          "{P} handed {b} over to a classmate."),
    "*": ("By evening the pile had grown to {b} times its size.",
          "{P} repeated the collection until it was {b} times bigger."),
    "/": ("{P} sorted them into {b} equal heaps and kept a single heap.",
          "{P} made {b} fair shares and held on to one share."),
}
STORY_END = ("That left {name} with {r} {n}.", "After that, {name} owned {r} {n}.",
             "The count was {r} {n} by the end of the day.", "So {r} {n} remained with {o}.")


def story_doc(rng: random.Random, max_value: int) -> str:
    """One person, one operation, the result stated in prose."""
    (name, pronoun), noun = rng.choice(NAMES), rng.choice(NOUNS)
    a, op, b, r = operation(rng, max_value)
    while op in "*/" and a < 2 or op in "+-" and b < 1:
        a, op, b, r = operation(rng, max_value)
    slots = dict(name=name, n=noun, a=_num(rng, a, 0.2), b=_num(rng, b, 0.2), r=r, p=pronoun,
                 P=pronoun.capitalize(), o=OBJ[pronoun], pos=POS[pronoun], place=rng.choice(PLACES))
    parts = [rng.choice(STORY_START), rng.choice(STORY_OP[op]), rng.choice(STORY_END)]
    return " ".join(_cap(p.format(**slots)) for p in parts)


# ---- retell: follow one person through the text --------------------------------------------------
ACTIONS = ("wrapped", "labelled", "stacked", "photographed", "cleaned", "numbered", "sorted", "polished", "measured", "painted")
ACT_FORMS = ("{P} {v} {k} {n}.", "Next, {p} {v} {k} {n}.", "After a short break, {p} {v} {k} {n}.",
             "{name} {v} {k} {n} by the window.", "Around noon {p} {v} {k} {n}.")
OTHER_FORMS = ("{other} {v} {k} {n2} as well.", "Meanwhile {other} {v} {k} {n2}.", "{other}, a neighbour, {v} {k} {n2}.")
RETELL_LIST = ("What {name} did, in order: {items}.", "{name}'s day, first to last: {items}.",
               "To sum up {name}'s part: {items}.")
RETELL_COUNTS = ("The counts in {name}'s part, first to last: {counts}.", "Only {name}'s numbers, in order: {counts}.")


def retell_doc(rng: random.Random, max_value: int) -> str:
    """One person's 2-5 counted actions among other people's, then retold in order."""
    (name, pronoun), (other, _) = rng.sample(NAMES, 2)
    noun, noun2 = rng.sample(NOUNS, 2)
    slots = dict(name=name, p=pronoun, P=pronoun.capitalize(), n=noun, other=other, n2=noun2)
    done: list[tuple[str, int]] = []
    sentences = [_cap(rng.choice(INTRO).format(name=name, n=noun, a=rng.randint(2, max_value), c=rng.choice(CONTAINERS),
                                               place=rng.choice(PLACES), pos=POS[pronoun]))]
    for _ in range(rng.randint(2, 5)):
        verb, k = rng.choice(ACTIONS), rng.randint(1, max_value)
        done.append((verb, k))
        sentences.append(_cap(rng.choice(ACT_FORMS).format(v=verb, k=_num(rng, k, 0.1), **slots)))
        if rng.random() < 0.4:
            sentences.append(rng.choice(OTHER_FORMS).format(v=rng.choice(ACTIONS), k=rng.randint(1, max_value), **slots))
    if rng.random() < 0.5:
        end = rng.choice(RETELL_LIST).format(name=name, items=", ".join(f"{v} {k} {noun}" for v, k in done))
    else:
        end = rng.choice(RETELL_COUNTS).format(name=name, counts=", ".join(str(k) for _, k in done))
    return " ".join(sentences + [end])


# ---- quizzes in other templates --------------------------------------------------------------------
QUIZ_ASK: dict[str, str] = {
    "+": "what is {a} plus {b}", "-": "what is {a} minus {b}",
    "*": "what is {a} multiplied by {b}", "/": "what is {a} divided by {b}",
}
QUIZ_FRAMES = (
    "Question: {ask}?\nResponse: {r}",
    "Quiz. {Ask}?\nReply: it is {r}.",
    "Exercise: {ask}?\nSolution: {a} {op} {b} = {r}.",
    "Problem. {Ask}?\nWorked out: {a} {op} {b} gives {r}.",
)
RECALL_QUIZ = (
    "Question: {name} has {a} {n} in a {c}. How big is that collection?\nResponse: {a} {n}.",
    "Exercise: {name} stores {a} {n}. Which number was given for the {n}?\nSolution: {a}.",
)


def quiz_doc(rng: random.Random, max_value: int) -> str:
    """A question and its reply, in a frame that is not the task's Q:/A: prompt."""
    if rng.random() < 0.3:
        (name, _), noun = rng.choice(NAMES), rng.choice(NOUNS)
        return rng.choice(RECALL_QUIZ).format(name=name, n=noun, a=rng.randint(2, max_value), c=rng.choice(CONTAINERS))
    a, op, b, r = operation(rng, max_value)
    ask = QUIZ_ASK[op].format(a=_num(rng, a, 0.2), b=_num(rng, b, 0.2))
    return rng.choice(QUIZ_FRAMES).format(ask=ask, Ask=_cap(ask), a=a, b=b, op=op, r=r)


def _cap(text: str) -> str:
    return text[0].upper() + text[1:]


WORD_FRAMES = (
    'The word "{w}" was written on the board.', '{name} looked up "{w}" in a dictionary.',
    'Next on the spelling list: {w}.', '"{w}" has {k} letters.',
)


def words_doc(rng: random.Random, vocabulary: Sequence[str]) -> str:
    """A few words in neutral frames, then a run of words in random order."""
    picks = rng.sample(list(vocabulary), min(len(vocabulary), rng.randint(6, 14)))
    framed = [rng.choice(WORD_FRAMES).format(w=w, k=len(w), name=rng.choice(NAMES)[0]) for w in picks[:2]]
    return " ".join(framed) + " Word list: " + " ".join(picks[2:]) + "."


WRITERS: dict[str, Callable[[random.Random, int], str]] = {
    "facts": facts_doc, "recall": recall_doc, "story": story_doc, "quiz": quiz_doc, "retell": retell_doc,
}


def documents(
    seed: int, n: int, max_value: int = 200, stream: str = "train", vocabulary: Sequence[str] = (),
    kinds: Sequence[str] = KINDS,
) -> Iterator[tuple[str, str]]:
    """`n` (kind, text) documents, deterministic per (seed, stream, vocabulary, kinds); kinds
    drawn evenly (`words` too when a vocabulary is given).

    Different `stream` names give independent documents from the same seed (held-out text).
    """
    unknown = set(kinds) - set(WRITERS)
    if unknown or not kinds:
        raise ValueError(f"corpus kinds must be a non-empty subset of {sorted(WRITERS)}, got {list(kinds)}")
    rng = random.Random(f"kpod-corpus:{seed}:{stream}")
    kinds = tuple(kinds) + (("words",) if vocabulary else ())
    for _ in range(n):
        kind = rng.choice(kinds)
        yield kind, words_doc(rng, vocabulary) if kind == "words" else WRITERS[kind](rng, max_value)


def task_vocabulary(texts: Iterable[str], drop: Iterable[str] = ()) -> list[str]:
    """The distinct words of `texts` (letters, case kept), sorted, minus `drop`."""
    found = {w for t in texts for w in re.findall(r"[A-Za-z]+", t)}
    return sorted(found - set(drop))


def held_out_documents(seed: int, n: int, exclude: set[str], max_value: int = 200, kinds: Sequence[str] = KINDS) -> list[str]:
    """`n` documents of the held-out stream that are not in `exclude` (the training documents).

    Short documents (a quiz of one fact) recur between streams; a held-out perplexity must not
    count them.
    """
    out: list[str] = []
    stream = documents(seed, 100 * n + 1000, max_value, stream="held-out", kinds=kinds)
    for _, text in stream:
        if text not in exclude:
            out.append(text)
            if len(out) == n:
                return out
    raise ValueError(f"the held-out stream has fewer than {n} documents outside the training ones")


# ---- contamination ---------------------------------------------------------------------------
_WORD = re.compile(r"[a-z]+|[0-9]+|[^\sa-z0-9]")


def words(text: str) -> list[str]:
    """Lower-cased words, numbers and single punctuation marks: the unit of the n-gram check."""
    return _WORD.findall(text.lower())


def ngrams(text: str, n: int = 8) -> Iterator[tuple[str, ...]]:
    w = words(text)
    return (tuple(w[i : i + n]) for i in range(len(w) - n + 1))


def task_ngrams(texts: Iterable[str], n: int = 8) -> set[tuple[str, ...]]:
    """Every n-gram of the task's texts (questions and rationales)."""
    out: set[tuple[str, ...]] = set()
    for t in texts:
        out.update(ngrams(t, n))
    return out


def shared_ngrams(corpus: Iterable[str], task: set[tuple[str, ...]], n: int = 8) -> list[tuple[str, ...]]:
    """The distinct n-grams of `corpus` that also occur in the task (`task_ngrams`)."""
    found: set[tuple[str, ...]] = set()
    for doc in corpus:
        found.update(g for g in ngrams(doc, n) if g in task)
    return sorted(found)
