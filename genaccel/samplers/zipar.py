"""ZipAR (arXiv 2412.04062): training-free parallel decoding of a plain raster-order GPT by spatial locality.

Behaviour of the official fixed-window LlamaGen code (ThisisBillhe/ZipAR,
``LlamaGen-ZipAR/autoregressive/models/generate_zipar.py``), reproduced exactly on an ``n x n`` grid with
window ``w`` (``1 <= w < n``; official default 8):

* Row 0 is decoded sequentially: the prefill samples (0, 0), then one forward per token.
* Every later forward feeds, for each *ongoing* row, that row's latest token at its raster slot and samples
  the row's next token from that position's logits; all ongoing rows advance together. Row 1 is ongoing
  from the start of this phase (its first forward feeds (0, n-1) at its own slot, predicting (1, 0)).
* When row r reaches ``w`` tokens (and r < n-1), row r+1 becomes ongoing. Its first forward feeds an
  AUXILIARY token at slot (r, n-1) -- the slot whose output predicts (r+1, 0) -- and that token is the
  latest token of row **r-1** at that moment (``input_ids[:, sum(row_token_num[:r]) - 1]``, official
  line ~201), not a token of row r. For r = 1 that is (0, n-1). The auxiliary K/V stays at slot (r, n-1)
  until row r's real last token overwrites it.
* When a row completes, its last token is fed once more in the next forward (its logits are discarded),
  which writes the real K/V at (r, n-1).

Attention. The mask is the plain causal mask by slot (a token at slot s sees every slot <= s, written or
not) over K/V buffers zeroed before every batch (``clear_cache()`` right after ``setup_cache``, like the
reference's freshly allocated caches). A token of row r+1 therefore also attends to row r's not yet
generated slots, which hold zero keys/values (a zero key scores 0, so these entries dilute attention), and
to the stale auxiliary K/V at (r, n-1). The explicit mask keeps the model's default valid-length mask from
hiding those slots; reproducing the dilution is part of being exact.

Forward count (prefill included), for ``1 <= w < n``: ``2n + (n-2) w`` -- row 0 takes n forwards, row r >= 1
gets its first token at zipar forward (r-1) w + 1 and its last n-1 forwards later, so the last row ends at
zipar forward (n-2) w + n. 16x16: w=4 -> 88, w=8 -> 144; 24x24: w=8 -> 224.

Sampling and guidance. Every sampled position goes through :func:`target_probs` independently (CFG, then
temperature, top-k/top-p, softmax), as the official ``sample`` does per position. Guidance applies whenever
``cfg_scale != 1`` (the official code guides only when ``cfg_scale > 1``; below 1 it samples conditional
logits). ``cfg_interval`` counts as in the official code, whose counter restarts after row 0: the prefill
and row-0 token t are guided while t <= cfg_interval + 1 (``decode_n_tokens``); a later forward is guided
while the number of tokens sampled after row 0, before that forward, is <= cfg_interval. ``-1`` = always.

Deviations: the official code fails an assertion for w = 1 (its ``ongoing_row_list[i - 1]`` wraps to the
newest row, whose auxiliary count equals the window); here w = 1 follows the same rules as every other
window (forward count 3n - 2). Random draws use :func:`draw`, not ``torch.multinomial``, so seeded samples
differ from the official ones while the distributions are the same; greedy (temperature 0) agrees.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from genaccel.models.contract import ARModel
from genaccel.samplers.acceptance import ExactRule
from genaccel.samplers.base import Sampler, SamplerStats, SamplingOptions, draw, require_grid, target_probs
from genaccel.samplers.speculative import DecodeState, Draft, StepOutcome, verify_window


# ----------------------------------------------------------------------------- options
@dataclass
class ZipAROptions(SamplingOptions):
    """Options of ZipAR: ``window`` = tokens a row must have before the row below starts (official default 8)."""

    window: int = 8
    jacobi_window: int = 1
    jacobi_init: str = "repeat_horizon"

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.window, int) or isinstance(self.window, bool):
            raise ValueError(f"zipar's window is a token count (an integer, official default 8), got "
                             f"{self.window!r}: --window auto applies to the Jacobi samplers (sjd, mcsjd, gsd, lantern)")
        if self.window < 1:
            raise ValueError(f"window must be >= 1 token (ZipAR default 8; it must also be below the grid side), "
                             f"got {self.window}")
        if self.jacobi_window < 1:
            raise ValueError(f"jacobi_window must be >= 1 (1 = ZipAR as published), got {self.jacobi_window}")
        if self.jacobi_init not in ("random", "repeat_horizon"):
            raise ValueError(f"jacobi_init must be 'random' or 'repeat_horizon', got {self.jacobi_init!r}")

    def check_grid(self, grid_size: int) -> None:
        """The window must be smaller than the grid side (the official schedule is only consistent for w < n)."""
        if not 1 <= self.window < grid_size:
            raise ValueError(
                f"zipar window {self.window} does not fit a {grid_size}x{grid_size} token grid: use --window "
                f"between 1 and {grid_size - 1} (official default 8)"
            )


def sampler_cli_options() -> list[tuple[str, dict]]:
    """argparse ``(flag, kwargs)`` pairs; ``--window`` shares its ``dest`` with the Jacobi samplers' flag."""
    return [("--window", dict(type=int, dest="window", default=None,
                              help="zipar: tokens a row needs before the next row starts (default 8)")),
            ("--jacobi-window", dict(type=int, dest="jacobi_window", default=None,
                                     help="zipar: tokens each ongoing row verifies per forward (Jacobi drafts "
                                          "+ 1; default 1 = ZipAR as published)"))]


