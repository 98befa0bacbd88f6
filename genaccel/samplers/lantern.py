"""LANTERN / LANTERN++ (Jang et al., ICLR 2025): EAGLE-style drafter + relaxed acceptance.

Draft tokens are accepted against a target where the mass of their nearest latent (VQ codebook)
neighbours is moved onto them, at most ``lantern_delta`` of it (TV bound; > 1: LANTERN++ lambda).
Drafts form a chain of ``draft_len`` tokens sampled from the drafter (LANTERN++ static-tree rule with
tree width 1). Without a drafter checkpoint the Jacobi window drafts instead (with a notice);
``draft_coupling`` maximal / gumbel selects the coupled Jacobi window (MC-SJD's drafts) instead of the drafter.

``resample`` picks what a rejection samples from (ours: the relaxed target's exact residual; official /
official-v1: LANTERN's / LANTERN++'s code), ``relax bounded`` swaps the per-draft relaxation for one
whose emitted distribution provably stays within delta of p (docs/speculative.md).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from genaccel.samplers.acceptance import (
    LANTERN_RELAX,
    LANTERN_RESAMPLE,
    TRUNCATION_MODES,
    BoundedRelaxRule,
    ExactRule,
    LanternRule,
    respects_truncation,
)
from genaccel.samplers.drafting import DrafterHeadSource, DrafterMixin, jacobi_source
from genaccel.samplers.gsd import truncation_cli_option
from genaccel.samplers.speculative import (
    CodebookMixin,
    DrafterOptions,
    JacobiOptions,
    SpeculativeSampler,
    check_lantern,
    check_path_option,
)


@dataclass
class LanternOptions(DrafterOptions, JacobiOptions):
    """Drafter options, LANTERN's relaxation, and the Jacobi window used when no drafter exists."""

    lantern_k: int = 32
    lantern_delta: float = 0.3  # LANTERN default 0.1 (k=1000 of 16384 codes); 0.3 measured on the bundled model
    codebook: str = ""
    resample: str = "ours"  # 'official': LANTERN's evaluate_posterior, 'official-v1': LANTERN++'s
    relax: str = "lantern"  # 'bounded': emitted distribution within lantern_delta of p (docs/speculative.md)
    truncation: str = "auto"  # auto: filtered drafts never accepted or credited, except with an official resample

    def validate(self) -> None:
        super().validate()
        check_lantern(self.lantern_k, self.lantern_delta)
        check_path_option("codebook", self.codebook)
        if self.resample not in LANTERN_RESAMPLE:
            raise ValueError(f"resample must be one of {LANTERN_RESAMPLE}, got {self.resample!r}")
        if self.relax not in LANTERN_RELAX:
            raise ValueError(f"relax must be one of {LANTERN_RELAX}, got {self.relax!r}")
        if self.truncation not in TRUNCATION_MODES:
            raise ValueError(f"truncation must be one of {TRUNCATION_MODES}, got {self.truncation!r}")
        if self.relax == "bounded":
            if self.lantern_delta > 1:
                raise ValueError(f"relax 'bounded' needs lantern_delta in [0, 1] (a total-variation budget; the "
                                 f"LANTERN++ lambda mode has no TV bound), got {self.lantern_delta}")
            if self.resample != "ours":
                raise ValueError(f"relax 'bounded' resamples from its own exact residual; resample "
                                 f"{self.resample!r} applies to relax 'lantern'")

    @property
    def respect_truncation(self) -> bool:
        return respects_truncation(self.truncation, official=self.resample != "ours")


def sampler_cli_options() -> list[tuple[str, dict]]:
    """argparse ``(flag, kwargs)`` pairs of the LANTERN-only options (``dest`` = the Options field name)."""
    return [
        ("--resample", dict(type=str, dest="resample", default=None, choices=LANTERN_RESAMPLE,
                            help="lantern: on rejection sample 'ours' = norm((p~ - q)+) (default), 'official' = "
                                 "p with x's k+1 neighbours zeroed (LANTERN), 'official-v1' = LANTERN++'s rule")),
        ("--relax", dict(type=str, dest="relax", default=None, choices=LANTERN_RELAX,
                         help="lantern: 'lantern' = per-draft neighbour merge (default); 'bounded' = a "
                              "draft-independent relaxation whose emitted distribution is within delta of p")),
        truncation_cli_option(),
    ]


class LanternSampler(DrafterMixin, CodebookMixin, SpeculativeSampler):
    name = "lantern"
    Options = LanternOptions

    def draft_source(self, model):
        if self.options.draft_coupling != "independent":  # a coupling is a property of Jacobi drafts
            return jacobi_source(self.options)
        drafter = self.drafter_for(model)
        if drafter is None:
            if not getattr(self, "_notified", False):
                self._notified = True
                print("lantern: no drafter checkpoint fits this model (the bundled head is the bundled class-conditional "
                      "GPT's); drafting with the Jacobi window instead (pass --drafter PATH, or train one with "
                      "`python -m genaccel.train drafter`)", file=sys.stderr)
            return jacobi_source(self.options)
        return DrafterHeadSource(drafter, self.options.draft_len, self.options.draft_stop,
                                 self.options.draft_guidance, self.options.drafter_precision)

    def acceptance_rule(self, model) -> ExactRule:
        o = self.options
        if o.relax == "bounded":
            return BoundedRelaxRule(neighbours=self.neighbours_for(model, o.lantern_k), delta=o.lantern_delta,
                                    respect_truncation=o.respect_truncation)
        k = o.lantern_k
        # The official resamplings zero x's first k + 1 neighbours (sic), so they need one more column.
        table = k if o.resample == "ours" else min(k + 1, model.vocab_size - 1)
        return LanternRule(neighbours=self.neighbours_for(model, table), delta=o.lantern_delta, k=k,
                           resample=o.resample, respect_truncation=o.respect_truncation)
