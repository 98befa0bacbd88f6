"""Compression-aware attack vs random noise for every attackable strategy on every tiny model family.

Run from tests/pruning: `python attack_report.py [--epsilon 0.1] [--steps 10] [--keep 0.25]`. Prints a
Markdown table: per (family, strategy) the Jaccard overlap of the chosen visual tokens with the clean choice
after PGD on the pixels (`robustness.attack_overlap`) and after random +-epsilon noise, mean / min over the
images of the batch, and the surrogate loss before and after the attack. Random-init models: this shows what
the probe measures, not how a trained VLM behaves.
"""

from __future__ import annotations

import argparse
import statistics

import tiny_vlms

from genaccel.pruning.robustness import attack_overlap

CLS = ["fastervlm", "visionzip", "hired"]
ANY = ["global-attention", "divprune", "mmr", "fastv", "dart"]


def cases():
    """(family, model, inputs, strategies): two images per family (Qwen2.5-VL: an image and a video)."""
    llava = tiny_vlms.build_llava()
    yield "llava", llava, tiny_vlms.llava_inputs([1, 1]), CLS + ANY
    nxt = tiny_vlms.build_llava_next()
    yield "llava_next", nxt, tiny_vlms.llava_next_inputs(nxt, [(32, 64), (64, 64)]), CLS + ANY
    yield "qwen2_vl", tiny_vlms.build_qwen2vl(), tiny_vlms.qwen2vl_inputs([[(1, 8, 8)], [(1, 8, 12)]]), ANY
    yield "qwen2_5_vl", tiny_vlms.build_qwen25vl(), tiny_vlms.qwen2vl_image_and_video(), ANY
    ov = tiny_vlms.build_llava_onevision()
    yield "llava_onevision", ov, tiny_vlms.llava_onevision_inputs(ov, [(32, 64), (64, 64)]), ANY


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epsilon", type=float, default=0.1)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--keep", type=float, default=0.25)
    args = parser.parse_args()
    print(
        "| family | strategy | PGD overlap mean / min | random +-eps overlap mean / min | surrogate loss clean -> last step |"
    )
    print("|---|---|---|---|---|")
    for family, model, inputs, strategies in cases():
        for strategy in strategies:
            report = attack_overlap(model, inputs, strategy, keep=args.keep, epsilon=args.epsilon, steps=args.steps)
            attack = f"{statistics.mean(report.attack):.2f} / {min(report.attack):.2f}"
            jitter = f"{statistics.mean(report.jitter):.2f} / {min(report.jitter):.2f}"
            loss = f"{report.losses[0]:.2f} -> {report.losses[-1]:.2f}"
            print(f"| {family} | {strategy} | {attack} | {jitter} | {loss} |", flush=True)


if __name__ == "__main__":
    main()
