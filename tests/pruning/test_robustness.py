"""Keep-set overlap and cut-off margin."""

from __future__ import annotations

import math

import pytest
import torch

from genaccel.pruning.robustness import cutoff_margin, jaccard


def test_jaccard():
    assert jaccard(torch.tensor([1, 2, 3]), torch.tensor([2, 3, 4])) == 0.5
    assert jaccard(torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long)) == 1.0


NONE = torch.tensor([], dtype=torch.long)


def test_margin_of_a_top_k_is_the_gap_in_units_of_the_median_neighbour_gap():
    scores = torch.tensor([0.0, 1.0, 4.0, 10.0, 12.0])  # neighbour gaps 1, 3, 6, 2 -> median 2.5
    assert cutoff_margin(scores, torch.tensor([2, 3, 4]), NONE) == (4.0 - 1.0) / 2.5


def test_margin_of_a_smooth_score_is_about_one_not_a_knife_edge():
    scores = torch.linspace(0, 1, 577)[1:] ** 2  # smooth, like a softmax tail: no natural break
    kept = torch.topk(scores, 64).indices
    margin = cutoff_margin(scores, kept, NONE)
    assert 0.5 < margin < 5.0  # the range-normalised gap was ~2e-3 here
    gapped = scores.clone()
    gapped[kept] += 0.5  # a clear break at the cut-off
    assert cutoff_margin(gapped, kept, NONE) > 100


def test_margin_ignores_reserved_and_infinite_tokens():
    scores = torch.tensor([0.0, 1.0, 4.0, 10.0, math.inf])  # finite gaps 1, 3, 6 -> median 3
    assert cutoff_margin(scores, torch.tensor([0, 3, 4]), torch.tensor([0])) == (10.0 - 4.0) / 3.0


def test_margin_counts_only_the_ranked_part_of_the_keep_set():
    scores = torch.tensor([0.0, 1.0, 4.0, 10.0])
    assert cutoff_margin(scores, torch.tensor([0, 3]), NONE, torch.tensor([3])) == 2.0


def test_margin_is_nan_without_a_ranking():
    kept = torch.tensor([0])
    assert math.isnan(cutoff_margin(None, kept, kept[:0]))
    assert math.isnan(cutoff_margin(torch.ones(3), kept, kept[:0]))
    assert math.isnan(cutoff_margin(torch.arange(3.0), torch.arange(3), kept[:0]))


def test_input_jitter_overlap_is_one_without_noise_and_drops_with_large_noise():
    from tiny_vlms import build_llava, llava_inputs

    from genaccel.pruning.robustness import input_jitter_overlap

    torch.manual_seed(0)
    model = build_llava().eval()
    inputs = llava_inputs([1, 1])
    assert input_jitter_overlap(model, inputs, "fastervlm", keep=4, sigma=0.0) == [1.0, 1.0]
    noisy = input_jitter_overlap(model, inputs, "fastervlm", keep=4, sigma=3.0)
    assert len(noisy) == 2 and min(noisy) < 1.0
    assert input_jitter_overlap(model, inputs, "keep_all", keep=4, sigma=3.0) == [1.0, 1.0]


def test_input_jitter_overlap_compares_image_tokens_only(llava):
    """The overlap is over chosen visual columns: text columns (always kept) must not inflate it."""
    from tiny_vlms import llava_inputs

    from genaccel import pruning
    from genaccel.pruning.robustness import input_jitter_overlap

    inputs = llava_inputs([1, 1])
    noise = torch.randn(inputs["pixel_values"].shape, generator=torch.Generator().manual_seed(0))
    noisy = dict(inputs, pixel_values=inputs["pixel_values"] + 3.0 * noise)
    reports = []
    for batch in (inputs, noisy):
        with pruning.apply(llava, "fastervlm", keep=4) as session, torch.no_grad():
            llava(**batch)
        reports.append(session.reports[-1])
    image = inputs["input_ids"] == llava.config.image_token_id
    for row, columns in enumerate(reports[0].selected_columns):
        assert bool(image[row, columns].all()) and columns.numel() == 4
    image_only = [jaccard(a, b) for a, b in zip(reports[0].selected_columns, reports[1].selected_columns)]
    with_text = [jaccard(a, b) for a, b in zip(reports[0].keep_columns, reports[1].keep_columns)]
    assert input_jitter_overlap(llava, inputs, "fastervlm", keep=4, sigma=3.0) == image_only
    assert min(image_only) < 1.0 and all(a < b for a, b in zip(image_only, with_text) if a < 1.0)


