"""Attention rows recomputed from captured q/k equal the rows eager attention materialises."""

from __future__ import annotations

import torch
from tiny_vlms import tiny_clip, tiny_llama
from transformers import CLIPVisionModel, LlamaModel
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from genaccel.pruning import signals


def capture_projections(attention) -> tuple[dict[str, torch.Tensor], list]:
    store: dict[str, torch.Tensor] = {}
    handles = [
        getattr(attention, f"{name}_proj").register_forward_hook(
            lambda module, args, out, name=name: store.__setitem__(name, out)
        )
        for name in ("q", "k")
    ]
    return store, handles


def test_cls_attention_matches_eager_clip_attention():
    torch.manual_seed(0)
    config = tiny_clip()
    config._attn_implementation = "eager"
    model = CLIPVisionModel(config).eval()
    store, _ = capture_projections(model.encoder.layers[1].self_attn)
    with torch.no_grad():
        out = model(torch.randn(3, 3, 32, 32), output_attentions=True)
    rows = signals.cls_attention(
        store["q"], store["k"], config.num_attention_heads, model.encoder.layers[1].self_attn.scale
    )
    torch.testing.assert_close(rows, out.attentions[1][:, :, 0, :], atol=1e-6, rtol=1e-5)


def test_head_mean_keys_average_over_heads():
    keys = torch.randn(2, 5, 4 * 3)
    expected = keys.view(2, 5, 4, 3).mean(dim=2)
    torch.testing.assert_close(signals.head_mean_keys(keys, 4), expected)


def eager_llama_with_captures(layer: int):
    torch.manual_seed(0)
    config = tiny_llama()
    config._attn_implementation = "eager"
    model = LlamaModel(config).eval()
    store, _ = capture_projections(model.layers[layer].self_attn)
    model.layers[layer].register_forward_pre_hook(
        lambda module, args, kwargs: store.__setitem__("rope", kwargs["position_embeddings"]), with_kwargs=True
    )
    return model, store


def test_last_query_attention_matches_eager_llama_with_left_padding_and_gqa():
    model, store = eager_llama_with_captures(layer=1)
    ids = torch.randint(1, 100, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :4] = 0
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_attentions=True)
    cos, sin = store["rope"]
    config = model.config
    last = torch.tensor([11, 11])
    row = signals.last_query_attention(
        store["q"],
        store["k"],
        cos.expand(2, -1, -1),
        sin.expand(2, -1, -1),
        last,
        mask.bool(),
        config.num_attention_heads,
        config.num_key_value_heads,
        model.layers[1].self_attn.scaling,
    )
    torch.testing.assert_close(row, out.attentions[1][:, :, -1, :].mean(dim=1), atol=1e-6, rtol=1e-5)
    assert float(row[1, :4].abs().max()) == 0.0


def test_last_query_attention_uses_the_requested_query_column():
    model, store = eager_llama_with_captures(layer=0)
    ids = torch.randint(1, 100, (1, 9))
    with torch.no_grad():
        out = model(input_ids=ids, output_attentions=True)
    cos, sin = store["rope"]
    config = model.config
    row = signals.last_query_attention(
        store["q"],
        store["k"],
        cos,
        sin,
        torch.tensor([5]),
        torch.ones(1, 9, dtype=torch.bool),
        config.num_attention_heads,
        config.num_key_value_heads,
        model.layers[0].self_attn.scaling,
    )
    torch.testing.assert_close(row, out.attentions[0][:, :, 5, :].mean(dim=1), atol=1e-6, rtol=1e-5)


def test_rotated_key_l1_matches_transformers_rope():
    keys = torch.randn(2, 6, 2 * 8)
    cos, sin = torch.randn(2, 6, 8), torch.randn(2, 6, 8)
    k = keys.view(2, 6, 2, 8).transpose(1, 2)
    _, rotated = apply_rotary_pos_emb(k, k, cos, sin)
    torch.testing.assert_close(signals.rotated_key_l1(keys, cos, sin, 2), rotated.abs().sum(dim=(1, 3)))
