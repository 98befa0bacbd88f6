"""LlamaGen GPT, class-conditional (c2i) and text-conditional (t2i), state-dict compatible with FoundationVision/LlamaGen.

One file, one model, in the spirit of gpt-fast's ``model.py``: a ``ModelArgs`` dataclass, named presets,
a static pre-allocated KV cache, and a forward that needs nothing but tokens and cache positions.

Faithfulness notes (see shared/reference/parallel.md §1.1):
- 2-D RoPE: the first half of each head's rotation pairs carries ROW frequencies, the second half COLUMN
  frequencies; pairs are adjacent elements; class-token slots get (cos, sin) = (0, 0), which ZEROES their q/k
  (this is what the official checkpoints were trained with, LlamaGen issue #54).
- RMSNorm is computed in float32 and cast back; the output head returns float32 logits.
- FFN hidden size = find_multiple(int(2 * 4 * dim / 3 [* ffn_dim_multiplier]), multiple_of).

The sampler contract methods (``setup_cache``, ``prefill``, ``forward_tokens``, ``rollback``) are documented
in :mod:`genaccel.models.contract`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from genaccel.models.contract import ModelOutput, reusable_outside_inference


def find_multiple(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - (n % k)


@dataclass
class ModelArgs:
    """Every field of the official ``ModelArgs`` that affects weights or numerics."""

    dim: int = 4096
    n_layer: int = 32
    n_head: int = 32
    n_kv_head: int | None = None
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    rope_base: float = 10000
    norm_eps: float = 1e-5
    initializer_range: float = 0.02
    token_dropout_p: float = 0.1
    attn_dropout_p: float = 0.0
    resid_dropout_p: float = 0.1
    ffn_dropout_p: float = 0.1
    drop_path_rate: float = 0.0
    num_classes: int = 1000
    caption_dim: int = 2048  # t2i: width of the text features (FLAN-T5-XL: 2048)
    class_dropout_prob: float = 0.1  # c2i: null-class dropout; t2i: null-caption dropout (CFG training)
    model_type: str = "c2i"  # 'c2i' class-conditional; 't2i' caption-conditional (LlamaGenT2I)
    vocab_size: int = 16384
    cls_token_num: int = 1
    block_size: int = 256
    layout: str = "2d"  # '2d': n x n token grid, 2-D RoPE (LlamaGen c2i); '1d': a token sequence, 1-D RoPE

    def __post_init__(self) -> None:
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.model_type not in ("c2i", "t2i"):
            raise ValueError(f"model_type={self.model_type!r} must be 'c2i' (class labels) or 't2i' (text captions)")
        if self.model_type == "t2i" and self.layout != "2d":
            raise ValueError("a t2i model needs layout='2d' (LlamaGen t2i generates a token grid)")
        if self.dim % self.n_head:
            raise ValueError(f"dim={self.dim} must be divisible by n_head={self.n_head}.")
        if self.layout not in ("2d", "1d"):
            raise ValueError(f"layout={self.layout!r} must be '2d' (token grid) or '1d' (token sequence, e.g. FlexTok)")
        if self.layout == "1d":
            if self.block_size < 1 or (self.dim // self.n_head) % 2:
                raise ValueError("a 1-D model needs block_size >= 1 and an even head_dim (RoPE pairs)")
            return
        grid = math.isqrt(self.block_size)
        if grid * grid != self.block_size:
            raise ValueError(f"block_size={self.block_size} must be a square (16x16=256, 24x24=576 tokens), "
                             "or set layout='1d' for a token sequence")
        if (self.dim // self.n_head) % 4:
            raise ValueError("head_dim must be divisible by 4 for 2-D RoPE (row and column halves of pairs).")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def grid_size(self) -> int:
        """Side n of the n x n token grid; 0 for a 1-D layout (no 2-D structure, the contract's convention)."""
        return 0 if self.layout == "1d" else math.isqrt(self.block_size)

    @property
    def ffn_hidden(self) -> int:
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return find_multiple(hidden, self.multiple_of)

    @classmethod
    def from_name(cls, name: str, **overrides) -> ModelArgs:
        if name not in GPT_PRESETS:
            raise ValueError(f"unknown GPT preset {name!r}; available: {', '.join(GPT_PRESETS)}")
        return cls(**{**GPT_PRESETS[name], **overrides})

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


# Official c2i configurations (LlamaGen autoregressive/models/gpt.py, GPT_models).
GPT_PRESETS: dict[str, dict] = {
    "GPT-B": dict(n_layer=12, n_head=12, dim=768),
    "GPT-L": dict(n_layer=24, n_head=16, dim=1024),
    "GPT-XL": dict(n_layer=36, n_head=20, dim=1280),
    "GPT-XXL": dict(n_layer=48, n_head=24, dim=1536),
    "GPT-XXXL": dict(n_layer=48, n_head=40, dim=2560),
    "GPT-3B": dict(n_layer=24, n_head=32, dim=3200),
}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # LlamaGen normalises in float32, casts back, then scales; F.rms_norm is the same maths in one op,
        # which matters on CPU where a one-token forward is dominated by per-op dispatch.
        if x.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        return F.rms_norm(x.float(), (x.shape[-1],), None, self.eps).type_as(x) * self.weight


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        hidden = args.ffn_hidden
        self.w1 = nn.Linear(args.dim, hidden, bias=False)
        self.w3 = nn.Linear(args.dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, args.dim, bias=False)
        self.ffn_dropout = nn.Dropout(args.ffn_dropout_p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn_dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class KVCache(nn.Module):
    """Static K/V buffers of shape (batch, kv_heads, max_len, head_dim), written at given slots.

    ``positions`` is (L,) for slots shared by every row, or (B, L) for per-row slots (ragged batches).
    """

    def __init__(self, batch: int, kv_heads: int, max_len: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch, kv_heads, max_len, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        if positions.dim() == 1:
            self.k_cache.index_copy_(2, positions, k.to(self.k_cache.dtype))
            self.v_cache.index_copy_(2, positions, v.to(self.v_cache.dtype))
        else:
            idx = positions[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
            self.k_cache.scatter_(2, idx, k.to(self.k_cache.dtype))
            self.v_cache.scatter_(2, idx, v.to(self.v_cache.dtype))
        return self.k_cache, self.v_cache


def precompute_freqs_cis_2d(grid_size: int, head_dim: int, base: float = 10000, cls_token_num: int = 1) -> torch.Tensor:
    """(cls_token_num + grid_size**2, head_dim // 2, 2) table of (cos, sin); class slots are all zero."""
    half = head_dim // 2
    cpu = torch.device("cpu")  # explicit, so building a model under `with torch.device("meta")` works
    freqs = 1.0 / (base ** (torch.arange(0, half, 2, device=cpu)[: half // 2].float() / half))
    t = torch.arange(grid_size, dtype=torch.float32, device=cpu)
    angles = torch.outer(t, freqs)  # (grid, head_dim // 4)
    grid = torch.cat(
        [angles[:, None, :].expand(-1, grid_size, -1), angles[None, :, :].expand(grid_size, -1, -1)], dim=-1
    )  # (row, col, head_dim // 2): row frequencies first, column frequencies second
    table = torch.stack([torch.cos(grid), torch.sin(grid)], dim=-1).flatten(0, 1)
    return torch.cat([torch.zeros(cls_token_num, half, 2, device=cpu), table])


def precompute_freqs_cis_1d(seq_len: int, head_dim: int, base: float = 10000, cls_token_num: int = 1) -> torch.Tensor:
    """(cls_token_num + seq_len, head_dim // 2, 2) table of (cos, sin) over token index; class slots zero.

    LlamaGen's 1-D ``precompute_freqs_cis``: pair i of token t turns by t / base**(2i / head_dim).
    """
    cpu = torch.device("cpu")
    freqs = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=cpu)[: head_dim // 2].float() / head_dim))
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=cpu), freqs)
    table = torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1)
    return torch.cat([torch.zeros(cls_token_num, head_dim // 2, 2, device=cpu), table])


def precompute_freqs_cis(args: ModelArgs) -> torch.Tensor:
    """The RoPE table of a model's layout: 2-D over the token grid, or 1-D over the token sequence."""
    if args.layout == "1d":
        return precompute_freqs_cis_1d(args.block_size, args.head_dim, args.rope_base, args.cls_token_num)
    return precompute_freqs_cis_2d(args.grid_size, args.head_dim, args.rope_base, args.cls_token_num)


def apply_rotary_emb(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs of x (B, L, H, D) by freqs (B or 1, L, D/2, 2), in float32.

    The pair (a, b) rotated by (cos, sin) is the complex product (a + ib)(cos + i sin), LlamaGen's formula;
    one complex multiply is a handful of ops instead of a dozen.
    """
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)).contiguous())
    fc = torch.view_as_complex(freqs.float().contiguous())[:, :, None]  # broadcast over heads
    return torch.view_as_real(xc * fc).flatten(3).type_as(x)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = args.n_head, args.n_kv_head, args.head_dim
        self.wqkv = nn.Linear(args.dim, (args.n_head + 2 * args.n_kv_head) * args.head_dim, bias=False)
        self.wo = nn.Linear(args.dim, args.dim, bias=False)
        self.attn_dropout_p = args.attn_dropout_p
        self.resid_dropout = nn.Dropout(args.resid_dropout_p)
        self.kv_cache: KVCache | None = None

    def forward(self, x, freqs, positions=None, mask=None, kv_len=None):
        B, L, _ = x.shape
        q_dim, kv_dim = self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        qk, v = self.wqkv(x).split([q_dim + kv_dim, kv_dim], dim=-1)
        qk = apply_rotary_emb(qk.unflatten(-1, (self.n_head + self.n_kv_head, self.head_dim)), freqs)
        q, k = qk.transpose(1, 2).split([self.n_head, self.n_kv_head], dim=1)  # q and k rotated in one call
        v = v.view(B, L, self.n_kv_head, self.head_dim).transpose(1, 2)
        if self.kv_cache is not None and positions is not None:
            k, v = self.kv_cache.update(positions, k, v)
            k, v = k[:, :, :kv_len], v[:, :, :kv_len]
        if self.n_kv_head != self.n_head:
            rep = self.n_head // self.n_kv_head
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        dropout = self.attn_dropout_p if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, dropout_p=dropout)
        return self.resid_dropout(self.wo(y.transpose(1, 2).reshape(B, L, -1)))


class DropPath(nn.Module):
    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = x.new_empty(x.shape[0], *([1] * (x.dim() - 1))).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, drop_path: float):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.drop_path = DropPath(drop_path)

    def forward(self, x, freqs, positions=None, mask=None, kv_len=None):
        h = x + self.drop_path(self.attention(self.attention_norm(x), freqs, positions, mask, kv_len))
        return h + self.drop_path(self.feed_forward(self.ffn_norm(h)))


class LabelEmbedder(nn.Module):
    """Class embedding table; row ``num_classes`` is the null (unconditional) class used by CFG."""

    def __init__(self, num_classes: int, dim: int, dropout_prob: float):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), dim)
        self.num_classes = num_classes

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(labels).unsqueeze(1)


@dataclass
class SlotState:
    """Class slots of some rows: per-layer K and V (R, H, T, hd), and their outputs (R, T, ...)."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    logits: torch.Tensor
    hidden: torch.Tensor


class ConditionBank:
    """Class slots of distinct labels (per label: per-layer K and V (H, T, hd) and outputs (T, ...)), at most
    ``size`` labels and ``max_bytes`` bytes (later ones are not kept). Class slots attend only to each other,
    so for a fixed model they depend on the label alone."""

    def __init__(self, size: int, max_bytes: int):
        self.size, self.max_bytes, self.nbytes = size, max_bytes, 0
        self.entries: dict[int, tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor, torch.Tensor]] = {}

    def missing(self, labels: torch.Tensor) -> torch.Tensor:
        """The distinct labels of ``labels`` not in the bank, in first-seen order."""
        seen, out = set(self.entries), []
        for lab in labels.tolist():
            if lab not in seen:
                seen.add(lab)
                out.append(lab)
        return torch.tensor(out, dtype=labels.dtype, device=labels.device)

    def add(self, labels: torch.Tensor, rows: SlotState) -> None:
        """Keep the rows of ``rows`` whose label is new, while there is room. One gather per tensor copies all
        kept rows at once (the batch cache is rewritten later), so a prefill adds 2 x layers + 2 ops however
        many labels it brings."""
        per_row = sum(t[0].numel() * t.element_size() for t in (*rows.k, *rows.v, rows.logits, rows.hidden))
        keep, new, names = [], set(), labels.tolist()
        for i, lab in enumerate(names):
            if lab in self.entries or lab in new:
                continue
            if len(self.entries) + len(keep) >= self.size or self.nbytes + (len(keep) + 1) * per_row > self.max_bytes:
                break
            keep.append(i)
            new.add(lab)
        if not keep:
            return
        sel = torch.tensor(keep, device=rows.logits.device)
        k, v = [t[sel] for t in rows.k], [t[sel] for t in rows.v]  # advanced indexing: copies
        logits, hidden = rows.logits[sel], rows.hidden[sel]
        for j, i in enumerate(keep):
            self.entries[names[i]] = ([t[j] for t in k], [t[j] for t in v], logits[j], hidden[j])
        self.nbytes += len(keep) * per_row


def stack_slot_rows(rows: list[tuple]) -> SlotState:
    """One :class:`SlotState` from per-row entries (as :class:`ConditionBank` keeps them), in order."""
    layers = len(rows[0][0])
    return SlotState([torch.stack([r[0][j] for r in rows]) for j in range(layers)],
                     [torch.stack([r[1][j] for r in rows]) for j in range(layers)],
                     torch.stack([r[2] for r in rows]), torch.stack([r[3] for r in rows]))


class LlamaGenGPT(nn.Module):
    """LlamaGen c2i transformer implementing the genaccel sampler contract."""

    # Class-slot bank (contract call 6): the class slots' K/V and outputs of up to this many conditions, kept
    # from prefill/prefill_rows until the next setup_cache, so refilling a row with a condition seen before
    # runs no forward. 0 = off (families whose class slots depend on more than the label turn it off).
    condition_bank_size: int = 1024
    condition_bank_bytes: int = 512 * 2**20  # LlamaGen-XXL keeps ~0.36 MB per label (bf16 K/V, float32 logits)

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.cls_embedding = LabelEmbedder(args.num_classes, args.dim, args.class_dropout_prob)
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.tok_dropout = nn.Dropout(args.token_dropout_p)
        self.layers = nn.ModuleList(TransformerBlock(args, rate) for rate in self.drop_path_rates(args))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        # A plain attribute (not a buffer), as in the official code, so state dicts carry no RoPE table.
        self.freqs_cis = precompute_freqs_cis(args)
        self.max_batch_size = -1
        self.max_seq_len = -1
        self.valid_len: torch.Tensor | None = None

    @staticmethod
    def drop_path_rates(args: ModelArgs) -> list[float]:
        """One drop-path rate per block, rising linearly to ``drop_path_rate`` (LlamaGen's n_layer blocks)."""
        return [args.drop_path_rate * i / max(1, args.n_layer - 1) for i in range(args.n_layer)]

    # ----------------------------------------------------------------- contract attributes
    @property
    def vocab_size(self) -> int:
        return self.args.vocab_size

    @property
    def num_classes(self) -> int:
        return self.args.num_classes

    @property
    def null_class(self) -> int:
        return self.args.num_classes

    @property
    def cls_token_num(self) -> int:
        return self.args.cls_token_num

    @property
    def grid_size(self) -> int:
        return self.args.grid_size

    @property
    def num_image_tokens(self) -> int:
        """Tokens a sampler generates: ``block_size``, or the prefix length set by :meth:`set_generation_length`."""
        return getattr(self, "_generation_length", None) or self.args.block_size

    def set_generation_length(self, k: int | None) -> None:
        """Generate only the first k tokens of a 1-D sequence (FlexTok: any prefix decodes); None = all.

        Only a 1-D model allows it: a prefix of a 2-D grid is not an image.
        """
        if k is not None and self.args.layout != "1d":
            raise ValueError("a generation length shorter than the model's sequence needs a 1-D model "
                             "(--num-tokens is for --model flextok); a 2-D grid needs all its tokens")
        if k is not None and not 1 <= k <= self.args.block_size:
            raise ValueError(f"--num-tokens must lie in [1, {self.args.block_size}] (the model's sequence), got {k}")
        self._generation_length = k

    @property
    def hidden_dim(self) -> int:
        return self.args.dim

    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Official initialisation: N(0, initializer_range) for linears/embeddings, zero output head."""
        std = self.args.initializer_range
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, std, generator=generator)
        nn.init.zeros_(self.output.weight)

    # ----------------------------------------------------------------- training / reference path
    def teacher_forced(self, labels: torch.Tensor, tokens: torch.Tensor) -> ModelOutput:
        """Logits predicting every token of ``tokens`` (B, N) from [class, tokens[:, :-1]], no cache.

        Same computation as the official training forward (is_causal attention, logits from slot
        cls_token_num - 1 on), so logits[:, i] is the distribution of tokens[:, i].
        """
        cond = self.cls_embedding(labels)[:, : self.cls_token_num]
        h = torch.cat([cond, self.tok_embeddings(tokens[:, :-1])], dim=1)
        h = self.tok_dropout(h)
        freqs = self.freqs_cis[: h.shape[1]].to(h.device)[None]
        for layer in self.layers:
            h = layer(h, freqs)
        h = self.norm(h)[:, self.cls_token_num - 1 :]
        return ModelOutput(logits=self.output(h).float(), hidden=h)

    # ----------------------------------------------------------------- sampler contract
    def setup_cache(self, batch_size: int, max_seq_len: int | None = None, dtype=None, device=None) -> None:
        """Allocate static K/V buffers for ``batch_size`` rows (both CFG halves count) and reset lengths."""
        max_seq_len = max_seq_len or self.cls_token_num + self.num_image_tokens
        max_seq_len = find_multiple(max_seq_len, 8)
        param = self.output.weight
        dtype = dtype or param.dtype
        device = torch.empty(0, device=device or param.device).device  # "cuda" -> "cuda:0", to compare
        cache = self.layers[0].attention.kv_cache
        shape = (batch_size, self.args.n_kv_head, max_seq_len, self.args.head_dim)
        reusable = (
            cache is not None and tuple(cache.k_cache.shape) == shape and cache.k_cache.dtype == dtype
            and cache.k_cache.device == device and reusable_outside_inference(cache.k_cache)
        )
        if not reusable:  # allocate once per shape; a new image only resets the valid lengths
            for layer in self.layers:
                layer.attention.kv_cache = KVCache(
                    batch_size, self.args.n_kv_head, max_seq_len, self.args.head_dim, dtype, device
                )
        self.max_batch_size, self.max_seq_len = batch_size, max_seq_len
        self.valid_len = torch.zeros(batch_size, dtype=torch.long, device=device)
        self._bank: ConditionBank | None = None  # weights may change between caches: start empty

    def clear_cache(self) -> None:
        """Zero every K/V buffer and valid length, as a freshly allocated cache (ZipAR's reference reads
        unwritten slots, so its outputs depend on them holding zeros)."""
        for layer in self.layers:
            if layer.attention.kv_cache is not None:
                layer.attention.kv_cache.k_cache.zero_()
                layer.attention.kv_cache.v_cache.zero_()
        if self.valid_len is not None:
            self.valid_len.zero_()

    def _require_cache(self, batch: int) -> None:
        if self.valid_len is None or self.layers[0].attention.kv_cache is None:
            raise RuntimeError("call model.setup_cache(batch_size, ...) before prefill/forward_tokens")
        if batch != self.max_batch_size:
            raise ValueError(f"batch {batch} != cache batch {self.max_batch_size}; call setup_cache again")

    def prefill(self, labels: torch.Tensor) -> ModelOutput:
        """Write the class token(s) of ``labels`` (B,) at slots 0..cls_token_num-1; resets the cache length."""
        self._require_cache(labels.shape[0])
        if labels.min() < 0 or labels.max() > self.null_class:
            raise ValueError(f"class labels must lie in [0, {self.num_classes}] ({self.num_classes} = null class)")
        self.valid_len.zero_()
        cond = self.cls_embedding(labels)[:, : self.cls_token_num]
        positions = torch.arange(self.cls_token_num, device=labels.device)
        out = self._forward_embeddings(cond, positions, None, None)
        self._bank_store(labels, torch.arange(labels.shape[0], device=labels.device), out)
        return out

    def forward_tokens(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor | None = None,
        rope_positions: torch.Tensor | None = None,
    ) -> ModelOutput:
        """Feed image tokens (B, L) into cache slots ``positions`` ((L,) or (B, L)); see contract docs."""
        self._require_cache(tokens.shape[0])
        return self._forward_embeddings(self.tok_embeddings(tokens), positions, mask, rope_positions)

    def rollback(self, length) -> None:
        """Declare only slots < length valid (int or per-row (B,) tensor); nothing is copied."""
        if self.valid_len is None:
            raise RuntimeError("call model.setup_cache before rollback")
        if isinstance(length, torch.Tensor):
            self.valid_len.copy_(torch.minimum(self.valid_len, length.to(self.valid_len)))
        else:
            self.valid_len.clamp_(max=int(length))

    def select_rows(self, index: torch.Tensor) -> None:
        """Keep only cache rows ``index`` (their K/V and valid lengths, in that order); later calls use
        ``len(index)`` rows. Ragged speculative batches drop complete images this way (contract call 5)."""
        if self.valid_len is None:
            raise RuntimeError("call model.setup_cache before select_rows")
        index = index.to(self.valid_len.device)
        for layer in self.layers:
            cache = layer.attention.kv_cache
            cache.k_cache, cache.v_cache = cache.k_cache[index], cache.v_cache[index]
        self.valid_len = self.valid_len[index]
        self.max_batch_size = index.numel()

    def prefill_rows(self, index: torch.Tensor, labels: torch.Tensor) -> ModelOutput:
        """Restart cache rows ``index`` (R',) with the conditions ``labels`` (R',) (contract call 6): their
        class slots are written as :meth:`prefill` writes them and their valid lengths become
        ``cls_token_num``; every other row keeps its K/V and length. Continuous batching refills the row of
        a complete image with it. Returns the class slots' output of those rows, in ``index`` order, with
        ``extra["computed_rows"]``: how many rows ran through the network (0 = no forward ran).

        The class slots attend only to each other, so they are a function of the label alone (in eval mode):
        labels already in the class-slot bank (:attr:`condition_bank_size`, filled by :meth:`prefill` and by
        this call since the last :meth:`setup_cache`) are copied from it; the others are computed on a small
        cache of just those rows and slots (by :meth:`prefill` itself) and copied in. No other row is touched.
        """
        if self.valid_len is None or self.layers[0].attention.kv_cache is None:
            raise RuntimeError("call model.setup_cache(batch_size, ...) and prefill before prefill_rows")
        index = index.to(self.valid_len.device)
        if index.dim() != 1 or labels.shape != index.shape:
            raise ValueError(f"prefill_rows needs one label per row: index {tuple(index.shape)}, labels "
                             f"{tuple(labels.shape)}")
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= self.max_batch_size
                              or index.unique().numel() != index.numel()):
            raise ValueError(f"prefill_rows: rows must be distinct and lie in [0, {self.max_batch_size}), got "
                             f"{index.tolist()}")
        labels = labels.to(index.device)
        bank = self._bank if self._bank_enabled() else None
        missing = labels if bank is None else bank.missing(labels)
        fresh = self._prefill_detached(missing) if missing.numel() else None  # banks what fits
        if bank is None:  # one fresh row per row, in order
            slots = fresh
        else:  # banked labels from the bank, the others from the fresh rows (a full bank keeps no more)
            first = {lab: i for i, lab in enumerate(missing.tolist())}
            slots = stack_slot_rows([
                bank.entries[lab] if lab in bank.entries else
                ([t[first[lab]] for t in fresh.k], [t[first[lab]] for t in fresh.v], fresh.logits[first[lab]],
                 fresh.hidden[first[lab]])
                for lab in labels.tolist()])
        self._write_class_slots(index, slots.k, slots.v)
        self.valid_len[index] = self.cls_token_num
        return ModelOutput(slots.logits, slots.hidden, {"computed_rows": torch.tensor(int(missing.numel()))})

    def _bank_enabled(self) -> bool:
        return self.condition_bank_size > 0 and not self.training

    def _bank_store(self, labels: torch.Tensor, rows: torch.Tensor, out: ModelOutput) -> None:
        """Keep the class slots of cache ``rows`` (just prefilled with ``labels``) in the bank, if enabled."""
        if not self._bank_enabled():
            return
        T = self.cls_token_num
        if self._bank is None:
            self._bank = ConditionBank(self.condition_bank_size, self.condition_bank_bytes)
        caches = [layer.attention.kv_cache for layer in self.layers]
        self._bank.add(labels, SlotState([c.k_cache[rows, :, :T] for c in caches],
                                         [c.v_cache[rows, :, :T] for c in caches], out.logits, out.hidden))

    def _prefill_detached(self, labels: torch.Tensor) -> SlotState:
        """Class slots of ``labels`` computed by :meth:`prefill` on a small cache of their own (stored in the
        bank when it is enabled); the batch cache and its lengths are left as they were."""
        T, caches = self.cls_token_num, [layer.attention.kv_cache for layer in self.layers]
        saved = self.valid_len, self.max_batch_size, self.max_seq_len
        k0 = caches[0].k_cache
        try:
            for layer in self.layers:
                layer.attention.kv_cache = KVCache(labels.numel(), self.args.n_kv_head, find_multiple(T, 8),
                                                   self.args.head_dim, k0.dtype, k0.device)
            self.max_batch_size, self.max_seq_len = labels.numel(), find_multiple(T, 8)
            self.valid_len = torch.zeros(labels.numel(), dtype=torch.long, device=k0.device)
            out = self.prefill(labels)
            small = [layer.attention.kv_cache for layer in self.layers]
            return SlotState([c.k_cache[:, :, :T] for c in small], [c.v_cache[:, :, :T] for c in small],
                             out.logits, out.hidden)
        finally:
            for layer, cache in zip(self.layers, caches):
                layer.attention.kv_cache = cache
            self.valid_len, self.max_batch_size, self.max_seq_len = saved

    def _write_class_slots(self, index: torch.Tensor, k: list[torch.Tensor], v: list[torch.Tensor]) -> None:
        T = self.cls_token_num
        for layer, k_rows, v_rows in zip(self.layers, k, v):
            layer.attention.kv_cache.k_cache[index, :, :T] = k_rows
            layer.attention.kv_cache.v_cache[index, :, :T] = v_rows

    def default_mask(self, positions: torch.Tensor, kv_len: int) -> torch.Tensor:
        """Causal-by-slot mask that also hides slots beyond the valid length not written in this call."""
        B = self.max_batch_size
        pos = positions if positions.dim() == 2 else positions[None].expand(B, -1)
        slots = torch.arange(kv_len, device=pos.device)
        valid = slots[None, :] < self.valid_len[:, None]  # (B, kv_len)
        written = torch.zeros(B, kv_len, dtype=torch.bool, device=pos.device).scatter_(1, pos, True)
        visible = valid | written
        causal = slots[None, None, :] <= pos[:, :, None]  # (B, L, kv_len)
        return causal & visible[:, None, :]

    def _forward_embeddings(self, h, positions, mask, rope_positions) -> ModelOutput:
        B, L, _ = h.shape
        positions = positions.to(h.device)
        if positions.shape[-1] != L:
            raise ValueError(f"positions has {positions.shape[-1]} entries for {L} tokens")
        max_pos = int(positions.max())
        if max_pos >= self.max_seq_len or int(positions.min()) < 0:
            raise ValueError(f"cache slot {max_pos} out of range [0, {self.max_seq_len})")
        kv_len = max(int(self.valid_len.max()), max_pos + 1)
        if mask is None:
            mask = self.default_mask(positions, kv_len)
        else:
            mask = mask[..., :kv_len]
        rope = positions if rope_positions is None else rope_positions.to(h.device)
        freqs = self.freqs_cis.to(h.device)[rope]
        freqs = freqs if freqs.dim() == 4 else freqs[None]
        mask4 = mask[:, None] if mask.dim() == 3 else mask
        out = self._run_blocks(h, freqs, positions, mask4, kv_len)
        written_end = positions.max(dim=-1).values + 1
        self.valid_len.copy_(torch.maximum(self.valid_len, written_end.expand_as(self.valid_len)))
        return out

    def _run_blocks(self, h, freqs, positions=None, mask=None, kv_len=None) -> ModelOutput:
        """The transformer blocks and the output head over prepared inputs (model families override this)."""
        for layer in self.layers:
            h = layer(h, freqs, positions, mask, kv_len)
        h = self.norm(h)
        return ModelOutput(logits=self.output(h).float(), hidden=h)


# ============================================================================ text-to-image (t2i)
# LlamaGen's text-conditional model is the same transformer with a caption embedder in the class embedder's
# place: cls_token_num (120) condition slots hold projected FLAN-T5-XL features (caption_dim 2048). The released
# t2i checkpoints are GPT-XL at 16x16 tokens (t2i_XL_stage1_256.pt) and 32x32 tokens (t2i_XL_stage2_512.pt);
# GPT-1B and GPT-7B are the official text-conditional-only configs (LlamaGen gpt.py, GPT_models).
T2I_FIELDS = dict(model_type="t2i", cls_token_num=120, caption_dim=2048)
T2I_PRESETS: dict[str, dict] = {
    "t2i-XL-stage1": dict(GPT_PRESETS["GPT-XL"], block_size=16 * 16, **T2I_FIELDS),  # 256x256 images, VQ ds16
    "t2i-XL-stage2": dict(GPT_PRESETS["GPT-XL"], block_size=32 * 32, **T2I_FIELDS),  # 512x512 images, VQ ds16
    **{name: dict(p, **T2I_FIELDS) for name, p in GPT_PRESETS.items()},
    "GPT-1B": dict(n_layer=22, n_head=32, dim=2048, **T2I_FIELDS),
    "GPT-7B": dict(n_layer=32, n_head=32, dim=4096, **T2I_FIELDS),
}


class CaptionMLP(nn.Module):
    """LlamaGen's caption projection: bias-free ``fc2(gelu_tanh(fc1(x)))`` from caption_dim to the model width."""

    def __init__(self, in_features: int, dim: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, dim, bias=False)
        self.fc2 = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class CaptionEmbedder(nn.Module):
    """Text features (B, T, caption_dim) -> condition tokens (B, T, dim), plus the null caption used by CFG.

    As in LlamaGen, ``uncond_embedding`` (T, caption_dim), drawn N(0, 1/caption_dim), is a *buffer*: saved in the
    state dict but never trained (the official code registers it with ``register_buffer``), so the null caption is
    a fixed random caption that training (``class_dropout_prob`` of captions replaced by it) teaches the model to
    read as "no text". The official embedder always has 120 null rows; here it has ``cls_token_num`` rows (the
    same for every released checkpoint).
    """

    def __init__(self, caption_dim: int, dim: int, dropout_prob: float, token_num: int):
        super().__init__()
        self.cap_proj = CaptionMLP(caption_dim, dim)
        self.register_buffer("uncond_embedding", torch.randn(token_num, caption_dim) / caption_dim**0.5)
        self.uncond_prob = dropout_prob

    def drop(self, captions: torch.Tensor, drop_ids: torch.Tensor) -> torch.Tensor:
        """Captions with rows ``drop_ids`` (B,) bool replaced by the null caption (CFG dropout)."""
        return torch.where(drop_ids[:, None, None], self.uncond_embedding.to(captions.dtype), captions)

    def forward(self, captions: torch.Tensor) -> torch.Tensor:
        return self.cap_proj(captions)


def left_pad_captions(features: torch.Tensor, mask: torch.Tensor, left_pad: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """T5 output (B, T, C) and its right-padded attention mask (B, T) as LlamaGen's t2i sampling feeds them.

    ``left_pad`` (the official default; ``--no-left-padding`` off): each caption's n valid features move to the
    last n slots (row j takes feature (j + n) mod T) and the mask is flipped. Either way the features of pad
    slots are zeroed (T5 writes non-zero vectors there); the mask is kept, because generation hides pad slots
    from attention (:func:`caption_attention_mask`).
    """
    if features.dim() != 3 or mask.shape != features.shape[:2]:
        raise ValueError(f"caption features must be (B, T, C) with a (B, T) mask, got {tuple(features.shape)} "
                         f"and {tuple(mask.shape)}")
    mask = mask.to(features.device)
    if left_pad:
        T = features.shape[1]
        n = mask.long().sum(1)
        idx = (torch.arange(T, device=features.device)[None] + n[:, None]) % T
        features = features.gather(1, idx[:, :, None].expand_as(features))
        mask = mask.flip(-1)
    return features * mask[:, :, None].to(features.dtype), mask.bool()


def caption_attention_mask(caption_mask: torch.Tensor, seq_len: int) -> torch.Tensor:
    """(B, S, S) bool attention of LlamaGen t2i: causal, caption slots with mask 0 hidden from every query, and
    every slot visible to itself (so a pad slot's row is never empty). The official training mask and the one
    ``generate(emb_masks=...)`` builds over its KV cache."""
    B, T = caption_mask.shape
    mask = torch.ones(seq_len, seq_len, dtype=torch.bool, device=caption_mask.device).tril()[None].repeat(B, 1, 1)
    mask[:, :, :T] &= caption_mask.bool()[:, None, :]
    return mask | torch.eye(seq_len, dtype=torch.bool, device=caption_mask.device)[None]


class LlamaGenT2I(LlamaGenGPT):
    """LlamaGen text-to-image GPT: ``cls_token_num`` caption slots, then the image tokens, state-dict compatible
    with the official t2i checkpoints (``cls_embedding.cap_proj.fc{1,2}.weight``, ``cls_embedding.uncond_embedding``).

    Blocks, 2-D RoPE (caption slots rotate by (0, 0), so their q and k are zero), KV cache and contract are the
    c2i model's. The condition is the prefix: :meth:`set_captions` registers P captions once, and a sampler's
    labels are caption indices 0..P-1 with ``null_class`` = P the null caption, so every sampler runs unchanged
    (CFG rows ``[cond; uncond]`` = ``[captions; null caption]``).

    Caption mask, as the official ``generate(..., emb_masks)``: a caption slot whose mask is 0 is hidden from
    every query but itself, in both CFG halves; a null-caption row paired with a caption row by the contract's
    CFG layout (row R/2 + i with row i) takes that caption's mask (official: ``torch.cat([emb_masks, emb_masks])``),
    an unpaired null row sees all its slots.
    """

    # a null-caption row's slots follow its paired caption's mask: not a function of the label alone
    condition_bank_size = 0

    def __init__(self, args: ModelArgs):
        if args.model_type != "t2i":
            raise ValueError(f"LlamaGenT2I needs model_type='t2i', got {args.model_type!r}")
        super().__init__(args)
        self.cls_embedding = CaptionEmbedder(args.caption_dim, args.dim, args.class_dropout_prob, args.cls_token_num)
        self.captions: torch.Tensor | None = None  # (P, T, caption_dim), padded as left_pad_captions returns
        self.caption_mask: torch.Tensor | None = None  # (P, T) bool
        self.cond_mask: torch.Tensor | None = None  # (R, T) bool: the caption mask of every cache row

    @property
    def num_classes(self) -> int:
        """Number of registered captions (a t2i model's 'classes' are caption indices)."""
        if self.captions is None:
            raise RuntimeError("no captions registered: call model.set_captions(features, mask) (or "
                               "pipeline.set_prompts(prompts)) before sampling; t2i labels are caption indices")
        return self.captions.shape[0]

    @property
    def null_class(self) -> int:
        return self.num_classes

    def set_captions(self, features: torch.Tensor, mask: torch.Tensor | None = None, left_pad: bool = True) -> None:
        """Register P captions: T5 features (P, cls_token_num, caption_dim) and their right-padded attention mask
        (P, cls_token_num) (None = every token valid), padded as the official sampling does (:func:`left_pad_captions`)."""
        T, C = self.cls_token_num, self.args.caption_dim
        if features.dim() != 3 or features.shape[0] < 1 or tuple(features.shape[1:]) != (T, C):
            raise ValueError(f"caption features must be (P >= 1, {T}, {C}) (cls_token_num, caption_dim), got "
                             f"{tuple(features.shape)}: encode prompts with max_length={T} by a text encoder of width {C}")
        if mask is None:
            mask = torch.ones(features.shape[:2], dtype=torch.bool, device=features.device)
        self.captions, self.caption_mask = left_pad_captions(features.float(), mask, left_pad)

    def setup_cache(self, batch_size: int, max_seq_len: int | None = None, dtype=None, device=None) -> None:
        super().setup_cache(batch_size, max_seq_len, dtype, device)
        self.cond_mask = None

    def condition_masks(self, labels: torch.Tensor) -> torch.Tensor:
        """(R, T) caption mask of each row of ``labels`` (caption indices, P = null caption); see the class doc."""
        P = self.num_classes
        masks = self.caption_mask.to(labels.device)[labels.clamp(max=P - 1)].clone()
        null, R = labels == P, labels.shape[0]
        if R % 2 == 0 and bool(null[R // 2 :].all()) and not bool(null[: R // 2].any()):
            masks[R // 2 :] = masks[: R // 2]
        else:
            masks[null] = True
        return masks

    def prefill(self, labels: torch.Tensor) -> ModelOutput:
        """Write the caption slots of ``labels`` (R,) (caption indices, ``null_class`` = the null caption)."""
        self._require_cache(labels.shape[0])
        P = self.num_classes
        if labels.min() < 0 or labels.max() > P:
            raise ValueError(f"caption indices must lie in [0, {P}] ({P} = the null caption)")
        self.valid_len.zero_()
        dtype = self.cls_embedding.cap_proj.fc1.weight.dtype
        features = self.captions.to(labels.device, dtype)[labels.clamp(max=P - 1)]
        features = self.cls_embedding.drop(features, labels == P)
        self.cond_mask = self.condition_masks(labels)
        cond = self.cls_embedding(features)[:, : self.cls_token_num]
        return self._forward_embeddings(cond, torch.arange(self.cls_token_num, device=labels.device), None, None)

    def prefill_rows(self, index: torch.Tensor, labels: torch.Tensor) -> ModelOutput:
        """The c2i call 6 with captions: rows ``index`` take the caption masks of ``labels`` (paired as
        :meth:`condition_masks` pairs a [captions; null captions] batch), every other row keeps its own."""
        before = self.cond_mask
        if before is None:
            before = torch.ones(self.max_batch_size, self.cls_token_num, dtype=torch.bool, device=index.device)
        try:
            out = super().prefill_rows(index, labels)
            masks = before.clone()
            masks[index.to(masks.device)] = self.cond_mask.to(masks.device)
        except BaseException:
            self.cond_mask = before
            raise
        self.cond_mask = masks
        return out

    def select_rows(self, index: torch.Tensor) -> None:
        super().select_rows(index)
        if self.cond_mask is not None:
            self.cond_mask = self.cond_mask[index.to(self.cond_mask.device)]

    def _run_blocks(self, h, freqs, positions=None, mask=None, kv_len=None) -> ModelOutput:
        if positions is not None and self.cond_mask is not None:
            mask = self._hide_caption_pads(mask, positions, kv_len)
        return super()._run_blocks(h, freqs, positions, mask, kv_len)

    def _hide_caption_pads(self, mask: torch.Tensor, positions: torch.Tensor, kv_len: int) -> torch.Tensor:
        """``mask`` (R or 1, 1, L, kv_len) with each row's masked caption slots hidden, except from themselves."""
        R, T = self.cond_mask.shape
        pos = positions if positions.dim() == 2 else positions[None].expand(R, -1)
        slots = torch.arange(kv_len, device=pos.device)
        pad = torch.zeros(R, kv_len, dtype=torch.bool, device=pos.device)
        n = min(T, kv_len)
        pad[:, :n] = ~self.cond_mask[:, :n].to(pos.device)
        hidden = pad[:, None, :] & (slots[None, None, :] != pos[:, :, None])  # (R, L, kv_len)
        return mask & ~hidden[:, None]

    def teacher_forced(
        self,
        captions: torch.Tensor,
        tokens: torch.Tensor,
        caption_mask: torch.Tensor | None = None,
        drop: torch.Tensor | None = None,
    ) -> ModelOutput:
        """Logits predicting every token of ``tokens`` (B, N) from [caption slots, tokens[:, :-1]], no cache: the
        official t2i training forward. ``captions`` (B, T, caption_dim) padded as :func:`left_pad_captions`
        returns, ``caption_mask`` (B, T) (None: every slot visible). ``drop`` (B,) bool swaps rows for the null
        caption (keeping their mask, as officially); None draws it with probability ``class_dropout_prob`` in
        training mode and drops nothing in eval mode."""
        B, T = captions.shape[0], self.cls_token_num
        if drop is None and self.training and self.cls_embedding.uncond_prob > 0:
            drop = torch.rand(B, device=captions.device) < self.cls_embedding.uncond_prob
        if drop is not None:
            captions = self.cls_embedding.drop(captions, drop)
        cond = self.cls_embedding(captions)[:, :T]
        h = self.tok_dropout(torch.cat([cond, self.tok_embeddings(tokens[:, :-1])], dim=1))
        S = h.shape[1]
        freqs = self.freqs_cis[:S].to(h.device)[None]
        mask = None if caption_mask is None else caption_attention_mask(caption_mask.to(h.device), S)[:, None]
        for layer in self.layers:
            h = layer(h, freqs, None, mask)
        h = self.norm(h)[:, T - 1 :]
        return ModelOutput(logits=self.output(h).float(), hidden=h)


def build_gpt(name: str | None = None, **overrides) -> LlamaGenGPT:
    """Build a GPT from a preset name and/or explicit ModelArgs fields (``model_type='t2i'``: a LlamaGenT2I)."""
    args = ModelArgs.from_name(name, **overrides) if name else ModelArgs(**overrides)
    return LlamaGenT2I(args) if args.model_type == "t2i" else LlamaGenGPT(args)