# ----------------------------------------------------------------------------- schedule
@dataclass(frozen=True)
class ZipARStep:
    """One target forward in raster cell indices (cell = row * n + col; slot = cls_token_num + cell).

    ``sources[i]`` is the cell whose token is fed at cell slot ``slots[i]`` (they differ only for an
    auxiliary token); ``targets[i]`` is the cell sampled from that position's logits, -1 for a re-fed last
    token. ``guide_index`` is the token index the ``cfg_interval`` rule of :func:`target_probs` sees.
    The prefill is the step with no feeds and target (0,).
    """

    sources: tuple[int, ...]
    slots: tuple[int, ...]
    targets: tuple[int, ...]
    guide_index: int


def zipar_forward_count(grid_size: int, window: int) -> int:
    """Target forwards of ZipAR, prefill included: 2n + (n-2) w for 1 <= w < n."""
    return 2 * grid_size + (grid_size - 2) * window


def zipar_schedule(grid_size: int, window: int) -> list[ZipARStep]:
    """Every forward of ZipAR on an ``n x n`` grid with ``window`` (see the module docstring)."""
    n = grid_size
    steps = [ZipARStep((), (), (0,), 0)]
    steps += [ZipARStep((t - 1,), (t - 1,), (t,), t) for t in range(1, n)]
    return steps + _parallel_steps(n, window)


def _parallel_steps(n: int, window: int) -> list[ZipARStep]:
    """The forwards after row 0: ongoing rows advance together; a row starts when the one above has ``window``."""
    count = [n] + [0] * (n - 1)  # tokens sampled per row
    ongoing = [1]
    start_source = {1: n - 1}  # row -> cell fed at slot (row-1, n-1) to start it; for row 1 the real (0, n-1)
    refeed: int | None = None  # row whose last token is fed again to write its K/V
    generated, steps = 0, []
    while count[n - 1] < n:
        feeds = [] if refeed is None else [(refeed * n + n - 1, refeed * n + n - 1, -1)]
        feeds += [_row_feed(n, r, count[r], start_source) for r in ongoing]
        sources, slots, targets = zip(*feeds)
        steps.append(ZipARStep(sources, slots, targets, generated + 1))
        generated += len(ongoing)
        refeed = _advance_rows(n, window, count, ongoing, start_source)
        ongoing[:] = [r for r in ongoing if count[r] < n]
    return steps


def _row_feed(n: int, row: int, count: int, start_source: dict[int, int]) -> tuple[int, int, int]:
    """(source cell, slot cell, target cell) of an ongoing row: its latest token at its own slot, or, for a
    row with no token yet, its start token at slot (row-1, n-1)."""
    if count == 0:
        return start_source.pop(row), row * n - 1, row * n
    latest = row * n + count - 1
    return latest, latest, latest + 1


def _advance_rows(n: int, window: int, count: list[int], ongoing: list[int], start_source: dict[int, int]) -> int | None:
    """Count one new token per ongoing row (top to bottom, as the official loop), start rows below that reach
    the window, and return the row that completed (at most one: rows are staggered by ``window`` tokens)."""
    completed = None
    for r in list(ongoing):  # rows started in this pass are fed from the next forward on
        count[r] += 1
        if count[r] == window and r < n - 1:
            start_source[r + 1] = (r - 1) * n + count[r - 1] - 1  # latest token of row r-1 (official line ~201)
            ongoing.append(r + 1)
        if count[r] == n:
            completed = r
    return completed


