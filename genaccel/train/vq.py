"""VQ tokenizer recipe: LlamaGen VQ architecture (small ``ch``) on the bundled skimage crops.

Losses: pixel MSE + codebook (vq) + commitment, as LlamaGen's VQ loss minus the perceptual and GAN
terms (their LPIPS/VGG weights cannot be fetched here). Unused codes are re-seeded from encoder outputs
during the first part of training so most of the codebook ends up in use.

Fine-tuning at another crop size (the 128x128 VQ): ``init_path`` starts from a trained VQ's weights,
``image_size`` picks the crops, and ``freeze_codebook`` keeps the codebook fixed, so every code keeps the
meaning a GPT trained on the first VQ's tokens learned for it (only encoder and decoder adapt; no code
re-seeding then). Why: the 64x64 VQ run fully convolutionally at 128x128 keeps the 64x64 image borders it
learned as dark frames and seams inside the larger image (docs/models.md).
"""

from __future__ import annotations

import json
import math
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from genaccel.data.skimage_crops import make_crops
from genaccel.tokenizers.vq import VQArgs, VQModel
from genaccel.train.common import checkpoint_or_stop, cosine_lr, crop_stream, export_weights, resume, set_lr, start_run

DEFAULTS = dict(
    out_dir="checkpoints/vq", seed=0, steps=1300, batch_size=32, lr=4e-4, warmup=50, threads=2,
    ch=32, ch_mult=[1, 2, 2], z_channels=64, num_res_blocks=1, codebook_size=1024, codebook_embed_dim=8,
    commit_loss_beta=0.25, restart_every=100, restart_until=0.6, ckpt_every=100, stop_at=None, max_minutes=40.0,
    eval_per_class=64, image_size=64, init_path="", freeze_codebook=False, export_path="",
)


def vq_args(cfg: dict) -> VQArgs:
    return VQArgs(
        codebook_size=cfg["codebook_size"], codebook_embed_dim=cfg["codebook_embed_dim"],
        commit_loss_beta=cfg["commit_loss_beta"], encoder_ch_mult=list(cfg["ch_mult"]),
        decoder_ch_mult=list(cfg["ch_mult"]), z_channels=cfg["z_channels"], ch=cfg["ch"],
        num_res_blocks=cfg["num_res_blocks"],
    )


@torch.no_grad()
def restart_dead_codes(model: VQModel, used: torch.Tensor, latents: torch.Tensor, gen: torch.Generator) -> int:
    """Re-seed never-used codes with (normalised) encoder outputs from the current batch."""
    dead = (~used).nonzero().flatten()
    if dead.numel() == 0:
        return 0
    flat = F.normalize(latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1]), dim=-1)
    pick = torch.randint(0, flat.shape[0], (dead.numel(),), generator=gen)
    noise = 0.02 * torch.randn(dead.numel(), flat.shape[1], generator=gen)
    model.quantize.embedding.weight[dead] = F.normalize(flat[pick] + noise, dim=-1)
    return int(dead.numel())


@torch.no_grad()
def evaluate(model: VQModel, per_class: int, size: int = 64) -> dict:
    """Held-out PSNR (images in [-1, 1] mapped to [0, 1]) and codebook usage on train + held-out crops."""
    model.eval()
    psnrs, used = [], torch.zeros(model.args.codebook_size, dtype=torch.bool)
    for split in ("heldout", "train"):
        x, _ = make_crops(split, per_class, seed=123, size=size)
        for chunk in x.split(128):
            rec, q = model(chunk)
            used[q.indices.flatten()] = True
            if split == "heldout":
                mse = ((rec.clamp(-1, 1) - chunk) / 2).pow(2).flatten(1).mean(1)
                psnrs.append(10 * torch.log10(1.0 / mse))
    model.train()
    return {"heldout_psnr_db": float(torch.cat(psnrs).mean()), "codebook_usage": float(used.float().mean())}


def initial_model(cfg: dict, log) -> VQModel:
    """A fresh VQ from the recipe's sizes, or (``init_path``) a trained VQ to fine-tune, whose sizes win."""
    if not cfg["init_path"]:
        return VQModel(vq_args(cfg))
    from genaccel.models import load_vq

    model = load_vq(cfg["init_path"]).float().train()
    log.info(f"fine-tuning {cfg['init_path']} at {cfg['image_size']}x{cfg['image_size']} "
             f"(codebook {'frozen' if cfg['freeze_codebook'] else 'trained'}); its sizes replace the recipe's")
    return model


def main(argv: list[str] | None = None) -> dict:
    cfg, out, log = start_run(argv, DEFAULTS, "vq")
    model = initial_model(cfg, log)
    params = [p for n, p in model.named_parameters() if not (cfg["freeze_codebook"] and n.startswith("quantize."))]
    opt = torch.optim.Adam(params, lr=cfg["lr"], betas=(0.9, 0.95))
    ckpt = out / "last.pt"
    step = resume(ckpt, model, opt, log)
    stream, gen = crop_stream(cfg, step, cfg["image_size"])
    used = torch.zeros(cfg["codebook_size"], dtype=torch.bool)
    start = time.time()
    bar = tqdm(total=cfg["steps"], initial=step, desc="vq", dynamic_ncols=True)
    while step < cfg["steps"]:
        lr = cosine_lr(step, cfg["steps"], cfg["lr"], cfg["warmup"])
        set_lr(opt, lr)
        x, _ = stream.batch(cfg["batch_size"])
        latents = model.quant_conv(model.encoder(x))
        q = model.quantize(latents)
        rec = model.decode_latent(q.z_q)
        rec_loss = F.mse_loss(rec, x)
        loss = rec_loss + q.vq_loss + q.commit_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        used[q.indices.flatten()] = True
        step += 1
        bar.update(1)
        if step % cfg["restart_every"] == 0:
            n_dead = 0
            if step < cfg["restart_until"] * cfg["steps"] and not cfg["freeze_codebook"]:
                n_dead = restart_dead_codes(model, used, latents.detach(), gen)
            psnr = 10 * math.log10(4.0 / max(rec_loss.item(), 1e-12))
            log.info(f"step {step} loss {loss.item():.4f} train_psnr {psnr:.2f} used {int(used.sum())} reseeded {n_dead} lr {lr:.2e}")
            used.zero_()
        if checkpoint_or_stop(ckpt, model, opt, step, cfg, start, log):
            break
    bar.close()
    metrics = evaluate(model, cfg["eval_per_class"], cfg["image_size"])
    metrics.update(steps=step, minutes=(time.time() - start) / 60, image_size=cfg["image_size"])
    log.info(f"final {json.dumps(metrics)}")
    config = {k: v for k, v in model.args.__dict__.items()}
    record = {"config": config, "metrics": metrics, "recipe": cfg}
    export_weights(model.state_dict(), {"config": json.dumps(config)}, record, out, "vq", cfg["export_path"])
    return metrics


if __name__ == "__main__":
    main()
