"""Flexible-length 1D image tokenizer: FlexTok (arXiv 2502.13967) with ReTok's Redundant Token Padding.

An image becomes K ordered tokens; any prefix of k <= K of them decodes to the whole image, coarse for
small k and more detailed as k grows, so one AR model serves every token budget. Pieces, in the order the
data flows (shared/reference/tokenizers.md §1, §3, §8):

* Encoder: a ViT over the image's patches (fixed 2D sin-cos positions) followed by K learned register
  tokens; :func:`register_attention_mask` lets patches see all patches (never registers) and register i see
  all patches and registers <= i (FlexTok's ``causal_last``). So token i never depends on registers past i,
  and ``tokenize(images, k)[:, :j] == tokenize(images)[:, :j]`` for j <= k: prefixes do not depend on k.
* FSQ: ``vector_quantize_pytorch.FSQ`` (the library FlexTok's own FSQ is adapted from), without projections:
  a linear head maps each register to ``len(fsq_levels)`` numbers, FSQ rounds them. Index convention (the
  library's): level value ``l_i = code_i * (L_i // 2) + L_i // 2`` in [0, L_i), index = sum_i l_i * basis_i
  with ``basis = cumprod([1] + levels[:-1])``; :meth:`FlexTokenizer.codebook_vectors` lists the codes in
  index order.
* Nested dropout: during training each sample keeps its first ``keep_k`` tokens; the decoder input at later
  positions is one learned mask token (:func:`sample_keep_k`, :func:`nested_dropout`).
* Two decoders conditioned on the first k tokens, either or both (``decoders``): a rectified-flow decoder
  (FlexTok's, velocity prediction, sampled with diffusers' ``FlowMatchEulerDiscreteScheduler``) and a
  one-pass deterministic decoder (TiTok / One-D-Piece style: learned image queries + tokens -> pixels).

``detokenize`` uses the direct decoder by default whenever the model has one, on CPU as everywhere: one
forward instead of ``steps`` forwards of a decoder as large, deterministic, and, for models trained in a
CPU budget, the more faithful one: it optimises pixel MSE, while a flow decoder's samples are plausible
rather than faithful (tokenizers.md §1.8) and, in the short CPU runs measured here, score far lower PSNR.
Pass ``decoder="flow"`` for the flow decoder.

Choices the papers and reference code leave open, and what this file does:

1. The first stage (``latent``). FlexTok tokenizes frozen SDXL-VAE latents; no pretrained VAE can be
   fetched here, so ``latent='vq'`` uses the bundled VQ (trained in this repo, tokenizers.md §8's "tiny
   self-trained conv AE") as the frozen first stage: the tokenizer reads and reconstructs its quantised
   latent z_q (16x16x8 for a 64x64 crop; patch 2 -> 64 patches of 32 values), and pixels come from the VQ's
   decoder. z_q holds unit-norm codebook vectors, so it is scaled by sqrt(codebook_embed_dim) to unit
   variance per channel (FlexTok scales VAE latents the same way before the flow). The VQ's weights are
   part of the tokenizer (``vae.*``; its config in ``vq``), so an export is self-contained.
   ``latent='pixels'`` (default) works on pixels directly (patch 8 -> 64 patches of 192 values); it learns
   much more slowly in a CPU budget (docs/models.md).
2. Transformer blocks: pre-LayerNorm, multi-head SDPA attention with QK-LayerNorm (as FlexTok's trunk),
   GELU MLP (ratio 4), with biases; no SwiGLU, no muP. Init as MAE / DiT (xavier-uniform linears, see
   :func:`init_weights`), learned tokens trunc-normal(0.02), and FlexTok's zero-initialised code head.
3. Where the mask token goes: after each decoder's input projection (codes -> width), before the decoder's
   learned token-position embedding, one learned width-d vector per decoder (FlexTok's exact placement is
   unconfirmed, nanoflextok does the same). Masked positions therefore carry only "position j, no token",
   which is why decoding cannot see tokens past k.
4. ``pow2`` samples keep_k uniformly from {1, 2, 4, ..., 2^m <= L} plus L itself when L (K, or K + M with
   RTP) is not a power of two; ``uniform`` from {1, ..., L}. One draw per sample, shared by both decoders.
5. Redundant Token Padding (``rtp``). The reference (§3.2): ReTok appends M padding queries to the N
   queries, initialised by replicating the last queries (released code: N = 256, M = N - 32 = 224, copies
   of queries 32..255 with their own learned position embedding), quantises all N + M, applies nested
   dropout over the extended sequence (k <= N + M), and decodes only the first N at test time; its
   training-time k distribution is not released. Here: M = ``rtp_tokens`` (0 -> K - K/8, ReTok's 224/256
   ratio); padding query j = register (K - M + j) + its own learned embedding (tied to the register, as
   ReTok's clones are, not a free copy); they follow the registers in the causal mask, so they never change
   the first K tokens; keep_k is drawn over L = K + M with the same schedule; ``tokenize`` / ``detokenize``
   use at most K tokens (the decoder sees the padding positions as masked). Effect: positions near K are
   kept in many more training samples, so tail tokens carry information.
6. Rectified flow, FlexTok's MinRF convention (= diffusers'): ``x_t = sigma * noise + (1 - sigma) * x``,
   the network predicts ``v = noise - x``, sigma ~ sigmoid(N(0, 1)) (logit-normal) in training. Sampling:
   ``steps`` equal Euler steps from sigma = 1 to 0 (sigmas 1, 1 - 1/T, ..., 1/T passed to the scheduler,
   which appends 0), as FlexTok's pipeline; diffusers' default spacing would end at sigma 1/1000 and spend
   its last step on the gap to 0. Time conditioning: adaLN-zero (DiT) with one modulation for patches and
   tokens alike (FlexTok modulates the two sub-sequences separately). Left out: the CFG null condition,
   the REPA loss (needs a pretrained DINOv2) and FSQ token corruption / quantisation dropout (FlexTok's
   released values for them are unknown).
   ``flow_prediction``: what the network outputs. ``velocity`` (FlexTok's) predicts v directly; ``x``
   predicts the clean input x^ and returns v^ = (x_t - x^) / max(sigma, 0.05), trained with the same velocity
   MSE (JiT, "Back to Basics: Let Denoising Generative Models Denoise", arXiv 2511.13720: x-prediction
   with a v-loss). FlexTok decodes 64-d latent patches with a wide network; here pixel patches (8x8x3 = 192
   values) pass through a 128-wide network, and predicting the noise part of v through that bottleneck
   failed on the bundled crops (held-out PSNR ~10 dB, visibly noise, after 800 steps of batch 32), while the
   clean image is low-dimensional enough to predict. The bundled flow decoder uses ``x``.
7. Code head init (``code_init_std``). FlexTok zero-initialises it, so every token starts as the same
   centre code and the decoder first learns to ignore the tokens. A small N(0, 0.02) head (latents of std
   ~0.2 after the LayerNorm, about one FSQ level) starts them spread over a few codes; on the bundled crops
   it gave a lower held-out error after 200 steps (MSE 0.087 vs 0.092, k = 64), so the bundled recipe uses it.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from vector_quantize_pytorch import FSQ

from genaccel.models.loading import CheckpointError, config_from_metadata, load_strict, read_state_dict
from genaccel.tokenizers.vq import VQArgs, VQModel

BUNDLED_FLEXTOK = Path(__file__).resolve().parent.parent / "assets" / "flextok_tiny.safetensors"
RECIPE = "python -m genaccel.train flextok --config configs/train/flextok.yaml"
SCHEDULES = ("pow2", "uniform")
LATENTS = ("pixels", "vq")
DECODERS = ("both", "direct", "flow")
FLOW_PREDICTIONS = ("velocity", "x")
SIGMA_FLOOR = 0.05  # x-prediction: v = (x_t - x) / sigma with sigma clipped here (JiT's t-clip)


@dataclass
class FlexTokArgs:
    image_size: int = 64
    patch_size: int = 8
    width: int = 128
    depth: int = 4  # encoder blocks
    decoder_depth: int = 4  # blocks of each decoder
    heads: int = 4
    mlp_ratio: float = 4.0
    num_tokens: int = 64  # K registers = the longest token sequence
    fsq_levels: list[int] = field(default_factory=lambda: [8, 5, 5, 5])
    nested_dropout: str = "pow2"  # 'pow2' | 'uniform' (how training draws keep_k)
    rtp: bool = False  # ReTok's Redundant Token Padding (training-time padding registers)
    rtp_tokens: int = 0  # M padding registers; 0 = K - K // 8
    decoders: str = "both"  # 'direct' | 'flow' | 'both'
    latent: str = "pixels"  # 'pixels' | 'vq': what the tokenizer reads and reconstructs (note 1)
    code_init_std: float = 0.0  # code head init: 0 = FlexTok's zero init; > 0 = N(0, std) (note 7)
    flow_prediction: str = "velocity"  # 'velocity' (FlexTok) | 'x' (clean-input prediction, note 6)
    vq: dict = field(default_factory=dict)  # VQArgs fields of the frozen first stage (latent 'vq')

    def validate(self) -> None:
        problems = []
        if self.latent not in LATENTS:
            raise ValueError(f"invalid FlexTokArgs: latent must be one of {LATENTS}, got {self.latent!r}")
        if self.latent == "vq" and not self.vq:
            raise ValueError("invalid FlexTokArgs: latent 'vq' needs the VQ's config in 'vq' (the recipe's vq_path)")
        if self.image_size % self.downsample or self.input_size % self.patch_size:
            problems.append(f"patch_size {self.patch_size} must divide the input side {self.input_size} "
                            f"(image_size {self.image_size} / downsample {self.downsample})")
        if self.width % self.heads or (self.width // self.heads) % 2:
            problems.append(f"width {self.width} must split into {self.heads} heads of even size")
        if self.width % 4:
            problems.append(f"width {self.width} must be a multiple of 4 (2D sin-cos positions)")
        if self.nested_dropout not in SCHEDULES:
            problems.append(f"nested_dropout must be one of {SCHEDULES}, got {self.nested_dropout!r}")
        if self.flow_prediction not in FLOW_PREDICTIONS:
            problems.append(f"flow_prediction must be one of {FLOW_PREDICTIONS}, got {self.flow_prediction!r}")
        if self.decoders not in DECODERS:
            problems.append(f"decoders must be one of {DECODERS}, got {self.decoders!r}")
        if any(level < 3 for level in self.fsq_levels):
            problems.append(f"fsq_levels must all be >= 3 (the FSQ bound needs it), got {self.fsq_levels}")
        if self.num_tokens < 1 or not 0 <= self.rtp_tokens <= self.num_tokens:
            problems.append(f"need num_tokens >= 1 and 0 <= rtp_tokens <= num_tokens, got {self.num_tokens}, "
                            f"{self.rtp_tokens}")
        if problems:
            raise ValueError("invalid FlexTokArgs: " + "; ".join(problems))

    @property
    def downsample(self) -> int:
        """Pixels per input cell: 1 on pixels, the VQ's downsample on its latent."""
        return VQArgs(**self.vq).downsample if self.latent == "vq" else 1

    @property
    def input_size(self) -> int:
        """Side of the array the encoder reads and the decoders produce."""
        return self.image_size // self.downsample

    @property
    def input_channels(self) -> int:
        return VQArgs(**self.vq).codebook_embed_dim if self.latent == "vq" else 3

    @property
    def num_patches(self) -> int:
        return (self.input_size // self.patch_size) ** 2

    @property
    def patch_dim(self) -> int:
        return self.input_channels * self.patch_size**2

    @property
    def code_dim(self) -> int:
        return len(self.fsq_levels)

    @property
    def num_padding_tokens(self) -> int:
        """M, the RTP padding registers (0 without RTP)."""
        if not self.rtp:
            return 0
        return self.rtp_tokens or self.num_tokens - self.num_tokens // 8

    @property
    def train_length(self) -> int:
        """L = K + M: registers the encoder runs in training, and the decoder's token positions."""
        return self.num_tokens + self.num_padding_tokens

    @classmethod
    def from_name(cls, name: str, **overrides) -> FlexTokArgs:
        if name not in FLEXTOK_PRESETS:
            raise ValueError(f"unknown FlexTok preset {name!r}; available: {', '.join(FLEXTOK_PRESETS)}")
        return cls(**{**FLEXTOK_PRESETS[name], **overrides})

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


FLEXTOK_PRESETS: dict[str, dict] = {
    "FlexTok-tiny": dict(),  # the bundled model: 64 tokens, 1000 codes, width 128, 4 + 4 + 4 blocks
    "FlexTok-test": dict(image_size=32, patch_size=8, width=32, depth=1, decoder_depth=1, heads=2,
                         num_tokens=8, fsq_levels=[5, 5, 5]),
}


# ---------------------------------------------------------------------------------------------- shapes / maps


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/p * W/p, C p p) in raster order of patches."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b, (h // patch) * (w // patch), c * patch * patch)


