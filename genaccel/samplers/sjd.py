"""SJD, Speculative Jacobi Decoding (Teng et al., ICLR 2025): Jacobi self-drafts + exact acceptance.

Training-free and lossless: the output is distributed exactly as AR sampling with the same options.
"""

from __future__ import annotations

from genaccel.samplers.drafting import JacobiDrafter, jacobi_source
from genaccel.samplers.speculative import JacobiOptions, SpeculativeSampler


class SJDSampler(SpeculativeSampler):
    """``window`` tokens verified per target forward; drafts recycled from the previous iteration."""

    name = "sjd"
    Options = JacobiOptions

    def draft_source(self, model) -> JacobiDrafter:
        return jacobi_source(self.options)
