"""Every strategy's selection rule against a direct (slow, loop-based) reference computation."""

from __future__ import annotations

import math

import pytest
import torch

from genaccel.pruning.strategies import (
    SpanSignals,
    available_strategies,
    build_strategy,
    largest_remainder,
)

N = 40
NO_RESERVE = torch.zeros(0, dtype=torch.long)


def signals(seed: int = 0, n: int = N, **extra) -> SpanSignals:
    generator = torch.Generator().manual_seed(seed)
    base = {
        "embeds": torch.randn(n, 8, generator=generator),
        "cls_attention": torch.rand(n, generator=generator),
        "cls_attention_shallow": torch.rand(n, generator=generator),
        "vision_keys": torch.randn(n, 4, generator=generator),
        "text_attention": torch.rand(n, generator=generator),
        "key_norms": torch.rand(n, generator=generator),
        "text_pivots": torch.randn(3, 8, generator=generator),
    }
    return SpanSignals(**{**base, **extra})


def select(name: str, s: SpanSignals, budget: int, reserve=NO_RESERVE, seed: int = 0, **options):
    return build_strategy(name, **options).select(s, budget, reserve, torch.Generator().manual_seed(seed))


def cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.dot(a, b) / (a.norm() * b.norm()))


def reference_top(scores: torch.Tensor, k: int) -> list[int]:
    ranked = sorted(range(len(scores)), key=lambda i: -float(scores[i]))
    return sorted(ranked[:k])


@pytest.mark.parametrize("name,field", [("fastervlm", "cls_attention"), ("fastv", "text_attention")])
def test_score_strategies_keep_the_top_scores(name, field):
    s = signals()
    assert select(name, s, 12).keep.tolist() == reference_top(getattr(s, field), 12)


def test_score_strategy_with_reserve_fills_the_rest_by_score():
    s = signals()
    reserve = torch.tensor([0, 20])
    keep = select("fastervlm", s, 6, reserve).keep.tolist()
    rest = [i for i in reference_top(s.cls_attention.clone().index_fill_(0, reserve, -1.0), 4)]
    assert keep == sorted([0, 20, *rest])


def test_keep_all_ignores_the_budget():
    assert select("keep-all", signals(), 3).keep.tolist() == list(range(N))


def test_random_is_seeded_distinct_and_sized():
    s = signals()
    first, again, other = (select("random", s, 10, seed=seed).keep for seed in (1, 1, 2))
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert first.unique().numel() == 10 and bool((first.diff() > 0).all())


def test_uniform_takes_bin_centres():
    assert select("uniform", signals(), 4).keep.tolist() == [math.floor((i + 0.5) * N / 4) for i in range(4)]


def test_pool_averages_each_anchor_with_its_nearest_tokens():
    s = signals()
    result = select("pool", s, 5)
    anchors = result.keep.tolist()
    for slot, anchor in enumerate(anchors):
        members = [i for i in range(N) if min(anchors, key=lambda a: (abs(i - a), a)) == anchor]
        torch.testing.assert_close(result.embeds[slot], s.embeds[members].mean(0))


def reference_divprune(x: torch.Tensor, k: int) -> list[int]:
    n = len(x)
    d = [[1 - cos(x[i], x[j]) for j in range(n)] for i in range(n)]
    chosen = [max(range(n), key=lambda i: min(d[i][j] for j in range(n) if j != i))]
    while len(chosen) < k:
        rest = [i for i in range(n) if i not in chosen]
        chosen.append(max(rest, key=lambda i: min(d[s][i] for s in chosen)))
    return sorted(chosen)


def test_divprune_is_farthest_point_from_the_most_isolated_token():
    s = signals(3, n=25)
    assert select("divprune", s, 9).keep.tolist() == reference_divprune(s.embeds, 9)


def reference_mmr(importance: torch.Tensor, x: torch.Tensor, k: int, lam: float) -> list[int]:
    lo, hi = float(importance.min()), float(importance.max())
    imp = [(float(v) - lo) / (hi - lo) for v in importance]
    chosen: list[int] = []
    while len(chosen) < k:
        rest = [i for i in range(len(x)) if i not in chosen]

        def value(i):
            penalty = max([cos(x[i], x[j]) for j in chosen], default=-2.0)
            return lam * imp[i] - (1 - lam) * penalty

        chosen.append(max(rest, key=value))
    return sorted(chosen)


def test_mmr_balances_cls_importance_and_similarity():
    s = signals(4, n=25)
    assert select("mmr", s, 8, lam=0.6).keep.tolist() == reference_mmr(s.cls_attention, s.embeds, 8, 0.6)


def test_mmr_without_cls_uses_distinctiveness_from_the_mean():
    s = signals(5, n=25, cls_attention=None)
    mean = s.embeds.mean(0)
    distinct = torch.tensor([1 - cos(e, mean) for e in s.embeds])
    assert select("mmr", s, 7).keep.tolist() == reference_mmr(distinct, s.embeds, 7, 0.5)


