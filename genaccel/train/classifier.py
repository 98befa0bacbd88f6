"""Crop classifier recipe: the feature extractor behind FD-domain (see :mod:`genaccel.eval.feature_extractor`).

Trains :class:`CropClassifier` on fresh random training crops plus the augmentations below, which mimic
how generated samples differ from real crops (colour shifts, blur from the VQ decoder, noise). A fraction
``plain_fraction`` of every batch comes from un-jittered crops (native pixels, random flips added here):
scale-jittered crops are always resampled and so slightly soft, while held-out crops and real photos
are not, and a classifier trained on soft crops only confuses sharp textures (gravel read as grass). Held-out accuracy is measured on crops from each
photo's disjoint held-out band (``make_crops('heldout', ...)``; band side per photo in ``HELDOUT_SIDE``).

Writes ``crop_classifier.safetensors`` (architecture in metadata key 'config') and
``crop_classifier.json`` (metrics and recipe) into ``out_dir``; ``last.pt`` makes the run resumable.
"""

from __future__ import annotations

import time
from dataclasses import asdict

import torch
import torch.nn.functional as F
from tqdm import tqdm

from genaccel.data.skimage_crops import NUM_CLASSES, RandomCropStream, make_crops
from genaccel.eval.feature_extractor import ClassifierConfig, CropClassifier, classifier_metadata
from genaccel.train.common import checkpoint_or_stop, cosine_lr, resume, set_lr, start_run
from genaccel.utils.io import save_json, save_safetensors

DEFAULTS = {
    # run
    "out_dir": "checkpoints/classifier", "seed": 0, "threads": 1, "max_minutes": 10.0,
    "eval_every": 100, "eval_per_class": 100, "ckpt_every": 100,
    # optimisation
    "steps": 2000, "batch_size": 64, "lr": 2e-3, "weight_decay": 5e-4, "warmup": 50, "label_smoothing": 0.1,
    # architecture
    "widths": [16, 32, 64, 128], "strides": [2, 2, 2, 1], "dropout": 0.1,
    # augmentation: colour jitter stays small because absolute grey levels tell flat backgrounds apart
    "plain_fraction": 0.75, "color_jitter": 0.05, "blur_prob": 0.15, "noise_prob": 0.0, "noise_std": 0.04,
}


def augment_batch(x: torch.Tensor, cfg: dict, gen: torch.Generator) -> torch.Tensor:
    """Per-image brightness/contrast/saturation jitter, random blur and Gaussian noise on [-1, 1] images."""
    n = x.shape[0]

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return (lo + (hi - lo) * torch.rand(n, 1, 1, 1, generator=gen))

    j = cfg["color_jitter"]
    gray = x.mean(dim=1, keepdim=True)
    x = gray + (x - gray) * uniform(1 - j, 1 + j)  # saturation
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = mean + (x - mean) * uniform(1 - j, 1 + j) + uniform(-j, j)  # contrast, brightness
    blur = torch.rand(n, generator=gen) < cfg["blur_prob"]
    if blur.any():
        small = F.interpolate(x[blur], scale_factor=0.5, mode="bilinear", antialias=True, align_corners=False)
        x[blur] = F.interpolate(small, size=x.shape[-2:], mode="bilinear", align_corners=False)
    noisy = (torch.rand(n, 1, 1, 1, generator=gen) < cfg["noise_prob"]).float()
    x = x + noisy * cfg["noise_std"] * torch.randn(x.shape, generator=gen)
    return x.clamp(-1, 1)


class MixedCropStream:
    """Batches of scale-jittered crops (``RandomCropStream``) mixed with plain native-resolution crops."""

    def __init__(self, seed: int, plain_fraction: float):
        self.jittered = RandomCropStream("train", seed=seed, augment=True)
        self.plain = RandomCropStream("train", seed=seed + 1, augment=False)
        self.plain_fraction = plain_fraction
        self.gen = torch.Generator().manual_seed(seed + 2)

    def batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        n_plain = round(size * self.plain_fraction)
        xs, ys = zip(*[s.batch(n) for s, n in ((self.jittered, size - n_plain), (self.plain, n_plain)) if n])
        x, y = torch.cat(xs), torch.cat(ys)
        flip = torch.rand(len(x), generator=self.gen) < 0.5
        x[flip] = x[flip].flip(-1)
        return x, y


@torch.no_grad()
def heldout_accuracy(model: CropClassifier, per_class: int) -> dict:
    """Top-1 accuracy overall and per class on held-out crops (no augmentation, fixed seed)."""
    was_training = model.training
    model.eval()
    x, y = make_crops("heldout", per_class, seed=123)
    pred = model.predict(x)
    model.train(was_training)
    per_cls = [float((pred[y == c] == c).float().mean()) for c in range(NUM_CLASSES)]
    return {"heldout_accuracy": float((pred == y).float().mean()), "heldout_accuracy_per_class": per_cls,
            "heldout_images": len(y)}


def classifier_config(cfg: dict) -> ClassifierConfig:
    return ClassifierConfig(num_classes=NUM_CLASSES, widths=list(cfg["widths"]), strides=list(cfg["strides"]),
                            dropout=cfg["dropout"])


def train_step(model, opt, x, y, lr: float, label_smoothing: float) -> float:
    set_lr(opt, lr)
    loss = F.cross_entropy(model(x), y, label_smoothing=label_smoothing)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.item()


def main(argv: list[str] | None = None) -> dict:
    cfg, out, log = start_run(argv, DEFAULTS, "classifier")
    model = CropClassifier(classifier_config(cfg))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    ckpt = out / "last.pt"
    step = resume(ckpt, model, opt, log)
    # Streams are re-seeded from the step so a resumed run draws fresh (but deterministic) crops.
    stream = MixedCropStream(cfg["seed"] * 1000 + step, cfg["plain_fraction"])
    gen = torch.Generator().manual_seed(cfg["seed"] + step)
    start = time.time()
    bar = tqdm(total=cfg["steps"], initial=step, desc="classifier", dynamic_ncols=True)
    while step < cfg["steps"]:
        lr = cosine_lr(step, cfg["steps"], cfg["lr"], cfg["warmup"], floor=0.02)
        x, y = stream.batch(cfg["batch_size"])
        loss = train_step(model, opt, augment_batch(x, cfg, gen), y, lr, cfg["label_smoothing"])
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}")
        if step % cfg["eval_every"] == 0:
            acc = heldout_accuracy(model, 32)["heldout_accuracy"]
            log.info(f"step {step} loss {loss:.4f} heldout_acc(32/class) {acc:.4f} lr {lr:.2e}")
        if checkpoint_or_stop(ckpt, model, opt, step, cfg, start, log):
            break
    bar.close()
    metrics = heldout_accuracy(model, cfg["eval_per_class"])
    metrics.update(steps=step, minutes=(time.time() - start) / 60, feature_dim=model.feature_dim)
    log.info(f"final heldout_accuracy {metrics['heldout_accuracy']:.4f} after {step} steps")
    config = classifier_config(cfg)
    save_safetensors(model.state_dict(), out / "crop_classifier.safetensors", metadata=classifier_metadata(config))
    save_json({"config": asdict(config), "metrics": metrics, "recipe": cfg}, out / "crop_classifier.json")
    return metrics


if __name__ == "__main__":
    main()
