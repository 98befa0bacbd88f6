"""What every sampler shares: options, logits processing, guidance, outputs and statistics.

A sampler owns one decoding algorithm and its options; it talks to a model only through the
sampler contract (:mod:`genaccel.models.contract`). ``generate(model, labels, generator)`` returns a
:class:`SampleOutput` with raster-order tokens and :class:`SamplerStats`.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from genaccel.models.contract import ARModel, cfg_labels, check_labels, combine_cfg


@dataclass
class SamplerStats:
    """Per-call numbers. ``nfe`` counts target-model forwards (prefill included); CFG halves share one."""

    nfe: int = 0
    tokens: int = 0  # image tokens produced per image
    images: int = 0
    wall_time_s: float = 0.0
    draft_forwards: int = 0
    draft_time_s: float = 0.0
    target_time_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def target_forward(self, forward: Callable[..., Any], *args: Any) -> Any:
        """Run one target forward, counting it in ``nfe`` and its wall time in ``target_time_s``. A call whose
        output says it ran no row through the network (``extra["computed_rows"] == 0``: a refill served from
        the model's class-slot bank, contract call 6) is timed but not counted."""
        tic = time.perf_counter()
        out = forward(*args)
        if out.logits.is_cuda:  # kernels run asynchronously: wait so the time is the forward's
            torch.cuda.synchronize(out.logits.device)
        self.target_time_s += time.perf_counter() - tic
        computed = out.extra.get("computed_rows") if isinstance(getattr(out, "extra", None), dict) else None
        self.nfe += 1 if computed is None or int(computed) > 0 else 0
        return out

    @property
    def forwards_per_image(self) -> float:
        """Target forwards each image of the batch took part in, on average. In a ragged speculative batch
        (``row_verify_steps`` recorded) a complete image leaves the batch, so this is prefill + its own
        verify steps, fewer than the batch's ``nfe``; other samplers run every image in every forward."""
        row_steps = self.extra.get("row_verify_steps")
        if row_steps is None or not self.images:
            return float(self.nfe)
        return 1 + row_steps / self.images

    @property
    def rows_in_flight(self) -> int:
        """Images a forward carries at most: the batch, or a stream's batch size (``generate_stream``)."""
        return int(self.extra.get("rows_in_flight", self.images) or 1)

    @property
    def batch_forwards_per_image(self) -> float:
        """Target forwards per image slot of the batch: ``nfe`` for one batch; for a stream of M images at
        batch size B (``generate_stream``), ``nfe * B / M``, the forwards one batch of B images costs on
        average -- what a batch-1 NFE is compared with."""
        return self.nfe * self.rows_in_flight / max(self.images, 1)

    @property
    def tokens_per_forward(self) -> float:
        return self.tokens / max(self.batch_forwards_per_image, 1)

    @property
    def step_compression(self) -> float:
        """Tokens per image divided by target forwards per image slot of the batch: AR is 1.0 by definition."""
        return self.tokens_per_forward

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["tokens_per_forward"] = self.tokens_per_forward
        d["step_compression"] = self.step_compression
        return d


@dataclass
class SampleOutput:
    tokens: torch.Tensor  # (B, num_image_tokens), raster order
    stats: SamplerStats


@dataclass
class CompletedImages:
    """Images of a stream that just completed (``generate_stream``'s ``on_complete``), so a caller can store
    them before the stream ends. ``index``: their positions in the stream's labels; ``tokens`` (n, N);
    ``forwards``: target forwards each took part in (its prefill + verify steps); ``charge``: its share of
    the stream's forwards (every forward split equally over the images in flight, a refill's over the images
    it started), so ``rows x mean(charge)`` over any set of images is their forwards per batch of ``rows``
    images, and the charges of all images add up to the stream's NFE. ``stats``: the stream's running stats."""

    index: torch.Tensor
    tokens: torch.Tensor
    forwards: torch.Tensor
    charge: torch.Tensor
    stats: SamplerStats


def ordinary(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` as an ordinary tensor: a copy when it was made under ``torch.inference_mode`` (which cannot be
    edited in place outside it), else itself."""
    if not tensor.is_inference():
        return tensor
    with torch.inference_mode(False):
        return tensor.clone()


def sampling_mode(entry: Callable) -> Callable:
    """Run a sampler entry point under ``torch.inference_mode`` and return ordinary tensors.

    Sampling never needs autograd, and inference mode skips its per-op bookkeeping (version counters, view
    tracking) that ``no_grad`` still pays: ~10% of each small op's dispatch on a CPU, where a speculative
    step's engine is a few hundred such ops (issue #14 item 3, engine share). The tokens handed back (and to
    ``on_complete``) are copied out of inference mode so callers can edit them; caches made inside it are
    replaced, not reused, by a later ``setup_cache`` outside it (``contract.reusable_outside_inference``).
    """

    @functools.wraps(entry)
    def run(self, *args, **kwargs):
        if torch.is_inference_mode_enabled():
            return entry(self, *args, **kwargs)
        with torch.inference_mode():
            out = entry(self, *args, **kwargs)
        out.tokens = ordinary(out.tokens)
        return out

    return run


@dataclass
class SamplingOptions:
    """Options common to all samplers (LlamaGen names and defaults of ``sample_c2i.py``)."""

    cfg_scale: float = 4.0
    cfg_interval: int = -1
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def validate(self) -> None:
        if self.cfg_scale < 0:
            raise ValueError(f"cfg_scale must be >= 0 (1.0 disables guidance), got {self.cfg_scale}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = no top-k filter), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must lie in (0, 1] (1.0 = no nucleus filter), got {self.top_p}")

    @property
    def use_cfg(self) -> bool:
        return self.cfg_scale != 1.0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def filter_top_k_top_p(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Mask logits (…, V) to -inf outside the top-k and the nucleus (HF rule: keep the first token past p)."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        remove = cum > top_p
        remove[..., 1:] = remove[..., :-1].clone()
        remove[..., 0] = False
        logits = logits.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
    return logits


def logits_to_probs(logits: torch.Tensor, opts: SamplingOptions) -> torch.Tensor:
    """Temperature, then top-k/top-p, then softmax; greedy (temperature 0) gives a one-hot at the argmax."""
    if opts.greedy:
        return F.one_hot(logits.argmax(-1), logits.shape[-1]).to(logits.dtype)
    logits = filter_top_k_top_p(logits / max(opts.temperature, 1e-5), opts.top_k, opts.top_p)
    return logits.softmax(-1)


def guidance_active(token_index: torch.Tensor | int, cfg_interval: int):
    """LlamaGen's ``cfg_interval``: guidance for tokens 0..cfg_interval+1, conditional logits after."""
    if cfg_interval < 0:
        return True if isinstance(token_index, int) else torch.ones_like(token_index, dtype=torch.bool)
    return token_index <= cfg_interval + 1


def guided_logits(logits: torch.Tensor, opts: SamplingOptions, token_index: torch.Tensor | int) -> torch.Tensor:
    """Combine [cond; uncond] logits (2B, L, V) into (B, L, V) for tokens at ``token_index``: an int, (L,)
    shared by every row, or (B, L) per row (ragged batches, where rows stand at different tokens)."""
    if not opts.use_cfg:
        return logits
    guided = combine_cfg(logits, opts.cfg_scale, True)
    if opts.cfg_interval < 0:  # guidance everywhere: skip the per-position select (ops count on a CPU)
        return guided
    cond, _ = logits.chunk(2, dim=0)
    active = guidance_active(token_index, opts.cfg_interval)
    if isinstance(active, bool):
        return guided if active else cond
    return torch.where(active.view(1, -1, 1) if active.dim() == 1 else active.unsqueeze(-1), guided, cond)


def target_probs(logits: torch.Tensor, opts: SamplingOptions, token_index) -> torch.Tensor:
    """The distribution a sampler must reproduce: guided logits -> temperature -> top-k/p -> softmax."""
    return logits_to_probs(guided_logits(logits, opts, token_index), opts)


def require_grid(model: ARModel, sampler: str) -> int:
    """The side of a model's square 2-D token grid, or one clear error for samplers that decode by grid
    geometry (rows, diagonals)."""
    n, N = int(getattr(model, "grid_size", 0) or 0), model.num_image_tokens
    if n < 2 or n * n != N:
        raise ValueError(
            f"sampler {sampler!r} needs a square 2-D token grid (it decodes by rows / diagonals); this model has "
            f"grid_size {n} for {N} tokens (use a 2-D model such as llamagen, or sampler 'ar')"
        )
    return n


def draw(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row of probs (…, V), exactly distributed as probs / sum(probs).

    Inverse CDF: with u ~ U[0, sum p), the first token whose cumulative sum exceeds u is token i with
    probability p_i / sum(p); a token of probability 0 (filtered by top-k/top-p) is never drawn, since its
    cumulative sum equals the previous one. Sums are float64, so rounding moves a probability by ~1e-16. One
    uniform per row instead of one exponential per vocabulary entry (an exponential race, argmax p_i / E_i,
    took ~10x longer on CPU for a 16-position window) or torch.multinomial (~0.2 ms per call).
    """
    cdf = probs.double().cumsum(-1)
    total = cdf[..., -1:]
    u = torch.rand(total.shape, generator=generator, device=probs.device, dtype=torch.float64) * total
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))  # u < total even after rounding
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp_(max=probs.shape[-1] - 1)


# Per decoding order (a model's ``decoding_order``, "raster" when absent): the models and samplers for it.
MODELS_FOR_ORDER = {"raster": "--model llamagen", "diagonal": "--model nar", "shuffle": "--model token-shuffle"}
SAMPLERS_FOR_ORDER = {"raster": "--sampler ar, sjd, gsd, lantern, sd or zipar", "diagonal": "--sampler nar",
                      "shuffle": "--sampler token-shuffle"}


class Sampler:
    """Base class: subclasses set ``name``, an options dataclass, and implement ``_generate``.

    ``orders`` lists the decoding orders the algorithm needs a model to be trained for (``decoding_order``):
    a NAR model predicts neighbours under its proximity mask, so raster samplers would read unwritten slots.
    """

    name: ClassVar[str] = ""
    Options: ClassVar[type] = SamplingOptions
    orders: ClassVar[tuple[str, ...]] = ("raster",)

    def __init__(self, **options: Any):
        known = set(self.Options.__dataclass_fields__)
        unknown = set(options) - known
        if unknown:
            raise ValueError(f"sampler {self.name!r} got unknown option(s) {sorted(unknown)}; known: {sorted(known)}")
        self.options = self.Options(**options)
        self.options.validate()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.options})"

    @sampling_mode
    def generate(
        self, model: ARModel, labels: torch.Tensor, generator: torch.Generator | None = None
    ) -> SampleOutput:
        """Sample one image's tokens per label (B,) with ``model``; labels must be valid class ids."""
        labels = self.checked_labels(model, labels)
        stats = SamplerStats(images=labels.shape[0], tokens=model.num_image_tokens)
        start = time.perf_counter()
        tokens = self._generate(model, labels, generator, stats)
        stats.wall_time_s = time.perf_counter() - start
        return SampleOutput(tokens=tokens, stats=stats)

    def checked_labels(self, model: ARModel, labels) -> torch.Tensor:
        """``labels`` on the model's device, after one clear error for a decoding order this sampler cannot run
        or for invalid class ids."""
        order = getattr(model, "decoding_order", "raster")
        if order not in self.orders:
            need = self.orders[0]
            raise ValueError(
                f"sampler {self.name!r} needs a model trained for {need} decoding ({MODELS_FOR_ORDER.get(need, '?')}), "
                f"but {type(model).__name__} is trained for {order} decoding (use {SAMPLERS_FOR_ORDER.get(order, '?')})"
            )
        labels = torch.as_tensor(labels, device=_device_of(model))
        check_labels(labels, model.num_classes)
        return labels

    @sampling_mode
    def generate_stream(
        self, model: ARModel, labels: torch.Tensor, batch_size: int, generator: torch.Generator | None = None,
        on_complete: Callable[[CompletedImages], Any] | None = None,
    ) -> SampleOutput:
        """Sample one image per label (M,) with at most ``batch_size`` images in flight; tokens in label order.
        ``on_complete(CompletedImages)`` is called as images complete (progress bars, shard writers).

        Here: consecutive batches of ``batch_size`` labels drawing from the one ``generator`` in turn, with
        their stats merged (:func:`merge_stats`). Speculative samplers override it with continuous batching
        (a complete image's row takes the next label), where the model supports it.
        """
        check_batch_size(batch_size)
        labels = self.checked_labels(model, labels)
        parts, first = [], 0
        running = SamplerStats(tokens=model.num_image_tokens)  # counts and times so far, for on_complete
        for chunk in labels.split(batch_size):
            parts.append(self.generate(model, chunk, generator))
            st, n = parts[-1].stats, chunk.numel()
            for name in ("nfe", "images", "wall_time_s", "draft_forwards", "draft_time_s", "target_time_s"):
                setattr(running, name, getattr(running, name) + getattr(st, name))
            if on_complete is not None:
                on_complete(CompletedImages(
                    index=torch.arange(first, first + n), tokens=ordinary(parts[-1].tokens),
                    forwards=torch.full((n,), st.forwards_per_image, dtype=torch.float64),
                    charge=torch.full((n,), st.nfe / n, dtype=torch.float64), stats=running))
            first += n
        return SampleOutput(tokens=torch.cat([p.tokens for p in parts]),
                            stats=merge_stats([p.stats for p in parts], min(batch_size, labels.shape[0])))

    def _generate(self, model, labels, generator, stats) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    # helpers shared by all samplers
    def batch_labels(self, model: ARModel, labels: torch.Tensor) -> torch.Tensor:
        return cfg_labels(labels, model.null_class, self.options.use_cfg)

    def duplicate_for_cfg(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.cat([tokens, tokens]) if self.options.use_cfg else tokens


def check_batch_size(batch_size: int) -> None:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1 (images in flight), got {batch_size!r}")


def merge_stats(parts: list[SamplerStats], rows_in_flight: int) -> SamplerStats:
    """One :class:`SamplerStats` for consecutive batches run as a stream at ``rows_in_flight`` images per batch.

    Counts and times add up; ``row_verify_steps`` counts the verify steps every image took part in (for a
    sampler that records none, every image of a batch takes part in all of its forwards but the prefill), so
    ``forwards_per_image`` stays per image and ``batch_forwards_per_image`` is the mean forwards of a batch
    of ``rows_in_flight`` images; accepted-length histograms add up. ``extra["batches"]`` keeps each batch's
    own ``extra``.
    """
    merged = SamplerStats(tokens=parts[0].tokens if parts else 0)
    for p in parts:
        merged.nfe += p.nfe
        merged.images += p.images
        merged.wall_time_s += p.wall_time_s
        merged.draft_forwards += p.draft_forwards
        merged.draft_time_s += p.draft_time_s
        merged.target_time_s += p.target_time_s
    hists = [p.extra.get("accepted_length_hist") for p in parts]
    if parts and all(h is not None for h in hists):  # speculative batches: one histogram over the stream
        total: dict[int, int] = {}
        for h in hists:
            for a, c in h.items():
                total[a] = total.get(a, 0) + c
        merged.extra["accepted_length_hist"] = dict(sorted(total.items()))
    merged.extra.update(
        rows_in_flight=rows_in_flight, continuous=False,
        row_verify_steps=sum(p.extra.get("row_verify_steps", (p.nfe - 1) * p.images) for p in parts),
        batches=[p.extra for p in parts],
    )
    return merged


def _device_of(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")
