"""Budgets per image: counts, ratios, caps, and the uniform reserve."""

from __future__ import annotations

import pytest
import torch

from genaccel.pruning.budget import reserve_count, resolve_budget, uniform_indices


@pytest.mark.parametrize(
    "keep,n,expected",
    [
        (0, 576, 0),
        (0.0, 576, 0),
        (1.0, 576, 576),
        (64, 576, 64),
        (576, 576, 576),
        (1000, 576, 576),
        (0.5, 7, 4),
        (1, 576, 1),
        (0.1, 576, 58),
    ],
)
def test_resolve_budget(keep, n, expected):
    assert resolve_budget(keep, n) == expected


@pytest.mark.parametrize(
    "keep,error,message",
    [
        (-1, ValueError, "keep must be >= 0"),
        (1.5, ValueError, "float keep is a ratio"),
        ("64", TypeError, "keep must be an int"),
        (True, TypeError, "keep must be an int"),
    ],
)
def test_bad_keep_names_the_fix(keep, error, message):
    with pytest.raises(error, match=message):
        resolve_budget(keep, 10)


def test_uniform_indices_are_sorted_distinct_and_spread():
    index = uniform_indices(576, 64)
    assert index.numel() == 64 and bool((index.diff() == 9).all()) and int(index[0]) == 4
    assert uniform_indices(5, 9).tolist() == [0, 1, 2, 3, 4]
    assert uniform_indices(5, 0).numel() == 0


def test_reserve_count_rounds_and_validates():
    assert reserve_count(64, 0.25) == 16
    with pytest.raises(ValueError, match="reserve must be a fraction"):
        reserve_count(64, 1.5)


def test_uniform_indices_dtype():
    assert uniform_indices(10, 3).dtype == torch.long
