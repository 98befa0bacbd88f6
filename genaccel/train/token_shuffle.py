"""Token-Shuffle recipe: a LlamaGen backbone over fused s x s windows of the bundled VQ's tokens.

Initialisation. By default the backbone (class and token embeddings, transformer blocks, final norm, LM
head) is the bundled GPT's, which fits every shape: the paper, too, trains without shuffling first and then
continues with s = 2 (shared/reference/parallel.md §5). The shuffle / unshuffle projections start at
N(0, initializer_range) and the residual MLP blocks as identities (zero output layers). With ``gpt_path``
empty the whole model is initialised fresh (LlamaGen's init, zero LM head) from ``dim`` / ``n_layer`` /
``n_head`` / ``multiple_of``; those four fields are ignored when a GPT is given (its sizes are kept; the
dropout rates come from the recipe). ``shuffle_from`` (a Token-Shuffle export with the same window and width)
replaces the fresh shuffle / unshuffle modules with its trained ones.

Image size. ``image_size`` (64 or 128) picks the crops (``make_crops(size=...)``) that the bundled VQ
encodes, fully convolutionally at 128 (32x32 tokens). The backbone has no learned positions, so a GPT
trained on 16x16 tokens initialises a 128x128 model whose coarse grid of windows is again 16x16: the
same 256 positions and RoPE table it was trained with, each now carrying 4 tokens.

Objective: next-window prediction, cross-entropy on all n*n tokens (``TokenShuffleGPT.teacher_forced``),
labels replaced by the null class with probability ``class_dropout_prob`` so guidance works. Optimiser as
the GPT recipe: AdamW betas (0.9, 0.95), weight decay 0.05 on matrices, grad clip 1.0, warmup + cosine LR.
Tokens of the augmented crops come from :func:`genaccel.train.gpt.cached_tokens` (VQ-encoded once, cached in
``out_dir``). The export is float16 safetensors whose metadata carries the backbone ``config``, the
``token_shuffle`` fields, ``tokens_per_position``, ``shuffle_window`` and ``family``, plus a metrics JSON.
"""

from __future__ import annotations

import json
import time

import torch
import torch.nn.functional as F

from genaccel.data.skimage_crops import NUM_CLASSES
from genaccel.models import BUNDLED, load_gpt
from genaccel.models.llamagen import LlamaGenGPT, ModelArgs
from genaccel.models.token_shuffle import TokenShuffleArgs, TokenShuffleGPT, export_metadata, load_token_shuffle
from genaccel.train.common import cosine_lr, export_weights, float16_state, llamagen_adamw, start_run
from genaccel.train.gpt import cached_tokens, heldout_nll, train_on_tokens

DEFAULTS = dict(
    out_dir="checkpoints/token_shuffle", gpt_path=str(BUNDLED["gpt"]), vq_path=str(BUNDLED["vq"]), seed=0,
    steps=1200, batch_size=32, lr=1.0e-3, warmup=80, weight_decay=0.05, threads=2, bf16=False,
    train_per_class=1024, heldout_per_class=64, image_size=64, shuffle_from="", window=2, shuffle_blocks=2, unshuffle_blocks=2,
    intra_window_head=False,
    dim=256, n_layer=6, n_head=4, multiple_of=256, class_dropout_prob=0.1, token_dropout_p=0.0,
    resid_dropout_p=0.0, ffn_dropout_p=0.0, ckpt_every=50, log_every=25, stop_at=None, max_minutes=55.0,
    export_path="",
)


SHUFFLE_PREFIXES = ("shuffle_proj.", "shuffle_mlps.", "unshuffle_mlps.", "unshuffle_proj.", "intra_window.")


def shuffle_args(cfg: dict) -> TokenShuffleArgs:
    return TokenShuffleArgs(window=cfg["window"], shuffle_blocks=cfg["shuffle_blocks"],
                            unshuffle_blocks=cfg["unshuffle_blocks"],
                            intra_window_head=bool(cfg["intra_window_head"]))


