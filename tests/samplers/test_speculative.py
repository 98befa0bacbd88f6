"""The verify core: exactness, greedy equivalence with AR, batching, rollback, stats and options."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import chisquare
from spec_helpers import exact_joint, sequence_index, tiny_gpt

from genaccel.models.drafter import EagleDrafter
from genaccel.samplers import build_sampler
from genaccel.samplers.acceptance import ExactRule
from genaccel.samplers.base import SamplingOptions, draw
from genaccel.samplers.sd import SDSampler
from genaccel.samplers.sjd import SJDSampler
from genaccel.samplers.speculative import Draft, load_sampler_config, one_hot_q, sampler_cli_options, verify_window


def random_drafter(target, seed: int = 1) -> EagleDrafter:
    torch.manual_seed(seed)
    return EagleDrafter.from_target(target).eval()


def make_sampler(kind: str, target, **options):
    """Samplers under test, with their draft parts built from tiny random models."""
    if kind == "sd-model":
        s = SDSampler(**options)
        s.set_draft_model(tiny_gpt(vocab=target.vocab_size, block=target.num_image_tokens, seed=7, dim=32, n_layer=1))
        return s
    if kind == "sd-head":
        s = SDSampler(**options)
        s.set_drafter(random_drafter(target))
        return s
    if kind in ("lantern", "gsd"):
        s = build_sampler(kind, **{"lantern_k": 8, **options})
        s.set_codebook(torch.nn.functional.normalize(torch.randn(target.vocab_size, 4, generator=torch.Generator().manual_seed(3)), dim=-1))
        if kind == "lantern":
            s.set_drafter(random_drafter(target))
        return s
    return build_sampler(kind, **options)


def chi_square_pvalue(samples: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson test of sample counts against exact probabilities, pooling bins expected below 5."""
    counts = np.bincount(samples.numpy(), minlength=probs.numel()).astype(float)
    expected = probs.numpy() * counts.sum()
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    keep = exp > 0
    if keep.sum() == 1:  # a one-point distribution (e.g. top-p collapses it): any other outcome is impossible
        return float(obs[~keep].sum() == 0)
    return float(chisquare(obs[keep], exp[keep] * obs[keep].sum() / exp[keep].sum()).pvalue)


