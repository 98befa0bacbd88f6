"""LlamaGen VQ tokenizer: official key layout, l2-normalised nearest-code quantisation, shapes."""

import pytest
import torch
import torch.nn.functional as F

from genaccel.tokenizers.vq import VQ_PRESETS, build_vq


def small(**kw):
    torch.manual_seed(0)
    args = dict(ch=32, encoder_ch_mult=[1, 2, 2], decoder_ch_mult=[1, 2, 2], z_channels=64, codebook_size=64)
    args.update(kw)
    return build_vq(None, **args).eval()


@pytest.mark.parametrize("name,levels", [("VQ-16", 5), ("VQ-8", 4)])
def test_presets_have_official_layout(name, levels):
    with torch.device("meta"):
        vq = build_vq(name)
    sd = vq.state_dict()
    assert sd["quantize.embedding.weight"].shape == (16384, 8)
    assert sd["quantize.codebook_used"].shape == (65536,)
    assert sd["encoder.conv_in.weight"].shape == (128, 3, 3, 3)
    assert sd["quant_conv.weight"].shape == (8, 256, 1, 1)
    assert len({k.split(".")[2] for k in sd if k.startswith("encoder.conv_blocks.")}) == levels
    last = levels - 1
    assert f"encoder.conv_blocks.{last}.attn.1.proj_out.weight" in sd
    assert "decoder.conv_blocks.0.attn.2.q.weight" in sd  # 3 attention blocks at the lowest resolution
    assert "encoder.conv_blocks.0.downsample.conv.weight" in sd and "decoder.conv_blocks.0.upsample.conv.weight" in sd
    assert vq.downsample == 2 ** (levels - 1) and VQ_PRESETS[name]


def test_encode_decode_shapes_and_range_checks():
    vq = small()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    idx = vq.encode(x)
    assert idx.shape == (2, 64) and idx.dtype == torch.long and int(idx.max()) < 64
    assert vq.decode(idx).shape == (2, 3, 32, 32)
    assert vq.decode(idx.view(2, 8, 8)).shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match="token ids"):
        vq.decode(torch.full((1, 64), 64))
    with pytest.raises(ValueError, match="divisible"):
        vq.encode(torch.zeros(1, 3, 30, 30))
    with pytest.raises(ValueError, match="grid"):
        vq.decode(torch.zeros(1, 60, dtype=torch.long))


def test_quantiser_picks_max_cosine_code_in_float64():
    vq = small().double()
    z = torch.randn(2, 8, 4, 4, dtype=torch.float64)
    q = vq.quantize(z)
    zn = F.normalize(z.permute(0, 2, 3, 1), dim=-1)
    cb = F.normalize(vq.quantize.embedding.weight, dim=-1)
    expected = (zn @ cb.T).argmax(-1)
    assert torch.equal(q.indices, expected)
    torch.testing.assert_close(q.z_q.permute(0, 2, 3, 1), cb[expected])


def test_decode_of_encoded_latent_is_consistent():
    vq = small()
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    rec, q = vq(x)
    torch.testing.assert_close(vq.decode(q.indices.flatten(1)), rec, rtol=0, atol=1e-5)
