"""Models that implement the sampler contract, and strict loaders for their checkpoints."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from genaccel.models.contract import ARModel, ModelOutput
from genaccel.models.llamagen import GPT_PRESETS, LlamaGenGPT, ModelArgs, build_gpt, find_multiple
from genaccel.models.loading import CheckpointError, config_from_metadata, load_strict, read_state_dict
from genaccel.models.nar import NAR_PRESETS, NARModel, build_nar
from genaccel.models.token_shuffle import TokenShuffleGPT, load_token_shuffle
from genaccel.tokenizers.vq import VQ_PRESETS, VQArgs, VQModel

ASSETS = Path(__file__).resolve().parent.parent / "assets"
BUNDLED = {
    "gpt": ASSETS / "llamagen_tiny_gpt.safetensors",
    "vq": ASSETS / "llamagen_tiny_vq.safetensors",
    "vq_128": ASSETS / "llamagen_tiny_vq_128.safetensors",
    "classifier": ASSETS / "crop_classifier.safetensors",
    "nar": ASSETS / "nar_tiny.safetensors",
    "token_shuffle": ASSETS / "token_shuffle_tiny.safetensors",
    "token_shuffle_128": ASSETS / "token_shuffle_128_tiny.safetensors",
    "flextok": ASSETS / "flextok_tiny.safetensors",
    "gpt_flextok": ASSETS / "llamagen_tiny_gpt_flextok.safetensors",
    "gpt_t2i": ASSETS / "llamagen_t2i_tiny.safetensors",
}


def _gpt_shape_facts(sd: dict) -> dict:
    try:
        dim = sd["tok_embeddings.weight"].shape[1]
        n_layer = len({k.split(".")[1] for k in sd if k.startswith("layers.") and k.endswith("attention_norm.weight")})
        return dict(
            dim=dim, n_layer=n_layer, vocab_size=sd["tok_embeddings.weight"].shape[0],
            cls_rows=sd["cls_embedding.embedding_table.weight"].shape[0],
            ffn_hidden=sd["layers.0.feed_forward.w1.weight"].shape[0] if n_layer else None,
        )
    except KeyError as e:
        raise CheckpointError(
            f"not a LlamaGen c2i GPT checkpoint: key {e.args[0]!r} is missing "
            "(expected tok_embeddings.weight, cls_embedding.embedding_table.weight, layers.{i}.*)"
        ) from None


def matching_preset(facts: dict, presets: dict[str, dict] = GPT_PRESETS) -> str | None:
    """The preset with the checkpoint's width and depth, if any."""
    for name, p in presets.items():
        if p["dim"] == facts["dim"] and p["n_layer"] == facts["n_layer"]:
            return name
    return None


def suggest_gpt_preset(sd: dict) -> str | None:
    """Name the preset whose (dim, n_layer) match the checkpoint, with the vocab/classes it needs."""
    try:
        f = _gpt_shape_facts(sd)
    except CheckpointError:
        return None
    name = matching_preset(f)
    if name:
        return (f"the checkpoint fits preset {name} (--gpt-model {name}) with vocab_size={f['vocab_size']}, "
                f"num_classes={f['cls_rows'] - 1}")
    return (f"no preset fits (dim={f['dim']}, n_layer={f['n_layer']}); pass the custom config fields "
            "(dim, n_layer, n_head, vocab_size, num_classes, ...) explicitly")


def _multiple_of_for(dim: int, hidden: int) -> int:
    """The largest power-of-two ``multiple_of`` that turns the default FFN width into ``hidden``."""
    base = int(2 * 4 * dim / 3)
    for m in (256, 128, 64, 32, 16, 8, 4, 2, 1):
        if find_multiple(base, m) == hidden:
            return m
    return 256


