"""Keep-set overlap and cut-off margin."""

from __future__ import annotations

import math

import torch

from genaccel.pruning.robustness import cutoff_margin, jaccard


def test_jaccard():
    assert jaccard(torch.tensor([1, 2, 3]), torch.tensor([2, 3, 4])) == 0.5
    assert jaccard(torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long)) == 1.0


def test_margin_of_a_top_k_is_the_normalised_gap():
    scores = torch.tensor([0.0, 1.0, 4.0, 10.0])
    assert cutoff_margin(scores, torch.tensor([2, 3]), torch.tensor([], dtype=torch.long)) == (4.0 - 1.0) / 10.0


def test_margin_ignores_reserved_and_infinite_tokens():
    scores = torch.tensor([0.0, 1.0, 4.0, 10.0, math.inf])
    assert cutoff_margin(scores, torch.tensor([0, 3, 4]), torch.tensor([0])) == (10.0 - 4.0) / 10.0


def test_margin_counts_only_the_ranked_part_of_the_keep_set():
    scores = torch.tensor([0.0, 1.0, 4.0, 10.0])
    assert cutoff_margin(scores, torch.tensor([0, 3]), torch.tensor([], dtype=torch.long), torch.tensor([3])) == 0.6


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
