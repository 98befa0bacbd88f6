"""GSD, Grouped Speculative Decoding (So et al., ICCV 2025): Jacobi self-drafts + grouped acceptance.

A draft token is accepted with ``min(1, p(C) / q(C))`` over its dynamic group C (tokens near it in
probability rank, filtered by probability gap and codebook distance): lossy, no training.
``group_mode`` chooses the group: ``ours`` (the paper's G/2 tokens on each side, the default) or
``official`` (the released code's fixed slice of 7 lower-ranked tokens, x and 6 higher-ranked ones,
with its exact-test fallback). ``lantern_delta > 0`` composes LANTERN's relaxation under the group test.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from genaccel.samplers.acceptance import (
    GSD_GROUP_MODES,
    TRUNCATION_MODES,
    ExactRule,
    GroupedRule,
    LanternRule,
    codebook_close_table,
    respects_truncation,
)
from genaccel.samplers.base import _device_of
from genaccel.samplers.drafting import JacobiDrafter, jacobi_source
from genaccel.samplers.speculative import (
    CodebookMixin,
    JacobiOptions,
    SpeculativeSampler,
    check_group,
    check_lantern,
    check_path_option,
)

DEFAULT_GROUP_SIZE = 100


@dataclass
class GSDOptions(JacobiOptions):
    group_size: int = DEFAULT_GROUP_SIZE  # GSD paper: G in {3, 25, 50}; 100 chosen on the bundled model
    prob_threshold: float = 0.3  # GSD code: 0.15; 0.3 chosen on the bundled model
    embed_threshold: float = 2.0  # squared distance of l2-normalised codes: 2.0 = positive cosine
    codebook: str = ""
    lantern_k: int = 32
    lantern_delta: float = 0.0
    group_mode: str = "ours"  # 'official': the released code's 14-token slice (docs/speculative.md)
    truncation: str = "auto"  # auto: a top-k/top-p filtered draft is never accepted, except in official mode

    def validate(self) -> None:
        super().validate()
        check_group(self.group_size, self.prob_threshold, self.embed_threshold)
        check_lantern(self.lantern_k, self.lantern_delta)
        check_path_option("codebook", self.codebook)
        if self.group_mode not in GSD_GROUP_MODES:
            raise ValueError(f"group_mode must be one of {GSD_GROUP_MODES}, got {self.group_mode!r}")
        if self.group_mode == "official" and self.group_size != DEFAULT_GROUP_SIZE:
            raise ValueError(
                f"group_size applies to group_mode 'ours'; the official group is the released code's fixed "
                f"14-token slice (7 below x, x, 6 above), got group_size={self.group_size}"
            )
        if self.truncation not in TRUNCATION_MODES:
            raise ValueError(f"truncation must be one of {TRUNCATION_MODES}, got {self.truncation!r}")

    @property
    def respect_truncation(self) -> bool:
        return respects_truncation(self.truncation, official=self.group_mode == "official")


def sampler_cli_options() -> list[tuple[str, dict]]:
    """argparse ``(flag, kwargs)`` pairs of the GSD-only options (``dest`` = the Options field name)."""
    return [
        ("--group-mode", dict(type=str, dest="group_mode", default=None, choices=GSD_GROUP_MODES,
                              help="gsd: 'ours' (G/2 tokens each side by p, default) or 'official' (the released "
                                   "code's slice of 7 lower-ranked tokens, x, 6 higher; exact test if empty)")),
        truncation_cli_option(),
    ]


def truncation_cli_option() -> tuple[str, dict[str, Any]]:
    """The ``--truncation`` flag shared by the relaxed samplers (gsd, lantern)."""
    return ("--truncation", dict(type=str, dest="truncation", default=None, choices=TRUNCATION_MODES,
                                 help="gsd/lantern: 'respect' = a top-k/top-p filtered draft is never accepted or "
                                      "credited; 'ignore' = the official code's behaviour; 'auto' (default) = "
                                      "respect, except in an official mode"))


class GSDSampler(CodebookMixin, SpeculativeSampler):
    name = "gsd"
    Options = GSDOptions

    def draft_source(self, model) -> JacobiDrafter:
        return jacobi_source(self.options)

    def acceptance_rule(self, model) -> GroupedRule:
        o = self.options
        respect = o.respect_truncation
        inner = ExactRule()
        if o.lantern_delta > 0:
            inner = LanternRule(neighbours=self.neighbours_for(model, o.lantern_k), delta=o.lantern_delta,
                                respect_truncation=respect)
        codebook = self.codebook_for(model) if math.isfinite(o.embed_threshold) else None
        close = None
        if codebook is not None and o.group_mode == "ours":  # the official group computes its distances over V
            close = self.close_table(codebook, o.embed_threshold, _device_of(model))
        return GroupedRule(inner=inner, group_size=o.group_size, prob_threshold=o.prob_threshold,
                           codebook=codebook, embed_threshold=o.embed_threshold, mode=o.group_mode,
                           respect_truncation=respect, close=close)

    _close_cache: tuple | None = None

    def close_table(self, codebook: torch.Tensor, embed_threshold: float, device: torch.device) -> torch.Tensor | None:
        """:func:`codebook_close_table` of this codebook on ``device``, built once per sampler (~0.1 s at 1024
        codes on one CPU thread, more than a whole image's look-ups save), rebuilt only when one of them changes."""
        key = (codebook, embed_threshold, str(device))
        cached = self._close_cache
        if cached is None or cached[0] is not codebook or cached[1:3] != key[1:]:
            self._close_cache = (*key, codebook_close_table(codebook, embed_threshold, device))
        return self._close_cache[3]
