"""The `token-shuffle` sampler: (n/s)**2 forwards, each window fed once, the same tokens as a cache-free loop."""

from __future__ import annotations

import pytest
import torch
from spec_helpers import tiny_gpt

from genaccel.models.token_shuffle import (
    TokenShuffleArgs,
    TokenShuffleGPT,
    build_token_shuffle,
    make_identity_shuffle,
    shuffle_tokens,
    unshuffle_tokens,
)
from genaccel.samplers import build_sampler
from genaccel.samplers.token_shuffle import (
    TokenShuffleOptions,
    TokenShuffleSampler,
    sampler_cli_options,
    scheduled_cfg_scale,
)


def tiny_shuffle(grid: int, window: int = 2, seed: int = 0, dim: int = 32,
                 intra_window_head: bool = False) -> TokenShuffleGPT:
    """Random Token-Shuffle model with random (not zero) LM head and residual outputs, so tokens vary."""
    gen = torch.Generator().manual_seed(seed)
    shuffle = TokenShuffleArgs(window=window, intra_window_head=intra_window_head)
    model = build_token_shuffle(None, shuffle, dim=dim, n_layer=1, n_head=2, vocab_size=24,
                                num_classes=3, block_size=grid * grid, multiple_of=32)
    model.init_weights(gen)
    for prm in model.parameters():
        if prm.dim() >= 2:
            torch.nn.init.normal_(prm, 0.0, 0.5, generator=gen)
    return model.eval()


class CountingModel:
    """Wraps a model and records the slots and windows every forward writes."""

    def __init__(self, model):
        self.model, self.slots, self.windows = model, [], []

    def __getattr__(self, name):
        return getattr(self.model, name)

    def forward_tokens(self, tokens, positions, mask=None, rope_positions=None):
        self.slots.append(positions.tolist())
        self.windows.append(tokens.clone())
        return self.model.forward_tokens(tokens, positions, mask, rope_positions)


