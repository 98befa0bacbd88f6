"""Selection rules: given one image's signals and a budget, which visual tokens stay.

Each strategy is a small object whose `select` is a pure function of tensors, so it can be tested against a
direct reference computation without a model. Rules follow /work/shared/reference/pruning.md §2; where we
deviate (e.g. merging in LLM-input space), the docstring says so.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from genaccel.pruning.budget import uniform_indices


@dataclass
class SpanSignals:
    """Everything a strategy may look at for one image's prunable tokens (N of them, in sequence order).

    `embeds` are the LLM-side states at the pruning point (LLM input embeddings, or the hidden states entering
    layer K for in-LLM strategies). The optional fields are filled only when a strategy asks for them.
    """

    embeds: torch.Tensor
    cls_attention: torch.Tensor | None = None  # [N] [CLS] attention in the vision tower (deep layer)
    cls_attention_shallow: torch.Tensor | None = None  # [N] same at the shallow layer (HiRED budgets)
    vision_keys: torch.Tensor | None = None  # [N, dh] head-mean vision keys (VisionZip merge metric)
    global_attention: torch.Tensor | None = None  # [N] attention received in the vision tower (mean over queries)
    text_attention: torch.Tensor | None = None  # [N] last text token's attention at LLM layer K-1 (FastV)
    key_norms: torch.Tensor | None = None  # [N] L1 norm of post-RoPE keys at layer K-1 (DART pivots)
    text_pivots: torch.Tensor | None = None  # [P, D] hidden states of the text pivot tokens (DART)
    partition: torch.Tensor | None = None  # [N] AnyRes partition id: 0 = base image, 1.. = crops (HiRED)
    base_crop: torch.Tensor | None = None  # [N] for base-image tokens, the crop covering them, else -1
    base_chunk: torch.Tensor | None = None  # [N] same, by HiRED's row-major chunks of the base grid, else -1
    vision_features: torch.Tensor | None = None  # [N, Dv] pre-projector patch features (VisionZip official)
    cls_feature: torch.Tensor | None = None  # [Dv] pre-projector [CLS] feature of the image (VisionZip official)
    project: Callable[[torch.Tensor], torch.Tensor] | None = None  # the model's projector, [M, Dv] -> [M, D]
    crop_cls_attention: torch.Tensor | None = None  # [P, T] deep [CLS] attention over every patch of each crop
    crop_keys: torch.Tensor | None = None  # [P, T, dh] head-mean keys of every patch of each crop
    crop_features: torch.Tensor | None = None  # [P, 1 + T, Dv] pre-projector states of each crop, [CLS] first
    crop_grid: tuple[int, int] | None = None  # (rows, columns) of the AnyRes crops after the base image
    crop_source: torch.Tensor | None = None  # [N] each token's patch in the flattened [P * T] crop patches
    columns: torch.Tensor | None = None  # [N] sequence offset of each token from the sample's first real token
    text_pivot_columns: torch.Tensor | None = None  # [P] the same for the text pivots (DART's pivot order)

    @property
    def n_tokens(self) -> int:
        return self.embeds.shape[0]

    def jittered(self, relative: float, generator: torch.Generator) -> SpanSignals:
        """A copy with Gaussian noise of `relative` x std added to every float signal (robustness probe, §5)."""

        def perturb(value):
            if not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.numel() < 2:
                return value
            noise = torch.randn(value.shape, generator=generator, dtype=torch.float32).to(value)
            return value + relative * value.float().std().to(value) * noise

        return dataclasses.replace(self, **{f.name: perturb(getattr(self, f.name)) for f in dataclasses.fields(self)})


@dataclass
class Selection:
    """A strategy's answer: sorted kept indices, the ranking scores (higher = kept first), merged embeddings."""

    keep: torch.Tensor
    scores: torch.Tensor | None = None
    embeds: torch.Tensor | None = None  # [len(keep), D] replacement states for the kept tokens (merging)
    ranked: torch.Tensor | None = None  # the part of `keep` chosen by `scores` (default: all of it)
    chosen: torch.Tensor | None = None  # tokens the rule selected when `keep` are only slots (default: keep)
    whole_span: bool = False  # `keep` indexes the image's whole run, always-kept tokens (newlines) included:
    # only those slots stay (VisionZip's NeXT layout has no newlines)

    @property
    def selected(self) -> torch.Tensor:
        """The tokens the rule chose (what robustness overlaps compare), sorted."""
        return self.keep if self.chosen is None else self.chosen


