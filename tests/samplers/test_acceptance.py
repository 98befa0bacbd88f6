"""Acceptance rules on hand-made distributions: exact, LANTERN relaxation, GSD groups."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from genaccel.samplers.acceptance import (
    ExactRule,
    GroupedRule,
    LanternRule,
    gsd_group,
    lantern_neighbours,
    lantern_relax,
    residual_distribution,
)
from genaccel.samplers.speculative import Draft, verify_window


def random_dist(gen: torch.Generator, shape: tuple[int, ...], sharp: float = 2.0) -> torch.Tensor:
    return (sharp * torch.randn(*shape, generator=gen)).softmax(-1)


def output_distribution(p: torch.Tensor, q: torch.Tensor, rule, samples: int = 200_000, seed: int = 0) -> torch.Tensor:
    """Empirical distribution of the token emitted at one position when drafts are drawn from q."""
    gen = torch.Generator().manual_seed(seed)
    V = p.shape[-1]
    x = torch.multinomial(q, samples, replacement=True, generator=gen)[:, None]
    probs = torch.stack([p, p])[None].expand(samples, 2, V)  # position 0 is verified, position 1 is the bonus
    v = verify_window(probs, Draft(tokens=x, q=q.expand(samples, 1, V)), rule, gen)
    return torch.bincount(v.tokens[:, 0], minlength=V).float() / samples


def test_exact_rule_emits_p_for_any_proposal():
    gen = torch.Generator().manual_seed(0)
    p, q = random_dist(gen, (12,)), random_dist(gen, (12,))
    emitted = output_distribution(p, q, ExactRule())
    assert (emitted - p).abs().sum() / 2 < 0.01  # TV; sampling noise ~ 0.003 at 2e5 draws


def test_residual_is_normalised_positive_part():
    p = torch.tensor([0.5, 0.3, 0.2])
    q = torch.tensor([0.2, 0.5, 0.3])
    assert torch.allclose(residual_distribution(p, q), torch.tensor([1.0, 0.0, 0.0]))
    assert torch.allclose(residual_distribution(p, p), p)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), delta=st.floats(0.0, 1.0), k=st.integers(1, 15))
def test_lantern_relax_moves_at_most_delta_of_mass(seed, delta, k):
    gen = torch.Generator().manual_seed(seed)
    p = random_dist(gen, (6, 16), sharp=3.0)
    x = torch.randint(16, (6,), generator=gen)
    nb = lantern_neighbours(torch.randn(16, 3, generator=gen), k)
    relaxed = lantern_relax(p, x, nb, delta)
    assert torch.allclose(relaxed.sum(-1), torch.ones(6), atol=1e-5)
    assert (relaxed >= 0).all()
    assert ((relaxed - p).abs().sum(-1) / 2 <= delta + 1e-6).all()
    changed = (relaxed - p).abs() > 1e-7
    allowed = torch.zeros_like(changed).scatter_(-1, torch.cat([nb[x], x[:, None]], -1), True)
    assert not (changed & ~allowed).any()  # only x and its k nearest codes change


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), lam=st.floats(1.0, 20.0, exclude_min=True))
def test_lantern_plus_plus_lambda_bounds_the_ratio(seed, lam):
    gen = torch.Generator().manual_seed(seed)
    p = random_dist(gen, (6, 16), sharp=3.0)
    x = torch.randint(16, (6,), generator=gen)
    relaxed = lantern_relax(p, x, lantern_neighbours(torch.randn(16, 3, generator=gen), 8), lam)
    px = p.gather(-1, x[:, None])
    assert (relaxed.gather(-1, x[:, None]) <= lam * px * (1 + 1e-5)).all()


def test_lantern_emits_the_relaxed_target_with_one_hot_drafts():
    """With q = one-hot at x the emitted distribution is exactly lantern_relax(p, x): TV to p <= delta."""
    gen = torch.Generator().manual_seed(1)
    p = random_dist(gen, (10,))
    nb = lantern_neighbours(torch.randn(10, 2, generator=gen), 4)
    x, delta = torch.tensor(3), 0.2
    q = torch.nn.functional.one_hot(x, 10).float()
    emitted = output_distribution(p, q, LanternRule(neighbours=nb, delta=delta))
    relaxed = lantern_relax(p[None], x[None], nb, delta)[0]
    assert (emitted - relaxed).abs().sum() / 2 < 0.01
    assert (emitted - p).abs().sum() / 2 <= delta + 0.01
    assert torch.equal(lantern_relax(p[None], x[None], nb, 0.0)[0], p)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), group=st.integers(1, 40), thr=st.floats(0.01, 1.0),
       dthr=st.sampled_from([0.3, 1.0, math.inf]))
def test_gsd_group_members_pass_every_filter(seed, group, thr, dthr):
    gen = torch.Generator().manual_seed(seed)
    V = 32
    p = random_dist(gen, (5, V), sharp=2.0)
    x = torch.randint(V, (5,), generator=gen)
    codebook = torch.nn.functional.normalize(torch.randn(V, 4, generator=gen), dim=-1)
    member = gsd_group(p, x, group, thr, codebook, dthr)
    rank = p.argsort(-1, descending=True).argsort(-1)
    px, rx = p.gather(-1, x[:, None]), rank.gather(-1, x[:, None])
    dist = (codebook[None] - codebook[x][:, None]).pow(2).sum(-1)
    window = (rank - rx >= -(group // 2)) & (rank - rx < group - group // 2)
    ok = window & ((p - px).abs() < thr) & (dist < dthr)
    is_x = torch.zeros_like(member).scatter_(-1, x[:, None], True)
    assert member[is_x].all()
    assert not (member & ~(ok | is_x)).any()
    assert torch.equal(member, ok | is_x)  # and nothing that passes is left out
    assert (member.sum(-1) <= group).all()


def test_grouped_ratio_sums_over_the_group_and_composes_with_lantern():
    p = torch.tensor([[0.30, 0.28, 0.22, 0.20]])
    q = torch.tensor([[0.05, 0.90, 0.03, 0.02]])
    x = torch.tensor([1])
    exact = ExactRule().ratio(p, q, x)
    grouped = GroupedRule(inner=ExactRule(), group_size=8, prob_threshold=0.15, embed_threshold=math.inf)
    assert exact.item() == pytest.approx(0.28 / 0.90)
    assert grouped.ratio(grouped.target(p, x), q, x).item() == pytest.approx(1.0 / 1.0)
    nb = torch.tensor([[1], [0], [3], [2]])
    composed = GroupedRule(inner=LanternRule(neighbours=nb, delta=0.3), group_size=1, prob_threshold=1.0,
                           embed_threshold=math.inf)
    t = composed.target(p, x)
    assert t[0, 1].item() == pytest.approx(0.58)  # neighbour 0 (mass 0.30 <= delta) merged into x
    assert composed.ratio(t, q, x).item() == pytest.approx(0.58 / 0.90)
