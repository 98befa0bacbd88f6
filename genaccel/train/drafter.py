"""EAGLE-style drafter recipe (LANTERN ``entrypoints/train_drafter``) for the bundled GPT.

Data: token sequences of the bundled crops (VQ codes of real images, as LANTERN does for LlamaGen)
plus the target's own CFG samples (self-distillation, as LANTERN's Lumina-mGPT drafter), so the
drafter sees the distribution it drafts at inference.

Target hidden states are computed once per sequence (fp16) and reused across epochs; with
``null_label_prob`` of the sequences conditioned on the null class. Loss: SmoothL1(drafter(t_i, H_i + noise), H_{i+1}) + ``ce_weight`` * CE(softmax(target logits), drafter
logits). AdamW (0.9, 0.95), warmup + cosine, grad clip by value. Resumable from ``out_dir/last.pt``;
stops at ``max_minutes`` (data preparation included) and exports the safetensors asset.

``cfg_loss`` (LANTERN's ``--coupled --cfg_loss``): every sequence is taken with its class and with the null
class (a coupled pair, instead of ``null_label_prob``), the regression covers both halves, and the CE term
compares the CFG-combined distributions ``u + s (c - u)`` (s = ``cfg_loss_scale``, the samplers' convention)
of the target and of the drafter: what the samplers draw drafts from and test them against. LANTERN combines
as ``c + s (c - u)`` (Lumina-mGPT's convention); ours is the one our samplers use.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from genaccel.models import load_gpt
from genaccel.models.contract import combine_cfg
from genaccel.models.drafter import EagleDrafter, drafter_metadata
from genaccel.samplers import build_sampler
from genaccel.train.common import checkpoint_or_stop, cosine_lr, export_weights, resume, set_lr, start_run
from genaccel.utils.io import save_torch

DEFAULTS = {
    "out_dir": "checkpoints/drafter", "gpt_path": "genaccel/assets/llamagen_tiny_gpt.safetensors",
    "vq_path": "genaccel/assets/llamagen_tiny_vq.safetensors", "tokens_path": "checkpoints/gpt/tokens_train.pt",
    "real_per_class": 256, "real_sequences": 1536, "self_distill_images": 256, "self_distill_cfg": 4.0,
    "seed": 0, "steps": 3000, "batch_size": 16, "lr": 1e-3, "warmup": 100, "weight_decay": 0.0,
    "null_label_prob": 0.3, "noise": 0.2, "ce_weight": 0.1, "grad_clip": 0.5, "threads": 2, "eval_sequences": 64,
    "cfg_loss": False, "cfg_loss_scale": 4.0,
    "ckpt_every": 200, "log_every": 50, "max_minutes": 30.0,
    "export_path": "genaccel/assets/llamagen_tiny_drafter.safetensors",
}


def real_sequences(cfg: dict, out: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """VQ codes of training crops: the GPT recipe's cached tokens if present, else tokenised here (cached)."""
    cached = Path(cfg["tokens_path"])
    if not cached.is_file():
        cached = out / "tokens_train.pt"
        if not cached.is_file():
            from genaccel.train.gpt import tokenize_crops

            save_torch(tokenize_crops(cfg["vq_path"], "train", cfg["real_per_class"], cfg["seed"]), cached)
    data = torch.load(cached, weights_only=True)
    return data["tokens"].long(), data["labels"].long()


@torch.no_grad()
def self_distilled_sequences(target, cfg: dict, out: Path, log) -> tuple[torch.Tensor, torch.Tensor]:
    """The target's own AR samples at the benchmark guidance scale, class-balanced, cached in out_dir."""
    path = out / "self_distill.pt"
    if path.is_file():
        data = torch.load(path, weights_only=True)
        return data["tokens"], data["labels"]
    count = cfg["self_distill_images"]
    labels = torch.arange(count) % target.num_classes
    sampler = build_sampler("ar", cfg_scale=cfg["self_distill_cfg"])
    tokens = []
    for i, chunk in enumerate(labels.split(64)):
        tokens.append(sampler.generate(target, chunk, torch.Generator().manual_seed(cfg["seed"] * 1000 + i)).tokens)
        log.info(f"self-distillation: {sum(t.shape[0] for t in tokens)}/{count} samples")
    data = {"tokens": torch.cat(tokens), "labels": labels}
    save_torch(data, path)
    return data["tokens"], data["labels"]