# ----------------------------------------------------------------------------- sampler
def causal_slot_mask(positions: torch.Tensor, length: int) -> torch.Tensor:
    """(1, L, length) mask: the token at slot s may attend to every slot <= s, written or not."""
    return (torch.arange(length, device=positions.device)[None, :] <= positions[:, None])[None]


def fresh_cache(model: ARModel, batch: int, max_seq_len: int) -> None:
    """Allocate the cache and zero it, so unwritten slots hold zeros as in the reference's new caches."""
    model.setup_cache(batch, max_seq_len)
    clear = getattr(model, "clear_cache", None)
    if clear is None:
        raise TypeError(f"sampler 'zipar' needs model.clear_cache() (zeroes K/V buffers); {type(model).__name__} lacks it")
    clear()


def start_decoding(sampler: Sampler, model, labels, generator, stats: SamplerStats) -> tuple:
    """Both ZipAR paths begin alike: zeroed cache, prefill, cell (0, 0) sampled. Returns (CFG batch labels,
    tokens (B, N) with cell 0 set, mask width)."""
    T, N = model.cls_token_num, model.num_image_tokens
    batch_labels = sampler.batch_labels(model, labels)
    fresh_cache(model, batch_labels.shape[0], T + N)
    tokens = torch.zeros(labels.shape[0], N, dtype=torch.long, device=labels.device)
    out = stats.target_forward(model.prefill, batch_labels)
    tokens[:, 0] = draw(target_probs(out.logits[:, -1:], sampler.options, 0), generator)[:, 0]
    return batch_labels, tokens, int(getattr(model, "max_seq_len", T + N))


class ZipARSampler(Sampler):
    """Fixed-window ZipAR; every option of ``ar`` applies per sampled position."""

    name = "zipar"
    Options = ZipAROptions

    def _generate(self, model, labels, generator, stats: SamplerStats) -> torch.Tensor:
        n = require_grid(model, self.name)
        self.options.check_grid(n)
        if self.options.jacobi_window > 1:
            return generate_rows_jacobi(self, model, labels, generator, stats, n)
        _, tokens, width = start_decoding(self, model, labels, generator, stats)
        for step in zipar_schedule(n, self.options.window)[1:]:
            self._run_step(model, step, tokens, model.cls_token_num, width, generator, stats)
        stats.extra["window"] = self.options.window
        return tokens

    def _run_step(self, model, step: ZipARStep, tokens, T: int, width: int, generator, stats: SamplerStats) -> None:
        """One forward of the schedule: feed its tokens at their slots, sample its target cells in place."""
        device = tokens.device
        positions = T + torch.tensor(step.slots, device=device)
        fed = self.duplicate_for_cfg(tokens[:, list(step.sources)])
        out = stats.target_forward(model.forward_tokens, fed, positions, causal_slot_mask(positions, width))
        keep = [i for i, cell in enumerate(step.targets) if cell >= 0]
        probs = target_probs(out.logits[:, keep], self.options, step.guide_index)
        tokens[:, [step.targets[i] for i in keep]] = draw(probs, generator)


# ----------------------------------------------------------------------------- composition: Jacobi rows
@dataclass
class _RowPlan:
    """What one ongoing row feeds in a forward: its fed tokens (B, L) at slot cells, and its draft."""

    row: int
    start: int  # first cell this forward predicts
    slots: list[int]
    fed: torch.Tensor
    draft: Draft