def unpatchify(patches: torch.Tensor, patch: int, size: int, channels: int = 3) -> torch.Tensor:
    """Inverse of :func:`patchify` for square ``size`` x ``size`` arrays of ``channels`` channels."""
    b, g = patches.shape[0], size // patch
    x = patches.reshape(b, g, g, channels, patch, patch)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(b, channels, size, size)


def sincos_1d(positions: torch.Tensor, dim: int) -> torch.Tensor:
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim // 2))
    angles = positions.double()[:, None] * omega[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """Fixed 2D sin-cos position embedding (grid*grid, dim): half the channels for rows, half for columns."""
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    emb = torch.cat([sincos_1d(rows.flatten(), dim // 2), sincos_1d(cols.flatten(), dim // 2)], dim=1)
    return emb.float()


def timestep_embedding(sigma: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features of sigma in [0, 1] (scaled by 1000 like diffusers' timesteps), (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, device=sigma.device, dtype=torch.float32) / half)
    angles = 1000 * sigma.float()[:, None] * freqs[None]
    return torch.cat([angles.cos(), angles.sin()], dim=1)


def register_attention_mask(num_patches: int, num_registers: int, device: torch.device | None = None) -> torch.Tensor:
    """Boolean (N + R, N + R) mask over [patches | registers], True = query row may attend to key column.

    Patches attend to every patch and to no register; register i attends to every patch and to registers
    0..i. This is what makes token i independent of registers after i (prefix property).
    """
    n, total = num_patches, num_patches + num_registers
    mask = torch.zeros(total, total, dtype=torch.bool, device=device)
    mask[:, :n] = True
    mask[n:, n:] = torch.ones(num_registers, num_registers, dtype=torch.bool, device=device).tril()
    return mask


# ---------------------------------------------------------------------------------------------- nested dropout


def keep_k_choices(length: int, schedule: str) -> torch.Tensor:
    """The prefix lengths a schedule trains: ``pow2`` {1, 2, 4, ..., <= L} plus L, ``uniform`` {1..L}."""
    if schedule == "uniform":
        return torch.arange(1, length + 1)
    if schedule == "pow2":
        values = [2**i for i in range(length.bit_length()) if 2**i <= length]
        return torch.tensor(values + ([length] if values[-1] != length else []))
    raise ValueError(f"nested-dropout schedule must be one of {SCHEDULES}, got {schedule!r}")


def sample_keep_k(batch: int, length: int, schedule: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-sample number of kept tokens (B,), drawn uniformly from :func:`keep_k_choices`."""
    choices = keep_k_choices(length, schedule)
    pick = torch.randint(0, len(choices), (batch,), generator=generator)
    return choices[pick]


def nested_dropout(x: torch.Tensor, keep_k: torch.Tensor, mask_token: torch.Tensor) -> torch.Tensor:
    """Replace positions >= keep_k[b] of x (B, L, D) by ``mask_token`` (D,): tokens past k are never seen."""
    keep = torch.arange(x.shape[1], device=x.device)[None, :] < keep_k.to(x.device)[:, None]
    return torch.where(keep[..., None], x, mask_token.to(x.dtype))


# ---------------------------------------------------------------------------------------------- transformer


class Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.q_norm = nn.LayerNorm(width // heads, eps=1e-6)
        self.k_norm = nn.LayerNorm(width // heads, eps=1e-6)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(q), self.k_norm(k)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class MLP(nn.Module):
    def __init__(self, width: int, ratio: float):
        super().__init__()
        self.fc1 = nn.Linear(width, int(width * ratio))
        self.fc2 = nn.Linear(int(width * ratio), width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class Block(nn.Module):
    """Pre-norm transformer block; with ``adaln`` its norms are modulated by a condition vector (adaLN-zero)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, adaln: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=1e-6, elementwise_affine=not adaln)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width, eps=1e-6, elementwise_affine=not adaln)
        self.mlp = MLP(width, mlp_ratio)
        if adaln:
            self.modulation = nn.Linear(width, 6 * width)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, cond: torch.Tensor | None = None
    ) -> torch.Tensor:
        if cond is None:
            x = x + self.attn(self.norm1(x), mask)
            return x + self.mlp(self.norm2(x))
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(F.silu(cond)).chunk(6, dim=-1)
        x = x + gate1[:, None] * self.attn(modulate(self.norm1(x), shift1, scale1), mask)
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


def init_weights(module: nn.Module) -> None:
    """MAE / DiT init: xavier-uniform linear weights, zero biases, unit LayerNorms.

    Not timm's truncated-normal(0.02): chained through patch embedding, attention, code head and the
    decoder's code projection, 0.02-scale weights make the encoder's gradients so small (~1e-8, Adam's eps)
    that a CPU-budget run barely moves it.
    """
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


# ---------------------------------------------------------------------------------------------- encoder


class RegisterEncoder(nn.Module):
    """Patches + ordered registers -> one continuous ``code_dim`` vector per register (before FSQ)."""

    def __init__(self, args: FlexTokArgs):
        super().__init__()
        self.args = args
        w = args.width
        self.patch_in = nn.Linear(args.patch_dim, w)
        self.register_buffer("patch_pos", sincos_2d(args.input_size // args.patch_size, w), persistent=False)
        self.registers = nn.Parameter(torch.empty(args.num_tokens, w))
        if args.num_padding_tokens:
            self.padding_pos = nn.Parameter(torch.empty(args.num_padding_tokens, w))
        self.blocks = nn.ModuleList(Block(w, args.heads, args.mlp_ratio) for _ in range(args.depth))
        self.norm = nn.LayerNorm(w, eps=1e-6)
        self.to_code = nn.Linear(w, args.code_dim)
        init_weights(self)
        nn.init.trunc_normal_(self.registers, std=0.02)
        # Zero-init code head (FlexTok's LinearHead): latents start at the centre of the FSQ range; a
        # xavier head starts them in tanh's saturated tails, where most codes are never reached (note 7).
        nn.init.zeros_(self.to_code.weight)
        if args.code_init_std > 0:
            nn.init.normal_(self.to_code.weight, 0.0, args.code_init_std)
        if args.num_padding_tokens:
            nn.init.trunc_normal_(self.padding_pos, std=0.02)

    def queries(self, count: int) -> torch.Tensor:
        """The first ``count`` register queries (count <= K + M); past K, RTP padding queries (note 5)."""
        k, m = self.args.num_tokens, self.args.num_padding_tokens
        if count <= k:
            return self.registers[:count]
        padding = self.registers[k - m :] + self.padding_pos
        return torch.cat([self.registers, padding[: count - k]])

    def forward(self, images: torch.Tensor, count: int) -> torch.Tensor:
        """Inputs (B, C, S, S) (images or first-stage latents) -> (B, count, code_dim) register outputs."""
        patches = self.patch_in(patchify(images, self.args.patch_size)) + self.patch_pos
        registers = self.queries(count)[None].expand(images.shape[0], -1, -1)
        x = torch.cat([patches, registers], dim=1)
        mask = register_attention_mask(patches.shape[1], count, x.device)
        for block in self.blocks:
            x = block(x, mask)
        return self.to_code(self.norm(x[:, patches.shape[1] :]))


# ---------------------------------------------------------------------------------------------- decoders


class TokenConditioning(nn.Module):
    """FSQ codes (B, L, code_dim) -> decoder inputs (B, L, width): projection, nested dropout, positions."""

    def __init__(self, args: FlexTokArgs):
        super().__init__()
        self.code_in = nn.Linear(args.code_dim, args.width)
        self.mask_token = nn.Parameter(torch.empty(args.width))
        self.token_pos = nn.Parameter(torch.empty(args.train_length, args.width))
        init_weights(self)
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        nn.init.trunc_normal_(self.token_pos, std=0.02)

    def forward(self, codes: torch.Tensor, keep_k: torch.Tensor) -> torch.Tensor:
        return nested_dropout(self.code_in(codes), keep_k, self.mask_token) + self.token_pos


class DirectDecoder(nn.Module):
    """One-pass decoder: learned image queries (+ 2D positions) attend with the tokens; queries -> pixels."""

    def __init__(self, args: FlexTokArgs):
        super().__init__()
        self.args = args
        w = args.width
        self.tokens = TokenConditioning(args)
        self.image_query = nn.Parameter(torch.empty(w))
        self.register_buffer("patch_pos", sincos_2d(args.input_size // args.patch_size, w), persistent=False)
        self.blocks = nn.ModuleList(Block(w, args.heads, args.mlp_ratio) for _ in range(args.decoder_depth))
        self.norm = nn.LayerNorm(w, eps=1e-6)
        self.to_pixels = nn.Linear(w, args.patch_dim)
        init_weights(self)
        nn.init.trunc_normal_(self.image_query, std=0.02)

    def forward(self, codes: torch.Tensor, keep_k: torch.Tensor) -> torch.Tensor:
        """Codes (B, L, code_dim) of which the first keep_k[b] count -> inputs (B, C, S, S) (pixels or latent)."""
        queries = (self.image_query + self.patch_pos)[None].expand(codes.shape[0], -1, -1)
        x = torch.cat([queries, self.tokens(codes, keep_k)], dim=1)
        for block in self.blocks:
            x = block(x)
        n = self.args.num_patches
        a = self.args
        return unpatchify(self.to_pixels(self.norm(x[:, :n])), a.patch_size, a.input_size, a.input_channels)


class FlowDecoder(nn.Module):
    """Rectified-flow velocity network v(x_t, sigma | first k tokens) over [noised patches | tokens]."""

    def __init__(self, args: FlexTokArgs):
        super().__init__()
        self.args = args
        w = args.width
        self.tokens = TokenConditioning(args)
        self.patch_in = nn.Linear(args.patch_dim, w)
        self.register_buffer("patch_pos", sincos_2d(args.input_size // args.patch_size, w), persistent=False)
        self.time_mlp = nn.Sequential(nn.Linear(w, w), nn.SiLU(), nn.Linear(w, w))
        self.blocks = nn.ModuleList(Block(w, args.heads, args.mlp_ratio, adaln=True) for _ in range(args.decoder_depth))
        self.norm = nn.LayerNorm(w, eps=1e-6, elementwise_affine=False)
        self.final_modulation = nn.Linear(w, 2 * w)
        self.to_velocity = nn.Linear(w, args.patch_dim)
        init_weights(self)
        # adaLN-zero (DiT): every block starts as the identity and the velocity head at zero.
        for m in [*(b.modulation for b in self.blocks), self.final_modulation, self.to_velocity]:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(
        self, x_t: torch.Tensor, sigma: torch.Tensor, codes: torch.Tensor, keep_k: torch.Tensor
    ) -> torch.Tensor:
        """Noised inputs (B, C, S, S) at noise level sigma (B,) -> predicted velocity noise - x (same shape),
        output directly or derived from a clean-input prediction (``flow_prediction``, note 6)."""
        p, n = self.args.patch_size, self.args.num_patches
        cond = self.time_mlp(timestep_embedding(sigma, self.args.width))
        patches = self.patch_in(patchify(x_t, p)) + self.patch_pos
        x = torch.cat([patches, self.tokens(codes, keep_k)], dim=1)
        for block in self.blocks:
            x = block(x, cond=cond)
        shift, scale = self.final_modulation(F.silu(cond)).chunk(2, dim=-1)
        out = self.to_velocity(modulate(self.norm(x[:, :n]), shift, scale))
        out = unpatchify(out, p, self.args.input_size, self.args.input_channels)
        if self.args.flow_prediction == "x":
            return (x_t - out) / sigma.clamp_min(SIGMA_FLOOR)[:, None, None, None]
        return out


def euler_sigmas(steps: int) -> list[float]:
    """``steps`` equal Euler steps from sigma 1 towards 0 (the scheduler appends the final 0; note 6)."""
    return [1.0 - i / steps for i in range(steps)]


def flow_scheduler(steps: int):
    """diffusers' FlowMatchEulerDiscreteScheduler set to :func:`euler_sigmas` (imported here: diffusers is slow
    to import and only the flow decoder needs it)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    scheduler.set_timesteps(sigmas=euler_sigmas(steps))
    return scheduler


# ---------------------------------------------------------------------------------------------- the tokenizer


def trainable(module: nn.Module) -> bool:
    """Whether any parameter of ``module`` is trained (the recipe freezes parts with ``requires_grad_(False)``)."""
    return any(p.requires_grad for p in module.parameters())


@dataclass
class TrainingLosses:
    direct_mse: torch.Tensor | None  # pixel MSE of the direct decoder
    flow_mse: torch.Tensor | None  # velocity MSE of the flow decoder
    indices: torch.Tensor  # (B, L) token ids of the batch (for codebook usage)
    keep_k: torch.Tensor  # (B,) the nested-dropout draws


class FlexTokenizer(nn.Module):
    """``tokenize(images) -> (B, K)`` token ids; ``detokenize(tokens[:, :k]) -> images`` for any 1 <= k <= K."""

    def __init__(self, args: FlexTokArgs):
        super().__init__()
        args.validate()
        self.args = args
        self.encoder = RegisterEncoder(args)
        self.fsq = FSQ(levels=list(args.fsq_levels))
        if args.latent == "vq":  # the frozen first stage (note 1)
            self.vae = VQModel(VQArgs(**args.vq)).eval().requires_grad_(False)
        if args.decoders in ("both", "direct"):
            self.direct = DirectDecoder(args)
        if args.decoders in ("both", "flow"):
            self.flow = FlowDecoder(args)

    @property
    def num_tokens(self) -> int:
        return self.args.num_tokens

    def train(self, mode: bool = True) -> FlexTokenizer:
        """As ``nn.Module.train``, but the frozen first stage always stays in eval mode."""
        super().train(mode)
        if hasattr(self, "vae"):
            self.vae.eval()
        return self

    @property
    def latent_scale(self) -> float:
        """z_q holds unit-norm vectors: sqrt(C) gives unit variance per channel (note 1)."""
        return math.sqrt(self.args.input_channels)

    @torch.no_grad()
    def images_to_input(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, S, S) in [-1, 1] -> what the tokenizer reads: the images, or the VQ's scaled z_q."""
        if not hasattr(self, "vae"):
            return images
        return self.vae.quantize_images(images).z_q * self.latent_scale

    def input_to_images(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`images_to_input` up to the first stage's reconstruction (VQ decoder)."""
        if not hasattr(self, "vae"):
            return x
        return self.vae.decode_latent(x / self.latent_scale)

    @property
    def vocab_size(self) -> int:
        return math.prod(self.args.fsq_levels)

    def codebook_vectors(self) -> torch.Tensor:
        """The FSQ codes in index order, (vocab_size, code_dim), values in [-1, 1] (neighbour tables)."""
        return self.fsq.implicit_codebook.float()

    def quantize(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Continuous (B, L, code_dim) -> (codes with straight-through gradients, long token ids (B, L))."""
        codes, indices = self.fsq(latents.float())
        return codes, indices.long()

    def codes_from_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids (B, L) -> FSQ codes (B, L, code_dim)."""
        if int(tokens.min()) < 0 or int(tokens.max()) >= self.vocab_size:
            raise ValueError(f"token ids must lie in [0, {self.vocab_size})")
        return self.fsq.indices_to_codes(tokens.long())

    @torch.no_grad()
    def tokenize(self, images: torch.Tensor, k: int | None = None) -> torch.Tensor:
        """Images (B, 3, S, S) in [-1, 1] -> token ids (B, k), k = K by default.

        The encoder runs only the first k registers; by the causal register mask the result equals the first
        k of the K tokens, so encoding for a short budget is cheaper and gives the same prefix.
        """
        s = self.args.image_size
        if images.dim() != 4 or tuple(images.shape[1:]) != (3, s, s):
            raise ValueError(f"expected images of shape (B, 3, {s}, {s}), got {tuple(images.shape)}")
        k = self.num_tokens if k is None else k
        if not 1 <= k <= self.num_tokens:
            raise ValueError(f"k must lie in [1, {self.num_tokens}], got {k}")
        return self.quantize(self.encoder(self.images_to_input(images), k))[1]

    def padded_codes(self, tokens: torch.Tensor | list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prefixes (a (B, k) tensor, or a list of 1D tensors of lengths k_b) -> codes (B, L, code_dim) padded
        with code 0 (any value: padding is masked) and keep_k (B,)."""
        rows = list(tokens) if isinstance(tokens, (list, tuple)) else list(tokens.unbind(0))
        lengths = torch.tensor([row.numel() for row in rows])
        if not rows or int(lengths.min()) < 1 or int(lengths.max()) > self.num_tokens:
            raise ValueError(f"every token prefix needs 1 to {self.num_tokens} tokens, got lengths {lengths.tolist()}")
        device = rows[0].device
        padded = torch.zeros(len(rows), self.args.train_length, dtype=torch.long, device=device)
        for b, row in enumerate(rows):
            padded[b, : row.numel()] = row.flatten()
        return self.codes_from_tokens(padded), lengths.to(device)

    def decoder_kind(self, decoder: str | None) -> str:
        kind = decoder or ("direct" if hasattr(self, "direct") else "flow")
        if kind not in ("direct", "flow") or not hasattr(self, kind):
            raise ValueError(f"this tokenizer has decoders={self.args.decoders!r}; cannot decode with {decoder!r}")
        return kind

    def sample_flow(
        self, codes: torch.Tensor, keep_k: torch.Tensor, steps: int, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Euler-integrate the flow decoder from noise (sigma 1) to an input (sigma 0) in ``steps`` steps."""
        s, c = self.args.input_size, self.args.input_channels
        x = torch.randn(codes.shape[0], c, s, s, generator=generator, device=codes.device)
        scheduler = flow_scheduler(steps)
        for i, t in enumerate(scheduler.timesteps):
            sigma = scheduler.sigmas[i].to(codes.device).expand(codes.shape[0])
            velocity = self.flow(x, sigma, codes, keep_k)
            x = scheduler.step(velocity, t, x).prev_sample
        return x

    @torch.no_grad()
    def detokenize(
        self, tokens: torch.Tensor | list[torch.Tensor], steps: int = 8, decoder: str | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Token prefixes (B, k), 1 <= k <= K (or a list of per-sample prefixes) -> images (B, 3, S, S) in [-1, 1].

        Only the given tokens are used. ``decoder`` None = the direct decoder when present (module docstring),
        else the flow decoder, which takes ``steps`` Euler steps from noise drawn with ``generator``.
        """
        kind = self.decoder_kind(decoder)
        codes, keep_k = self.padded_codes(tokens)
        if kind == "direct":
            x = self.direct(codes, keep_k)
        else:
            if steps < 1:
                raise ValueError(f"steps must be >= 1, got {steps}")
            x = self.sample_flow(codes, keep_k, steps, generator)
        return self.input_to_images(x).clamp(-1, 1)

    def training_losses(self, images: torch.Tensor, generator: torch.Generator | None = None) -> TrainingLosses:
        """Both decoder objectives on one batch, with nested dropout over L = K + M encoded tokens.

        Here, not in the recipe, because which prefix lengths are trained (the schedule, RTP) is part of
        what the tokens mean.
        """
        x = self.images_to_input(images)  # the reconstruction target: pixels, or the first stage's latent
        # A frozen encoder (the flow stage of the bundled recipe) runs without a graph; a frozen decoder is skipped.
        with torch.set_grad_enabled(torch.is_grad_enabled() and trainable(self.encoder)):
            codes, indices = self.quantize(self.encoder(x, self.args.train_length))
        keep_k = sample_keep_k(images.shape[0], self.args.train_length, self.args.nested_dropout, generator)
        keep_k = keep_k.to(images.device)
        direct_mse = flow_mse = None
        if hasattr(self, "direct") and trainable(self.direct):
            direct_mse = F.mse_loss(self.direct(codes, keep_k), x)
        if hasattr(self, "flow") and trainable(self.flow):
            b = images.shape[0]
            noise = torch.randn(x.shape, generator=generator).to(images.device)
            sigma = torch.sigmoid(torch.randn(b, generator=generator)).to(images.device)  # logit-normal
            x_t = sigma[:, None, None, None] * noise + (1 - sigma[:, None, None, None]) * x
            flow_mse = F.mse_loss(self.flow(x_t, sigma, codes, keep_k), noise - x)
        return TrainingLosses(direct_mse, flow_mse, indices, keep_k)


# ---------------------------------------------------------------------------------------------- export / load


def export_metadata(model: FlexTokenizer) -> dict[str, str]:
    """Safetensors metadata of a FlexTok export: ``config`` (FlexTokArgs as JSON) and ``family``."""
    return {"config": json.dumps(asdict(model.args)), "family": "flextok"}


def suggest_flextok_config(sd: dict) -> str:
    """What the tensors say about the architecture, for a strict-load error."""
    reg = sd.get("encoder.registers")
    if reg is None:
        return f"this is not a FlexTok export (no encoder.registers); make one with `{RECIPE}`"
    depth = len({k.split(".")[2] for k in sd if k.startswith("encoder.blocks.")})
    decoders = [name for name in ("direct", "flow") if any(k.startswith(name + ".") for k in sd)]
    return (f"the tensors hold num_tokens={reg.shape[0]}, width={reg.shape[1]}, depth={depth}, decoders={decoders}; "
            f"the stored config disagrees with them: re-export the checkpoint with `{RECIPE}`")


def load_flextok(
    path: str | os.PathLike | None = None, device: str | torch.device = "cpu", **overrides
) -> FlexTokenizer:
    """Load a FlexTok export strictly (config from its safetensors metadata); the bundled one by default."""
    path = Path(path) if path is not None else BUNDLED_FLEXTOK
    if not path.is_file():
        raise FileNotFoundError(f"FlexTok weights not found: {path} (pass the path of an export, or train and "
                                f"export the bundled one with `{RECIPE}`)")
    sd, meta = read_state_dict(path)
    config = config_from_metadata(meta)
    if not config or meta.get("family") != "flextok":
        raise CheckpointError(f"{path} is not a genaccel FlexTok export: its safetensors metadata lacks "
                              f"family='flextok' and 'config' (export one with `{RECIPE}`)")
    unknown = (set(config) | set(overrides)) - set(FlexTokArgs.field_names())
    if unknown:
        raise CheckpointError(f"{path}: unknown FlexTok config field(s) {sorted(unknown)}; known: "
                              f"{FlexTokArgs.field_names()} (re-export it with `{RECIPE}`)")
    model = FlexTokenizer(FlexTokArgs(**{**config, **overrides}))
    load_strict(model, sd, str(path), suggest_flextok_config)
    return model.to(device).eval()
