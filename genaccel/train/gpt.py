"""GPT recipe: LlamaGen c2i architecture trained on VQ tokens of the bundled crops (LlamaGen train_c2i).

Sequence = [class, z_0 .. z_254], targets z_0 .. z_255, plain cross-entropy; labels replaced by the null
class with probability ``class_dropout_prob`` so classifier-free guidance works; AdamW with betas
(0.9, 0.95) and grad clip 1.0 as upstream. Tokens of augmented training crops are computed once with the
trained VQ and cached next to the checkpoint.

``vq_path`` may instead name a FlexTok export (genaccel/tokenizers/flex.py, metadata family 'flextok'): the
crops become its K ordered 1-D tokens and the GPT gets ``layout='1d'`` (1-D RoPE over the token index), the
AR model of ``--model flextok``. ``export_path`` also writes the export there (a bundled asset).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from genaccel.data.skimage_crops import NUM_CLASSES, make_crops
from genaccel.models import load_vq
from genaccel.models.llamagen import LlamaGenGPT, ModelArgs
from genaccel.models.loading import read_state_dict
from genaccel.tokenizers.flex import load_flextok
from genaccel.train.common import (
    checkpoint_or_stop,
    cosine_lr,
    export_weights,
    float16_state,
    llamagen_adamw,
    mean_token_nll,
    resume,
    set_lr,
    start_run,
)
from genaccel.utils.io import save_torch

DEFAULTS = dict(
    out_dir="checkpoints/gpt", vq_path="checkpoints/vq/vq.safetensors", seed=0, steps=1200, batch_size=32,
    lr=1.5e-3, warmup=80, weight_decay=0.05, threads=2, bf16=False, train_per_class=1024, heldout_per_class=64,
    dim=256, n_layer=6, n_head=4, multiple_of=256, class_dropout_prob=0.1, token_dropout_p=0.0,
    resid_dropout_p=0.0, ffn_dropout_p=0.0, ckpt_every=100, log_every=50, stop_at=None, max_minutes=50.0,
    export_path="",
)


def model_args(cfg: dict, vocab_size: int, block_size: int, layout: str = "2d") -> ModelArgs:
    return ModelArgs(
        dim=cfg["dim"], n_layer=cfg["n_layer"], n_head=cfg["n_head"], multiple_of=cfg["multiple_of"],
        vocab_size=vocab_size, num_classes=NUM_CLASSES, block_size=block_size, layout=layout,
        class_dropout_prob=cfg["class_dropout_prob"], token_dropout_p=cfg["token_dropout_p"],
        resid_dropout_p=cfg["resid_dropout_p"], ffn_dropout_p=cfg["ffn_dropout_p"],
    )


@torch.no_grad()
def tokenize_crops(vq_path: str, split: str, per_class: int, seed: int, size: int = 64) -> dict:
    """VQ tokens (N, (size/downsample)^2) of ``make_crops(split, ...)`` at crop ``size``, the VQ run fully
    convolutionally at sizes other than the one it was trained on."""
    _, meta = read_state_dict(vq_path)
    if meta.get("family") == "flextok":
        tokenizer = load_flextok(vq_path)
        encode, vocab, layout = tokenizer.tokenize, tokenizer.vocab_size, "1d"
    else:
        vq = load_vq(vq_path)
        encode, vocab, layout = vq.encode, vq.args.codebook_size, "2d"
    images, labels = make_crops(split, per_class, seed=seed, size=size)
    tokens = torch.cat([encode(chunk) for chunk in tqdm(images.split(256), desc=f"tokenize {split}")])
    return {"tokens": tokens, "labels": labels, "vocab_size": vocab, "layout": layout}


def cached_tokens(out: Path, cfg: dict, split: str, per_class: int) -> dict:
    """Tokens of the recipe's crops (``cfg['image_size']``, default 64), encoded once and cached in ``out``."""
    size = int(cfg.get("image_size", 64))
    path = out / (f"tokens_{split}.pt" if size == 64 else f"tokens_{split}_{size}.pt")
    if path.exists():
        return torch.load(path, weights_only=True)
    data = tokenize_crops(cfg["vq_path"], split, per_class, cfg["seed"], size)
    save_torch(data, path)
    return data


def drop_labels(labels: torch.Tensor, p: float, null: int, gen: torch.Generator) -> torch.Tensor:
    drop = torch.rand(labels.shape, generator=gen) < p
    return torch.where(drop, torch.full_like(labels, null), labels)


