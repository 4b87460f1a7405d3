"""The pipeline config: presets, --set overrides, one-line errors, and prefect.yaml agreeing with it."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tasks.config.pipeline import ConfigError, PipelineConfig, load_config, parse_override
from tasks.stages.registry import STAGES

REPO = Path(__file__).resolve().parents[2]


def test_demo_preset_is_the_embedded_default() -> None:
    demo = load_config(REPO / "configs" / "demo.yaml")
    assert demo.model_dump(exclude={"name"}) == PipelineConfig().model_dump(exclude={"name"})


def test_smoke_preset_validates_and_is_small() -> None:
    smoke = load_config(REPO / "configs" / "smoke.yaml")
    assert smoke.dataset.synthetic.n_train < PipelineConfig().dataset.synthetic.n_train


def test_override_parses_yaml_values() -> None:
    assert parse_override("teacher.samples=3") == ("teacher.samples", 3)
    assert parse_override("evaluate.splits=[val]") == ("evaluate.splits", ["val"])
    cfg = load_config(None, ["teacher.samples=3", "train.lr=0.01"])
    assert cfg.teacher.samples == 3 and cfg.train.lr == 0.01


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["teacher.bogus=1"], "teacher.bogus: unknown field"),
        (["teacher.samples=many"], "teacher.samples"),
        (["teacher.samples=0"], "teacher.samples"),
        (["nosuchsection.x=1"], "nosuchsection: unknown field"),
        (["teacher"], "key=value"),
    ],
)
def test_bad_overrides_name_the_field(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("teacher: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("train:\n  epochs: lots\n")
    with pytest.raises(ConfigError, match=r"wrong.yaml: train.epochs"):
        load_config(wrong)


def test_every_field_is_described() -> None:
    missing = []

    def walk(model: type, prefix: str) -> None:
        for name, field in model.model_fields.items():
            if not field.description:
                missing.append(prefix + name)
            ann = field.annotation
            if isinstance(ann, type) and hasattr(ann, "model_fields"):
                walk(ann, prefix + name + ".")

    walk(PipelineConfig, "")
    assert missing == []


def test_prefect_yaml_has_full_and_one_deployment_per_stage() -> None:
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    deployments = {d["name"]: d for d in spec["deployments"]}
    assert set(deployments) == {"full", "compare"} | {s.name for s in STAGES}
    compare = deployments.pop("compare")
    assert compare["entrypoint"] == "flows/compare.py:kpod_compare" and compare["parameters"] == {}
    for name, d in deployments.items():
        assert d["entrypoint"] == "flows/kpod.py:kpod"
        assert d["parameters"] == ({} if name == "full" else {"stages": [name]})


# ---- prompt + generation fit the embedded models' positions (issue 15 item 5) ---------------
def test_generation_plus_the_prompt_reserve_must_fit_student_max_len():
    from tasks.config.pipeline import ConfigError, load_config

    ok = load_config(None, ["student.max_len=384", "evaluate.max_new_tokens=256"])  # 256 + 128 = 384
    assert ok.student.max_prompt_tokens == 128
    cases = {
        "evaluate.max_new_tokens (300) + student.max_prompt_tokens (128) = 428 exceeds student.max_len (384)":
            ["student.max_len=384", "evaluate.max_new_tokens=300"],
        "evaluate.max_new_tokens (256) + student.max_prompt_tokens (200) = 456 exceeds student.max_len (384)":
            ["student.max_len=384", "student.max_prompt_tokens=200"],
        "train.select_max_new_tokens (300) + student.max_prompt_tokens (128) = 428 exceeds student.max_len (384)":
            ["student.max_len=384", "evaluate.max_new_tokens=64", "train.select_every=1", "train.select_max_new_tokens=300"],
        "mentor.augment.max_new_tokens (400) + student.max_prompt_tokens (128) = 528 exceeds mentor.model.max_len (512)":
            ["train.method=mentor_kd", "mentor.augment.max_new_tokens=400"],
    }
    for message, sets in cases.items():
        with pytest.raises(ConfigError) as err:
            load_config(None, sets)
        assert message in str(err.value) and "\n" not in str(err.value), sets
    # what is not generated is not checked: selection off, the mentor unused, an hf student
    load_config(None, ["student.max_len=384", "evaluate.max_new_tokens=64", "train.select_max_new_tokens=300"])
    load_config(None, ["mentor.augment.max_new_tokens=400"])
    load_config(None, ["student.kind=hf", "student.name_or_path=x", "student.max_len=64"])


def test_the_student_stage_refuses_a_prompt_longer_than_the_reserve():
    import pyarrow as pa

    from tasks.config.pipeline import ConfigError
    from tasks.core.formatting import encode_prompt
    from tasks.core.models import train_tokenizer
    from tasks.stages.student import check_prompt_lengths

    texts = ["How many apples are left?", "Tom has 3 apples and buys 4 more at the shop; how many apples does he have now?"]
    tok = train_tokenizer(texts * 4, 300)
    questions = pa.table({"question_id": ["short", "long"], "question": texts})
    longest = len(encode_prompt(tok, texts[1], False))
    check_prompt_lengths(tok, questions, longest)  # exactly fits
    with pytest.raises(ConfigError, match=rf"prompt of 'long' is {longest} tokens \(1 question\(s\) over the limit\), "
                                          rf"more than student.max_prompt_tokens \({longest - 1}\)"):
        check_prompt_lengths(tok, questions, longest - 1)
