"""MC-SJD, Speculative Coupled Decoding (So et al., arXiv 2510.24211; junhyukso/SCD): SJD with coupled drafts.

SJD re-samples every unaccepted draft independently each iteration, so a draft that would have been
accepted is often replaced by a different token just before its prefix settles. MC-SJD couples the
re-draw with the previous draft: maximal coupling (keep the old draft with probability min(1, p/q), else
draw the residual) or per-position Gumbel noise. The new draft is still distributed as the new p, so with
the exact rule the output is exactly AR's -- training-free and lossless, like SJD, with longer accepted runs.
The same coupling is an option of the Jacobi window for ``sjd``, ``gsd`` and ``lantern``
(``--draft-coupling``); ``mcsjd`` is SJD with it on by default and the window it needs (docs/speculative.md).
"""

from __future__ import annotations

from dataclasses import dataclass

from genaccel.samplers.drafting import JacobiDrafter, jacobi_source
from genaccel.samplers.speculative import JacobiOptions, SpeculativeSampler


@dataclass
class MCSJDOptions(JacobiOptions):
    """SJD's options with MC-SJD's defaults: maximal coupling, window 32 (SCD's Gumbel script uses 32)."""

    window: int = 32
    draft_coupling: str = "maximal"

    def validate(self) -> None:
        super().validate()
        if self.draft_coupling == "independent":
            raise ValueError("mcsjd couples its drafts: draft_coupling must be 'maximal' or 'gumbel' "
                             "(draft_coupling independent is sampler sjd)")


class MCSJDSampler(SpeculativeSampler):
    """Jacobi window with coupled re-drafting + exact acceptance on the shared verify core."""

    name = "mcsjd"
    Options = MCSJDOptions

    def draft_source(self, model) -> JacobiDrafter:
        return jacobi_source(self.options)