def autocast(enabled: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


def token_ce(model: LlamaGenGPT, labels: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of ``teacher_forced`` logits against the tokens (every family's objective lives there)."""
    return F.cross_entropy(model.teacher_forced(labels, tokens).logits.float().flatten(0, 1), tokens.flatten())


def train_on_tokens(
    model: torch.nn.Module, opt: torch.optim.Optimizer, train: dict, cfg: dict, ckpt: Path, log,
    name: str, loss_fn: Callable, lr_at: Callable[[int], float],
) -> tuple[int, float]:
    """The loop the token-model recipes share (gpt, nar, token-shuffle): resume, then per step set
    ``lr_at(step)``, draw a batch, drop labels to the null class for CFG, ``loss_fn(model, labels, tokens)``,
    AdamW step with grad clip 1.0, log, checkpoint / stop. Returns (steps done, start time)."""
    step = resume(ckpt, model, opt, log)
    gen = torch.Generator().manual_seed(cfg["seed"] * 7919 + step)
    model.train()
    start = time.time()
    bar = tqdm(total=cfg["steps"], initial=step, desc=name, dynamic_ncols=True)
    while step < cfg["steps"]:
        lr = lr_at(step)
        set_lr(opt, lr)
        idx = torch.randint(0, len(train["tokens"]), (cfg["batch_size"],), generator=gen)
        toks = train["tokens"][idx]
        labs = drop_labels(train["labels"][idx], cfg["class_dropout_prob"], model.null_class, gen)
        with autocast(cfg["bf16"]):
            loss = loss_fn(model, labs, toks)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if step % cfg["log_every"] == 0:
            log.info(f"step {step} loss {loss.item():.4f} lr {lr:.2e} min {(time.time() - start) / 60:.1f}")
        if checkpoint_or_stop(ckpt, model, opt, step, cfg, start, log):
            break
    bar.close()
    return step, start


@torch.no_grad()
def heldout_nll(model: torch.nn.Module, data: dict, extra: str | None = None) -> float:
    """Mean per-token NLL (nats) of held-out tokens under the model's ``teacher_forced`` objective (raster GPT,
    NAR cells, Token-Shuffle windows), conditional on the class, fp32; ``extra`` names other logits of the
    output to score instead (``ModelOutput.extra[extra]``, e.g. Token-Shuffle's intra-window head)."""

    def logits_of(toks: torch.Tensor, labs: torch.Tensor) -> torch.Tensor:
        out = model.teacher_forced(labs, toks)
        return out.logits if extra is None else out.extra[extra]

    return mean_token_nll(model, data["tokens"], logits_of, data["labels"])


def main(argv: list[str] | None = None) -> dict:
    cfg, out, log = start_run(argv, DEFAULTS, "gpt")
    train = cached_tokens(out, cfg, "train", cfg["train_per_class"])
    heldout = cached_tokens(out, cfg, "heldout", cfg["heldout_per_class"])
    args = model_args(cfg, train["vocab_size"], train["tokens"].shape[1], train.get("layout", "2d"))
    model = LlamaGenGPT(args)
    model.init_weights(torch.Generator().manual_seed(cfg["seed"]))
    log.info(f"GPT params: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M, train seqs {len(train['tokens'])}")
    opt = llamagen_adamw(model, cfg)
    step, start = train_on_tokens(model, opt, train, cfg, out / "last.pt", log, "gpt", token_ce,
                                  lambda step: cosine_lr(step, cfg["steps"], cfg["lr"], cfg["warmup"]))
    metrics = {"heldout_nll_nats": heldout_nll(model, heldout), "steps": step,
               "params_m": sum(p.numel() for p in model.parameters()) / 1e6, "minutes": (time.time() - start) / 60}
    log.info(f"final {json.dumps(metrics)}")
    config = {k: getattr(args, k) for k in ModelArgs.field_names()}
    # Shipped in float16 (max relative weight error ~5e-4) to stay well under the 20 MB file limit; loading
    # upcasts to the model's dtype, and every reported number was measured on these float16-stored weights.
    meta = {"config": json.dumps(config), "stored_dtype": "float16"}
    record = {"config": config, "metrics": metrics, "recipe": cfg}
    export_weights(float16_state(model), meta, record, out, "gpt", cfg["export_path"])
    return metrics


if __name__ == "__main__":
    main()
