"""How many visual tokens each image keeps, and which ones a uniform reserve pins down."""

from __future__ import annotations

import torch

Keep = int | float


def validate_keep(keep: Keep) -> None:
    """Reject a budget that cannot mean anything, naming the accepted forms."""
    if isinstance(keep, bool) or not isinstance(keep, (int, float)):
        raise TypeError(f"keep must be an int (tokens per image) or a float ratio in [0, 1]; got {keep!r}")
    if keep < 0:
        raise ValueError(f"keep must be >= 0 (tokens per image, or a ratio in [0, 1]); got {keep}")
    if isinstance(keep, float) and keep > 1.0:
        raise ValueError(f"a float keep is a ratio in [0, 1]; got {keep}. Pass an int for a token count.")


def resolve_budget(keep: Keep, n_tokens: int) -> int:
    """Tokens to keep out of `n_tokens`: an int is a count per image (capped at n), a float a ratio (rounded)."""
    validate_keep(keep)
    if isinstance(keep, float):
        return min(n_tokens, round(keep * n_tokens))
    return min(n_tokens, keep)


def uniform_indices(n_tokens: int, count: int) -> torch.Tensor:
    """`count` indices spread evenly over `range(n_tokens)` (bin centres), sorted and distinct."""
    count = min(count, n_tokens)
    if count <= 0:
        return torch.zeros(0, dtype=torch.long)
    return ((torch.arange(count, dtype=torch.float64) + 0.5) * n_tokens / count).floor().long()


def reserve_count(budget: int, reserve: float) -> int:
    """Part of `budget` given to uniform coverage before the strategy chooses (robustness, see docs/pruning.md)."""
    if not 0.0 <= reserve <= 1.0:
        raise ValueError(f"reserve must be a fraction in [0, 1]; got {reserve}")
    return round(reserve * budget)
