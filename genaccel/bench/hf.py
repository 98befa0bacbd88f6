"""Every sampler through the Hugging Face adapter on a random-init Janus-style model: ``python -m genaccel.bench hf``.

Builds a ``JanusForConditionalGeneration`` from a config alone (random weights, no download) with the widths
of Janus-Pro-1B's image-generation path -- text decoder hidden 2048, 16 heads, MLP 5632, text vocabulary
102400, VQ codebook 16384 x 8, generation head/aligner 2048, a 24 x 24 grid of 576 image tokens -- and
``--layers`` decoder layers (24 in Janus-Pro-1B; fewer where a CPU cannot afford them). The understanding
tower (SigLIP) is not used by image generation and is built tiny. Each sampler generates ``--num-images``
images one by one (batch 1, both CFG rows in one forward) through :class:`genaccel.models.hf.JanusImageAdapter`;
the table reports target forwards per image, step compression (tokens / forwards) and seconds per image.

Random weights give next-token distributions unlike a trained model's, so drafts are accepted far more (or
less) often than on Janus-Pro: acceptance and step compression here measure the adapter's
mechanics and per-forward cost, not what a sampler gains on Janus-Pro. ``sd`` drafts with a
``--draft-layers`` random model of the same widths; ``lantern`` has no drafter for this model and drafts
with the Jacobi window (its relaxed acceptance still applies).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from genaccel.bench.samplers import environment
from genaccel.models.hf import JanusImageAdapter, build_hf_sampler, require_transformers_class


def special_ids(vocab: int) -> tuple[int, int, int]:
    """(BOS, pad, <begin_of_image>) ids: the last three of the text vocabulary (any would do for random weights)."""
    return vocab - 3, vocab - 2, vocab - 1


@dataclass(frozen=True)
class JanusShape:
    """Sizes of a Janus image-generation path (the text decoder, VQ codebook, generation head and grid)."""

    hidden: int
    layers: int
    heads: int
    intermediate: int
    text_vocab: int
    codes: int
    code_dim: int
    side: int


SHAPES = {
    "janus-pro-1b": JanusShape(hidden=2048, layers=24, heads=16, intermediate=5632, text_vocab=102400, codes=16384,
                               code_dim=8, side=24),
    "tiny": JanusShape(hidden=64, layers=2, heads=4, intermediate=128, text_vocab=256, codes=64, code_dim=8, side=4),
}


def janus_style_model(shape: JanusShape, layers: int | None = None, seed: int = 0):
    """A random-init ``JanusForConditionalGeneration`` of ``shape`` (``layers`` overrides the depth)."""
    cls = require_transformers_class("JanusForConditionalGeneration")
    from transformers import JanusConfig, JanusVisionConfig, JanusVQVAEConfig, LlamaConfig

    bos, pad, boi = special_ids(shape.text_vocab)
    text = LlamaConfig(hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                       num_hidden_layers=layers or shape.layers, num_attention_heads=shape.heads,
                       num_key_value_heads=shape.heads, vocab_size=shape.text_vocab, max_position_embeddings=4096,
                       pad_token_id=pad, bos_token_id=bos, eos_token_id=bos)
    vision = JanusVisionConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=16,
                               projection_dim=shape.hidden, num_image_tokens=shape.side * shape.side, depth=1)
    vq = JanusVQVAEConfig(embed_dim=shape.code_dim, num_embeddings=shape.codes, latent_channels=32, base_channels=32,
                          channel_multiplier=[1, 1], num_res_blocks=1, num_patches=shape.side,
                          projection_dim=shape.hidden, image_token_embed_dim=shape.hidden)
    torch.manual_seed(seed)
    model = cls(JanusConfig(text_config=text, vision_config=vision, vq_config=vq, image_token_id=0))
    model.generation_config.bos_token_id, model.generation_config.pad_token_id = bos, pad
    model.generation_config.generation_kwargs = {"boi_token_id": boi}
    return model.eval()


def random_prompts(num: int, length: int, vocab: int, seed: int) -> list[torch.Tensor]:
    """``num`` prompts of ``length`` ids: BOS, random text ids, ``<begin_of_image>`` (Janus's layout)."""
    bos, _, boi = special_ids(vocab)
    gen = torch.Generator().manual_seed(seed)
    body = torch.randint(1, bos, (num, length - 2), generator=gen)
    return [torch.cat([torch.tensor([bos]), row, torch.tensor([boi])]) for row in body]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m genaccel.bench hf", description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="janus-pro-1b", choices=sorted(SHAPES))
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default: the shape's)")
    p.add_argument("--draft-layers", type=int, default=1, help="layers of sd's random draft model (same widths)")
    p.add_argument("--samplers", default="ar,sjd,mcsjd,gsd,lantern,sd", help="comma list of sampler names")
    p.add_argument("--num-images", type=int, default=1, help="images per sampler, generated one by one")
    p.add_argument("--prompt-len", type=int, default=32, help="prompt tokens (BOS ... <begin_of_image>)")
    p.add_argument("--cfg-scale", type=float, default=5.0, help="Janus's default guidance")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--window", type=int, default=16, help="Jacobi window of sjd/gsd/lantern (mcsjd: its own 32)")
    p.add_argument("--draft-len", type=int, default=4, help="sd: drafted tokens per target forward")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--write", action="store_true", help="write the table into docs/benchmarks.md (section hf-janus)")
    p.add_argument("--json", default="", help="write every number to this JSON file ('' = none)")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="sample nothing: one table from the --json files of earlier runs of one setup (samplers "
                        "split over runs), printed and, with --write, written")
    p.add_argument("--note", default="", help="a sentence printed under the table (e.g. how the machine was shared)")
    a = p.parse_args(argv)
    if a.num_images < 1 or a.prompt_len < 2:
        p.error("--num-images must be >= 1 and --prompt-len >= 2 (BOS and <begin_of_image>)")
    if a.layers is not None and a.layers < 1 or a.draft_layers < 1:
        p.error("--layers and --draft-layers must be >= 1")
    return a