def sample_many(sampler, model, label: int, total: int, batch: int, seed: int) -> torch.Tensor:
    out = []
    for i in range(total // batch):
        gen = torch.Generator().manual_seed(seed + i)
        out.append(sampler.generate(model, torch.full((batch,), label), gen).tokens)
    return sequence_index(torch.cat(out), model.vocab_size)


EXACT_CASES = [
    ("sjd", {"window": 3}),
    ("sjd", {"window": 4, "init": "repeat_horizon", "top_k": 3}),
    ("sd-model", {"draft_len": 2, "top_p": 0.8}),
    ("sd-head", {"draft_len": 3, "cfg_interval": 1}),
    ("sjd", {"window": 4, "draft_coupling": "maximal"}),
    ("sjd", {"window": 3, "draft_coupling": "gumbel", "top_k": 3}),
    ("sd-head", {"draft_len": 3, "draft_stop": 0.4}),  # chains stop at 1, 2 or 3 drafts by the drafts' q
    ("sd-model", {"draft_len": 3, "draft_stop": 0.3, "top_k": 3}),
    ("sd-head", {"draft_len": 3, "draft_guidance": "cond", "top_p": 0.9}),  # q from the conditional half only
    ("sd-model", {"draft_len": 2, "draft_guidance": "cond", "cfg_interval": 1}),
    ("sd-head", {"draft_len": 3, "drafter_precision": "fp32", "top_k": 3}),  # the other sd-head cases: auto = int8
    ("sd-head", {"draft_len": 2, "drafter_precision": "bf16", "draft_guidance": "cond"}),
]


@pytest.mark.parametrize("kind,options", EXACT_CASES)
def test_exact_samplers_preserve_the_target_distribution(kind, options):
    model = tiny_gpt(vocab=4, block=4, seed=11, head_std=0.05)
    sampler = make_sampler(kind, model, cfg_scale=1.5, **options)
    probs = exact_joint(model, 1, sampler.options)
    samples = sample_many(sampler, model, 1, total=6000, batch=1000, seed=100)
    assert chi_square_pvalue(samples, probs) > 1e-3


RAGGED_CASES = [
    ("sjd", {"window": 3}),
    ("sjd", {"window": 4, "init": "repeat_horizon", "cfg_interval": 1}),
    ("sd-model", {"draft_len": 2, "top_p": 0.8}),
    ("sd-head", {"draft_len": 3, "top_k": 3}),
    ("sjd", {"window": 4, "draft_coupling": "maximal", "top_p": 0.9}),
    ("sjd", {"window": 3, "draft_coupling": "gumbel", "init": "repeat_horizon"}),
    ("sd-head", {"draft_len": 3, "draft_stop": 0.4}),  # rows of a batch stop their chains at different drafts
    ("sd-head", {"draft_len": 3, "draft_guidance": "cond", "draft_stop": 0.4}),
    ("sd-model", {"draft_len": 2, "draft_guidance": "cond"}),
    ("sd-head", {"draft_len": 3, "drafter_precision": "fp32", "draft_stop": 0.4}),  # the others: auto = int8
]


@pytest.mark.parametrize("kind,options", RAGGED_CASES)
def test_ragged_batch_rows_each_follow_their_own_target_distribution(kind, options):
    """Rows of one batch carry different classes and stand at different tokens (each commits its own
    accepted length, complete rows leave the batch); every row must still follow its class's AR joint."""
    model = tiny_gpt(vocab=4, block=4, seed=11, head_std=0.3)
    sampler = make_sampler(kind, model, cfg_scale=1.5, **options)
    labels = torch.arange(1000) % 4
    tokens = torch.cat([sampler.generate(model, labels, torch.Generator().manual_seed(1000 + i)).tokens
                        for i in range(12)])
    seqs = sequence_index(tokens, model.vocab_size)
    for label in range(4):
        probs = exact_joint(model, label, sampler.options)
        assert chi_square_pvalue(seqs[labels.repeat(12) == label], probs) > 1e-3, label


class AcceptAll(ExactRule):
    """A broken rule (always accepts): the distribution test must catch it."""

    name: str = "accept-all"

    def ratio(self, target, q, x):
        return torch.ones_like(x, dtype=torch.float32)


def test_draw_is_exact_never_draws_a_filtered_token_and_takes_unnormalised_rows():
    """``draw`` (inverse CDF, one uniform per row): chi-square against each row's distribution over 40000
    rows, with probability-0 tokens (as top-k leaves them) never drawn, tiny but positive ones still drawn at
    their rate, and rows that do not sum to 1 sampled as normalised."""
    gen = torch.Generator().manual_seed(0)
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.25, 0.25, 0.0],
                          [1e-3, 0.0, 0.0, 0.0, 0.0, 0.999],
                          [2.0, 1.0, 1.0, 0.0, 0.0, 0.0]])  # unnormalised
    n = 40000
    tokens = draw(probs[:, None].expand(3, n, 6), gen)
    assert tokens.shape == (3, n)
    for row in range(3):
        target = probs[row] / probs[row].sum()
        assert not bool((target[tokens[row]] == 0).any()), row
        assert chi_square_pvalue(tokens[row], target.double()) > 1e-3, row
    assert int((tokens[1] == 0).sum()) > 10  # p = 1e-3 of 40000: ~40 expected
    one_hot = torch.zeros(5, 1024)
    one_hot[torch.arange(5), torch.tensor([0, 1, 511, 1022, 1023])] = 1.0
    assert draw(one_hot, gen).tolist() == [0, 1, 511, 1022, 1023]


