"""LlamaGen VQ tokenizer (VQ-16 / VQ-8), state-dict compatible with FoundationVision/LlamaGen.

Encoder/decoder follow taming-transformers as modified by LlamaGen: GroupNorm(32, eps 1e-6), swish,
attention only at the lowest resolution, asymmetric-pad stride-2 downsampling, nearest upsampling.
The quantizer l2-normalises both the latent and the codebook (argmin distance == max cosine) and keeps
the official ``quantize.codebook_used`` buffer so official checkpoints load strictly.
Unlike the official code the base width ``ch`` is configurable (official: 128), so small models fit a CPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class VQArgs:
    codebook_size: int = 16384
    codebook_embed_dim: int = 8
    codebook_l2_norm: bool = True
    codebook_show_usage: bool = True
    commit_loss_beta: float = 0.25
    entropy_loss_ratio: float = 0.0
    encoder_ch_mult: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])
    decoder_ch_mult: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])
    z_channels: int = 256
    dropout_p: float = 0.0
    ch: int = 128
    num_res_blocks: int = 2

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.encoder_ch_mult) - 1)

    @classmethod
    def from_name(cls, name: str, **overrides) -> VQArgs:
        if name not in VQ_PRESETS:
            raise ValueError(f"unknown VQ preset {name!r}; available: {', '.join(VQ_PRESETS)}")
        return cls(**{**VQ_PRESETS[name], **overrides})

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


VQ_PRESETS: dict[str, dict] = {
    "VQ-16": dict(encoder_ch_mult=[1, 1, 2, 2, 4], decoder_ch_mult=[1, 1, 2, 2, 4]),
    "VQ-8": dict(encoder_ch_mult=[1, 2, 2, 4], decoder_ch_mult=[1, 2, 2, 4]),
}


def swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, dropout: float):
        super().__init__()
        self.norm1 = group_norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, 1, 1)
        self.norm2 = group_norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1)
        if in_ch != out_ch:
            self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1, 1, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(self.dropout(swish(self.norm2(h))))
        skip = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return skip + h


class AttnBlock(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.norm = group_norm(ch)
        self.q = nn.Conv2d(ch, ch, 1)
        self.k = nn.Conv2d(ch, ch, 1)
        self.v = nn.Conv2d(ch, ch, 1)
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        n = self.norm(x)
        q = self.q(n).reshape(b, c, h * w).transpose(1, 2)
        k = self.k(n).reshape(b, c, h * w)
        v = self.v(n).reshape(b, c, h * w)
        attn = torch.softmax(torch.bmm(q, k) * c**-0.5, dim=2)  # (b, query, key)
        out = torch.bmm(v, attn.transpose(1, 2)).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, 2, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def run_level(block: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """One resolution level: each res block, followed by its attention block where the level has them."""
    for i, res in enumerate(block.res):
        h = res(h)
        if len(block.attn):
            h = block.attn[i](h)
    return h


class Encoder(nn.Module):
    def __init__(self, ch: int, ch_mult: list[int], num_res_blocks: int, z_channels: int, dropout: float):
        super().__init__()
        self.num_res_blocks = num_res_blocks
        self.conv_in = nn.Conv2d(3, ch, 3, 1, 1)
        in_mult = (1, *ch_mult)
        last = len(ch_mult) - 1
        self.conv_blocks = nn.ModuleList()
        block_in = ch
        for level, mult in enumerate(ch_mult):
            block = nn.Module()
            block.res, block.attn = nn.ModuleList(), nn.ModuleList()
            block_in, block_out = ch * in_mult[level], ch * mult
            for _ in range(num_res_blocks):
                block.res.append(ResnetBlock(block_in, block_out, dropout))
                block_in = block_out
                if level == last:
                    block.attn.append(AttnBlock(block_in))
            if level != last:
                block.downsample = Downsample(block_in)
            self.conv_blocks.append(block)
        self.mid = nn.ModuleList(
            [ResnetBlock(block_in, block_in, dropout), AttnBlock(block_in), ResnetBlock(block_in, block_in, dropout)]
        )
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, z_channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for block in self.conv_blocks:
            h = run_level(block, h)
            if hasattr(block, "downsample"):
                h = block.downsample(h)
        for m in self.mid:
            h = m(h)
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, ch: int, ch_mult: list[int], num_res_blocks: int, z_channels: int, dropout: float):
        super().__init__()
        last = len(ch_mult) - 1
        block_in = ch * ch_mult[last]
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, 1, 1)
        self.mid = nn.ModuleList(
            [ResnetBlock(block_in, block_in, dropout), AttnBlock(block_in), ResnetBlock(block_in, block_in, dropout)]
        )
        self.conv_blocks = nn.ModuleList()
        for level in reversed(range(len(ch_mult))):
            block = nn.Module()
            block.res, block.attn = nn.ModuleList(), nn.ModuleList()
            block_out = ch * ch_mult[level]
            for _ in range(num_res_blocks + 1):
                block.res.append(ResnetBlock(block_in, block_out, dropout))
                block_in = block_out
                if level == last:
                    block.attn.append(AttnBlock(block_in))
            if level != 0:
                block.upsample = Upsample(block_in)
            self.conv_blocks.append(block)
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, 3, 3, 1, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        for m in self.mid:
            h = m(h)
        for block in self.conv_blocks:
            h = run_level(block, h)
            if hasattr(block, "upsample"):
                h = block.upsample(h)
        return self.conv_out(swish(self.norm_out(h)))


@dataclass
class QuantizeOutput:
    z_q: torch.Tensor  # straight-through quantised latent (B, C, h, w)
    indices: torch.Tensor  # (B, h, w)
    vq_loss: torch.Tensor
    commit_loss: torch.Tensor


class VectorQuantizer(nn.Module):
    def __init__(self, n_e: int, e_dim: int, beta: float, l2_norm: bool, show_usage: bool):
        super().__init__()
        self.n_e, self.e_dim, self.beta, self.l2_norm = n_e, e_dim, beta, l2_norm
        self.embedding = nn.Embedding(n_e, e_dim)
        self.embedding.weight.data.uniform_(-1.0 / n_e, 1.0 / n_e)
        if l2_norm:
            self.embedding.weight.data = F.normalize(self.embedding.weight.data, dim=-1)
        if show_usage:
            self.register_buffer("codebook_used", torch.zeros(65536))

    def codebook(self) -> torch.Tensor:
        w = self.embedding.weight
        return F.normalize(w, dim=-1) if self.l2_norm else w

    def forward(self, z: torch.Tensor) -> QuantizeOutput:
        z = z.permute(0, 2, 3, 1).contiguous()
        if self.l2_norm:
            z = F.normalize(z, dim=-1)
        emb = self.codebook()
        flat = z.reshape(-1, self.e_dim)
        d = flat.pow(2).sum(1, keepdim=True) + emb.pow(2).sum(1) - 2 * flat @ emb.t()
        idx = d.argmin(dim=1)
        z_q = emb[idx].view(z.shape)
        vq_loss = (z_q - z.detach()).pow(2).mean()
        commit = self.beta * (z_q.detach() - z).pow(2).mean()
        z_q = z + (z_q - z).detach()
        return QuantizeOutput(z_q.permute(0, 3, 1, 2), idx.view(z.shape[:3]), vq_loss, commit)

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Codebook vectors for indices (B, h, w) as a (B, C, h, w) latent."""
        return self.codebook()[indices].permute(0, 3, 1, 2).contiguous()