def gpt_args_for_checkpoint(
    sd: dict, gpt_model: str | None, block_size: int, facts: dict | None = None,
    presets: dict[str, dict] = GPT_PRESETS, **overrides,
) -> ModelArgs:
    """Preset (or explicit) config, with vocabulary and class count read from the checkpoint's shapes.

    ``facts`` / ``presets`` let a family with extra blocks (NAR) reuse this with its own depth and presets.
    """
    f = facts or _gpt_shape_facts(sd)
    fields = dict(vocab_size=f["vocab_size"], num_classes=f["cls_rows"] - 1, block_size=block_size)
    fields.update(overrides)
    name = gpt_model or matching_preset(f, presets)
    if name:
        if name not in presets:
            raise ValueError(f"unknown preset {name!r}; available: {', '.join(presets)}")
        return ModelArgs(**{**presets[name], **fields})
    if "n_head" not in fields:
        # A guess (e.g. dim // 64) would load without a shape error and give a silently wrong model.
        raise CheckpointError(
            f"the checkpoint's shapes (dim={f['dim']}, n_layer={f['n_layer']}) match no preset of {', '.join(presets)}, "
            f"and n_head cannot be read from shapes (the fused wqkv weight is (3*dim, dim) for every head count): "
            f"pass --n-head H (sample.py), the ModelArgs field n_head in Python (load_gpt(path, n_head=H), "
            f"load_nar likewise), or --gpt-model PRESET if it was trained as one; a .safetensors file with a 'config' metadata entry "
            f"(as genaccel saves) carries n_head and needs neither"
        )
    fields.setdefault("dim", f["dim"])
    fields.setdefault("n_layer", f["n_layer"])
    if "multiple_of" not in fields and f["ffn_hidden"]:
        fields["multiple_of"] = _multiple_of_for(f["dim"], f["ffn_hidden"])
    return ModelArgs(**fields)


def load_gpt(
    path: str | os.PathLike,
    gpt_model: str | None = None,
    image_size: int = 256,
    downsample: int = 16,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    prefer: str | None = None,
    **overrides,
) -> LlamaGenGPT:
    """Load a LlamaGen c2i GPT strictly. Config from safetensors metadata if present, else preset + shapes.

    ``image_size // downsample`` fixes the token grid (LlamaGen pitfall: a 384 checkpoint run at 256 gives a
    silently wrong RoPE grid, so the grid is always explicit here).
    """
    def args_from_shapes(sd: dict, block_size: int) -> ModelArgs:
        return gpt_args_for_checkpoint(sd, gpt_model, block_size, **overrides)

    return _load_generator(path, LlamaGenGPT, args_from_shapes, suggest_gpt_preset, image_size, downsample,
                           device, dtype, prefer, overrides)


