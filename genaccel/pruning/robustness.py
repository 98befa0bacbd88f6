"""Per-call stability measures for "Less Is More — Until It Breaks" (arXiv 2601.12042, reference §5).

Compression-aware attacks work because keep-set rankings are unstable under imperceptible perturbations. We
report, per image, how much of the keep set survives a tiny jitter of the selection signals, and how far the
weakest kept token is above the strongest dropped one. Neither is a defence; both tell a user when a call sits
on a knife edge, and `reserve` (uniform coverage) bounds how much an attacker can steer the selection.
"""

from __future__ import annotations

import math

import torch


def jaccard(a: torch.Tensor, b: torch.Tensor) -> float:
    """|a ∩ b| / |a ∪ b| of two index sets (1.0 when both are empty)."""
    a_set, b_set = set(a.tolist()), set(b.tolist())
    union = a_set | b_set
    return 1.0 if not union else len(a_set & b_set) / len(union)


def typical_gap(scores: torch.Tensor) -> float:
    """Median gap between neighbouring sorted finite scores (the mean gap if the median is 0, e.g. many ties)."""
    finite = scores[torch.isfinite(scores)].float().sort().values
    gaps = finite.diff()
    if gaps.numel() == 0:
        return 0.0
    median = float(gaps.quantile(0.5))
    return median if median > 0 else float(gaps.mean())


def cutoff_margin(
    scores: torch.Tensor | None, kept: torch.Tensor, exclude: torch.Tensor, ranked: torch.Tensor | None = None
) -> float:
    """(weakest kept score - strongest dropped score) in units of the typical gap between neighbouring scores.

    Dividing by the score range made every smooth score look like a knife edge (~1/N); in units of the median
    neighbour gap, ~1 means the cut-off is as tight as any other rank, << 1 a near-tie that a small
    perturbation flips, >> 1 a clear break. < 0 means the rule is not a plain top-k of these scores (diversity,
    per-partition budgets). NaN when there is no ranking to cut.

    `exclude` (the uniform reserve) is left out of the kept side: those tokens were not chosen by the score;
    `ranked` restricts the kept side further (e.g. VisionZip's dominant tokens, not its merged targets).
    Infinite scores mark tokens taken unconditionally (e.g. DivPrune's first pick) and are ignored.
    """
    if scores is None:
        return math.nan
    scores = scores.float()
    dropped = torch.ones_like(scores, dtype=torch.bool)
    dropped[kept] = False
    chosen = kept if ranked is None else ranked
    chosen = chosen[~torch.isin(chosen, exclude)]
    chosen = chosen[torch.isfinite(scores[chosen])]
    if chosen.numel() == 0 or not bool(dropped.any()):
        return math.nan
    unit = typical_gap(scores)
    if unit == 0:
        return math.nan
    return float(scores[chosen].min() - scores[dropped].max()) / unit


def input_jitter_overlap(
    model: torch.nn.Module,
    inputs: dict[str, torch.Tensor],
    strategy: str = "divprune",
    keep: int | float = 64,
    sigma: float = 1e-2,
    seed: int = 0,
    **options,
) -> list[float]:
    """Per-sample Jaccard overlap of the *visual* tokens chosen on ``inputs`` and on jittered pixels.

    Only the image/video tokens the rule selected are compared (`PruneReport.selected_columns`): text and
    newline columns, always kept, would inflate the overlap (0.58 image-only read as 0.91 with 310 text tokens).

    This is the attack surface of "Less Is More — Until It Breaks": a perturbation of the *image* (Gaussian
    noise of std ``sigma`` on ``pixel_values``/``pixel_values_videos``, in the processor's normalised units)
    that moves which tokens survive. Two real forward passes, so it costs two prefills; the cheaper per-call
    probe (``apply(..., robustness=True)``) jitters the selection signals instead.
    """
    from genaccel.pruning import apply

    pixel_keys = [k for k in ("pixel_values", "pixel_values_videos") if k in inputs]
    if not pixel_keys:
        raise ValueError("inputs carry no pixel_values / pixel_values_videos: nothing to jitter")
    gen = torch.Generator().manual_seed(seed)
    jittered = dict(inputs)
    for key in pixel_keys:
        noise = torch.randn(inputs[key].shape, generator=gen, dtype=torch.float32)
        jittered[key] = inputs[key] + (sigma * noise).to(inputs[key].dtype)
    keeps = []
    for batch in (inputs, jittered):
        with apply(model, strategy, keep, seed=seed, **options) as session, torch.no_grad():
            model(**batch)
        keeps.append(session.reports[-1].selected_columns)
    return [jaccard(a, b) for a, b in zip(*keeps)]
