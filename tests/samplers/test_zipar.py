"""ZipAR sampler: forward counts, schedule coverage, and exactness against an independent reference loop.

The reference (:func:`reference_zipar`) is written from the algorithm's closed-form timing rather than from
the sampler's state machine: row r >= 1 samples its column j at parallel forward (r-1) w + 1 + j, starts
with an auxiliary token at slot (r-1, n-1) (the real (0, n-1) for rows 1 and 2, else row r-2's token at
column min(n, 2w) - 1, its latest when row r starts), and re-feeds its last token one forward after
completing. It runs over a cache zeroed by hand with a dense lower-triangular slot mask and applies CFG
and ``cfg_interval`` by hand.
"""

from __future__ import annotations

import pytest
import torch

from genaccel.models.llamagen import LlamaGenGPT, build_gpt
from genaccel.samplers.base import SamplerStats
from genaccel.samplers.zipar import (
    ZipAROptions,
    ZipARSampler,
    sampler_cli_options,
    zipar_forward_count,
    zipar_schedule,
)

VOCAB, CLASSES = 64, 4


def zipar_gpt(n: int, dim: int = 32, n_layer: int = 2, std: float = 0.1, seed: int = 0) -> LlamaGenGPT:
    """Tiny random GPT on an n x n grid. Weight matrices get std ``std`` (0.1) instead of the official 0.02, and
    the zero output head is randomised: with 0.02 attention is nearly uniform and argmaxes would not notice
    whether unwritten zero slots are attended to (0.1 makes that choice, the auxiliary token and stale caches
    all change greedy outputs)."""
    model = build_gpt(None, dim=dim, n_layer=n_layer, n_head=2, vocab_size=VOCAB, num_classes=CLASSES,
                      block_size=n * n, multiple_of=32)
    gen = torch.Generator().manual_seed(seed)
    model.init_weights(gen)
    for p in model.parameters():
        if p.dim() > 1:
            torch.nn.init.normal_(p, 0.0, std, generator=gen)
    return model.eval()


# ----------------------------------------------------------------------------- independent reference
def zeroed_cache(model: LlamaGenGPT, batch: int, length: int) -> None:
    model.setup_cache(batch, length)
    for layer in model.layers:
        layer.attention.kv_cache.k_cache.zero_()
        layer.attention.kv_cache.v_cache.zero_()


def start_token(grid: list[list[torch.Tensor]], r: int, n: int, w: int) -> torch.Tensor:
    """Token fed at slot (r-1, n-1) to start row r: the real (0, n-1) for rows 1 and 2, else row r-2's latest."""
    return grid[0][n - 1] if r <= 2 else grid[r - 2][min(n, 2 * w) - 1]


@torch.no_grad()
def reference_zipar(model: LlamaGenGPT, labels: torch.Tensor, w: int, cfg_scale: float,
                    cfg_interval: int = -1) -> tuple[torch.Tensor, int]:
    """Greedy ZipAR tokens (B, N) and the number of target forwards, from the closed-form schedule."""
    n, T = model.grid_size, model.cls_token_num
    use_cfg = cfg_scale != 1.0
    rows = torch.cat([labels, torch.full_like(labels, model.null_class)]) if use_cfg else labels
    zeroed_cache(model, rows.shape[0], T + n * n)
    dense = torch.ones(model.max_seq_len, model.max_seq_len, dtype=torch.bool).tril()
    forwards = 0

    def pick(logits: torch.Tensor, guided: bool) -> torch.Tensor:
        if not use_cfg:
            return logits.argmax(-1)
        cond, uncond = logits.chunk(2)
        return (uncond + cfg_scale * (cond - uncond) if guided else cond).argmax(-1)

    def forward(feeds: list[tuple[int, int, torch.Tensor]]) -> torch.Tensor:
        nonlocal forwards
        forwards += 1
        pos = torch.tensor([T + r * n + c for r, c, _ in feeds])
        toks = torch.stack([t for _, _, t in feeds], 1)
        toks = torch.cat([toks, toks]) if use_cfg else toks
        return model.forward_tokens(toks, pos, dense[pos][None]).logits

    grid: list[list[torch.Tensor]] = [[None] * n for _ in range(n)]  # type: ignore[list-item]
    grid[0][0] = pick(model.prefill(rows).logits[:, -1], True)
    forwards += 1
    for t in range(1, n):
        grid[0][t] = pick(forward([(0, t - 1, grid[0][t - 1])])[:, 0], cfg_interval < 0 or t <= cfg_interval + 1)
    generated = 0
    for k in range(1, (n - 2) * w + n + 1):
        feeds, targets = [], []
        for r in range(1, n):
            j = k - 1 - (r - 1) * w  # column row r samples at parallel forward k
            if j == n:  # completed in the previous forward: write its last token's K/V
                feeds.append((r, n - 1, grid[r][n - 1]))
                targets.append(None)
            elif 0 <= j < n:
                feeds.append((r - 1, n - 1, start_token(grid, r, n, w)) if j == 0 else (r, j - 1, grid[r][j - 1]))
                targets.append((r, j))
        guided = cfg_interval < 0 or generated <= cfg_interval
        logits = forward(feeds)
        for i, target in enumerate(targets):
            if target is not None:
                grid[target[0]][target[1]] = pick(logits[:, i], guided)
                generated += 1
    return torch.stack([tok for row in grid for tok in row], 1), forwards


