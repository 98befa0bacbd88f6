"""GSD groups: the official code's slice and fallback vs ours, truncation, and the sampler's options."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from spec_helpers import tiny_gpt

from genaccel.samplers import build_sampler
from genaccel.samplers.acceptance import (
    GSD_CLOSE_TABLE_MAX_CODES,
    ExactRule,
    GroupedRule,
    codebook_close_table,
    codebook_distance,
    gsd_group,
    gsd_group_mass,
    gsd_official_group,
)
from genaccel.samplers.base import SamplingOptions, target_probs


def filtered_tokens(model, tokens: torch.Tensor, labels: torch.Tensor, opts: SamplingOptions) -> int:
    """How many emitted tokens have probability 0 under the AR target (outside top-k / top-p)."""
    with torch.no_grad():
        logits = model.teacher_forced(labels, tokens).logits
        if opts.use_cfg:
            uncond = model.teacher_forced(torch.full_like(labels, model.null_class), tokens).logits
            logits = torch.cat([logits, uncond])
        probs = target_probs(logits, opts, torch.arange(tokens.shape[1]))
    return int((probs.gather(-1, tokens[..., None]) == 0).sum())


def official_gsd_ratio(logits, p, q, x: int, p_thr: float, sims=None, d_thr: float = math.inf) -> float:
    """Acceptance probability of the released GSD code (``SpeculativeSampler.__call__``) for one draft x.

    The processed logits are sorted ascending, the slice ``order[r - 7 : r + 7]`` around x's rank r forms the
    candidates (Python slicing: a negative start wraps), members need ``|p(t) - p(x)| < p_thr`` and an
    embedding distance below ``d_thr``; an empty slice raises inside the official ``try`` and falls back to
    ``min(1, p(x)/q(x))``.
    """
    order = logits.argsort(stable=True).tolist()
    r = order.index(x)
    chosen = order[r - 7 : r + 7]
    if not chosen:
        return min(1.0, float(p[x] / q[x]))
    mask = [abs(float(p[t] - p[x])) < p_thr and (sims is None or float(sims[x, t]) < d_thr) for t in chosen]
    num = sum(float(p[t]) for t, m in zip(chosen, mask) if m)
    den = sum(float(q[t]) for t, m in zip(chosen, mask) if m)
    ratio = num / den if den else (math.inf if num else math.nan)
    return min(1.0, ratio) if not math.isnan(ratio) else math.nan


@settings(max_examples=120, deadline=None)
@given(seed=st.integers(0, 100_000), V=st.sampled_from([5, 10, 13, 14, 15, 32, 64]), top_k=st.sampled_from([0, 3, 20]),
       thr=st.sampled_from([0.01, 0.15, 0.3, 1.0]), dthr=st.sampled_from([0.5, 2.0, math.inf]),
       one_hot=st.booleans(), data=st.data())
def test_official_group_matches_the_released_code(seed, V, top_k, thr, dthr, one_hot, data):
    gen = torch.Generator().manual_seed(seed)
    logits = 2.0 * torch.randn(V, generator=gen, dtype=torch.float64)
    if 0 < top_k < V:
        logits[logits.argsort()[: V - top_k]] = -torch.inf
    p = logits.softmax(-1)
    x = data.draw(st.integers(0, V - 1))
    if one_hot:
        q = torch.nn.functional.one_hot(torch.tensor(x), V).double()
    else:
        q = (torch.randn(V, generator=gen, dtype=torch.float64)).softmax(-1)
    codebook = torch.nn.functional.normalize(torch.randn(V, 4, generator=gen, dtype=torch.float64), dim=-1)
    sims = (codebook[:, None] - codebook[None]).pow(2).sum(-1)
    expected = official_gsd_ratio(logits, p, q, x, thr, sims if math.isfinite(dthr) else None, dthr)
    rule = GroupedRule(inner=ExactRule(), prob_threshold=thr, codebook=codebook, embed_threshold=dthr,
                       mode="official", respect_truncation=False)
    got = float(rule.ratio(p, q, torch.tensor(x)).clamp(max=1.0))
    if math.isnan(expected):
        assert math.isnan(got)
    else:
        assert got == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_official_slice_is_seven_below_x_and_six_above():
    p = torch.arange(1, 31, dtype=torch.float64)
    p = p / p.sum()  # token t has rank t
    member, empty = gsd_official_group(p, torch.tensor(15), prob_threshold=1.0)
    assert not empty and torch.equal(torch.nonzero(member).flatten(), torch.arange(8, 22))
    member, empty = gsd_official_group(p, torch.tensor(27), prob_threshold=1.0)
    assert torch.equal(torch.nonzero(member).flatten(), torch.arange(20, 30))  # cut at the top
    member, empty = gsd_official_group(p, torch.tensor(6), prob_threshold=1.0)
    assert empty and not member.any()  # start wraps to -1: empty slice
    q = torch.full((30,), 1 / 30, dtype=torch.float64)
    rule = GroupedRule(inner=ExactRule(), mode="official", prob_threshold=1.0, embed_threshold=math.inf)
    assert float(rule.ratio(p, q, torch.tensor(6))) == pytest.approx(float(p[6] * 30))  # exact-test fallback


def test_our_group_is_the_papers_symmetric_window():
    p = torch.arange(1, 31, dtype=torch.float64)
    p = p / p.sum()
    ours = gsd_group(p, torch.tensor(15), 14, 1.0)
    assert torch.equal(torch.nonzero(ours).flatten(), torch.arange(9, 23))  # 7 above (more probable), 6 below + x
    assert gsd_group(p, torch.tensor(6), 14, 1.0)[:6].all()  # no empty group at low ranks


def test_gsd_never_accepts_a_filtered_draft_by_default():
    p = torch.tensor([0.5, 0.3, 0.2, 0.0, 0.0], dtype=torch.float64)
    x = torch.tensor(3)
    q = torch.nn.functional.one_hot(x, 5).double()
    ours = GroupedRule(inner=ExactRule(), group_size=10, prob_threshold=0.5, embed_threshold=math.inf)
    assert float(ours.ratio(p, q, x)) == 0.0
    ignore = GroupedRule(inner=ExactRule(), group_size=10, prob_threshold=0.5, embed_threshold=math.inf,
                         respect_truncation=False)
    assert float(ignore.ratio(p, q, x)) > 0.0  # the group's mass credits the filtered draft
    p15 = torch.cat([p, torch.zeros(10, dtype=torch.float64)]).roll(10)  # 15 tokens
    x = torch.tensor(13)  # p = 0, ascending rank 10 (ties by token id): the slice holds tokens 10, 11, 12
    q = torch.nn.functional.one_hot(x, 15).double()
    official = GroupedRule(inner=ExactRule(), mode="official", prob_threshold=0.5, embed_threshold=math.inf,
                           respect_truncation=False)
    assert float(official.ratio(p15, q, x)) > 0.0


@pytest.mark.parametrize("options,mode,respect", [
    ({}, "ours", True),
    ({"group_mode": "official"}, "official", False),
    ({"group_mode": "official", "truncation": "respect"}, "official", True),
    ({"truncation": "ignore", "lantern_delta": 0.2}, "ours", False),
])
def test_sampler_options_choose_the_group(options, mode, respect):
    model = tiny_gpt(block=16)
    sampler = build_sampler("gsd", lantern_k=4, **options)
    sampler.set_codebook(torch.randn(model.vocab_size, 4, generator=torch.Generator().manual_seed(0)))
    rule = sampler.acceptance_rule(model)
    assert rule.mode == mode and rule.respect_truncation is respect
    if "lantern_delta" in options:
        assert rule.inner.respect_truncation is respect


@pytest.mark.parametrize("options,needle", [
    ({"group_mode": "paper"}, "group_mode"),
    ({"group_mode": "official", "group_size": 25}, "group_size applies"),
    ({"truncation": "maybe"}, "truncation"),
])
def test_bad_gsd_options_give_one_clear_error(options, needle):
    with pytest.raises(ValueError, match=needle):
        build_sampler("gsd", **options)


def test_gsd_flags_reach_the_sampler_from_the_command_line():
    from genaccel.bench.samplers import sampler_options
    from genaccel.cli import build_sample_parser

    args = build_sample_parser().parse_args(["--sampler", "gsd", "--group-mode", "official", "--truncation", "ignore"])
    assert (args.group_mode, args.truncation) == ("official", "ignore")
    opts = sampler_options(["gsd.group_mode=official"], {"gsd": "gsd"})["gsd"]
    assert build_sampler("gsd", **opts).options.group_mode == "official"


def test_top_k_is_respected_unless_an_official_mode_is_chosen():
    """Random-init Jacobi drafts are mostly outside top-k; ours never emits them, the official group does."""
    model = tiny_gpt(block=16, seed=2)
    labels = torch.tensor([0, 1, 2, 3])
    counts = {}
    for mode in ("ours", "official"):
        sampler = build_sampler("gsd", group_mode=mode, top_k=3, init="random", prob_threshold=1.0,
                                embed_threshold=math.inf)
        bad = 0
        for seed in range(3):
            out = sampler.generate(model, labels, torch.Generator().manual_seed(seed))
            bad += filtered_tokens(model, out.tokens, labels, sampler.options)
        counts[mode] = bad
    assert counts["ours"] == 0
    assert counts["official"] > 0


# ----------------------------------------------------------------------------- the cheaper group (issue #14)
def reference_gsd_group(p, x, group_size, prob_threshold, codebook=None, embed_threshold=math.inf, close=None):
    """The group code before issue #14's engine work (sorted top-k, where-fills, per-call distances), kept
    as the reference the cheaper :func:`gsd_group` must reproduce bit for bit (``close`` is ignored)."""
    above_n = min(group_size // 2, p.shape[-1] - 1)
    below_n = min(group_size - 1 - group_size // 2, p.shape[-1] - 1)
    px = p.gather(-1, x.unsqueeze(-1))
    above = torch.where(p > px, p, math.inf).topk(above_n, dim=-1, largest=False)
    below = torch.where(p < px, p, -math.inf).topk(below_n, dim=-1, largest=True)
    xs = x.unsqueeze(-1)
    inside = torch.cat([above.values.isfinite(), below.values.isfinite(), torch.ones_like(xs, dtype=torch.bool)], -1)
    cand = torch.where(inside, torch.cat([above.indices, below.indices, xs], dim=-1), xs)
    keep = (p.gather(-1, cand) - px).abs() < prob_threshold
    if codebook is not None and math.isfinite(embed_threshold):
        cb = codebook.to(p.device, torch.float32)
        keep &= (cb[cand] - cb[x].unsqueeze(-2)).pow(2).sum(-1) < embed_threshold
    keep |= cand == xs
    return torch.zeros_like(p, dtype=torch.bool).scatter_(-1, cand, keep)


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 100_000), V=st.sampled_from([2, 5, 32, 1024]), group=st.sampled_from([1, 2, 3, 25, 100]),
       thr=st.sampled_from([0.05, 0.3, 1.0]), dthr=st.sampled_from([0.5, 2.0, math.inf]), ties=st.booleans())
def test_cheaper_group_is_bit_identical_to_the_reference(seed, V, group, thr, dthr, ties):
    gen = torch.Generator().manual_seed(seed)
    p = (6.0 * torch.randn(3, 7, V, generator=gen)).softmax(-1)
    if ties:  # many exact ties, also at the group's edges and with x
        p = (p * 20).round()
        p = p / p.sum(-1, keepdim=True)
    x = torch.randint(V, (3, 7), generator=gen)
    codebook = torch.nn.functional.normalize(torch.randn(V, 8, generator=gen), dim=-1)
    want = reference_gsd_group(p, x, group, thr, codebook, dthr)
    assert torch.equal(gsd_group(p, x, group, thr, codebook, dthr), want)
    if math.isfinite(dthr):
        assert torch.equal(gsd_group(p, x, group, thr, codebook, dthr, close=codebook_close_table(codebook, dthr)), want)


def test_close_table_is_the_per_call_distance_test():
    gen = torch.Generator().manual_seed(0)
    codebook = torch.nn.functional.normalize(torch.randn(300, 8, generator=gen, dtype=torch.float64), dim=-1)
    table = codebook_close_table(codebook, 1.0, rows=64)  # several row chunks, the last one short
    codes = torch.arange(300)
    assert torch.equal(table, codebook_distance(codebook, codes, codes.expand(300, 300)) < 1.0)
    assert codebook_close_table(torch.zeros(GSD_CLOSE_TABLE_MAX_CODES + 1, 2), 1.0) is None


def test_gsd_tokens_are_unchanged_by_the_cheaper_group(monkeypatch):
    """A sampled fp32 run with a fixed seed emits the same tokens with the reference group code (options where
    the group decides: the same run with group_size 9, prob_threshold 0.25 or embed_threshold 1.6 differs)."""
    from genaccel.samplers import acceptance

    model = tiny_gpt(block=16, seed=1, head_std=0.1)
    labels = torch.tensor([0, 1, 2, 3])

    def run():
        sampler = build_sampler("gsd", group_size=10, prob_threshold=0.5, embed_threshold=2.0, window=8)
        sampler.set_codebook(torch.nn.functional.normalize(
            torch.randn(model.vocab_size, 4, generator=torch.Generator().manual_seed(0)), dim=-1))
        return sampler.generate(model, labels, torch.Generator().manual_seed(3)).tokens

    new = run()
    monkeypatch.setattr(acceptance, "gsd_group_mass", reference_group_mass)
    assert torch.equal(run(), new)


def reference_group_mass(p, q, x, group_size, prob_threshold, codebook=None, embed_threshold=math.inf, close=None):
    """GSD's ratio terms from the definition: p and q summed over the (..., V) mask of the reference group."""
    group = reference_gsd_group(p, x, group_size, prob_threshold, codebook, embed_threshold)
    return (p * group).sum(-1), (q * group).sum(-1), p.gather(-1, x.unsqueeze(-1)).squeeze(-1)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 100_000), V=st.sampled_from([2, 5, 32, 1024]), group=st.sampled_from([1, 2, 3, 25, 100]),
       thr=st.sampled_from([0.05, 0.3, 1.0]), dthr=st.sampled_from([0.5, 2.0, math.inf]), ties=st.booleans())