def test_draft_stop_drafts_fewer_tokens_and_greedy_still_equals_ar():
    """``--draft-stop``: chains end once the drafts' running q product falls below the threshold, so fewer
    drafter calls run and fewer drafts are tested; greedy output is still AR's token for token."""
    model = tiny_gpt(block=25, seed=2)
    labels = torch.tensor([0, 1, 2, 3])
    full = make_sampler("sd-head", model, draft_len=4).generate(model, labels, torch.Generator().manual_seed(0))
    short = make_sampler("sd-head", model, draft_len=4, draft_stop=0.5).generate(model, labels,
                                                                               torch.Generator().manual_seed(0))
    assert short.stats.draft_forwards < full.stats.draft_forwards
    assert min(short.stats.extra["window_hist"]) < 5  # some steps verified fewer than 4 drafts
    ar = build_sampler("ar", temperature=0.0).generate(model, labels).tokens
    greedy = make_sampler("sd-head", model, draft_len=4, draft_stop=0.5, temperature=0.0).generate(model, labels)
    assert torch.equal(greedy.tokens, ar)
    with pytest.raises(ValueError, match="draft_stop must lie in"):
        build_sampler("sd", draft_stop=1.0)


@pytest.mark.parametrize("kind", ["sd-head", "sd-model"])
def test_draft_guidance_cond_runs_the_drafter_on_the_conditional_half_and_greedy_still_equals_ar(kind):
    """``--draft-guidance cond``: drafter calls carry B rows instead of the 2B of both CFG halves, the
    drafts differ from CFG-combined drafting (q is the unguided distribution), and greedy output, in one
    batch and as a continuous-batching stream, is still AR's token for token."""
    model = tiny_gpt(block=25, seed=2)
    labels = torch.tensor([0, 1, 2, 3])
    rows = {}
    for guidance in ("cfg", "cond"):
        sampler = make_sampler(kind, model, draft_len=3, draft_guidance=guidance)
        drafter = sampler._drafter if kind == "sd-head" else sampler._draft_model
        seen = []
        call = drafter.decode if kind == "sd-head" else drafter.forward_tokens
        def spy(tokens, *args, _call=call, _seen=seen):
            _seen.append(tokens.shape[0])
            return _call(tokens, *args)
        if kind == "sd-head":
            drafter.decode = spy
        else:
            drafter.forward_tokens = spy
        out = sampler.generate(model, labels, torch.Generator().manual_seed(0))
        rows[guidance] = (set(seen), out.tokens)
    # both halves (2B rows, fewer as complete images leave the batch) against the conditional half (B rows)
    assert max(rows["cfg"][0]) == 8 and all(r % 2 == 0 for r in rows["cfg"][0]) and max(rows["cond"][0]) == 4
    assert not torch.equal(rows["cfg"][1], rows["cond"][1])
    ar = build_sampler("ar", temperature=0.0).generate(model, torch.arange(10) % 4).tokens
    greedy = make_sampler(kind, model, draft_len=3, draft_guidance="cond", temperature=0.0)
    assert torch.equal(greedy.generate(model, torch.arange(10) % 4).tokens, ar)
    assert torch.equal(greedy.generate_stream(model, torch.arange(10) % 4, 4).tokens, ar)
    with pytest.raises(ValueError, match="draft_guidance must be one of"):
        build_sampler("sd", draft_guidance="uncond")


def test_distribution_test_detects_a_broken_rule():
    model = tiny_gpt(vocab=4, block=4, seed=11, head_std=0.05)
    sampler = SJDSampler(cfg_scale=1.5, window=3)
    sampler.acceptance_rule = lambda m: AcceptAll()
    probs = exact_joint(model, 1, sampler.options)
    assert chi_square_pvalue(sample_many(sampler, model, 1, 6000, 1000, 100), probs) < 1e-6


