"""FlexTok recipe: a flexible-length 1D tokenizer (genaccel/tokenizers/flex.py) on the bundled skimage crops.

Losses: the decoder objectives, summed with weights: the flow decoder's rectified-flow velocity MSE
(``flow_weight``) and the direct decoder's pixel MSE (``direct_weight``), both on the same nested-dropout
draw per sample (the schedule and RTP are model fields, see ``FlexTokenizer.training_losses``). FlexTok's
REPA loss and the perceptual / GAN terms of TiTok-style tokenizers need pretrained networks that cannot be
fetched here. AdamW (weight decay on linear weights only), linear warmup then cosine, grad clip 1.

Stages: ``init_from`` (a FlexTok export) copies its weights into the new model and ``frozen`` (module names:
``encoder``, ``direct``, ``flow``) stops their training. The bundled tokenizer is made in two stages that way:
``flextok.yaml`` trains encoder + direct decoder, then ``flextok_flow.yaml`` trains the rectified-flow decoder
on the frozen tokens, so the tokens (and every model trained on them) stay valid.

Resumable: ``last.pt`` in ``out_dir`` every ``ckpt_every`` steps and before a ``stop_at`` / ``max_minutes``
stop; rerunning the same command continues the same LR schedule, data stream and noise draws.
Metrics (held-out crops): reconstruction MSE / PSNR of the direct decoder with the first k tokens for
k = 1, 2, 4, ..., K; the flow decoder's PSNR at the same k on ``eval_flow_images`` crops with
``eval_flow_steps`` Euler steps (0 = skip); codebook usage over train + held-out crops at k = K.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

from genaccel.data.skimage_crops import make_crops
from genaccel.models.loading import config_from_metadata, read_state_dict
from genaccel.tokenizers.flex import FlexTokArgs, FlexTokenizer, export_metadata
from genaccel.train.common import checkpoint_or_stop, cosine_lr, crop_stream, export_weights, resume, set_lr, start_run

MAX_MINUTES = 45.0
MODEL_FIELDS = ("image_size", "patch_size", "width", "depth", "decoder_depth", "heads", "mlp_ratio", "num_tokens",
                "fsq_levels", "nested_dropout", "rtp", "rtp_tokens", "decoders", "code_init_std", "flow_prediction")
STAGE_FIELDS = ("decoders", "flow_prediction")  # may differ between an init_from export and the next stage
DEFAULTS = dict(
    out_dir="checkpoints/flextok", seed=0, steps=1600, batch_size=32, lr=1e-3, warmup=100, weight_decay=0.05,
    threads=1, flow_weight=1.0, direct_weight=1.0, ckpt_every=100, log_every=50, stop_at=None,
    max_minutes=MAX_MINUTES, eval_per_class=16, eval_flow_images=64, eval_flow_steps=8, export_path="",
    init_from="", frozen=[],
    **{k: v for k, v in FlexTokArgs().__dict__.items() if k in MODEL_FIELDS},
)


def flextok_args(cfg: dict) -> FlexTokArgs:
    fields = {k: cfg[k] for k in MODEL_FIELDS}
    fields["fsq_levels"] = list(fields["fsq_levels"])
    return FlexTokArgs(**fields)


def init_stage(model: FlexTokenizer, cfg: dict) -> list[str]:
    """Copy an earlier stage's export into ``model`` (same architecture apart from STAGE_FIELDS) and freeze the
    ``frozen`` parts; returns the names of the parameters that were not in the export (the new parts)."""
    parts = {"encoder", "direct", "flow"}
    unknown = set(cfg["frozen"]) - parts
    if unknown:
        raise SystemExit(f"frozen: unknown part(s) {sorted(unknown)}; known: {sorted(parts)}")
    missing_parts = [name for name in cfg["frozen"] if not hasattr(model, name)]
    if missing_parts:
        raise SystemExit(f"frozen names {missing_parts}, which this model (decoders={model.args.decoders!r}) lacks")
    new: list[str] = []
    if cfg["init_from"]:
        path = Path(cfg["init_from"])
        if not path.is_file():
            raise SystemExit(f"init_from: {path} not found (train the earlier stage first: "
                             f"python -m genaccel.train flextok --config configs/train/flextok.yaml)")
        sd, meta = read_state_dict(path)
        config = config_from_metadata(meta)
        mismatch = {k: (v, getattr(model.args, k)) for k, v in config.items()
                    if k not in STAGE_FIELDS and getattr(model.args, k) != v}
        if mismatch:
            raise SystemExit(f"init_from {path} disagrees with this config on {mismatch} (export value, config value)")
        result = model.load_state_dict(sd, strict=False)
        if result.unexpected_keys:
            raise SystemExit(f"init_from {path} holds tensors this model lacks: {result.unexpected_keys[:5]} ...")
        new = list(result.missing_keys)
        for name in cfg["frozen"]:
            if any(key.startswith(name + ".") for key in new):
                raise SystemExit(f"frozen part {name!r} is not in init_from {path}: it would stay untrained")
    for name in cfg["frozen"]:
        getattr(model, name).requires_grad_(False)
    return new


def make_optimizer(model: FlexTokenizer, cfg: dict) -> torch.optim.Optimizer:
    """AdamW over the trained parameters; decay on linear weight matrices, none on registers, mask tokens,
    positions, norms and biases."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in named if n.endswith(".weight") and p.dim() == 2]
    rest = [p for n, p in named if not (n.endswith(".weight") and p.dim() == 2)]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg["weight_decay"]}, {"params": rest, "weight_decay": 0.0}],
        lr=cfg["lr"], betas=(0.9, 0.95),
    )


