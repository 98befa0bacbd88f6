"""Per-call stability measures for "Less Is More — Until It Breaks" (arXiv 2601.12042, reference §5).

Compression-aware attacks work because keep-set rankings are unstable under imperceptible perturbations. We
report, per image, how much of the keep set survives a tiny jitter of the selection signals, and how far the
weakest kept token is above the strongest dropped one. Neither is a defence; both tell a user when a call sits
on a knife edge, and `reserve` (uniform coverage) bounds how much an attacker can steer the selection.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

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


@dataclass
class AttackReport:
    """Per-sample overlaps of the chosen visual tokens with the clean choice, under an L-inf budget `epsilon`:
    `attack` after PGD against the strategy's own ranking, `jitter` after random +-epsilon noise; `losses` is
    the surrogate loss (`surrogate_loss`) at each PGD step, the first on the clean pixels; `perturbation` the
    final PGD delta per pixel input (float32, |delta| <= epsilon)."""

    epsilon: float
    steps: int
    attack: list[float]
    jitter: list[float]
    losses: list[float] = field(default_factory=list)
    perturbation: dict[str, torch.Tensor] = field(default_factory=dict)


def surrogate_loss(surrogates) -> torch.Tensor:
    """Sum over images of (mean surrogate on the reference keep set - mean on the dropped tokens), each in units
    of the image's own score spread so every image weighs the same; the uniform reserve is left out (it is
    kept whatever the scores). PGD descends this."""
    terms = []
    for item in surrogates:
        free = ~item.reserved
        kept, dropped = item.kept & free, ~item.kept & free
        if not bool(kept.any()) or not bool(dropped.any()):
            continue
        spread = item.scores.detach()[free].float().std().clamp_min(1e-12)
        terms.append((item.scores[kept].mean() - item.scores[dropped].mean()) / spread)
    return torch.stack(terms).sum() if terms else torch.zeros(())


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
    """Compression-aware attack probe (arXiv 2601.12042): PGD with sign steps on the pixels, within an L-inf
    ball of radius `epsilon` (processor units: 0.03 is about 2/255 of the pixel range for CLIP's std 0.27),
    against the strategy's own ranking; next to random +-epsilon noise of the same size.

    The ranking is the strategy's differentiable `surrogate` (`Strategy.surrogate`: [CLS] attention for
    fastervlm / visionzip / hired, the last text token's attention for fastv, nearest-kept distance for
    divprune, marginal relevance for mmr, minus pivot similarity for dart), computed by the pruning session
    itself from the same hooks and signals as the real selection, with gradients back to `pixel_values` /
    `pixel_values_videos`, on every supported model. Each step lowers the surrogate on the clean keep set and
    raises it on the dropped tokens. Strategies without a ranking (keep-all, uniform, pool, random) raise,
    saying why.

    Both overlaps are Jaccard of the chosen visual tokens with the clean choice, per sample, so the gap between
    `jitter` and `attack` is what random-noise probes miss. `options` go to `apply` (e.g. `reserve=0.25` to
    measure the reserve against both, `layer=`, strategy options).
    """
    from genaccel.pruning import apply
    from genaccel.pruning.session import SurrogatesReady

    pixel_keys = [key for key in ("pixel_values", "pixel_values_videos") if key in inputs]
    if not pixel_keys:
        raise ValueError("inputs carry no pixel_values / pixel_values_videos: nothing to attack")

    def choose(pixels: dict[str, torch.Tensor]):
        with apply(model, strategy, keep, seed=seed, **options) as session, torch.no_grad():
            if session.strategy.no_surrogate is not None:  # fail before spending a prefill
                session.strategy.surrogate(None, None)
            model(**dict(inputs, **pixels))
        return session.reports[-1]

    def perturbed(delta: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {key: (inputs[key].float() + delta[key]).to(inputs[key].dtype) for key in pixel_keys}

    clean = choose({})
    targets = [torch.isin(span.prunable, span.selected) for span in clean.spans]
    step = step_size if step_size is not None else 2.5 * epsilon / max(1, steps)
    delta = {key: torch.zeros(inputs[key].shape, dtype=torch.float32, device=inputs[key].device) for key in pixel_keys}
    losses = []
    with apply(model, strategy, keep, seed=seed, **options) as session:
        session.surrogate_targets = targets
        for _ in range(steps):
            for value in delta.values():
                value.requires_grad_(True)
            with torch.enable_grad():
                try:
                    model(**dict(inputs, **perturbed(delta)))
                except SurrogatesReady:
                    pass
                loss = surrogate_loss(session.surrogates)
                losses.append(float(loss.detach()))
                if not loss.requires_grad:
                    break  # nothing to push against (every image kept or dropped whole)
                grads = torch.autograd.grad(loss, list(delta.values()), allow_unused=True)
            delta = {
                key: (value.detach() - step * (0 if grad is None else grad.sign())).clamp(-epsilon, epsilon)
                for (key, value), grad in zip(delta.items(), grads)
            }
    delta = {key: value.detach() for key, value in delta.items()}
    attacked = choose(perturbed(delta))
    generator = torch.Generator().manual_seed(seed)
    noise = {
        key: epsilon * torch.randn(inputs[key].shape, generator=generator).sign().to(inputs[key].device)
        for key in pixel_keys
    }
    jittered = choose(perturbed(noise))

    def overlaps(report) -> list[float]:
        return [jaccard(a, b) for a, b in zip(clean.selected_columns, report.selected_columns)]

    return AttackReport(
        epsilon=epsilon,
        steps=steps,
        attack=overlaps(attacked),
        jitter=overlaps(jittered),
        losses=losses,
        perturbation=delta,
    )
