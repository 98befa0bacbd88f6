"""LANTERN rules: official resampling vs ours, truncation, and the bounded relaxation's exact TV bound."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from spec_helpers import tiny_gpt

from genaccel.samplers import build_sampler
from genaccel.samplers.acceptance import (
    BoundedRelaxRule,
    ExactRule,
    LanternRule,
    bounded_relax,
    lantern_neighbours,
    lantern_relax,
)
from genaccel.samplers.speculative import Draft, verify_window

D = torch.float64


def tv(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().sum() / 2)


def emitted_exactly(p: torch.Tensor, q: torch.Tensor, rule) -> torch.Tensor:
    """The exact distribution of the token one verified position emits when its draft x ~ q (enumerated over x):
    x with probability min(1, ratio), else a sample of the rule's residual."""
    out = torch.zeros_like(p)
    for x in torch.nonzero(q > 0).flatten():
        target = rule.target(p, x, q)
        accept = rule.ratio(target, q, x).clamp(max=1.0)
        out[x] += q[x] * accept
        out += q[x] * (1 - accept) * rule.residual(p, target, q, x)
    return out


def emitted_by_the_core(p: torch.Tensor, q: torch.Tensor, rule, samples: int = 200_000, seed: int = 0) -> torch.Tensor:
    """Empirical distribution of the token ``verify_window`` emits at a one-draft window with drafts x ~ q."""
    gen = torch.Generator().manual_seed(seed)
    V = p.shape[-1]
    p, q = p.float(), q.float()
    x = torch.multinomial(q, samples, replacement=True, generator=gen)[:, None]
    probs = torch.stack([p, p])[None].expand(samples, 2, V)
    v = verify_window(probs, Draft(tokens=x, q=q.expand(samples, 1, V)), rule, gen)
    return torch.bincount(v.tokens[:, 0], minlength=V).double() / samples


# The counterexample of docs/speculative.md: token 0 far from three close codes 1, 2, 3; delta 0.1, q uniform.
P_FAR = torch.tensor([0.85, 0.05, 0.05, 0.05], dtype=D)
CB_FAR = torch.tensor([[10.0, 0.0], [0.0, 0.0], [1.0, 0.0], [0.5, 0.8]])
Q_UNIFORM = torch.full((4,), 0.25, dtype=D)


def test_exact_enumeration_matches_the_verify_core():
    nb = lantern_neighbours(CB_FAR, 3)
    for rule in (ExactRule(), LanternRule(neighbours=nb, delta=0.1), LanternRule(neighbours=nb, delta=0.1, k=2,
                 resample="official"), BoundedRelaxRule(neighbours=nb, delta=0.1)):
        assert tv(emitted_by_the_core(P_FAR, Q_UNIFORM, rule), emitted_exactly(P_FAR, Q_UNIFORM, rule)) < 0.006


def test_lantern_emitted_step_is_not_bounded_by_delta():
    """Per draft, the relaxed target is within delta of p; the emitted distribution is 3 delta away here."""
    nb = lantern_neighbours(CB_FAR, 3)
    rule = LanternRule(neighbours=nb, delta=0.1)
    for x in range(4):
        assert tv(rule.target(P_FAR, torch.tensor(x)), P_FAR) <= 0.1 + 1e-12
    emitted = emitted_exactly(P_FAR, Q_UNIFORM, rule)
    torch.testing.assert_close(emitted, torch.tensor([0.55, 0.15, 0.15, 0.15], dtype=D))
    assert tv(emitted, P_FAR) == pytest.approx(0.3)


def test_bounded_relaxation_on_the_counterexample():
    nb = lantern_neighbours(CB_FAR, 3)
    rule = BoundedRelaxRule(neighbours=nb, delta=0.1)
    emitted = emitted_exactly(P_FAR, Q_UNIFORM, rule)
    torch.testing.assert_close(emitted, torch.tensor([0.75, 0.25 / 3, 0.25 / 3, 0.25 / 3], dtype=D))
    assert tv(emitted, P_FAR) == pytest.approx(0.1)
    accept = sum(Q_UNIFORM[x] * rule.ratio(rule.target(P_FAR, torch.tensor(x), Q_UNIFORM), Q_UNIFORM,
                                            torch.tensor(x)).clamp(max=1) for x in range(4))
    assert float(accept) == pytest.approx(0.5)  # exact rule: 1 - TV(p, q) = 0.4; + the moved 0.1


