"""One verification core for every speculative sampler (SJD, MC-SJD, GSD, LANTERN, SD).

A speculative sampler is a draft source plus an acceptance rule around :func:`verify_window`:

1. the draft source proposes ``L - 1`` tokens for the next positions of every row with their draft
   distributions q;
2. one target forward over ``[last committed token, drafts]`` per row (both CFG halves, same tokens, each
   row at its own cache slots) gives the target distributions p at L positions (CFG -> temperature ->
   top-k/top-p -> softmax, exactly as AR, with ``cfg_interval`` at each row's own token indices);
3. :func:`verify_window` accepts a prefix of the drafts per row and samples one residual (or bonus) token;
   every row commits its own accepted length (ragged batch);
4. every row's KV cache is rolled back to its own committed length (per-row valid lengths; nothing is
   copied). Rows that are complete leave the batch (``select_rows`` of the model and the draft source), so
   they stop costing compute; in a stream (:meth:`SpeculativeSampler.generate_stream`, continuous batching)
   a complete row first takes the next request instead (``prefill_rows`` of the model, ``start_rows`` of
   the draft source).

Ragged batches keep exact rules exact: each row runs its own speculative chain; the other rows only decide
how many drafts a step verifies (the window is the longest any row still needs), and a draft count chosen
before the row's drafts and coins are drawn does not bias verification (docs/speculative.md, "Ragged
batches"). Draft sources (:mod:`genaccel.samplers.drafting`) and rules (:mod:`genaccel.samplers.acceptance`)
are pluggable; ``sjd``, ``mcsjd``, ``gsd``, ``lantern`` and ``sd`` only choose a pair.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from genaccel.models.contract import ARModel
from genaccel.models.drafter import DRAFTER_PRECISIONS, check_drafter_precision
from genaccel.samplers.acceptance import AcceptanceRule, ExactRule
from genaccel.samplers.base import (
    CompletedImages,
    SampleOutput,
    Sampler,
    SamplerStats,
    SamplingOptions,
    check_batch_size,
    draw,
    ordinary,
    sampling_mode,
    target_probs,
)
from genaccel.samplers.window import (
    MeasuredWindowPolicy,
    WindowPolicy,
    check_window_option,
    forward_cost,
    measured_lengths,
    window_arg,
)

INIT_SCHEMES = ("random", "repeat_horizon")
# How a Jacobi draft is re-drawn when the target distribution at its position changes (docs/speculative.md):
# 'independent' = a fresh sample (SJD), 'maximal' = maximal coupling of the old draft with the new p,
# 'gumbel' = a fixed Gumbel (exponential-race) noise per absolute position (MC-SJD, junhyukso/SCD).
COUPLINGS = ("independent", "maximal", "gumbel")
# Which CFG halves a trained draft source runs: 'cfg' both (LANTERN's drafter), 'cond' the conditional half only.
DRAFT_GUIDANCE = ("cfg", "cond")


# ----------------------------------------------------------------------------- options
@dataclass
class JacobiOptions(SamplingOptions):
    """Options of the training-free Jacobi draft window (SJD, MC-SJD, GSD)."""

    window: int | str = 16  # or 'auto': chosen per step from the cost curve and the acceptance (window.py)
    init: str = "repeat_horizon"  # named by SJD's LlamaGen script, whose drafts are in fact random (docs/speculative.md)
    draft_coupling: str = "independent"  # SJD; 'maximal' / 'gumbel': MC-SJD's coupled re-drafting (lossless)

    def validate(self) -> None:
        super().validate()
        check_window_option("window", self.window, 1, 1024, "tokens per target forward (SJD default 16)")
        if self.init not in INIT_SCHEMES:
            raise ValueError(f"init must be one of {INIT_SCHEMES}, got {self.init!r}")
        if self.draft_coupling not in COUPLINGS:
            raise ValueError(f"draft_coupling must be one of {COUPLINGS} (independent = SJD, maximal/gumbel = MC-SJD), "
                             f"got {self.draft_coupling!r}")


@dataclass
class DrafterOptions(SamplingOptions):
    """Options of a trained draft source: an EAGLE-style drafter head, or a smaller draft model."""

    drafter: str = ""
    draft_len: int | str = 4  # or 'auto': chosen per step from the cost curve and the acceptance (window.py)
    draft_stop: float = 0.0  # stop a row's chain once the product of its drafts' q falls below this (0 = never)
    draft_guidance: str = "cfg"  # 'cfg': the drafter runs both CFG halves (LANTERN); 'cond': the conditional half only
    drafter_precision: str = "auto"  # the drafter head's weights when decoding: auto (int8 on CPU), fp32, bf16, int8

    def validate(self) -> None:
        super().validate()
        check_window_option("draft_len", self.draft_len, 1, 64, "drafted tokens per target forward (default 4)")
        check_path_option("drafter", self.drafter)
        if not 0.0 <= self.draft_stop < 1.0:
            raise ValueError(f"draft_stop must lie in [0, 1) (0 = always draft draft_len tokens), got {self.draft_stop}")
        check_draft_guidance(self.draft_guidance)
        check_drafter_precision(self.drafter_precision)


def check_draft_guidance(guidance: str) -> None:
    if guidance not in DRAFT_GUIDANCE:
        raise ValueError(f"draft_guidance must be one of {DRAFT_GUIDANCE} (cfg = drafter on both CFG halves, cond = "
                         f"conditional half only), got {guidance!r}")


def check_path_option(name: str, value: str) -> None:
    """Empty = bundled default; otherwise the file must exist."""
    if value and not Path(value).is_file():
        raise ValueError(f"{name} file not found: {value!r} (give an existing path, or leave it empty for the bundled one)")


def check_lantern(lantern_k: int, lantern_delta: float) -> None:
    if lantern_k < 1:
        raise ValueError(f"lantern_k must be >= 1 latent neighbours, got {lantern_k}")
    if lantern_delta < 0 or not math.isfinite(lantern_delta):
        raise ValueError(
            f"lantern_delta must be finite and >= 0 (0 = off, <= 1: total-variation bound, > 1: LANTERN++ lambda), "
            f"got {lantern_delta}"
        )


def check_group(group_size: int, prob_threshold: float, embed_threshold: float) -> None:
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1 token (1 = exact test), got {group_size}")
    if not 0 < prob_threshold <= 1:
        raise ValueError(f"prob_threshold must lie in (0, 1], got {prob_threshold}")
    if not embed_threshold > 0:
        raise ValueError(f"embed_threshold must be > 0 (squared codebook distance; inf = no filter), got {embed_threshold}")


def sampler_cli_options() -> list[tuple[str, dict]]:
    """argparse ``(flag, kwargs)`` pairs for every speculative option; ``dest`` = the Options field name.

    Defaults are None so that only flags the user gave are passed on (``build_sampler`` rejects options
    the chosen sampler does not have, naming the ones it does).
    """
    def opt(flag: str, type_: type, help_: str, **kw: Any) -> tuple[str, dict]:
        return flag, dict(type=type_, dest=flag[2:].replace("-", "_"), default=None, help=help_, **kw)

    return [
        opt("--window", window_arg, "sjd/gsd: Jacobi window, tokens verified per target forward (default 16; 'auto' = "
            "cost-aware, chosen per step); zipar: tokens a row needs before the next starts (default 8)"),
        opt("--init", str, "sjd/gsd: initialisation of new draft slots", choices=INIT_SCHEMES),
        opt("--draft-coupling", str, "sjd/mcsjd/gsd/lantern: how Jacobi drafts are re-drawn (independent = SJD; "
            "maximal, gumbel = MC-SJD, lossless; on lantern a coupling selects the Jacobi window)", choices=COUPLINGS),
        opt("--group-size", int, "gsd: tokens around the draft in probability rank that may form its group (100)"),
        opt("--prob-threshold", float, "gsd: group members need |p(t) - p(x)| below this (0.3)"),
        opt("--embed-threshold", float, "gsd: group members need squared codebook distance below this (2.0; inf = off)"),
        opt("--lantern-k", int, "lantern (gsd): latent neighbours considered per draft token"),
        opt("--lantern-delta", float, "lantern (gsd): moved mass bound; <= 1 TV bound, > 1 LANTERN++ lambda, 0 = off"),
        opt("--codebook", str, "lantern/gsd: VQ checkpoint whose codebook defines neighbours (default: bundled VQ)"),
        opt("--drafter", str, "lantern/sd: EAGLE-style drafter checkpoint (default: bundled drafter)"),
        opt("--draft-len", window_arg, "lantern/sd: tokens drafted per target forward (4; 'auto' = cost-aware, chosen per step)"),
        opt("--draft-model", str, "sd: smaller GPT checkpoint used as the draft model instead of the drafter head"),
        opt("--draft-stop", float, "lantern/sd: a row stops drafting once the product of its drafts' probabilities "
            "under the drafter falls below this (0 = never, the default; lossless for sd)"),
        opt("--draft-guidance", str, "lantern/sd: the drafter runs both CFG halves with q CFG-combined (cfg, LANTERN's) or "
            "the conditional half only with q its unguided distribution (cond: half the drafter rows; lossless for sd)",
            choices=DRAFT_GUIDANCE),
        opt("--drafter-precision", str, "lantern/sd: the drafter head's weights when drafting: auto (default: int8 on a "
            "CPU, fp32 elsewhere), fp32 (the weights as loaded: float32, or bfloat16 under --dtype bf16; official LANTERN), "
            "bf16, or int8 per output row (bf16 matmul "
            "inputs; a quarter of fp32's bytes per call; lossless for sd, changes lantern's q slightly)",
            choices=DRAFTER_PRECISIONS),
    ]


def load_sampler_config(path: str | Path, **overrides: Any) -> Sampler:
    """Build the sampler a ``configs/samplers/*.yaml`` file describes (key ``sampler`` + its options).

    ``overrides`` (e.g. command-line flags that were given) win over the file; unknown or out-of-range
    options raise the sampler's one clear error.
    """
    from genaccel.samplers import build_sampler

    name, config = read_sampler_config(path)
    if name is None:
        raise ValueError(f"{path} must name its sampler with a 'sampler:' key (e.g. sampler: gsd)")
    return build_sampler(name, **{**config, **{k: v for k, v in overrides.items() if v is not None}})


def read_sampler_config(path: str | Path) -> tuple[str | None, dict[str, Any]]:
    """(the file's ``sampler:`` name or None, its other keys = the sampler's options) of a sampler YAML file."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sampler config not found: {path} (see configs/samplers/)")
    try:
        config = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"sampler config {path} is not valid YAML: {str(e).splitlines()[0]}") from e
    if not isinstance(config, dict):
        raise ValueError(f"sampler config {path} must be a mapping of option: value, got {type(config).__name__}")
    name = config.pop("sampler", None)
    return (str(name) if name is not None else None), config


# ----------------------------------------------------------------------------- state passed to draft sources
@dataclass
class DecodeState:
    """What a draft source may read: the committed tokens of every row and where each row stands.

    ``n`` is each row's number of committed tokens: a (B,) tensor in the ragged core (an int where every row
    stands at the same token, as in ZipAR's Jacobi rows); :attr:`committed` always gives the (B,) tensor.
    """

    model: ARModel
    options: SamplingOptions
    batch_labels: torch.Tensor  # (R,) rows = [cond; uncond] with CFG
    tokens: torch.Tensor  # (B, N) committed tokens of row b in [b, :n[b]]
    n: torch.Tensor | int
    generator: torch.Generator | None
    stats: SamplerStats

    @property
    def num_tokens(self) -> int:
        return self.tokens.shape[1]

    @property
    def committed(self) -> torch.Tensor:
        """(B,) committed tokens per row."""
        n = torch.as_tensor(self.n, device=self.tokens.device)
        return n.expand(self.tokens.shape[0]) if n.dim() == 0 else n

    @property
    def use_cfg(self) -> bool:
        return self.batch_labels.shape[0] != self.tokens.shape[0]

    def duplicate(self, x: torch.Tensor) -> torch.Tensor:
        """Same tokens (or per-row slots, lengths) in both CFG halves."""
        return torch.cat([x, x]) if self.use_cfg else x

    def cfg_rows(self, keep: torch.Tensor) -> torch.Tensor:
        """Indices of the [cond; uncond] rows that belong to image rows ``keep``."""
        return torch.cat([keep, keep + self.tokens.shape[0]]) if self.use_cfg else keep


@dataclass
class Draft:
    """Draft tokens (B, K) for positions n..n+K-1 and the distributions (B, K, V) they were drawn from;
    ``lengths`` (B,), if given: row b's drafts beyond ``lengths[b]`` are not to be tested (a chain that stopped
    early, decided from that row's earlier drafts only)."""

    tokens: torch.Tensor
    q: torch.Tensor
    lengths: torch.Tensor | None = None


@dataclass
class Verification:
    """Outcome of one window: per-row accepted length a in [1, L] and the tokens each row would commit.

    ``tokens[:, :a]`` = accepted drafts followed by the residual (or bonus) sample at ``a - 1``.
    """

    accepted: torch.Tensor  # (B,)
    tokens: torch.Tensor  # (B, L)


@dataclass
class StepOutcome:
    """Everything a draft source may learn from one target step."""

    verification: Verification
    probs: torch.Tensor  # (B, L, V) target distributions at positions n_old..n_old+L-1 of each row
    hidden: torch.Tensor | None  # (R, L, D) target hidden states (feature predicting each of those positions)
    advance: torch.Tensor | int  # tokens each row committed: (B,), or one int for every row

    @property
    def committed(self) -> torch.Tensor:
        """(B,) tokens each row committed in this step."""
        a = self.verification.accepted
        return torch.as_tensor(self.advance, device=a.device).expand_as(a)


class DraftSource(Protocol):
    """Pluggable drafts: ``start`` after prefill, ``propose`` before every target step, ``observe`` after it,
    ``select_rows`` when complete rows leave the batch (indices of the rows that stay, in order).

    Optional, for continuous batching: ``can_start_rows()`` says whether ``start_rows(state, index, hidden)``
    works now; that call restarts the state of image rows ``index`` for new requests whose prefill has run
    (``state`` already holds their first token; ``hidden`` (R', 1, D) the new rows' class-slot hidden states,
    [cond; uncond] with CFG), exactly as ``start`` would for a batch of them.
    """

    window: int  # the most tokens one target forward verifies (drafts + 1)

    def start(self, state: DecodeState, hidden: torch.Tensor) -> None: ...

    def propose(self, state: DecodeState, num: int) -> Draft: ...

    def observe(self, state: DecodeState, outcome: StepOutcome) -> None: ...

    def select_rows(self, state: DecodeState, keep: torch.Tensor) -> bool:
        """Keep only rows ``keep`` (``state`` still holds every row); False = cannot, rows must stay."""
        ...


# ----------------------------------------------------------------------------- the verify core
def verify_window(
    p: torch.Tensor,
    draft: Draft,
    rule: AcceptanceRule,
    generator: torch.Generator | None,
    limit: torch.Tensor | None = None,
) -> Verification:
    """Accept a prefix of ``draft`` per row against target distributions ``p`` (B, L, V), L = drafts + 1.

    Draft i (for the position of p[:, i]) is accepted with probability ``min(1, rule.ratio)``; the first
    rejected position gets a sample from ``rule.residual`` (``norm((rule.target - q)+)`` unless the rule
    reproduces an official resampling); if every draft is accepted the bonus token comes from the target
    after the last draft. ``limit`` (B,) caps the drafts row b may accept (a row near the end of its image
    needs fewer than the window holds): row b stops after ``limit[b]`` drafts and takes its bonus token from
    ``p[b, limit[b]]``; the drafts beyond are ignored (causal attention keeps them out of that p).
    With :class:`ExactRule` each emitted token is distributed exactly as p given its prefix (Leviathan et al.
    2023, Chen et al. 2023), for any ``limit`` fixed before the drafts' coins are drawn.
    """
    B, L, _ = p.shape
    K = L - 1
    rows = torch.arange(B, device=p.device)
    if K == 0:
        return Verification(accepted=torch.ones(B, dtype=torch.long, device=p.device), tokens=draw(p, generator))
    x = draft.tokens
    u = torch.rand(B, K, generator=generator, device=p.device)
    cap = torch.full((B,), K, dtype=torch.long, device=p.device) if limit is None else limit.clamp(0, K)
    target, run = leading_accepted(p, draft, rule, u, cap)
    run = torch.minimum(run, cap)
    rejected = run < cap
    if bool(rejected.any()):  # a row with run < cap stopped inside the examined positions
        stop = run.clamp(max=target.shape[1] - 1)
        residual = rule.residual(p[rows, stop], target[rows, stop], draft.q[rows, stop], x[rows, stop])
        last_dist = torch.where(rejected[:, None], residual, p[rows, run])
    else:  # every row accepted all it could: bonus tokens only, no residual to build (rules draw no coins there)
        last_dist = p[rows, run]
    tokens = torch.cat([x, x.new_zeros(B, 1)], dim=1)
    tokens[rows, run] = draw(last_dist, generator)
    return Verification(accepted=run + 1, tokens=tokens)


def leading_accepted(p: torch.Tensor, draft: Draft, rule: AcceptanceRule, u: torch.Tensor,
                     cap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rule targets of the positions examined, leading accepted drafts per row (B,)) for coins ``u`` (B, K).

    A rule with ``verify_chunk = c > 0`` (an expensive ratio, e.g. GSD's group) is evaluated c positions at
    a time, and only while some row has accepted every position so far and not reached its ``cap``: the
    accepted run is the same as evaluating every position (ratios are per position and the coins are drawn
    before), at a fraction of the work when drafts are rejected early. Targets beyond the last examined
    chunk are not computed; the residual only needs the one at a row's first rejection.
    """
    x, q = draft.tokens, draft.q
    K = x.shape[1]
    chunk = int(getattr(rule, "verify_chunk", 0) or 0) or K
    targets, run, alive, start = [], torch.zeros_like(cap), torch.ones_like(cap, dtype=torch.bool), 0
    while start < K:
        end = min(K, start + chunk)
        target = rule.target(p[:, start:end], x[:, start:end], q[:, start:end])
        accepted = (u[:, start:end] < rule.ratio(target, q[:, start:end], x[:, start:end])).long().cumprod(-1).sum(-1)
        targets.append(target)
        run = torch.where(alive, run + accepted, run)
        alive &= accepted == end - start
        start = end
        if start < K and not bool((alive & (run < cap)).any()):
            break
    return (targets[0] if len(targets) == 1 else torch.cat(targets, dim=1)), run


def one_hot_q(tokens: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Draft distributions of deterministic drafts (q = 1 at the token)."""
    return torch.nn.functional.one_hot(tokens, vocab_size).float()


def shift_rows(x: torch.Tensor, shift: torch.Tensor, width: int) -> torch.Tensor:
    """``x[b, shift[b] : shift[b] + width]`` per row of x (B, W, ...), clamped to the last column (callers
    track how many entries are real)."""
    idx = (shift[:, None] + torch.arange(width, device=x.device)).clamp(max=x.shape[1] - 1)
    if x.dim() > 2:
        idx = idx.view(*idx.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
    return x.gather(1, idx)


def can_select_rows(model: ARModel) -> bool:
    """Whether ``model`` implements the contract's optional ``select_rows`` (dropping complete rows)."""
    return callable(getattr(model, "select_rows", None))


def can_prefill_rows(model: ARModel) -> bool:
    """Whether ``model`` implements the contract's optional ``prefill_rows`` (refilling rows, call 6)."""
    return callable(getattr(model, "prefill_rows", None))


def can_start_rows(source: DraftSource) -> bool:
    """Whether a draft source can start its state for refilled rows (``start_rows``; continuous batching)."""
    check = getattr(source, "can_start_rows", None)
    return callable(check) and bool(check())


class SpeculativeSampler(Sampler):
    """The shared decode loop; subclasses pick :meth:`draft_source` and :meth:`acceptance_rule`."""

    Options = SamplingOptions

    def draft_source(self, model: ARModel) -> DraftSource:  # pragma: no cover - abstract
        raise NotImplementedError

    def acceptance_rule(self, model: ARModel) -> AcceptanceRule:
        return ExactRule()

    _window_policy: tuple | None = None

    def window_policy(self, model: ARModel, batch_labels: torch.Tensor, longest: int,
                      source: DraftSource | None = None) -> WindowPolicy | MeasuredWindowPolicy:
        """The cost-aware window chooser of this sampler for ``model`` at this batch. It persists across
        ``generate`` calls (statistics of earlier images are history too, so exactness is unaffected) and
        starts afresh for another model, batch size or longest window. Jacobi drafts (a source whose drafts
        improve across steps, ``history_dependent``) get :class:`MeasuredWindowPolicy`, others the cost-model
        :class:`WindowPolicy`."""
        key = (id(model), batch_labels.shape[0], longest)
        if self._window_policy is None or self._window_policy[0] != key:
            if getattr(source, "history_dependent", False):  # Jacobi drafts: measured rates
                policy = MeasuredWindowPolicy(longest)
            else:
                cost = getattr(self, "_forward_cost", None) or forward_cost(model, batch_labels, measured_lengths(longest))
                policy = WindowPolicy(cost, longest)
            self._window_policy = (key, policy)
        return self._window_policy[1]

    def set_forward_cost(self, cost: dict[int, float]) -> None:
        """Use this cost curve {window length: seconds} instead of measuring one (tests, known hardware); only
        drafter chains use one (Jacobi windows measure their rates, :class:`MeasuredWindowPolicy`)."""
        self._forward_cost = dict(cost)
        self._window_policy = None

    @sampling_mode
    def generate_stream(
        self, model: ARModel, labels: torch.Tensor, batch_size: int, generator: torch.Generator | None = None,
        on_complete: Callable[[CompletedImages], Any] | None = None,
    ) -> SampleOutput:
        """Continuous batching: sample one image per label (M,) with ``batch_size`` rows in flight; as soon as
        a row's image is complete, the next label restarts that row (``model.prefill_rows``, contract call 6,
        and the draft source's ``start_rows``), so M images take about (sum of their own steps) / batch_size
        forwards instead of the sum over batches of the slowest row. Tokens come back in label order.

        Every draw comes from the one ``generator`` in the order the stream makes them, so a stream is
        reproducible given the seed, the labels and ``batch_size`` (an image's tokens depend on which images
        share its forwards, as in a batch; its distribution does not, docs/speculative.md). Without
        ``prefill_rows`` (or a draft source without ``start_rows``) the labels run as consecutive batches.
        """
        check_batch_size(batch_size)
        labels = self.checked_labels(model, labels)
        source = self.draft_source(model)
        if labels.shape[0] <= batch_size or not (can_prefill_rows(model) and can_start_rows(source)):
            return super().generate_stream(model, labels, batch_size, generator, on_complete)
        stats = SamplerStats(images=labels.shape[0], tokens=model.num_image_tokens)
        start = time.perf_counter()
        tokens = self._generate(model, labels, generator, stats, width=batch_size, source=source,
                                on_complete=on_complete)
        stats.wall_time_s = time.perf_counter() - start
        return SampleOutput(tokens=tokens, stats=stats)

    def _generate(self, model, labels, generator, stats: SamplerStats, width: int | None = None,
                  source: DraftSource | None = None,
                  on_complete: Callable[[CompletedImages], Any] | None = None) -> torch.Tensor:
        """The ragged decode loop over ``labels``; ``width`` = rows in flight (continuous batching: a complete
        row takes the next label, ``on_complete`` hears of every image as it completes), None = all labels as
        one batch."""
        opts = self.options
        M, N, T = labels.shape[0], model.num_image_tokens, model.cls_token_num
        B = M if width is None else min(width, M)
        device = labels.device
        source, rule = source or self.draft_source(model), self.acceptance_rule(model)
        W = source.window
        span = torch.arange(W, device=device)
        batch_labels = self.batch_labels(model, labels[:B]).clone()  # refills write into it
        policy = self.window_policy(model, batch_labels, W, source) if getattr(source, "auto", False) else None
        windows: dict[int, int] = {}
        model.setup_cache(batch_labels.shape[0], T + N)
        hist = torch.zeros(W + 1, dtype=torch.long, device=device)
        row_steps = 0
        image_steps = torch.zeros(M, dtype=torch.long, device=device)  # verify steps each image took part in
        charge = torch.zeros(M, dtype=torch.float64)  # each image's share of the forwards (CompletedImages)
        charge[:B] = 1.0 / B

        out = stats.target_forward(model.prefill, batch_labels)
        # committed tokens, plus W scratch columns so a window's scatter never runs off the end
        buf = torch.zeros(B, N + W, dtype=torch.long, device=device)
        buf[:, 0] = draw(target_probs(out.logits[:, -1:], opts, 0), generator)[:, 0]
        state = DecodeState(model, opts, batch_labels, buf[:, :N],
                            torch.ones(B, dtype=torch.long, device=device), generator, stats)
        source.start(state, out.hidden[:, -1:])
        result = torch.empty(M, N, dtype=torch.long, device=device)
        rows = torch.arange(B, device=device)  # label index of every row still in the batch
        admitted, prefills, refills = B, 1, 0

        while True:
            step_tic, target_before = time.perf_counter(), stats.target_time_s
            n = state.n
            remaining = N - n
            L = min(W, int(remaining.max()))
            if policy is not None:  # a function of earlier steps only: exact rules stay exact (window.py)
                L = policy.choose(L)
            tic = time.perf_counter()
            draft = source.propose(state, L - 1)
            draft_s = time.perf_counter() - tic
            stats.draft_time_s += draft_s
            L = min(L, draft.tokens.shape[1] + 1)  # a chain that stopped early (--draft-stop) drafted fewer
            windows[L] = windows.get(L, 0) + 1
            limit = (remaining.clamp(max=L) - 1).clamp(min=0)  # drafts a row can use before its image ends
            if draft.lengths is not None:  # fixed by the row's earlier drafts, before any coin: exactness holds
                limit = torch.minimum(limit, draft.lengths)

            fed = torch.cat([buf.gather(1, (n - 1)[:, None]), draft.tokens], dim=1)
            # slots past a row's image end hold padding (ignored outputs): clamp them onto the unused last slot
            slots = ((T + n - 1)[:, None] + span[:L]).clamp(max=T + N - 1)
            out = stats.target_forward(model.forward_tokens, state.duplicate(fed), state.duplicate(slots))

            p = target_probs(out.logits, opts, n[:, None] + span[:L])
            verification = verify_window(p, draft, rule, generator, limit)
            committed = torch.minimum(verification.accepted, remaining)  # a complete row (kept) commits nothing
            cols = n[:, None] + span[:L]
            keep_old = span[:L][None, :] >= committed[:, None]
            buf.scatter_(1, cols, torch.where(keep_old, buf.gather(1, cols), verification.tokens))
            state.n = n + committed
            model.rollback(state.duplicate(T + state.n - 1))
            source.observe(state, StepOutcome(verification, p, out.hidden, committed))
            live = remaining > 0
            hist += torch.bincount(committed[live], minlength=W + 1)
            row_steps += int(live.sum())
            if width is not None:
                image_steps[rows[live]] += 1
                charge[rows[live].cpu()] += 1.0 / int(live.sum())
            if policy is not None:
                step_s = time.perf_counter() - step_tic
                engine_s = step_s - (stats.target_time_s - target_before) - draft_s
                policy.observe(verification.accepted[live] - 1, limit[live], engine_s, draft_s, L - 1,
                               committed=int(committed[live].sum()), step_s=step_s)

            done = state.n >= N
            if on_complete is not None and bool((done & live).any()):
                finished = rows[done & live]
                on_complete(CompletedImages(index=finished, tokens=ordinary(buf[done & live, :N]),
                                            forwards=(image_steps[finished] + 1).double().cpu(),
                                            charge=charge[finished.cpu()].clone(), stats=stats))
            if admitted < M and bool(done.any()):  # continuous batching: complete rows take the next labels
                free = done.nonzero().squeeze(1)[: M - admitted]
                result[rows[free]] = buf[free, :N]
                new = torch.arange(admitted, admitted + free.numel(), device=device)
                forwards = stats.nfe
                self._refill(model, source, state, buf, free, labels[new])
                rows[free] = new
                if stats.nfe > forwards:  # the refill ran a forward: the images it started share it
                    charge[new.cpu()] += 1.0 / free.numel()
                admitted, refills, prefills = admitted + free.numel(), refills + 1, prefills + stats.nfe - forwards
                done = state.n >= N
            if bool(done.all()):
                result[rows] = buf[:, :N]
                break
            if bool(done.any()) and can_select_rows(model):
                keep = (~done).nonzero().squeeze(1)
                if source.select_rows(state, keep):
                    keep_cfg = state.cfg_rows(keep)
                    result[rows[done]] = buf[done, :N]
                    model.select_rows(keep_cfg)
                    rows, buf = rows[keep], buf[keep]
                    state.batch_labels, state.tokens, state.n = state.batch_labels[keep_cfg], buf[:, :N], state.n[keep]

        hist_rows = hist.tolist()
        stats.extra.update(
            accepted_length_hist={a: c for a, c in enumerate(hist_rows) if c},
            mean_accepted_length=sum(a * c for a, c in enumerate(hist_rows)) / max(1, sum(hist_rows)),
            verify_steps=stats.nfe - prefills,
            # compute measure: a forward costs in proportion to the rows it carries, so tokens per row-forward
            # is what a ragged batch keeps of the batch-1 compression (docs/speculative.md)
            row_verify_steps=row_steps,
            row_step_compression=M * N / (M + row_steps),
            rows_in_flight=B,
            continuous=width is not None,
            prefill_forwards=prefills,  # the first prefill and the refills that ran a forward
            refills=refills,  # refill events (a bank-served refill runs no forward)
            window=W,
            window_hist=dict(sorted(windows.items())),
            rule=rule.name,
            draft_source=type(source).__name__,
        )
        if width is not None:  # per image: its prefill and the verify steps it took part in; its share of NFE
            stats.extra["image_forwards"] = (image_steps + 1).tolist()
            stats.extra["image_charge"] = charge.tolist()
        return result

    def _refill(self, model: ARModel, source: DraftSource, state: DecodeState, buf: torch.Tensor,
                free: torch.Tensor, labels: torch.Tensor) -> None:
        """Restart batch rows ``free`` (complete images, already stored) with new requests ``labels``: one
        target forward over their class slots (both CFG halves at their paired rows; none when the model
        serves them all from its class-slot bank), the first token drawn from it as in a fresh batch, and the
        draft source's state for those rows started afresh."""
        index = state.cfg_rows(free)
        new_labels = self.batch_labels(model, labels)
        out = state.stats.target_forward(model.prefill_rows, index, new_labels)
        buf[free] = 0
        buf[free, 0] = draw(target_probs(out.logits[:, -1:], self.options, 0), state.generator)[:, 0]
        state.n[free] = 1
        state.batch_labels[index] = new_labels
        source.start_rows(state, free, out.hidden[:, -1:])


# ----------------------------------------------------------------------------- codebook for LANTERN / GSD
class CodebookMixin:
    """Lazily loaded VQ codebook (V, d), l2-normalised as the quantizer uses it; cached per sampler."""

    _codebook: torch.Tensor | None = None

    def set_codebook(self, codebook: torch.Tensor) -> None:
        """Use these code vectors (V, d) instead of loading a VQ checkpoint (tests, custom tokenizers)."""
        self._codebook = codebook.detach().float()
        self._neighbours = {}

    def codebook_for(self, model: ARModel) -> torch.Tensor:
        if self._codebook is None:
            self.set_codebook(load_codebook(getattr(self.options, "codebook", "")))
        if self._codebook.shape[0] != model.vocab_size:
            raise ValueError(
                f"codebook has {self._codebook.shape[0]} codes but the model has vocab_size {model.vocab_size}; "
                "pass --codebook with the VQ checkpoint this GPT was trained on"
            )
        return self._codebook

    def neighbours_for(self, model: ARModel, k: int) -> torch.Tensor:
        from genaccel.samplers.acceptance import lantern_neighbours

        codebook = self.codebook_for(model)
        if k not in self._neighbours:
            self._neighbours[k] = lantern_neighbours(codebook, k)
        return self._neighbours[k]


def load_codebook(path: str = "") -> torch.Tensor:
    """Code vectors of a VQ checkpoint (default: the bundled VQ), normalised if the quantizer normalises."""
    from genaccel.models import BUNDLED
    from genaccel.models.loading import config_from_metadata, read_state_dict

    path = path or str(BUNDLED["vq"])
    if not Path(path).is_file():
        raise FileNotFoundError(
            f"LANTERN/GSD need a VQ codebook and {path} does not exist; pass --codebook PATH to the VQ checkpoint"
        )
    sd, meta = read_state_dict(path)
    if "quantize.embedding.weight" not in sd:
        raise ValueError(f"{path} holds no VQ codebook (key 'quantize.embedding.weight'); pass a VQ checkpoint")
    codebook = sd["quantize.embedding.weight"].float()
    config = config_from_metadata(meta) or {}
    if config.get("codebook_l2_norm", True):
        codebook = torch.nn.functional.normalize(codebook, dim=-1)
    return codebook


__all__ = [
    "COUPLINGS", "CodebookMixin", "DecodeState", "Draft", "DraftSource", "DrafterOptions", "JacobiOptions",
    "SpeculativeSampler", "can_prefill_rows", "can_select_rows", "can_start_rows", "shift_rows",
    "StepOutcome", "Verification", "load_codebook", "load_sampler_config", "read_sampler_config", "one_hot_q", "sampler_cli_options", "verify_window",
]
