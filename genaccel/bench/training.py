"""``python -m genaccel.bench training``: training time per epoch of each model family under equal conditions.

Same backbone (the bundled GPT's sizes), same batch, threads, dtype and optimiser (AdamW, as the recipes),
random tokens and labels: only the family differs. One step is forward + backward of the family's own
objective (``token_ce`` of ``teacher_forced``) + optimiser step; the median of ``--steps`` timed steps
after ``--warmup`` is the step time, and the time per epoch is that times the steps an epoch of
``--epoch-images`` images takes at the batch size (the same for every family, so the epoch ratio vs
``gpt`` is the step-time ratio). ``token-shuffle-128`` trains on 128x128 images (32x32 tokens in 256
positions): its ratio is per image with 4x the pixels.
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

from genaccel.bench.sections import write_section
from genaccel.cli import environment

FAMILIES = ("gpt", "nar", "token-shuffle", "token-shuffle-128")


def build(family: str, gen: torch.Generator) -> torch.nn.Module:
    """A model of ``family`` on the bundled GPT's backbone (weights as the recipes initialise them)."""
    from genaccel.models import BUNDLED, load_gpt
    from genaccel.models.token_shuffle import TokenShuffleArgs
    from genaccel.train.nar import nar_from_gpt
    from genaccel.train.token_shuffle import token_shuffle_from_gpt

    gpt = load_gpt(BUNDLED["gpt"])
    if family == "gpt":
        return gpt
    if family == "nar":
        return nar_from_gpt(gpt)
    if family == "token-shuffle":
        return token_shuffle_from_gpt(gpt, TokenShuffleArgs(), gen)
    if family == "token-shuffle-128":
        return token_shuffle_from_gpt(gpt, TokenShuffleArgs(), gen, block_size=4 * gpt.num_image_tokens)
    raise SystemExit(f"unknown family {family!r}; available: {', '.join(FAMILIES)}")


def time_steps(model: torch.nn.Module, batch: int, steps: int, warmup: int, gen: torch.Generator) -> list[float]:
    """Seconds of each timed training step (forward + backward + AdamW) on random tokens."""
    from genaccel.train.gpt import token_ce

    model.float().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)
    times = []
    for i in range(warmup + steps):
        tokens = torch.randint(0, model.vocab_size, (batch, model.num_image_tokens), generator=gen)
        labels = torch.randint(0, model.num_classes, (batch,), generator=gen)
        tic = time.perf_counter()
        loss = token_ce(model, labels, tokens)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - tic)
    return times


def markdown(results: dict, args: argparse.Namespace, command: str, env: dict) -> str:
    base = results["gpt"]["step_s"]
    rows = ["| family | image | tokens | positions | step (s, median) | epoch of "
            f"{args.epoch_images} images (min) | epoch time / gpt |", "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        rows.append(f"| {name} | {r['image_size']}px | {r['tokens']} | {r['positions']} | {r['step_s']:.3f} "
                    f"| {r['epoch_min']:.1f} | {r['step_s'] / base:.2f}x |")
    return "\n".join([
        "## Training time per epoch (equal conditions)", "", f"Command: `{command}`", "",
        f"Environment: {json.dumps(env, sort_keys=True)}; batch {args.batch}, {args.threads} threads, fp32, AdamW.",
        "", *rows, "",
        "One step = forward + backward of the family's objective + optimiser step, on the bundled GPT's backbone "
        "(random tokens; step time does not depend on their values). Same batch for every family, so the epoch "
        "ratio is the step-time ratio; token-shuffle-128 images have 4x the pixels of the others.",
    ])


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m genaccel.bench training", description=__doc__.splitlines()[0])
    p.add_argument("--families", default=",".join(FAMILIES), help="comma list; 'gpt' (AR) is the reference")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=6, help="timed steps per family")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--epoch-images", type=int, default=16384, help="images per epoch (the recipes: 16 x 1024)")
    p.add_argument("--doc", default="docs/benchmarks.md", help="'' to skip writing the docs section")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    names = [n.strip() for n in a.families.split(",") if n.strip()]
    names = ["gpt", *[n for n in names if n != "gpt"]]
    unknown = [n for n in names if n not in FAMILIES]
    if unknown:
        raise SystemExit(f"unknown families {unknown}; available: {', '.join(FAMILIES)}")
    results = {}
    for name in names:
        gen = torch.Generator().manual_seed(0)
        model = build(name, gen)
        times = time_steps(model, a.batch, a.steps, a.warmup, gen)
        step = statistics.median(times)
        tokens = model.num_image_tokens
        positions = getattr(model, "num_positions", tokens)
        results[name] = {"step_s": step, "times_s": times, "tokens": tokens, "positions": positions,
                         "image_size": 4 * int(round(tokens ** 0.5)),
                         "epoch_min": step * (a.epoch_images / a.batch) / 60}
        print(f"{name}: {step:.3f} s/step, {results[name]['epoch_min']:.1f} min/epoch", flush=True)
    command = " ".join(["python -m genaccel.bench training", *map(shlex.quote, argv)])
    if a.doc:
        write_section("training-epoch", markdown(results, a, command, environment()), Path(a.doc))
    return results


if __name__ == "__main__":
    main()
