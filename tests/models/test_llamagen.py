"""LlamaGen GPT: official key layout, numerics against a float64 reference, KV cache and rollback."""

import math

import pytest
import torch
from model_helpers import assert_official_layout, official_block_keys, random_llamagen

from genaccel.models.llamagen import GPT_PRESETS, LlamaGenGPT, ModelArgs, build_gpt

# Official c2i configs: (FFN hidden, parameter count in millions) from the LlamaGen README / reference notes.
OFFICIAL = {"GPT-B": (2048, 110.9), "GPT-L": (2816, 342.9), "GPT-XL": (3584, 774.7), "GPT-XXL": (4096, 1411.0),
            "GPT-3B": (8704, 3100.0)}


def official_keys(dim: int, n_layer: int, hidden: int, vocab: int = 16384, classes: int = 1000) -> dict:
    keys = {"cls_embedding.embedding_table.weight": (classes + 1, dim), "tok_embeddings.weight": (vocab, dim),
            "norm.weight": (dim,), "output.weight": (vocab, dim)}
    return {**keys, **official_block_keys(dim, n_layer, hidden)}


@pytest.mark.parametrize("name", list(OFFICIAL))
def test_presets_match_official_keys_shapes_and_sizes(name):
    with torch.device("meta"):
        model = build_gpt(name)
    hidden, params_m = OFFICIAL[name]
    p = GPT_PRESETS[name]
    assert_official_layout(model, official_keys(p["dim"], p["n_layer"], hidden), params_m, 0.01)


def tiny(**kw) -> LlamaGenGPT:
    args = dict(dim=64, n_layer=2, n_head=4, vocab_size=50, num_classes=6, block_size=16, multiple_of=32,
                token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0)
    return random_llamagen(0, 0.3, **{**args, **kw})