class Strategy:
    """Base class. `needs`: signals that must exist; `wants`: used when the model can provide them."""

    name: ClassVar[str] = ""
    needs: ClassVar[frozenset[str]] = frozenset()
    wants: ClassVar[frozenset[str]] = frozenset()
    in_llm: ClassVar[bool] = False  # selects inside the LLM at decoder layer K from LLM attention
    normed_hidden: ClassVar[bool] = False  # in-LLM `embeds` pass through the LLM's final norm first
    uses_generator: ClassVar[bool] = False  # draws from `generator` (the session then seeds it by image content)

    def select(
        self, signals: SpanSignals, budget: int, preselected: torch.Tensor, generator: torch.Generator
    ) -> Selection:
        """Choose at most `budget` of `signals.n_tokens` tokens, always including `preselected` (the reserve).

        `generator` is the only source of randomness, so a selection is reproducible per image.
        """
        raise NotImplementedError

    # Why `surrogate` cannot exist for this rule (None: it is defined). Used by the attack probe's error.
    no_surrogate: ClassVar[str | None] = "it defines no differentiable `surrogate` of its ranking"

    def surrogate(self, signals: SpanSignals, kept: torch.Tensor) -> torch.Tensor:
        """A differentiable stand-in [N] for this rule's ranking (higher = kept first), given the reference
        keep set `kept` [N] (bool), for the compression-aware attack probe (`robustness.attack_overlap`).

        Lowering it on `kept` and raising it elsewhere must push the rule towards another keep set. Signals
        arrive with their autograd graph back to the pixels. Rules without such a ranking raise.
        """
        raise ValueError(f"strategy {self.name!r} cannot be attacked by gradient: {self.no_surrogate}")


def candidates(n_tokens: int, preselected: torch.Tensor) -> torch.Tensor:
    """Indices not already kept by the reserve, ascending."""
    free = torch.ones(n_tokens, dtype=torch.bool)
    free[preselected] = False
    return free.nonzero().squeeze(1)


def merge_kept(preselected: torch.Tensor, picks: torch.Tensor) -> torch.Tensor:
    """Sorted union of reserve and strategy picks (spatial/sequence order is kept, as every method does)."""
    return torch.cat([preselected, picks]).unique(sorted=True)


def top_scores(scores: torch.Tensor, budget: int, preselected: torch.Tensor) -> torch.Tensor:
    """Keep the reserve plus the highest-scoring remaining tokens, up to `budget` in total."""
    pool = candidates(scores.shape[0], preselected)
    count = max(0, min(budget - preselected.numel(), pool.numel()))
    order = torch.topk(scores[pool].float(), count).indices
    return merge_kept(preselected, pool[order])


def cosine_matrix(x: torch.Tensor) -> torch.Tensor:
    """Pairwise cosine similarity of rows, computed in float32."""
    x = F.normalize(x.float(), dim=-1)
    return x @ x.T


def min_max(x: torch.Tensor) -> torch.Tensor:
    """Rescale to [0, 1] (constant input -> zeros)."""
    x = x.float()
    span = x.max() - x.min()
    return (x - x.min()) / span if span > 0 else torch.zeros_like(x)


def require(signals: SpanSignals, field: str, strategy: str) -> torch.Tensor:
    """Fetch a needed signal or explain which model support is missing."""
    value = getattr(signals, field)
    if value is None:
        raise ValueError(f"strategy {strategy!r} needs the {field!r} signal, which this model/session did not provide")
    return value


class KeepAll(Strategy):
    """Keep every token: the baseline that must reproduce the unpatched model exactly."""

    name = "keep-all"
    no_surrogate = "it keeps every token whatever the pixels (overlap 1 by construction)"

    def select(self, signals, budget, preselected, generator):
        return Selection(keep=torch.arange(signals.n_tokens))


class RandomPrune(Strategy):
    """Uniformly random subset (seeded); a strong baseline per reference §2.15."""

    name = "random"
    uses_generator = True
    no_surrogate = (
        "its set is drawn from a stream seeded by a hash of the pixels, so any change redraws it wholesale; "
        "there is no ranking to follow (an attacker who knows `seed` can search, one who does not cannot steer)"
    )

    def select(self, signals, budget, preselected, generator):
        pool = candidates(signals.n_tokens, preselected)
        count = max(0, min(budget - preselected.numel(), pool.numel()))
        picks = pool[torch.randperm(pool.numel(), generator=generator)[:count]]
        return Selection(keep=merge_kept(preselected, picks))


class UniformPrune(Strategy):
    """Evenly strided tokens in sequence order (spatial downsampling baseline)."""

    name = "uniform"
    no_surrogate = "its set depends only on the token count, not on the pixels (overlap 1 by construction)"

    def select(self, signals, budget, preselected, generator):
        pool = candidates(signals.n_tokens, preselected)
        picks = pool[uniform_indices(pool.numel(), budget - preselected.numel())]
        return Selection(keep=merge_kept(preselected, picks))