def random_case(seed: int, V: int, k: int, one_hot: bool, temperature: float = 1.0, top_k: int = 0):
    gen = torch.Generator().manual_seed(seed)
    logits = 2.0 * torch.randn(V, generator=gen, dtype=D) / temperature
    if top_k:
        logits[logits.argsort()[: V - top_k]] = -torch.inf
    p = logits.softmax(-1)
    if one_hot:
        q = torch.nn.functional.one_hot(torch.randint(V, (), generator=gen), V).to(D)
    else:
        q = (1.5 * torch.randn(V, generator=gen, dtype=D)).softmax(-1)
    nb = lantern_neighbours(torch.randn(V, 2, generator=gen), k)
    return p, q, nb


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 100_000), V=st.integers(3, 9), delta=st.floats(0.0, 1.0), one_hot=st.booleans(),
       temperature=st.sampled_from([0.5, 1.0, 2.0]), top_k=st.sampled_from([0, 2]), data=st.data())
def test_bounded_relaxation_emits_within_delta_of_p(seed, V, delta, one_hot, temperature, top_k, data):
    """Enumerated exactly: the emitted distribution IS the relaxed target r, and TV(r, p) <= delta."""
    k = data.draw(st.integers(1, V - 1))
    p, q, nb = random_case(seed, V, k, one_hot, temperature, top_k)
    rule = BoundedRelaxRule(neighbours=nb, delta=delta)
    emitted = emitted_exactly(p, q, rule)
    assert tv(emitted, p) <= delta + 1e-9
    if not one_hot:  # r depends on (p, q) only, so the position emits exactly r
        torch.testing.assert_close(emitted, bounded_relax(p, q, nb, delta), atol=1e-9, rtol=0)
    assert emitted[p == 0].sum() == 0  # truncation respected: filtered tokens are never emitted


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 100_000), V=st.integers(3, 12), delta=st.floats(0.0, 1.0), data=st.data())
def test_bounded_relaxation_moves_mass_towards_q_only(seed, V, delta, data):
    k = data.draw(st.integers(1, V - 1))
    p, q, nb = random_case(seed, V, k, one_hot=False)
    r = bounded_relax(p, q, nb, delta)
    assert r.sum().item() == pytest.approx(1.0)
    assert (r >= torch.minimum(p, q) - 1e-12).all() and (r <= torch.maximum(p, q) + 1e-12).all()
    moved = tv(r, p)
    assert moved <= delta + 1e-9
    # Acceptance 1 - TV(r, q) grows by exactly the moved mass.
    assert 1 - tv(r, q) == pytest.approx(1 - tv(p, q) + moved)
    gained = (r - p).clamp_min(0)  # only to receivers one of whose k nearest codes is a donor
    donors = p > q
    for s in torch.nonzero(gained > 1e-12).flatten():
        assert donors[nb[s]].any()


def test_bounded_relaxation_with_a_one_hot_draft_takes_nearest_neighbours_first():
    p = torch.tensor([0.4, 0.06, 0.3, 0.04, 0.2], dtype=D)
    nb = torch.tensor([[3, 1, 2, 4], [0, 2, 3, 4], [0, 1, 3, 4], [0, 1, 2, 4], [0, 1, 2, 3]])
    q = torch.nn.functional.one_hot(torch.tensor(0), 5).to(D)
    r = bounded_relax(p, q, nb, 0.15)
    torch.testing.assert_close(r, torch.tensor([0.55, 0.0, 0.3 - 0.05, 0.0, 0.2], dtype=D))


# ----------------------------------------------------------------------------- official resampling
def official_dynamic_reference(p, x, nb, k, delta):
    """LANTERN's ``evaluate_posterior`` for one deterministic draft (q = 1), as the released code defines it:
    (acceptance probability, distribution sampled on rejection)."""
    gtp = p.clone()
    px = gtp[x]
    cum = torch.cumsum(gtp[nb[x, :k]], 0)
    hits = torch.nonzero(cum <= ((delta - 1) * px if delta > 1 else delta)).flatten()
    last = int(hits[-1]) if hits.numel() else -1
    if last >= 0:
        px = px + cum[last]
    accept = min(1.0, float(px))  # before zeroing: px may be a view of gtp
    gtp[x] = 0
    if last >= 0:
        gtp[nb[x, : k + 1]] = 0
    if gtp.sum() == 0:
        gtp = torch.ones_like(gtp)
    return accept, gtp / gtp.sum()


