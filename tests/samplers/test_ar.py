"""Baseline AR sampler: CFG formula, logits processing against direct computations, seeding, stats."""

import pytest
import torch

from genaccel.models.contract import cfg_labels, combine_cfg
from genaccel.models.llamagen import build_gpt
from genaccel.samplers import available_samplers, build_sampler
from genaccel.samplers.base import SamplingOptions, filter_top_k_top_p, logits_to_probs


def tiny():
    torch.manual_seed(0)
    m = build_gpt(None, dim=64, n_layer=2, n_head=4, vocab_size=32, num_classes=5, block_size=16, multiple_of=32).eval()
    for p in m.parameters():
        torch.nn.init.normal_(p, 0, 0.3)
    return m


def test_cfg_formula_and_batch_layout():
    labels = torch.tensor([3, 1])
    assert cfg_labels(labels, 5, True).tolist() == [3, 1, 5, 5]
    cond, uncond = torch.randn(2, 4, 7), torch.randn(2, 4, 7)
    torch.testing.assert_close(combine_cfg(torch.cat([cond, uncond]), 4.0, True), uncond + 4.0 * (cond - uncond))


def test_greedy_ar_with_cfg_equals_manual_loop_on_teacher_forced_logits():
    model = tiny()
    labels = torch.tensor([2, 4])
    out = build_sampler("ar", cfg_scale=3.0, temperature=0.0).generate(model, labels)
    tokens = torch.zeros(2, 0, dtype=torch.long)
    for t in range(16):
        ext = torch.cat([tokens, torch.zeros(2, 1, dtype=torch.long)], 1)
        c = model.teacher_forced(labels, ext).logits[:, t]
        u = model.teacher_forced(torch.full_like(labels, 5), ext).logits[:, t]
        tokens = torch.cat([tokens, (u + 3.0 * (c - u)).argmax(-1, keepdim=True)], 1)
    assert torch.equal(out.tokens, tokens)
    assert out.stats.nfe == 16 and out.stats.step_compression == 1.0


def test_cfg_interval_switches_to_conditional_logits():
    model = tiny()
    labels = torch.tensor([1])
    full = build_sampler("ar", cfg_scale=5.0, temperature=0.0).generate(model, labels).tokens
    cut = build_sampler("ar", cfg_scale=5.0, temperature=0.0, cfg_interval=3).generate(model, labels).tokens
    cond = build_sampler("ar", cfg_scale=1.0, temperature=0.0).generate(model, labels).tokens
    assert torch.equal(cut[:, :5], full[:, :5])  # tokens 0..cfg_interval+1 are guided
    # after the interval the choice is the conditional argmax given the prefix
    nxt = model.teacher_forced(labels, torch.cat([cut[:, :6], torch.zeros(1, 1, dtype=torch.long)], 1)).logits[:, 6]
    assert int(nxt.argmax()) == int(cut[0, 6])
    assert not torch.equal(full, cond)


def test_seeded_generation_is_reproducible_and_seed_sensitive():
    model = tiny()
    s = build_sampler("ar", cfg_scale=2.0, top_k=10)
    a = s.generate(model, torch.tensor([0, 1]), torch.Generator().manual_seed(1)).tokens
    b = s.generate(model, torch.tensor([0, 1]), torch.Generator().manual_seed(1)).tokens
    c = s.generate(model, torch.tensor([0, 1]), torch.Generator().manual_seed(2)).tokens
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_top_k_top_p_filters_match_direct_definition():
    torch.manual_seed(0)
    logits = torch.randn(3, 20)
    k = filter_top_k_top_p(logits, top_k=5)
    for row, lrow in zip(k, logits):
        kept = set(torch.nonzero(torch.isfinite(row)).flatten().tolist())
        assert kept == set(lrow.topk(5).indices.tolist())
    p = filter_top_k_top_p(logits, top_p=0.6)
    for row, lrow in zip(p, logits):
        probs = lrow.softmax(-1)
        order = probs.argsort(descending=True)
        cum, expected = 0.0, set()
        for i in order.tolist():  # smallest prefix whose mass reaches 0.6
            expected.add(i)
            cum += float(probs[i])
            if cum >= 0.6:
                break
        assert set(torch.nonzero(torch.isfinite(row)).flatten().tolist()) == expected


def test_temperature_and_greedy_probs():
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    torch.testing.assert_close(logits_to_probs(logits, SamplingOptions(temperature=0.5)), (logits / 0.5).softmax(-1))
    assert logits_to_probs(logits, SamplingOptions(temperature=0)).tolist() == [[0.0, 0.0, 1.0]]