def _load_generator(path, model_cls, args_from_shapes, suggest, image_size, downsample, device, dtype, prefer,
                    overrides) -> LlamaGenGPT:
    """What every family's loader shares: config from safetensors metadata if present, else from the shapes
    (``args_from_shapes(sd, block_size)``), then a strict load with the family's preset hint."""
    sd, meta = read_state_dict(path, prefer=prefer)
    config = config_from_metadata(meta)
    if config:
        _check_config_kind(path, config, ModelArgs, "generator (--ckpt)", "a VQ tokenizer: pass it as --vq-ckpt")
        args = ModelArgs(**{**config, **overrides})
    else:
        if image_size % downsample:
            raise ValueError(f"image_size {image_size} is not a multiple of the VQ downsample {downsample}")
        args = args_from_shapes(sd, (image_size // downsample) ** 2)
    model = model_cls(args)
    load_strict(model, sd, str(path), suggest)
    return model.to(device=device, dtype=dtype).eval()


def _check_config_kind(path, config: dict, args_cls, wanted: str, other: str) -> None:
    """A stored config with fields ``args_cls`` lacks means the file is another kind of checkpoint."""
    fields = set(getattr(args_cls, "__dataclass_fields__", {}))
    unknown = sorted(set(config) - fields)
    if fields and unknown:
        looks_gpt = {"dim", "n_layer", "n_head"} & set(unknown)
        looks_vq = {"codebook_size", "encoder_ch_mult", "z_channels"} & set(unknown)
        hint = other if (looks_gpt or looks_vq) else "check which file this is"
        raise CheckpointError(
            f"{path} is not a {wanted} checkpoint: its stored config has fields {unknown[:5]} (looks like {hint})"
        )


def _nar_facts(sd: dict) -> dict:
    """Shape facts of a NAR checkpoint; its ``layers`` hold the trunk plus one vertical-head block."""
    if "medusa_output.weight" not in sd:
        raise CheckpointError(
            "not a NAR checkpoint: medusa_output.weight (the vertical head) is missing; a plain LlamaGen GPT "
            "loads with --model llamagen"
        )
    facts = _gpt_shape_facts(sd)
    facts["n_layer"] -= 1
    return facts


def suggest_nar_preset(sd: dict) -> str | None:
    try:
        f = _nar_facts(sd)
    except CheckpointError as e:
        return str(e)
    name = matching_preset(f, NAR_PRESETS)
    if name:
        return f"the checkpoint fits preset {name} (--gpt-model {name}) with vocab_size={f['vocab_size']}"
    return f"no NAR preset fits (dim={f['dim']}, trunk n_layer={f['n_layer']}); pass the config fields explicitly"


def load_nar(
    path: str | os.PathLike,
    gpt_model: str | None = None,
    image_size: int = 256,
    downsample: int = 16,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    prefer: str | None = None,
    **overrides,
) -> NARModel:
    """Load a NAR model strictly: an official ``last_version.pt`` (``{"model": sd}``) or a genaccel safetensors.

    ``gpt_model`` names a NAR preset (NAR-B, NAR-M, NAR-L, NAR-XL, NAR-XXL; the official repo's GPT-* names
    are accepted as their NAR twins); without one the preset is inferred from the shapes.
    """
    preset = gpt_model.replace("GPT-", "NAR-") if gpt_model else None

    def args_from_shapes(sd: dict, block_size: int) -> ModelArgs:
        return gpt_args_for_checkpoint(sd, preset, block_size, facts=_nar_facts(sd), presets=NAR_PRESETS, **overrides)

    return _load_generator(path, NARModel, args_from_shapes, suggest_nar_preset, image_size, downsample, device,
                           dtype, prefer, overrides)


def suggest_vq_preset(sd: dict) -> str | None:
    levels = len({k.split(".")[2] for k in sd if k.startswith("encoder.conv_blocks.")})
    for name, p in VQ_PRESETS.items():
        if len(p["encoder_ch_mult"]) == levels:
            return f"the checkpoint has {levels} encoder levels, like preset {name}"
    return f"the checkpoint has {levels} encoder levels; pass encoder_ch_mult/decoder_ch_mult of that length"


def infer_vq_fields(sd: dict) -> dict:
    """Codebook size/dim, ``ch``, z_channels, channel multipliers and res-block count from VQ weight shapes."""
    try:
        ch = sd["encoder.conv_in.weight"].shape[0]
        levels = sorted({int(k.split(".")[2]) for k in sd if k.startswith("encoder.conv_blocks.")})
        mult = [sd[f"encoder.conv_blocks.{i}.res.0.conv1.weight"].shape[0] // ch for i in levels]
        n_res = len({k.split(".")[4] for k in sd if k.startswith("encoder.conv_blocks.0.res.")})
        return dict(
            codebook_size=sd["quantize.embedding.weight"].shape[0],
            codebook_embed_dim=sd["quantize.embedding.weight"].shape[1],
            ch=ch, z_channels=sd["encoder.conv_out.weight"].shape[0],
            encoder_ch_mult=mult, decoder_ch_mult=list(mult), num_res_blocks=n_res,
        )
    except KeyError as e:
        raise CheckpointError(f"not a LlamaGen VQ checkpoint: key {e.args[0]!r} is missing") from None


def load_vq(
    path: str | os.PathLike, vq_model: str = "VQ-16", device: str | torch.device = "cpu", **overrides
) -> VQModel:
    """Load a LlamaGen VQ tokenizer strictly; without stored config the architecture is read from the
    weight shapes (``vq_model`` names the preset used for anything shapes cannot tell)."""
    sd, meta = read_state_dict(path)
    config = config_from_metadata(meta)
    if config:
        _check_config_kind(path, config, VQArgs, "VQ tokenizer (--vq-ckpt)", "a GPT generator: pass it as --ckpt")
        args = VQArgs(**{**config, **overrides})
    else:
        fields = infer_vq_fields(sd)
        args = VQArgs.from_name(vq_model, **{**fields, **overrides})
    model = VQModel(args)
    load_strict(model, sd, str(path), suggest_vq_preset)
    return model.to(device).eval()


def require_bundled(kind: str) -> Path:
    path = BUNDLED[kind]
    if not path.is_file():
        raise FileNotFoundError(
            f"bundled {kind} weights are missing ({path}); pass --ckpt/--vq-ckpt, or regenerate them with the "
            "recipe in docs/models.md"
        )
    return path


__all__ = [
    "ARModel", "BUNDLED", "CheckpointError", "GPT_PRESETS", "LlamaGenGPT", "ModelArgs", "ModelOutput",
    "NAR_PRESETS", "NARModel", "TokenShuffleGPT", "build_nar", "load_nar", "load_token_shuffle",
    "VQArgs", "VQModel", "build_gpt", "load_gpt", "load_vq", "require_bundled", "suggest_gpt_preset",
]
