"""Acceptance rules for speculative verification: exact, LANTERN-relaxed and GSD-grouped.

A rule answers two questions about a draft token ``x`` at one window position, given the target
distribution ``p`` and the draft distribution ``q`` (both (..., V), after CFG, temperature, top-k/p):

* ``target(p, x)`` -- the target vector the position is verified against (``p`` itself for exact
  speculative sampling; ``p`` with nearby mass moved onto ``x`` for LANTERN). On rejection the core
  samples from the residual ``norm((target - q)+)``.
* ``ratio(target, q, x)`` -- accept ``x`` with probability ``min(1, ratio)``.

Rules are pure tensor functions without a model, so they are tested on hand-made distributions.
They compose: ``GroupedRule(inner=LanternRule(...))`` runs the GSD group test on LANTERN's relaxed
target (shared/reference/speculative.md §6.1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch

TINY = torch.finfo(torch.float32).tiny


class AcceptanceRule(Protocol):
    """What the verify core needs from an acceptance rule (see module docstring)."""

    name: str

    def target(self, p: torch.Tensor, x: torch.Tensor) -> torch.Tensor: ...

    def ratio(self, target: torch.Tensor, q: torch.Tensor, x: torch.Tensor) -> torch.Tensor: ...


def gather_token(probs: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``probs[..., x]`` for one token per row: probs (..., V), x (...) -> (...)."""
    return probs.gather(-1, x.unsqueeze(-1)).squeeze(-1)


def residual_distribution(target: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Leviathan/Chen residual ``norm(max(target - q, 0))``; falls back to ``target`` where it is all zero.

    All-zero happens only when target == q, where the acceptance probability is 1 anyway.
    """
    r = (target - q).clamp_min(0)
    total = r.sum(-1, keepdim=True)
    return torch.where(total > 1e-12, r / total.clamp_min(TINY), target)


@dataclass
class ExactRule:
    """Standard speculative sampling: accept with ``min(1, p(x)/q(x))``; lossless."""

    name: str = "exact"

    def target(self, p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return p

    def ratio(self, target: torch.Tensor, q: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return gather_token(target, x) / gather_token(q, x).clamp_min(TINY)


def lantern_neighbours(codebook: torch.Tensor, k: int) -> torch.Tensor:
    """(V, k) table: for every code, the k other codes nearest in L2 distance (self excluded), nearest first.

    LANTERN (``entrypoints/generate_codebook.py``) builds the table on the VQ codebook vectors.
    """
    V = codebook.shape[0]
    if not 1 <= k < V:
        raise ValueError(f"lantern_k must lie in [1, {V - 1}] for a codebook of {V} codes, got {k}")
    cb = codebook.float()
    dist = torch.cdist(cb, cb)
    dist.fill_diagonal_(math.inf)
    return dist.topk(k, dim=-1, largest=False).indices


def lantern_relax(p: torch.Tensor, x: torch.Tensor, neighbours: torch.Tensor, delta: float) -> torch.Tensor:
    """LANTERN's relaxed target: move the mass of x's nearest latent neighbours onto x.

    ``c_j`` is the cumulative target mass of the j nearest neighbours of x. The first J neighbours are
    merged into x, with J the largest j such that ``c_j <= delta`` (LANTERN, delta <= 1: total variation
    to p is c_J <= delta) or ``c_j <= (delta - 1) p(x)`` (LANTERN++ lambda mode, delta > 1: the relaxed
    probability of x is at most lambda = delta times p(x)). delta = 0 returns p unchanged.
    Returns a full distribution (..., V), so the residual on rejection never resamples merged tokens.
    """
    if delta <= 0:
        return p
    nb = neighbours[x]  # (..., k)
    pn = p.gather(-1, nb)
    cum = pn.cumsum(-1)
    bound = delta if delta <= 1 else (delta - 1) * gather_token(p, x).unsqueeze(-1)
    moved = cum <= bound  # a prefix, since cum is non-decreasing
    mass = (pn * moved).sum(-1, keepdim=True)
    relaxed = p.scatter(-1, nb, pn * ~moved)
    return relaxed.scatter_add(-1, x.unsqueeze(-1), mass)


@dataclass
class LanternRule(ExactRule):
    """Exact speculative sampling against :func:`lantern_relax`'s target (LANTERN / LANTERN++); lossy by <= delta."""

    neighbours: torch.Tensor | None = None
    delta: float = 0.1
    name: str = "lantern"

    def target(self, p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return lantern_relax(p, x, self.neighbours.to(x.device), self.delta)


def gsd_group(
    p: torch.Tensor,
    x: torch.Tensor,
    group_size: int,
    prob_threshold: float,
    codebook: torch.Tensor | None = None,
    embed_threshold: float = math.inf,
) -> torch.Tensor:
    """GSD's dynamic cluster of x as a boolean mask (..., V).

    Candidates are the ``group_size`` tokens around x in the ranking by p (``group_size // 2`` more
    probable, the rest less probable, cut at the ends of the vocabulary; tokens tied with x in p are not
    candidates); a candidate t stays only if
    ``|p(t) - p(x)| < prob_threshold`` and, with a codebook, ``||E[t] - E[x]||^2 < embed_threshold``.
    x itself is always a member (GSD ``SpeculativeSampler.__call__``, shared/reference/speculative.md §2.2).
    """
    # The h = group_size // 2 tokens just above x in the ranking are the h least probable of those more probable
    # than x; the rest are the most probable of those less probable. Two top-k calls instead of a full sort.
    above_n = min(group_size // 2, p.shape[-1] - 1)
    below_n = min(group_size - 1 - group_size // 2, p.shape[-1] - 1)
    px = gather_token(p, x).unsqueeze(-1)
    above = torch.where(p > px, p, math.inf).topk(above_n, dim=-1, largest=False)
    below = torch.where(p < px, p, -math.inf).topk(below_n, dim=-1, largest=True)
    xs = x.unsqueeze(-1)
    inside = torch.cat([above.values.isfinite(), below.values.isfinite(), torch.ones_like(xs, dtype=torch.bool)], -1)
    cand = torch.where(inside, torch.cat([above.indices, below.indices, xs], dim=-1), xs)
    keep = (p.gather(-1, cand) - px).abs() < prob_threshold
    if codebook is not None and math.isfinite(embed_threshold):
        cb = codebook.to(p.device, torch.float32)
        dist = (cb[cand] - cb[x].unsqueeze(-2)).pow(2).sum(-1)
        keep &= dist < embed_threshold
    keep |= cand == xs
    return torch.zeros_like(p, dtype=torch.bool).scatter_(-1, cand, keep)


@dataclass
class GroupedRule:
    """GSD: accept with ``min(1, sum_C target / sum_C q)`` over x's dynamic group C; composes with ``inner``."""

    inner: AcceptanceRule
    # Rule defaults follow the GSD paper/code (G 25, p 0.15, d 0.5 on its LM embeddings); the ``gsd`` sampler's
    # defaults (GSDOptions) were tuned on the bundled model and are always passed explicitly.
    group_size: int = 25
    prob_threshold: float = 0.15
    codebook: torch.Tensor | None = None
    embed_threshold: float = 0.5
    name: str = "gsd"

    def target(self, p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.inner.target(p, x)

    def ratio(self, target: torch.Tensor, q: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        group = gsd_group(target, x, self.group_size, self.prob_threshold, self.codebook, self.embed_threshold)
        return (target * group).sum(-1) / (q * group).sum(-1).clamp_min(TINY)
