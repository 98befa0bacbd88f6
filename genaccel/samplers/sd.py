"""Classic speculative decoding with a trained drafter (EAGLE-style head) or a smaller draft model.

Exact acceptance, so the output is distributed exactly as AR sampling with the same options.
"""

from __future__ import annotations

from dataclasses import dataclass

from genaccel.samplers.drafting import DrafterHeadSource, DrafterMixin, DraftModelSource
from genaccel.samplers.speculative import DrafterOptions, SpeculativeSampler, check_path_option


@dataclass
class SDOptions(DrafterOptions):
    draft_model: str = ""

    def validate(self) -> None:
        super().validate()
        check_path_option("draft_model", self.draft_model)
        if self.draft_model and self.drafter_precision not in ("auto", "fp32"):
            raise ValueError(f"drafter_precision {self.drafter_precision!r} applies to the drafter head; a --draft-model "
                             f"runs in the target's dtype (--dtype): drop --drafter-precision or --draft-model")


class SDSampler(DrafterMixin, SpeculativeSampler):
    name = "sd"
    Options = SDOptions

    def set_draft_model(self, draft_model) -> None:
        """Draft with this model (any :class:`ARModel`) instead of the drafter head."""
        self._draft_model = draft_model

    def draft_source(self, model):
        draft_model = getattr(self, "_draft_model", None)
        if draft_model is None and self.options.draft_model:
            from genaccel.models import load_gpt

            draft_model = self._draft_model = load_gpt(self.options.draft_model, device=next(model.parameters()).device)
        if draft_model is not None:
            return DraftModelSource(draft_model, self.options.draft_len, self.options.draft_stop,
                                    self.options.draft_guidance)
        drafter = self.drafter_for(model)
        if drafter is None:
            raise FileNotFoundError("sd needs a drafter for this model: the bundled drafter head fits only the bundled "
                                    "class-conditional GPT; pass --drafter PATH, --draft-model PATH, or train one "
                                    "with `python -m genaccel.train drafter`")
        return DrafterHeadSource(drafter, self.options.draft_len, self.options.draft_stop,
                                 self.options.draft_guidance, self.options.drafter_precision)
