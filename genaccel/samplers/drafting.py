"""Draft sources for the verify core: Jacobi self-drafting (independent or coupled), an EAGLE-style drafter
head, a smaller model.

Each source implements :class:`genaccel.samplers.speculative.DraftSource`. Drafted tokens must really
be drawn from the q they report (that is what makes the exact rule lossless); q is computed with the
same CFG / temperature / top-k / top-p processing as the target (:func:`target_probs`), or for trained
sources with ``--draft-guidance cond`` from the conditional half alone (no CFG; half the drafter rows). Rows of a batch
stand at different tokens (ragged batches), so every source keeps per-row state and per-row cache slots.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from genaccel.models.drafter import check_drafter_precision
from genaccel.samplers.acceptance import gather_token, residual_distribution
from genaccel.samplers.base import draw, logits_to_probs, target_probs
from genaccel.samplers.speculative import (
    COUPLINGS,
    DecodeState,
    Draft,
    StepOutcome,
    can_prefill_rows,
    can_select_rows,
    check_draft_guidance,
    shift_rows,
)
from genaccel.samplers.window import AUTO_DRAFT_LEN, AUTO_JACOBI_WINDOW, resolve_window


def empty_draft(state: DecodeState) -> Draft:
    """No drafts for any row (a window of one token)."""
    B, V = state.tokens.shape[0], state.model.vocab_size
    device = state.tokens.device
    return Draft(tokens=torch.empty(B, 0, dtype=torch.long, device=device), q=torch.empty(B, 0, V, device=device))


def sample_chain(
    state: DecodeState, logits: torch.Tensor, num: int, extend: Callable[[torch.Tensor, int], torch.Tensor],
    stop: float = 0.0, guided: bool = True,
) -> Draft:
    """Draw ``num`` tokens autoregressively from a draft model: token k ~ q_k = processed ``logits``,
    then ``extend(token_k, k)`` feeds it and returns the logits (R, 1, V) for token k + 1.

    ``stop`` > 0 (``--draft-stop``, EAGLE-2's observation that the drafter's confidence tracks acceptance): a
    row stops once the product of its drafts' q falls below ``stop``, and the chain ends when every row has
    (``Draft.lengths`` marks each row's drafts). Whether token k + 1 is drafted depends only on tokens
    0..k, never on the target, so each drafted token is still tested against the q it was drawn from and
    exact acceptance stays exact.

    ``guided`` False (``--draft-guidance cond``): ``logits`` are the conditional half only (R = B) and q is
    their processed distribution without CFG; any q keeps exact acceptance exact, since each draft is tested
    against the q it was drawn from."""
    drafts, qs = [], []
    n = state.committed[:, None]
    B = n.shape[0]
    confidence = torch.ones(B, dtype=torch.float64, device=n.device)
    lengths = torch.zeros(B, dtype=torch.long, device=n.device)
    alive = torch.ones(B, dtype=torch.bool, device=n.device)
    calls = 0
    for k in range(num):
        q = target_probs(logits, state.options, n + k) if guided else logits_to_probs(logits, state.options)
        d = draw(q, state.generator)
        drafts.append(d)
        qs.append(q)
        calls += 1
        if stop > 0:
            lengths += alive.long()
            confidence *= q.gather(-1, d[..., None]).view(B).double()
            alive &= confidence >= stop
            if not bool(alive.any()):
                break
        if k + 1 < num:
            logits = extend(d, k)
    state.stats.draft_forwards += calls
    return Draft(tokens=torch.cat(drafts, dim=1), q=torch.cat(qs, dim=1), lengths=lengths if stop > 0 else None)


def new_entries(state: DecodeState, fed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The tokens each row committed since ``fed`` (B,), padded to the longest: (tokens (B, M), token indices
    (B, M) clamped to the image, per-row count (B,)). Padding entries lie after a row's real ones, so causal
    attention keeps them out of every real entry and of the chain drafted next."""
    count = state.committed - fed
    M = max(1, int(count.max()))
    index = (fed[:, None] + torch.arange(M, device=fed.device)).clamp(max=state.num_tokens - 1)
    return state.tokens.gather(1, index), index, count


class JacobiDrafter:
    """Training-free Jacobi window (SJD): drafts are the target's own samples from the previous step.

    After a step in which row b committed m_b tokens, the window positions beyond them keep the token the
    row would have committed there (accepted draft / residual sample; only where a caller commits less than
    a row accepted, as ZipAR's Jacobi rows do) or else a re-drawn draft, with q = that step's p. How a
    draft is re-drawn is the ``coupling``:

    * ``independent`` (SJD): a fresh sample from the new p.
    * ``maximal`` (MC-SJD, maximal coupling): keep the old draft x with probability min(1, p(x)/q(x)), else
      sample the residual norm((p - q)+) -- distributed as p, and equal to the old draft as often as any
      coupling allows, so drafts stop flipping between iterations.
    * ``gumbel`` (MC-SJD, SCD's Gumbel coupling): every absolute position of every row keeps one
      exponential-race noise vector E from the moment it enters the window; its draft is argmax p / E, so an
      unchanged or slightly changed p re-draws the same token.

    Every coupled draft is distributed as the p it was drawn under given everything at earlier positions,
    and its q is set to that p -- also when the old draft is kept (its old q would be biased: the keep
    event is information about the token; shared/reference/speculative.md §3.7). Verification coins and
    residual samples stay fresh. New slots at the end are initialised by ``init``: ``random`` (uniform
    token) or ``repeat_horizon`` (copy the token to the left in the same image row; random at a row start),
    both with a one-hot q (SJD ``get_multi_token_for_preparation``).
    """

    history_dependent = True  # a draft improves over the steps it stays in the window (window.py)

    def __init__(self, window: int | str = 16, init: str = "random", coupling: str = "independent"):
        if coupling not in COUPLINGS:
            raise ValueError(f"coupling must be one of {COUPLINGS}, got {coupling!r}")
        self.window, self.auto = resolve_window(window, AUTO_JACOBI_WINDOW)
        self.init = init
        self.coupling = coupling

    def start(self, state: DecodeState, hidden: torch.Tensor | None) -> None:
        empty = empty_draft(state)
        self.tokens, self.q = empty.tokens, empty.q
        self.count = torch.zeros(state.tokens.shape[0], dtype=torch.long, device=state.tokens.device)
        self.noise = empty.q  # gumbel: exponential noise (B, width, V) of positions n_b, n_b + 1, ...

    def propose(self, state: DecodeState, num: int) -> Draft:
        B, V = state.tokens.shape[0], state.model.vocab_size
        tokens, q = self.tokens[:, :num], self.q[:, :num]
        if tokens.shape[1] < num:
            pad = num - tokens.shape[1]
            tokens = torch.cat([tokens, tokens.new_zeros(B, pad)], dim=1)
            q = torch.cat([q, q.new_zeros(B, pad, V)], dim=1)
        need = torch.arange(num, device=tokens.device)[None, :] >= self.count[:, None]  # slots without a draft
        fresh = torch.where(need, self.init_tokens(state, tokens, need), tokens)
        q = q.masked_fill(need[..., None], 0.0).scatter_add_(-1, fresh[..., None], need[..., None].to(q.dtype))
        self.tokens, self.q = fresh, q
        self.count = torch.full_like(self.count, num)
        if self.coupling == "gumbel" and self.noise.shape[1] < num + 1:
            self.noise = torch.cat([self.noise, self.fresh_noise(state, num + 1 - self.noise.shape[1])], dim=1)
        return Draft(tokens=fresh, q=q)

    def fresh_noise(self, state: DecodeState, width: int, rows: int | None = None) -> torch.Tensor:
        """Exponential(1) noise for ``width`` new positions of every row, or of ``rows`` rows (one vector per
        position)."""
        B, V = state.tokens.shape[0] if rows is None else rows, state.model.vocab_size
        noise = torch.empty(B, width, V, device=state.tokens.device).exponential_(generator=state.generator)
        return noise.clamp_min_(torch.finfo(noise.dtype).tiny)

    def can_start_rows(self) -> bool:
        return True

    def start_rows(self, state: DecodeState, index: torch.Tensor, hidden: torch.Tensor | None) -> None:
        """Rows ``index`` start a new image: no drafts yet (the next proposal initialises every slot) and, for
        the Gumbel coupling, fresh noise at every window position, as :meth:`start` gives a new batch."""
        self.count[index] = 0
        if self.coupling == "gumbel" and self.noise.shape[1]:
            self.noise[index] = self.fresh_noise(state, self.noise.shape[1], index.numel())

    def init_tokens(self, state: DecodeState, tokens: torch.Tensor, need: torch.Tensor) -> torch.Tensor:
        """Initial tokens for the slots ``need`` (B, K) marks, after the drafts ``tokens`` that exist.

        ``repeat_horizon``: a slot copies the nearest known token to its left -- an existing draft, a row-start
        slot's random token, or the last committed token -- unless it starts an image row itself.
        """
        B, K = need.shape
        V, grid = state.model.vocab_size, state.model.grid_size
        device = tokens.device
        fresh = torch.randint(V, (B, K), generator=state.generator, device=device)
        if self.init == "random":
            return fresh
        if not grid:
            raise ValueError("draft init 'repeat_horizon' copies the token to the left in an image row and needs a "
                             "2-D token grid; this model is a 1-D sequence (grid_size 0): pass --init random")
        n = state.committed
        slot = torch.arange(K, device=device)
        row_start = (n[:, None] + slot) % grid == 0
        known = torch.where(need & row_start, fresh, tokens)
        last = state.tokens.gather(1, (n - 1).clamp(min=0)[:, None])
        values = torch.cat([last, known], dim=1)  # column 0 = the last committed token
        source = torch.where(~need | row_start, slot + 1, 0)
        return values.gather(1, source.cummax(dim=1).values)

    def redraw(self, state: DecodeState, probs: torch.Tensor) -> torch.Tensor:
        """The draft every window slot carries into the next step, distributed as ``probs`` (B, L, V)."""
        if self.coupling == "gumbel":
            return (probs / self.noise[:, : probs.shape[1]]).argmax(-1)
        if self.coupling == "independent" or self.tokens.shape[1] == 0:
            return draw(probs, state.generator)
        K = self.tokens.shape[1]  # maximal coupling of each old draft (x, q) with the new p at its slot
        x, q, p = self.tokens, self.q, probs[:, :K]
        keep = torch.rand(x.shape, generator=state.generator, device=x.device) * gather_token(q, x) < gather_token(p, x)
        replaced = draw(torch.cat([residual_distribution(p, q), probs[:, K:]], dim=1), state.generator)
        return torch.cat([torch.where(keep, x, replaced[:, :K]), replaced[:, K:]], dim=1)

    def observe(self, state: DecodeState, outcome: StepOutcome) -> None:
        v, probs, m = outcome.verification, outcome.probs, outcome.committed
        L = probs.shape[1]
        own = torch.arange(L, device=probs.device)[None, :] < v.accepted[:, None]
        recycled = torch.where(own, v.tokens, self.redraw(state, probs))
        self.tokens, self.q = shift_rows(recycled, m, L), shift_rows(probs, m, L)
        self.count = L - m
        if self.coupling == "gumbel":  # positions keep their noise; those entering the window get new noise
            shift = int(m.max())
            self.noise = shift_rows(torch.cat([self.noise[:, :L], self.fresh_noise(state, shift)], dim=1), m, L)

    def select_rows(self, state: DecodeState, keep: torch.Tensor) -> bool:
        self.tokens, self.q, self.count, self.noise = self.tokens[keep], self.q[keep], self.count[keep], self.noise[keep]
        return True


class GuidedRows:
    """Which CFG halves a trained draft source runs: both (``cfg``, LANTERN's drafter: q is CFG-combined like
    the target's) or the conditional half only (``cond``: half the rows per drafter call, q = processed
    conditional logits). Chosen by ``--draft-guidance``; without CFG both are the same."""

    guidance: str = "cfg"

    def set_guidance(self, guidance: str) -> None:
        check_draft_guidance(guidance)
        self.guidance = guidance

    def choose_rows(self, state: DecodeState) -> int:
        """Decide for this generation; the number of rows the drafter runs."""
        self.cond_only = self.guidance == "cond" and state.use_cfg
        return state.tokens.shape[0] if self.cond_only else state.batch_labels.shape[0]

    def rows(self, state: DecodeState, x: torch.Tensor) -> torch.Tensor:
        """Per-image tensor (B, ...) -> one entry per drafter row."""
        return x if self.cond_only else state.duplicate(x)

    def own(self, x: torch.Tensor) -> torch.Tensor:
        """Target rows [cond; uncond] (2B, ...) -> the drafter's rows."""
        return x[: x.shape[0] // 2] if self.cond_only else x

    def rows_of(self, state: DecodeState, index: torch.Tensor) -> torch.Tensor:
        """Drafter rows of image rows ``index``."""
        return index if self.cond_only else state.cfg_rows(index)


class DrafterHeadSource(GuidedRows):
    """EAGLE-style drafting with :class:`genaccel.models.drafter.EagleDrafter` (LANTERN's drafter, chain mode).

    The drafter keeps its own KV cache of committed entries (H_i, t_i); every proposal appends each row's
    newly committed entries at that row's slots (overwriting its discarded draft entries), then drafts
    ``num`` tokens on its own predicted hidden states. Runs on both CFG halves with q = CFG-combined,
    processed drafter logits (LANTERN), or on the conditional half alone (``guidance`` "cond"). ``precision``
    is the drafter's decoding precision (``EagleDrafter.setup_decoding``: auto, fp32, bf16 or int8 weights).
    """

    def __init__(self, drafter, draft_len: int | str = 4, draft_stop: float = 0.0, guidance: str = "cfg",
                 precision: str = "auto"):
        self.drafter = drafter
        draft_len, self.auto = resolve_window(draft_len, AUTO_DRAFT_LEN)
        self.window, self.draft_stop = draft_len + 1, draft_stop
        self.set_guidance(guidance)
        check_drafter_precision(precision)
        self.precision = precision

    def start(self, state: DecodeState, hidden: torch.Tensor) -> None:
        self.drafter.check_target(state.model)
        self.drafter.setup_decoding(self.choose_rows(state), state.num_tokens, self.precision)
        state.stats.extra["drafter_precision"] = self.drafter.decoding_precision  # "auto" resolved
        self.fed = torch.zeros_like(state.committed)
        self.pending_hidden = self.own(hidden)  # H_0 from the class slot

    def propose(self, state: DecodeState, num: int) -> Draft:
        if num == 0:
            return empty_draft(state)
        last_slot = state.num_tokens - 1
        tokens, index, count = new_entries(state, self.fed)
        hidden = self.pending_hidden[:, : tokens.shape[1]]
        out = self.drafter.decode(self.rows(state, tokens), hidden, self.rows(state, index))
        self.fed = state.committed.clone()
        pick = self.rows(state, (count - 1).clamp(min=0))[:, None, None]  # each row's last real entry
        last_hidden = out.gather(1, pick.expand(-1, 1, out.shape[-1]))  # the LM head runs on it alone
        n = self.rows(state, state.committed)

        def extend(d: torch.Tensor, k: int) -> torch.Tensor:
            nonlocal last_hidden
            last_hidden = self.drafter.decode(self.rows(state, d), last_hidden, (n + k).clamp(max=last_slot)[:, None])
            return self.drafter.logits(last_hidden)

        return sample_chain(state, self.drafter.logits(last_hidden), num, extend, self.draft_stop, not self.cond_only)

    def observe(self, state: DecodeState, outcome: StepOutcome) -> None:
        self.pending_hidden = self.own(outcome.hidden)[:, : max(1, int(outcome.committed.max()))]

    def can_start_rows(self) -> bool:
        return True

    def start_rows(self, state: DecodeState, index: torch.Tensor, hidden: torch.Tensor) -> None:
        """Rows ``index`` start a new image: nothing of it fed yet, H_0 = its class slot's hidden state. The
        drafter's stale cache slots need no reset: an entry reads only slots <= its own, and the new image's
        entries rewrite them in order before any is read."""
        self.fed[index] = 0
        self.pending_hidden = self.pending_hidden.clone()
        self.pending_hidden[self.rows_of(state, index), :1] = self.own(hidden)[:, :1].to(self.pending_hidden.dtype)

    def select_rows(self, state: DecodeState, keep: torch.Tensor) -> bool:
        rows = self.rows_of(state, keep)
        self.drafter.select_rows(rows)
        self.fed, self.pending_hidden = self.fed[keep], self.pending_hidden[rows]
        return True


class DraftModelSource(GuidedRows):
    """Classic two-model speculative decoding: any model on the sampler contract drafts autoregressively.

    The draft model keeps its own cache (both CFG halves, or the conditional half with ``guidance`` "cond");
    each proposal rolls every row back to the committed tokens it has seen, feeds the newly committed ones
    in one forward (per-row slots), then samples ``num`` tokens.
    """

    def __init__(self, draft_model, draft_len: int | str = 4, draft_stop: float = 0.0, guidance: str = "cfg"):
        self.draft_model = draft_model
        draft_len, self.auto = resolve_window(draft_len, AUTO_DRAFT_LEN)
        self.window, self.draft_stop = draft_len + 1, draft_stop
        self.set_guidance(guidance)

    def start(self, state: DecodeState, hidden: torch.Tensor) -> None:
        dm, target = self.draft_model, state.model
        for attr in ("vocab_size", "grid_size", "cls_token_num", "num_classes"):
            if getattr(dm, attr) != getattr(target, attr):
                raise ValueError(f"draft model {attr}={getattr(dm, attr)} differs from the target's "
                                 f"{getattr(target, attr)}; the draft model must share the tokenizer and classes")
        rows = self.choose_rows(state)
        dm.setup_cache(rows, target.cls_token_num + target.num_image_tokens)
        dm.prefill(state.batch_labels[:rows])
        state.stats.draft_forwards += 1
        self.fed = torch.zeros_like(state.committed)

    def propose(self, state: DecodeState, num: int) -> Draft:
        if num == 0:
            return empty_draft(state)
        dm, T = self.draft_model, state.model.cls_token_num
        last_slot = T + state.num_tokens - 1
        dm.rollback(self.rows(state, T + self.fed))
        tokens, index, count = new_entries(state, self.fed)
        out = dm.forward_tokens(self.rows(state, tokens), self.rows(state, T + index))
        self.fed = state.committed.clone()
        pick = self.rows(state, (count - 1).clamp(min=0))[:, None, None]
        logits = out.logits.gather(1, pick.expand(-1, 1, out.logits.shape[-1]))
        n = self.rows(state, state.committed)

        def extend(d: torch.Tensor, k: int) -> torch.Tensor:
            return dm.forward_tokens(self.rows(state, d), (T + n + k).clamp(max=last_slot)[:, None]).logits

        return sample_chain(state, logits, num, extend, self.draft_stop, not self.cond_only)

    def observe(self, state: DecodeState, outcome: StepOutcome) -> None:
        """Nothing to learn: the next proposal re-feeds the committed tokens."""

    def can_start_rows(self) -> bool:
        return can_prefill_rows(self.draft_model)

    def start_rows(self, state: DecodeState, index: torch.Tensor, hidden: torch.Tensor) -> None:
        """Rows ``index`` start a new image: the draft model prefills their conditions (its contract call 6)
        and nothing of the image is fed yet."""
        rows = self.rows_of(state, index)
        out = self.draft_model.prefill_rows(rows, state.batch_labels[rows])
        state.stats.draft_forwards += int(out.extra.get("computed_rows", 1) > 0)  # a banked refill runs none
        self.fed[index] = 0

    def select_rows(self, state: DecodeState, keep: torch.Tensor) -> bool:
        if not can_select_rows(self.draft_model):
            return False
        self.draft_model.select_rows(self.rows_of(state, keep))
        self.fed = self.fed[keep]
        return True


class DrafterMixin:
    """A sampler's EAGLE-style drafter: ``options.drafter`` or the bundled one, loaded once; None if absent."""

    _drafter = None

    def set_drafter(self, drafter) -> None:
        """Use this :class:`EagleDrafter` instead of loading a checkpoint (tests, freshly trained heads)."""
        self._drafter = drafter

    def drafter_for(self, model):
        from genaccel.models.drafter import BUNDLED_DRAFTER, load_drafter

        if self._drafter is None:
            path = self.options.drafter
            if not path and not BUNDLED_DRAFTER.is_file():
                return None
            drafter = load_drafter(path, device=next(model.parameters()).device)
            if not path and not drafter.fits(model):
                return None  # the bundled head is the bundled GPT's; other models (flextok) have none bundled
            self._drafter = drafter
        return self._drafter


def jacobi_source(options) -> JacobiDrafter:
    """The Jacobi window a sampler's options describe (``window``, ``init``, ``draft_coupling``)."""
    return JacobiDrafter(options.window, options.init, getattr(options, "draft_coupling", "independent"))


__all__ = ["DraftModelSource", "DrafterHeadSource", "GuidedRows", "DrafterMixin", "JacobiDrafter", "empty_draft", "jacobi_source",
           "new_entries", "sample_chain"]
