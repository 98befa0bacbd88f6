"""The `nar` sampler: 2n - 1 forwards, every cell once, the same tokens as a cache-free reference loop."""

from __future__ import annotations

import pytest
import torch
from spec_helpers import tiny_gpt

from genaccel.models.nar import NARModel, build_nar, diagonal_cells
from genaccel.samplers import build_sampler
from genaccel.samplers.base import SamplingOptions


def tiny_nar(grid: int, seed: int = 0, dim: int = 32) -> NARModel:
    gen = torch.Generator().manual_seed(seed)
    model = build_nar(None, dim=dim, n_layer=1, n_head=2, vocab_size=24, num_classes=3, block_size=grid * grid,
                      multiple_of=32)
    model.init_weights(gen)
    for head in (model.output, model.medusa_output):
        torch.nn.init.normal_(head.weight, 0.0, 1.0, generator=gen)
    return model.eval()


class CountingNAR:
    """Wraps a NAR model and records the cache slots every forward writes."""

    def __init__(self, model):
        self.model, self.fed = model, []

    def __getattr__(self, name):
        return getattr(self.model, name)

    def forward_tokens(self, tokens, positions, mask=None, rope_positions=None):
        self.fed.append(positions.tolist())
        return self.model.forward_tokens(tokens, positions, mask, rope_positions)


@pytest.mark.parametrize("grid", [8, 16, 24])
def test_exactly_2n_minus_1_forwards_and_each_cell_fed_once(grid):
    model = CountingNAR(tiny_nar(grid, dim=16))
    out = build_sampler("nar", cfg_scale=2.0, top_k=5).generate(model, torch.tensor([1]), torch.Generator().manual_seed(0))
    assert out.stats.nfe == 2 * grid - 1
    assert out.tokens.shape == (1, grid * grid)
    fed = [slot - 1 for step in model.fed for slot in step]
    assert sorted(fed) == list(range(grid * grid - 1))  # every cell but the last is fed back once
    assert [len(step) for step in model.fed] == [len(diagonal_cells(grid, d)) for d in range(2 * grid - 2)]


@torch.no_grad()
def reference_greedy(model: NARModel, labels: torch.Tensor, opts: SamplingOptions) -> torch.Tensor:
    """No cache: after each diagonal, recompute the training objective's cell logits over the whole grid and
    take the argmax on the next diagonal (later cells cannot influence it through the proximity mask);
    guidance while the number of generated tokens is <= cfg_interval (the official token count)."""
    n = model.grid_size
    tokens = torch.zeros(labels.shape[0], n * n, dtype=torch.long)
    generated = 0
    for d in range(2 * n - 1):
        cond = model.teacher_forced(labels, tokens).logits
        if opts.use_cfg:
            uncond = model.teacher_forced(torch.full_like(labels, model.null_class), tokens).logits
            guide = opts.cfg_interval < 0 or generated <= opts.cfg_interval
            logits = uncond + opts.cfg_scale * (cond - uncond) if guide else cond
        else:
            logits = cond
        cells = diagonal_cells(n, d)
        tokens[:, cells] = logits[:, cells].argmax(-1)
        generated += len(cells)
    return tokens


@pytest.mark.parametrize("cfg_scale,cfg_interval", [(1.0, -1), (3.0, -1), (3.0, 5), (0.5, 0)])
def test_greedy_equals_the_cache_free_reference(cfg_scale, cfg_interval):
    model = tiny_nar(grid=5, seed=1)
    labels = torch.tensor([0, 2, 1])
    opts = dict(cfg_scale=cfg_scale, cfg_interval=cfg_interval, temperature=0.0)
    got = build_sampler("nar", **opts).generate(model, labels).tokens
    assert torch.equal(got, reference_greedy(model, labels, SamplingOptions(**opts)))


def test_cfg_interval_counts_tokens_not_steps():
    """Step d is guided while the tokens generated before it (1 + 2 + ... + d) are <= cfg_interval."""
    model = tiny_nar(grid=6, seed=2)
    labels = torch.tensor([1])
    # 1 + 2 = 3 tokens before step 2: cfg_interval 2 guides steps 0-1 only; 3 guides step 2 as well
    runs = {ci: build_sampler("nar", cfg_scale=5.0, cfg_interval=ci, temperature=0.0).generate(model, labels).tokens
            for ci in (2, 3)}
    for ci, tokens in runs.items():
        assert torch.equal(tokens, reference_greedy(model, labels, SamplingOptions(5.0, ci, temperature=0.0)))


def test_batch_of_4_equals_4_single_runs_in_greedy():
    model = tiny_nar(grid=6, seed=3)
    labels = torch.tensor([2, 0, 1, 2])
    sampler = build_sampler("nar", cfg_scale=4.0, temperature=0.0)
    batched = sampler.generate(model, labels).tokens
    singles = torch.cat([sampler.generate(model, labels[i : i + 1]).tokens for i in range(4)])
    assert torch.equal(batched, singles)


def test_sampling_respects_top_k_per_position():
    """With top_k=1 every sampled token is the argmax of its own cell, whatever the seed."""
    model = tiny_nar(grid=4, seed=4)
    labels = torch.tensor([0, 1])
    greedy = build_sampler("nar", cfg_scale=2.0, temperature=0.0).generate(model, labels).tokens
    top1 = build_sampler("nar", cfg_scale=2.0, top_k=1).generate(model, labels, torch.Generator().manual_seed(7))
    assert torch.equal(top1.tokens, greedy)


def test_plain_gpt_is_refused_with_the_fix():
    with pytest.raises(ValueError, match=r"needs a model trained for diagonal decoding \(--model nar\), but LlamaGenGPT is trained for raster"):
        build_sampler("nar").generate(tiny_gpt(), torch.tensor([0]))


@pytest.mark.parametrize("sampler", ["ar", "sjd"])
def test_raster_samplers_refuse_a_nar_model(sampler):
    with pytest.raises(ValueError, match=r"needs a model trained for raster decoding.*NARModel is trained for diagonal decoding \(use --sampler nar\)"):
        build_sampler(sampler).generate(tiny_nar(grid=4), torch.tensor([0]))
