"""MC-SJD (coupled Jacobi drafts): exactness, greedy equality with AR, the coupling itself, options and wiring."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from spec_helpers import MarkovChainModel, exact_joint, sequence_index, tiny_gpt
from test_speculative import chi_square_pvalue

from genaccel.samplers import build_sampler
from genaccel.samplers.acceptance import gather_token, residual_distribution
from genaccel.samplers.base import SamplerStats, SamplingOptions, draw
from genaccel.samplers.drafting import JacobiDrafter
from genaccel.samplers.speculative import DecodeState, load_sampler_config, shift_rows


class KeptDraftKeepsOldQ(JacobiDrafter):
    """The released SCDMC code's reading (shared/reference/speculative.md §3.7): a draft the coupling keeps
    carries its OLD q into the next test instead of the new p. Not exact; the test below must catch it."""

    def redraw(self, state, probs):
        K = self.tokens.shape[1]
        if K == 0:
            self._old_q = probs
            return draw(probs, state.generator)
        x, q, p = self.tokens, self.q, probs[:, :K]
        keep = torch.rand(x.shape, generator=state.generator) * gather_token(q, x) < gather_token(p, x)
        replaced = draw(torch.cat([residual_distribution(p, q), probs[:, K:]], dim=1), state.generator)
        self._old_q = torch.cat([torch.where(keep[..., None], q, p), probs[:, K:]], dim=1)
        return torch.cat([torch.where(keep, x, replaced[:, :K]), replaced[:, K:]], dim=1)

    def observe(self, state, outcome):
        super().observe(state, outcome)
        self.q = shift_rows(self._old_q, outcome.committed, outcome.probs.shape[1])


def markov_pvalue(sampler, seed: int, bad_source=None) -> float:
    """Chi-square p-value of 40000 sequences of 8 binary tokens from a strongly dependent Markov chain
    (batches of 5000 rows, so rows are ragged) against the exact joint."""
    model = MarkovChainModel(torch.tensor([0.5, 0.5]), torch.tensor([[0.9, 0.1], [0.3, 0.7]]), 8)
    if bad_source is not None:
        sampler.draft_source = lambda m: bad_source
    tokens = torch.cat([sampler.generate(model, torch.zeros(5000, dtype=torch.long),
                                         torch.Generator().manual_seed(seed + i)).tokens for i in range(8)])
    return chi_square_pvalue(sequence_index(tokens, 2), model.joint())


@pytest.mark.parametrize("coupling,window", [("maximal", 8), ("maximal", 5), ("gumbel", 8), ("gumbel", 3)])
def test_coupled_drafts_keep_the_ar_distribution(coupling, window):
    sampler = build_sampler("mcsjd", cfg_scale=1.0, window=window, init="random", draft_coupling=coupling)
    assert markov_pvalue(sampler, seed=70) > 1e-3


def test_the_distribution_test_catches_a_kept_draft_with_its_old_q():
    sampler = build_sampler("mcsjd", cfg_scale=1.0, window=8, init="random")
    assert markov_pvalue(sampler, seed=70, bad_source=KeptDraftKeepsOldQ(8, "random", "maximal")) < 1e-10


@pytest.mark.parametrize("coupling", ["maximal", "gumbel"])
def test_coupled_drafts_are_exact_with_cfg_and_top_k_on_a_gpt(coupling):
    model = tiny_gpt(vocab=4, block=4, seed=11, head_std=0.3)
    sampler = build_sampler("mcsjd", cfg_scale=1.5, top_k=3, window=4, draft_coupling=coupling)
    probs = exact_joint(model, 2, sampler.options)
    tokens = torch.cat([sampler.generate(model, torch.full((1000,), 2), torch.Generator().manual_seed(40 + i)).tokens
                        for i in range(8)])
    assert chi_square_pvalue(sequence_index(tokens, 4), probs) > 1e-3


@pytest.mark.parametrize("coupling", ["maximal", "gumbel"])
@pytest.mark.parametrize("labels", [[0], [0, 1, 2, 3]])
def test_fp32_greedy_equals_ar_token_for_token(coupling, labels):
    model = tiny_gpt(block=64, seed=2)
    labels = torch.tensor(labels)
    ar = build_sampler("ar", temperature=0.0).generate(model, labels).tokens
    out = build_sampler("mcsjd", temperature=0.0, window=8, draft_coupling=coupling).generate(model, labels)
    assert torch.equal(out.tokens, ar)


def coupling_state(model, B: int = 64) -> DecodeState:
    tokens = torch.zeros(B, model.num_image_tokens, dtype=torch.long)
    return DecodeState(model, SamplingOptions(cfg_scale=1.0), torch.zeros(B, dtype=torch.long), tokens, 1,
                       torch.Generator().manual_seed(0), SamplerStats())


@pytest.mark.parametrize("coupling", ["maximal", "gumbel"])
def test_an_unchanged_target_redraws_the_same_drafts(coupling):
    """The point of coupling: where p did not change, the next draft is the old one (independent re-sampling
    would change about 1 - sum p^2 of them)."""
    model = tiny_gpt(block=16)
    state = coupling_state(model)
    source = JacobiDrafter(window=4, init="random", coupling=coupling)
    source.start(state, None)
    p = torch.softmax(torch.randn(64, 4, model.vocab_size, generator=torch.Generator().manual_seed(1)), -1)
    source.propose(state, 3)
    source.tokens, source.q = source.redraw(state, p)[:, :3], p[:, :3]  # drafts drawn from p at their slots
    again = source.redraw(state, p)
    assert torch.equal(again[:, :3], source.tokens)
    assert not torch.equal(draw(p, state.generator)[:, :3], source.tokens)


def test_maximal_coupling_redraws_from_the_new_p():
    """Kept or replaced, the redrawn draft follows the new p whatever the old draft's q was."""
    model = tiny_gpt(vocab=4, block=16)
    B = 20000
    state = coupling_state(model, B)
    source = JacobiDrafter(window=2, init="random", coupling="maximal")
    source.start(state, None)
    q_old = torch.tensor([0.7, 0.1, 0.1, 0.1]).expand(B, 1, 4)
    p_new = torch.tensor([0.1, 0.2, 0.3, 0.4]).expand(B, 2, 4)
    source.tokens, source.q = draw(q_old, state.generator), q_old
    redrawn = source.redraw(state, p_new)[:, 0]
    freq = torch.bincount(redrawn, minlength=4).float() / B
    assert torch.allclose(freq, p_new[0, 0], atol=0.015)
    kept = (redrawn == source.tokens[:, 0]).float().mean()
    assert kept == pytest.approx(1 - 0.6, abs=0.015)  # maximal coupling keeps 1 - TV(q_old, p_new)


