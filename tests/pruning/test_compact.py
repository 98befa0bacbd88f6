"""Per-sample gathers re-padded on the left."""

from __future__ import annotations

import torch

from genaccel.pruning.compact import (
    compact_hidden,
    compact_padding_mask,
    gather_plan,
    gather_tokens,
    write_overrides,
)


def test_gather_plan_left_pads_shorter_samples():
    index, valid = gather_plan([torch.tensor([0, 2, 5]), torch.tensor([1])])
    assert index.tolist() == [[0, 2, 5], [0, 0, 1]]
    assert valid.tolist() == [[True, True, True], [False, False, True]]


def test_gather_tokens_broadcasts_a_batch_of_one():
    table = torch.arange(6.0).view(1, 6, 1).repeat(1, 1, 2)
    index = torch.tensor([[1, 4], [0, 5]])
    assert gather_tokens(table, index)[..., 0].tolist() == [[1.0, 4.0], [0.0, 5.0]]


def test_compact_hidden_zeroes_padding_and_mask_combines_original_padding():
    hidden = torch.randn(2, 6, 3)
    index, valid = gather_plan([torch.tensor([0, 2, 5]), torch.tensor([4, 5])])
    compact = compact_hidden(hidden, index, valid)
    assert torch.equal(compact[0], hidden[0, [0, 2, 5]])
    assert torch.equal(compact[1, 0], torch.zeros(3)) and torch.equal(compact[1, 1:], hidden[1, [4, 5]])
    original = torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    assert compact_padding_mask(original, index, valid).tolist() == [[0, 1, 1], [0, 1, 1]]
    assert compact_padding_mask(None, index, valid).tolist() == [[1, 1, 1], [0, 1, 1]]


def test_write_overrides_leaves_the_input_untouched():
    hidden = torch.zeros(1, 4, 2)
    written = write_overrides(hidden, [(0, torch.tensor([1, 3]), torch.ones(2, 2))])
    assert written[0, :, 0].tolist() == [0.0, 1.0, 0.0, 1.0] and float(hidden.abs().sum()) == 0.0
