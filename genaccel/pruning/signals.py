"""Attention rows recomputed from captured query/key projections (reference §3.4).

The model keeps running with SDPA/FlashAttention; pruning only needs a handful of attention rows (the [CLS]
query in the vision tower, the last text query in the LLM), which cost O(heads * tokens * head_dim) here,
instead of `output_attentions=True`, which silently falls back to eager attention for the whole model.
"""

from __future__ import annotations

import torch


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[..., T, H*dh] projection output -> [..., H, T, dh]."""
    *lead, t, width = x.shape
    return x.view(*lead, t, num_heads, width // num_heads).transpose(-3, -2)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """The RoPE companion vector (-x2, x1) used by Llama/Qwen-style rotary embeddings."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate [B, H, T, dh] states with [B, T, dh] cos/sin, as the decoder attention does before caching."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


def cls_attention(queries: torch.Tensor, keys: torch.Tensor, num_heads: int, scale: float) -> torch.Tensor:
    """Per-head attention of token 0 ([CLS]) over all tokens: [R, T, H*dh] x2 -> [R, H, T] probabilities."""
    q = split_heads(queries[:, :1].float(), num_heads)
    k = split_heads(keys.float(), num_heads)
    logits = (q @ k.transpose(-1, -2)).squeeze(-2) * scale
    return logits.softmax(dim=-1)


def head_mean_keys(keys: torch.Tensor, num_heads: int) -> torch.Tensor:
    """VisionZip's similarity metric: keys averaged over heads, [R, T, H*dh] -> [R, T, dh]."""
    return split_heads(keys.float(), num_heads).mean(dim=-3)


def last_query_attention(
    queries: torch.Tensor,
    keys: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    query_columns: torch.Tensor,
    key_valid: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    scale: float,
) -> torch.Tensor:
    """Head-mean attention row of one query per sample over all earlier valid keys (FastV's signal).

    queries [B, L, H*dh] and keys [B, L, Hkv*dh] are pre-RoPE projection outputs of one decoder layer;
    cos/sin [B, L, dh] are that layer's rotary tables; `query_columns` [B] picks each sample's query (its last
    real token); `key_valid` [B, L] is the padding mask. Returns [B, L] probabilities (zero on masked keys).
    """
    batch = torch.arange(queries.shape[0], device=queries.device)
    q = split_heads(queries[batch, query_columns].unsqueeze(1).float(), num_heads)
    k = split_heads(keys.float(), num_kv_heads)
    q = apply_rope(q, cos[batch, query_columns].unsqueeze(1).float(), sin[batch, query_columns].unsqueeze(1).float())
    k = apply_rope(k, cos.float(), sin.float())
    k = k.repeat_interleave(num_heads // num_kv_heads, dim=1)
    logits = (q @ k.transpose(-1, -2)).squeeze(-2) * scale
    columns = torch.arange(keys.shape[1], device=keys.device)
    allowed = key_valid.bool() & (columns[None] <= query_columns[:, None])
    logits = logits.masked_fill(~allowed[:, None], float("-inf"))
    return logits.softmax(dim=-1).mean(dim=1)


def rotated_key_l1(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """L1 norm of each token's post-RoPE key over heads and dims, [B, L] (DART's pivot criterion)."""
    k = apply_rope(split_heads(keys.float(), num_kv_heads), cos.float(), sin.float())
    return k.abs().sum(dim=(1, 3))


def received_attention(queries: torch.Tensor, keys: torch.Tensor, scale: float, chunk: int = 1024) -> torch.Tensor:
    """ "Global attention" for towers without [CLS] (SigLIP, Qwen-ViT; reference §3.4): the attention each
    token receives, averaged over heads and over every query of its attention block.

    queries, keys [R, H, T, dh] (post-RoPE where the tower rotates them); returns [R, T], each row summing to 1.
    Queries are processed `chunk` at a time, so memory is O(H * chunk * T) rather than O(H * T^2).
    """
    q, k = queries.float(), keys.float()
    total = q.new_zeros(q.shape[0], q.shape[1], k.shape[2])
    for start in range(0, q.shape[2], chunk):
        logits = (q[:, :, start : start + chunk] @ k.transpose(-1, -2)) * scale
        total = total + logits.softmax(dim=-1).sum(dim=2)
    return total.mean(dim=1) / q.shape[2]


def received_attention_segments(
    queries: torch.Tensor, keys: torch.Tensor, cu_seqlens: torch.Tensor, scale: float
) -> torch.Tensor:
    """`received_attention` within each block [cu_seqlens[i], cu_seqlens[i+1]) of a packed sequence (Qwen-ViT:
    one block per image frame, or per window in Qwen2.5-VL's windowed layers). queries, keys [S, H, dh]; -> [S]."""
    bounds = cu_seqlens.tolist()
    parts = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end > start:
            q = queries[start:end].transpose(0, 1)[None]
            k = keys[start:end].transpose(0, 1)[None]
            parts.append(received_attention(q, k, scale)[0])
    return torch.cat(parts) if parts else queries.new_zeros(0)
