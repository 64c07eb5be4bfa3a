"""clip_loss / siglip_loss against brute-force Python loops in float64."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from alignment.loss import MAX_LOGIT_SCALE, clip_loss, exp_logit_scale, group_soft_threshold, siglip_loss


def features(n: int, p: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a = F.normalize(torch.randn(n, p, generator=g, dtype=torch.float64), dim=-1)
    b = F.normalize(torch.randn(n, p, generator=g, dtype=torch.float64), dim=-1)
    return a, b


def brute_clip(a, b, t: float) -> float:
    n = len(a)
    scale = min(math.exp(t), MAX_LOGIT_SCALE)
    s = [[scale * float(a[i] @ b[j]) for j in range(n)] for i in range(n)]
    rows = sum(-s[i][i] + math.log(sum(math.exp(s[i][j]) for j in range(n))) for i in range(n)) / n
    cols = sum(-s[j][j] + math.log(sum(math.exp(s[i][j]) for i in range(n))) for j in range(n)) / n
    return 0.5 * (rows + cols)


def brute_siglip(a, b, t: float, bias: float) -> float:
    n = len(a)
    scale = min(math.exp(t), MAX_LOGIT_SCALE)
    total = 0.0
    for i in range(n):
        for j in range(n):
            z = 1.0 if i == j else -1.0
            logit = scale * float(a[i] @ b[j]) + bias
            total += -math.log(1.0 / (1.0 + math.exp(-z * logit)))
    return total / n


@pytest.mark.parametrize("t", [0.0, 2.6592, math.log(100.0) + 0.5])
def test_clip_loss_matches_brute_force(t):
    a, b = features(7, 5, seed=1)
    got = clip_loss(a, b, torch.tensor(t, dtype=torch.float64))
    assert got.item() == pytest.approx(brute_clip(a, b, t), rel=1e-12)


def test_clip_loss_is_symmetric_in_the_modalities():
    a, b = features(6, 4, seed=2)
    t = torch.tensor(1.3, dtype=torch.float64)
    assert clip_loss(a, b, t).item() == pytest.approx(clip_loss(b, a, t).item(), rel=1e-12)


@pytest.mark.parametrize("t,bias", [(math.log(10.0), -10.0), (1.0, 0.3), (5.0, -2.0)])
def test_siglip_loss_matches_brute_force(t, bias):
    a, b = features(6, 4, seed=3)
    got = siglip_loss(a, b, torch.tensor(t, dtype=torch.float64), torch.tensor(bias, dtype=torch.float64))
    assert got.item() == pytest.approx(brute_siglip(a, b, t, bias), rel=1e-12)


def test_temperature_is_clamped_at_100_and_gets_no_gradient_above():
    assert exp_logit_scale(torch.tensor(10.0)).item() == pytest.approx(100.0)
    assert exp_logit_scale(torch.tensor(1.0)).item() == pytest.approx(math.e)
    a, b = features(5, 3, seed=4)
    above = torch.tensor(6.0, dtype=torch.float64, requires_grad=True)
    clip_loss(a, b, above).backward()
    assert above.grad.item() == 0.0
    below = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    clip_loss(a, b, below).backward()
    assert below.grad.item() != 0.0


def test_clip_loss_gradient_matches_finite_differences():
    a, b = features(5, 3, seed=5)
    a.requires_grad_()
    t = torch.tensor(1.7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, s: clip_loss(x, b, s), (a, t))
    assert torch.autograd.gradcheck(lambda x, s: siglip_loss(x, b, s, torch.tensor(-1.0, dtype=torch.float64)), (a, t))


def test_perfect_alignment_gives_low_loss_and_shuffled_high():
    a, _ = features(16, 32, seed=6)
    t = torch.tensor(math.log(50.0), dtype=torch.float64)
    aligned = clip_loss(a, a, t).item()
    shuffled = clip_loss(a, a[torch.randperm(16, generator=torch.Generator().manual_seed(0))], t).item()
    assert aligned < 0.5 < math.log(16) < shuffled + 1.0


def brute_group_soft_threshold(w: torch.Tensor, t: float) -> torch.Tensor:
    out = torch.zeros_like(w)
    for g in range(w.shape[0]):
        norm = math.sqrt(sum(float(x) ** 2 for x in w[g].flatten()))
        if norm > t:
            out[g] = w[g] * (1.0 - t / norm)
    return out


@pytest.mark.parametrize("t", [0.0, 0.5, 2.0, 100.0])
def test_group_soft_threshold_matches_brute_force(t):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(7, 3, 4, generator=g, dtype=torch.float64)  # (G, d_in, H)
    w[2] *= 0.01  # a group far below the threshold
    w[5] = 0.0  # an all-zero group stays zero (no division by zero)
    got = group_soft_threshold(w, t)
    assert torch.allclose(got, brute_group_soft_threshold(w, t), atol=1e-12)
    norms = w.flatten(1).norm(dim=1)
    assert torch.equal(got.flatten(1).abs().amax(dim=1) == 0, (norms <= t) | (norms == 0))
    if t == 0.0:
        assert torch.equal(got, w)


def test_group_soft_threshold_is_the_group_lasso_proximal_operator():
    """The result minimises 0.5 ||X - W||^2 + t sum_g ||X_g||: no random perturbation does better."""
    g = torch.Generator().manual_seed(4)
    w = torch.randn(6, 5, generator=g, dtype=torch.float64)
    t = 1.5

    def objective(x):
        return 0.5 * float(((x - w) ** 2).sum()) + t * float(x.norm(dim=1).sum())

    best = objective(group_soft_threshold(w, t))
    for scale in (1e-1, 1e-2, 1e-3):
        for _ in range(50):
            assert objective(group_soft_threshold(w, t) + scale * torch.randn(6, 5, generator=g, dtype=torch.float64)) >= best - 1e-12


def test_group_soft_threshold_rejects_a_negative_threshold():
    with pytest.raises(ValueError):
        group_soft_threshold(torch.ones(2, 2), -1.0)