def official_v1_reference(p, q, x, nb, k, delta):
    """LANTERN++'s ``evaluate_posterior_v1`` for one sampled draft (tree width 1): (acceptance, resample dist)."""
    px = p[x]
    cum = torch.cumsum(p[nb[x, :k]], 0)
    hits = torch.nonzero(cum <= ((delta - 1) * px if delta > 1 else delta)).flatten()
    last = int(hits[-1]) if hits.numel() else -1
    if last >= 0:
        px = px + cum[last]
    qq = q.clone()
    if last >= 0:
        qq[nb[x, : k + 1]] = 0
    gtp = (p - qq).clamp_min(0)
    if gtp.sum() == 0:
        gtp = torch.ones_like(gtp)
    return min(1.0, float(px / q[x])), gtp / gtp.sum()


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 100_000), V=st.integers(3, 10), delta=st.sampled_from([0.05, 0.1, 0.3, 0.9, 3.0, 10.0]),
       top_k=st.sampled_from([0, 2]), data=st.data())
def test_official_resampling_matches_the_official_definitions(seed, V, delta, top_k, data):
    k = data.draw(st.integers(1, V - 2))
    p, q, nb = random_case(seed, V, k + 1, one_hot=False, top_k=top_k)
    x = torch.tensor(data.draw(st.integers(0, V - 1)))
    one_hot = torch.nn.functional.one_hot(x, V).to(D)
    dynamic = LanternRule(neighbours=nb, delta=delta, k=k, resample="official", respect_truncation=False)
    accept, resample = official_dynamic_reference(p, x, nb, k, delta)
    t = dynamic.target(p, x, one_hot)
    assert float(dynamic.ratio(t, one_hot, x).clamp(max=1)) == pytest.approx(accept)
    if accept < 1:
        torch.testing.assert_close(dynamic.residual(p, t, one_hot, x), resample)
    v1 = LanternRule(neighbours=nb, delta=delta, k=k, resample="official-v1", respect_truncation=False)
    q = q.clone()
    q[x] = max(float(q[x]), 1e-3)
    q = q / q.sum()
    accept, resample = official_v1_reference(p, q, x, nb, k, delta)
    t = v1.target(p, x, q)
    assert float(v1.ratio(t, q, x).clamp(max=1)) == pytest.approx(accept)
    if accept < 1:
        torch.testing.assert_close(v1.residual(p, t, q, x), resample)


def test_official_and_our_resampling_differ_where_documented():
    """Ours zeroes the merged neighbours only; the official rule also the unmerged ones up to k + 1."""
    p = torch.tensor([0.3, 0.05, 0.25, 0.2, 0.2], dtype=D)
    nb = torch.tensor([[1, 2, 3, 4], [0, 2, 3, 4], [0, 1, 3, 4], [0, 1, 2, 4], [0, 1, 2, 3]])
    x = torch.tensor(0)
    q = torch.nn.functional.one_hot(x, 5).to(D)
    ours = LanternRule(neighbours=nb, delta=0.1, k=2)
    official = LanternRule(neighbours=nb, delta=0.1, k=2, resample="official")
    t = ours.target(p, x, q)
    assert float(t[0]) == pytest.approx(0.35)  # neighbour 1 merged (0.05 <= 0.1), neighbour 2 not (0.30 > 0.1)
    torch.testing.assert_close(ours.residual(p, t, q, x), torch.tensor([0, 0, 0.25, 0.2, 0.2], dtype=D) / 0.65)
    torch.testing.assert_close(official.residual(p, t, q, x), torch.tensor([0, 0, 0, 0, 1.0], dtype=D))
    # Exact emitted distributions (one-hot draft: accept with p~(x)).
    torch.testing.assert_close(emitted_exactly(p, q, ours), torch.tensor([0.35, 0, 0.25, 0.2, 0.2], dtype=D))
    torch.testing.assert_close(emitted_exactly(p, q, official), torch.tensor([0.35, 0, 0, 0, 0.65], dtype=D))


def test_official_resampling_falls_back_to_uniform():
    p = torch.tensor([0.5, 0.05, 0.45, 0.0], dtype=D)
    nb = torch.tensor([[1, 2, 3], [0, 2, 3], [0, 1, 3], [0, 1, 2]])
    x = torch.tensor(0)
    q = torch.nn.functional.one_hot(x, 4).to(D)
    rule = LanternRule(neighbours=nb, delta=0.1, k=1, resample="official", respect_truncation=False)
    torch.testing.assert_close(rule.residual(p, rule.target(p, x, q), q, x), torch.full((4,), 0.25, dtype=D))