def assign_to_nearest(keep: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """For every token, the position in `keep` of the closest kept index in sequence order (ties -> earlier)."""
    distance = (torch.arange(n_tokens)[:, None] - keep[None]).abs()
    return distance.argmin(dim=1)


def group_means(values: torch.Tensor, groups: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Mean of `values` rows per group id (every group is non-empty by construction)."""
    sums = torch.zeros(n_groups, values.shape[1], dtype=torch.float32).index_add_(0, groups, values.float())
    counts = torch.bincount(groups, minlength=n_groups).clamp_min(1)
    return (sums / counts[:, None]).to(values.dtype)


class PoolPrune(Strategy):
    """Uniform anchors, each replaced by the mean of the tokens nearest to it in sequence order (1-D pooling)."""

    name = "pool"
    no_surrogate = "its anchors depend only on the token count, not on the pixels (overlap 1 by construction)"

    def select(self, signals, budget, preselected, generator):
        keep = UniformPrune().select(signals, budget, preselected, generator).keep
        if keep.numel() == 0:
            return Selection(keep=keep)
        groups = assign_to_nearest(keep, signals.n_tokens)
        return Selection(keep=keep, embeds=group_means(signals.embeds, groups, keep.numel()))


class FasterVLM(Strategy):
    """Top tokens by [CLS] attention in the vision tower (FasterVLM, reference §2.4)."""

    name = "fastervlm"
    needs = frozenset({"cls_attention"})
    no_surrogate = None

    def select(self, signals, budget, preselected, generator):
        scores = require(signals, "cls_attention", self.name)
        return Selection(keep=top_scores(scores, budget, preselected), scores=scores)

    def surrogate(self, signals, kept):
        return require(signals, "cls_attention", self.name)


class GlobalAttention(Strategy):
    """Top tokens by "global attention": the attention each token receives in the vision tower's feature layer,
    averaged over heads and every query of its attention block (reference §0.1, §3.4).

    The [CLS]-free analogue of FasterVLM for SigLIP (LLaVA-OneVision) and Qwen-ViT towers, where no [CLS]
    query summarises the image: a token many queries attend to is one the tower treats as informative (the
    "global attention" HiPrune and VisionZip's Qwen ports use). Qwen: the last vision block, averaged over the
    2x2 patches each LLM token merges; LLaVA-OneVision: interpolated and pooled exactly as the features are.
    Works on CLIP towers too ([CLS] counted as a query).
    """

    name = "global-attention"
    needs = frozenset({"global_attention"})
    no_surrogate = None

    def select(self, signals, budget, preselected, generator):
        scores = require(signals, "global_attention", self.name)
        return Selection(keep=top_scores(scores, budget, preselected), scores=scores)

    def surrogate(self, signals, kept):
        return require(signals, "global_attention", self.name)


class VisionZip(Strategy):
    """Dominant tokens by [CLS] attention plus contextual tokens merged by key similarity (reference §2.3).

    `contextual` is the share of the budget spent on merged tokens (README default 10 of 64). Targets are
    strided over the non-dominant patches (step max(1, rest // C), first C); every other non-dominant patch
    joins the target whose head-mean vision key is most similar (cosine).

    `mode="official"` (default) follows VisionZip's `CLIPVisionTower_VisionZip.forward`: the budget counts the
    [CLS] token as one of the dominant tokens (54 + 10 = 64 means [CLS] + 53 patches + 10 contextual), a
    contextual token is target + mean(members) of the *pre-projector* feature-layer states, and the LLM
    receives projector([CLS, dominant patches in spatial order, contextual tokens in target order]). Those
    tokens fill the first `budget` slots of the image's placeholder run (contiguous positions, as VisionZip).
    On LLaVA-NeXT, `mode="official"` follows VisionZip's NeXT path instead (`select_official_anyres`: the
    budget split evenly over the crops, kept tokens re-sorted into the crop grid, newlines dropped).
    `mode="llm"`: [CLS] is not counted, the merged state is mean(target, members) of LLM-input embeddings at
    the target's own slot and position (no projector needed; works on any packed layout).
    """

    name = "visionzip"
    needs = frozenset({"cls_attention"})
    wants = frozenset(
        {"vision_keys", "vision_features", "cls_feature", "project"}
        | {"crop_cls_attention", "crop_keys", "crop_features", "crop_grid", "crop_source"}
    )
    modes = ("official", "llm")
    no_surrogate = None

    def surrogate(self, signals, kept):
        """The dominant tokens' [CLS] ranking (the strided contextual targets follow from it)."""
        return require(signals, "cls_attention", self.name)

    def __init__(self, contextual: float = 10 / 64, mode: str = "official"):
        if not 0.0 <= contextual <= 1.0:
            raise ValueError(f"visionzip contextual share must be in [0, 1]; got {contextual}")
        if mode not in self.modes:
            raise ValueError(f"visionzip mode must be one of {self.modes}; got {mode!r}")
        self.contextual, self.mode = contextual, mode

    def contextual_targets(
        self, signals: SpanSignals, dominant: torch.Tensor, n_context: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(targets, members, owner of each member): strided targets over the non-dominant tokens, members
        assigned to the target of largest key cosine (ties -> the earlier target, as argmax)."""
        rest = candidates(signals.n_tokens, dominant)
        n_context = min(n_context, rest.numel())
        if n_context == 0:
            empty = rest[:0]
            return empty, empty, empty
        step = max(1, rest.numel() // n_context)
        targets = rest[::step][:n_context]
        metric = signals.vision_keys if signals.vision_keys is not None else signals.embeds
        members = candidates(signals.n_tokens, torch.cat([dominant, targets]))
        owner = cosine_matrix(metric)[members][:, targets].argmax(dim=1)
        return targets, members, owner

    def select(self, signals, budget, preselected, generator):
        scores = require(signals, "cls_attention", self.name)
        if self.mode == "official":
            return self.select_official(signals, scores, budget, preselected)
        n_context = min(round(self.contextual * budget), max(0, budget - preselected.numel()))
        dominant = top_scores(scores, budget - n_context, preselected)
        targets, members, owner = self.contextual_targets(signals, dominant, n_context)
        if targets.numel() == 0:
            return Selection(keep=dominant, scores=scores)
        keep = merge_kept(dominant, targets)
        slot_of = torch.full((signals.n_tokens,), -1, dtype=torch.long)
        slot_of[keep] = torch.arange(keep.numel())
        rows = torch.cat([keep, members])
        groups = torch.cat([torch.arange(keep.numel()), slot_of[targets[owner]]])
        embeds = group_means(signals.embeds[rows], groups, keep.numel())
        return Selection(keep=keep, scores=scores, embeds=embeds, ranked=dominant)

    def crop_tokens(
        self, scores: torch.Tensor, keys: torch.Tensor, features: torch.Tensor, budget: int, preselected: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """VisionZip's rule on one crop: `features` [1 + T, Dv] ([CLS] first), `scores` / `keys` over the T
        patches. Returns ([CLS, dominant patches in spatial order, contextual tokens] [budget, Dv], dominant
        patch indices, contextual target indices)."""
        n_context = min(round(self.contextual * budget), max(0, budget - 1 - preselected.numel()))
        dominant = top_scores(scores, budget - 1 - n_context, preselected)
        crop = SpanSignals(embeds=features[1:], vision_keys=keys)
        targets, members, owner = self.contextual_targets(crop, dominant, n_context)
        patches = features[1:].float()
        sums = torch.zeros(targets.numel(), patches.shape[1]).index_add_(0, owner, patches[members])
        counts = torch.bincount(owner, minlength=targets.numel()).clamp_min(1)
        contextual = patches[targets] + sums / counts[:, None]
        return torch.cat([features[:1].float(), patches[dominant], contextual]), dominant, targets

    def select_official(self, signals: SpanSignals, scores, budget: int, preselected) -> Selection:
        """VisionZip's own rule and budget accounting (see the class docstring)."""
        project = require(signals, "project", self.name)
        if budget <= 0:  # on AnyRes crops nothing stays, as VisionZip's NeXT layout has no newlines
            anyres = signals.crop_features is not None
            return Selection(keep=torch.zeros(0, dtype=torch.long), scores=scores, whole_span=anyres)
        if budget >= signals.n_tokens:  # keep=1.0 keeps the image as it is (VisionZip itself would still merge)
            return Selection(keep=torch.arange(signals.n_tokens), scores=scores)
        if signals.crop_features is not None:
            return self.select_official_anyres(signals, scores, budget, preselected, project)
        features = require(signals, "vision_features", self.name).float()
        cls = require(signals, "cls_feature", self.name).float()
        keys = signals.vision_keys if signals.vision_keys is not None else features
        tokens, dominant, targets = self.crop_tokens(
            scores, keys, torch.cat([cls[None], features]), budget, preselected
        )
        return Selection(
            keep=torch.arange(tokens.shape[0]),
            scores=scores,
            embeds=project(tokens),
            ranked=dominant,
            chosen=merge_kept(dominant, targets),
        )

    def select_official_anyres(self, signals: SpanSignals, scores, budget: int, preselected, project) -> Selection:
        """VisionZip's LLaVA-NeXT path (`prepare_inputs_labels_for_multimodal_visionzip` with
        `restore_image_features_sorted`): every crop (base image first) runs the one-crop rule on *all* its
        patches with the same per-crop budget b = budget // crops, then the LLM receives the base crop's b
        tokens; the other crops' dominant patches in row-major order of the whole (rows x 24, columns x 24)
        crop grid, neither unpadded nor with newlines; the other crops' [CLS] tokens; their contextual
        tokens, crop by crop. They fill the first slots of the image's run; the rest (newlines included) goes.
        """
        if preselected.numel():
            raise ValueError(
                "visionzip mode='official' on AnyRes crops budgets each whole crop; reserve is not supported there "
                "(use mode='llm' or reserve=0)"
            )
        features = signals.crop_features.float()
        crop_scores = require(signals, "crop_cls_attention", self.name)
        keys = require(signals, "crop_keys", self.name)
        rows, cols = require(signals, "crop_grid", self.name)
        n_crops, n_patches = crop_scores.shape
        if rows * cols != n_crops - 1:
            raise ValueError(f"AnyRes grid {rows}x{cols} does not match {n_crops - 1} crops")
        side = math.isqrt(n_patches)
        per_crop = budget // n_crops
        if per_crop <= 0:
            return Selection(keep=torch.zeros(0, dtype=torch.long), scores=scores, whole_span=True)
        empty = torch.zeros(0, dtype=torch.long)
        parts = [self.crop_tokens(crop_scores[c], keys[c], features[c], per_crop, empty) for c in range(n_crops)]
        n_dominant = parts[0][1].numel()
        # The crops' dominant patches scattered into the crop grid and read row-major across crops.
        crop = torch.arange(1, n_crops).repeat_interleave(n_dominant)
        patch = torch.cat([part[1] for part in parts[1:]]) if n_crops > 1 else empty
        grid_row = (crop - 1) // cols * side + patch // side
        grid_col = (crop - 1) % cols * side + patch % side
        order = (grid_row * cols * side + grid_col).argsort()
        dominant_rows = torch.cat([part[0][1 : 1 + n_dominant] for part in parts[1:]])[order] if n_crops > 1 else None
        tokens = torch.cat(
            [parts[0][0]]
            + ([dominant_rows] if dominant_rows is not None else [])
            + [part[0][:1] for part in parts[1:]]
            + [part[0][1 + n_dominant :] for part in parts[1:]]
        )
        dominant = torch.cat([part[1] + c * n_patches for c, part in enumerate(parts)])
        targets = torch.cat([part[2] + c * n_patches for c, part in enumerate(parts)])
        source = require(signals, "crop_source", self.name)
        is_dominant = torch.isin(source, dominant)
        chosen = (is_dominant | torch.isin(source, targets)).nonzero().squeeze(1)
        return Selection(
            keep=torch.arange(tokens.shape[0]),
            scores=scores,
            embeds=project(tokens),
            ranked=is_dominant.nonzero().squeeze(1),
            chosen=chosen,
            whole_span=True,
        )


def largest_remainder(total: int, weights: torch.Tensor, capacity: torch.Tensor) -> torch.Tensor:
    """Split `total` integer units proportionally to `weights` without exceeding `capacity` per bucket."""
    weights = weights.double()
    if weights.sum() <= 0:
        weights = capacity.double()
    share = torch.zeros_like(weights) if weights.sum() <= 0 else total * weights / weights.sum()
    alloc = torch.minimum(share.floor().long(), capacity)
    while alloc.sum() < min(total, int(capacity.sum())):
        room = alloc < capacity
        gap = torch.where(room, share - alloc.double(), torch.full_like(share, -math.inf))
        alloc[int(gap.argmax())] += 1
    return alloc


class HiRED(Strategy):
    """Budget per AnyRes partition from shallow [CLS] attention, top-k per partition by deep (reference §2.6).

    `alpha` of the budget goes to the base (full) image; the rest is split over crops in proportion to how many
    of the base image's top (1 - alpha) * n_base shallow-attention tokens fall inside each crop. Without
    partitions (LLaVA-1.5) it is top-k by deep attention.

    `mode="region"` (default): a base token votes for the crop covering its 2-D region; crop budgets are
    rounded by largest remainder and any shortfall is topped up globally, so exactly `budget` tokens stay.
    `mode="official"`: HiRED's code (`HiRED_sub_img_budgets`): the base grid is cut into row-major chunks
    (chunk i -> crop i), crop budgets are floored, and no top-up, so fewer than `budget` tokens may stay.
    """

    name = "hired"
    needs = frozenset({"cls_attention"})
    wants = frozenset({"cls_attention_shallow", "partition", "base_crop", "base_chunk"})
    modes = ("region", "official")
    no_surrogate = None

    def surrogate(self, signals, kept):
        """The deep [CLS] attention that ranks tokens within each partition (budgets are left alone)."""
        return require(signals, "cls_attention", self.name)

    def __init__(self, alpha: float = 0.5, mode: str = "region"):
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"hired alpha must be in [0, 1]; got {alpha}")
        if mode not in self.modes:
            raise ValueError(f"hired mode must be one of {self.modes}; got {mode!r}")
        self.alpha, self.mode = alpha, mode

    def partition_budgets(self, signals: SpanSignals, budget: int, capacity: torch.Tensor) -> torch.Tensor:
        """Tokens per partition [base, crop 1, ...], each at most its free `capacity`."""
        base = signals.partition == 0
        n_base = int(base.sum())
        base_budget = min(int(budget * self.alpha), int(capacity[0]))
        shallow = signals.cls_attention_shallow if signals.cls_attention_shallow is not None else signals.cls_attention
        crop_of = signals.base_chunk if self.mode == "official" else signals.base_crop
        if crop_of is None:
            raise ValueError("hired mode='official' needs the base_chunk signal (LLaVA-NeXT layouts provide it)")
        votes = crop_of[base][torch.topk(shallow[base].float(), int((1 - self.alpha) * n_base)).indices]
        weights = torch.bincount(votes[votes > 0], minlength=capacity.numel())[1:]
        if self.mode == "official":
            total = weights.sum()
            share = weights.double() * (budget - base_budget) / total if total > 0 else weights.double()
            crop_budgets = torch.minimum(share.floor().long(), capacity[1:])
        else:
            crop_budgets = largest_remainder(budget - base_budget, weights, capacity[1:])
        return torch.cat([torch.tensor([base_budget]), crop_budgets])

    def select(self, signals, budget, preselected, generator):
        scores = require(signals, "cls_attention", self.name)
        if signals.partition is None or signals.base_crop is None or not bool((signals.partition > 0).any()):
            return Selection(keep=top_scores(scores, budget, preselected), scores=scores)
        free = torch.ones(signals.n_tokens, dtype=torch.bool)
        free[preselected] = False
        n_parts = int(signals.partition.max()) + 1
        capacity = torch.bincount(signals.partition[free & (signals.partition >= 0)], minlength=n_parts)
        budgets = self.partition_budgets(signals, max(0, budget - preselected.numel()), capacity)
        picks = [top_in_partition(scores, free & (signals.partition == p), int(b)) for p, b in enumerate(budgets)]
        keep = merge_kept(preselected, torch.cat(picks))
        if self.mode == "official":
            return Selection(keep=keep, scores=scores)
        # Top up globally when a partition had fewer free tokens than its share.
        return Selection(keep=top_scores(scores, budget, keep), scores=scores)


def top_in_partition(scores: torch.Tensor, members: torch.Tensor, count: int) -> torch.Tensor:
    """The `count` highest-scoring indices among the boolean `members`."""
    index = members.nonzero().squeeze(1)
    return index[torch.topk(scores[index].float(), min(count, index.numel())).indices]


class FastV(Strategy):
    """Top tokens by the last text token's head-mean attention at LLM layer K-1; pruned from layer K on (§2.1)."""

    name = "fastv"
    needs = frozenset({"text_attention"})
    in_llm = True
    no_surrogate = None

    def surrogate(self, signals, kept):
        return require(signals, "text_attention", self.name)

    def select(self, signals, budget, preselected, generator):
        scores = require(signals, "text_attention", self.name)
        return Selection(keep=top_scores(scores, budget, preselected), scores=scores)


def farthest_point(distance: torch.Tensor, count: int, preselected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy max-min diversity: repeatedly add the token farthest from the kept set.

    Without a reserve the first pick is the token with the largest nearest-neighbour distance (DivPrune).
    Returns (picks in pick order, gain of each pick = the criterion value when it was picked).
    """
    n = distance.shape[0]
    chosen = torch.zeros(n, dtype=torch.bool)
    chosen[preselected] = True
    if preselected.numel() > 0:
        nearest = distance[preselected].min(dim=0).values
    else:
        nearest = distance.masked_fill(torch.eye(n, dtype=torch.bool), math.inf).min(dim=0).values
    picks, gains = [], []
    for step in range(count):
        criterion = nearest.masked_fill(chosen, -math.inf)
        pick = int(criterion.argmax())
        picks.append(pick)
        gains.append(float(criterion[pick]))
        chosen[pick] = True
        first_of_empty_set = step == 0 and preselected.numel() == 0
        nearest = distance[pick].clone() if first_of_empty_set else torch.minimum(nearest, distance[pick])
    return torch.tensor(picks, dtype=torch.long), torch.tensor(gains)


def final_scores(n_tokens: int, picks: torch.Tensor, gains: torch.Tensor, leftover: torch.Tensor) -> torch.Tensor:
    """Per-token ranking values for the margin report: gain at pick time for kept, last criterion for dropped."""
    scores = leftover.float().clone()
    scores[picks] = gains.float()
    return scores


class DivPrune(Strategy):
    """Max-min diversity of LLM input embeddings, distance 1 - cosine (reference §2.7)."""

    name = "divprune"
    no_surrogate = None

    def surrogate(self, signals, kept):
        """Distance (1 - cosine) of each token to its nearest *other* reference-kept token: high for a diverse
        kept set, low for dropped tokens it covers. Lowering it on kept tokens makes them redundant with each
        other; raising it on dropped ones makes them uncovered, so max-min diversity picks them instead."""
        distance = 1.0 - cosine_matrix(signals.embeds)
        others = kept[None, :] & ~torch.eye(signals.n_tokens, dtype=torch.bool)
        return distance.masked_fill(~others, 2.0).min(dim=1).values

    def select(self, signals, budget, preselected, generator):
        distance = 1.0 - cosine_matrix(signals.embeds)
        count = max(0, min(budget - preselected.numel(), signals.n_tokens - preselected.numel()))
        picks, gains = farthest_point(distance, count, preselected)
        keep = merge_kept(preselected, picks)
        leftover = distance[keep].min(dim=0).values if keep.numel() else torch.zeros(signals.n_tokens)
        scores = final_scores(signals.n_tokens, picks, gains, leftover)
        if preselected.numel() == 0 and picks.numel():
            scores[picks[0]] = math.inf  # the seed pick follows a different rule; keep it out of the margin
        return Selection(keep=keep, scores=scores)


def embedding_distinctiveness(embeds: torch.Tensor) -> torch.Tensor:
    """Training-free importance without [CLS]: how far a token is from the image's mean embedding (1 - cos)."""
    mean = embeds.float().mean(dim=0, keepdim=True)
    return 1.0 - F.cosine_similarity(embeds.float(), mean, dim=-1)


class MMR(Strategy):
    """IDPruner-style maximal marginal relevance: lam * importance - (1 - lam) * max similarity to kept (§2.9).

    Importance is training-free: min-max [CLS] attention when the vision tower has a [CLS] token, otherwise
    embedding distinctiveness. Similarity is cosine of LLM input embeddings. One pick per step (parallel_k=1).
    """

    name = "mmr"
    wants = frozenset({"cls_attention"})
    no_surrogate = None

    def surrogate(self, signals, kept):
        """The marginal relevance against the reference keep set: lam * importance - (1 - lam) * the largest
        cosine to another kept token (the value the greedy loop compares)."""
        raw = signals.cls_attention if signals.cls_attention is not None else embedding_distinctiveness(signals.embeds)
        similarity = cosine_matrix(signals.embeds)
        others = kept[None, :] & ~torch.eye(signals.n_tokens, dtype=torch.bool)
        max_sim = similarity.masked_fill(~others, -2.0).max(dim=1).values
        return self.lam * min_max(raw) - (1 - self.lam) * max_sim

    def __init__(self, lam: float = 0.5):
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"mmr lam must be in [0, 1]; got {lam}")
        self.lam = lam

    def select(self, signals, budget, preselected, generator):
        raw = signals.cls_attention if signals.cls_attention is not None else embedding_distinctiveness(signals.embeds)
        importance = min_max(raw)
        similarity = cosine_matrix(signals.embeds)
        max_sim = torch.full((signals.n_tokens,), -2.0)
        if preselected.numel():
            max_sim = torch.maximum(max_sim, similarity[preselected].max(dim=0).values)
        chosen = torch.zeros(signals.n_tokens, dtype=torch.bool)
        chosen[preselected] = True
        count = max(0, min(budget - preselected.numel(), signals.n_tokens - preselected.numel()))
        picks, gains = [], []
        for _ in range(count):
            value = (self.lam * importance - (1 - self.lam) * max_sim).masked_fill(chosen, -math.inf)
            pick = int(value.argmax())
            picks.append(pick)
            gains.append(float(value[pick]))
            chosen[pick] = True
            max_sim = torch.maximum(max_sim, similarity[pick])
        picks_t = torch.tensor(picks, dtype=torch.long)
        leftover = self.lam * importance - (1 - self.lam) * max_sim
        return Selection(
            keep=merge_kept(preselected, picks_t),
            scores=final_scores(signals.n_tokens, picks_t, torch.tensor(gains), leftover),
        )


def dart_pivot_order(image_columns: torch.Tensor, text_columns: torch.Tensor) -> list[int]:
    """Order in which DART's reference visits its pivots: iteration order of a Python set of their sequence
    indices (`get_retained_image_token` builds `set(image_indices + query_indices)`). Returns positions
    into the concatenation [image pivots, text pivots]."""
    columns = torch.cat([image_columns, text_columns]).tolist()
    position = {column: slot for slot, column in reversed(list(enumerate(columns)))}
    # Built from the list exactly as the reference does: a set made from a dict is sized differently and
    # can iterate in another order.
    return [position[column] for column in set(columns)]


class DART(Strategy):
    """Duplication-aware pruning: keep pivots, then per pivot its least similar visual tokens (reference §2.12).

    Follows DART's reference (`get_retained_image_token`, ModelTC/LightCompress): image pivots are the
    `pivot_image` visual tokens with the largest post-RoPE key L1 norm at layer K-1, text pivots the
    `pivot_text` tokens *after the image* with the largest norm (the session selects them); similarity is the
    cosine of the hidden states entering layer K after the LLM's final norm (`embeds` / `text_pivots` are
    filled that way). Pivots are visited in the reference's order; each takes its least similar visual tokens
    not yet kept.

    `count="budget"` (default): each pivot takes ceil((budget - image pivots) / pivots) tokens until exactly
    `budget` are kept. `count="official"`: each pivot takes floor(budget / pivots) (the reference's
    TOKEN_TOPK with budget = N * (1 - reduction_ratio)), so image pivots + pivots * floor(budget / pivots)
    tokens stay (4 + 8 * 15 = 124 for N = 576, reduction 0.778, keep=127).
    """

    name = "dart"
    needs = frozenset({"key_norms"})
    wants = frozenset({"text_pivots", "columns", "text_pivot_columns"})
    in_llm = True
    normed_hidden = True  # the session fills `embeds` / `text_pivots` with final-norm states
    counts = ("budget", "official")
    no_surrogate = None

    def surrogate(self, signals, kept):
        """Minus each token's largest cosine to a pivot other than itself (DART keeps the least duplicated).

        Pivots are the rule's own (top key-norm image tokens, the session's text pivots), chosen anew on the
        perturbed states; only the similarity is differentiated, not which tokens are pivots."""
        norms = require(signals, "key_norms", self.name)
        image_pivots = torch.topk(norms.detach().float(), min(self.pivot_image, signals.n_tokens)).indices
        text = signals.text_pivots if signals.text_pivots is not None else signals.embeds[:0]
        pivots = torch.cat([signals.embeds[image_pivots], text])
        if pivots.shape[0] == 0:
            raise ValueError("dart surrogate: no pivots (pivot_image = pivot_text = 0), nothing ranks the tokens")
        similarity = F.normalize(signals.embeds.float(), dim=-1) @ F.normalize(pivots.float(), dim=-1).T
        is_self = torch.zeros_like(similarity, dtype=torch.bool)
        is_self[image_pivots, torch.arange(image_pivots.numel())] = True
        return -similarity.masked_fill(is_self, -1.0).max(dim=1).values

    def __init__(self, pivot_image: int = 4, pivot_text: int = 4, count: str = "budget"):
        if pivot_image < 0 or pivot_text < 0:
            raise ValueError(f"dart pivot counts must be >= 0; got {pivot_image}, {pivot_text}")
        if count not in self.counts:
            raise ValueError(f"dart count must be one of {self.counts}; got {count!r}")
        self.pivot_image, self.pivot_text, self.count = pivot_image, pivot_text, count

    def select(self, signals, budget, preselected, generator):
        norms = require(signals, "key_norms", self.name)
        n_image_pivots = min(self.pivot_image, max(0, budget - preselected.numel()))
        keep = top_scores(norms, preselected.numel() + n_image_pivots, preselected)
        image_pivots = keep[~torch.isin(keep, preselected)]
        image_pivots = image_pivots[norms[image_pivots].float().argsort(descending=True, stable=True)]
        text = signals.text_pivots if signals.text_pivots is not None else signals.embeds[:0]
        pivots = torch.cat([signals.embeds[image_pivots], text])
        if signals.columns is not None:
            text_columns = signals.text_pivot_columns
            if text_columns is None:
                text_columns = torch.zeros(0, dtype=torch.long)
            pivots = pivots[dart_pivot_order(signals.columns[image_pivots], text_columns)]
        similarity = F.normalize(pivots.float(), dim=-1) @ F.normalize(signals.embeds.float(), dim=-1).T
        kept = torch.zeros(signals.n_tokens, dtype=torch.bool)
        kept[keep] = True
        n_pivots = max(1, pivots.shape[0])
        if self.count == "official":
            quota = max(0, budget - preselected.numel()) // n_pivots
        else:
            quota = math.ceil(max(0, budget - int(kept.sum())) / n_pivots)
        for row in similarity:
            room = min(quota, signals.n_tokens - int(kept.sum()))
            if self.count == "budget":
                room = min(room, budget - int(kept.sum()))
            if room <= 0:
                break
            kept[row.masked_fill(kept, math.inf).argsort(stable=True)[:room]] = True
        duplication = similarity.max(dim=0).values if pivots.shape[0] else torch.zeros(signals.n_tokens)
        return Selection(keep=kept.nonzero().squeeze(1), scores=-duplication)


STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls
    for cls in (
        KeepAll,
        RandomPrune,
        UniformPrune,
        PoolPrune,
        FastV,
        VisionZip,
        FasterVLM,
        GlobalAttention,
        HiRED,
        DivPrune,
        MMR,
        DART,
    )
}
ALIASES = {"keep_all": "keep-all", "none": "keep-all", "idpruner": "mmr", "global": "global-attention"}


def available_strategies() -> list[str]:
    """Names accepted by `build_strategy` / `apply`."""
    return sorted(STRATEGIES)


def build_strategy(strategy: str | Strategy, **options) -> Strategy:
    """Instantiate a strategy by name with its options; an unknown name lists the available ones."""
    if isinstance(strategy, Strategy):
        if options:
            raise TypeError(f"options {sorted(options)} given with an already built strategy {strategy.name!r}")
        return strategy
    key = ALIASES.get(strategy.lower(), strategy.lower()) if isinstance(strategy, str) else None
    if key not in STRATEGIES:
        raise ValueError(f"unknown pruning strategy {strategy!r}; available: {', '.join(available_strategies())}")
    try:
        return STRATEGIES[key](**options)
    except TypeError as error:
        raise TypeError(f"bad options {sorted(options)} for strategy {key!r}: {error}") from None
