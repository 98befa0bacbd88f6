"""Pieces shared by the model tests: the official per-block key layout of LlamaGen-family checkpoints and a
tiny random LlamaGen model."""

from __future__ import annotations

import torch

from genaccel.models.llamagen import build_gpt


def official_block_keys(dim: int, n_blocks: int, hidden: int) -> dict:
    """Key names and shapes of ``n_blocks`` transformer blocks of LlamaGen's Transformer (autoregressive/models/
    gpt.py: fused wqkv, SwiGLU w1/w3/w2 of width ``hidden``, RMSNorm weights), as NAR and the t2i model keep them."""
    keys = {}
    for i in range(n_blocks):
        keys.update({
            f"layers.{i}.attention.wqkv.weight": (3 * dim, dim), f"layers.{i}.attention.wo.weight": (dim, dim),
            f"layers.{i}.feed_forward.w1.weight": (hidden, dim), f"layers.{i}.feed_forward.w3.weight": (hidden, dim),
            f"layers.{i}.feed_forward.w2.weight": (dim, hidden), f"layers.{i}.attention_norm.weight": (dim,),
            f"layers.{i}.ffn_norm.weight": (dim,),
        })
    return keys


def random_llamagen(seed: int, std: float, **args):
    """``build_gpt(None, **args)`` in eval mode with every parameter redrawn N(0, std) after
    ``torch.manual_seed(seed)``: large random weights, so that numerical comparisons see non-trivial logits."""
    torch.manual_seed(seed)
    model = build_gpt(None, **args).eval()
    for prm in model.parameters():
        torch.nn.init.normal_(prm, 0.0, std)
    return model


def assert_official_layout(model: torch.nn.Module, keys: dict, params_m: float, rel: float) -> None:
    """``model``'s state dict has exactly the official key names and shapes ``keys``, and its parameter count is
    within relative ``rel`` of the published ``params_m`` million."""
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == keys
    total = sum(v.numel() for v in model.parameters()) / 1e6
    assert abs(total - params_m) / params_m < rel, f"{total:.1f}M parameters, published {params_m}M"
