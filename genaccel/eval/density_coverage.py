"""Density and coverage (Naeem et al. 2020, "Reliable Fidelity and Diversity Metrics for Generative Models"),
and the F-score of precision and recall.

Both use only the *real* side's k-nearest-neighbour balls (k = 5, the paper's choice), which makes them robust to
outliers among the generated samples, unlike improved precision/recall whose generated-side balls an outlier
inflates:

* density = ``1 / (k M) * sum_j #{i : |f_j - r_i| < radius_i}`` over the M generated features ``f_j``: how many
  real balls a sample falls into, on average, divided by k (about 1 when the two sets match; above 1 when samples
  crowd around dense real regions);
* coverage = fraction of real points ``r_i`` whose ball holds at least one generated sample (``min_j |f_j - r_i|
  < radius_i``), in [0, 1].

``radius_i`` is the distance of ``r_i`` to its k-th nearest other real point. Comparisons are strict (``<``) as in
the authors' ``prdc`` code. Distances are computed as squared distances in tiles (those of
:func:`genaccel.eval.inception.squared_distances`), so memory stays at a few tiles of ``block`` x ``block`` float32,
as for precision/recall.

The F-score is F1 = 2 P R / (P + R) of improved precision/recall, as torch-fidelity's ``f_score`` (with its
``max(P + R, 1e-5)`` guard): the one users of torch-fidelity compare with. PRD's F_8 / F_1/8 (Sajjadi et al. 2018)
are defined on a different, histogram-based precision-recall curve that no table we compare with reports.
"""

from __future__ import annotations

import torch

from genaccel.eval.inception import PRC_BLOCK, manifold_radii, squared_distances

DC_K = 5


def density_coverage(generated: torch.Tensor, real: torch.Tensor, k: int = DC_K, block: int = PRC_BLOCK,
                     device: str | torch.device | None = None) -> dict[str, float]:
    """Density and coverage of ``generated`` (M, d) against ``real`` (N, d) features, real-side k-NN radii.

    Computed in ``block`` x ``block`` tiles on ``device`` (default: where the features are). Raises ValueError
    when the real side has at most ``k`` points or the dimensions differ."""
    generated, real = torch.as_tensor(generated), torch.as_tensor(real)
    if generated.ndim != 2 or real.ndim != 2 or generated.shape[1] != real.shape[1]:
        raise ValueError(f"density/coverage need two (N, d) feature sets of one extractor, got "
                         f"{tuple(generated.shape)} and {tuple(real.shape)}")
    if len(generated) == 0:
        raise ValueError("density/coverage need at least one generated feature")
    if len(real) <= k:
        raise ValueError(f"density/coverage with k={k} need more than {k} real images, got {len(real)}")
    device = torch.device(device) if device is not None else generated.device
    gen, ref = generated.to(device, torch.float32), real.to(device, torch.float32)
    radii = manifold_radii(ref, k, block).to(device)  # squared distance to the k-th other real point
    balls_hit = torch.zeros(len(gen), dtype=torch.float64, device=device)  # real balls holding each sample
    covered = torch.zeros(len(ref), dtype=torch.bool, device=device)  # real balls holding some sample
    for r0 in range(0, len(ref), block):
        rows = ref[r0:r0 + block]
        for c0 in range(0, len(gen), block):
            inside = squared_distances(rows, gen[c0:c0 + block]) < radii[r0:r0 + len(rows), None]
            balls_hit[c0:c0 + inside.shape[1]] += inside.sum(dim=0)
            covered[r0:r0 + len(rows)] |= inside.any(dim=1)
            del inside
    return {"density": float(balls_hit.sum() / (k * len(gen))), "coverage": float(covered.double().mean())}


def f_score(precision: float, recall: float) -> float:
    """F1 of precision and recall, ``2 P R / max(P + R, 1e-5)`` as torch-fidelity's ``f_score``."""
    return 2.0 * precision * recall / max(precision + recall, 1e-5)


def dc_protocol(k: int = DC_K) -> str:
    """How density/coverage values were made, for run records."""
    return f"Naeem et al. 2020 (k={k}, real-side radii, strict <)"


__all__ = ["DC_K", "dc_protocol", "density_coverage", "f_score"]