@pytest.mark.parametrize("kind", ["sjd", "sd-model", "sd-head"])
@pytest.mark.parametrize("labels", [[0], [0, 1, 2, 3]])
def test_fp32_greedy_equals_ar_token_for_token(kind, labels):
    model = tiny_gpt(block=64, seed=2)
    labels = torch.tensor(labels)
    ar = build_sampler("ar", temperature=0.0).generate(model, labels).tokens
    out = make_sampler(kind, model, temperature=0.0).generate(model, labels)
    assert torch.equal(out.tokens, ar)


def test_greedy_drafts_from_the_target_itself_are_all_accepted():
    model = tiny_gpt(block=64, seed=2)
    sampler = SDSampler(temperature=0.0, draft_len=4)
    sampler.set_draft_model(tiny_gpt(block=64, seed=2))
    out = sampler.generate(model, torch.tensor([0, 1]))
    assert out.stats.extra["accepted_length_hist"] == {5: 24, 3: 2}  # per row: 1 + 12 * 5 + 3 = 64 tokens
    assert out.stats.nfe == 14


def test_sjd_saves_target_forwards_on_one_row():
    model = tiny_gpt(block=64, seed=2)
    out = build_sampler("sjd", temperature=0.0).generate(model, torch.tensor([0]))
    assert out.stats.nfe < 64


@pytest.mark.parametrize("kind", ["sjd", "gsd", "lantern", "sd-model", "sd-head"])
def test_greedy_batch_of_four_equals_four_single_runs(kind):
    model = tiny_gpt(block=64, seed=3)
    labels = torch.tensor([3, 0, 2, 1])
    sampler = make_sampler(kind, model, temperature=0.0)
    batched = sampler.generate(model, labels).tokens
    singles = torch.cat([sampler.generate(model, labels[i : i + 1]).tokens for i in range(4)])
    assert torch.equal(batched, singles)


def test_rows_commit_their_own_accepted_lengths():
    """Greedy drafts from a draft model are deterministic, so a batch must accept exactly what its rows
    accept alone, and need as many forwards as its slowest row (not the batch minimum's many more)."""
    model = tiny_gpt(block=64, seed=3)
    labels = torch.tensor([3, 0, 2, 1])
    sampler = make_sampler("sd-model", model, temperature=0.0, draft_len=4)
    batched = sampler.generate(model, labels)
    singles = [sampler.generate(model, labels[i : i + 1]) for i in range(4)]
    total: dict[int, int] = {}
    for single in singles:
        for a, c in single.stats.extra["accepted_length_hist"].items():
            total[a] = total.get(a, 0) + c
    assert batched.stats.extra["accepted_length_hist"] == total
    assert batched.stats.nfe == max(single.stats.nfe for single in singles)
    assert batched.stats.extra["row_verify_steps"] == sum(single.stats.nfe - 1 for single in singles)
    assert torch.equal(batched.tokens, torch.cat([single.tokens for single in singles]))


class NoRowSelection:
    """Wraps a GPT and hides ``select_rows``: complete rows must then stay in the batch, committing nothing."""

    def __init__(self, model):
        self.model = model

    def __getattr__(self, name):
        if name == "select_rows":
            raise AttributeError(name)
        return getattr(self.model, name)


@pytest.mark.parametrize("kind", ["sjd", "sd-head"])
def test_models_without_row_selection_keep_complete_rows(kind):
    model = tiny_gpt(block=64, seed=3)
    labels = torch.tensor([3, 0, 2, 1])
    sampler = make_sampler(kind, model, temperature=0.0)
    dropped = sampler.generate(model, labels)
    kept = sampler.generate(NoRowSelection(model), labels)
    assert torch.equal(kept.tokens, dropped.tokens)  # (sjd's random draft inits differ, greedy tokens do not)