def sampler_options(name: str, a: argparse.Namespace) -> dict:
    """The options each sampler runs with here (common ones + its draft size)."""
    options = {"cfg_scale": a.cfg_scale, "temperature": a.temperature}
    if name in ("sjd", "gsd", "lantern"):
        options["window"] = a.window
    if name in ("sd",):
        options["draft_len"] = a.draft_len
    return options


SETUP = ("shape", "layers", "draft_layers", "num_images", "prompt_len", "cfg_scale", "temperature", "window",
         "draft_len", "seed", "threads")


def run_args(command: str) -> argparse.Namespace:
    """The parsed options of a recorded ``python -m genaccel.bench hf ...`` command."""
    return parse_args(shlex.split(command)[4:])


def merge_runs(paths: list[str]) -> tuple[dict, list[str], dict, argparse.Namespace]:
    """(results in file order, commands, first environment, setup) of runs that share one setup."""
    payloads = [json.loads(Path(p).read_text()) for p in paths]
    setups = [run_args(p["command"]) for p in payloads]
    for path, s in zip(paths, setups):
        diff = [k for k in SETUP if getattr(s, k) != getattr(setups[0], k)]
        if diff:
            raise SystemExit(f"error: {path} was run with other {', '.join(diff)} than {paths[0]}; merge only runs of "
                             "one setup")
    results: dict = {}
    for p in payloads:
        results.update(p["results"])
    return results, [p["command"] for p in payloads], payloads[0]["environment"], setups[0]


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    a = parse_args(argv)
    if a.merge:
        results, commands, env, setup = merge_runs(a.merge)
        table = markdown(results, setup, commands, env, a.note)
        print(table)
        if a.write:
            from genaccel.bench.sections import write_section

            write_section("hf-janus", table)
        return results
    torch.set_num_threads(a.threads)
    names = [n.strip() for n in a.samplers.split(",") if n.strip()]
    shape = SHAPES[a.shape]
    model = janus_style_model(shape, a.layers)
    prompts = random_prompts(max(a.num_images, 1), a.prompt_len, shape.text_vocab, a.seed)
    adapter = JanusImageAdapter(model, prompts)
    results = {}
    for name in names:
        sampler = build_hf_sampler(name, adapter, **sampler_options(name, a))
        if name == "sd":
            sampler.set_draft_model(JanusImageAdapter(janus_style_model(shape, a.draft_layers, seed=1), prompts))
        nfe, wall, accepted = [], [], []
        for i in range(a.num_images):
            tic = time.perf_counter()
            out = sampler.generate(adapter, torch.tensor([i]), torch.Generator().manual_seed(a.seed + i))
            wall.append(time.perf_counter() - tic)
            nfe.append(out.stats.nfe)
            accepted.append(out.stats.extra.get("mean_accepted_length", 1.0))
        mean_nfe = sum(nfe) / len(nfe)
        results[name] = {"options": sampler_options(name, a), "nfe": mean_nfe,
                         "step_compression": adapter.num_image_tokens / mean_nfe, "s_per_image": sum(wall) / len(wall),
                         "mean_accepted_length": sum(accepted) / len(accepted)}
        r = results[name]
        print(f"{name}: {r['nfe']:.1f} forwards, {r['step_compression']:.2f}x, {r['s_per_image']:.2f} s/image",
              flush=True)
    command = "python -m genaccel.bench hf " + " ".join(shlex.quote(x) for x in argv)
    env = environment(a.threads, "fp32")
    table = markdown(results, a, [command], env, a.note)
    print(table)
    if a.write:
        from genaccel.bench.sections import write_section

        write_section("hf-janus", table)
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps({"command": command, "environment": env, "results": results}, indent=2))
    return results


