"""Token-Shuffle decoding (arXiv 2504.17789): one s x s window of tokens per target forward.

A Token-Shuffle model (:class:`genaccel.models.token_shuffle.TokenShuffleGPT`) predicts the s*s tokens of
window p from [class, windows 0..p-1]. The prefill's last class slot gives window 0; forward p (p >= 1)
feeds window p - 1 at slot ``cls_token_num + p - 1`` and gives window p. An n x n grid therefore takes
(n/s)**2 target forwards, prefill included (64 for 16x16 at s = 2), and ``stats.tokens`` = n*n, so the step
compression is s*s.

Sampling. The s*s tokens of a step are drawn independently given the prefix, each from its own guided,
tempered, top-k / top-p filtered distribution: the model gives one marginal per token and nothing about
their joint, which is how the paper's "each step emits a window" reads (shared/reference/parallel.md §5;
the exact procedure is unconfirmed). CFG runs on the [cond; uncond] batch; both halves get the same windows.

Guidance schedule (``cfg_schedule``), for step p of P = (n/s)**2 and target scale w = ``cfg_scale``:

* ``"constant"``: scale(p) = w.
* ``"half-linear"``: scale(p) = 1 + (w - 1) * min(1, 2p / P): pure conditional logits at the first window,
  reaching w at p = P/2 and constant after. All s*s tokens of a step share their window's scale; measured
  in tokens, this is the paper's ramp over the first half of the visual tokens evaluated at the window's
  first token (2 * p * s*s / N = 2p / P).

Window sampling (``window_sampling``):

* ``"independent"`` (default, the paper's reading above): all s*s tokens from the forward's marginals.
* ``"sequential"``: token k of the window is drawn after tokens 0..k-1, from the model's intra-window head
  (``TokenShuffleGPT.intra_window_logits``: the window's state plus the tokens already drawn), guided and
  filtered like any token. Same forwards; s*s - 1 extra small head calls per step. Needs a model trained
  with ``intra_window_head``.

The paper uses the half-linear scheduler by default (§5; second-hand summaries), so it is the default here.
``cfg_interval`` keeps LlamaGen's token rule (token t guided while t <= cfg_interval + 1), counting tokens in
generation order: token k of window p is token p * s*s + k.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from genaccel.models.contract import ARModel, combine_cfg
from genaccel.models.token_shuffle import unshuffle_tokens
from genaccel.samplers.base import Sampler, SamplerStats, SamplingOptions, draw, guidance_active, logits_to_probs

CFG_SCHEDULES = ("constant", "half-linear")
WINDOW_SAMPLING = ("independent", "sequential")


@dataclass
class TokenShuffleOptions(SamplingOptions):
    """Options of ``token-shuffle``: every ``ar`` option per token, plus the guidance schedule over windows."""

    cfg_schedule: str = "half-linear"
    window_sampling: str = "independent"

    def validate(self) -> None:
        super().validate()
        if self.cfg_schedule not in CFG_SCHEDULES:
            raise ValueError(f"cfg_schedule must be one of {', '.join(CFG_SCHEDULES)}, got {self.cfg_schedule!r}")
        if self.window_sampling not in WINDOW_SAMPLING:
            raise ValueError(f"window_sampling must be one of {', '.join(WINDOW_SAMPLING)}, "
                             f"got {self.window_sampling!r}")


def sampler_cli_options() -> list[tuple[str, dict]]:
    """argparse ``(flag, kwargs)`` pairs of the token-shuffle options."""
    return [("--cfg-schedule", dict(type=str, dest="cfg_schedule", default=None, choices=CFG_SCHEDULES,
                                    help="token-shuffle: guidance over windows, constant or half-linear "
                                         "(1 -> cfg-scale over the first half; default half-linear)")),
            ("--window-sampling", dict(type=str, dest="window_sampling", default=None, choices=WINDOW_SAMPLING,
                                       help="token-shuffle: the s*s tokens of a step independently (default) or "
                                            "sequentially through the model's intra-window head"))]


def scheduled_cfg_scale(position: int, num_positions: int, target: float, schedule: str) -> float:
    """The guidance scale of window ``position`` of ``num_positions`` (formulas in the module docstring)."""
    if schedule == "constant":
        return target
    if schedule == "half-linear":
        return 1.0 + (target - 1.0) * min(1.0, 2.0 * position / num_positions)
    raise ValueError(f"unknown cfg_schedule {schedule!r}; known: {', '.join(CFG_SCHEDULES)}")


def window_layout(model: ARModel) -> tuple[int, int]:
    """(window side s, number of windows P) of a model with ``tokens_per_position`` = s*s, else one clear error."""
    per_position = int(getattr(model, "tokens_per_position", 1))
    s, n, N = math.isqrt(per_position), int(getattr(model, "grid_size", 0) or 0), model.num_image_tokens
    if s * s != per_position or n < 1 or n * n != N or n % s:
        raise ValueError(
            f"sampler 'token-shuffle' needs an n x n token grid fused in s x s windows; this model has "
            f"grid_size {n}, {N} tokens and tokens_per_position {per_position}"
        )
    return s, (n // s) ** 2


class TokenShuffleSampler(Sampler):
    """One fused position per target forward, s*s independently sampled tokens per step."""

    name = "token-shuffle"
    Options = TokenShuffleOptions
    orders = ("shuffle",)

    def window_probs(
        self, logits: torch.Tensor, position: int, num_positions: int, per_window: int, part: int | None = None
    ) -> torch.Tensor:
        """Distributions (B, m, V) of window ``position``'s tokens from logits ((2B or B), m, V): all m = s*s
        parts, or the one ``part`` (m = 1)."""
        opts = self.options
        if opts.use_cfg:
            scale = scheduled_cfg_scale(position, num_positions, opts.cfg_scale, opts.cfg_schedule)
            first = position * per_window + (part or 0)
            token_index = torch.arange(first, first + logits.shape[1], device=logits.device)
            active = guidance_active(token_index, opts.cfg_interval).view(1, -1, 1)
            logits = torch.where(active, combine_cfg(logits, scale, True), logits.chunk(2, dim=0)[0])
        return logits_to_probs(logits, opts)

    def draw_window(self, model, out, index: int, position: int, num_positions: int, generator) -> torch.Tensor:
        """The s*s tokens (B, s*s) of window ``position`` from the forward output's entry ``index``."""
        per_window = out.logits.shape[2]
        if self.options.window_sampling == "independent":
            return draw(self.window_probs(out.logits[:, index], position, num_positions, per_window), generator)
        state = out.extra["window_state"][:, index]  # ((2B or B), s*s, d)
        window = torch.zeros(state.shape[:2], dtype=torch.long, device=state.device)
        for k in range(per_window):
            logits = model.intra_window_logits(state, window, k)[:, None]
            token = draw(self.window_probs(logits, position, num_positions, per_window, k), generator)[:, 0]
            window[:, k] = token.repeat(window.shape[0] // token.shape[0])  # CFG halves share the window
        return window[: window.shape[0] // (2 if self.options.use_cfg else 1)]

    def _generate(self, model, labels, generator, stats: SamplerStats) -> torch.Tensor:
        s, P = window_layout(model)
        if self.options.window_sampling == "sequential" and getattr(model, "intra_window", None) is None:
            raise ValueError("token-shuffle --window-sampling sequential needs a model trained with an "
                             "intra-window head (intra_window_head: true); this one has none: use independent")
        B, T, device = labels.shape[0], model.cls_token_num, labels.device
        batch_labels = self.batch_labels(model, labels)
        model.setup_cache(batch_labels.shape[0], T + P)
        windows = torch.empty(B, P, s * s, dtype=torch.long, device=device)
        out = stats.target_forward(model.prefill, batch_labels)
        windows[:, 0] = self.draw_window(model, out, -1, 0, P, generator)
        for p in range(1, P):
            slot = torch.tensor([T + p - 1], device=device)
            out = stats.target_forward(model.forward_tokens, self.duplicate_for_cfg(windows[:, p - 1 : p]), slot)
            windows[:, p] = self.draw_window(model, out, 0, p, P, generator)
        stats.extra.update(cfg_schedule=self.options.cfg_schedule, window_sampling=self.options.window_sampling,
                           tokens_per_position=s * s)
        return unshuffle_tokens(windows, s)


__all__ = ["CFG_SCHEDULES", "WINDOW_SAMPLING", "TokenShuffleOptions", "TokenShuffleSampler", "sampler_cli_options",
           "scheduled_cfg_scale", "window_layout"]
