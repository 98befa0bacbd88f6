"""FlexTok-style 1D tokenizer: FSQ indices, the causal register mask, prefix independence, decoding with k
tokens, the flow sampler against a hand-written Euler step, and learned coarse-to-fine reconstructions."""

import pytest
import torch
import torch.nn.functional as F

from genaccel.data.skimage_crops import make_crops
from genaccel.models.loading import CheckpointError
from genaccel.tokenizers.flex import (
    FlexTokArgs,
    FlexTokenizer,
    export_metadata,
    keep_k_choices,
    load_flextok,
    nested_dropout,
    register_attention_mask,
    sample_keep_k,
)
from genaccel.utils.io import save_safetensors

TINY = dict(image_size=16, patch_size=4, width=32, depth=2, decoder_depth=1, heads=2, num_tokens=6,
            fsq_levels=[8, 5, 3])


def tiny(**overrides) -> FlexTokenizer:
    torch.manual_seed(0)
    return FlexTokenizer(FlexTokArgs(**{**TINY, **overrides})).eval()


def randomise(module: torch.nn.Module) -> None:
    """Non-trivial weights everywhere (the zero-initialised heads would make some checks vacuous)."""
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, 0.2)


def images(n: int = 3, size: int = 16) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1


def test_fsq_index_code_round_trip_and_convention(one_thread):
    model = tiny()
    levels = torch.tensor(TINY["fsq_levels"])
    assert model.vocab_size == 8 * 5 * 3
    codes = model.codebook_vectors()
    assert codes.shape == (model.vocab_size, 3) and codes.abs().max() <= 1
    every = torch.arange(model.vocab_size)
    assert torch.equal(model.fsq.codes_to_indices(codes).long(), every)  # index -> code -> index
    assert torch.equal(model.codes_from_tokens(every[None])[0], codes)
    # The convention, written out: level value l_i = code_i * (L_i // 2) + L_i // 2, index = sum l_i * basis_i.
    z = torch.randn(4, 7, 3, generator=torch.Generator().manual_seed(2)) * 2
    quantised, ids = model.quantize(z)
    level_values = (quantised * (levels // 2) + levels // 2).round().long()
    assert (level_values >= 0).all() and (level_values < levels).all()
    basis = torch.tensor([1, 8, 40])
    assert torch.equal(ids, (level_values * basis).sum(-1))
    assert torch.equal(model.codes_from_tokens(ids), quantised)  # code -> index -> code
    assert len(ids.unique()) > 10


def test_causal_register_mask_equals_its_definition():
    n, r = 5, 4
    mask = register_attention_mask(n, r)
    for q in range(n + r):
        for k in range(n + r):
            if q < n:  # a patch: every patch, no register
                expected = k < n
            else:  # register q - n: every patch and registers <= q - n
                expected = k < n or k - n <= q - n
            assert bool(mask[q, k]) == expected, (q, k)


@pytest.mark.parametrize("rtp", [False, True])
def test_token_prefixes_do_not_depend_on_k(one_thread, rtp):
    model = tiny(rtp=rtp)
    randomise(model.encoder)
    x = images()
    full = model.tokenize(x)
    assert full.shape == (3, 6) and full.dtype == torch.long
    for k in (1, 2, 5):
        assert torch.equal(model.tokenize(x, k), full[:, :k])
    with torch.no_grad():  # continuous register outputs, including RTP's training-time padding registers
        longest = model.encoder(x, model.args.train_length)
        for k in (1, 4, 6):
            torch.testing.assert_close(model.encoder(x, k), longest[:, :k], atol=1e-5, rtol=1e-5)
    assert model.args.train_length == (6 + 6 - 6 // 8 if rtp else 6)
    assert len(full.unique()) > 1


def test_decoding_ignores_tokens_beyond_k(one_thread):
    model = tiny()
    randomise(model.direct)
    randomise(model.flow)
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, model.vocab_size, (2, 6), generator=gen)
    other = torch.randint(0, model.vocab_size, (2, 6), generator=gen)
    x_t, sigma = images(2), torch.tensor([0.3, 0.8])
    for k in (1, 3, 5):
        changed = torch.cat([tokens[:, :k], other[:, k:]], dim=1)
        keep = torch.full((2,), k)
        codes_a, codes_b = model.codes_from_tokens(tokens), model.codes_from_tokens(changed)
        with torch.no_grad():
            assert torch.equal(model.direct(codes_a, keep), model.direct(codes_b, keep))
            assert torch.equal(model.flow(x_t, sigma, codes_a, keep), model.flow(x_t, sigma, codes_b, keep))
            prefix = model.detokenize(tokens[:, :k])
            torch.testing.assert_close(prefix, model.direct(codes_a, keep).clamp(-1, 1))
            # ...while a token inside the prefix does matter
            inside = tokens.clone()
            inside[:, k - 1] = (inside[:, k - 1] + 1) % model.vocab_size
            assert not torch.equal(model.detokenize(inside[:, :k]), prefix)
    ragged = model.detokenize([tokens[0, :2], tokens[1, :5]])
    torch.testing.assert_close(ragged[1:], model.detokenize(tokens[1:, :5]))
    with pytest.raises(ValueError, match="1 to 6 tokens"):
        model.detokenize(torch.zeros(1, 7, dtype=torch.long))


def test_flow_decoder_steps_equal_euler_steps_by_hand(one_thread):
    model = tiny(decoders="flow")
    randomise(model.flow)
    tokens = torch.randint(0, model.vocab_size, (2, 4), generator=torch.Generator().manual_seed(4))
    codes, keep = model.padded_codes(tokens)
    noise = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        velocity = model.flow(noise, torch.ones(2), codes, keep)
        one_step = noise + (0.0 - 1.0) * velocity  # x <- x + (sigma_next - sigma) * v, sigma 1 -> 0
        half = noise - 0.5 * velocity
        two_steps = half - 0.5 * model.flow(half, torch.full((2,), 0.5), codes, keep)
    assert velocity.abs().mean() > 0.1
    for steps, expected in ((1, one_step), (2, two_steps)):
        got = model.detokenize(tokens, steps=steps, generator=torch.Generator().manual_seed(5))
        torch.testing.assert_close(got, expected.clamp(-1, 1), atol=1e-5, rtol=1e-5)


def test_x_prediction_derives_the_velocity_from_the_predicted_input(one_thread):
    """flow_prediction='x': the network's output is the clean input x^, the velocity (x_t - x^) / max(sigma, 0.05);
    so one Euler step from sigma 1 to 0 lands exactly on x^. Same weights as a velocity model, whose output is x^."""
    raw, xpred = tiny(decoders="flow"), tiny(decoders="flow", flow_prediction="x")
    randomise(raw.flow)
    xpred.load_state_dict(raw.state_dict())
    tokens = torch.randint(0, raw.vocab_size, (2, 4), generator=torch.Generator().manual_seed(4))
    codes, keep = raw.padded_codes(tokens)
    x_t = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        for sigma in (1.0, 0.3, 0.01):
            s = torch.full((2,), sigma)
            x_hat = raw.flow(x_t, s, codes, keep)
            torch.testing.assert_close(xpred.flow(x_t, s, codes, keep), (x_t - x_hat) / max(sigma, 0.05))
        x_hat = raw.flow(x_t, torch.ones(2), codes, keep)
    got = xpred.detokenize(tokens, steps=1, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(got, x_hat.clamp(-1, 1), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="flow_prediction must be one of"):
        FlexTokArgs(**{**TINY, "flow_prediction": "eps"}).validate()


def test_nested_dropout_schedules_and_mask_token():
    assert keep_k_choices(64, "pow2").tolist() == [1, 2, 4, 8, 16, 32, 64]
    assert keep_k_choices(120, "pow2").tolist() == [1, 2, 4, 8, 16, 32, 64, 120]
    assert keep_k_choices(5, "uniform").tolist() == [1, 2, 3, 4, 5]
    draws = sample_keep_k(2000, 64, "pow2", torch.Generator().manual_seed(0))
    assert set(draws.tolist()) == {1, 2, 4, 8, 16, 32, 64}
    x, token = torch.randn(2, 5, 3), torch.tensor([9.0, 9.0, 9.0])
    out = nested_dropout(x, torch.tensor([2, 5]), token)
    assert torch.equal(out[0, :2], x[0, :2]) and (out[0, 2:] == 9).all() and torch.equal(out[1], x[1])


@pytest.fixture(scope="module")
def trained():
    """A tiny tokenizer trained for a few seconds on 16x16 versions of the bundled training crops."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = FlexTokenizer(FlexTokArgs(image_size=16, patch_size=4, width=48, depth=1, decoder_depth=1, heads=2,
                                      num_tokens=4, fsq_levels=[5, 5, 5], nested_dropout="uniform", decoders="direct"))
    train = F.avg_pool2d(make_crops("train", 32, seed=0)[0], 4)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95), weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    for step in range(500):
        for group in opt.param_groups:
            group["lr"] = 2e-3 * min(1.0, (step + 1) / 50)
        batch = train[torch.randint(0, len(train), (32,), generator=gen)]
        loss = model.training_losses(batch, gen).direct_mse
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    torch.set_num_threads(threads)
    return model.eval()


def test_reconstruction_error_decreases_as_k_grows_on_heldout_crops(trained, one_thread):
    heldout = F.avg_pool2d(make_crops("heldout", 8, seed=0)[0], 4)
    tokens = trained.tokenize(heldout)
    mse = [float(((trained.detokenize(tokens[:, :k]) - heldout) ** 2).mean()) for k in range(1, 5)]
    assert all(later < earlier for earlier, later in zip(mse, mse[1:])), mse
    assert mse[-1] < 0.95 * mse[0], mse


def test_export_loads_strictly_with_clear_errors(tmp_path, one_thread):
    model = tiny(rtp=True)
    path = tmp_path / "flextok.safetensors"
    save_safetensors(model.state_dict(), path, metadata=export_metadata(model))
    loaded = load_flextok(path)
    assert loaded.args == model.args
    x = images()
    assert torch.equal(loaded.tokenize(x), model.tokenize(x))
    broken = {k: v for k, v in model.state_dict().items() if not k.startswith("flow.")}
    save_safetensors(broken, tmp_path / "broken.safetensors", metadata=export_metadata(model))
    with pytest.raises(CheckpointError, match=r"missing keys: flow\.(.|\n)*fix: .*decoders=\['direct'\]"):
        load_flextok(tmp_path / "broken.safetensors")
    save_safetensors(model.state_dict(), tmp_path / "bare.safetensors")
    with pytest.raises(CheckpointError, match="not a genaccel FlexTok export"):
        load_flextok(tmp_path / "bare.safetensors")
    with pytest.raises(FileNotFoundError, match="python -m genaccel.train flextok"):
        load_flextok(tmp_path / "absent.safetensors")


# ---------------------------------------------------------------------------------------------- VQ latent
def tiny_latent_tokenizer() -> tuple[FlexTokenizer, torch.nn.Module]:
    """A tokenizer over a tiny random VQ's latent (16x16 images -> 4x4x8 latents, patch 2 -> 4 patches)."""
    from dataclasses import asdict

    from genaccel.tokenizers.vq import build_vq

    torch.manual_seed(0)
    vq = build_vq(None, ch=32, encoder_ch_mult=[1, 2, 2], decoder_ch_mult=[1, 2, 2], z_channels=32,
                  codebook_size=32).eval()
    model = FlexTokenizer(FlexTokArgs(**{**TINY, "patch_size": 2, "latent": "vq", "vq": asdict(vq.args)}))
    model.vae.load_state_dict(vq.state_dict())
    randomise(model.encoder)
    randomise(model.direct)
    return model.eval(), vq


def test_vq_latent_tokenizer_reads_and_reconstructs_the_vqs_scaled_latent(one_thread):
    model, vq = tiny_latent_tokenizer()
    x = images()
    latent = model.images_to_input(x)
    assert latent.shape == (3, 8, 4, 4) and model.args.num_patches == 4
    assert torch.allclose(latent, vq.quantize_images(x).z_q * 8**0.5)  # unit variance per channel (note 1)
    assert torch.allclose(model.input_to_images(latent), vq.decode_latent(vq.quantize_images(x).z_q), atol=1e-5)
    tokens = model.tokenize(x)
    # pixels come from the VQ decoder applied to the direct decoder's latent
    codes, keep = model.padded_codes(tokens[:, :3])
    expected = vq.decode_latent(model.direct(codes, keep) / 8**0.5).clamp(-1, 1)
    assert torch.allclose(model.detokenize(tokens[:, :3]), expected, atol=1e-5)
    assert torch.equal(model.tokenize(x, 2), tokens[:, :2])  # prefix property holds in latent mode too


def test_vq_latent_training_leaves_the_first_stage_frozen_and_exports_it(tmp_path, one_thread):
    model, vq = tiny_latent_tokenizer()
    model.train()
    assert not model.vae.training  # the frozen first stage stays in eval mode
    out = model.training_losses(images(4), torch.Generator().manual_seed(0))
    out.direct_mse.backward()
    assert all(p.grad is None for p in model.vae.parameters())
    assert model.encoder.to_code.weight.grad is not None
    path = tmp_path / "flextok.safetensors"
    save_safetensors(model.state_dict(), path, metadata=export_metadata(model))
    loaded = load_flextok(path)
    assert loaded.args == model.args
    assert torch.equal(loaded.detokenize(model.tokenize(images())), model.eval().detokenize(model.tokenize(images())))
