"""Training-free visual-token pruning for Hugging Face VLMs (LLaVA, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL).

    with genaccel.pruning.apply(model, strategy="divprune", keep=64) as session:
        model.generate(**inputs)
    session.reports[-1].keep_columns

See docs/pruning.md for strategies, positions/KV-cache conventions, robustness options and limitations.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from genaccel.pruning.adapters import SUPPORTED_CLASSES
from genaccel.pruning.budget import Keep, resolve_budget
from genaccel.pruning.compat import TESTED_TRANSFORMERS, warn_if_untested
from genaccel.pruning.session import PruneReport, PruningSession, SpanReport
from genaccel.pruning.strategies import Selection, SpanSignals, Strategy, available_strategies, build_strategy


@contextmanager
def apply(
    model: nn.Module,
    strategy: str | Strategy = "divprune",
    keep: Keep = 64,
    *,
    layer: int | None = None,
    reserve: float = 0.0,
    robustness: bool = False,
    jitter: float = 1e-3,
    seed: int = 0,
    video_budget: str = "per_video",
    **options,
) -> Iterator[PruningSession]:
    """Prune visual tokens in every prefill of `model` inside the block.

    strategy: a name from `available_strategies()` (options such as `lam=`, `alpha=`, `contextual=` go to it).
    keep: int = visual tokens kept per image; float = ratio in [0, 1].
    layer: decoder layer K for in-LLM strategies (fastv, dart; default 2); pre-LLM strategies prune at 0.
    reserve: fraction of each image's budget spent on uniformly spread tokens before the strategy chooses.
    robustness: also report keep-set overlap under a `jitter`-relative perturbation of the signals.
    seed: seeds random selection (and the robustness probe), per image and per prefill.
    video_budget: "per_video" (a video is one span, `keep` for all its frames) or "per_frame" (`keep` per
    frame; Qwen2-VL / Qwen2.5-VL, whose video tokens are frame-major blocks).

    On a transformers release outside `TESTED_TRANSFORMERS` this warns once and still prunes.
    """
    warn_if_untested()
    session = PruningSession(
        model,
        build_strategy(strategy, **options),
        keep,
        layer=layer,
        reserve=reserve,
        robustness=robustness,
        jitter=jitter,
        seed=seed,
        video_budget=video_budget,
    )
    session.attach()
    try:
        yield session
    finally:
        session.detach()


__all__ = [
    "SUPPORTED_CLASSES",
    "Keep",
    "PruneReport",
    "PruningSession",
    "Selection",
    "SpanReport",
    "SpanSignals",
    "Strategy",
    "TESTED_TRANSFORMERS",
    "apply",
    "available_strategies",
    "build_strategy",
    "resolve_budget",
]
