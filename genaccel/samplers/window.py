"""Cost-aware windows (``--window auto``, ``--draft-len auto``; issue #14 item 3).

Jacobi windows use :class:`MeasuredWindowPolicy` (measured committed tokens per second per length, in blocks
of steps); drafter chains use :class:`WindowPolicy`, the cost model below. For a drafter chain, a window of L tokens per target forward commits ``E(L) = 1 + sum_{j < L-1} P(drafts 0..j accepted)`` tokens
on average and costs ``cost(L)`` (the target forward at that length) plus the drafting and engine time of a
step. ``auto`` picks, before every step, the L that maximises expected committed tokens per second,
``E(L) / (cost(L) + a + b (L - 1))``:

* ``cost(L)`` is measured once per model shape / device / dtype / batch rows / threads / torch version
  (:func:`forward_cost`) and cached in a JSON file under the user cache directory (:func:`cost_cache_path`);
* the acceptance probabilities are running counts of the verify steps so far: draft j was tested in a step
  where drafts 0..j-1 were accepted, and accepted or not (Laplace prior 1/2);
* ``a`` (engine time per step) and ``b`` (drafting time per drafted token) are running means of this run.

Exactness: the window of a step is a function of earlier steps only (counts and timings of past
verifications), fixed before the step's drafts and coins are drawn, and the exact rule is exact for every
such draft count (docs/speculative.md, "Ragged batches"). The window never depends on the current drafts.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

AUTO = "auto"
AUTO_JACOBI_WINDOW = 32  # the longest Jacobi window auto may choose (MC-SJD's default)
AUTO_DRAFT_LEN = 8  # the longest drafter chain auto may choose
MIN_AUTO_WINDOW = 2  # never plain AR: at least one draft is tested, so the statistics keep learning
PROBE_EVERY = 16  # every 16th step tries twice the best window, to learn the acceptance beyond it
_MEMO: dict[str, dict[int, float]] = {}


def resolve_window(value: int | str, longest: int) -> tuple[int, bool]:
    """(the most tokens a step may verify, whether the window is chosen per step) for an option value."""
    return (longest, True) if value == AUTO else (int(value), False)


def check_window_option(name: str, value, low: int, high: int, default: str) -> None:
    """An int in [low, high] or 'auto', else one clear error naming the option."""
    if value == AUTO:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name} must lie in [{low}, {high}] {default}, or be 'auto' (cost-aware, chosen per step), "
                         f"got {value!r}")


def window_arg(value: str) -> int | str:
    """argparse type of ``--window`` / ``--draft-len``: an integer or 'auto'."""
    if value == AUTO:
        return AUTO
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"expected an integer or 'auto', got {value!r}") from None


window_arg.__name__ = "integer or 'auto'"  # argparse names the type in its error message


def cost_cache_path() -> Path:
    """``$GENACCEL_CACHE_DIR``, else ``$XDG_CACHE_HOME/genaccel``, else ``~/.cache/genaccel``; file forward_cost.json."""
    root = os.environ.get("GENACCEL_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache"), "genaccel")
    return Path(root) / "forward_cost.json"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return "cpu:" + line.split(":", 1)[1].strip()
    except OSError:
        pass
    return f"{device.type}:{cpu}"


def cost_key(model, rows: int) -> str:
    """What a forward's cost depends on: model class and shape, device, dtype, batch rows, threads, torch."""
    param = next(model.parameters())
    shape = (f"{type(model).__name__}(params={sum(p.numel() for p in model.parameters())},"
             f"dim={getattr(model, 'hidden_dim', '?')},tokens={model.num_image_tokens})")
    return (f"{shape}|{device_name(param.device)}|{str(param.dtype).removeprefix('torch.')}|rows={rows}"
            f"|threads={torch.get_num_threads()}|torch={torch.__version__}")


def measure_forward_cost(model, batch_labels: torch.Tensor, lengths: list[int], repeats: int = 3) -> dict[int, float]:
    """Median seconds of one ``forward_tokens`` of each length (after a warm-up round), made non-decreasing
    in L (a longer window cannot cost less; timing noise would otherwise make it look so)."""
    T = model.cls_token_num
    R = batch_labels.shape[0]
    model.setup_cache(R, T + model.num_image_tokens)
    model.prefill(batch_labels)
    device = batch_labels.device
    times: dict[int, list[float]] = {L: [] for L in lengths}
    for _ in range(repeats + 1):
        for L in lengths:
            tokens = torch.zeros(R, L, dtype=torch.long, device=device)
            slots = (T + torch.arange(L, device=device))[None].expand(R, -1)
            tic = time.perf_counter()
            out = model.forward_tokens(tokens, slots)
            if out.logits.is_cuda:
                torch.cuda.synchronize(out.logits.device)
            times[L].append(time.perf_counter() - tic)
            model.rollback(torch.full((R,), T, device=device))
    return monotone({L: statistics.median(times[L][1:]) for L in lengths})