@pytest.mark.parametrize("window", [1, 2, 4])
def test_one_forward_per_window_prefill_included_and_each_window_fed_once(window):
    n = 8
    model = CountingModel(tiny_shuffle(n, window, dim=32))
    sampler = TokenShuffleSampler(cfg_scale=2.0, top_k=5)
    out = sampler.generate(model, torch.tensor([1, 0]), torch.Generator().manual_seed(0))
    P = (n // window) ** 2
    assert out.stats.nfe == P and out.stats.tokens == n * n
    assert out.stats.step_compression == window * window
    assert out.tokens.shape == (2, n * n)
    assert [slot for step in model.slots for slot in step] == list(range(1, P))  # window p at slot 1 + p, once
    fed = torch.cat([w[:2] for w in model.windows], dim=1)  # the cond rows; uncond rows get the same windows
    assert all(torch.equal(w[:2], w[2:]) for w in model.windows)
    assert torch.equal(fed, shuffle_tokens(out.tokens, window)[:, :-1])  # the fed windows are the output's
    assert all(w.shape == (4, 1, window * window) for w in model.windows)  # [cond; uncond] rows, one window


@pytest.mark.parametrize("P", [1, 4, 7, 64, 144])
def test_half_linear_schedule_matches_its_formula(P):
    w = 4.0
    for p in range(P):
        expected = 1.0 + (w - 1.0) * min(1.0, 2.0 * p / P)
        assert scheduled_cfg_scale(p, P, w, "half-linear") == pytest.approx(expected, abs=1e-12)
        assert scheduled_cfg_scale(p, P, w, "constant") == w
    assert scheduled_cfg_scale(0, P, w, "half-linear") == 1.0


def test_half_linear_schedule_on_a_16x16_grid_at_s2():
    """64 windows: pure conditional at the first, half-way at window 16, the target from window 32 on."""
    values = [scheduled_cfg_scale(p, 64, 5.0, "half-linear") for p in range(64)]
    assert values[0] == 1.0 and values[16] == pytest.approx(3.0) and values[31] < 5.0
    assert all(v == 5.0 for v in values[32:])
    assert all(b > a for a, b in zip(values[:32], values[1:33]))


@torch.no_grad()
def reference_greedy(model: TokenShuffleGPT, labels: torch.Tensor, opts: TokenShuffleOptions) -> torch.Tensor:
    """No cache: before each window, run the teacher-forced pass over the tokens so far (later windows cannot
    reach it through the causal mask) and take the argmax of that window's guided logits."""
    s, n = model.shuffle_window, model.grid_size
    P, per = (n // s) ** 2, s * s
    windows = torch.zeros(labels.shape[0], P, per, dtype=torch.long)
    for p in range(P):
        tokens = unshuffle_tokens(windows, s)
        cond = shuffle_tokens(model.teacher_forced(labels, tokens).logits, s)[:, p]
        logits = cond
        if opts.cfg_scale != 1.0:
            uncond_labels = torch.full_like(labels, model.null_class)
            uncond = shuffle_tokens(model.teacher_forced(uncond_labels, tokens).logits, s)[:, p]
            scale = opts.cfg_scale if opts.cfg_schedule == "constant" else 1 + (opts.cfg_scale - 1) * min(1, 2 * p / P)
            guided = uncond + scale * (cond - uncond)
            active = [opts.cfg_interval < 0 or p * per + k <= opts.cfg_interval + 1 for k in range(per)]
            logits = torch.where(torch.tensor(active)[None, :, None], guided, cond)
        windows[:, p] = logits.argmax(-1)
    return unshuffle_tokens(windows, s)


@pytest.mark.parametrize("window", [1, 2])
@pytest.mark.parametrize("cfg_scale,cfg_interval,schedule",
                         [(1.0, -1, "constant"), (3.0, -1, "constant"), (3.0, -1, "half-linear"),
                          (3.0, 6, "constant"), (0.5, 1, "half-linear")])
def test_greedy_equals_the_cache_free_reference(window, cfg_scale, cfg_interval, schedule):
    model = tiny_shuffle(grid=4, window=window, seed=1)
    labels = torch.tensor([0, 2, 1])
    opts = dict(cfg_scale=cfg_scale, cfg_interval=cfg_interval, cfg_schedule=schedule, temperature=0.0)
    got = TokenShuffleSampler(**opts).generate(model, labels).tokens
    assert torch.equal(got, reference_greedy(model, labels, TokenShuffleOptions(**opts)))


@pytest.mark.parametrize("schedule", ["constant", "half-linear"])
def test_batch_of_4_equals_4_single_runs_in_greedy(schedule):
    model = tiny_shuffle(grid=6, window=2, seed=3)
    labels = torch.tensor([2, 0, 1, 2])
    sampler = TokenShuffleSampler(cfg_scale=4.0, cfg_schedule=schedule, temperature=0.0)
    batched = sampler.generate(model, labels).tokens
    singles = torch.cat([sampler.generate(model, labels[i : i + 1]).tokens for i in range(4)])
    assert torch.equal(batched, singles)


def test_top_k_1_sampling_is_greedy_per_token():
    """With top_k=1 every sampled token is the argmax of its own distribution, whatever the seed."""
    model = tiny_shuffle(grid=4, window=2, seed=4)
    labels = torch.tensor([0, 1])
    greedy = TokenShuffleSampler(cfg_scale=2.0, temperature=0.0).generate(model, labels).tokens
    top1 = TokenShuffleSampler(cfg_scale=2.0, top_k=1).generate(model, labels, torch.Generator().manual_seed(7))
    assert torch.equal(top1.tokens, greedy)


def test_seeded_sampling_is_reproducible_and_tokens_are_in_the_vocabulary():
    model = tiny_shuffle(grid=4, window=2, seed=5)
    sampler = TokenShuffleSampler(cfg_scale=2.0, top_p=0.9, temperature=1.2)
    runs = [sampler.generate(model, torch.tensor([1, 2]), torch.Generator().manual_seed(11)).tokens for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    assert int(runs[0].min()) >= 0 and int(runs[0].max()) < model.vocab_size


def test_options_validate_and_declare_their_flag():
    with pytest.raises(ValueError, match="cfg_schedule must be one of constant, half-linear"):
        TokenShuffleSampler(cfg_schedule="cosine")
    assert TokenShuffleSampler().options.cfg_schedule == "half-linear"
    flags = dict(sampler_cli_options())
    assert flags["--cfg-schedule"]["dest"] == "cfg_schedule"
    assert flags["--cfg-schedule"]["choices"] == ("constant", "half-linear")


@pytest.mark.parametrize("sampler", ["ar", "sjd", "zipar"])
def test_raster_samplers_refuse_a_token_shuffle_model(sampler):
    with pytest.raises(ValueError, match=r"needs a model trained for raster decoding.*TokenShuffleGPT is trained "
                                         r"for shuffle decoding"):
        build_sampler(sampler).generate(tiny_shuffle(grid=4), torch.tensor([0]))


def test_plain_gpt_is_refused():
    with pytest.raises(ValueError, match=r"sampler 'token-shuffle' needs a model trained for shuffle decoding.*"
                                         r"LlamaGenGPT is trained for raster decoding"):
        TokenShuffleSampler().generate(tiny_gpt(), torch.tensor([0]))


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_s1_identity_model_samples_what_ar_samples_on_its_backbone(cfg_scale):
    """s = 1 with identity shuffle modules is LlamaGen: the same seeded tokens as `ar` on the plain GPT."""
    gpt = tiny_gpt(vocab=24, classes=3, block=16, seed=6)
    model = make_identity_shuffle(build_token_shuffle(None, TokenShuffleArgs(window=1), **{
        k: getattr(gpt.args, k) for k in ("dim", "n_layer", "n_head", "vocab_size", "num_classes", "block_size",
                                           "multiple_of")}))
    model.load_state_dict({**model.state_dict(), **gpt.state_dict()})
    labels, opts = torch.tensor([0, 2]), dict(cfg_scale=cfg_scale, top_k=8)
    ours = TokenShuffleSampler(**opts, cfg_schedule="constant").generate(model.eval(), labels,
                                                                         torch.Generator().manual_seed(3))
    theirs = build_sampler("ar", **opts).generate(gpt, labels, torch.Generator().manual_seed(3))
    assert torch.equal(ours.tokens, theirs.tokens) and ours.stats.nfe == theirs.stats.nfe == 16


# ----------------------------------------------------------------------------- intra-window head
class RecordingHead:
    """Wraps a model and records every intra-window head call (the window passed, the part, the logits)."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def __getattr__(self, name):
        return getattr(self.model, name)

    def intra_window_logits(self, state, windows, part=None):
        logits = self.model.intra_window_logits(state, windows, part)
        self.calls.append((windows.clone(), part, logits))
        return logits


def test_sequential_greedy_takes_each_token_as_the_argmax_of_the_head_given_the_earlier_ones():
    model = RecordingHead(tiny_shuffle(4, intra_window_head=True))
    out = TokenShuffleSampler(cfg_scale=1.0, top_k=1, window_sampling="sequential").generate(
        model, torch.tensor([2]), torch.Generator().manual_seed(0))
    windows = shuffle_tokens(out.tokens, 2)[0]  # (P, 4)
    assert len(model.calls) == windows.numel() and out.stats.nfe == windows.shape[0]
    for i, (fed, part, logits) in enumerate(model.calls):
        p, k = divmod(i, 4)
        assert part == k
        assert torch.equal(fed[0, :k], windows[p, :k])  # the head saw exactly the tokens drawn before
        assert windows[p, k] == logits[0].argmax()


def test_sequential_batch_of_three_equals_three_single_runs_greedy_with_cfg():
    model = tiny_shuffle(4, seed=1, intra_window_head=True)
    sampler = TokenShuffleSampler(cfg_scale=3.0, top_k=1, window_sampling="sequential")
    labels = torch.tensor([0, 2, 1])
    batch = sampler.generate(model, labels, torch.Generator().manual_seed(0)).tokens
    singles = [sampler.generate(model, labels[i : i + 1], torch.Generator().manual_seed(0)).tokens
               for i in range(3)]
    assert torch.equal(batch, torch.cat(singles))


def test_sequential_sampling_needs_a_head_and_the_option_is_checked():
    with pytest.raises(ValueError, match="intra-window head"):
        TokenShuffleSampler(window_sampling="sequential").generate(
            tiny_shuffle(4), torch.tensor([0]), torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="window_sampling must be one of"):
        TokenShuffleOptions(window_sampling="joint").validate()
    assert any(flag == "--window-sampling" for flag, _ in sampler_cli_options())
