"""Strict checkpoint loading: every wrapper format, clear errors for wrong keys, shapes and files."""

import json

import pytest
import torch
from model_helpers import random_llamagen
from safetensors.torch import save_file

from genaccel.models import CheckpointError, load_gpt, load_vq, suggest_gpt_preset
from genaccel.models.llamagen import ModelArgs, build_gpt
from genaccel.tokenizers.vq import build_vq

TINY = dict(dim=64, n_layer=2, n_head=4, vocab_size=40, num_classes=5, block_size=16, multiple_of=32)


def tiny_gpt():
    return random_llamagen(0, 0.2, **TINY)


def logits(model):
    return model.teacher_forced(torch.tensor([1]), torch.arange(16)[None] % 40).logits


@pytest.mark.parametrize("wrap", ["model", "ema", "module", None])
def test_pt_wrappers_load_identically(tmp_path, wrap):
    model = tiny_gpt()
    sd = model.state_dict()
    path = tmp_path / "gpt.pt"
    torch.save({wrap: sd, "steps": 3} if wrap else sd, path)
    loaded = load_gpt(path, image_size=16, downsample=4, **{k: TINY[k] for k in ("dim", "n_layer", "n_head", "multiple_of")})
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=0)


def test_safetensors_with_config_metadata(tmp_path):
    model = tiny_gpt()
    cfg = {k: getattr(model.args, k) for k in ModelArgs.field_names()}
    save_file(model.state_dict(), str(tmp_path / "gpt.safetensors"), metadata={"config": json.dumps(cfg)})
    loaded = load_gpt(tmp_path / "gpt.safetensors")
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=0)


def test_module_prefix_and_freqs_key_are_tolerated(tmp_path):
    model = tiny_gpt()
    sd = {f"module.{k}": v for k, v in model.state_dict().items()}
    sd["freqs_cis"] = torch.zeros(3)
    torch.save(sd, tmp_path / "gpt.pt")
    loaded = load_gpt(tmp_path / "gpt.pt", image_size=16, downsample=4, n_head=4, multiple_of=32)
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=0)


def test_wrong_keys_list_missing_and_unexpected(tmp_path):
    sd = tiny_gpt().state_dict()
    sd["layers.0.attention.wq.weight"] = sd.pop("layers.0.attention.wqkv.weight")
    torch.save({"model": sd}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError) as err:
        load_gpt(tmp_path / "bad.pt", image_size=16, downsample=4, n_head=4, multiple_of=32)
    msg = str(err.value)
    assert "missing keys: layers.0.attention.wqkv.weight" in msg
    assert "unexpected keys: layers.0.attention.wq.weight" in msg


def test_shape_mismatch_names_the_fitting_preset():
    # A GPT-B-shaped state dict built from zero-stride views: no memory, real shapes.
    with torch.device("meta"):
        ref = build_gpt("GPT-B")
    fake = {k: torch.zeros(1).expand(*v.shape) for k, v in ref.state_dict().items()}
    assert "GPT-B" in suggest_gpt_preset(fake)
    from genaccel.models.loading import load_strict

    with pytest.raises(CheckpointError, match="(?s)shape mismatches.*fits preset GPT-B"):
        load_strict(tiny_gpt(), fake, "fake.pt", suggest_gpt_preset)


def test_preset_mismatch_when_user_names_the_wrong_preset(tmp_path):
    torch.save({"model": tiny_gpt().state_dict()}, tmp_path / "gpt.pt")
    with pytest.raises(CheckpointError, match="no preset fits"):
        load_gpt(tmp_path / "gpt.pt", gpt_model="GPT-B", image_size=16, downsample=4)


def test_truncated_and_missing_files(tmp_path):
    torch.save({"model": tiny_gpt().state_dict()}, tmp_path / "gpt.pt")
    data = (tmp_path / "gpt.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_gpt(tmp_path / "cut.pt", image_size=16, downsample=4)
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_gpt(tmp_path / "nope.pt")
    torch.save({"optimizer": {"lr": torch.tensor(1.0)}, "other": 3}, tmp_path / "odd.pt")
    with pytest.raises(CheckpointError, match="expected a state dict"):
        load_gpt(tmp_path / "odd.pt")


def test_not_a_gpt_checkpoint(tmp_path):
    torch.save({"model": {"w": torch.zeros(2)}}, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match="not a LlamaGen c2i GPT checkpoint"):
        load_gpt(tmp_path / "x.pt")


def test_vq_loads_strictly_with_codebook_used_buffer(tmp_path):
    torch.manual_seed(0)
    vq = build_vq(None, ch=32, encoder_ch_mult=[1, 2, 2], decoder_ch_mult=[1, 2, 2], z_channels=64, codebook_size=32)
    sd = vq.state_dict()
    assert sd["quantize.codebook_used"].shape == (65536,)
    torch.save({"model": sd}, tmp_path / "vq.pt")
    with pytest.raises(CheckpointError, match="3 encoder levels"):
        load_vq(tmp_path / "vq.pt", encoder_ch_mult=[1, 1, 2, 2, 4], decoder_ch_mult=[1, 1, 2, 2, 4])
    loaded = load_vq(tmp_path / "vq.pt")  # architecture read from the weight shapes
    idx = torch.randint(0, 32, (1, 16))
    torch.testing.assert_close(loaded.decode(idx), vq.eval().decode(idx), rtol=0, atol=0)
    del sd["quantize.codebook_used"]
    torch.save({"model": sd}, tmp_path / "vq2.pt")
    with pytest.raises(CheckpointError, match="missing keys: quantize.codebook_used"):
        load_vq(tmp_path / "vq2.pt")


def test_official_kv_cache_buffers_are_ignored_with_a_notice(tmp_path, capsys):
    """Checkpoints saved after the official `setup_caches()` carry layers.N.attention.kv_cache.{k,v}_cache."""
    gpt = build_gpt(None, dim=32, n_layer=2, n_head=2, vocab_size=16, num_classes=3, block_size=16, multiple_of=32)
    sd = dict(gpt.state_dict())
    for i in range(2):
        sd[f"layers.{i}.attention.kv_cache.k_cache"] = torch.zeros(2, 2, 24, 16)
        sd[f"layers.{i}.attention.kv_cache.v_cache"] = torch.zeros(2, 2, 24, 16)
    torch.save({"model": sd}, tmp_path / "after_setup_caches.pt")
    loaded = load_gpt(tmp_path / "after_setup_caches.pt", image_size=16, downsample=4, n_head=2, multiple_of=32)
    assert torch.equal(loaded.tok_embeddings.weight, gpt.tok_embeddings.weight)
    err = capsys.readouterr().err
    assert "ignored 4 KV-cache buffers" in err and err.count("\n") == 1


def test_custom_size_without_n_head_says_so_and_names_the_field(tmp_path):
    """A custom-size checkpoint's head count is not in its shapes: the loader refuses to guess."""
    torch.save({"model": tiny_gpt().state_dict()}, tmp_path / "custom.pt")
    with pytest.raises(CheckpointError, match=r"(?s)match no preset.*n_head cannot be read from shapes.*n_head=H"):
        load_gpt(tmp_path / "custom.pt", image_size=16, downsample=4, multiple_of=32)
    loaded = load_gpt(tmp_path / "custom.pt", image_size=16, downsample=4, multiple_of=32, n_head=4)
    assert loaded.args.n_head == 4
