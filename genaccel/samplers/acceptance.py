"""Acceptance rules for speculative verification: exact, LANTERN-relaxed (+ a bounded variant) and GSD-grouped.

A rule answers three questions about a draft token ``x`` at one window position, given the target
distribution ``p`` and the draft distribution ``q`` (both (..., V), after CFG, temperature, top-k/p):

* ``target(p, x, q)`` -- the target vector the position is verified against (``p`` itself for exact
  speculative sampling; ``p`` with nearby mass moved onto ``x`` for LANTERN; a draft-independent
  relaxation of ``p`` towards ``q`` for :class:`BoundedRelaxRule`).
* ``ratio(target, q, x)`` -- accept ``x`` with probability ``min(1, ratio)``.
* ``residual(p, target, q, x)`` -- the distribution sampled at the first rejection (Leviathan/Chen
  ``norm((target - q)+)`` unless a rule reproduces an official code's resampling).

Rules are pure tensor functions without a model, so they are tested on hand-made distributions.
They compose: ``GroupedRule(inner=LanternRule(...))`` runs the GSD group test on LANTERN's relaxed
target (shared/reference/speculative.md §6.1).

Truncation (top-k / top-p): a token outside the support of ``p`` (p = 0 after filtering) is never
accepted or credited by the relaxed rules unless ``respect_truncation=False``, which is what the
official LANTERN and GSD code do (they credit a filtered draft with its neighbours' / group's mass).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch

TINY = torch.finfo(torch.float32).tiny

TRUNCATION_MODES = ("auto", "respect", "ignore")  # auto: respect, except in an official-faithful mode
LANTERN_RESAMPLE = ("ours", "official", "official-v1")
LANTERN_RELAX = ("lantern", "bounded")
GSD_GROUP_MODES = ("ours", "official")
GSD_OFFICIAL_HALF = 7  # official GSD: ``order[r - 7 : r + 7]`` around the draft's logit rank r


class AcceptanceRule(Protocol):
    """What the verify core needs from an acceptance rule (see module docstring)."""

    name: str

    def target(self, p: torch.Tensor, x: torch.Tensor, q: torch.Tensor | None = None) -> torch.Tensor: ...

    def ratio(self, target: torch.Tensor, q: torch.Tensor, x: torch.Tensor) -> torch.Tensor: ...

    def residual(self, p: torch.Tensor, target: torch.Tensor, q: torch.Tensor, x: torch.Tensor) -> torch.Tensor: ...


def respects_truncation(truncation: str, official: bool) -> bool:
    """Resolve a sampler's ``truncation`` option: ``auto`` respects top-k/top-p except in an official mode."""
    if truncation not in TRUNCATION_MODES:
        raise ValueError(f"truncation must be one of {TRUNCATION_MODES}, got {truncation!r}")
    return truncation == "respect" or (truncation == "auto" and not official)


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


def normalise_or_uniform(weights: torch.Tensor) -> torch.Tensor:
    """``weights / sum`` per row, uniform over the vocabulary where the row is all zero (LANTERN's fallback)."""
    total = weights.sum(-1, keepdim=True)
    return torch.where(total > 0, weights / total.clamp_min(TINY), torch.full_like(weights, 1.0 / weights.shape[-1]))