def forward_cost(model, batch_labels: torch.Tensor, lengths: list[int]) -> dict[int, float]:
    """The cost curve for ``model`` at this batch, from memory, the JSON cache, or measured now (then saved)."""
    key = cost_key(model, batch_labels.shape[0])
    cached = _MEMO.get(key)
    if cached is None:
        path = cost_cache_path()
        try:
            entry = json.loads(path.read_text()).get(key, {})
            cached = {int(L): float(s) for L, s in entry.get("cost_s", {}).items()}
        except (OSError, ValueError, AttributeError):
            cached = {}
    if not all(L in cached for L in lengths):
        cached = monotone({**cached, **measure_forward_cost(model, batch_labels, [L for L in lengths if L not in cached])})
        save_cost(key, cached)
    _MEMO[key] = cached
    return {L: cached[L] for L in lengths}


def monotone(cost: dict[int, float]) -> dict[int, float]:
    """The curve made non-decreasing in L (points measured at different times are merged into one curve)."""
    out, running = {}, 0.0
    for L in sorted(cost):
        running = max(running, cost[L])
        out[L] = running
    return out


def save_cost(key: str, cost: dict[int, float]) -> None:
    """Merge one key into the cache file (atomic replace); a read-only cache directory is not an error."""
    path = cost_cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            data = {}
        data[key] = {"cost_s": {str(L): s for L, s in sorted(cost.items())},
                     "measured_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        tmp.replace(path)
    except OSError:
        pass


def measured_lengths(longest: int) -> list[int]:
    """Window lengths whose cost is measured (others are interpolated): 1..4, then about x1.5 apart."""
    points, L = [1, 2, 3, 4], 6
    while L < longest:
        points.append(L)
        L = int(L * 1.5 + 0.5) // 2 * 2
    return sorted({p for p in points if p <= longest} | {longest})


class WindowPolicy:
    """Chooses each step's window from the cost curve and the running acceptance (module docstring)."""

    def __init__(self, cost: dict[int, float], longest: int):
        cost = monotone(cost)
        points = sorted(cost)
        xs = torch.tensor(points, dtype=torch.float64)
        ys = torch.tensor([cost[L] for L in points], dtype=torch.float64)
        grid = torch.arange(1, longest + 1, dtype=torch.float64)
        right = torch.searchsorted(xs, grid).clamp(1, len(points) - 1)
        x0, x1, y0, y1 = xs[right - 1], xs[right], ys[right - 1], ys[right]
        self.cost = torch.where(grid <= xs[0], ys[0], y0 + (y1 - y0) * (grid - x0) / (x1 - x0).clamp(min=1e-12))
        self.longest = longest
        self.tested = torch.zeros(longest, dtype=torch.float64)
        self.accepted = torch.zeros(longest, dtype=torch.float64)
        self.engine_s, self.steps, self.draft_s, self.drafted = 0.0, 0, 0.0, 0

    def acceptance(self) -> torch.Tensor:
        """P(draft j accepted | drafts before it accepted), j = 0..longest-1 (Laplace prior 1/2)."""
        return (self.accepted + 1) / (self.tested + 2)

    def expected_tokens(self) -> torch.Tensor:
        """E(L) for L = 1..longest: the bonus/residual token plus every accepted draft."""
        survive = torch.cumprod(self.acceptance(), 0)[: self.longest - 1]
        return 1 + torch.cat([survive.new_zeros(1), survive.cumsum(0)])

    def rate(self) -> torch.Tensor:
        """Expected committed tokens per second of every L = 1..longest."""
        a = self.engine_s / max(self.steps, 1)
        b = self.draft_s / max(self.drafted, 1)
        L = torch.arange(1, self.longest + 1, dtype=torch.float64)
        return self.expected_tokens() / (self.cost + a + b * (L - 1))

    def choose(self, cap: int) -> int:
        """The best window in [MIN_AUTO_WINDOW, cap] (cap = what the rows still need, at most ``longest``).

        Every ``PROBE_EVERY``-th step doubles it (within cap), so draft positions beyond the current best are
        tested too and their acceptance is learned rather than left at the prior.
        """
        low = min(MIN_AUTO_WINDOW, cap)
        if cap <= low:
            return cap
        best = low + int(self.rate()[low - 1 : cap].argmax())
        return min(cap, 2 * best) if self.steps % PROBE_EVERY == PROBE_EVERY - 1 else best

    def observe(self, accepted_drafts: torch.Tensor, usable: torch.Tensor, engine_s: float, draft_s: float,
                drafted: int, committed: int = 0, step_s: float = 0.0) -> None:
        """One step: per live row, drafts accepted (B,) out of the ``usable`` (B,) it could accept, and the
        step's engine and drafting seconds (``committed`` / ``step_s``: for :class:`MeasuredWindowPolicy`)."""
        accepted_drafts, usable = accepted_drafts.cpu(), usable.cpu()
        tested = torch.minimum(accepted_drafts + 1, usable)  # drafts that met a coin
        j = torch.arange(self.longest)
        self.tested += (j[None] < tested[:, None]).sum(0).double()
        self.accepted += (j[None] < accepted_drafts[:, None]).sum(0).double()
        self.engine_s += engine_s
        self.draft_s += draft_s
        self.drafted += drafted
        self.steps += 1


class MeasuredWindowPolicy:
    """Jacobi windows (``--window auto``): picks L by *measured* committed tokens per second.

    A Jacobi draft improves over the steps it stays in the window, so how often draft j is accepted depends on
    the windows of earlier steps; the one-step model of :class:`WindowPolicy` then sees only the fresh far
    drafts of an occasional long probe and settles on short windows. This policy runs each candidate length
    (2, 4, 8, ... up to the longest) for a block of :attr:`BLOCK` steps, scores a block by the tokens its rows
    committed per second of step wall time (after :attr:`WARM` steps for the drafts to settle), and then keeps
    the best, re-trying the less-tried of its two neighbouring lengths every :attr:`EXPLORE_EVERY`-th block (rates
    drift as images change; far lengths rarely win). Blocks persist across images with the policy, so the first
    round of exploration is paid once per sampler and batch size.

    Exactness as for :class:`WindowPolicy`: a step's window depends only on earlier steps' counts and times.
    """

    BLOCK = 16
    WARM = 4
    EXPLORE_EVERY = 8

    def __init__(self, longest: int):
        lengths, L = [], MIN_AUTO_WINDOW
        while L < longest:
            lengths.append(L)
            L *= 2
        self.candidates = [*lengths, longest] if longest >= MIN_AUTO_WINDOW else [longest]
        self.longest = longest
        self.tokens = dict.fromkeys(self.candidates, 0.0)
        self.seconds = dict.fromkeys(self.candidates, 0.0)
        self.blocks = dict.fromkeys(self.candidates, 0)
        self.current, self.left, self.warm, self.block_index, self.steps = self.candidates[-1], 0, 0, 0, 0
        self.chosen = 0  # the window of the step being run (below the block's length when capped)

    def rate(self) -> dict[int, float]:
        """Measured committed tokens per second of every candidate tried so far."""
        return {L: self.tokens[L] / self.seconds[L] for L in self.candidates if self.seconds[L] > 0}

    def _next_block(self) -> None:
        untried = [L for L in reversed(self.candidates) if not self.blocks[L]]  # the longest (the default) first
        rates = self.rate()
        if untried:
            pick = untried[0]
        else:
            best = max(rates, key=rates.get)
            pick = best
            if self.block_index % self.EXPLORE_EVERY == self.EXPLORE_EVERY - 1:  # re-try a neighbour of the best
                i = self.candidates.index(best)
                near = self.candidates[max(0, i - 1) : i] + self.candidates[i + 1 : i + 2]
                pick = min(near, key=lambda L: (self.blocks[L], -L)) if near else best
        self.current, self.left, self.warm = pick, self.BLOCK, self.WARM
        self.blocks[pick] += 1
        self.block_index += 1

    def choose(self, cap: int) -> int:
        """This step's window: the current block's length, within ``cap`` (what the rows still need)."""
        if self.left == 0:
            self._next_block()
        self.left -= 1
        self.chosen = min(self.current, cap)
        return self.chosen

    def observe(self, accepted_drafts: torch.Tensor, usable: torch.Tensor, engine_s: float, draft_s: float,
                drafted: int, committed: int = 0, step_s: float = 0.0) -> None:
        """One step: ``committed`` tokens over all live rows in ``step_s`` seconds (the rest is unused here)."""
        self.steps += 1
        if self.warm > 0:
            self.warm -= 1
            return
        if self.chosen == self.current:  # a capped step near the end says little about L
            self.tokens[self.current] += committed
            self.seconds[self.current] += step_s


__all__ = ["AUTO", "MeasuredWindowPolicy", "WindowPolicy", "check_window_option", "cost_cache_path", "cost_key", "forward_cost",
           "measure_forward_cost", "measured_lengths", "resolve_window", "window_arg"]
