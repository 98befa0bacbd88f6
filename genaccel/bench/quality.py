"""``python -m genaccel.bench quality``: the bundled model's quality report (docs/models.md).

For AR sampling at each requested CFG scale: FD-domain of samples vs held-out real crops, next to the
floor (real training crops vs held-out, same sample count) and the ceiling (decoded uniformly random
tokens); class accuracy of samples by the bundled classifier; a PNG grid with one row per class.
FD-domain uses the bundled crop classifier's features, never Inception: it is not FID.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from genaccel.bench.sections import write_section
from genaccel.cli import environment
from genaccel.data.skimage_crops import NUM_CLASSES, make_crops
from genaccel.eval.fd import class_accuracy, fd_from_stats, feature_stats, reference_domain_stats
from genaccel.eval.feature_extractor import load_feature_extractor
from genaccel.pipeline import ImagePipeline, labels_for, load_model
from genaccel.samplers import build_sampler
from genaccel.utils.io import save_image, save_json


def sample_images(pipe: ImagePipeline, cfg: float, n: int, batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    sampler = build_sampler("ar", cfg_scale=cfg)
    labels = labels_for(pipe.num_classes, None, n)
    images = [img for _, img, _ in pipe.generate_batches(labels, sampler, batch, seed)]
    return torch.cat(images), labels


def class_rows_grid(images: torch.Tensor, labels: torch.Tensor, per_row: int) -> torch.Tensor:
    """uint8 grid (H, W, 3): row c holds the first ``per_row`` images of class c."""
    from torchvision.utils import make_grid

    rows = []
    for c in range(int(labels.max()) + 1):
        sel = images[labels == c][:per_row]
        rows.append(sel)
    stacked = torch.cat(rows).permute(0, 3, 1, 2)
    return make_grid(stacked, nrow=per_row, padding=2, pad_value=255).permute(1, 2, 0)


@torch.no_grad()
def run(cfgs: list[float], n: int, batch: int, seed: int, out_dir: Path) -> dict:
    from PIL import Image

    torch.manual_seed(seed)
    pipe = load_model("llamagen")
    ext = load_feature_extractor()
    ref = reference_domain_stats(extractor=ext)
    per_class = max(1, n // NUM_CLASSES)
    train_imgs, _ = make_crops("train", per_class, seed=seed + 1)
    floor = fd_from_stats(feature_stats(ext.features(train_imgs)), ref)
    g = torch.Generator().manual_seed(seed)
    rand_tokens = torch.randint(0, pipe.gpt.vocab_size, (n, pipe.gpt.num_image_tokens), generator=g)
    rand_imgs = torch.cat([pipe.decode(t) for t in rand_tokens.split(batch)])
    ceiling = fd_from_stats(feature_stats(ext.features(rand_imgs)), ref)
    rows = []
    for cfg in cfgs:
        imgs, labels = sample_images(pipe, cfg, n, batch, seed)
        fd = fd_from_stats(feature_stats(ext.features(imgs)), ref)
        acc = class_accuracy(imgs, labels, extractor=ext)
        rows.append({"cfg_scale": cfg, "fd_domain": fd, "class_accuracy": acc, "num_samples": len(imgs)})
        grid = class_rows_grid(imgs, labels, per_row=8)
        save_image(Image.fromarray(grid.numpy()), out_dir / f"quality_grid_cfg{cfg:g}.png")
    result = {"floor_fd_domain": floor, "ceiling_fd_domain": ceiling, "samples": rows, "seed": seed,
              "real_random_acc": class_accuracy(rand_imgs, labels_for(pipe.num_classes, None, n), extractor=ext),
              "environment": environment()}
    save_json(result, out_dir / "quality.json")
    return result


def markdown(r: dict, cmd: str) -> str:
    lines = [
        "## Quality of the bundled model (AR sampler)", "",
        f"Command: `{cmd}`  ", "FD-domain = Frechet distance in the bundled crop classifier's feature space "
        "(not FID); reference = 1024 held-out crops.", "",
        "| set | samples | FD-domain | class accuracy |", "|---|---|---|---|",
        f"| floor: real training crops | {r['samples'][0]['num_samples']} | {r['floor_fd_domain']:.2f} | - |",
    ]
    for s in r["samples"]:
        lines.append(f"| AR, cfg {s['cfg_scale']:g} | {s['num_samples']} | {s['fd_domain']:.2f} | {s['class_accuracy']:.1%} |")
    lines.append(f"| ceiling: random tokens | {r['samples'][0]['num_samples']} | {r['ceiling_fd_domain']:.2f} | "
                 f"{r['real_random_acc']:.1%} |")
    best = min(s["fd_domain"] for s in r["samples"])
    ratio = (r["ceiling_fd_domain"] - best) / max(best - r["floor_fd_domain"], 1e-9)
    lines += ["", f"Distance to ceiling / distance to floor for the best setting: {ratio:.1f}x (goal >= 5x)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m genaccel.bench quality")
    p.add_argument("--cfg-scale", "--cfg", dest="cfg", type=float, nargs="+", default=[1.0, 4.0],
                   help="classifier-free guidance scales to compare, as sample's --cfg-scale (default: 1.0 4.0)")
    p.add_argument("--num-samples", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default="docs/assets")
    p.add_argument("--write", action="store_true", help="record in docs/models.md (section quality)")
    a = p.parse_args(argv)
    r = run(a.cfg, a.num_samples, a.batch_size, a.seed, Path(a.out_dir))
    body = markdown(r, "python -m genaccel.bench quality " + " ".join(argv or []))
    print(body)
    print(json.dumps(r["samples"], indent=1))
    if a.write:
        write_section("quality", body, Path("docs/models.md"))
    return r


if __name__ == "__main__":
    main()