def reference_visionzip(s: SpanSignals, budget: int, share: float):
    n_context = round(share * budget)
    dominant = reference_top(s.cls_attention, budget - n_context)
    rest = [i for i in range(N) if i not in dominant]
    step = max(1, len(rest) // n_context)
    targets = rest[::step][:n_context]
    groups = {t: [t] for t in targets}
    for i in rest:
        if i not in targets:
            groups[max(targets, key=lambda t: cos(s.vision_keys[i], s.vision_keys[t]))].append(i)
    keep = sorted(dominant + targets)
    embeds = torch.stack([s.embeds[groups[i]].mean(0) if i in groups else s.embeds[i] for i in keep])
    return keep, embeds


def test_visionzip_keeps_dominant_and_merges_the_rest_into_contextual_targets():
    s = signals(6)
    result = select("visionzip", s, 16, contextual=0.25)
    keep, embeds = reference_visionzip(s, 16, 0.25)
    assert result.keep.tolist() == keep
    torch.testing.assert_close(result.embeds, embeds)


def anyres_signals(seed: int) -> SpanSignals:
    """A 4x4 base image (partition 0) and a 1x2 crop grid of 4x4 tokens each (partitions 1, 2)."""
    partition = torch.tensor([0] * 16 + [1] * 16 + [2] * 16)
    column = torch.arange(16) % 4
    base_crop = torch.cat([torch.where(column < 2, 1, 2), torch.full((32,), -1)])
    return signals(seed, n=48, partition=partition, base_crop=base_crop)


def test_hired_splits_the_budget_by_shallow_attention_votes():
    s = anyres_signals(7)
    budget, alpha = 12, 0.5
    result = select("hired", s, budget, alpha=alpha)
    base_budget = int(budget * alpha)
    votes = [int(s.base_crop[i]) for i in reference_top(s.cls_attention_shallow[:16], int((1 - alpha) * 16))]
    shares = [(budget - base_budget) * votes.count(c) / len(votes) for c in (1, 2)]
    floors = [math.floor(v) for v in shares]
    if sum(floors) < budget - base_budget:
        floors[max((0, 1), key=lambda j: shares[j] - floors[j])] += 1
    expected = []
    for part, count in zip((0, 1, 2), [base_budget, *floors]):
        members = [i for i in range(48) if int(s.partition[i]) == part]
        expected += [members[j] for j in reference_top(s.cls_attention[members], count)]
    assert result.keep.tolist() == sorted(expected)


def test_hired_without_partitions_is_top_k_by_deep_attention():
    s = signals(8)
    assert select("hired", s, 10).keep.tolist() == reference_top(s.cls_attention, 10)


def reference_dart(s: SpanSignals, budget: int, n_pivots: int) -> list[int]:
    kept = reference_top(s.key_norms, n_pivots)
    pivots = [s.embeds[i] for i in kept] + list(s.text_pivots)
    quota = math.ceil((budget - len(kept)) / len(pivots))
    for pivot in pivots:
        room = min(quota, budget - len(kept))
        rest = sorted((i for i in range(N) if i not in kept), key=lambda i: cos(pivot, s.embeds[i]))
        kept += rest[:room]
    return sorted(kept)


def test_dart_keeps_pivots_and_their_least_duplicated_tokens():
    s = signals(9)
    assert select("dart", s, 15, pivot_image=2).keep.tolist() == reference_dart(s, 15, 2)


@pytest.mark.parametrize("name", sorted(set(available_strategies()) - {"keep-all"}))
@pytest.mark.parametrize("budget", [0, 1, N, N + 5])
def test_budget_edges_for_every_strategy(name, budget):
    keep = select(name, signals(10), budget).keep
    assert keep.numel() == min(budget, N)
    assert keep.unique().numel() == keep.numel()


@pytest.mark.parametrize("name", sorted(set(available_strategies()) - {"keep-all"}))
def test_reserve_is_always_kept(name):
    reserve = torch.tensor([3, 17, 31])
    keep = select(name, signals(11), 10, reserve).keep
    assert torch.isin(reserve, keep).all() and keep.numel() == 10


def test_largest_remainder_respects_capacity_and_total():
    alloc = largest_remainder(10, torch.tensor([5.0, 1.0, 0.0]), torch.tensor([3, 10, 10]))
    assert alloc.tolist()[0] == 3 and int(alloc.sum()) == 10


def test_build_strategy_errors_name_the_fix():
    with pytest.raises(ValueError, match="unknown pruning strategy 'zip'; available: dart, divprune"):
        build_strategy("zip")
    with pytest.raises(TypeError, match="bad options \\['lambda_'\\] for strategy 'mmr'"):
        build_strategy("mmr", lambda_=0.3)
    with pytest.raises(ValueError, match="lam must be in"):
        build_strategy("idpruner", lam=2.0)


def test_jitter_keeps_shapes_and_perturbs_floats_only():
    s = anyres_signals(12)
    moved = s.jittered(0.1, torch.Generator().manual_seed(0))
    assert torch.equal(moved.partition, s.partition)
    assert not torch.equal(moved.embeds, s.embeds) and moved.embeds.shape == s.embeds.shape
