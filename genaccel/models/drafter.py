"""EAGLE-style drafter head for LlamaGen (EAGLE-1 / LANTERN ``cnets_llamagen.Model``).

Entry i reads the target's hidden state H_i (the final-normed feature that predicts image token i) and
the embedding of token t_i, fuses them with ``fc(concat(emb(t_i), H_i))``, runs ONE LlamaGen decoder
layer with the target's 2-D RoPE at token i's slot, and predicts H_{i+1}; the frozen target LM head
turns that into draft logits for token i+1. Drafting k tokens = one call over the newly committed
entries + (k - 1) single-entry calls on its own predictions, with a small static KV cache.

Two cached decoding paths compute the same function: :meth:`EagleDrafter.step` runs the shared LlamaGen
``TransformerBlock`` (the reference), :meth:`EagleDrafter.decode` is the lean path the samplers use. On a CPU
a one-entry drafter call is dominated by per-op dispatch, not arithmetic, so ``decode`` does the same maths
in about half the ops (issue #14 items 3-4): a (V, D) table holds ``fc``'s token half applied to every
embedding, the RMSNorm gains are folded into ``wqkv`` and into one stacked ``w1``/``w3`` matmul (derived
weights; the module's stay untouched), one complex multiply rotates q and k (v by exactly 1), K and V go
into one static buffer with one write, attention reads a precomputed causal table (no re-built mask) and,
on a CPU, only the slots up to the batch's highest, no dropout or dtype no-ops, and the LM head runs only
on the entries whose logits are wanted.

The token embedding and LM head are frozen copies of the target's, stored in the drafter file so the
sampler needs nothing from the target beyond the sampler contract (hidden states).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from genaccel.models.contract import reusable_outside_inference
from genaccel.models.llamagen import KVCache, ModelArgs, TransformerBlock, precompute_freqs_cis_2d
from genaccel.models.loading import config_from_metadata, load_strict, read_state_dict

BUNDLED_DRAFTER = Path(__file__).resolve().parent.parent / "assets" / "llamagen_tiny_drafter.safetensors"


@dataclass
class DrafterArgs:
    """Shape of the drafter; ``dim``/``vocab_size``/``grid_size``/``cls_token_num`` must match the target."""

    dim: int
    n_head: int
    vocab_size: int
    grid_size: int
    cls_token_num: int = 1
    multiple_of: int = 32
    norm_eps: float = 1e-5
    rope_base: float = 10000

    def layer_args(self) -> ModelArgs:
        return ModelArgs(
            dim=self.dim, n_layer=1, n_head=self.n_head, multiple_of=self.multiple_of, norm_eps=self.norm_eps,
            rope_base=self.rope_base, vocab_size=self.vocab_size, block_size=self.grid_size**2,
            cls_token_num=self.cls_token_num, token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0,
        )


@dataclass
class DrafterOutput:
    hidden: torch.Tensor  # (R, L, D) predicted next target hidden states
    logits: torch.Tensor  # (R, L, V) float32 draft logits for the token after each entry


class EagleDrafter(nn.Module):
    """One decoder layer over [token embedding; target hidden state], frozen target embedding and LM head."""

    def __init__(self, args: DrafterArgs):
        super().__init__()
        self.args = args
        layer_args = args.layer_args()
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.fc = nn.Linear(2 * args.dim, args.dim, bias=True)
        self.layer = TransformerBlock(layer_args, 0.0)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.freqs_cis = precompute_freqs_cis_2d(args.grid_size, layer_args.head_dim, args.rope_base, args.cls_token_num)
        for frozen in (self.tok_embeddings, self.output):
            frozen.weight.requires_grad_(False)

    @classmethod
    def from_target(cls, target, n_head: int | None = None) -> EagleDrafter:
        """A fresh drafter for a LlamaGen GPT, with its embedding and LM head copied (frozen) from it."""
        a = target.args
        drafter = cls(DrafterArgs(dim=a.dim, n_head=n_head or a.n_head, vocab_size=a.vocab_size,
                                  grid_size=a.grid_size, cls_token_num=a.cls_token_num, multiple_of=a.multiple_of,
                                  norm_eps=a.norm_eps, rope_base=a.rope_base))
        drafter.tok_embeddings.weight.data.copy_(target.tok_embeddings.weight.data)
        drafter.output.weight.data.copy_(target.output.weight.data)
        return drafter

    def fits(self, model) -> bool:
        """Whether this drafter was trained for a target of ``model``'s shape (vocabulary, width, grid, class slots)."""
        return self._target_shapes(model)[0] == self._target_shapes(model)[1]

    def _target_shapes(self, model) -> tuple[dict, dict]:
        a = self.args
        want = {"vocab_size": a.vocab_size, "hidden_dim": a.dim, "grid_size": a.grid_size, "cls_token_num": a.cls_token_num}
        return want, {k: getattr(model, k) for k in want}

    def check_target(self, model) -> None:
        """One clear error when the drafter was trained for a different target shape."""
        want, got = self._target_shapes(model)
        if want != got:
            raise ValueError(f"drafter was trained for a target with {want}, but this model has {got}; "
                             "train a drafter for it (python -m genaccel.train drafter) or pass --drafter")

    # ------------------------------------------------------------------ training path (no cache)
    def forward(self, tokens: torch.Tensor, hidden: torch.Tensor) -> DrafterOutput:
        """Teacher-forced entries 0..L-1 (tokens t_i, hidden H_i), causal; predicts H_{i+1} for every i."""
        L = tokens.shape[1]
        x = self.fc(torch.cat([self.tok_embeddings(tokens), hidden.to(self.fc.weight.dtype)], dim=-1))
        freqs = self.freqs_cis[self.args.cls_token_num : self.args.cls_token_num + L].to(x.device)[None]
        h = self.layer(x, freqs)
        return DrafterOutput(hidden=h, logits=self.output(h).float())

    # ------------------------------------------------------------------ decoding path (static cache)
    def setup_cache(self, rows: int, max_len: int) -> None:
        p = self.fc.weight
        la = self.layer.attention
        cache = la.kv_cache
        if (cache is None or cache.k_cache.shape[0] != rows or cache.k_cache.shape[2] < max_len
                or not reusable_outside_inference(cache.k_cache)):
            la.kv_cache = KVCache(rows, la.n_kv_head, max_len, la.head_dim, p.dtype, p.device)

    def step(self, tokens: torch.Tensor, hidden: torch.Tensor, start: int | torch.Tensor) -> DrafterOutput:
        """Entries for token indices ``start..start+L-1`` written at cache slots i (slots >= start are
        discarded first); ``start`` may instead be an (R, L) tensor of each row's slots (ragged batches).

        An entry attends to every slot <= its own, so all lower slots of its row must hold committed entries
        or entries written earlier in this chain (the sources guarantee it).
        """
        L = tokens.shape[1]
        device = tokens.device
        if isinstance(start, torch.Tensor):
            idx = start.to(device)
            kv_len = int(idx.max()) + 1
        else:
            idx = torch.arange(start, start + L, device=device)
            kv_len = start + L
        x = self.fc(torch.cat([self.tok_embeddings(tokens), hidden.to(self.fc.weight.dtype)], dim=-1))
        freqs = self.freqs_cis.to(device)[idx + self.args.cls_token_num]
        freqs = freqs if freqs.dim() == 4 else freqs[None]
        mask = torch.arange(kv_len, device=device) <= idx[..., None]  # causal over a contiguous prefix
        mask = mask[:, None] if mask.dim() == 3 else mask[None, None]
        h = self.layer(x, freqs, idx, mask, kv_len)
        return DrafterOutput(hidden=h, logits=self.output(h).float())

    def select_rows(self, index: torch.Tensor) -> None:
        """Keep only cache rows ``index`` (ragged batches drop complete images), in both cached paths."""
        cache = self.layer.attention.kv_cache
        if cache is not None:
            index = index.to(cache.k_cache.device)
            cache.k_cache, cache.v_cache = cache.k_cache[index], cache.v_cache[index]
        if self._decode_kv is not None:
            self._decode_kv = self._decode_kv[index.to(self._decode_kv.device)]
            self._decode_rows = self._decode_rows[: len(index)]

    # ------------------------------------------------------------------ lean decoding path (samplers)
    _decode_kv: torch.Tensor | None = None
    decoding_precision: str | None = None  # what setup_decoding resolved ("fp32", "bf16" or "int8")

    def setup_decoding(self, rows: int, max_len: int, precision: str = "fp32") -> None:
        """Static buffers of :meth:`decode` for ``rows`` cache rows and slots ``0..max_len-1``, with the derived
        weights stored at ``precision`` (:data:`DRAFTER_PRECISIONS`, "auto" resolved by
        :func:`resolve_drafter_precision`; see :class:`PackedLinear`).

        K and V share one (rows, max_len, 2, heads, head_dim) buffer so one indexed write stores both; the
        causal table row s says which slots an entry at slot s may read; the rotation table holds, per slot,
        the complex RoPE factor of q and k and an exact 1 for v, so one multiply rotates q and k only.
        """
        la, p = self.layer.attention, self.fc.weight
        self._fold_weights(resolve_drafter_precision(precision, p.device))
        self._decode_kv = torch.zeros(rows, max_len, 2, la.n_kv_head, la.head_dim, dtype=p.dtype, device=p.device)
        self._decode_rows = torch.arange(rows, device=p.device)[:, None]
        self._causal = torch.ones(max_len, max_len, dtype=torch.bool, device=p.device).tril()
        cls = self.args.cls_token_num
        rope = torch.view_as_complex(self.freqs_cis[cls : cls + max_len].float().contiguous()).to(p.device)
        ones = torch.ones_like(rope)
        self._rotation = torch.stack([rope, rope, ones], dim=1)[:, :, None]  # (max_len, 3 [q k v], 1, head_dim/2)

    @torch.no_grad()
    def _fold_weights(self, precision: str) -> None:
        """Weights of :meth:`decode`, derived from the module's (which stay untouched), so a call runs fewer ops:

        * the token half of ``fc`` applied to every embedding, bias included: a (V, D) table looked up per token,
          so ``fc`` reduces to one (D, D) matmul on the hidden state;
        * the RMSNorm gains folded into the matrix that follows (``W (g * n) = (W diag g) n``): into ``wqkv``
          and into ``w1``/``w3``, which are stacked into one matmul;
        * every matrix (LM head included) packed at ``precision``; for "bf16" and "int8" the matmul inputs are
          cast to bfloat16, while the residual stream, RMSNorm, the rotation, attention and the KV cache stay in
          the module's dtype (float32: bfloat16 attention is slower on a CPU, measured).

        Re-derived by every :meth:`setup_decoding` (each generation), so trained weights are picked up.
        """
        layer, D = self.layer, self.args.dim
        ffn = layer.feed_forward
        self._act_dtype = self.fc.weight.dtype if precision == "fp32" else torch.bfloat16
        self.decoding_precision = precision
        self._token_table = F.linear(self.tok_embeddings.weight, self.fc.weight[:, :D], self.fc.bias)
        self._fc_hidden = PackedLinear(self.fc.weight[:, D:], precision)
        self._wqkv = PackedLinear(layer.attention.wqkv.weight * layer.attention_norm.weight, precision)
        self._wo = PackedLinear(layer.attention.wo.weight, precision)
        self._w13 = PackedLinear(torch.cat([ffn.w1.weight, ffn.w3.weight]) * layer.ffn_norm.weight, precision)
        self._w2 = PackedLinear(ffn.w2.weight, precision)
        self._head = PackedLinear(self.output.weight, precision)

    def decode(self, tokens: torch.Tensor, hidden: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """Predicted hidden states (R, L, D) of entries (tokens, hidden) (R, L) written at per-row cache
        ``slots`` (R, L); the same function as :meth:`step` (which returns logits too), in fewer ops.

        An entry reads every slot <= its own in its row (slots hold committed entries or entries of this
        chain written earlier; the sources guarantee it). Call :meth:`setup_decoding` first.
        """
        if self._decode_kv is None or self._decode_kv.shape[0] != tokens.shape[0]:
            raise RuntimeError("EagleDrafter.decode needs setup_decoding(rows, max_len) for this many rows first")
        layer, attn = self.layer, self.layer.attention
        R, L = tokens.shape
        heads, head_dim = attn.n_head, attn.head_dim
        mm = self._act_dtype  # matmul inputs; the residual stream, attention and the cache stay in x's dtype
        # entries flattened to (R * L, D): the matmuls take 2-D inputs as they are (no reshape per matrix)
        x = self._token_table[tokens.reshape(-1)] + self._fc_hidden(hidden.reshape(R * L, -1).to(mm))
        qkv = self._wqkv(unit_rms(x, layer.attention_norm.eps).to(mm))
        qkv = qkv.view(R, L, 3, heads, head_dim // 2, 2)  # n_kv_head == n_head in LlamaGen drafters
        qkv = torch.view_as_real(torch.view_as_complex(qkv.float()) * self._rotation[slots]).flatten(-2).to(x.dtype)
        self._decode_kv.index_put_((self._decode_rows, slots), qkv[:, :, 1:])
        # On a CPU reading the highest slot is free and attention then spans only the slots in use; on an
        # accelerator the read would be a host sync per call, so attention spans the whole static cache there.
        span = int(slots.max()) + 1 if slots.device.type == "cpu" else self._decode_kv.shape[1]
        kv = self._decode_kv[:, :span].transpose(1, 3)  # (R, heads, 2, span, head_dim)
        mask = self._causal[slots, :span][:, None]  # (R, 1, L, span)
        y = F.scaled_dot_product_attention(qkv[:, :, 0].transpose(1, 2), kv[:, :, 0], kv[:, :, 1], attn_mask=mask)
        h = x + self._wo(y.transpose(1, 2).reshape(R * L, -1).to(mm))
        gate, up = self._w13(unit_rms(h, layer.ffn_norm.eps).to(mm)).chunk(2, dim=-1)
        return (h + self._w2(F.silu(gate) * up)).view(R, L, -1)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 draft logits of :meth:`decode`'s predicted hidden states (the frozen target LM head, packed
        at the decoding precision)."""
        return self._head(hidden.to(self._act_dtype)).float()


PACKED_PRECISIONS = ("fp32", "bf16", "int8")  # what PackedLinear stores
DRAFTER_PRECISIONS = ("auto", *PACKED_PRECISIONS)


def check_drafter_precision(precision: str) -> None:
    if precision not in DRAFTER_PRECISIONS:
        raise ValueError(f"drafter_precision must be one of {DRAFTER_PRECISIONS} (auto = int8 on a CPU with torch's "
                         f"int8 kernel, else fp32; fp32 = the trained weights; bf16 = bfloat16 weights and matmul "
                         f"inputs; int8 = int8 weights per output row with bfloat16 matmul inputs), got {precision!r}")


def resolve_drafter_precision(precision: str, device: torch.device | str) -> str:
    """The precision "auto" stands for on ``device``: "int8" on a CPU whose torch has the weight-only int8
    kernel (measured faster there, docs/speculative.md "Drafter precision"), else "fp32" (the fallback
    dequantizes per call, which only pays where memory traffic is the bottleneck; not measured elsewhere)."""
    check_drafter_precision(precision)
    if precision != "auto":
        return precision
    on_cpu = torch.device(device).type == "cpu"
    return "int8" if on_cpu and int8_kernel_exists() else "fp32"


def int8_kernel_exists() -> bool:
    """Whether this torch has the weight-only int8 matmul ``aten._weight_int8pack_mm`` (torch >= 2.3)."""
    return hasattr(torch.ops.aten, "_weight_int8pack_mm")


def int8_matmul_available(weight: torch.Tensor) -> bool:
    """Whether torch's CPU weight-only int8 kernel (``aten._weight_int8pack_mm``, torch >= 2.3) serves this
    weight. Its CPU kernel needs the input width K to be a multiple of 16 (measured on torch 2.14: other widths
    give wrong sums or crash), so other widths take the dequantizing fallback."""
    return weight.device.type == "cpu" and weight.shape[1] % 16 == 0 and int8_kernel_exists()


class PackedLinear:
    """``x @ W.T`` for one derived weight of :meth:`EagleDrafter.decode`, stored at a precision.

    * "fp32": the weight as trained, in the module's dtype;
    * "bf16": the weight in bfloat16 (bfloat16 inputs);
    * "int8": symmetric int8 per output row, ``W ~= s[:, None] * Q`` with ``s = max|W_row| / 127`` rounded to
      bfloat16 first (so Q is rounded against the scale actually used); bfloat16 inputs.

    Why: a one-entry drafter call on a CPU is bound by reading its weights, which each target forward evicts
    from the caches; int8 reads a quarter of float32's bytes (docs/speculative.md, "Drafter precision"). Only
    the drafts' q depend on it: exact acceptance (``sd``) stays exact, since each draft is tested against the q
    it was drawn from.
    """

    def __init__(self, weight: torch.Tensor, precision: str):
        if precision not in PACKED_PRECISIONS:
            raise ValueError(f"PackedLinear precision must be one of {PACKED_PRECISIONS} (resolve 'auto' first), "
                             f"got {precision!r}")
        self.precision, self.out_features = precision, weight.shape[0]
        weight = weight.detach()
        if precision == "fp32":
            self.weight = weight.contiguous()
        elif precision == "bf16":
            self.weight = weight.to(torch.bfloat16).contiguous()
        else:
            w = weight.float()
            self.scale = (w.abs().amax(dim=1) / 127.0).clamp(min=torch.finfo(torch.float32).tiny).to(torch.bfloat16)
            self.weight = (w / self.scale.float()[:, None]).round().clamp(-127, 127).to(torch.int8).contiguous()
            self.fused = int8_matmul_available(self.weight)

    def dequantized(self) -> torch.Tensor:
        """The weight this layer multiplies by, in float32 (the reference of the tests)."""
        if self.precision == "int8":
            return self.weight.float() * self.scale.float()[:, None]
        return self.weight.float()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.precision != "int8":
            return F.linear(x, self.weight)
        if not self.fused:
            return F.linear(x, self.weight.to(x.dtype)) * self.scale.to(x.dtype)
        if x.dim() == 2 and x.dtype == torch.bfloat16:
            return torch.ops.aten._weight_int8pack_mm(x, self.weight, self.scale)
        # other inputs are cast to bfloat16: the kernel's float32 path is 2-6x slower
        # (torch 2.14, `python -m genaccel.bench drafter`)
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, x.shape[-1]).to(torch.bfloat16), self.weight, self.scale)
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)


def unit_rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm without its gain (folded into the next matrix), normalised in float32 as LlamaGen's RMSNorm."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), None, eps)
    return F.rms_norm(x.float(), (x.shape[-1],), None, eps).type_as(x)


def drafter_metadata(args: DrafterArgs, **extra: str) -> dict[str, str]:
    return {"config": json.dumps(asdict(args)), **extra}


def load_drafter(path: str | os.PathLike = "", device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32) -> EagleDrafter:
    """Load a drafter checkpoint strictly (config from safetensors metadata); '' = the bundled one."""
    path = Path(path or BUNDLED_DRAFTER)
    sd, meta = read_state_dict(path)
    config = config_from_metadata(meta)
    if not config:
        raise ValueError(f"{path} has no drafter config in its metadata (key 'config'); export it with genaccel.train.drafter")
    model = EagleDrafter(DrafterArgs(**config))
    load_strict(model, sd, str(path))
    return model.to(device=device, dtype=dtype).eval()


__all__ = ["BUNDLED_DRAFTER", "DrafterArgs", "DrafterOutput", "EagleDrafter", "drafter_metadata", "load_drafter"]
