"""Tiny inputs shared by the recipe tests: a fake VQ token cache and a tiny c2i GPT saved as a recipe reads them."""

from __future__ import annotations

import json

import torch

from genaccel.data.skimage_crops import NUM_CLASSES
from genaccel.models.llamagen import ModelArgs, build_gpt
from genaccel.utils.io import save_safetensors, save_torch

VOCAB, GRID = 24, 4  # codes and grid side of the fake tokens


def write_fake_token_cache(out_dir, images: int = 8) -> None:
    """``tokens_{train,heldout}.pt`` in the format ``genaccel.train.gpt.cached_tokens`` reads (no VQ encoding)."""
    gen = torch.Generator().manual_seed(0)
    for split in ("train", "heldout"):
        data = {"tokens": torch.randint(0, VOCAB, (images, GRID * GRID), generator=gen),
                "labels": torch.randint(0, NUM_CLASSES, (images,), generator=gen), "vocab_size": VOCAB}
        save_torch(data, out_dir / f"tokens_{split}.pt")


def save_gpt(gpt, path):
    """``gpt`` as a safetensors file with its config in the metadata, as ``load_gpt`` reads it; returns the path."""
    config = {k: getattr(gpt.args, k) for k in ModelArgs.field_names()}
    return save_safetensors(gpt.state_dict(), path, metadata={"config": json.dumps(config)})


def tiny_gpt_file(out_dir):
    """A 2-layer c2i GPT over the fake grid (PyTorch default init, seed 0) saved as ``out_dir/gpt.safetensors``,
    plus the fake token cache next to it; returns the GPT."""
    torch.manual_seed(0)
    gpt = build_gpt(None, dim=32, n_layer=2, n_head=2, vocab_size=VOCAB, num_classes=NUM_CLASSES,
                    block_size=GRID * GRID, multiple_of=32)
    save_gpt(gpt, out_dir / "gpt.safetensors")
    write_fake_token_cache(out_dir)
    return gpt