def test_verify_window_limit_stops_a_row_and_takes_the_bonus_there():
    V = 3
    p = torch.zeros(2, 4, V)
    p[..., 0] = 1.0
    p[1, 2] = torch.tensor([0.0, 0.0, 1.0])  # row 1's bonus position after two drafts
    draft = Draft(tokens=torch.zeros(2, 3, dtype=torch.long), q=one_hot_q(torch.zeros(2, 3, dtype=torch.long), V))
    v = verify_window(p, draft, ExactRule(), torch.Generator().manual_seed(0), limit=torch.tensor([3, 2]))
    assert v.accepted.tolist() == [4, 3]
    assert v.tokens[1, 2] == 2


class PoisonedRollback:
    """Wraps a GPT so every rollback overwrites the discarded cache slots with large garbage."""

    def __init__(self, model):
        self.model = model

    def __getattr__(self, name):
        return getattr(self.model, name)

    def rollback(self, length) -> None:
        self.model.rollback(length)
        rows = self.model.layers[0].attention.kv_cache.k_cache.shape[0]
        lengths = torch.as_tensor(length).expand(rows)  # one length, or one per row (ragged batches)
        for layer in self.model.layers:
            cache = layer.attention.kv_cache
            for buf in (cache.k_cache, cache.v_cache):
                stale = torch.arange(buf.shape[2])[None, :] >= lengths[:, None]  # (rows, slots)
                buf.copy_(torch.where(stale[:, None, :, None], 1e4 * torch.randn_like(buf), buf))


@pytest.mark.parametrize("kind", ["sjd", "sd-model"])
def test_rollback_leaves_no_stale_cache_influence(kind):
    model = tiny_gpt(block=64, seed=4)
    labels = torch.tensor([1, 2])
    ar = build_sampler("ar", temperature=0.0).generate(model, labels).tokens
    sampler = make_sampler(kind, model, temperature=0.0)
    if kind == "sd-model":
        sampler.set_draft_model(PoisonedRollback(sampler._draft_model))
    out = sampler.generate(PoisonedRollback(model), labels)
    assert torch.equal(out.tokens, ar)


def test_stats_report_nfe_compression_and_histograms():
    model = tiny_gpt(block=64, seed=5)
    out = build_sampler("sjd", temperature=0.0, window=8).generate(model, torch.tensor([0]))
    s = out.stats
    hist = s.extra["accepted_length_hist"]
    assert sum(hist.values()) == s.nfe - 1  # one verify step per target forward after prefill
    assert sum(a * c for a, c in hist.items()) == 64 - 1  # token 0 comes from prefill
    assert s.step_compression == pytest.approx(64 / s.nfe)
    assert s.step_compression > 1.0
    assert max(hist) <= 8
    assert s.target_time_s > 0 and s.draft_time_s >= 0 and s.wall_time_s >= s.target_time_s


@pytest.mark.parametrize("name,options,needle", [
    ("sjd", {"window": 0}, "window"),
    ("sjd", {"init": "diagonal"}, "init"),
    ("sjd", {"group_size": 5}, "unknown option"),
    ("gsd", {"group_size": 0}, "group_size"),
    ("gsd", {"prob_threshold": 1.5}, "prob_threshold"),
    ("lantern", {"lantern_delta": -1.0}, "lantern_delta"),
    ("lantern", {"drafter": "/nonexistent.safetensors"}, "drafter file not found"),
    ("sd", {"draft_len": 0}, "draft_len"),
    ("sd", {"drafter_precision": "fp16"}, "drafter_precision must be one of"),
    ("lantern", {"drafter_precision": "int4"}, "drafter_precision must be one of"),
    ("sd", {"drafter_precision": "int8", "draft_model": __file__}, "applies to the drafter head"),
])
def test_bad_options_give_one_clear_error(name, options, needle):
    with pytest.raises(ValueError, match=needle):
        build_sampler(name, **options)


def test_cli_option_dests_are_options_fields():
    fields = set()
    for name in ("sjd", "mcsjd", "gsd", "lantern", "sd"):
        fields |= set(build_sampler(name).Options.__dataclass_fields__)
    dests = {kw["dest"] for _, kw in sampler_cli_options()}
    assert dests <= fields
    assert dests.isdisjoint(SamplingOptions.__dataclass_fields__)