@torch.no_grad()
def test_sampled_first_token_follows_guided_distribution():
    model = tiny()
    labels = torch.zeros(4000, dtype=torch.long)
    model_out = build_sampler("ar", cfg_scale=2.0)
    gen = torch.Generator().manual_seed(0)
    # only the first token: shrink the grid by sampling with a 1-token view of the prefill logits
    model.setup_cache(2)
    lg = model.prefill(torch.tensor([0, 5])).logits[:, -1]
    probs = (lg[1] + 2.0 * (lg[0] - lg[1])).softmax(-1)
    from genaccel.samplers.base import draw, target_probs

    tp = target_probs(model.prefill(torch.tensor([0, 5])).logits[:, -1:], model_out.options, 0)[0, 0]
    torch.testing.assert_close(tp, probs)
    counts = torch.bincount(draw(tp.expand(len(labels), -1), gen), minlength=32).float()
    expected = probs * len(labels)
    chi2 = float(((counts - expected) ** 2 / expected.clamp_min(1e-9)).sum())
    assert chi2 < 70  # df = 31; p ~ 1e-4 threshold


def test_bad_options_and_labels():
    with pytest.raises(ValueError, match="unknown sampler 'nope'; available: .*ar"):
        build_sampler("nope")
    with pytest.raises(ValueError, match="cfg_scale must be >= 0"):
        build_sampler("ar", cfg_scale=-1.0)
    with pytest.raises(ValueError, match="unknown option"):
        build_sampler("ar", window=3)
    with pytest.raises(ValueError, match="top_p"):
        build_sampler("ar", top_p=0.0)
    with pytest.raises(ValueError, match="class id 7 out of range"):
        build_sampler("ar").generate(tiny(), torch.tensor([7]))
    assert "ar" in available_samplers()


def test_stats_count_every_target_forward_and_its_time():
    model = tiny()
    stats = build_sampler("ar", cfg_scale=2.0).generate(model, torch.tensor([0, 1]), torch.Generator().manual_seed(0)).stats
    assert stats.nfe == model.num_image_tokens  # prefill + one forward per token after the first
    assert 0 < stats.target_time_s <= stats.wall_time_s and stats.draft_time_s == 0


def test_draw_from_half_precision_probs_is_unbiased_and_skips_zero_mass():
    from genaccel.samplers.base import draw

    probs = torch.tensor([0.5, 0.5], dtype=torch.bfloat16).expand(40000, 2)
    share = draw(probs, torch.Generator().manual_seed(0)).float().mean().item()
    assert abs(share - 0.5) < 0.0075  # 3 sigma
    assert draw(torch.tensor([[0.0, 0.0, 1.0]]), None).item() == 2


@pytest.mark.parametrize("name", ["ar", "sjd", "sd"])
def test_sampling_runs_in_inference_mode_and_hands_back_ordinary_tensors(name):
    """Samplers run under torch.inference_mode (issue #14: per-op cost); what they return (and stream to
    on_complete) can be edited in place, and the model's cache made inside it is replaced, not written in
    place, by a later setup_cache under plain no_grad (an inference tensor cannot be updated outside it)."""
    from genaccel.models.drafter import EagleDrafter

    model = tiny()
    sampler = build_sampler(name, cfg_scale=2.0)
    if name == "sd":
        sampler.set_drafter(EagleDrafter.from_target(model).eval())
    seen, modes = [], []
    real_prefill = model.prefill

    def spying_prefill(*args, **kwargs):
        modes.append(torch.is_inference_mode_enabled())
        return real_prefill(*args, **kwargs)

    model.prefill = spying_prefill
    out = sampler.generate(model, torch.tensor([1, 2]), torch.Generator().manual_seed(0))
    stream = sampler.generate_stream(model, torch.tensor([1, 2, 3]), 2, torch.Generator().manual_seed(0),
                                     on_complete=lambda done: seen.append(done.tokens))
    assert modes and all(modes)
    for tokens in [out.tokens, stream.tokens, *seen]:
        assert not tokens.is_inference()
        tokens[0, 0] = 0  # an in-place edit outside inference mode works
    assert model.layers[0].attention.kv_cache.k_cache.is_inference()
    with torch.no_grad():  # direct use of the model afterwards, outside inference mode
        model.setup_cache(4, 17)
        assert not model.layers[0].attention.kv_cache.k_cache.is_inference()
        model.prefill(cfg_labels(torch.tensor([1, 2]), 5, True))
    first = sampler.generate(model, torch.tensor([1, 2]), torch.Generator().manual_seed(5)).tokens
    assert torch.equal(sampler.generate(model, torch.tensor([1, 2]), torch.Generator().manual_seed(5)).tokens, first)
