"""Analytic prefill FLOPs."""

from __future__ import annotations

from tiny_vlms import tiny_llama

from genaccel.pruning.flops import config_prefill_flops, layer_flops, prefill_flops


def test_layer_flops_counts_projections_attention_and_gated_mlp():
    n, d, kv, m = 10, 8, 4, 16
    assert layer_flops(n, d, kv, m) == 2 * n * (2 * d * d + 2 * d * kv) + 4 * n * n * d + 6 * n * d * m


def test_pruning_at_layer_k_mixes_full_and_kept_layers():
    full, kept = layer_flops(100, 8, 8, 16), layer_flops(20, 8, 8, 16)
    assert prefill_flops(100, 20, 2, 5, 8, 8, 16, 50) == 2 * full + 3 * kept + 2 * 8 * 50


def test_config_reader_uses_gqa_width():
    config = tiny_llama()
    assert config_prefill_flops(config, 50, 50) == prefill_flops(50, 50, 0, 3, 64, 2 * 16, 128, 128)
