"""Gather kept tokens per sample and re-pad the batch on the left, keeping original positions (§3.3)."""

from __future__ import annotations

import torch


def gather_plan(
    keep_columns: list[torch.Tensor], device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded gather index [B, Lk] and validity [B, Lk] for per-sample sorted kept columns.

    Samples may keep different numbers of tokens (different images or budgets); shorter ones are padded on the
    left, as `generate` expects for decoder-only models, so every sample's last real token is the last column.
    """
    length = max((len(cols) for cols in keep_columns), default=0)
    index = torch.zeros(len(keep_columns), length, dtype=torch.long, device=device)
    valid = torch.zeros(len(keep_columns), length, dtype=torch.bool, device=device)
    for row, cols in enumerate(keep_columns):
        if len(cols):
            index[row, length - len(cols) :] = cols.to(device)
            valid[row, length - len(cols) :] = True
    return index, valid


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x[b, index[b]] for x of shape [B or 1, L, ...] (a batch of 1 is broadcast, as HF's rotary tables are)."""
    x = x.expand(index.shape[0], *x.shape[1:])
    expanded = index.view(*index.shape, *([1] * (x.dim() - 2))).expand(*index.shape, *x.shape[2:])
    return torch.gather(x, 1, expanded)


def compact_hidden(hidden: torch.Tensor, index: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Gathered states with zeros in the padding slots."""
    return gather_tokens(hidden, index).masked_fill(~valid.unsqueeze(-1), 0)


def compact_padding_mask(mask2d: torch.Tensor | None, index: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """2-D padding mask of the compacted batch: the original mask where gathered, 0 in the new padding."""
    kept = valid.long()
    if mask2d is None:
        return kept
    return gather_tokens(mask2d.long(), index) * kept


def write_overrides(hidden: torch.Tensor, overrides: list[tuple[int, torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Copy of `hidden` with merged states written at (sample, columns) before gathering."""
    if not overrides:
        return hidden
    hidden = hidden.clone()
    for sample, columns, states in overrides:
        hidden[sample, columns.to(hidden.device)] = states.to(hidden)
    return hidden