# ----------------------------------------------------------------------------- truncation
def test_relaxed_rules_never_accept_a_filtered_draft_by_default():
    p = torch.tensor([0.6, 0.4, 0.0, 0.0], dtype=D)  # tokens 2, 3 filtered by top-k = 2
    nb = torch.tensor([[1, 2, 3], [0, 2, 3], [1, 0, 3], [1, 0, 2]])
    x = torch.tensor(2)
    q = torch.nn.functional.one_hot(x, 4).to(D)
    for rule in (LanternRule(neighbours=nb, delta=0.5), BoundedRelaxRule(neighbours=nb, delta=0.5)):
        t = rule.target(p, x, q)
        assert float(rule.ratio(t, q, x)) == 0.0
        assert rule.residual(p, t, q, x)[2:].sum() == 0
    official = LanternRule(neighbours=nb, delta=0.5, respect_truncation=False)  # LANTERN's code: x gains 0.4
    assert float(official.ratio(official.target(p, x, q), q, x)) == pytest.approx(0.4)


def test_lantern_relax_default_is_the_official_definition():
    p = torch.tensor([[0.6, 0.4, 0.0]])
    nb = torch.tensor([[1, 2], [0, 2], [1, 0]])
    x = torch.tensor([2])
    assert lantern_relax(p, x, nb, 0.5)[0, 2].item() == pytest.approx(0.4)
    assert torch.equal(lantern_relax(p, x, nb, 0.5, respect_truncation=True), p)


# ----------------------------------------------------------------------------- sampler options
@pytest.mark.parametrize("options,rule_type,resample,respect", [
    ({}, LanternRule, "ours", True),
    ({"resample": "official"}, LanternRule, "official", False),
    ({"resample": "official-v1", "truncation": "respect"}, LanternRule, "official-v1", True),
    ({"relax": "bounded"}, BoundedRelaxRule, None, True),
    ({"relax": "bounded", "truncation": "ignore"}, BoundedRelaxRule, None, False),
])
def test_sampler_options_choose_the_rule(options, rule_type, resample, respect):
    model = tiny_gpt(block=16)
    sampler = build_sampler("lantern", lantern_k=4, **options)
    sampler.set_codebook(torch.randn(model.vocab_size, 4, generator=torch.Generator().manual_seed(0)))
    rule = sampler.acceptance_rule(model)
    assert type(rule) is rule_type and rule.respect_truncation is respect
    if resample:
        assert rule.resample == resample
        assert rule.neighbours.shape[1] == (4 if resample == "ours" else 5)


@pytest.mark.parametrize("options,needle", [
    ({"resample": "dynamic"}, "resample"),
    ({"relax": "tree"}, "relax"),
    ({"relax": "bounded", "lantern_delta": 3.0}, "lantern_delta in"),
    ({"relax": "bounded", "resample": "official"}, "resample"),
    ({"truncation": "off"}, "truncation"),
])
def test_bad_lantern_options_give_one_clear_error(options, needle):
    with pytest.raises(ValueError, match=needle):
        build_sampler("lantern", **options)


def test_lantern_flags_reach_the_sampler_from_the_command_line():
    from genaccel.bench.samplers import sampler_options
    from genaccel.cli import build_sample_parser

    args = build_sample_parser().parse_args(["--sampler", "lantern", "--resample", "official", "--relax", "lantern",
                                             "--truncation", "respect"])
    assert (args.resample, args.relax, args.truncation) == ("official", "lantern", "respect")
    opts = sampler_options(["lantern.relax=bounded", "lantern.lantern_delta=0.2"], {"lantern": "lantern"})["lantern"]
    assert build_sampler("lantern", **opts).options.relax == "bounded"


@pytest.mark.parametrize("options", [{}, {"relax": "bounded"}, {"resample": "official"}, {"resample": "official-v1"}])
def test_lantern_modes_generate_and_respect_top_k(options):
    from test_gsd import filtered_tokens

    model = tiny_gpt(block=16, seed=2)
    sampler = build_sampler("lantern", lantern_k=8, lantern_delta=0.5, top_k=4, **options)
    sampler.set_codebook(torch.randn(model.vocab_size, 4, generator=torch.Generator().manual_seed(0)))
    torch.manual_seed(1)
    from genaccel.models.drafter import EagleDrafter

    sampler.set_drafter(EagleDrafter.from_target(model).eval())
    out = sampler.generate(model, torch.tensor([0, 1]), torch.Generator().manual_seed(0))
    assert out.tokens.shape == (2, 16) and out.stats.step_compression >= 1.0
    bad = filtered_tokens(model, out.tokens, torch.tensor([0, 1]), sampler.options)
    if sampler.options.respect_truncation:
        assert bad == 0