def eval_lengths(num_tokens: int) -> list[int]:
    """k = 1, 2, 4, ... up to K, and K itself."""
    ks = [2**i for i in range(num_tokens.bit_length()) if 2**i <= num_tokens]
    return ks + ([num_tokens] if ks[-1] != num_tokens else [])


def psnr_db(rec: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR of images in [-1, 1] mapped to [0, 1]."""
    mse = ((rec - ref) / 2).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-12))


@torch.no_grad()
def evaluate(model: FlexTokenizer, cfg: dict) -> dict:
    """Held-out MSE / PSNR per prefix length (direct, and flow on a subset), codebook usage at k = K."""
    model.eval()
    size = model.args.image_size
    heldout, _ = make_crops("heldout", cfg["eval_per_class"], seed=123, size=size)
    train, _ = make_crops("train", cfg["eval_per_class"], seed=123, size=size)
    tokens = torch.cat([model.tokenize(chunk) for chunk in heldout.split(128)])
    used = torch.zeros(model.vocab_size, dtype=torch.bool)
    used[tokens.flatten()] = True
    for chunk in train.split(128):
        used[model.tokenize(chunk).flatten()] = True
    metrics: dict = {"codebook_usage": float(used.float().mean()), "vocab_size": model.vocab_size,
                     "heldout_images": len(heldout), "direct": {}, "flow": {}}
    has_direct, has_flow = hasattr(model, "direct"), hasattr(model, "flow") and cfg["eval_flow_steps"] > 0
    for k in eval_lengths(model.num_tokens):
        if has_direct:
            rec = torch.cat([model.detokenize(t[:, :k], decoder="direct") for t in tokens.split(128)])
            metrics["direct"][str(k)] = {"mse": float(((rec - heldout) ** 2).mean()),
                                         "psnr_db": float(psnr_db(rec, heldout).mean())}
        if has_flow:
            n = cfg["eval_flow_images"]
            gen = torch.Generator().manual_seed(0)
            rec = model.detokenize(tokens[:n, :k], steps=cfg["eval_flow_steps"], decoder="flow", generator=gen)
            metrics["flow"][str(k)] = {"mse": float(((rec - heldout[:n]) ** 2).mean()),
                                       "psnr_db": float(psnr_db(rec, heldout[:n]).mean())}
    model.train()
    return metrics


def training_step(model: FlexTokenizer, opt: torch.optim.Optimizer, x: torch.Tensor, cfg: dict,
                  gen: torch.Generator) -> tuple[dict, torch.Tensor]:
    """One optimiser step on the weighted decoder losses; the loss values and the batch's token ids."""
    out = model.training_losses(x, gen)
    parts = {"direct_mse": (out.direct_mse, cfg["direct_weight"]), "flow_mse": (out.flow_mse, cfg["flow_weight"])}
    loss = sum(w * value for value, w in parts.values() if value is not None)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    opt.step()
    values = {name: value.item() for name, (value, _) in parts.items() if value is not None}
    return {"loss": loss.item(), **values}, out.indices


def export(model: FlexTokenizer, cfg: dict, out: Path, metrics: dict) -> None:
    """float32 safetensors with the config in metadata (out_dir and ``export_path``) + metrics JSON next to each."""
    meta = export_metadata(model)
    record = {"config": json.loads(meta["config"]), "metrics": metrics, "recipe": cfg}
    export_weights(model.state_dict(), meta, record, out, "flextok", cfg["export_path"])


def main(argv: list[str] | None = None) -> dict:
    cfg, out, log = start_run(argv, DEFAULTS, "flextok")
    if cfg["max_minutes"] > MAX_MINUTES:
        raise SystemExit(f"max_minutes {cfg['max_minutes']} exceeds the recipe's budget of {MAX_MINUTES} minutes")
    model = FlexTokenizer(flextok_args(cfg))
    new = init_stage(model, cfg)
    opt = make_optimizer(model, cfg)
    ckpt = out / "last.pt"
    step = resume(ckpt, model, opt, log)
    params_m = sum(p.numel() for p in model.parameters()) / 1e6
    trained_m = sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6
    log.info(f"FlexTok {params_m:.2f}M params ({trained_m:.2f}M trained), K={model.num_tokens}, "
             f"vocab {model.vocab_size}, train length {model.args.train_length}, schedule {model.args.nested_dropout}"
             + (f"; from {cfg['init_from']} ({len(new)} new tensors), frozen {cfg['frozen']}" if cfg["init_from"] else ""))
    stream, gen = crop_stream(cfg, step, model.args.image_size)
    used = torch.zeros(model.vocab_size, dtype=torch.bool)
    start = time.time()
    bar = tqdm(total=cfg["steps"], initial=step, desc="flextok", dynamic_ncols=True)
    while step < cfg["steps"]:
        lr = cosine_lr(step, cfg["steps"], cfg["lr"], cfg["warmup"])
        set_lr(opt, lr)
        x, _ = stream.batch(cfg["batch_size"])
        losses, indices = training_step(model, opt, x, cfg, gen)
        used[indices[:, : model.num_tokens].flatten()] = True
        step += 1
        bar.update(1)
        if step % cfg["log_every"] == 0:
            parts = " ".join(f"{k} {v:.4f}" for k, v in losses.items())
            log.info(f"step {step} {parts} codes_used {int(used.sum())} lr {lr:.2e} "
                     f"s/step {(time.time() - start) / max(1, bar.n - bar.initial):.2f}")
            used.zero_()
        if checkpoint_or_stop(ckpt, model, opt, step, cfg, start, log):
            break
    bar.close()
    metrics = evaluate(model, cfg)
    metrics.update(steps=step, minutes=(time.time() - start) / 60, params_m=params_m)
    log.info(f"final {json.dumps(metrics)}")
    export(model, cfg, out, metrics)
    return metrics


if __name__ == "__main__":
    main()