@dataclass
class ExactRule:
    """Standard speculative sampling: accept with ``min(1, p(x)/q(x))``; lossless."""

    name: str = "exact"

    def target(self, p: torch.Tensor, x: torch.Tensor, q: torch.Tensor | None = None) -> torch.Tensor:
        return p

    def ratio(self, target: torch.Tensor, q: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return gather_token(target, x) / gather_token(q, x).clamp_min(TINY)

    def residual(self, p: torch.Tensor, target: torch.Tensor, q: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return residual_distribution(target, q)


# ----------------------------------------------------------------------------- LANTERN
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


def lantern_merged(
    p: torch.Tensor, x: torch.Tensor, neighbours: torch.Tensor, delta: float, respect_truncation: bool = False
) -> torch.Tensor:
    """Which of x's neighbours (..., k) LANTERN merges into x: the first J, J = max{j : c_j <= bound}.

    ``c_j`` is the cumulative target mass of the j nearest neighbours; the bound is ``delta`` (delta <= 1,
    total-variation bound) or ``(delta - 1) p(x)`` (LANTERN++ lambda mode, delta > 1). With
    ``respect_truncation`` nothing is merged into an x outside the support of p.
    """
    nb = neighbours[x]
    cum = p.gather(-1, nb).cumsum(-1)
    px = gather_token(p, x).unsqueeze(-1)
    bound = delta if delta <= 1 else (delta - 1) * px
    merged = cum <= bound  # a prefix, since cum is non-decreasing
    if respect_truncation:
        merged &= px > 0
    return merged


def lantern_relax(
    p: torch.Tensor, x: torch.Tensor, neighbours: torch.Tensor, delta: float, respect_truncation: bool = False
) -> torch.Tensor:
    """LANTERN's relaxed target: move the mass of x's nearest latent neighbours onto x.

    The neighbours :func:`lantern_merged` selects give their mass to x (LANTERN, ``delta <= 1``: total
    variation to p is c_J <= delta; LANTERN++, ``delta > 1``: the relaxed probability of x is at most
    lambda = delta times p(x)). delta = 0 returns p unchanged. Returns a full distribution (..., V), so the
    residual on rejection never resamples merged tokens. The default ``respect_truncation=False`` is the
    official definition (a filtered x gains its neighbours' mass).
    """
    if delta <= 0:
        return p
    nb = neighbours[x]  # (..., k)
    pn = p.gather(-1, nb)
    moved = lantern_merged(p, x, neighbours, delta, respect_truncation)
    mass = (pn * moved).sum(-1, keepdim=True)
    relaxed = p.scatter(-1, nb, pn * ~moved)
    return relaxed.scatter_add(-1, x.unsqueeze(-1), mass)


@dataclass
class LanternRule(ExactRule):
    """Exact speculative sampling against :func:`lantern_relax`'s target (LANTERN / LANTERN++); lossy.

    The relaxed target is within ``delta`` of p for each draft (delta <= 1); the distribution a step
    emits is not bounded by delta when q is a stochastic drafter (the target depends on the drafted
    token; docs/speculative.md). ``resample`` chooses what a rejection samples from:

    * ``ours``: ``norm((p~ - q)+)``, the exact residual of the relaxed target;
    * ``official``: LANTERN's ``evaluate_posterior`` (dynamic tree, one-hot q): the unrelaxed p with x and,
      when any neighbour was merged, x's first k+1 neighbours zeroed; for a stochastic q we subtract q as
      the exact residual does (identical for one-hot q);
    * ``official-v1``: LANTERN++'s ``evaluate_posterior_v1`` (static tree, sampled drafts):
      ``norm((p - q')+)`` with q' = q zeroed on x's first k+1 neighbours when any was merged.

    Both official modes fall back to the uniform distribution when nothing is left, as the official code
    does. ``neighbours`` may hold more columns than ``k`` (the official modes need k+1).
    """

    neighbours: torch.Tensor | None = None
    delta: float = 0.1
    name: str = "lantern"
    resample: str = "ours"
    respect_truncation: bool = True
    k: int | None = None

    def __post_init__(self) -> None:
        if self.resample not in LANTERN_RESAMPLE:
            raise ValueError(f"resample must be one of {LANTERN_RESAMPLE}, got {self.resample!r}")

    def _table(self, device: torch.device) -> torch.Tensor:
        return self.neighbours.to(device)

    def _relax_table(self, device: torch.device) -> torch.Tensor:
        return self._table(device)[:, : self.k or self.neighbours.shape[1]]

    def target(self, p: torch.Tensor, x: torch.Tensor, q: torch.Tensor | None = None) -> torch.Tensor:
        return lantern_relax(p, x, self._relax_table(x.device), self.delta, self.respect_truncation)

    def residual(self, p: torch.Tensor, target: torch.Tensor, q: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.resample == "ours" or self.delta <= 0:
            return residual_distribution(target, q)
        merged_any = lantern_merged(p, x, self._relax_table(x.device), self.delta, self.respect_truncation).any(-1)
        k1 = min((self.k or self.neighbours.shape[1]) + 1, self.neighbours.shape[1])
        zero = torch.zeros_like(p, dtype=torch.bool).scatter_(-1, self._table(x.device)[x][..., :k1], True)
        zero &= merged_any.unsqueeze(-1)
        if self.resample == "official":
            return normalise_or_uniform((p.masked_fill(zero, 0.0) - q).clamp_min(0))
        return normalise_or_uniform((p - q.masked_fill(zero, 0.0)).clamp_min(0))


# ----------------------------------------------------------------------------- bounded relaxation
def bounded_relax(
    p: torch.Tensor, q: torch.Tensor, neighbours: torch.Tensor, delta: float, respect_truncation: bool = True
) -> torch.Tensor:
    """A relaxed target r within ``delta`` of p (TV) that depends on (p, q), never on the drafted token.

    Mass moves only from a token t where p exceeds q (a donor, surplus ``p - q``) to a token s where q
    exceeds p (a receiver, need ``q - p``) that has t among its k nearest codes (``t in neighbours[s]``):
    ``min(p, q) <= r <= max(p, q)`` pointwise, so the acceptance rate ``1 - TV(r, q)`` grows by exactly the
    moved mass, which is capped at ``delta``. Every donor splits its surplus among the receivers that list
    it, in proportion to their needs, so no mass is credited twice (LANTERN's per-draft relaxation credits
    a neighbour's mass to every draft that has it as a neighbour); a receiver takes its offers nearest
    neighbour first up to its need, and the delta budget is spent nearest slot first. With
    ``respect_truncation`` a receiver must have p > 0. With a one-hot q at x this is LANTERN's merge with a
    fractional last neighbour: x gains ``min(delta, c_k)``, taken from its nearest neighbours first.

    Speculative sampling against r emits exactly r whatever q is (r is fixed before x is drawn), so the
    emitted token distribution is within delta of p (docs/speculative.md, "Bounded relaxation").
    Cost: a few ops over (rows, V, k), in row chunks of at most 2**24 elements.
    """
    if delta <= 0:
        return p
    shape, V = p.shape, p.shape[-1]
    dtype = torch.promote_types(p.dtype, torch.float32)  # never accumulate transport in half precision
    p2, q2 = p.reshape(-1, V).to(dtype), q.reshape(-1, V).to(dtype)
    nb = neighbours.to(p.device)
    chunk = max(1, 2**24 // nb.numel())
    rows = [_bounded_rows(p2[i : i + chunk], q2[i : i + chunk], nb, delta, respect_truncation)
            for i in range(0, p2.shape[0], chunk)]
    return torch.cat(rows).reshape(shape).to(p.dtype)


def _bounded_rows(p: torch.Tensor, q: torch.Tensor, nb: torch.Tensor, delta: float, respect: bool) -> torch.Tensor:
    """:func:`bounded_relax` on rows (M, V) with the neighbour table nb (V, k)."""
    M, (V, k) = p.shape[0], nb.shape
    need = (q - p).clamp_min(0)
    if respect:
        need = need * (p > 0)
    have = (p - q).clamp_min(0)
    edges = nb.reshape(-1)  # edge (s, j): receiver s, donor nb[s, j]
    asked = torch.zeros_like(p).index_add_(1, edges, need.repeat_interleave(k, dim=1))
    share = torch.where(asked > 0, (have / asked.clamp_min(TINY)).clamp(max=1.0), torch.zeros_like(asked))
    offer = need.unsqueeze(-1) * share.index_select(1, edges).view(M, V, k)  # what donor nb[s, j] reserves for s
    taken = offer.cumsum(-1).clamp(max=need.unsqueeze(-1))  # nearest neighbour first, up to the need
    got = torch.diff(taken, dim=-1, prepend=torch.zeros_like(taken[..., :1]))
    per_slot = got.sum(1)  # (M, k)
    spent = per_slot.cumsum(-1).clamp(max=delta)  # the budget, nearest slot first
    allowed = torch.diff(spent, dim=-1, prepend=torch.zeros_like(spent[:, :1]))
    got = got * torch.where(per_slot > 0, allowed / per_slot.clamp_min(TINY), torch.zeros_like(per_slot)).unsqueeze(1)
    lost = torch.zeros_like(p).index_add_(1, edges, got.reshape(M, V * k))
    return (p + got.sum(-1) - lost).clamp_min(0)


@dataclass
class BoundedRelaxRule(ExactRule):
    """Exact speculative sampling against :func:`bounded_relax`: every emitted token is within delta of p."""

    neighbours: torch.Tensor | None = None
    delta: float = 0.1
    respect_truncation: bool = True
    name: str = "lantern-bounded"

    def __post_init__(self) -> None:
        if not 0 <= self.delta <= 1:
            raise ValueError(f"the bounded relaxation needs lantern_delta in [0, 1] (a TV budget), got {self.delta}")

    def target(self, p: torch.Tensor, x: torch.Tensor, q: torch.Tensor | None = None) -> torch.Tensor:
        if q is None:
            raise ValueError("BoundedRelaxRule.target needs the draft distributions q")
        return bounded_relax(p, q, self.neighbours, self.delta, self.respect_truncation)


# ----------------------------------------------------------------------------- GSD
GSD_CLOSE_TABLE_MAX_CODES = 4096  # a (V, V) bool table of "codes within embed_threshold": 16 MiB at 4096 codes


def codebook_distance(codebook: torch.Tensor, x: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
    """Squared L2 distance ``||E[cand] - E[x]||^2`` (float32) for draft tokens x (...) and candidates (..., C)."""
    cb = codebook.to(cand.device, torch.float32)
    return (cb[cand] - cb[x].unsqueeze(-2)).pow(2).sum(-1)


def codebook_close_table(codebook: torch.Tensor, embed_threshold: float, device: torch.device | str = "cpu",
                         rows: int = 256) -> torch.Tensor | None:
    """(V, V) bool table ``close[x, t] = ||E[t] - E[x]||^2 < embed_threshold``, or None above
    :data:`GSD_CLOSE_TABLE_MAX_CODES` codes (the table would not pay for its memory).

    Built with :func:`codebook_distance`'s arithmetic, so a look-up gives bit-for-bit the same decision as
    computing the distance per call; built once per rule, it replaces a (..., C, d) gather and three ops
    in every verify step (issue #14: GSD's engine share).
    """
    V = codebook.shape[0]
    if V > GSD_CLOSE_TABLE_MAX_CODES:
        return None
    codes = torch.arange(V, device=device)
    cand = codes.expand(min(rows, V), V)
    chunks = [codebook_distance(codebook, codes[i : i + rows], cand[: min(rows, V - i)]) < embed_threshold
              for i in range(0, V, rows)]
    return torch.cat(chunks)


def gsd_candidates(
    p: torch.Tensor,
    x: torch.Tensor,
    group_size: int,
    prob_threshold: float,
    codebook: torch.Tensor | None = None,
    embed_threshold: float = math.inf,
    close: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x's group under ``--group-mode ours`` as (candidates (..., C), their p (..., C), member (..., C), p(x) (..., 1)).

    Candidates are tokens other than x; a slot past an end of the vocabulary (fewer tokens above or below x
    than asked for) holds some token with a sentinel p outside [0, 1] and ``member`` False. x's group is {x}
    plus the members: :func:`gsd_group` as a mask over V, :func:`gsd_group_mass` as sums over the C candidates.
    """
    # The h = group_size // 2 tokens just above x in the ranking are the h least probable of those more probable
    # than x; the rest are the most probable of those less probable. Two unsorted top-k calls instead of a full
    # sort (the set does not depend on ``sorted``: sorting only permutes the selected k). Excluded tokens get
    # sentinels more than prob_threshold away from any p(x) in [0, 1], so the probability filter drops them.
    above_n = min(group_size // 2, p.shape[-1] - 1)
    below_n = min(group_size - 1 - group_size // 2, p.shape[-1] - 1)
    xs = x.unsqueeze(-1)
    px = p.gather(-1, xs)
    above = p.masked_fill(p <= px, 2.0 + prob_threshold).topk(above_n, dim=-1, largest=False, sorted=False)
    below = p.masked_fill(p >= px, -1.0 - prob_threshold).topk(below_n, dim=-1, largest=True, sorted=False)
    values = torch.cat([above.values, below.values], dim=-1)  # p at the candidates, or a sentinel
    cand = torch.cat([above.indices, below.indices], dim=-1)
    member = (values - px).abs() < prob_threshold
    if close is not None:  # close[x, cand] as one flat take (fewer ops than 2-D indexing)
        member &= close.reshape(-1).take(cand + xs * close.shape[-1])
    elif codebook is not None and math.isfinite(embed_threshold):
        member &= codebook_distance(codebook, x, cand) < embed_threshold
    return cand, values, member, px


def gsd_group(
    p: torch.Tensor,
    x: torch.Tensor,
    group_size: int,
    prob_threshold: float,
    codebook: torch.Tensor | None = None,
    embed_threshold: float = math.inf,
    close: torch.Tensor | None = None,
) -> torch.Tensor:
    """GSD's dynamic cluster of x as a boolean mask (..., V) (``--group-mode ours``, the paper's rule).

    Candidates are the ``group_size`` tokens around x in the ranking by p (``group_size // 2`` more
    probable, the rest less probable, cut at the ends of the vocabulary; tokens tied with x in p are not
    candidates); a candidate t stays only if
    ``|p(t) - p(x)| < prob_threshold`` and, with a codebook, ``||E[t] - E[x]||^2 < embed_threshold``.
    x itself is always a member (GSD ``SpeculativeSampler.__call__``, shared/reference/speculative.md §2.2).
    ``close`` is :func:`codebook_close_table` of (codebook, embed_threshold), looked up instead of computing
    the distances (same result).
    """
    cand, values, member, _ = gsd_candidates(p, x, group_size, prob_threshold, codebook, embed_threshold, close)
    xs = x.unsqueeze(-1)
    cand = torch.where((values >= 0) & (values <= 1), cand, xs)  # sentinel slots write True at x, as x does
    return torch.zeros_like(p, dtype=torch.bool).scatter_(-1, cand, member | (cand == xs)).scatter_(-1, xs, True)


def gsd_group_mass(
    p: torch.Tensor,
    q: torch.Tensor,
    x: torch.Tensor,
    group_size: int,
    prob_threshold: float,
    codebook: torch.Tensor | None = None,
    embed_threshold: float = math.inf,
    close: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(p(C), q(C), p(x))`` over x's group C = :func:`gsd_group` (p ranks the candidates), summed over x and
    the group_size candidates instead of masking two (..., V) tensors, p and q in one stacked sum: what GSD's
    ratio needs, in fewer and smaller ops (issue #14: GSD's engine share; after a target forward has evicted
    the caches each small op costs several times its warm time here). Equal to the masked sums up to float
    summation order."""
    cand, values, member, px = gsd_candidates(p, x, group_size, prob_threshold, codebook, embed_threshold, close)
    at_x = torch.cat([px, q.gather(-1, x.unsqueeze(-1))], dim=-1)  # (..., 2): p(x), q(x)
    both = torch.stack([values, q.gather(-1, cand)], dim=-2)  # (..., 2, C)
    mass = at_x + torch.where(member.unsqueeze(-2), both, 0.0).sum(-1)
    return mass[..., 0], mass[..., 1], at_x[..., 0]


def gsd_official_group(
    p: torch.Tensor,
    x: torch.Tensor,
    prob_threshold: float,
    codebook: torch.Tensor | None = None,
    embed_threshold: float = math.inf,
    half: int = GSD_OFFICIAL_HALF,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The official GSD code's group of x: (mask (..., V), empty (...)) (``--group-mode official``).

    The official code sorts the processed logits ascending, finds x's rank r and takes the Python slice
    ``order[r - 7 : r + 7]``: the 7 lower-ranked tokens, x, and the 6 higher-ranked ones (fewer at the top
    of the ranking). For r < 7 the negative start wraps around, which leaves the slice empty for any
    vocabulary of 14 or more tokens; the official code then falls back to the exact test (``empty``).
    Members must pass ``|p(t) - p(x)| < prob_threshold`` and the embedding filter as in ours. Ranks are by
    p (softmax is monotone in the processed logits); ties, e.g. the zeros of top-k, are ordered by token id.
    """
    V = p.shape[-1]
    rank = p.argsort(dim=-1, stable=True).argsort(dim=-1)  # ascending rank of every token
    r = gather_token(rank, x)
    start = r - half
    start = torch.where(start < 0, (start + V).clamp_min(0), start)  # Python slice semantics
    stop = (r + half).clamp(max=V)
    empty = start >= stop
    member = (rank >= start.unsqueeze(-1)) & (rank < stop.unsqueeze(-1))
    member &= (p - gather_token(p, x).unsqueeze(-1)).abs() < prob_threshold
    if codebook is not None and math.isfinite(embed_threshold):
        cb = codebook.to(p.device, torch.float32)
        member &= (cb[x].unsqueeze(-2) - cb).pow(2).sum(-1) < embed_threshold
    return member, empty


@dataclass
class GroupedRule:
    """GSD: accept with ``min(1, sum_C target / sum_C q)`` over x's dynamic group C; composes with ``inner``.

    ``mode='ours'`` builds C with :func:`gsd_group` (the paper's G/2 tokens on each side); ``'official'``
    with :func:`gsd_official_group` (the released code's fixed 14-token slice, exact test when it is
    empty, raw division as the official code: a zero group denominator gives NaN = reject).
    ``respect_truncation`` rejects a draft outside the support of the target (ratio 0).
    """

    inner: AcceptanceRule
    # Rule defaults follow the GSD paper/code (G 25, p 0.15, d 0.5 on its LM embeddings); the ``gsd`` sampler's
    # defaults (GSDOptions) were tuned on the bundled model and are always passed explicitly.
    group_size: int = 25
    prob_threshold: float = 0.15
    codebook: torch.Tensor | None = None
    embed_threshold: float = 0.5
    name: str = "gsd"
    mode: str = "ours"
    respect_truncation: bool = True
    close: torch.Tensor | None = None  # codebook_close_table(codebook, embed_threshold): looked up, same result
    verify_chunk: int = 4  # the verify core evaluates the group 4 positions at a time, while drafts survive

    def __post_init__(self) -> None:
        if self.mode not in GSD_GROUP_MODES:
            raise ValueError(f"group_mode must be one of {GSD_GROUP_MODES}, got {self.mode!r}")

    def target(self, p: torch.Tensor, x: torch.Tensor, q: torch.Tensor | None = None) -> torch.Tensor:
        return self.inner.target(p, x, q)

    def ratio(self, target: torch.Tensor, q: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "official":
            group, empty = gsd_official_group(target, x, self.prob_threshold, self.codebook, self.embed_threshold)
            px = gather_token(target, x)
            grouped = (target * group).sum(-1) / (q * group).sum(-1)
            ratio = torch.where(empty, px / gather_token(q, x), grouped)
        else:
            p_mass, q_mass, px = gsd_group_mass(target, q, x, self.group_size, self.prob_threshold, self.codebook,
                                                self.embed_threshold, close=self.close)
            ratio = p_mass / q_mass.clamp_min(TINY)
        if self.respect_truncation:  # a draft outside the target's support is never accepted
            ratio = ratio.masked_fill(~(px > 0), 0.0)
        return ratio

    def residual(self, p: torch.Tensor, target: torch.Tensor, q: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.inner.residual(p, target, q, x)