# ----------------------------------------------------------------------------- forward counts
@pytest.mark.parametrize("n,windows", [(8, (1, 2, 4, 7)), (16, (4, 8, 15)), (24, (4, 12, 16))])
def test_forward_count_is_2n_plus_n_minus_2_times_w(n, windows):
    model = zipar_gpt(n, dim=16, n_layer=1)
    for w in windows:
        out = ZipARSampler(window=w, cfg_scale=1.0, temperature=0.0).generate(model, torch.tensor([1]))
        assert out.stats.nfe == 2 * n + (n - 2) * w == zipar_forward_count(n, w)
        assert out.stats.extra["window"] == w
    assert zipar_forward_count(16, 4) == 88 and zipar_forward_count(16, 8) == 144


@pytest.mark.parametrize("n", [2, 3, 5, 8, 16, 24])
def test_schedule_lengths_match_the_formula(n):
    for w in range(1, n):
        assert len(zipar_schedule(n, w)) == zipar_forward_count(n, w)


# ----------------------------------------------------------------------------- schedule coverage
@pytest.mark.parametrize("n,w", [(2, 1), (4, 1), (4, 3), (6, 2), (8, 4), (8, 7), (16, 8)])
def test_schedule_samples_every_cell_once_and_feeds_only_sampled_tokens(n, w):
    sampled: set[int] = set()
    last_written: dict[int, int] = {}
    for step in zipar_schedule(n, w):
        assert all(src in sampled for src in step.sources)  # a forward feeds only tokens that exist
        for src, slot in zip(step.sources, step.slots):
            if src != slot:  # auxiliary token: only at a row's last slot, before that row's real last token
                assert slot % n == n - 1 and slot // n >= 1 and slot not in sampled
            last_written[slot] = src
        targets = [t for t in step.targets if t >= 0]
        assert not sampled & set(targets)
        sampled |= set(targets)
    assert sampled == set(range(n * n))
    # every slot but the last cell ends up holding its own token's K/V; the last cell is never fed
    assert last_written == {cell: cell for cell in range(n * n - 1)}


class RecordingModel:
    """Wraps a GPT and records (slot cell, token) of every image token fed, batch row 0."""

    def __init__(self, model: LlamaGenGPT):
        self.model, self.writes = model, []

    def __getattr__(self, name):
        return getattr(self.model, name)

    def forward_tokens(self, tokens, positions, mask=None, rope_positions=None):
        for slot, tok in zip(positions.tolist(), tokens[0].tolist()):
            self.writes.append((slot - self.model.cls_token_num, tok))
        return self.model.forward_tokens(tokens, positions, mask, rope_positions)


def test_final_cache_slots_hold_the_output_tokens():
    n, w = 6, 2
    rec = RecordingModel(zipar_gpt(n))
    out = ZipARSampler(window=w, cfg_scale=4.0, temperature=0.0).generate(rec, torch.tensor([2]))
    final = dict(rec.writes)  # last token written per slot
    assert sorted(final) == list(range(n * n - 1))
    assert [final[c] for c in range(n * n - 1)] == out.tokens[0, :-1].tolist()
    assert len(rec.writes) == n * n - 1 + (n - 2)  # plus one auxiliary write per started row 2..n-1