class VQModel(nn.Module):
    """LlamaGen VQModel: ``encode(images) -> indices``, ``decode(indices) -> images`` in [-1, 1]."""

    def __init__(self, args: VQArgs):
        super().__init__()
        self.args = args
        self.encoder = Encoder(args.ch, args.encoder_ch_mult, args.num_res_blocks, args.z_channels, args.dropout_p)
        self.decoder = Decoder(args.ch, args.decoder_ch_mult, args.num_res_blocks, args.z_channels, args.dropout_p)
        self.quantize = VectorQuantizer(
            args.codebook_size, args.codebook_embed_dim, args.commit_loss_beta, args.codebook_l2_norm,
            args.codebook_show_usage,
        )
        self.quant_conv = nn.Conv2d(args.z_channels, args.codebook_embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(args.codebook_embed_dim, args.z_channels, 1)

    @property
    def downsample(self) -> int:
        return self.args.downsample

    def quantize_images(self, images: torch.Tensor) -> QuantizeOutput:
        return self.quantize(self.quant_conv(self.encoder(images)))

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> token indices (B, H/ds * W/ds) in raster order."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
        ds = self.downsample
        if images.shape[-1] % ds or images.shape[-2] % ds:
            raise ValueError(f"image size {tuple(images.shape[-2:])} must be divisible by the downsample {ds}")
        return self.quantize_images(images).indices.flatten(1)

    def decode_latent(self, z_q: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z_q))

    def decode(self, indices: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """Token indices (B, h*w) or (B, h, w) -> images (B, 3, h*ds, w*ds), roughly in [-1, 1]."""
        if indices.dim() == 2:
            n = indices.shape[1]
            h, w = grid or (int(n**0.5), int(n**0.5))
            if h * w != n:
                raise ValueError(f"{n} tokens do not form a {h}x{w} grid; pass grid=(h, w)")
            indices = indices.view(-1, h, w)
        if int(indices.max()) >= self.args.codebook_size or int(indices.min()) < 0:
            raise ValueError(f"token ids must lie in [0, {self.args.codebook_size})")
        return self.decode_latent(self.quantize.lookup(indices))

    def forward(self, images: torch.Tensor):
        q = self.quantize_images(images)
        return self.decode_latent(q.z_q), q


def build_vq(name: str | None = "VQ-16", **overrides) -> VQModel:
    args = VQArgs.from_name(name, **overrides) if name else VQArgs(**overrides)
    return VQModel(args)