@pytest.mark.parametrize("name", ["ar", "sjd", "mcsjd", "gsd", "lantern", "sd"])
def test_sampler_configs_hold_the_defaults(name):
    sampler = load_sampler_config(Path(__file__).parents[2] / "configs" / "samplers" / f"{name}.yaml")
    assert sampler.name == name
    assert sampler.options == build_sampler(name).options
    assert load_sampler_config(Path(__file__).parents[2] / "configs" / "samplers" / f"{name}.yaml",
                               cfg_scale=2.0, temperature=None).options.cfg_scale == 2.0


def test_codebook_size_mismatch_is_reported():
    model = tiny_gpt(block=16)
    sampler = build_sampler("gsd")
    sampler.set_codebook(torch.randn(7, 4))
    with pytest.raises(ValueError, match="vocab_size 32"):
        sampler.generate(model, torch.tensor([0]))


def test_forwards_per_image_of_a_ragged_batch_is_each_images_own_count():
    """A complete image leaves a ragged batch: its forwards are prefill + its own verify steps, which for a
    greedy batch (rows = their single runs) average the single runs' NFE, below the batch's NFE."""
    model = tiny_gpt(block=64, seed=2)
    labels = torch.tensor([0, 1, 2, 3])
    sampler = make_sampler("sjd", model, temperature=0.0, window=8)
    batch = sampler.generate(model, labels).stats
    singles = [sampler.generate(model, label[None]).stats for label in labels]
    assert batch.forwards_per_image == pytest.approx(sum(s.nfe for s in singles) / len(singles))
    assert all(s.forwards_per_image == s.nfe for s in singles)
    assert batch.forwards_per_image <= batch.nfe
    ar = build_sampler("ar").generate(model, labels).stats
    assert ar.forwards_per_image == ar.nfe == model.num_image_tokens


class CountingRule(ExactRule):
    """The exact rule, counting how often the verify core builds a residual."""

    residuals = 0

    def residual(self, p, target, q, x):
        self.residuals += 1
        return super().residual(p, target, q, x)


@pytest.mark.parametrize("all_accepted", [True, False])
def test_verify_window_builds_a_residual_only_when_some_row_rejects(all_accepted):
    """When every row accepts all drafts it may (q = p here, ratio 1), the step draws only bonus tokens from
    p after each row's last accepted draft, with the same coins as before, and builds no residual; one
    rejecting row (its draft outside p's support) brings the residual back for the batch."""
    gen = torch.Generator().manual_seed(0)
    B, K, V = 3, 4, 7
    p = torch.softmax(torch.randn(B, K + 1, V, generator=gen), -1)
    q = p[:, :K].clone()
    x = torch.multinomial(q.reshape(-1, V), 1, generator=gen).view(B, K)
    limit = torch.tensor([4, 2, 0])
    if not all_accepted:
        p[1, 0, x[1, 0]] = 0.0  # row 1's first draft is impossible under p: rejected, ratio 0
        p[1, 0] /= p[1, 0].sum()
    rule = CountingRule()
    out = verify_window(p, Draft(tokens=x, q=q), rule, torch.Generator().manual_seed(5), limit)
    coins = torch.Generator().manual_seed(5)
    torch.rand(B, K, generator=coins)  # the verification coins come first
    if all_accepted:
        assert rule.residuals == 0
        assert out.accepted.tolist() == [5, 3, 1]
        bonus = draw(p[torch.arange(B), limit], coins)
        assert torch.equal(out.tokens[torch.arange(B), limit], bonus)
        assert all(torch.equal(out.tokens[b, : limit[b]], x[b, : limit[b]]) for b in range(B))
    else:
        assert rule.residuals == 1
        assert out.accepted[1] == 1 and out.tokens[1, 0] != x[1, 0]
