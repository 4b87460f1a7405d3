"""The training recipe: batching, golden losses, kill -9 + resume, seq2seq, LoRA, the stage core."""

import json
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest
import torch

from tasks.core.formatting import IGNORE, Example
from tasks.training.recipe import Recipe, std_cot_examples, train_log_table
from tasks.config.train import TrainConfig
from tasks.training.data import TrainMethod, collate_examples, length_grouped_batches

ROOT = Path(__file__).resolve().parents[2]
VOCAB, PAD = 40, 0


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(
        LlamaConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                    num_key_value_heads=2, intermediate_size=32, max_position_embeddings=64,
                    tie_word_embeddings=True, pad_token_id=PAD, bos_token_id=1, eos_token_id=2)
    )


def tiny_examples(n: int = 12, seed: int = 0) -> list[Example]:
    """Sequences of varied length: a prompt (ignored) then a target that repeats a pattern."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        p = int(torch.randint(2, 6, (1,), generator=g))
        t = int(torch.randint(3, 12, (1,), generator=g))
        prompt = [1] + torch.randint(3, VOCAB, (p,), generator=g).tolist()
        target = [(prompt[1] + k) % (VOCAB - 3) + 3 for k in range(t)] + [2]
        out.append(Example(prompt + target, [IGNORE] * len(prompt) + target,
                           [0.0] * len(prompt) + [1.0] * len(target), rationale_id=f"r{i}"))
    return out


def tiny_recipe(work_dir, on_step=None, **cfg) -> Recipe:
    cfg = TrainConfig(**{**dict(epochs=2, batch_size=4, lr=1e-2, warmup_ratio=0.1, checkpoint_every=1000), **cfg})
    return Recipe(cfg, tiny_llama(), None, TrainMethod(tiny_examples(), PAD), work_dir, on_step=on_step)


# ---- batching ----------------------------------------------------------------------------
def test_length_grouped_batches_cover_once_and_group_lengths():
    import random

    rnd = random.Random(0)
    lengths = [rnd.randint(5, 200) for _ in range(1000)]
    b0 = length_grouped_batches(lengths, 16, seed=1, epoch=0)
    flat = sorted(i for b in b0 for i in b)
    assert flat == list(range(1000))
    assert b0 == length_grouped_batches(lengths, 16, seed=1, epoch=0)  # pure in (seed, epoch)
    assert b0 != length_grouped_batches(lengths, 16, seed=1, epoch=1)
    grouped_pad = sum(len(b) * max(lengths[i] for i in b) for b in b0)
    order = list(range(1000))
    rnd.shuffle(order)
    random_pad = sum(16 * max(lengths[i] for i in order[k:k + 16]) for k in range(0, 1000, 16))
    assert grouped_pad < 0.7 * random_pad  # the point of grouping: little padding
    b2 = length_grouped_batches(lengths, 16, seed=1, epoch=0, world=2)
    assert len(b2) % 2 == 0 and len(b2) == len(b0) - len(b0) % 2


def test_collate_pads_to_the_batch_max():
    ex = tiny_examples(3)
    batch = collate_examples(ex, PAD)
    T = max(len(e.input_ids) for e in ex)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["weights"].shape == (3, T)
    for b, e in enumerate(ex):
        n = len(e.input_ids)
        assert batch["attention_mask"][b].sum() == n
        assert (batch["labels"][b, n:] == IGNORE).all() and (batch["input_ids"][b, n:] == PAD).all()
        assert batch["input_ids"][b, :n].tolist() == e.input_ids


# ---- golden losses -----------------------------------------------------------------------
# computed once with this code (CPU, 1 thread); any change to init, batching, loss or
# optimiser that moves them is a change of behaviour to justify
GOLDEN = [3.7094168663, 3.6504244804, 3.6005029679, 3.4938144684, 3.4364273548, 3.4483692646]


def test_golden_losses(tmp_path, one_thread):
    recipe = tiny_recipe(tmp_path)
    recipe.setup()
    log = recipe.train()
    assert [r["step"] for r in log] == list(range(1, 7)) and [r["epoch"] for r in log] == [0] * 3 + [1] * 3
    assert all(r["stage"] == 0 and r["kd"] is None and r["tokens"] > 0 for r in log)
    assert log[-1]["loss"] < log[0]["loss"]
    assert [r["loss"] for r in log] == pytest.approx(GOLDEN, abs=1e-5)
    # Std-CoT weights are 1, so the weighted loss is the plain NLL
    assert [r["loss"] for r in log] == pytest.approx([r["nll"] for r in log], abs=1e-6)
    table = train_log_table(log)
    assert table.num_rows == 6 and table.column("kd").null_count == 6


# ---- kill -9 and resume ------------------------------------------------------------------
CHILD = """
import json, os, signal, sys
import torch
torch.set_num_threads(1)
sys.path.insert(0, {root!r})
from tests.unit.test_train import tiny_recipe
out = open({log!r}, "a")
def on_step(row):
    out.write(json.dumps(row) + "\\n"); out.flush()
    if row["step"] == {kill_at}:
        os.kill(os.getpid(), signal.SIGKILL)  # a real kill -9, between two checkpoints
