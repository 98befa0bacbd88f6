"""GSD, Grouped Speculative Decoding (So et al., ICCV 2025): Jacobi self-drafts + grouped acceptance.

A draft token is accepted with ``min(1, p(C) / q(C))`` over its dynamic group C (tokens near it in
probability rank, filtered by probability gap and codebook distance): lossy, no training.
``lantern_delta > 0`` composes LANTERN's relaxation under the group test.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from genaccel.samplers.acceptance import ExactRule, GroupedRule, LanternRule
from genaccel.samplers.drafting import JacobiDrafter
from genaccel.samplers.speculative import (
    CodebookMixin,
    JacobiOptions,
    SpeculativeSampler,
    check_group,
    check_lantern,
    check_path_option,
)


@dataclass
class GSDOptions(JacobiOptions):
    group_size: int = 100  # GSD paper: G in {3, 25, 50}; 100 chosen on the bundled model (docs/speculative.md)
    prob_threshold: float = 0.3  # GSD code: 0.15; 0.3 chosen on the bundled model
    embed_threshold: float = 2.0  # squared distance of l2-normalised codes: 2.0 = positive cosine
    codebook: str = ""
    lantern_k: int = 32
    lantern_delta: float = 0.0

    def validate(self) -> None:
        super().validate()
        check_group(self.group_size, self.prob_threshold, self.embed_threshold)
        check_lantern(self.lantern_k, self.lantern_delta)
        check_path_option("codebook", self.codebook)


class GSDSampler(CodebookMixin, SpeculativeSampler):
    name = "gsd"
    Options = GSDOptions

    def draft_source(self, model) -> JacobiDrafter:
        return JacobiDrafter(self.options.window, self.options.init)

    def acceptance_rule(self, model) -> GroupedRule:
        o = self.options
        inner = ExactRule()
        if o.lantern_delta > 0:
            inner = LanternRule(neighbours=self.neighbours_for(model, o.lantern_k), delta=o.lantern_delta)
        codebook = self.codebook_for(model) if math.isfinite(o.embed_threshold) else None
        return GroupedRule(inner=inner, group_size=o.group_size, prob_threshold=o.prob_threshold,
                           codebook=codebook, embed_threshold=o.embed_threshold)