def reference_logits(model: LlamaGenGPT, labels: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Direct float64 re-computation of LlamaGen's c2i forward from its written recipe (no shared code)."""
    a = model.args
    sd = {k: v.double() for k, v in model.state_dict().items()}
    B, N = tokens.shape
    x = torch.cat([sd["cls_embedding.embedding_table.weight"][labels][:, None],
                   sd["tok_embeddings.weight"][tokens[:, :-1]]], dim=1)
    S, hd, g = x.shape[1], a.dim // a.n_head, math.isqrt(a.block_size)
    # rotation angle table: slot 0 = class token -> cos = sin = 0
    cos = torch.zeros(S, hd // 2, dtype=torch.float64)
    sin = torch.zeros(S, hd // 2, dtype=torch.float64)
    for s in range(1, S):
        r, c = divmod(s - 1, g)
        for j in range(hd // 4):
            w = a.rope_base ** (-(2 * j) / (hd // 2))
            cos[s, j], sin[s, j] = math.cos(r * w), math.sin(r * w)
            cos[s, hd // 4 + j], sin[s, hd // 4 + j] = math.cos(c * w), math.sin(c * w)

    def rope(t):  # t: (B, S, H, hd), rotate pairs (2i, 2i+1)
        even, odd = t[..., 0::2], t[..., 1::2]
        cc, ss = cos[None, :, None], sin[None, :, None]
        out = torch.empty_like(t)
        out[..., 0::2] = even * cc - odd * ss
        out[..., 1::2] = odd * cc + even * ss
        return out

    def rms(t, w):
        return t / torch.sqrt((t * t).mean(-1, keepdim=True) + a.norm_eps) * w

    causal = torch.tril(torch.ones(S, S, dtype=torch.bool))
    for i in range(a.n_layer):
        p = f"layers.{i}."
        h = rms(x, sd[p + "attention_norm.weight"])
        q, k, v = (h @ sd[p + "attention.wqkv.weight"].T).split(a.dim, dim=-1)
        q = rope(q.view(B, S, a.n_head, hd)).transpose(1, 2)
        k = rope(k.view(B, S, a.n_head, hd)).transpose(1, 2)
        v = v.view(B, S, a.n_head, hd).transpose(1, 2)
        att = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
        att = att.masked_fill(~causal, float("-inf")).softmax(-1)
        x = x + ((att @ v).transpose(1, 2).reshape(B, S, a.dim) @ sd[p + "attention.wo.weight"].T)
        h = rms(x, sd[p + "ffn_norm.weight"])
        silu = torch.nn.functional.silu(h @ sd[p + "feed_forward.w1.weight"].T)
        x = x + (silu * (h @ sd[p + "feed_forward.w3.weight"].T)) @ sd[p + "feed_forward.w2.weight"].T
    return rms(x, sd["norm.weight"]) @ sd["output.weight"].T


def test_teacher_forced_matches_float64_reference():
    # RoPE runs in float32 by design (as upstream), so even a float64 model carries ~1e-7 relative error.
    model = tiny()
    labels, tokens = torch.tensor([1, 4]), torch.randint(0, 50, (2, 16))
    ours = model.teacher_forced(labels, tokens).logits.double()
    ref = reference_logits(model, labels, tokens)
    assert ref.abs().max() > 1.0  # non-trivial logits
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5 * float(ref.abs().max()))


def test_class_token_query_key_are_zeroed():
    # With (cos, sin) = (0, 0) at the class slot, its key is zero: every image token gives the class slot the
    # same attention logit 0, so scaling the class embedding's key path changes nothing but values do.
    model = tiny()
    table = model.freqs_cis
    assert torch.all(table[: model.cls_token_num] == 0)
    assert table.shape == (1 + 16, 64 // 4 // 2, 2)


def incremental_logits(model: LlamaGenGPT, labels: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Logits over [class, tokens[:, :-1]] the cached way: prefill, then one ``forward_tokens`` call per token."""
    model.setup_cache(len(labels))
    steps = [model.prefill(labels).logits]
    for t in range(tokens.shape[1] - 1):
        steps.append(model.forward_tokens(tokens[:, t : t + 1], torch.tensor([1 + t])).logits)
    return torch.cat(steps, 1)


def test_kv_cache_incremental_equals_teacher_forced_fp32():
    model = tiny()
    labels, tokens = torch.tensor([0, 5, 2]), torch.randint(0, 50, (3, 16))
    full = model.teacher_forced(labels, tokens).logits
    torch.testing.assert_close(incremental_logits(model, labels, tokens), full, rtol=0, atol=1e-5)


def test_multi_token_chunks_and_per_row_positions_equal_single_steps():
    model = tiny()
    labels, tokens = torch.tensor([3, 1]), torch.randint(0, 50, (2, 16))
    full = model.teacher_forced(labels, tokens).logits
    model.setup_cache(2)
    model.prefill(labels)
    a = model.forward_tokens(tokens[:, :7], torch.arange(1, 8)).logits
    b = model.forward_tokens(tokens[:, 7:15], torch.arange(8, 16)[None].expand(2, -1)).logits
    torch.testing.assert_close(torch.cat([a, b], 1), full[:, 1:], rtol=0, atol=1e-5)


def test_rollback_then_reforward_equals_fresh_forward():
    model = tiny()
    labels, tokens = torch.tensor([2]), torch.randint(0, 50, (1, 16))
    garbage = torch.randint(0, 50, (1, 8))
    model.setup_cache(1)
    model.prefill(labels)
    model.forward_tokens(tokens[:, :4], torch.arange(1, 5))
    model.forward_tokens(garbage, torch.arange(5, 13))  # a rejected draft window
    model.rollback(5)
    # write only two slots of the stale region: the rest must not leak into attention
    after = model.forward_tokens(tokens[:, 4:6], torch.tensor([5, 6])).logits
    model.setup_cache(1)
    model.prefill(labels)
    fresh = model.forward_tokens(tokens[:, :6], torch.arange(1, 7)).logits[:, 4:]
    torch.testing.assert_close(after, fresh, rtol=0, atol=1e-5)


def test_per_row_rollback_lengths():
    model = tiny()
    labels, tokens = torch.tensor([2, 3]), torch.randint(0, 50, (2, 16))
    model.setup_cache(2)
    model.prefill(labels)
    model.forward_tokens(tokens[:, :8], torch.arange(1, 9))
    model.rollback(torch.tensor([3, 6]))
    pos = torch.tensor([[3, 4], [6, 7]])
    out = model.forward_tokens(torch.stack([tokens[0, 2:4], tokens[1, 5:7]]), pos).logits
    full = model.teacher_forced(labels, tokens).logits
    torch.testing.assert_close(out[0], full[0, 3:5], rtol=0, atol=1e-5)
    torch.testing.assert_close(out[1], full[1, 6:8], rtol=0, atol=1e-5)


def test_explicit_mask_and_rope_positions_match_default():
    model = tiny()
    labels, tokens = torch.tensor([1]), torch.randint(0, 50, (1, 16))
    model.setup_cache(1)
    model.prefill(labels)
    default = model.forward_tokens(tokens[:, :5], torch.arange(1, 6)).logits
    model.rollback(1)
    L = model.max_seq_len
    mask = (torch.arange(L)[None, :] <= torch.arange(1, 6)[:, None])[None]
    explicit = model.forward_tokens(tokens[:, :5], torch.arange(1, 6), mask=mask, rope_positions=torch.arange(1, 6)).logits
    torch.testing.assert_close(explicit, default, rtol=0, atol=0)


def test_gqa_and_ffn_multiplier_fields():
    model = tiny(n_kv_head=2, ffn_dim_multiplier=1.5)
    assert model.layers[0].attention.wqkv.weight.shape == ((4 + 2 * 2) * 16, 64)
    assert model.layers[0].feed_forward.w1.weight.shape[0] == ModelArgs(dim=64, multiple_of=32, ffn_dim_multiplier=1.5, n_head=4).ffn_hidden
    labels, tokens = torch.tensor([1]), torch.randint(0, 50, (1, 16))
    full = model.teacher_forced(labels, tokens).logits
    model.setup_cache(1)
    model.prefill(labels)
    inc = model.forward_tokens(tokens[:, :15], torch.arange(1, 16)).logits
    torch.testing.assert_close(inc, full[:, 1:], rtol=0, atol=1e-5)


def test_contract_errors_are_clear():
    model = tiny()
    with pytest.raises(RuntimeError, match="setup_cache"):
        model.prefill(torch.tensor([0]))
    model.setup_cache(1)
    with pytest.raises(ValueError, match="class labels"):
        model.prefill(torch.tensor([99]))
    with pytest.raises(ValueError, match="out of range"):
        model.forward_tokens(torch.tensor([[1]]), torch.tensor([model.max_seq_len]))
    with pytest.raises(ValueError, match="batch"):
        model.forward_tokens(torch.tensor([[1], [2]]), torch.tensor([1]))
    with pytest.raises(ValueError, match="square"):
        ModelArgs(block_size=200)
    with pytest.raises(ValueError, match="unknown GPT preset"):
        ModelArgs.from_name("GPT-Q")


# ----------------------------------------------------------------------------- 1-D layout (FlexTok tokens)
def tiny_1d(seq_len: int = 12) -> LlamaGenGPT:
    return tiny(block_size=seq_len, layout="1d")  # head_dim 16


def test_1d_rope_table_is_llamagens_1d_formula_and_grid_size_is_zero():
    model = tiny_1d(12)  # 12 tokens: not a square, allowed in 1-D
    assert model.grid_size == 0 and model.num_image_tokens == 12
    table = model.freqs_cis.double()
    head_dim = 16
    for t in (0, 3, 11):
        for i in range(head_dim // 2):
            angle = t / 10000 ** (2 * i / head_dim)
            assert table[1 + t, i].tolist() == pytest.approx([math.cos(angle), math.sin(angle)], abs=1e-6)
    assert torch.all(table[0] == 0)  # the class slot


def test_1d_kv_cache_equals_teacher_forced_and_a_generation_length_is_a_prefix():
    model = tiny_1d(12)
    labels, tokens = torch.tensor([0, 5]), torch.randint(0, 50, (2, 12))
    full = model.teacher_forced(labels, tokens).logits
    torch.testing.assert_close(incremental_logits(model, labels, tokens), full, rtol=0, atol=1e-5)
    model.set_generation_length(5)
    assert model.num_image_tokens == 5
    model.set_generation_length(None)
    assert model.num_image_tokens == 12


def test_1d_options_are_checked():
    with pytest.raises(ValueError, match="layout"):
        ModelArgs(dim=32, n_head=2, layout="3d")
    with pytest.raises(ValueError, match="must be a square"):
        ModelArgs(dim=32, n_head=2, block_size=12)
    with pytest.raises(ValueError, match="needs a 1-D model"):
        tiny().set_generation_length(4)
    with pytest.raises(ValueError, match=r"--num-tokens must lie in \[1, 12\]"):
        tiny_1d(12).set_generation_length(13)
