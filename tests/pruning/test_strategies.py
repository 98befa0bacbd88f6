"""Every strategy's selection rule against a direct (slow, loop-based) reference computation."""

from __future__ import annotations

import dataclasses
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
        "global_attention": torch.rand(n, generator=generator),
        "vision_keys": torch.randn(n, 4, generator=generator),
        "text_attention": torch.rand(n, generator=generator),
        "key_norms": torch.rand(n, generator=generator),
        "text_pivots": torch.randn(3, 8, generator=generator),
        "vision_features": torch.randn(n, 6, generator=generator),
        "cls_feature": torch.randn(6, generator=generator),
        "project": toy_projector,
    }
    return SpanSignals(**{**base, **extra})


PROJECTION = torch.randn(6, 8, generator=torch.Generator().manual_seed(99))


def toy_projector(features: torch.Tensor) -> torch.Tensor:
    """A nonlinear row-wise map standing in for LLaVA's Linear-GELU-Linear projector."""
    return torch.nn.functional.gelu(features @ PROJECTION)


def select(name: str, s: SpanSignals, budget: int, reserve=NO_RESERVE, seed: int = 0, **options):
    return build_strategy(name, **options).select(s, budget, reserve, torch.Generator().manual_seed(seed))


def cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.dot(a, b) / (a.norm() * b.norm()))


def reference_top(scores: torch.Tensor, k: int) -> list[int]:
    ranked = sorted(range(len(scores)), key=lambda i: -float(scores[i]))
    return sorted(ranked[:k])


@pytest.mark.parametrize(
    "name,field",
    [("fastervlm", "cls_attention"), ("fastv", "text_attention"), ("global-attention", "global_attention")],
)
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


