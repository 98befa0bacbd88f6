"""Cost-aware windows (genaccel/samplers/window.py): the choice rule against its definition, the cost cache,
options, and exactness of sjd / sd with windows chosen per step."""

from __future__ import annotations

import json

import pytest
import torch
from spec_helpers import exact_joint, sequence_index, tiny_gpt
from test_speculative import chi_square_pvalue, make_sampler

from genaccel.samplers import build_sampler
from genaccel.samplers.window import (
    PROBE_EVERY,
    MeasuredWindowPolicy,
    WindowPolicy,
    cost_cache_path,
    forward_cost,
    measured_lengths,
    window_arg,
)


def test_policy_maximises_expected_tokens_per_second_by_definition():
    cost = {1: 1.0, 2: 1.1, 4: 1.3, 8: 2.5}
    policy = WindowPolicy(cost, longest=8)
    # linear interpolation between measured points, e.g. L = 3 -> 1.2, L = 6 -> 1.9
    assert torch.allclose(policy.cost, torch.tensor([1.0, 1.1, 1.2, 1.3, 1.6, 1.9, 2.2, 2.5], dtype=torch.float64))
    # rows: 3 drafts accepted of 7 usable, 0 of 7, 7 of 7 (all); 2 of 2 (a row near its image end)
    policy.observe(torch.tensor([3, 0, 7, 2]), torch.tensor([7, 7, 7, 2]), engine_s=0.4, draft_s=0.7, drafted=7)
    tested = [4, 3, 2, 2, 1, 1, 1, 0]  # draft j met a coin when drafts < j were accepted and j < usable
    accepted = [3, 3, 2, 1, 1, 1, 1, 0]
    alpha = [(a + 1) / (t + 2) for a, t in zip(accepted, tested)]
    assert torch.allclose(policy.acceptance(), torch.tensor(alpha, dtype=torch.float64))
    expected = []
    for L in range(1, 9):
        expected.append(1 + sum(torch.tensor(alpha[: j + 1]).prod().item() for j in range(L - 1)))
    rates = [expected[L - 1] / (policy.cost[L - 1].item() + 0.4 + 0.1 * (L - 1)) for L in range(1, 9)]
    assert torch.allclose(policy.rate(), torch.tensor(rates, dtype=torch.float64))
    best = max(range(2, 9), key=lambda L: rates[L - 1])
    assert policy.choose(8) == best
    assert policy.choose(3) == max((2, 3), key=lambda L: rates[L - 1])
    assert policy.choose(1) == 1  # a row with one token left
    policy.steps = PROBE_EVERY - 1
    assert policy.choose(8) == min(8, 2 * best)


def test_cheap_long_windows_and_high_acceptance_choose_long_windows():
    policy = WindowPolicy({1: 1.0, 32: 1.0}, longest=32)
    for _ in range(50):
        policy.observe(torch.tensor([31]), torch.tensor([31]), 0.0, 0.0, 31)
    assert policy.choose(32) == 32
    policy = WindowPolicy({1: 1.0, 32: 8.0}, longest=32)
    for _ in range(50):
        policy.observe(torch.tensor([0]), torch.tensor([31]), 0.0, 0.0, 31)
    assert policy.choose(32) == 2


def test_cost_curve_is_measured_once_and_cached_by_key(tmp_path, monkeypatch):
    monkeypatch.setenv("GENACCEL_CACHE_DIR", str(tmp_path))
    from genaccel.samplers import window

    window._MEMO.clear()
    calls = []
    real = window.measure_forward_cost

    def counting(*args, **kwargs):
        calls.append(args[2])
        return real(*args, **kwargs)

    monkeypatch.setattr(window, "measure_forward_cost", counting)
    model = tiny_gpt(block=16)
    labels = torch.tensor([0, 4])
    lengths = measured_lengths(8)
    assert lengths == [1, 2, 3, 4, 6, 8]
    cost = forward_cost(model, labels, lengths)
    assert list(cost) == lengths and all(b >= a > 0 for a, b in zip(cost.values(), list(cost.values())[1:]))
    data = json.loads(cost_cache_path().read_text())
    (key,) = data
    assert "rows=2" in key and "float32" in key and "cpu" in key and "LlamaGenGPT" in key
    window._MEMO.clear()
    assert forward_cost(model, labels, lengths) == cost  # read back from the file, not re-measured
    assert len(calls) == 1
    forward_cost(model, torch.tensor([0, 1, 4, 4]), lengths)  # another batch: its own key
    assert len(calls) == 2 and len(json.loads(cost_cache_path().read_text())) == 2
    # a longer window measured later (alone) joins the curve without ever costing less than a shorter one
    monkeypatch.setattr(window, "measure_forward_cost", lambda m, b, ls: {L: 1e-9 for L in ls})
    longer = forward_cost(model, labels, measured_lengths(9))
    assert longer[9] == longer[8] == cost[8]


def test_window_options_accept_auto_and_reject_the_rest():
    assert window_arg("auto") == "auto" and window_arg("12") == 12
    with pytest.raises(ValueError, match="integer or 'auto'"):
        window_arg("big")
    for bad in ("fast", 0, 2.5):
        with pytest.raises(ValueError, match="window must lie in \\[1, 1024\\] .* or be 'auto'"):
            build_sampler("sjd", window=bad)
    with pytest.raises(ValueError, match="draft_len must lie in \\[1, 64\\] .* or be 'auto'"):
        build_sampler("sd", draft_len="many")
    assert build_sampler("mcsjd", window="auto").options.window == "auto"