r = tiny_recipe({work!r}, on_step=on_step, epochs=3, checkpoint_every=2)
r.setup()
r.train()
"""


def test_resume_after_kill_gives_the_same_losses(tmp_path, one_thread):
    work, steps_log = tmp_path / "work", tmp_path / "steps.jsonl"
    script = CHILD.format(root=str(ROOT), log=str(steps_log), kill_at=7, work=str(work))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert sorted(p.name for p in work.glob("ckpt-*")) == ["ckpt-00000004", "ckpt-00000006"]  # last 2 kept
    killed = [json.loads(line) for line in steps_log.read_text().splitlines()]
    assert [r["step"] for r in killed] == list(range(1, 8))

    resumed = tiny_recipe(work, epochs=3, checkpoint_every=2)
    resumed.setup()
    assert resumed.resumed_from == 6 and resumed.epoch == 2 and resumed.micro == 0
    log = resumed.train()

    straight = tiny_recipe(tmp_path / "straight", epochs=3, checkpoint_every=2)
    straight.setup()
    ref = straight.train()
    assert [r["step"] for r in log] == list(range(1, 10))
    assert [r["loss"] for r in log] == pytest.approx([r["loss"] for r in ref], abs=1e-6)
    # the killed run's step 7 (after checkpoint 6) was recomputed identically
    assert killed[6]["loss"] == pytest.approx(ref[6]["loss"], abs=1e-6)
    for a, b in zip(resumed.final_model().state_dict().values(), straight.final_model().state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6)


def test_resume_mid_epoch_and_torn_checkpoint_ignored(tmp_path, one_thread):
    ref = tiny_recipe(tmp_path / "a", checkpoint_every=1)
    ref.setup()
    want = [r["loss"] for r in ref.train()]
    work = tmp_path / "a"
    # keep only ckpt-5 (mid epoch 1); add a torn temp dir and a checkpoint without state.json
    for p in work.glob("ckpt-*"):
        if p.name != "ckpt-00000005":
            import shutil

            shutil.rmtree(p)
    (work / ".tmp-ckpt-00000006").mkdir()
    (work / "ckpt-00000009").mkdir()
    again = tiny_recipe(work, checkpoint_every=1000)
    again.setup()
    assert again.resumed_from == 5 and again.epoch == 1 and again.micro == 2
    got = [r["loss"] for r in again.train()]
    assert got == pytest.approx(want, abs=1e-6)


# ---- seq2seq and LoRA --------------------------------------------------------------------
def test_seq2seq_step_with_a_tiny_t5(tmp_path, one_thread):
    from transformers import T5Config, T5ForConditionalGeneration

    from tasks.core.formatting import build_example, serialize
    from tasks.core.models import train_tokenizer

    q, r = "Ann has 3 pens and buys 4. How many?", "3 + 4 = 7 pens."
    tok = train_tokenizer([serialize(q, r, "7")] * 3, 300)
    torch.manual_seed(0)
    t5 = T5ForConditionalGeneration(
        T5Config(vocab_size=len(tok), d_model=16, d_ff=32, d_kv=8, num_layers=1, num_heads=2, dropout_rate=0.0,
                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                 decoder_start_token_id=tok.pad_token_id)
    )
    ex = [build_example(tok, q, r, "7", seq2seq=True, max_len=64) for _ in range(4)]
    assert ex[0].seq2seq and IGNORE not in ex[0].labels
    before = {k: v.clone() for k, v in t5.state_dict().items()}
    cfg = TrainConfig(epochs=2, batch_size=4, lr=1e-2, checkpoint_every=1000)
    recipe = Recipe(cfg, t5, tok, TrainMethod(ex, tok.pad_token_id), tmp_path)
    recipe.setup()
    batch = recipe.method.collate(ex)
    loss, parts = recipe.loss_step(recipe.model, batch)
    # the recipe's loss is the mean token NLL HF computes from the same labels
    hf = t5(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    assert loss.item() == pytest.approx(hf.item(), rel=1e-5)
    log = recipe.train()
    assert len(log) == 2 and log[1]["loss"] < log[0]["loss"]
    assert any(not torch.equal(before[k], v) for k, v in recipe.final_model().state_dict().items())


def test_lora_trains_adapters_and_merges(tmp_path, one_thread):
    recipe = tiny_recipe(tmp_path, epochs=1, lora={"r": 4, "alpha": 8, "targets": ["q_proj", "v_proj"]})
    base = {k: v.clone() for k, v in recipe.model.state_dict().items()}
    recipe.setup()
    trainable = [n for n, p in recipe.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    log = recipe.train()
    assert len(log) == 3
    merged = recipe.final_model()
    assert type(merged).__name__ == "LlamaForCausalLM"
    sd = merged.state_dict()
    assert set(sd) == set(base)
    assert torch.equal(sd["model.layers.0.mlp.up_proj.weight"], base["model.layers.0.mlp.up_proj.weight"])
    assert not torch.equal(sd["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"])


# ---- the stage core ----------------------------------------------------------------------
def test_std_cot_examples_use_correct_teacher_rationales_of_train_questions():
    from tasks.core.models import train_tokenizer

    questions = pa.table({
        "question_id": ["q1", "q2", "q3"], "split": ["train", "train", "test"],
        "question": ["Ann has 3 pens. How many?", "Bo has 5 cups. How many?", "Cy has 2. How many?"],
        "answer": ["3", "5", "2"],
    })
    rationales = pa.table({
        "rationale_id": ["q1:teacher:0", "q1:teacher:1", "q2:teacher:0", "q2:mentor:0", "q3:teacher:0"],
        "question_id": ["q1", "q1", "q2", "q2", "q3"],
        "source": ["teacher", "teacher", "teacher", "mentor", "teacher"],
        "text": ["She has 3.", "She has 4.", "He has 5.", "He has 5.", "Cy has 2."],
        "correct": [True, False, True, True, True],
    })
    tok = train_tokenizer(["Q: Ann has 3 pens.\nA: She has 3. Therefore, the answer is 3."] * 3, 300)
    ex = std_cot_examples(questions, rationales, tok, seq2seq=False, max_len=128)
    assert [e.rationale_id for e in ex] == ["q1:teacher:0", "q2:teacher:0"]
    assert tok.decode(ex[1].input_ids, skip_special_tokens=True) == (
        "Q: Bo has 5 cups. How many?\nA: He has 5. Therefore, the answer is 5."
    )


def test_curriculum_lr_hold_keeps_the_peak_through_the_curriculum(tmp_path, one_thread):
    """curriculum_lr = hold: a method with 2 curriculum epochs of 4 holds the peak through them."""
    lrs = {}
    for mode in ("shared", "hold"):
        recipe = tiny_recipe(tmp_path / mode, epochs=4, curriculum_lr=mode, warmup_ratio=0.0)
        recipe.method.curriculum_epochs = 2
        recipe.setup()
        lrs[mode] = [recipe.scheduler.get_last_lr()[0]]
        for _ in range(recipe.total_steps - 1):
            recipe.optimizer.step()
            recipe.scheduler.step()
            lrs[mode].append(recipe.scheduler.get_last_lr()[0])
    spe = recipe.steps_per_epoch
    assert lrs["hold"][: 2 * spe] == pytest.approx([1e-2] * (2 * spe))
    assert lrs["shared"][2 * spe - 1] < 0.7e-2  # cosine over all 4 epochs is past its middle
    assert lrs["hold"][-1] < lrs["hold"][2 * spe] and lrs["hold"][2 * spe] == pytest.approx(1e-2)