@torch.no_grad()
def teacher_hidden(target, tokens: torch.Tensor, labels: torch.Tensor, log, chunk: int = 32) -> torch.Tensor:
    """Target hidden states H_0..H_{N-1} (fp16) of every sequence, computed once: the 6-layer target forward
    dominates a training step, and its LM head recovers the logits from H (H is the final-normed state)."""
    out = []
    for i in range(0, tokens.shape[0], chunk):
        out.append(target.teacher_forced(labels[i : i + chunk], tokens[i : i + chunk]).hidden.half())
        if (i // chunk) % 16 == 0:
            log.info(f"teacher hidden states: {i + out[-1].shape[0]}/{tokens.shape[0]}")
    return torch.cat(out)


def guide(logits: torch.Tensor, cfg_scale: float | None) -> torch.Tensor:
    """[cond; uncond] logits (2b, ...) -> ``u + s (c - u)`` (b, ...), the samplers' combination; None = no
    pairing, logits unchanged."""
    return combine_cfg(logits, cfg_scale or 0.0, cfg_scale is not None)


def drafter_loss(drafter: EagleDrafter, target, tokens: torch.Tensor, hidden: torch.Tensor, noise: float,
                 ce_weight: float, gen: torch.Generator | None, cfg_scale: float | None = None,
                 ) -> tuple[torch.Tensor, dict]:
    """Teacher-forced EAGLE loss on one batch; also returns the drafter's expected acceptance (sum min(p, q)).

    ``cfg_scale`` given: ``hidden`` (2b, N, D) holds [cond; uncond] hidden states of the same ``tokens`` (b, N),
    and the CE term, the acceptance and top-1 compare CFG-combined distributions (``cfg_loss``)."""
    if cfg_scale is not None:
        tokens = torch.cat([tokens, tokens])
    hidden = hidden.float()
    inputs, next_hidden = hidden[:, :-1], hidden[:, 1:]
    if noise > 0:
        rms = inputs.pow(2).mean(-1, keepdim=True).sqrt()
        inputs = inputs + noise * rms * (2 * torch.rand(inputs.shape, generator=gen) - 1)
    out = drafter(tokens[:, :-1], inputs)
    with torch.no_grad():
        target_logits = guide(target.output(next_hidden).float(), cfg_scale)
    p = target_logits.softmax(-1)
    reg = F.smooth_l1_loss(out.hidden, next_hidden)
    logits = guide(out.logits, cfg_scale)
    ce = -(p * logits.log_softmax(-1)).sum(-1).mean()
    with torch.no_grad():
        accept = torch.minimum(p, logits.softmax(-1)).sum(-1).mean()
        top1 = (logits.argmax(-1) == target_logits.argmax(-1)).float().mean()
    return reg + ce_weight * ce, {"smooth_l1": reg.item(), "ce": ce.item(), "accept": accept.item(), "top1": top1.item()}


def batch_hidden(hidden: torch.Tensor, idx: torch.Tensor, cfg_scale: float | None) -> torch.Tensor:
    """Hidden states of sequences ``idx``: (b, N, D), or [cond; uncond] (2b, N, D) for coupled pairs."""
    if cfg_scale is None:
        return hidden[idx]
    pairs = hidden[idx]
    return torch.cat([pairs[:, 0], pairs[:, 1]])


def main(argv: list[str] | None = None) -> dict:
    cfg, out, log = start_run(argv, DEFAULTS, "drafter")
    start = time.time()
    target = load_gpt(cfg["gpt_path"])
    for p in target.parameters():
        p.requires_grad_(False)

    real_tokens, real_labels = real_sequences(cfg, out)
    distilled_tokens, distilled_labels = self_distilled_sequences(target, cfg, out, log)
    pick = torch.randperm(real_tokens.shape[0], generator=torch.Generator().manual_seed(cfg["seed"]))
    pick = pick[: cfg["real_sequences"]]
    tokens = torch.cat([real_tokens[pick], distilled_tokens])
    labels = torch.cat([real_labels[pick], distilled_labels])
    if cfg["cfg_loss"]:  # coupled pairs: hidden (S, 2, N, D) of every sequence under its class and the null class
        scale = float(cfg["cfg_loss_scale"])
        null = torch.full_like(labels, target.null_class)
        hidden = torch.stack([teacher_hidden(target, tokens, labels, log), teacher_hidden(target, tokens, null, log)], 1)
    else:  # the drafter also drafts the unconditional CFG half: some sequences are conditioned on the null class
        scale = None
        drop = torch.rand(labels.shape, generator=torch.Generator().manual_seed(cfg["seed"] + 1)) < cfg["null_label_prob"]
        labels = torch.where(drop, torch.full_like(labels, target.null_class), labels)
        hidden = teacher_hidden(target, tokens, labels, log)
    held = torch.randperm(tokens.shape[0], generator=torch.Generator().manual_seed(cfg["seed"]))
    eval_idx, train_idx = held[: cfg["eval_sequences"]], held[cfg["eval_sequences"] :]
    log.info(f"data: {pick.numel()} real + {distilled_tokens.shape[0]} self-distilled sequences "
             f"({time.time() - start:.0f}s)")

    drafter = EagleDrafter.from_target(target)
    trainable = [p for p in drafter.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=cfg["lr"], betas=(0.9, 0.95), weight_decay=cfg["weight_decay"])
    ckpt = out / "last.pt"
    step = resume(ckpt, drafter, opt, log)
    gen = torch.Generator().manual_seed(cfg["seed"] + step)
    drafter.train()
    while step < cfg["steps"]:
        lr = cosine_lr(step, cfg["steps"], cfg["lr"], cfg["warmup"])
        set_lr(opt, lr)
        idx = train_idx[torch.randint(train_idx.numel(), (cfg["batch_size"],), generator=gen)]
        loss, parts = drafter_loss(drafter, target, tokens[idx], batch_hidden(hidden, idx, scale), cfg["noise"],
                                   cfg["ce_weight"], gen, scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_value_(trainable, cfg["grad_clip"])
        opt.step()
        step += 1
        if step % cfg["log_every"] == 0:
            log.info(f"step {step} loss {loss.item():.4f} " + " ".join(f"{k} {v:.4f}" for k, v in parts.items())
                     + f" lr {lr:.2e} ({(time.time() - start) / 60:.1f} min)")
        if checkpoint_or_stop(ckpt, drafter, opt, step, cfg, start, log):
            break

    drafter.eval()
    with torch.no_grad():
        _, metrics = drafter_loss(drafter, target, tokens[eval_idx], batch_hidden(hidden, eval_idx, scale), 0.0,
                                  cfg["ce_weight"], None, scale)
    metrics.update(steps=step, minutes=(time.time() - start) / 60)
    log.info(f"final held-out {json.dumps(metrics)}")
    meta = drafter_metadata(drafter.args, target=Path(cfg["gpt_path"]).name)
    record = {"config": drafter.args.__dict__, "metrics": metrics, "recipe": cfg}
    export_weights(drafter.state_dict(), meta, record, out, "drafter", cfg["export_path"])
    return metrics


if __name__ == "__main__":
    main()
