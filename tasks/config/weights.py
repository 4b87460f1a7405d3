"""The `weights` section: KPOD's token weighting module (METHODS §2.1)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from tasks.config.base import KpodModel, runtime_field


class WeightsConfig(KpodModel):
    alpha: float = Field(0.5, ge=0, le=1000, description="Eq. 7: weight of the mask loss Lm against the answer loss Lp (its scale depends on mask_norm).")
    mask_norm: Literal["per_token", "sum"] = Field(
        "per_token",
        description="Eq. 6 form of Lm. sum: the paper's sum_j m_j per rationale; per_token "
        "(**departure**, METHODS §2.1): that sum divided by the rationale's length, so alpha "
        "does not depend on length.",
    )
    tau: float = Field(0.5, gt=0, le=10, description="Eq. 4: temperature of the binary Gumbel-softmax (straight-through) mask.")
    predictor: str | None = Field(
        None,
        description="Answer predictor: an HF causal LM directory or hub name sharing the student's "
        "tokenizer; 'base' = the pretrained miniature's base (needs its tokenizer: student.init or "
        "student.tokenizer 'base'; the paper predicts with a pretrained model); None = a fresh small model of the student's "
        "architecture (see predictor_layers).",
    )
    predictor_layers: int = Field(2, ge=1, le=128, description="Layers of the default predictor (predictor = None): the student's config with this many layers, initialised from `seed`.")
    init_keep: float | None = Field(
        None, gt=0, lt=1,
        description="Initial keep probability of every token (the generator's output bias is "
        "its logit); None: PyTorch's default init (w near 0.5; the paper does not say). Near 1, "
        "the predictor starts reading whole rationales and Lm prunes what Lp does not need, "
        "instead of a random half-mask whose noisy Lp lets Lm collapse the mask (measured: 0.95 "
        "did not stop the collapse at alpha 0.06 on bench-arith; docs/benchmarks.md).",
    )
    joint_predictor: Literal["train", "frozen"] = Field(
        "train",
        description="The answer predictor in the joint phase: train = optimised with the "
        "generator on Eq. 7 (the paper); frozen (**departure**) = fixed after the warm-up, so the "
        "mask cannot co-adapt with it (a trained predictor can learn to read answers from what a "
        "degenerate mask keeps, e.g. filler) and must keep the tokens a competent reader uses.",
    )
    estimator: Literal["straight_through", "score_function"] = Field(
        "straight_through",
        description="Gradient of Lp with respect to the generator in the joint phase. "
        "straight_through: the paper's Gumbel-softmax mask (Eq. 4, `tau`), whose gradient is the "
        "predictor's local slope and vanishes once w is near 0 or 1 (both the collapse at alpha "
        "0.06 and the saturation at 0.01 are absorbing on the pretrained preset). score_function "
        "(**departure**): `samples` hard Bernoulli(w) masks per rationale, the gradient of "
        "E[Lp] estimated from their answer losses with a leave-one-out baseline (REINFORCE), "
        "and Lm taken in expectation (sum_j w_j); tau is unused.",
    )
    samples: int = Field(4, ge=2, le=256, description="Masks sampled per rationale and joint step when estimator = score_function (the leave-one-out baseline needs 2).")
    predictor_warmup_steps: int = Field(100, ge=0, le=100_000, description="Steps training the predictor alone with no mask (m = 1) before the joint phase.")
    warmup_lm: bool = Field(
        True,
        description="Warm-up also trains next-token prediction on the rationale tokens (beside the "
        "answer loss): a from-scratch predictor learns to read and copy numbers from the rationale "
        "far sooner than from the few answer tokens alone.",
    )
    steps: int = Field(100, ge=1, le=1_000_000, description="Joint steps training the weight generator and the predictor on Lp + alpha * Lm.")
    lr: float = Field(1e-3, gt=0, le=1, description="AdamW learning rate of the weight generator.")
    predictor_lr: float = Field(1e-3, gt=0, le=1, description="AdamW learning rate of the answer predictor (warm-up and joint).")
    batch_size: int = Field(16, ge=1, le=4096, description="Rationales per step (each is one packed predictor row holding all its prefixes).")
    prefixes: Literal["all", "final", "sampled"] = Field(
        "all",
        description="Eq. 5 prefixes: every step boundary (the paper), only the full rationale "
        "(final, a departure), or a sampled subset that always holds the full rationale.",
    )
    n_sampled: int = Field(2, ge=1, le=1000, description="Prefixes per rationale when prefixes = sampled (the full one included).")
    probe_rationales: int = Field(
        64, ge=0, le=100_000,
        description="Correct training rationales held out from the weighting module's training "
        "(at most a fifth of them) to probe the answer predictor: answer accuracy and NLL from the "
        "full rationale unmasked, fully masked and with the learned mask (weights_quality). 0: no probe.",
    )
    min_predictor_accuracy: float = Field(
        0.0, ge=0, le=1,
        description="The predictor must answer at least this share of the probe rationales "
        "(unmasked) before the joint phase: the warm-up goes on in probe_every steps up to "
        "max_warmup_steps, then the stage stops with an error instead of writing weights learned "
        "from noise. 0: no requirement (the probe is still recorded).",
    )
    max_warmup_steps: int = Field(
        0, ge=0, le=1_000_000,
        description="Most warm-up steps in all while min_predictor_accuracy is not met "
        "(0 or below predictor_warmup_steps: no extension).",
    )
    probe_every: int = Field(50, ge=1, le=100_000, description="Warm-up steps between two probes while the warm-up is extended.")
    heads: int = Field(4, ge=1, le=128, description="Attention heads of the generator's self-attention layer (divides the embedding size).")
    mlp_hidden: int = Field(128, ge=1, le=65536, description="Hidden size of the generator's two-layer MLP.")
    seed: int = Field(0, ge=0, description="Seed of the generator's init, batch order, prefix sampling and Gumbel noise.")
    device: str = runtime_field("cpu", description="Torch device for training and scoring (cpu, cuda, cuda:1, mps).")

    @model_validator(mode="after")
    def _check(self) -> "WeightsConfig":
        if self.min_predictor_accuracy > 0 and self.probe_rationales == 0:
            raise ValueError("weights.min_predictor_accuracy needs probe rationales (weights.probe_rationales > 0)")
        return self
