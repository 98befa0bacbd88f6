"""Analytic prefill FLOPs of a Llama-style decoder as a function of tokens per layer (reference §4).

FLOPs = 2 x multiply-accumulates. Per layer with n tokens, hidden d, KV width d_kv (GQA), gated MLP width m:
projections 2n(2d^2 + 2d*d_kv), attention scores and weighted sum 2 * 2 * n^2 * d (no causal discount,
as in FastV/DivPrune's `tflops.py`), gated MLP 2 * 3ndm. The LM head is counted once for the last token.
"""

from __future__ import annotations


def layer_flops(n_tokens: int, hidden: int, kv_width: int, mlp: int) -> int:
    """FLOPs of one decoder layer over `n_tokens` tokens."""
    n = n_tokens
    projections = 2 * n * (2 * hidden * hidden + 2 * hidden * kv_width)
    attention = 2 * 2 * n * n * hidden
    feed_forward = 2 * 3 * n * hidden * mlp
    return projections + attention + feed_forward


def prefill_flops(
    n_full: int, n_kept: int, prune_layer: int, num_layers: int, hidden: int, kv_width: int, mlp: int, vocab: int
) -> int:
    """Decoder prefill FLOPs when layers < `prune_layer` see `n_full` tokens and the rest `n_kept`."""
    full = prune_layer * layer_flops(n_full, hidden, kv_width, mlp)
    pruned = (num_layers - prune_layer) * layer_flops(n_kept, hidden, kv_width, mlp)
    return full + pruned + 2 * hidden * vocab


def config_prefill_flops(text_config, n_full: int, n_kept: int, prune_layer: int = 0) -> int:
    """`prefill_flops` with sizes read from a transformers text config (Llama / Qwen2 style)."""
    heads = text_config.num_attention_heads
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
    return prefill_flops(
        n_full,
        n_kept,
        prune_layer,
        text_config.num_hidden_layers,
        text_config.hidden_size,
        text_config.num_key_value_heads * head_dim,
        text_config.intermediate_size,
        text_config.vocab_size,
    )