# ----------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("cfg_scale", [4.0, 1.0])
@pytest.mark.parametrize("n,w", [(6, 1), (6, 2), (6, 3), (6, 5), (8, 4)])
def test_greedy_matches_reference_loop(n, w, cfg_scale):
    model = zipar_gpt(n)
    labels = torch.tensor([1, 3])
    ref, forwards = reference_zipar(model, labels, w, cfg_scale)
    out = ZipARSampler(window=w, cfg_scale=cfg_scale, temperature=0.0).generate(model, labels)
    assert torch.equal(out.tokens, ref)
    assert out.stats.nfe == forwards == zipar_forward_count(n, w)


@pytest.mark.parametrize("cfg_interval", [0, 3, 9])
def test_cfg_interval_counts_like_the_official_code(cfg_interval):
    model = zipar_gpt(6)
    labels = torch.tensor([0, 2])
    ref, _ = reference_zipar(model, labels, 2, 3.0, cfg_interval)
    out = ZipARSampler(window=2, cfg_scale=3.0, cfg_interval=cfg_interval, temperature=0.0).generate(model, labels)
    assert torch.equal(out.tokens, ref)


def test_zipar_differs_from_raster_ar_and_ignores_stale_cache_contents():
    """Sanity of the setup: rows 0 and 1 see only written slots (so equal AR), later rows do not; and a reused
    cache full of stale K/V gives the same tokens because the sampler zeroes it."""
    from genaccel.samplers.ar import ARSampler

    n, labels = 8, torch.tensor([1, 3])
    model = zipar_gpt(n)
    zipar = ZipARSampler(window=4, cfg_scale=4.0, temperature=0.0).generate(model, labels).tokens
    ar = ARSampler(cfg_scale=4.0, temperature=0.0).generate(model, labels).tokens
    assert torch.equal(zipar[:, : 2 * n], ar[:, : 2 * n])
    assert not torch.equal(zipar, ar)

    model.setup_cache(4, n * n + 1)  # same shape the sampler asks for, so these buffers are reused
    gen = torch.Generator().manual_seed(0)
    for layer in model.layers:
        layer.attention.kv_cache.k_cache.normal_(generator=gen)
        layer.attention.kv_cache.v_cache.normal_(generator=gen)
    again = ZipARSampler(window=4, cfg_scale=4.0, temperature=0.0).generate(model, labels).tokens
    assert torch.equal(again, zipar)


def test_batch_of_four_equals_single_runs():
    model = zipar_gpt(6)
    labels = torch.tensor([3, 0, 1, 3])
    sampler = ZipARSampler(window=3, cfg_scale=4.0, temperature=0.0)
    batch = sampler.generate(model, labels).tokens
    singles = torch.cat([sampler.generate(model, labels[i:i + 1]).tokens for i in range(4)])
    assert torch.equal(batch, singles)


def test_sampling_is_seeded_and_top_k_1_is_greedy():
    model = zipar_gpt(6)
    labels = torch.tensor([1, 2])
    sampler = ZipARSampler(window=2, cfg_scale=2.0, top_k=8)
    a = sampler.generate(model, labels, torch.Generator().manual_seed(1)).tokens
    b = sampler.generate(model, labels, torch.Generator().manual_seed(1)).tokens
    c = sampler.generate(model, labels, torch.Generator().manual_seed(2)).tokens
    assert torch.equal(a, b) and not torch.equal(a, c)
    top1 = ZipARSampler(window=2, cfg_scale=2.0, top_k=1).generate(model, labels, torch.Generator().manual_seed(3))
    greedy = ZipARSampler(window=2, cfg_scale=2.0, temperature=0.0).generate(model, labels)
    assert torch.equal(top1.tokens, greedy.tokens)


# ----------------------------------------------------------------------------- errors and options
def test_bad_window_raises_clear_errors():
    with pytest.raises(ValueError, match="--window auto applies to the Jacobi samplers"):
        ZipARSampler(window="auto")
    with pytest.raises(ValueError, match="window must be >= 1"):
        ZipARSampler(window=0)
    model = zipar_gpt(4)
    for w in (4, 9):
        with pytest.raises(ValueError, match=r"zipar window .* 4x4 .* --window between 1 and 3"):
            ZipARSampler(window=w).generate(model, torch.tensor([0]))
    assert ZipAROptions().window == 8


class FlatModel:
    """A 1-D tokenizer model: no 2-D grid (``grid_size == 0``)."""

    vocab_size, num_classes, null_class, cls_token_num, grid_size, num_image_tokens, hidden_dim = 8, 2, 2, 1, 0, 16, 4


