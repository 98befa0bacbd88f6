"""FlexTok benchmark: reconstruction and generation against the number of tokens k, next to the 256-token AR model.

``python -m genaccel.bench flextok`` measures, on the bundled models:

* reconstruction of held-out crops from their first k tokens (k = 1, 2, 4, ..., K): MSE, PSNR, FD-domain;
* generation with ``ar`` on the 1-D GPT at each k of ``--ks``: forwards, FD-domain and class accuracy of a
  class-balanced batch run, batch-1 latency split into AR sampling and decoding (``--decoder``: the tokenizer's
  one-pass decoder, or its rectified-flow decoder with ``--decode-steps`` Euler steps), and the same for the 256-token LlamaGen AR model with its VQ decoder;

then writes the ``flextok`` section of docs/benchmarks.md, a two-panel PNG and a JSON record.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from genaccel.bench.samplers import environment, score
from genaccel.bench.sections import write_section
from genaccel.pipeline import labels_for, load_model
from genaccel.samplers import build_sampler


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m genaccel.bench flextok", description=__doc__.splitlines()[0])
    p.add_argument("--ks", default="4,8,16,32,64", help="token budgets k to generate with (comma list)")
    p.add_argument("--num-images", type=int, default=64, help="images per k for FD-domain / class accuracy")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--latency-images", type=int, default=8, help="batch-1 images for the latency medians")
    p.add_argument("--recon-per-class", type=int, default=16, help="held-out crops per class for reconstruction")
    p.add_argument("--cfg-scale", type=float, default=4.0)
    p.add_argument("--decoder", choices=("direct", "flow"), default="direct",
                   help="FlexTok decoder for reconstruction and generation (default: direct, one pass)")
    p.add_argument("--decode-steps", type=int, default=8, help="Euler steps of --decoder flow")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ckpt", default=None, help="1-D GPT over FlexTok tokens (default: bundled)")
    p.add_argument("--tokenizer", default=None, help="FlexTok export (default: bundled)")
    p.add_argument("--classifier", default=None, help="crop classifier for FD-domain/accuracy (default: bundled)")
    p.add_argument("--reference-per-class", type=int, default=64, help="held-out crops per class for FD-domain")
    p.add_argument("--doc", default="docs/benchmarks.md", help="markdown file to update ('' = none)")
    p.add_argument("--section", default="flextok")
    p.add_argument("--png", default="docs/flextok_vs_k.png", help="plot ('' = none)")
    p.add_argument("--json", default="runs/bench_flextok.json", help="JSON record ('' = none)")
    p.add_argument("--recon-grid", default="", help="also write a reconstruction grid PNG here (every decoder; '' = none)")
    return p.parse_args(argv)


@torch.no_grad()
def reconstruction(tokenizer, per_class: int, reference, extractor, decoder: str = "direct",
                   steps: int = 8) -> dict[int, dict]:
    """Held-out crops decoded from their first k tokens: MSE and PSNR in [0, 1] units, FD-domain."""
    from genaccel.data.skimage_crops import make_crops
    from genaccel.eval.fd import quantize_like_samples
    from genaccel.train.flextok import eval_lengths, psnr_db

    crops, labels = make_crops("heldout", per_class, seed=123, size=tokenizer.args.image_size)
    tokens = torch.cat([tokenizer.tokenize(c) for c in crops.split(128)])
    rows = {}
    for k in eval_lengths(tokenizer.num_tokens):
        gen = torch.Generator().manual_seed(k)  # the flow decoder's noise
        rec = torch.cat([tokenizer.detokenize(t[:, :k], steps=steps, decoder=decoder, generator=gen)
                         for t in tokens.split(128)])
        rows[k] = {"mse": float(((rec - crops) / 2).pow(2).mean()), "psnr_db": float(psnr_db(rec, crops).mean()),
                   **score(quantize_like_samples(rec), labels, reference, extractor)}
    return rows


@torch.no_grad()
def reconstruction_grid(tokenizer, path: Path, ks: tuple[int, ...] = (1, 4, 16, 64), steps: int = 8,
                        per_class: int = 1) -> None:
    """PNG: one held-out crop per class (columns); rows: the crops, then their reconstructions from the first k
    tokens for each k, by every decoder the tokenizer has (direct rows first, then flow rows)."""
    from PIL import Image
    from torchvision.utils import make_grid

    from genaccel.data.skimage_crops import make_crops
    from genaccel.eval.fd import quantize_like_samples
    from genaccel.utils.io import save_image

    crops, _ = make_crops("heldout", per_class, seed=123, size=tokenizer.args.image_size)
    tokens = tokenizer.tokenize(crops)
    rows = [crops]
    for decoder in [d for d in ("direct", "flow") if hasattr(tokenizer, d)]:
        for k in [k for k in ks if k <= tokenizer.num_tokens]:
            gen = torch.Generator().manual_seed(k)
            rows.append(tokenizer.detokenize(tokens[:, :k], steps=steps, decoder=decoder, generator=gen))
    images = quantize_like_samples(torch.cat(rows)).permute(0, 3, 1, 2)
    grid = make_grid(images, nrow=len(crops), padding=2, pad_value=255).permute(1, 2, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(Image.fromarray(grid.numpy()), path)


def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def latency(pipe, sampler, labels: torch.Tensor, seed: int) -> dict:
    """Median batch-1 AR sampling and decoding times (after one warm-up image), and forwards per image."""
    def one(label, i):
        out = sampler.generate(pipe.gpt, label[None], torch.Generator().manual_seed(seed + i))
        _, decode_s = timed(pipe.decode, out.tokens, torch.Generator().manual_seed(seed + i))
        return out.stats, decode_s

    one(labels[0], -1)
    runs = [one(label, i) for i, label in enumerate(labels)]
    sample = [st.wall_time_s for st, _ in runs]
    decode = [d for _, d in runs]
    total = [s + d for s, d in zip(sample, decode)]
    return {"nfe": statistics.mean(st.nfe for st, _ in runs), "sample_s": statistics.median(sample),
            "decode_s": statistics.median(decode), "total_s": statistics.median(total)}


def generation(pipe, sampler, labels: torch.Tensor, batch_size: int, seed: int, reference, extractor) -> dict:
    images = []
    for i, chunk in enumerate(labels.split(batch_size)):
        gen = torch.Generator().manual_seed(seed + 1000 + i)
        images.append(pipe.decode(sampler.generate(pipe.gpt, chunk, gen).tokens, gen))
    return score(torch.cat(images), labels, reference, extractor)


def decoder_name(decoder: str, steps: int) -> str:
    return "one-pass decoder" if decoder == "direct" else f"rectified-flow decoder, {steps} Euler steps"


def markdown(recon: dict, gen: dict, command: str, env: dict, png: str, num_tokens: int, decoder: str = "direct",
             steps: int = 8) -> str:
    ar = gen["ar"]
    which = decoder_name(decoder, steps)
    lines = [
        f"## FlexTok: reconstruction and generation vs the number of tokens k (fp32, {which})", "",
        f"Command: `{command}`", "",
        f"Environment: {env['cpu']}, {env['threads']} threads, fp32, torch {env['torch']}, commit {env['commit']}, "
        f"{env['date_utc']}. Ratios come from this one run.", "",
        f"Reconstruction of held-out crops from their first k of K = {num_tokens} tokens ({which}):", "",
        "| k | MSE | PSNR (dB) | FD-domain | class accuracy |", "|---|---|---|---|---|",
    ]
    lines += [f"| {k} | {r['mse']:.4f} | {r['psnr_db']:.2f} | {r['fd_domain']:.2f} | {r['class_accuracy']:.3f} |"
              for k, r in recon.items()]
    lines += [
        "", "Generation (`ar`, cfg 4), next to the 256-token LlamaGen AR model (`ar` row, VQ decoder):", "",
        "| model | k | forwards / image | forwards vs ar | FD-domain | FD-domain / ar | class accuracy | sampling b=1 (s) "
        "| decode b=1 (s) | total b=1 (s) | total / ar |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in gen.items():
        lines.append(
            f"| {'llamagen' if name == 'ar' else 'flextok'} | {r['k']} | {r['nfe']:.0f} | {ar['nfe'] / r['nfe']:.1f}x "
            f"| {r['fd_domain']:.2f} | {r['fd_domain'] / ar['fd_domain']:.2f} | {r['class_accuracy']:.3f} "
            f"| {r['sample_s']:.3f} | {r['decode_s']:.3f} | {r['total_s']:.3f} | {r['total_s'] / ar['total_s']:.2f}x |")
    lines += ["", "Goals (k = 32):", "", *goal_lines(gen)]
    if png:
        lines += ["", f"![FlexTok vs k]({Path(png).name})"]
    return "\n".join(lines)


def goal_lines(gen: dict) -> list[str]:
    ar, r = gen["ar"], gen.get("k32")
    if r is None:
        return ["- not measured: k = 32 was not in --ks"]
    checks = [(ar["nfe"] / r["nfe"] >= 8, f"{ar['nfe'] / r['nfe']:.1f}x fewer forwards than ar (>= 8x)"),
              (r["fd_domain"] <= 1.5 * ar["fd_domain"], f"FD-domain {r['fd_domain'] / ar['fd_domain']:.2f}x ar's (<= 1.5x)"),
              (r["total_s"] <= 0.5 * ar["total_s"],
               f"end-to-end batch-1 time (AR + decode) {r['total_s'] / ar['total_s']:.2f}x ar's (<= 0.5x)")]
    return [f"- {'met' if ok else 'NOT met'}: {text}" for ok, text in checks]


def twin_legend(ax, twin) -> None:
    """One legend for a panel and its twin y-axis."""
    handles = [h for a in (ax, twin) for h in a.get_legend_handles_labels()[0]]
    ax.legend(handles, [h.get_label() for h in handles], fontsize=7, loc="center right")


def plot(recon: dict, gen: dict, path: Path, which: str = "one-pass decoder") -> None:
    """Three panels against k: reconstruction (PSNR, FD-domain); generation quality (FD-domain, class accuracy,
    with the 256-token AR model's as lines); batch-1 time split into sampling and decoding."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, mid, right) = plt.subplots(1, 3, figsize=(15, 4.4))
    ks = list(recon)
    left.plot(ks, [recon[k]["psnr_db"] for k in ks], "o-", label="PSNR (dB)")
    left.set_ylabel("PSNR (dB)")
    twin = left.twinx()
    twin.plot(ks, [recon[k]["fd_domain"] for k in ks], "s--", color="tab:red", label="FD-domain")
    twin.set_ylabel("FD-domain (lower is better)")
    left.set_title(f"reconstruction of held-out crops\n({which})", fontsize=10)
    twin_legend(left, twin)

    ar = gen["ar"]
    flex = [r for name, r in gen.items() if name != "ar"]
    gk = [r["k"] for r in flex]
    mid.plot(gk, [r["fd_domain"] for r in flex], "o-", label="flextok FD-domain")
    mid.axhline(ar["fd_domain"], ls="--", color="tab:blue", lw=0.8, label="ar (256 tokens) FD-domain")
    mid.set_ylim(bottom=0)
    mid.set_ylabel("FD-domain (lower is better; axis from 0)")
    twin = mid.twinx()
    twin.plot(gk, [r["class_accuracy"] for r in flex], "s-", color="tab:purple", label="flextok class accuracy")
    twin.axhline(ar["class_accuracy"], ls=":", color="tab:purple", lw=0.8, label="ar class accuracy")
    twin.set_ylim(0, 1)
    twin.set_ylabel("class accuracy")
    mid.set_title(f"generation quality (ar sampler, cfg 4)\n({which})", fontsize=10)
    twin_legend(mid, twin)

    right.plot(gk, [r["sample_s"] for r in flex], "^-", color="tab:green", label="AR sampling")
    right.plot(gk, [r["decode_s"] for r in flex], "x--", color="tab:brown", label="decoding")
    right.plot(gk, [r["total_s"] for r in flex], "v-", color="tab:olive", label="sampling + decoding")
    right.axhline(ar["total_s"], ls="-.", color="gray", lw=0.8, label="ar (256 tokens) total")
    right.set_ylim(bottom=0)
    right.set_ylabel("seconds per image, batch 1 (median)")
    right.set_title("batch-1 time per image", fontsize=10)
    right.legend(fontsize=7)
    for ax in (left, mid, right):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens k")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    ks = [int(k) for k in a.ks.split(",") if k.strip()]

    from genaccel.eval.fd import reference_domain_stats
    from genaccel.eval.feature_extractor import load_feature_extractor

    flex = load_model("flextok", ckpt=a.ckpt, vq_ckpt=a.tokenizer, decoder=a.decoder, decode_steps=a.decode_steps)
    if not ks or min(ks) < 1 or max(ks) > flex.gpt.args.block_size:
        raise SystemExit(f"--ks must lie in [1, {flex.gpt.args.block_size}], got {a.ks!r}")
    ar_pipe = load_model("llamagen")
    extractor = load_feature_extractor(a.classifier)
    reference = reference_domain_stats(a.reference_per_class, extractor=extractor, size=flex.image_size)
    if a.recon_grid:
        reconstruction_grid(flex.vq, Path(a.recon_grid), steps=a.decode_steps)
    recon = reconstruction(flex.vq, a.recon_per_class, reference, extractor, a.decoder, a.decode_steps)
    sampler = flex.prepare_sampler(build_sampler("ar", cfg_scale=a.cfg_scale))
    labels = labels_for(flex.num_classes, None, a.num_images)
    latency_labels = labels_for(flex.num_classes, None, a.latency_images)
    gen = {"ar": {"k": ar_pipe.gpt.num_image_tokens, **latency(ar_pipe, sampler, latency_labels, a.seed),
                  **generation(ar_pipe, sampler, labels, a.batch_size, a.seed, reference, extractor)}}
    for k in ks:
        flex.gpt.set_generation_length(k)
        gen[f"k{k}"] = {"k": k, **latency(flex, sampler, latency_labels, a.seed),
                        **generation(flex, sampler, labels, a.batch_size, a.seed, reference, extractor)}
        print(f"k={k}: " + ", ".join(f"{n}={v:.3f}" for n, v in gen[f"k{k}"].items() if isinstance(v, float)),
              flush=True)
    flex.gpt.set_generation_length(None)
    command = "python -m genaccel.bench flextok " + " ".join(shlex.quote(x) for x in argv)
    env = environment(a.threads, "fp32")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps({"command": command, "env": env, "reconstruction": recon,
                                            "generation": gen}, indent=2))
    if a.png:
        plot(recon, gen, Path(a.png), decoder_name(a.decoder, a.decode_steps))
    if a.doc:
        write_section(a.section, markdown(recon, gen, command, env, a.png, flex.vq.num_tokens, a.decoder,
                                          a.decode_steps), Path(a.doc))
    return {"reconstruction": recon, "generation": gen}


if __name__ == "__main__":
    main()
