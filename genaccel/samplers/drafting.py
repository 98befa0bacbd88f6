"""Draft sources for the verify core: Jacobi self-drafting, an EAGLE-style drafter head, a smaller model.

Each source implements :class:`genaccel.samplers.speculative.DraftSource`. Drafted tokens must really
be drawn from the q they report (that is what makes the exact rule lossless); q is computed with the
same CFG / temperature / top-k / top-p processing as the target (:func:`target_probs`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from genaccel.samplers.base import draw, target_probs
from genaccel.samplers.speculative import DecodeState, Draft, StepOutcome, one_hot_q


def empty_draft(state: DecodeState) -> Draft:
    B, V = state.tokens.shape[0], state.model.vocab_size
    device = state.tokens.device
    return Draft(tokens=torch.empty(B, 0, dtype=torch.long, device=device), q=torch.empty(B, 0, V, device=device))


def sample_chain(
    state: DecodeState, logits: torch.Tensor, num: int, extend: Callable[[torch.Tensor, int], torch.Tensor]
) -> Draft:
    """Draw ``num`` tokens autoregressively from a draft model: token k ~ q_k = processed ``logits``,
    then ``extend(token_k, k)`` feeds it and returns the logits (R, 1, V) for token k + 1."""
    drafts, qs = [], []
    for k in range(num):
        q = target_probs(logits, state.options, state.n + k)
        d = draw(q, state.generator)
        drafts.append(d)
        qs.append(q)
        if k + 1 < num:
            logits = extend(d, k)
    state.stats.draft_forwards += num
    return Draft(tokens=torch.cat(drafts, dim=1), q=torch.cat(qs, dim=1))


class JacobiDrafter:
    """Training-free Jacobi window (SJD): drafts are the target's own samples from the previous step.

    After a step that committed m tokens, the window positions beyond them keep the token each row
    would have committed on its own (accepted draft / residual sample, else a fresh sample from p),
    with q = that step's p; new slots at the end are initialised by ``init``: ``random`` (uniform
    token) or ``repeat_horizon`` (copy the token to the left in the same image row; random at a row
    start), both with a one-hot q (SJD ``get_multi_token_for_preparation``).
    """

    def __init__(self, window: int = 16, init: str = "random"):
        self.window = window
        self.init = init

    def start(self, state: DecodeState, hidden: torch.Tensor) -> None:
        empty = empty_draft(state)
        self.tokens, self.q = empty.tokens, empty.q

    def propose(self, state: DecodeState, num: int) -> Draft:
        have = self.tokens.shape[1]
        if have < num:
            fresh = self.init_tokens(state, num - have)
            self.tokens = torch.cat([self.tokens, fresh], dim=1)
            self.q = torch.cat([self.q, one_hot_q(fresh, state.model.vocab_size)], dim=1)
        self.tokens, self.q = self.tokens[:, :num], self.q[:, :num]
        return Draft(tokens=self.tokens, q=self.q)

    def init_tokens(self, state: DecodeState, count: int) -> torch.Tensor:
        """``count`` new draft tokens for the positions after the current drafts."""
        B, V, grid = state.tokens.shape[0], state.model.vocab_size, state.model.grid_size
        device = state.tokens.device
        fresh = torch.randint(V, (B, count), generator=state.generator, device=device)
        if self.init == "random":
            return fresh
        if not grid:
            raise ValueError("draft init 'repeat_horizon' copies the token to the left in an image row and needs a "
                             "2-D token grid; this model is a 1-D sequence (grid_size 0): pass --init random")
        left = self.tokens[:, -1] if self.tokens.shape[1] else state.tokens[:, state.n - 1]
        first = state.n + self.tokens.shape[1]
        for i in range(count):
            if (first + i) % grid:
                fresh[:, i] = left
            left = fresh[:, i]
        return fresh

    def observe(self, state: DecodeState, outcome: StepOutcome) -> None:
        v, m = outcome.verification, outcome.advance
        L = v.tokens.shape[1]
        resampled = draw(outcome.probs, state.generator)
        own = torch.arange(L, device=v.tokens.device)[None, :] < v.accepted[:, None]
        recycled = torch.where(own, v.tokens, resampled)
        self.tokens, self.q = recycled[:, m:], outcome.probs[:, m:]


class DrafterHeadSource:
    """EAGLE-style drafting with :class:`genaccel.models.drafter.EagleDrafter` (LANTERN's drafter, chain mode).

    The drafter keeps its own KV cache of committed entries (H_i, t_i); every proposal rolls back to the
    committed entries, appends the newly committed ones, then drafts ``num`` tokens on its own
    predicted hidden states. Runs on both CFG halves; q = CFG-combined, processed drafter logits.
    """

    def __init__(self, drafter, draft_len: int = 4):
        self.drafter = drafter
        self.window = draft_len + 1

    def start(self, state: DecodeState, hidden: torch.Tensor) -> None:
        self.drafter.check_target(state.model)
        self.drafter.setup_cache(state.batch_labels.shape[0], state.num_tokens)
        self.fed = 0
        self.pending_hidden = hidden  # H_0 from the class slot

    def propose(self, state: DecodeState, num: int) -> Draft:
        if num == 0:
            return empty_draft(state)
        n = state.n
        out = self.drafter.step(state.duplicate(state.tokens[:, self.fed : n]), self.pending_hidden, self.fed)
        self.fed = n
        last_hidden = out.hidden[:, -1:]

        def extend(d: torch.Tensor, k: int) -> torch.Tensor:
            nonlocal last_hidden
            step = self.drafter.step(state.duplicate(d), last_hidden, n + k)
            last_hidden = step.hidden
            return step.logits

        return sample_chain(state, out.logits[:, -1:], num, extend)

    def observe(self, state: DecodeState, outcome: StepOutcome) -> None:
        self.pending_hidden = outcome.hidden[:, : outcome.advance]


class DraftModelSource:
    """Classic two-model speculative decoding: any model on the sampler contract drafts autoregressively.

    The draft model keeps its own cache (both CFG halves); each proposal rolls it back to the committed
    tokens it has seen, feeds the newly committed ones in one forward, then samples ``num`` tokens.
    """

    def __init__(self, draft_model, draft_len: int = 4):
        self.draft_model = draft_model
        self.window = draft_len + 1

    def start(self, state: DecodeState, hidden: torch.Tensor) -> None:
        dm, target = self.draft_model, state.model
        for attr in ("vocab_size", "grid_size", "cls_token_num", "num_classes"):
            if getattr(dm, attr) != getattr(target, attr):
                raise ValueError(f"draft model {attr}={getattr(dm, attr)} differs from the target's "
                                 f"{getattr(target, attr)}; the draft model must share the tokenizer and classes")
        dm.setup_cache(state.batch_labels.shape[0], target.cls_token_num + target.num_image_tokens)
        dm.prefill(state.batch_labels)
        state.stats.draft_forwards += 1
        self.fed = 0

    def propose(self, state: DecodeState, num: int) -> Draft:
        if num == 0:
            return empty_draft(state)
        dm, n, T = self.draft_model, state.n, state.model.cls_token_num
        device = state.tokens.device
        dm.rollback(T + self.fed)
        out = dm.forward_tokens(state.duplicate(state.tokens[:, self.fed : n]), torch.arange(T + self.fed, T + n, device=device))
        self.fed = n

        def extend(d: torch.Tensor, k: int) -> torch.Tensor:
            return dm.forward_tokens(state.duplicate(d), torch.tensor([T + n + k], device=device)).logits

        return sample_chain(state, out.logits[:, -1:], num, extend)

    def observe(self, state: DecodeState, outcome: StepOutcome) -> None:
        """Nothing to learn: the next proposal re-feeds the committed tokens."""


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
            self._drafter = load_drafter(path, device=next(model.parameters()).device)
        return self._drafter


__all__ = ["DraftModelSource", "DrafterHeadSource", "DrafterMixin", "JacobiDrafter", "empty_draft", "sample_chain"]