def token_shuffle_loss(model: TokenShuffleGPT, labels: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Next-window cross-entropy; with the intra-window head, plus the head's cross-entropy (true earlier parts)."""
    out = model.teacher_forced(labels, tokens)
    loss = F.cross_entropy(out.logits.float().flatten(0, 1), tokens.flatten())
    if "sequential_logits" in out.extra:
        loss = loss + F.cross_entropy(out.extra["sequential_logits"].float().flatten(0, 1), tokens.flatten())
    return loss


def heldout_sequential_nll(model: TokenShuffleGPT, data: dict) -> float | None:
    """Held-out NLL (nats/token) of the intra-window head's logits, or None without the head."""
    return None if model.intra_window is None else heldout_nll(model, data, extra="sequential_logits")


def fresh_model(cfg: dict, vocab_size: int, block_size: int, generator: torch.Generator) -> TokenShuffleGPT:
    """A Token-Shuffle model initialised from scratch with the recipe's backbone size."""
    args = ModelArgs(
        dim=cfg["dim"], n_layer=cfg["n_layer"], n_head=cfg["n_head"], multiple_of=cfg["multiple_of"],
        vocab_size=vocab_size, num_classes=NUM_CLASSES, block_size=block_size,
        class_dropout_prob=cfg["class_dropout_prob"], token_dropout_p=cfg["token_dropout_p"],
        resid_dropout_p=cfg["resid_dropout_p"], ffn_dropout_p=cfg["ffn_dropout_p"],
    )
    model = TokenShuffleGPT(args, shuffle_args(cfg))
    model.init_weights(generator)
    return model


def token_shuffle_from_gpt(
    gpt: LlamaGenGPT, shuffle: TokenShuffleArgs, generator: torch.Generator, **overrides
) -> TokenShuffleGPT:
    """A Token-Shuffle model whose backbone is a copy of ``gpt``'s and whose shuffle modules are fresh.

    ``overrides`` may change ModelArgs fields that leave the shapes alone (dropout rates).
    """
    fields = {**{k: getattr(gpt.args, k) for k in ModelArgs.field_names()}, **overrides}
    model = TokenShuffleGPT(ModelArgs(**fields), shuffle)
    model.init_weights(generator)  # shuffle / unshuffle modules; the backbone is overwritten next
    missing, unexpected = model.load_state_dict(gpt.state_dict(), strict=False)
    if unexpected or any(not key.startswith(SHUFFLE_PREFIXES) for key in missing):
        raise ValueError(f"GPT backbone does not fit: unexpected {unexpected}, missing {missing}")
    return model


def build_model(cfg: dict, data: dict, log) -> TokenShuffleGPT:
    """The recipe's starting point: the given GPT's backbone, or a fresh model when ``gpt_path`` is empty."""
    gen = torch.Generator().manual_seed(cfg["seed"])
    block_size = data["tokens"].shape[1]
    if not cfg["gpt_path"]:
        return fresh_model(cfg, data["vocab_size"], block_size, gen)
    gpt = load_gpt(cfg["gpt_path"])
    if gpt.vocab_size != data["vocab_size"]:
        raise SystemExit(f"GPT has vocab {gpt.vocab_size} but the VQ gives {data['vocab_size']} codes: pass a "
                         "matching gpt_path, or gpt_path='' for fresh")
    if (cfg["class_dropout_prob"] > 0) != (gpt.args.class_dropout_prob > 0):
        raise SystemExit("class_dropout_prob > 0 needs a GPT with a null-class row (and 0 one without): "
                         f"recipe {cfg['class_dropout_prob']}, GPT {gpt.args.class_dropout_prob}")
    log.info(f"backbone from {cfg['gpt_path']} ({gpt.num_image_tokens} positions; this model has "
             f"{block_size // cfg['window'] ** 2} positions of {cfg['window'] ** 2} tokens)")
    dropout = {k: cfg[k] for k in ("class_dropout_prob", "token_dropout_p", "resid_dropout_p", "ffn_dropout_p")}
    model = token_shuffle_from_gpt(gpt, shuffle_args(cfg), gen, block_size=block_size, **dropout)
    if cfg["shuffle_from"]:
        fresh = copy_shuffle_modules(load_token_shuffle(cfg["shuffle_from"]), model)
        log.info(f"shuffle / unshuffle modules from {cfg['shuffle_from']}"
                 + (f"; fresh: {sorted({k.rsplit('.', 2)[0] for k in fresh})}" if fresh else ""))
    return model


def copy_shuffle_modules(source: TokenShuffleGPT, target: TokenShuffleGPT) -> list[str]:
    """Copy ``source``'s shuffle / unshuffle weights into ``target``; returns the target keys left fresh.

    Window and width must match. A target with fewer residual blocks on a side takes the source's FIRST
    blocks of that side (the rest are dropped); blocks and an intra-window head the source lacks stay fresh
    (identity at init). More blocks in the target than in the source is allowed the same way.
    """
    if source.shuffle_window != target.shuffle_window or source.args.dim != target.args.dim:
        raise SystemExit(f"shuffle_from has window {source.shuffle_window} and dim {source.args.dim}; the "
                         f"recipe builds window {target.shuffle_window} and dim {target.args.dim}: they must match")
    wanted = target.state_dict()
    weights = {k: v for k, v in source.state_dict().items() if k.startswith(SHUFFLE_PREFIXES) and k in wanted}
    missing, unexpected = target.load_state_dict(weights, strict=False)
    if unexpected:
        raise SystemExit(f"shuffle modules do not fit: unexpected {unexpected}")
    return [k for k in missing if k.startswith(SHUFFLE_PREFIXES)]


def export(model: TokenShuffleGPT, cfg: dict, out, metrics: dict) -> None:
    """float16 safetensors with the config in metadata (as the bundled GPT), and the metrics JSON."""
    meta = {**export_metadata(model), "stored_dtype": "float16"}
    config = {**json.loads(meta["config"]), "token_shuffle": json.loads(meta["token_shuffle"])}
    record = {"config": config, "metrics": metrics, "recipe": cfg}
    export_weights(float16_state(model), meta, record, out, "token_shuffle", cfg["export_path"])


def main(argv: list[str] | None = None) -> dict:
    cfg, out, log = start_run(argv, DEFAULTS, "token-shuffle")
    if cfg["image_size"] not in (64, 128):
        raise SystemExit(f"image_size must be 64 or 128 (the bundled VQ's 16x16 or 32x32 tokens), got {cfg['image_size']}")
    if cfg["max_minutes"] > 55:
        raise SystemExit(f"max_minutes {cfg['max_minutes']} exceeds the 55-minute budget of a bundled recipe")
    train = cached_tokens(out, cfg, "train", cfg["train_per_class"])
    heldout = cached_tokens(out, cfg, "heldout", cfg["heldout_per_class"])
    model = build_model(cfg, train, log)
    nll_start = heldout_nll(model, heldout)
    params_m = sum(p.numel() for p in model.parameters()) / 1e6
    log.info(f"Token-Shuffle s={model.shuffle_window}: {model.num_positions} positions for {model.num_image_tokens} "
             f"tokens, {params_m:.2f}M params; held-out NLL at init {nll_start:.4f}")
    opt = llamagen_adamw(model, cfg)
    step, start = train_on_tokens(model, opt, train, cfg, out / "last.pt", log, "token-shuffle", token_shuffle_loss,
                                  lambda step: cosine_lr(step, cfg["steps"], cfg["lr"], cfg["warmup"]))
    metrics = {"heldout_nll_nats": heldout_nll(model, heldout), "heldout_nll_at_init": nll_start,
               "heldout_sequential_nll_nats": heldout_sequential_nll(model, heldout), "steps": step,
               "params_m": params_m, "positions": model.num_positions, "image_size": cfg["image_size"],
               "tokens_per_position": model.tokens_per_position, "minutes": (time.time() - start) / 60}
    log.info(f"final {json.dumps(metrics)}")
    export(model, cfg, out, metrics)
    return metrics


if __name__ == "__main__":
    main()
