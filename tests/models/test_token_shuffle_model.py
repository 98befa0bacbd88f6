"""Token-Shuffle model: window layout, s = 1 is LlamaGen exactly, the cache equals the teacher-forced pass, loading."""

from __future__ import annotations

import json

import pytest
import torch

from genaccel.models import CheckpointError
from genaccel.models.llamagen import LlamaGenGPT, ModelArgs, build_gpt, precompute_freqs_cis_2d
from genaccel.models.token_shuffle import (
    TokenShuffleArgs,
    TokenShuffleGPT,
    build_token_shuffle,
    export_metadata,
    load_token_shuffle,
    make_identity_shuffle,
    shuffle_tokens,
    unshuffle_tokens,
)
from genaccel.utils.io import save_safetensors

BACKBONE = dict(dim=32, n_layer=2, n_head=2, vocab_size=24, num_classes=3, multiple_of=32)


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_shuffle(grid: int = 4, window: int = 2, seed: int = 0, intra_window_head: bool = False,
                 **kw) -> TokenShuffleGPT:
    """Random Token-Shuffle model whose zero-initialised parts (LM head, residual outputs) are random too."""
    gen = torch.Generator().manual_seed(seed)
    shuffle = TokenShuffleArgs(window=window, intra_window_head=intra_window_head)
    model = build_token_shuffle(None, shuffle, **{**BACKBONE, "block_size": grid * grid, **kw})
    model.init_weights(gen)
    for prm in model.parameters():
        if prm.dim() >= 2:
            torch.nn.init.normal_(prm, 0.0, 0.3, generator=gen)
    return model.eval()


