"""Step segmentation and the token -> step map (tasks/core/steps.py)."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

from tasks.core.steps import segment, token_steps

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
GSM8K = DATA / "gsm8k" / "train.jsonl"


def _texts(text: str) -> list[str]:
    return [text[s:e] for s, e in segment(text)]


@pytest.mark.parametrize(
    "text, want",
    [
        ("Tom has 3 apples. He eats 1.", ["Tom has 3 apples.", "He eats 1."]),
        ("He paid $1.50. Then 110*.3 = 33.", ["He paid $1.50.", "Then 110*.3 = 33."]),
        ("a\nb\n\n  c  ", ["a", "b", "c"]),
        ("Step 1: a. Step 2: b", ["Step 1: a.", "Step 2: b"]),
        ("Step 1: 3 + 4 = 7 step 2: 7 * 2 = 14", ["Step 1: 3 + 4 = 7", "step 2: 7 * 2 = 14"]),
        ("1. Lucky - y\n2. Kc - c\nSo: yc", ["1. Lucky - y", "2. Kc - c", "So: yc"]),
        ("Use e.g. apples. Mr. Smith agrees.", ["Use e.g. apples.", "Mr. Smith agrees."]),
        ("Pi is 3.14.No space after this one", ["Pi is 3.14.No space after this one"]),
        ("", []),
        (" \n\t ", []),
    ],
)
def test_segment_cases(text, want):
    assert _texts(text) == want


def _check_cover(text: str, spans: list[tuple[int, int]]) -> None:
    """Spans are ordered, disjoint, stripped, non-empty, and only whitespace lies outside them."""
    pos = 0
    for s, e in spans:
        assert pos <= s < e <= len(text)
        assert text[pos:s].strip() == ""
        piece = text[s:e]
        assert piece == piece.strip() and "\n" not in piece
        pos = e
    assert text[pos:].strip() == ""


def _gsm8k_solutions(n: int | None = None) -> list[str]:
    if not GSM8K.exists():
        pytest.skip(f"real data not found at {GSM8K} (../shared/data relative to the repo)")
    rows = [json.loads(line) for line in GSM8K.read_text().splitlines()]
    out = [re.sub(r"<<.*?>>", "", r["answer"].split("####")[0]).strip() for r in rows]
    return out if n is None else out[:n]


def test_gsm8k_solutions_segment_without_splitting_numbers():
    texts = _gsm8k_solutions()
    decimals = 0
    for text in texts:
        spans = segment(text)
        _check_cover(text, spans)
        assert len(spans) >= len([ln for ln in text.splitlines() if ln.strip()])
        # every decimal number lies inside one step
        for m in re.finditer(r"\d+\.\d+", text):
            decimals += 1
            assert any(s <= m.start() and m.end() <= e for s, e in spans), (text, m.group())
        # a step that does not end its line ends with a sentence period
        for (s, e), (s2, _) in zip(spans, spans[1:]):
            if "\n" not in text[e:s2]:
                assert text[e - 1] == "." and text[e].isspace()
    assert decimals > 1000  # the check above really met decimals


def test_gsm8k_example_by_hand():
    text = (
        "Mr. Alonzo was able to sell 125.5 + 78 = 203.5 kg of tomatoes.\n"
        "So, there are 245.5 - 203.5 = 42 kg unsold tomatoes."
    )
    assert _texts(text) == [
        "Mr. Alonzo was able to sell 125.5 + 78 = 203.5 kg of tomatoes.",
        "So, there are 245.5 - 203.5 = 42 kg unsold tomatoes.",
    ]


@pytest.mark.parametrize(
    "text, want",
    [
        ("1. J. P. Morgan was a banker. He lived in N.Y.", ["1. J. P. Morgan was a banker.", "He lived in N.Y."]),
        ("Dr. J. Smith met Mrs. Jones. Then Prof. Lee came.", ["Dr. J. Smith met Mrs. Jones.", "Then Prof. Lee came."]),
        ("Use fruit, e.g. apples, i.e. red ones. Done.", ["Use fruit, e.g. apples, i.e. red ones.", "Done."]),
        # "etc." and units keep their period mid-sentence, end the sentence before a capital
        ("Buy pears, etc. and eat them. Buy plums etc. Then rest.",
         ["Buy pears, etc. and eat them.", "Buy plums etc.", "Then rest."]),
        ("Width = 14 sq. ft. ÷ 7 ft. = 2 ft. The length is 3.",
         ["Width = 14 sq. ft. ÷ 7 ft. = 2 ft.", "The length is 3."]),
        # a lone capital letter before a period ends its sentence
        ("Let the cost be X. Then the answer is C. Next.", ["Let the cost be X.", "Then the answer is C.", "Next."]),
        # an enumerator after a sentence end opens the next step, never ends one
        ("It is 03/04/1973. 3. The choice is (F).", ["It is 03/04/1973.", "3. The choice is (F)."]),
        ("It is 03/04/1973.\n3.\nThe choice is (F).", ["It is 03/04/1973.", "3.\nThe choice is (F)."]),
        ("a.\n3)\nb) c", ["a.", "3)\nb) c"]),
        ("In 2019. 2020. Then", ["In 2019.", "2020.", "Then"]),  # a year is no enumerator
        ("We count to 3.", ["We count to 3."]),  # a marker-like last step stays
    ],
)
def test_segment_abbreviations_initials_and_list_markers(text, want):
    assert _texts(text) == want


def _chains(name: str) -> list[str]:
    path = DATA / "mentor-kd" / name
    if not path.exists():
        pytest.skip(f"real data not found at {path} (../shared/data relative to the repo)")
    return [r["chain"] for r in json.loads(path.read_text())]


_MARKER_STEP = re.compile(r"\(?\d{1,2}[.)]")


@pytest.mark.parametrize("name", ["date_understanding_3_train.json", "tracking_shuffled_objects_3_train.json"])
def test_real_list_chains_keep_each_marker_with_its_step(name):
    """Real teacher chains that number their reasoning ("1. ...\n2. ..."), as written and written
    on one line (as chat teachers also do): every enumerator opens the step it numbers; no step is
    a bare marker or ends with one ("... 3/4/1973." | "4." used to be two steps)."""
    listed = [t for t in _chains(name) if re.search(r"(?m)^\d+\. ", t)]
    assert len(listed) > 200
    for written in listed:
        for text in (written, re.sub(r"\s*\n\s*", " ", written)):
            spans = segment(text)
            pieces = [text[s:e] for s, e in spans]
            assert not any(_MARKER_STEP.fullmatch(p) for p in pieces), pieces
            starts = {s for s, _ in spans}
            for m in re.finditer(r"(?:^|(?<=[.!?] ))(\d{1,2})\. (?=[A-Z])", text):
                assert m.start(1) in starts, (text[max(0, m.start() - 40) : m.end() + 20], pieces)


def test_real_date_chain_by_hand():
    text = next(t for t in _chains("date_understanding_3_train.json") if t.startswith("1. Jane saw the meteor"))
    flat = re.sub(r"\s*\n\s*", " ", text)
    assert _texts(flat)[-2:] == [
        "3. Therefore, yesterday's date would be 3/4/1973.",
        "4. The correct answer choice is (F) 03/04/1973.",
    ]
    marker_alone = text.replace("4. The correct", "4.\nThe correct")
    assert _texts(marker_alone)[-1] == "4.\nThe correct answer choice is (F) 03/04/1973."


def test_real_svamp_units_stay_in_one_step():
    (text,) = [t for t in _chains("svamp_3_train.json") if "Width of room = 14 sq. ft." in t]
    assert "Width of room = 14 sq. ft. ÷ 7 ft." in _texts(text)


# ---- token_steps --------------------------------------------------------------------------
def test_token_steps_rules_by_hand():
    text = "Ab cd.\n\nEf gh."  # steps [0, 6) and [8, 14)
    spans = segment(text)
    assert spans == [(0, 6), (8, 14)]
    offsets = [(0, 0), (0, 2), (2, 5), (5, 6), (6, 8), (8, 10), (10, 14)]
    #          special  Ab     " cd"   "."     "\n\n"  Ef      " gh."
    assert token_steps(offsets, spans) == [-1, 0, 0, 0, 1, 1, 1]
    # a token straddling the boundary goes to the step it starts in; trailing text to the last
    assert token_steps([(5, 9), (14, 15)], spans) == [0, 1]
    with pytest.raises(ValueError, match="no steps"):
        token_steps([(0, 1)], [])
    assert token_steps([(0, 0)], []) == [-1]


def _naive_step(text: str, spans: list[tuple[int, int]], s: int, e: int) -> int:
    """Reference: the step holding the token's first non-whitespace character; a whitespace-only
    token belongs to the step it lies in, else the next step that starts after it, else the last."""
    if s == e == 0:
        return -1
    for i in range(s, e):
        if not text[i].isspace():
            return next(k for k, (a, b) in enumerate(spans) if a <= i < b)
    inside = [k for k, (a, b) in enumerate(spans) if a <= s < b]
    return inside[0] if inside else next((k for k, (a, _) in enumerate(spans) if a >= s), len(spans) - 1)


def _train_tokenizers(corpus: list[str]):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    # byte-level BPE: offsets include the leading space, so tokens start in inter-step gaps
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=400, special_tokens=["<unk>", "<s>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
        ),
    )
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    # WordPiece on whitespace-split words: whitespace is in no token; [CLS] ... [SEP] at (0, 0)
    wp = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wp.normalizer = normalizers.Lowercase()
    wp.pre_tokenizer = pre_tokenizers.Whitespace()
    wp.train_from_iterator(
        corpus,
        trainers.WordPieceTrainer(vocab_size=400, special_tokens=["[UNK]", "[CLS]", "[SEP]"], show_progress=False),
    )
    wp.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 1), ("[SEP]", 2)]
    )
    return [
        PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", unk_token="<unk>"),
        PreTrainedTokenizerFast(tokenizer_object=wp, cls_token="[CLS]", sep_token="[SEP]", unk_token="[UNK]"),
    ]


def test_every_token_gets_a_step_with_real_fast_tokenizers():
    random.seed(0)
    texts = _gsm8k_solutions(400)
    texts += [  # whitespace at the edges and between steps, "Step k:" markers, list enumerators
        "  Step 1: 3 + 4 = 7.  Step 2: 7 * 2 = 14.\n\n\nTherefore, 14.  ",
        "1. Lucky - y\n2. Kc - c\n\n Putting them together: yc \n",
    ]
    for tok in _train_tokenizers(texts[:300]):
        seen_steps = 0
        for text in texts[300:]:
            spans = segment(text)
            enc = tok(text, return_offsets_mapping=True)
            offsets = [tuple(o) for o in enc["offset_mapping"]]
            got = token_steps(offsets, spans)
            assert got == [_naive_step(text, spans, s, e) for s, e in offsets]
            real = [k for k, (s, e) in zip(got, offsets) if (s, e) != (0, 0)]
            specials = [i for i, o in enumerate(offsets) if o == (0, 0)]
            assert specials and all(enc["input_ids"][i] in tok.all_special_ids for i in specials)
            assert all(0 <= k < len(spans) for k in real)
            assert real == sorted(real)  # non-decreasing
            assert set(real) == set(range(len(spans)))  # every step has a token
            seen_steps += len(spans)
        assert seen_steps > 200