def reference_visionzip_llm(s: SpanSignals, budget: int, share: float):
    n_context = round(share * budget)
    dominant = reference_top(s.cls_attention, budget - n_context)
    rest = [i for i in range(N) if i not in dominant]
    step = max(1, len(rest) // n_context)
    targets = rest[::step][:n_context]
    groups = {t: [t] for t in targets}
    for i in rest:
        if targets and i not in targets:
            groups[max(targets, key=lambda t: cos(s.vision_keys[i], s.vision_keys[t]))].append(i)
    keep = sorted(dominant + targets)
    embeds = torch.stack([s.embeds[groups[i]].mean(0) if i in groups else s.embeds[i] for i in keep])
    return keep, embeds


def test_visionzip_keeps_dominant_and_merges_the_rest_into_contextual_targets():
    s = signals(6)
    result = select("visionzip", s, 16, contextual=0.25, mode="llm")
    keep, embeds = reference_visionzip_llm(s, 16, 0.25)
    assert result.keep.tolist() == keep
    torch.testing.assert_close(result.embeds, embeds)


def reference_visionzip_official(s: SpanSignals, dominant_num: int, contextual_num: int) -> tuple[list, torch.Tensor]:
    """VisionZip's `CLIPVisionTower_VisionZip.forward` on one image, written from its definition: token 0 is
    [CLS]; `visionzip(model, dominant=D, contextual=C)` passes D - 1 to the top-k over patches."""
    hidden = torch.cat([s.cls_feature[None], s.vision_features])  # [1 + N, Dv], CLS first
    attention = s.cls_attention  # over patches
    top = sorted(range(len(attention)), key=lambda i: -float(attention[i]))[: dominant_num - 1]
    dominant = [0] + sorted(i + 1 for i in top)
    rest = [i for i in range(len(hidden)) if i not in dominant]
    metric = {i: s.vision_keys[i - 1] / s.vision_keys[i - 1].norm() for i in rest}
    step = max(1, len(rest) // contextual_num) if contextual_num else 1  # (the official code divides by 0 here)
    targets = [rest[j] for j in range(0, len(rest), step)][:contextual_num]
    members = {t: [] for t in targets}
    for i in rest:
        if targets and i not in targets:
            sims = [float(metric[i] @ metric[t]) for t in targets]
            members[targets[sims.index(max(sims))]].append(i)
    contextual = [hidden[t] + (hidden[members[t]].mean(0) if members[t] else 0.0) for t in targets]
    tokens = torch.stack([hidden[i] for i in dominant] + contextual)
    chosen = sorted([i - 1 for i in dominant[1:]] + [t - 1 for t in targets])
    return chosen, toy_projector(tokens)


@pytest.mark.parametrize("seed,budget,share", [(6, 16, 10 / 64), (13, 24, 0.25), (14, 8, 0.5), (15, 5, 0.0)])
def test_visionzip_official_counts_cls_and_merges_target_plus_member_mean_before_the_projector(seed, budget, share):
    s = signals(seed)
    result = select("visionzip", s, budget, contextual=share)
    n_context = round(share * budget)
    chosen, tokens = reference_visionzip_official(s, budget - n_context, n_context)
    assert result.selected.tolist() == chosen
    assert result.keep.tolist() == list(range(budget))  # the first `budget` slots of the image
    torch.testing.assert_close(result.embeds, tokens)


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


def reference_hired_official(s: SpanSignals, budget: int, alpha: float, n_crops: int) -> list[int]:
    """HiRED's `HiRED_token_selection` / `HiRED_sub_img_budgets` on one image with a 4x4 base grid."""
    base = [i for i in range(len(s.partition)) if int(s.partition[i]) == 0]
    full_budget = min(int(budget * alpha), len(base))
    sub_budget = budget - full_budget
    picked = [base[j] for j in reference_top(s.cls_attention[base], full_budget)]
    spatial = reference_top(s.cls_attention_shallow[base], int(len(base) * (1 - alpha)))
    chunk = len(base) // n_crops  # reshape(H_crops, W_crops, -1).sum(-1): row-major chunks of the base grid
    votes = [sum(1 for j in spatial if j // chunk == c) for c in range(n_crops)]
    for crop, vote in enumerate(votes, start=1):
        members = [i for i in range(len(s.partition)) if int(s.partition[i]) == crop]
        count = int(vote / sum(votes) * sub_budget)
        picked += [members[j] for j in reference_top(s.cls_attention[members], count)]
    return sorted(picked)


@pytest.mark.parametrize("seed,budget", [(7, 12), (16, 9), (17, 21)])
def test_hired_official_uses_row_major_chunks_and_floored_budgets(seed, budget):
    s = anyres_signals(seed)
    chunk = torch.cat([torch.where(torch.arange(16) < 8, 1, 2), torch.full((32,), -1)])
    s = SpanSignals(**{**vars(s), "base_chunk": chunk})
    assert select("hired", s, budget, mode="official").keep.tolist() == reference_hired_official(s, budget, 0.5, 2)


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


def reference_dart_official(states, key_norms, start, length, budget, pivot_image, pivot_text) -> list[int]:
    """DART's `get_retained_image_token` (LightCompress) on one unpadded sequence, from its definition:
    `states` = final-norm hidden states entering layer K, `key_norms` = L1 norms of layer K-1's cached keys;
    `budget` plays image_token_length * (1 - reduction_ratio). Returns kept image offsets within the image."""
    topk = int(budget / (pivot_image + pivot_text))
    image = range(start, start + length)
    image_pivots = [start + j for j in reference_top_ordered(key_norms[start : start + length], pivot_image)]
    text_pivots = [start + length + j for j in reference_top_ordered(key_norms[start + length :], pivot_text)]
    chosen = set(image_pivots + text_pivots)
    valid = set(image) - set(image_pivots)
    for pivot in list(chosen):
        ranked = sorted(valid, key=lambda i: cos(states[pivot], states[i]))[:topk]
        chosen.update(ranked)
        valid.difference_update(ranked)
    chosen.difference_update(text_pivots)
    return sorted(i - start for i in chosen)


def reference_top_ordered(scores: torch.Tensor, k: int) -> list[int]:
    """torch.topk's index order (descending score)."""
    return sorted(range(len(scores)), key=lambda i: -float(scores[i]))[:k]


@pytest.mark.parametrize(
    "seed,budget,start,n",
    [(9, 16, 5, N), (18, 24, 35, N), (19, 9, 2, N), (20, 30, 60, N), (1, 32, 35, 144), (9, 48, 35, 144)],
)
def test_dart_official_count_reproduces_the_reference_keep_set(seed, budget, start, n):
    """Includes cases where the pivot visiting order (a Python set's) changes the result."""
    generator = torch.Generator().manual_seed(seed)
    n_text = 12 if n == N else 20
    states = torch.randn(start + n + n_text, 8 if n == N else 16, generator=generator)
    key_norms = torch.rand(start + n + n_text, generator=generator)
    image = torch.arange(start, start + n)
    text_cols = start + n + torch.tensor(reference_top_ordered(key_norms[start + n :], 4))
    s = SpanSignals(
        embeds=states[image],
        key_norms=key_norms[image],
        text_pivots=states[text_cols],
        columns=image,
        text_pivot_columns=text_cols,
    )
    expected = reference_dart_official(states, key_norms, start, n, budget, 4, 4)
    assert select("dart", s, budget, count="official").keep.tolist() == expected


@pytest.mark.parametrize("name", sorted(set(available_strategies()) - {"keep-all"}))
@pytest.mark.parametrize("budget", [0, 1, N, N + 5])
def test_budget_edges_for_every_strategy(name, budget):
    keep = select(name, signals(10), budget).keep
    assert keep.numel() == min(budget, N)
    assert keep.unique().numel() == keep.numel()


@pytest.mark.parametrize("name", sorted(set(available_strategies()) - {"keep-all"}))
def test_reserve_is_always_kept(name):
    reserve = torch.tensor([3, 17, 31])
    result = select(name, signals(11), 10, reserve)
    assert torch.isin(reserve, result.selected).all() and result.keep.numel() == 10


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


# ----- differentiable surrogates of the rankings (attack probe) ---------------------------------------------


def kept_mask(keep: torch.Tensor, n: int = N) -> torch.Tensor:
    mask = torch.zeros(n, dtype=torch.bool)
    mask[keep] = True
    return mask


@pytest.mark.parametrize("name", ["divprune", "mmr"])
@pytest.mark.parametrize("seed,budget", [(0, 5), (1, 12), (2, 25)])
def test_greedy_surrogate_on_dropped_tokens_names_the_rules_next_pick(name, seed, budget):
    """For the greedy rules the surrogate of a dropped token is the criterion the loop maximises next, so its
    argmax over dropped tokens is exactly the token a budget of one more adds."""
    s = signals(seed)
    keep = select(name, s, budget).keep
    extra = set(select(name, s, budget + 1).keep.tolist()) - set(keep.tolist())
    scores = build_strategy(name).surrogate(s, kept_mask(keep))
    dropped = (~kept_mask(keep)).nonzero().squeeze(1)
    assert {int(dropped[scores[dropped].argmax()])} == extra


def test_divprune_surrogate_is_the_distance_to_the_nearest_other_kept_token():
    s = signals(3)
    keep = select("divprune", s, 7).keep.tolist()
    scores = build_strategy("divprune").surrogate(s, kept_mask(torch.tensor(keep)))
    for i in range(N):
        expected = min(1.0 - cos(s.embeds[i], s.embeds[j]) for j in keep if j != i)
        assert scores[i].item() == pytest.approx(expected, abs=1e-5)


def test_mmr_surrogate_is_relevance_minus_the_largest_similarity_to_another_kept_token():
    s = signals(4)
    keep = select("mmr", s, 6, lam=0.3).keep.tolist()
    scores = build_strategy("mmr", lam=0.3).surrogate(s, kept_mask(torch.tensor(keep)))
    a = s.cls_attention
    importance = (a - a.min()) / (a.max() - a.min())
    for i in range(N):
        expected = 0.3 * float(importance[i]) - 0.7 * max(cos(s.embeds[i], s.embeds[j]) for j in keep if j != i)
        assert scores[i].item() == pytest.approx(expected, abs=1e-5)


def test_dart_surrogate_is_minus_the_largest_cosine_to_another_pivot():
    s = signals(5)
    scores = build_strategy("dart", pivot_image=2).surrogate(s, kept_mask(select("dart", s, 10).keep))
    image_pivots = sorted(range(N), key=lambda i: -float(s.key_norms[i]))[:2]
    pivots = [(p, s.embeds[p]) for p in image_pivots] + [(None, t) for t in s.text_pivots]
    for i in range(N):
        expected = -max(cos(s.embeds[i], vector) for index, vector in pivots if index != i)
        assert scores[i].item() == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize(
    "name,field",
    [
        ("fastervlm", "cls_attention"),
        ("visionzip", "cls_attention"),
        ("hired", "cls_attention"),
        ("fastv", "text_attention"),
    ],
)
def test_score_surrogates_are_the_ranking_signal_and_carry_gradients(name, field):
    s = signals(6)
    value = getattr(s, field).clone().requires_grad_(True)
    s = dataclasses.replace(s, **{field: value})
    scores = build_strategy(name).surrogate(s, kept_mask(torch.arange(5)))
    assert torch.equal(scores.detach(), value.detach())
    (grad,) = torch.autograd.grad(scores[:5].sum() - scores[5:].sum(), value)
    assert grad[:5].eq(1).all() and grad[5:].eq(-1).all()


@pytest.mark.parametrize(
    "name,why",
    [
        ("keep-all", "keeps every token"),
        ("uniform", "depends only on the token count"),
        ("pool", "depend only on the token count"),
        ("random", "hash of the pixels"),
    ],
)
def test_rules_without_a_ranking_say_why_they_cannot_be_attacked(name, why):
    with pytest.raises(ValueError, match=f"strategy {name!r} cannot be attacked by gradient: .*{why}"):
        build_strategy(name).surrogate(signals(), kept_mask(torch.arange(3)))