def random_tokens(batch: int, grid: int, seed: int = 1, vocab: int = 24) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, grid * grid), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- layout
@pytest.mark.parametrize("window", [1, 2, 4])
def test_shuffle_and_unshuffle_are_exact_inverses(window):
    n = 8
    tokens = random_tokens(3, n, seed=window, vocab=1000)
    windows = shuffle_tokens(tokens, window)
    assert windows.shape == (3, (n // window) ** 2, window * window)
    assert torch.equal(unshuffle_tokens(windows, window), tokens)
    assert torch.equal(shuffle_tokens(unshuffle_tokens(windows, window), window), windows)
    per_token = torch.randn(3, n * n, 5)  # trailing dimensions (logits, hidden) ride along
    assert torch.equal(unshuffle_tokens(shuffle_tokens(per_token, window), window), per_token)


@pytest.mark.parametrize("window", [1, 2, 4])
def test_window_layout_is_raster_over_windows_and_row_major_inside(window):
    """Part k = i * s + j of window p = (p_r, p_c) is fine cell (p_r * s + i, p_c * s + j), one cell at a time."""
    n = 8
    m = n // window
    cells = torch.arange(n * n)[None]
    windows = shuffle_tokens(cells, window)[0]
    for p in range(m * m):
        for k in range(window * window):
            (p_r, p_c), (i, j) = divmod(p, m), divmod(k, window)
            assert int(windows[p, k]) == (p_r * window + i) * n + (p_c * window + j)


def test_window_must_divide_the_grid_and_dim():
    with pytest.raises(ValueError, match="must divide the token grid side 6"):
        build_token_shuffle(None, TokenShuffleArgs(window=4), **BACKBONE, block_size=36)
    with pytest.raises(ValueError, match=r"dim 32 must be divisible by window\*\*2 = 64"):
        build_token_shuffle(None, TokenShuffleArgs(window=8), **BACKBONE, block_size=64)


def test_contract_attributes_count_tokens_and_rope_is_on_the_coarse_grid():
    model = tiny_shuffle(grid=8, window=2)
    assert (model.grid_size, model.num_image_tokens, model.tokens_per_position) == (8, 64, 4)
    assert (model.position_grid, model.num_positions, model.decoding_order) == (4, 16, "shuffle")
    expected = precompute_freqs_cis_2d(4, model.args.head_dim, model.args.rope_base, model.cls_token_num)
    assert torch.equal(model.freqs_cis, expected)


def test_backbone_keys_are_llamagens_plus_the_shuffle_modules():
    model = tiny_shuffle(grid=4)
    gpt = build_gpt(None, **BACKBONE, block_size=16)
    added = set(model.state_dict()) - set(gpt.state_dict())
    assert set(gpt.state_dict()) <= set(model.state_dict())
    assert {k.split(".")[0] for k in added} == {"shuffle_proj", "shuffle_mlps", "unshuffle_mlps", "unshuffle_proj"}
    assert model.shuffle_proj.weight.shape == (8, 32) and model.unshuffle_proj.weight.shape == (32, 8)
    assert len(model.shuffle_mlps) == 2 and len(model.unshuffle_mlps) == 2


def test_fresh_residual_blocks_are_identities():
    model = build_token_shuffle(None, **BACKBONE, block_size=16)
    model.init_weights(torch.Generator().manual_seed(0))
    x = torch.randn(2, 3, 32)
    for block in [*model.shuffle_mlps, *model.unshuffle_mlps]:
        assert torch.equal(block(x), x)


# ----------------------------------------------------------------------------- s = 1 is LlamaGen
def gpt_and_identity_shuffle(grid: int = 4) -> tuple[LlamaGenGPT, TokenShuffleGPT]:
    gpt = build_gpt(None, **BACKBONE, block_size=grid * grid)
    gen = torch.Generator().manual_seed(3)
    for prm in gpt.parameters():
        torch.nn.init.normal_(prm, 0.0, 0.3, generator=gen)
    model = tiny_shuffle(grid=grid, window=1, seed=4)  # random shuffle modules, then made the identity
    missing, unexpected = model.load_state_dict(gpt.state_dict(), strict=False)
    assert not unexpected and all(k.startswith(("shuffle_", "unshuffle_")) for k in missing)
    return gpt.eval(), make_identity_shuffle(model)


@torch.no_grad()
def test_s1_with_identity_shuffle_gives_exactly_llamagens_logits():
    gpt, model = gpt_and_identity_shuffle()
    labels, tokens = torch.tensor([0, 2, 3]), random_tokens(3, 4)
    ours, theirs = model.teacher_forced(labels, tokens), gpt.teacher_forced(labels, tokens)
    assert torch.equal(ours.logits, theirs.logits)
    assert torch.equal(ours.hidden, theirs.hidden)


@torch.no_grad()
def test_s1_with_identity_shuffle_matches_llamagen_through_the_cache():
    gpt, model = gpt_and_identity_shuffle()
    labels, tokens = torch.tensor([1, 0]), random_tokens(2, 4, seed=5)
    for m in (gpt, model):
        m.setup_cache(2)
    assert torch.equal(model.prefill(labels).logits[:, :, 0], gpt.prefill(labels).logits)
    for t in range(15):
        slot = torch.tensor([1 + t])
        ours = model.forward_tokens(tokens[:, t : t + 1, None], slot).logits[:, :, 0]
        assert torch.equal(ours, gpt.forward_tokens(tokens[:, t : t + 1], slot).logits)


def test_identity_needs_s1():
    with pytest.raises(ValueError, match="only an s = 1"):
        make_identity_shuffle(tiny_shuffle(window=2))


# ----------------------------------------------------------------------------- cache path
@pytest.mark.parametrize("window", [1, 2, 4])
@torch.no_grad()
def test_prefill_then_window_by_window_equals_teacher_forced(window):
    grid = 8 if window == 4 else 4
    model = tiny_shuffle(grid=grid, window=window, seed=window)
    labels, tokens = torch.tensor([2, 0, 1]), random_tokens(3, grid, seed=6)
    windows = shuffle_tokens(tokens, window)
    model.setup_cache(3)
    steps = [model.prefill(labels).logits[:, -1]]
    for p in range(model.num_positions - 1):
        steps.append(model.forward_tokens(windows[:, p : p + 1], torch.tensor([1 + p])).logits[:, 0])
    cached = unshuffle_tokens(torch.stack(steps, dim=1), window)
    torch.testing.assert_close(cached, model.teacher_forced(labels, tokens).logits, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_all_windows_in_one_forward_equal_teacher_forced_and_shapes_follow_the_contract():
    model = tiny_shuffle(grid=4, window=2, seed=7)
    labels, tokens = torch.tensor([1, 2]), random_tokens(2, 4, seed=8)
    windows = shuffle_tokens(tokens, 2)
    model.setup_cache(2)
    first = model.prefill(labels)
    rest = model.forward_tokens(windows[:, :-1], 1 + torch.arange(3))
    assert rest.logits.shape == (2, 3, 4, 24) and rest.hidden.shape == (2, 3, 4, 32)
    cached = unshuffle_tokens(torch.cat([first.logits[:, -1:], rest.logits], dim=1), 2)
    torch.testing.assert_close(cached, model.teacher_forced(labels, tokens).logits, atol=1e-4, rtol=1e-4)


def test_forward_tokens_refuses_unfused_tokens():
    model = tiny_shuffle(grid=4, window=2)
    model.setup_cache(1)
    model.prefill(torch.tensor([0]))
    with pytest.raises(ValueError, match=r"takes windows \(B, L, 4\)"):
        model.forward_tokens(torch.zeros(1, 1, dtype=torch.long), torch.tensor([1]))


# ----------------------------------------------------------------------------- loading
def test_export_round_trips_strictly_with_its_metadata(tmp_path):
    model = tiny_shuffle(grid=4, window=2, seed=9)
    path = save_safetensors(model.state_dict(), tmp_path / "ts.safetensors", metadata=export_metadata(model))
    loaded = load_token_shuffle(path)
    assert isinstance(loaded, TokenShuffleGPT) and loaded.shuffle_args == model.shuffle_args
    assert loaded.args == model.args
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)
    meta = export_metadata(model)
    assert (meta["family"], meta["tokens_per_position"], meta["shuffle_window"]) == ("token-shuffle", "4", "2")


def test_plain_gpt_file_is_refused_with_the_fix(tmp_path):
    gpt = build_gpt(None, **BACKBONE, block_size=16)
    config = {k: getattr(gpt.args, k) for k in ModelArgs.field_names()}
    path = save_safetensors(gpt.state_dict(), tmp_path / "gpt.safetensors", metadata={"config": json.dumps(config)})
    with pytest.raises(CheckpointError, match="not a genaccel Token-Shuffle export.*--model llamagen"):
        load_token_shuffle(path)


def test_wrong_window_in_metadata_names_the_one_the_weights_have(tmp_path):
    model = tiny_shuffle(grid=4, window=2)
    meta = export_metadata(model)
    meta["token_shuffle"] = '{"window": 1, "shuffle_blocks": 2, "unshuffle_blocks": 2}'
    path = save_safetensors(model.state_dict(), tmp_path / "bad.safetensors", metadata=meta)
    with pytest.raises(CheckpointError, match=r"window\*\*2 = 4, shuffle_blocks=2, unshuffle_blocks=2"):
        load_token_shuffle(path)


# ----------------------------------------------------------------------------- intra-window head
def head_model(seed: int = 0, random_head: bool = True) -> TokenShuffleGPT:
    """A random s = 2 model with an intra-window head; ``random_head=False`` leaves the head at its zero init."""
    model = tiny_shuffle(seed=seed, intra_window_head=True)
    if not random_head:
        with torch.no_grad():
            model.intra_window.down.weight.zero_()
    return model


def test_intra_window_part_k_reads_only_the_earlier_tokens_of_its_window():
    model = head_model()
    state = torch.randn(2, 3, 4, 32, generator=torch.Generator().manual_seed(1))
    windows = torch.randint(0, 24, (2, 3, 4), generator=torch.Generator().manual_seed(2))
    base = model.intra_window_logits(state, windows)
    for k in range(4):
        changed = windows.clone()
        changed[..., k:] = (changed[..., k:] + 5) % 24  # tokens k.. of the window
        again = model.intra_window_logits(state, changed)
        assert torch.equal(again[..., : k + 1, :], base[..., : k + 1, :])  # parts <= k do not read them
        if k < 3:
            assert not torch.allclose(again[..., k + 1 :, :], base[..., k + 1 :, :])  # later parts do
        assert torch.allclose(model.intra_window_logits(state, windows, k), base[..., k, :], atol=1e-5)


def test_a_fresh_intra_window_head_gives_the_independent_logits():
    model = head_model(random_head=False)  # intra_window.down at its zero init
    labels = torch.tensor([0, 2])
    tokens = torch.randint(0, 24, (2, 16), generator=torch.Generator().manual_seed(3))
    out = model.teacher_forced(labels, tokens)
    assert torch.allclose(out.extra["sequential_logits"], out.logits, atol=1e-5)


def test_teacher_forced_sequential_logits_match_the_cached_path():
    """The training objective's intra-window logits equal what a sampler gets from the cache and the head."""
    model = head_model(seed=4)
    labels = torch.tensor([1])
    tokens = torch.randint(0, 24, (1, 16), generator=torch.Generator().manual_seed(5))
    reference = shuffle_tokens(model.teacher_forced(labels, tokens).extra["sequential_logits"], 2)  # (1, P, 4, V)
    windows = shuffle_tokens(tokens, 2)
    model.setup_cache(1)
    state = [model.prefill(labels).extra["window_state"][:, -1]]
    for p in range(1, windows.shape[1]):
        slot = torch.tensor([model.cls_token_num + p - 1])
        state.append(model.forward_tokens(windows[:, p - 1 : p], slot).extra["window_state"][:, 0])
    cached = model.intra_window_logits(torch.stack(state, 1), windows)
    assert torch.allclose(cached, reference, atol=1e-4)


def test_export_with_an_intra_window_head_round_trips(tmp_path):
    model = head_model(seed=6)
    path = save_safetensors(model.state_dict(), tmp_path / "ts.safetensors", metadata=export_metadata(model))
    loaded = load_token_shuffle(path)
    assert loaded.shuffle_args.intra_window_head and loaded.intra_window is not None
    state = torch.randn(1, 4, 32)
    windows = torch.randint(0, 24, (1, 4))
    assert torch.equal(loaded.intra_window_logits(state, windows), model.intra_window_logits(state, windows))