AUTO_CASES = [
    ("sjd", {"window": "auto"}),
    ("sjd", {"window": "auto", "draft_coupling": "maximal", "top_k": 3}),
    ("sd-head", {"draft_len": "auto", "top_p": 0.9}),
]


@pytest.mark.parametrize("kind,options", AUTO_CASES)
def test_auto_windows_keep_exact_samplers_exact(kind, options):
    """Per-row chi-square of the full joint (vocabulary 4, 4 tokens, mixed classes, ragged batches) with the
    window chosen per step (Jacobi: measured rates, blocks capped by the image's end; drafter: a fixed cost
    curve under which the choice varies with the acceptance)."""
    model = tiny_gpt(vocab=4, block=4, seed=11, head_std=0.3)
    sampler = make_sampler(kind, model, cfg_scale=1.5, **options)
    sampler.set_forward_cost({1: 1.0, 2: 1.2, 3: 1.5, 4: 2.0})
    labels = torch.arange(1000) % 4
    outs = [sampler.generate(model, labels, torch.Generator().manual_seed(2000 + i)) for i in range(12)]
    windows = {}
    for out in outs:
        for L, c in out.stats.extra["window_hist"].items():
            windows[L] = windows.get(L, 0) + c
    assert len(windows) >= 2, windows  # the test exercises more than one window
    seqs = sequence_index(torch.cat([o.tokens for o in outs]), model.vocab_size)
    for label in range(4):
        probs = exact_joint(model, label, sampler.options)
        assert chi_square_pvalue(seqs[labels.repeat(12) == label], probs) > 1e-3, label


def test_auto_greedy_equals_ar():
    model = tiny_gpt(block=64, seed=2)
    labels = torch.tensor([0, 1, 2])
    ar = build_sampler("ar", temperature=0.0).generate(model, labels).tokens
    for kind, options in (("sjd", {"window": "auto"}), ("sd-head", {"draft_len": "auto"})):
        sampler = make_sampler(kind, model, temperature=0.0, **options)
        sampler.set_forward_cost({1: 1.0, 64: 3.0} if kind == "sjd" else {1: 1.0, 9: 1.5})
        assert torch.equal(sampler.generate(model, labels).tokens, ar), kind


def test_measured_policy_tries_every_length_then_keeps_the_fastest_and_re_explores():
    """Jacobi windows: each candidate (longest first) runs a block; a block's first WARM steps and steps capped
    below the block's length are not scored; then the best measured tokens/second wins, and every
    EXPLORE_EVERY-th block re-tries the less-tried neighbour of the best."""
    policy = MeasuredWindowPolicy(longest=16)
    assert policy.candidates == [2, 4, 8, 16]
    speed = {2: 1.0, 4: 1.6, 8: 2.0, 16: 1.7}  # tokens per second of each length
    chosen = []
    for _ in range(policy.BLOCK * 20):
        L = policy.choose(cap=16)
        chosen.append(L)
        policy.observe(torch.zeros(1), torch.ones(1), 0.0, 0.0, L - 1, committed=int(speed[L] * 10), step_s=10.0)
    blocks = [chosen[i] for i in range(0, len(chosen), policy.BLOCK)]
    B = policy.BLOCK
    assert blocks[:4] == [16, 8, 4, 2] and all(len(set(chosen[i : i + B])) == 1 for i in range(0, 20 * B, B))
    exploit = [b for i, b in enumerate(blocks[4:], start=4) if i % policy.EXPLORE_EVERY != policy.EXPLORE_EVERY - 1]
    assert set(exploit) == {8}
    # re-exploration: the neighbours of 8 (4 and 16) in turn, the less tried first, longest first among ties
    assert [blocks[7], blocks[15]] == [16, 4] and 2 not in blocks[4:]
    rates = policy.rate()
    assert rates[8] == pytest.approx(2.0) and rates[2] == pytest.approx(1.0)
    # warm-up and capped steps are not scored
    fresh = MeasuredWindowPolicy(longest=8)
    capped_from = fresh.WARM + 3
    for step in range(fresh.BLOCK):
        L = fresh.choose(cap=8 if step < capped_from else 3)
        fresh.observe(torch.zeros(1), torch.ones(1), 0.0, 0.0, L - 1, committed=step + 1, step_s=1.0)
    scored = range(fresh.WARM, capped_from)
    assert fresh.tokens[8] == sum(step + 1 for step in scored) and fresh.seconds[8] == len(scored)


def test_jacobi_auto_uses_measured_rates_and_the_drafter_the_cost_model():
    model = tiny_gpt(block=16, seed=2)
    jacobi = build_sampler("sjd", window="auto")
    jacobi.generate(model, torch.tensor([0]))
    assert isinstance(jacobi._window_policy[1], MeasuredWindowPolicy)
    head = make_sampler("sd-head", model, draft_len="auto")
    head.set_forward_cost({1: 1.0, 9: 1.5})
    head.generate(model, torch.tensor([0]))
    assert isinstance(head._window_policy[1], WindowPolicy)