def test_coupling_lengthens_accepted_runs():
    model = tiny_gpt(block=64, seed=2, head_std=2.0)
    labels = torch.arange(4)
    nfe = {c: build_sampler("sjd", window=16, draft_coupling=c).generate(model, labels, torch.Generator().manual_seed(0))
           .stats.extra["mean_accepted_length"] for c in ("independent", "maximal", "gumbel")}
    assert nfe["maximal"] > nfe["independent"] and nfe["gumbel"] > nfe["independent"]


def test_options_defaults_and_errors():
    sampler = build_sampler("mcsjd")
    assert (sampler.options.window, sampler.options.draft_coupling) == (32, "maximal")
    with pytest.raises(ValueError, match="draft_coupling"):
        build_sampler("mcsjd", draft_coupling="independent")
    with pytest.raises(ValueError, match="draft_coupling"):
        build_sampler("sjd", draft_coupling="sometimes")
    config = Path(__file__).parents[2] / "configs" / "samplers" / "mcsjd.yaml"
    assert load_sampler_config(config).options == sampler.options


@pytest.mark.parametrize("name", ["gsd", "lantern"])
def test_gsd_and_lantern_draft_with_the_coupled_window_on_request(name):
    model = tiny_gpt(block=16)
    source = build_sampler(name, draft_coupling="gumbel", window=8).draft_source(model)
    assert isinstance(source, JacobiDrafter) and source.coupling == "gumbel" and source.window == 8


def test_reachable_from_sample_and_the_samplers_benchmark():
    from genaccel.bench.samplers import parse_runs
    from genaccel.cli import sampler_flag_specs

    flags = dict(sampler_flag_specs())
    assert flags["--draft-coupling"]["dest"] == "draft_coupling"
    assert parse_runs("mcsjd")["mcsjd"] == ("mcsjd", "llamagen")