def generate_rows_jacobi(sampler: ZipARSampler, model, labels, generator, stats: SamplerStats, n: int) -> torch.Tensor:
    """ZipAR's row schedule with a Jacobi window per ongoing row, verified by the speculative core.

    Not in either paper (issue #11 item 5). Each forward feeds, for every ongoing row with c committed
    tokens, its latest committed token (or, at c = 0, a start token at slot (r-1, n-1): the real last token of
    row r-1 once it is complete, else row r-1's latest token) followed by ``jacobi_window - 1`` Jacobi drafts
    (:class:`JacobiDrafter`: the previous forward's samples, new slots initialised by ``jacobi_init``). The
    outputs at those slots give the target distributions of cells c .. c+L-1, and :func:`verify_window` with
    the exact rule accepts a prefix of the drafts plus one residual / bonus token; with a batch every image
    advances the row by the batch minimum, as the core does. A row starts once the row above has at least
    ``window`` committed tokens; a completed row's last token is fed once more (logits discarded) when the
    row below has already started. Attention is ZipAR's causal-by-slot mask over zeroed buffers, so later
    rows also see earlier rows' draft K/V beyond their committed prefix (plain ZipAR: zeros there).

    Exactness: each committed token is distributed as the target given the context visible in the forward
    that verified it (the exact rule's guarantee); that context differs from plain ZipAR's, so images differ
    from ``jacobi_window=1`` even in greedy mode. ``cfg_interval`` sees the number of tokens committed before
    the forward, plus one.
    """
    from genaccel.samplers.drafting import JacobiDrafter

    opts, T, device = sampler.options, model.cls_token_num, labels.device
    batch_labels, tokens, width = start_decoding(sampler, model, labels, generator, stats)
    count = [1] + [0] * (n - 1)
    drafters: dict[int, JacobiDrafter] = {}
    refeed: list[int] = []
    rule, accepted_hist = ExactRule(), {}

    def row_state(r: int) -> DecodeState:
        """Row r as the drafter sees it: the whole grid, decoding standing at the row's next cell."""
        return DecodeState(model, opts, batch_labels, tokens, r * n + count[r], generator, stats)

    def start_row(r: int) -> None:
        drafters[r] = JacobiDrafter(opts.jacobi_window, opts.jacobi_init)
        drafters[r].start(row_state(r), None)

    start_row(0)
    while count[n - 1] < n:
        plans = [_plan_row(r, n, count, tokens, drafters[r], row_state(r), opts.jacobi_window) for r in drafters
                 if count[r] < n]
        slots = [*refeed, *(cell for plan in plans for cell in plan.slots)]
        fed = torch.cat([tokens[:, refeed], *[plan.fed for plan in plans]], dim=1)
        positions = T + torch.tensor(slots, device=device)
        out = stats.target_forward(model.forward_tokens, sampler.duplicate_for_cfg(fed), positions,
                                   causal_slot_mask(positions, width))
        guide_index = sum(count)
        offset = len(refeed)
        for plan in plans:
            L = len(plan.slots)
            p = target_probs(out.logits[:, offset : offset + L], opts, guide_index)
            offset += L
            verification = verify_window(p, plan.draft, rule, generator)
            m = int(verification.accepted.min())
            tokens[:, plan.start : plan.start + m] = verification.tokens[:, :m]
            r = plan.row
            count[r] += m
            accepted_hist[m] = accepted_hist.get(m, 0) + 1
            drafters[r].observe(row_state(r), StepOutcome(verification, p, None, m))
        # after every row has advanced: the row below may have started in this very forward
        refeed = [r * n + n - 1 for r in (plan.row for plan in plans) if count[r] == n and r + 1 < n and count[r + 1] > 0]
        for r in list(drafters):
            if count[r] >= opts.window and r + 1 < n and r + 1 not in drafters:
                start_row(r + 1)
    rows = sum(accepted_hist.values())
    stats.extra.update(window=opts.window, jacobi_window=opts.jacobi_window, row_verifications=rows,
                       mean_accepted_length=sum(a * c for a, c in accepted_hist.items()) / max(1, rows),
                       accepted_length_hist=dict(sorted(accepted_hist.items())))
    return tokens


def _plan_row(r: int, n: int, count: list[int], tokens: torch.Tensor, drafter, state: DecodeState, jacobi: int) -> _RowPlan:
    """Row r's feeds: its latest committed token (or start token) then its Jacobi drafts."""
    c = count[r]
    L = min(jacobi, n - c)
    draft = drafter.propose(state, L - 1)
    if c > 0:
        first = tokens[:, r * n + c - 1 : r * n + c]
    else:  # start token at slot (r-1, n-1): the real one once row r-1 is complete, else its latest token
        above = r * n - 1 if count[r - 1] == n else (r - 1) * n + count[r - 1] - 1
        first = tokens[:, above : above + 1]
    slots = [r * n + c - 1 + i for i in range(L)]
    return _RowPlan(r, r * n + c, slots, torch.cat([first, draft.tokens], dim=1), draft)


__all__ = ["ZipAROptions", "ZipARSampler", "ZipARStep", "causal_slot_mask", "require_grid", "sampler_cli_options",
           "zipar_forward_count", "zipar_schedule", "generate_rows_jacobi"]
