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