def test_pgd_attack_moves_the_keep_set_far_more_than_random_noise_of_the_same_size(llava):
    from tiny_vlms import llava_inputs

    from genaccel.pruning.robustness import attack_overlap

    inputs = llava_inputs([1, 1, 1])
    report = attack_overlap(llava, inputs, "fastervlm", keep=16, epsilon=0.1, steps=10)
    assert max(report.attack) < 0.5 < min(report.jitter)
    guarded = attack_overlap(llava, inputs, "fastervlm", keep=16, epsilon=0.3, steps=10, reserve=0.5)
    assert min(guarded.attack) >= 0.5 / (2 - 0.5) - 1e-9  # 8 reserved of 16: Jaccard >= 8 / 24


@pytest.mark.parametrize(
    "family,strategy",
    [
        ("llava", "divprune"),
        ("llava", "mmr"),
        ("llava", "dart"),
        ("llava_next", "hired"),
        ("qwen25vl", "fastv"),
        ("qwen25vl", "mmr"),
        ("qwen2vl", "divprune"),
        ("llava_onevision", "fastv"),
        ("llava_onevision", "dart"),
    ],
)
def test_pgd_attack_on_every_ranking_and_tower_lowers_its_surrogate_and_beats_random_noise(request, family, strategy):
    """The attack differentiates the strategy's own ranking through the whole model (vision tower, projector,
    LLM layers < K) on every supported family: the surrogate loss falls and the keep set moves more than under
    random noise of the same L-inf size."""
    import tiny_vlms

    from genaccel.pruning.robustness import attack_overlap

    model = request.getfixturevalue(family)
    inputs = {
        "llava": lambda: tiny_vlms.llava_inputs([1, 1]),
        "llava_next": lambda: tiny_vlms.llava_next_inputs(model, [(32, 64), (64, 64)]),
        "qwen25vl": tiny_vlms.qwen2vl_image_and_video,
        "qwen2vl": lambda: tiny_vlms.qwen2vl_inputs([[(1, 8, 8)], [(1, 8, 12)]]),
        "llava_onevision": lambda: tiny_vlms.llava_onevision_inputs(model, [(32, 64), (64, 64)]),
    }[family]()
    report = attack_overlap(model, inputs, strategy, keep=0.25, epsilon=0.1, steps=4)
    assert len(report.losses) == 4 and report.losses[-1] < report.losses[0]
    assert sum(report.attack) < sum(report.jitter)
    assert min(report.attack) < 1.0


def test_pgd_attack_perturbs_image_and_video_pixels_within_the_budget(qwen25vl):
    from tiny_vlms import qwen2vl_image_and_video

    from genaccel.pruning.robustness import attack_overlap

    inputs = qwen2vl_image_and_video()
    report = attack_overlap(qwen25vl, inputs, "fastv", keep=2, epsilon=0.05, steps=3, video_budget="per_frame")
    assert sorted(report.perturbation) == ["pixel_values", "pixel_values_videos"]
    for key, delta in report.perturbation.items():
        assert delta.shape == inputs[key].shape and float(delta.abs().max()) <= 0.05 + 1e-7
        assert float(delta.abs().mean()) > 0.01  # sign steps moved (almost) every entry of both inputs
    assert report.losses[-1] < report.losses[0]


def test_pgd_attack_names_why_a_rule_cannot_be_attacked(llava, qwen2vl):
    from tiny_vlms import llava_inputs, qwen2vl_inputs

    from genaccel import pruning
    from genaccel.pruning.robustness import attack_overlap

    with pytest.raises(ValueError, match="'random' cannot be attacked by gradient: .*hash of the pixels"):
        attack_overlap(llava, llava_inputs([1]), "random")
    with pytest.raises(ValueError, match="'uniform' cannot be attacked by gradient"):
        attack_overlap(qwen2vl, qwen2vl_inputs([[(1, 8, 8)]]), "uniform")

    class Custom(pruning.Strategy):
        name = "custom"

        def select(self, signals, budget, preselected, generator):
            return pruning.Selection(keep=torch.arange(min(budget, signals.n_tokens)))

    with pytest.raises(ValueError, match="'custom' cannot be attacked by gradient: it defines no differentiable"):
        attack_overlap(llava, llava_inputs([1]), Custom())
    with pytest.raises(ValueError, match="nothing to attack"):
        attack_overlap(llava, {"input_ids": torch.zeros(1, 3, dtype=torch.long)}, "fastervlm")
    with pytest.raises(ValueError, match=r"needs \['cls_attention'\].*no \[CLS\] token"):
        attack_overlap(qwen2vl, qwen2vl_inputs([[(1, 8, 8)]]), "fastervlm")