def markdown(results: dict, a: argparse.Namespace, commands: list[str], env: dict, note: str = "") -> str:
    """The docs/benchmarks.md section: setup, caveat, the command(s), one row per sampler (time vs ar where ar ran)."""
    shape = SHAPES[a.shape]
    layers = a.layers or shape.layers
    ar = results.get("ar")
    lines = [
        f"Samplers through the Hugging Face adapter on a random-init `JanusForConditionalGeneration` "
        f"(`{a.shape}` widths: hidden {shape.hidden}, {shape.heads} heads, MLP {shape.intermediate}, codebook "
        f"{shape.codes}, {shape.side}x{shape.side} = {shape.side ** 2} image tokens; {layers} of its {shape.layers} "
        f"decoder layers{' -- depth cut to fit this CPU' if layers < shape.layers else ''}), batch 1, cfg "
        f"{a.cfg_scale}, temperature {a.temperature}, {a.num_images} image(s) per sampler.",
        "",
        "Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()) + ".",
        "",
        "**Random weights: acceptance and step compression are not quality or speed-up claims for Janus-Pro**: "
        "a random-init model's next-token distributions are nothing like a trained one's, so drafts are accepted "
        "at rates Janus-Pro does not have. The rows show that every sampler runs through the adapter and what its "
        "forwards cost at this shape.",
        "",
        *([f"Command: `{commands[0]}`"] if len(commands) == 1 else
          [f"Rows measured in {len(commands)} runs of this setup (`--merge` of their JSON files):", "",
           *[f"- `{c}`" for c in commands]]),
        "",
        "| sampler | forwards / image | step compression | mean accepted length | s / image | time vs ar |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        rel = f"{r['s_per_image'] / ar['s_per_image']:.2f}x" if ar else "-"
        lines.append(f"| {name} | {r['nfe']:.1f} | {r['step_compression']:.2f}x | {r['mean_accepted_length']:.2f} | "
                     f"{r['s_per_image']:.2f} | {rel} |")
    if note:
        lines += ["", note]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