def test_group_mass_is_the_masked_sum_over_the_group(seed, V, group, thr, dthr, ties):
    """The ratio's sums over the candidates equal summing p and q over the group's V-wide mask (float64, so
    only summation order could differ)."""
    gen = torch.Generator().manual_seed(seed)
    p = (6.0 * torch.randn(3, 7, V, generator=gen, dtype=torch.float64)).softmax(-1)
    if ties:
        p = (p * 20).round()
        p = p / p.sum(-1, keepdim=True)
    q = (3.0 * torch.randn(3, 7, V, generator=gen, dtype=torch.float64)).softmax(-1)
    x = torch.randint(V, (3, 7), generator=gen)
    codebook = torch.nn.functional.normalize(torch.randn(V, 8, generator=gen), dim=-1)
    want_p, want_q, want_x = reference_group_mass(p, q, x, group, thr, codebook, dthr)
    for close in ([None, codebook_close_table(codebook, dthr)] if math.isfinite(dthr) else [None]):
        got_p, got_q, got_x = gsd_group_mass(p, q, x, group, thr, codebook, dthr, close=close)
        assert torch.equal(got_x, want_x)
        torch.testing.assert_close(got_p, want_p, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(got_q, want_q, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("mode", ["ours", "official"])
@pytest.mark.parametrize("chunk", [1, 3, 4])
def test_lazy_chunks_accept_exactly_what_the_whole_window_accepts(mode, chunk):
    """The verify core evaluates GSD's group ``verify_chunk`` positions at a time and stops once every row
    has rejected or reached its cap: accepted lengths and emitted tokens equal evaluating all positions
    (same coins), over random windows with per-row caps, and fewer positions are evaluated."""
    from genaccel.samplers import speculative
    from genaccel.samplers.speculative import Draft, verify_window

    gen = torch.Generator().manual_seed(0)
    B, L, V = 64, 9, 40
    p = torch.softmax(torch.randn(B, L, V, generator=gen) * 2, -1)
    q = torch.softmax(p[:, :-1].log() + torch.randn(B, L - 1, V, generator=gen), -1)  # close to p: long runs
    x = torch.multinomial(q.reshape(-1, V), 1, generator=gen).view(B, L - 1)
    codebook = torch.nn.functional.normalize(torch.randn(V, 4, generator=gen), dim=-1)
    limit = torch.randint(0, L, (B,), generator=gen)
    rule = GroupedRule(ExactRule(), group_size=10, prob_threshold=0.2, codebook=codebook, embed_threshold=2.0,
                       mode=mode, verify_chunk=chunk)
    whole = GroupedRule(ExactRule(), group_size=10, prob_threshold=0.2, codebook=codebook, embed_threshold=2.0,
                        mode=mode, verify_chunk=0)
    seen = []
    real = speculative.leading_accepted

    def counting(p, draft, rule, u, cap):
        target, run = real(p, draft, rule, u, cap)
        seen.append(target.shape[1])
        return target, run

    speculative.leading_accepted = counting
    try:
        for lim in (None, limit):
            a = verify_window(p, Draft(x, q), rule, torch.Generator().manual_seed(1), lim)
            b = verify_window(p, Draft(x, q), whole, torch.Generator().manual_seed(1), lim)
            assert torch.equal(a.accepted, b.accepted) and torch.equal(a.tokens, b.tokens)
    finally:
        speculative.leading_accepted = real
    assert seen[1] == seen[3] == L - 1 and max(seen[0], seen[2]) <= L - 1
    assert int((a.accepted > 1).sum()) > B // 4  # runs long enough that later chunks were needed