def test_model_without_grid_raises_clear_error():
    with pytest.raises(ValueError, match="needs a square 2-D token grid"):
        ZipARSampler(window=2).generate(FlatModel(), torch.tensor([0]))
    with pytest.raises(ValueError, match="needs a square 2-D token grid"):
        ZipARSampler(window=2)._generate(type("Odd", (FlatModel,), {"grid_size": 3})(), torch.tensor([0]), None,
                                         SamplerStats())


def test_cli_flag_shares_the_window_dest():
    from genaccel.samplers.speculative import sampler_cli_options as speculative_flags

    ours = dict(sampler_cli_options())
    assert ours["--window"]["dest"] == dict(speculative_flags())["--window"]["dest"] == "window"


# ----------------------------------------------------------------------------- composition: Jacobi rows
@pytest.mark.parametrize("n,w,jacobi", [(6, 2, 3), (6, 3, 6), (8, 4, 4)])
def test_jacobi_rows_write_every_cell_with_its_committed_token(n, w, jacobi):
    """Each slot's last write is the committed token (accepted drafts are written when verified; the residual
    or bonus token is fed at its slot in the next forward; a completed row's last token is re-fed)."""
    rec = RecordingModel(zipar_gpt(n))
    out = ZipARSampler(window=w, jacobi_window=jacobi, cfg_scale=4.0, temperature=0.0).generate(rec, torch.tensor([2]))
    final = dict(rec.writes)
    assert sorted(final) == list(range(n * n - 1))
    assert [final[c] for c in range(n * n - 1)] == out.tokens[0, :-1].tolist()
    assert out.stats.extra["jacobi_window"] == jacobi and out.stats.extra["mean_accepted_length"] >= 1.0


def test_jacobi_rows_greedy_commits_the_argmax_of_the_verifying_forward():
    """Greedy: a committed token equals the argmax of the guided logits at the slot before it, in the last
    forward that computed that slot's output (the forward that verified it)."""
    n, w, scale = 6, 2, 3.0
    model = zipar_gpt(n)
    argmax_at = {}

    class Spy(RecordingModel):
        def forward_tokens(self, tokens, positions, mask=None, rope_positions=None):
            out = self.model.forward_tokens(tokens, positions, mask, rope_positions)
            cond, uncond = out.logits[:1], out.logits[1:]
            guided = uncond + scale * (cond - uncond)
            for i, slot in enumerate(positions.tolist()):
                argmax_at[slot - self.model.cls_token_num] = int(guided[0, i].argmax())
            return out

    out = ZipARSampler(window=w, jacobi_window=3, cfg_scale=scale, temperature=0.0).generate(Spy(model), torch.tensor([1]))
    tokens = out.tokens[0].tolist()
    # the output at slot c predicts cell c + 1. Row starts are left out: slot (r-1, n-1) predicts (r, 0) from a
    # start token and is computed again when row r-1's real last token is re-fed there.
    assert all(tokens[c + 1] == argmax_at[c] for c in range(n * n - 1) if (c + 1) % n)


def test_jacobi_rows_need_fewer_forwards_and_finish_every_image_in_a_batch():
    n, w = 8, 3
    model = zipar_gpt(n)
    labels = torch.tensor([0, 1, 2, 3])
    plain = ZipARSampler(window=w, cfg_scale=2.0, temperature=0.0).generate(model, labels)
    composed = ZipARSampler(window=w, jacobi_window=4, cfg_scale=2.0, temperature=0.0).generate(model, labels)
    assert composed.stats.nfe < plain.stats.nfe == zipar_forward_count(n, w)
    assert composed.tokens.shape == plain.tokens.shape and int(composed.tokens.max()) < VOCAB
    a = ZipARSampler(window=w, jacobi_window=4, cfg_scale=2.0).generate(model, labels, torch.Generator().manual_seed(5))
    b = ZipARSampler(window=w, jacobi_window=4, cfg_scale=2.0).generate(model, labels, torch.Generator().manual_seed(5))
    assert torch.equal(a.tokens, b.tokens)


def test_jacobi_options_are_checked():
    with pytest.raises(ValueError, match="jacobi_window must be >= 1"):
        ZipARSampler(jacobi_window=0)
    with pytest.raises(ValueError, match="jacobi_init must be"):
        ZipARSampler(jacobi_init="zeros")
