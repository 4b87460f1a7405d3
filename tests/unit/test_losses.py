import math

import pytest
import torch

from tasks.core.losses import IGNORE, weighted_token_nll


def naive_weighted_nll(logits, labels, weights):
    """The definition, one token at a time: sum_t w_t * -log softmax(logits_t)[y_t] / N."""
    total, count, plain = 0.0, 0, 0.0
    B, T, V = logits.shape
    for b in range(B):
        for t in range(T):
            y = int(labels[b, t])
            if y == IGNORE:
                continue
            row = [float(x) for x in logits[b, t]]
            m = max(row)
            logz = m + math.log(sum(math.exp(x - m) for x in row))
            nll = logz - row[y]
            total += float(weights[b, t]) * nll
            plain += nll
            count += 1
    return total / count, plain / count, count


def _inputs(seed=0, B=3, T=7, V=11):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g) * 3
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :3] = IGNORE  # a prompt
    labels[2, 5:] = IGNORE  # padding
    weights = torch.rand(B, T, generator=g) * 2
    return logits, labels, weights


def test_matches_naive_loop():
    logits, labels, weights = _inputs()
    loss, parts = weighted_token_nll(logits, labels, weights)
    want, want_plain, count = naive_weighted_nll(logits, labels, weights)
    assert loss.item() == pytest.approx(want, rel=1e-5)
    assert parts["nll"].item() == pytest.approx(want_plain, rel=1e-5)
    assert int(parts["tokens"]) == count


def test_weights_on_ignored_positions_do_not_matter():
    logits, labels, weights = _inputs(1)
    w2 = weights.clone()
    w2[labels == IGNORE] = 1000.0
    assert weighted_token_nll(logits, labels, weights)[0].item() == pytest.approx(
        weighted_token_nll(logits, labels, w2)[0].item(), rel=1e-6
    )


def test_unit_weights_equal_mean_cross_entropy():
    logits, labels, _ = _inputs(2)
    loss, parts = weighted_token_nll(logits, labels, torch.ones_like(labels, dtype=torch.float))
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1))
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    assert parts["nll"].item() == pytest.approx(ref.item(), rel=1e-5)


def test_normalised_by_token_count_not_weight_sum():
    logits, labels, weights = _inputs(3)
    half = weighted_token_nll(logits, labels, weights * 0.5)[0]
    full = weighted_token_nll(logits, labels, weights)[0]
    assert half.item() == pytest.approx(full.item() / 2, rel=1e-6)


def test_gradient_flows_and_all_ignored_is_zero():
    logits, labels, weights = _inputs(4)
    logits.requires_grad_(True)
    loss, _ = weighted_token_nll(logits, labels, weights)
    loss.backward()
    assert logits.grad[labels == IGNORE].abs().sum() == 0
    assert logits.grad[labels != IGNORE].abs().sum() > 0
    empty = torch.full_like(labels, IGNORE)
    assert weighted_token_nll(logits.detach(), empty, weights)[0].item() == 0.0


def test_shape_mismatch_is_a_clear_error():
    logits, labels, weights = _inputs()
    with pytest.raises(ValueError, match="expected logits"):
        weighted_token_nll(logits, labels[:, 1:], weights)


def test_weight_floor_formula():
    from tasks.core.losses import floored_weight

    for w in (0.0, 0.02, 0.5, 1.0):
        assert floored_weight(w, 0.0) == w  # the paper's raw w
        assert floored_weight(w, 1.0) == 1.0  # Std-CoT
        assert floored_weight(w, 0.8) == pytest.approx(0.8 + 0.2 * w)
    assert floored_weight(0.02, 0.5) >= 0.5
    with pytest.raises(ValueError, match="floor"):
        floored_weight(0.5, 1.5)
