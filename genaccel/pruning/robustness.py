"""Per-call stability measures for "Less Is More — Until It Breaks" (arXiv 2601.12042, reference §5).

Compression-aware attacks work because keep-set rankings are unstable under imperceptible perturbations. We
report, per image, how much of the keep set survives a tiny jitter of the selection signals, and how far the
weakest kept token is above the strongest dropped one. Neither is a defence; both tell a user when a call sits
on a knife edge, and `reserve` (uniform coverage) bounds how much an attacker can steer the selection.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from genaccel.pruning import signals as sig
from genaccel.pruning.adapters import adapter_for


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


@dataclass
class AttackReport:
    """Per-sample overlaps of the chosen visual tokens with the clean choice, under an L-inf budget `epsilon`:
    `attack` after PGD against the strategy's own ranking, `jitter` after random +-epsilon noise."""

    epsilon: float
    steps: int
    attack: list[float]
    jitter: list[float]


CLS_RANKED = ("fastervlm", "visionzip", "hired", "mmr")


def ranking_scores(model: torch.nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """Differentiable [CLS]-attention score per patch token ([images, tokens]) at the feature layer: the ranking
    the [CLS] strategies cut (head mean, as `signals.cls_attention`), recomputed with gradients."""
    adapter = adapter_for(model)
    attention = adapter.vision_layers()[adapter.vision_layer_index({}, "deep")].self_attn
    captured: dict[str, torch.Tensor] = {}
    handles = [
        getattr(attention, f"{name}_proj").register_forward_hook(
            lambda module, args, output, name=name: captured.__setitem__(name, output)
        )
        for name in ("q", "k")
    ]
    try:
        model.model.vision_tower(pixel_values)
    finally:
        for handle in handles:
            handle.remove()
    rows = sig.cls_attention(captured["q"], captured["k"], adapter.vision_heads(), attention.scale).mean(dim=1)
    first = 1 if adapter.feature_choice({})[1] == "default" else 0
    return rows[:, first:]


def chosen_per_image(report) -> list[torch.Tensor]:
    """Chosen token offsets within each image's span, in scatter order (= pixel_values order for LLaVA)."""
    return [span.selected - span.start for span in report.spans]


def attack_overlap(
    model: torch.nn.Module,
    inputs: dict[str, torch.Tensor],
    strategy: str = "fastervlm",
    keep: int | float = 64,
    epsilon: float = 0.03,
    steps: int = 10,
    step_size: float | None = None,
    seed: int = 0,
    **options,
) -> AttackReport:
    """Compression-aware attack probe (arXiv 2601.12042): PGD on the pixels, within an L-inf ball of radius
    `epsilon` (processor units: 0.03 is about 2/255 of the pixel range for CLIP's std 0.27), that pushes the
    clean keep set's [CLS]-attention scores down and the dropped tokens' up; next to random +-epsilon noise.

    Both report the Jaccard overlap of the chosen visual tokens with the clean choice, per sample, so the gap between `jitter` and `attack` is what random-noise probes miss. `options` go to
    `apply` (e.g. `reserve=0.25` to measure the reserve against both). LLaVA-style towers with [CLS] only:
    the strategy must rank by [CLS] attention (fastervlm, visionzip, hired, mmr).
    """
    from genaccel.pruning import apply

    name = strategy if isinstance(strategy, str) else strategy.name
    if name not in CLS_RANKED or adapter_for(model).projector() is None:
        raise ValueError(
            f"attack_overlap attacks [CLS]-attention rankings ({', '.join(CLS_RANKED)}) on LLaVA-1.5-style models; "
            f"got {name!r} on {type(model).__name__}: use input_jitter_overlap there"
        )
    pixels = inputs["pixel_values"]

    def choose(pixel_values: torch.Tensor):
        with apply(model, strategy, keep, seed=seed, **options) as session, torch.no_grad():
            model(**dict(inputs, pixel_values=pixel_values))
        return session.reports[-1]

    clean = choose(pixels)
    per_image = chosen_per_image(clean)
    n_tokens = ranking_scores(model, pixels[:1]).shape[1]
    kept = torch.zeros(len(per_image), n_tokens, dtype=torch.bool)
    for image, chosen in enumerate(per_image):
        kept[image, chosen[chosen < n_tokens]] = True
    kept = kept.to(pixels.device)
    step = step_size if step_size is not None else 2.5 * epsilon / max(1, steps)
    delta = torch.zeros_like(pixels, dtype=torch.float32)
    for _ in range(steps):
        delta.requires_grad_(True)
        with torch.enable_grad():
            scores = ranking_scores(model, (pixels.float() + delta).to(pixels.dtype)).float()
            kept_mean = (scores * kept).sum(1) / kept.sum(1).clamp_min(1)
            dropped_mean = (scores * ~kept).sum(1) / (~kept).sum(1).clamp_min(1)
            loss = (kept_mean - dropped_mean).sum()
            (grad,) = torch.autograd.grad(loss, delta)
        delta = (delta.detach() - step * grad.sign()).clamp(-epsilon, epsilon)
    attacked = choose((pixels.float() + delta).to(pixels.dtype))
    generator = torch.Generator().manual_seed(seed)
    noise = epsilon * torch.randn(pixels.shape, generator=generator).sign()
    jittered = choose((pixels.float() + noise.to(pixels.device)).to(pixels.dtype))

    def overlaps(report) -> list[float]:
        return [jaccard(a, b) for a, b in zip(clean.selected_columns, report.selected_columns)]

    return AttackReport(epsilon=epsilon, steps=steps, attack=overlaps(attacked), jitter=overlaps(jittered))
