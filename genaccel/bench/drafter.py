"""``python -m genaccel.bench drafter``: what one step's drafting costs at each ``--drafter-precision``.

``lantern`` and ``sd`` draft with the EAGLE-style head right after every target forward, which has pushed the
head's weights out of the CPU caches. So the figures here are taken the same way: a target forward, then
one step's drafting (a catch-up feed of the committed entries and a chain of single-entry extensions, each
followed by the LM head), and each packed matrix alone on two rows (one image with CFG). Results go to
docs/benchmarks.md with ``--write``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from genaccel.bench.samplers import environment
from genaccel.bench.sections import write_section
from genaccel.models.drafter import DRAFTER_PRECISIONS, load_drafter, resolve_drafter_precision
from genaccel.pipeline import load_model

MATRICES = ("_fc_hidden", "_wqkv", "_wo", "_w13", "_w2", "_head")
WARMUP = 3  # untimed repeats before each measurement


def target_forward(gpt, labels: torch.Tensor, tokens: torch.Tensor) -> None:
    """One forward of the target over a short sequence: reads all of its weights, as a verify step does."""
    gpt.teacher_forced(labels, tokens)


def drafting_step(drafter, feed: torch.Tensor, hidden: torch.Tensor, start: int, chain: int) -> tuple[float, float]:
    """(catch-up seconds, seconds per extension) of one drafting step: the catch-up feed of ``feed``'s entries
    at slots start.., then ``chain - 1`` single-entry extensions; the LM head after each call."""
    (R, entries), D = feed.shape, hidden.shape[-1]
    t0 = time.perf_counter()
    h = drafter.decode(feed, hidden[:, :entries], (start + torch.arange(entries)).expand(R, -1))[:, -1:]
    drafter.logits(h)
    t1 = time.perf_counter()
    for k in range(chain - 1):
        h = drafter.decode(feed[:, :1], h.reshape(R, 1, D), torch.full((R, 1), start + entries + k))
        drafter.logits(h)
    return t1 - t0, (time.perf_counter() - t1) / max(chain - 1, 1)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def int8_fp32_input(layer, rows: int):
    """The int8 kernel fed float32 inputs and scales (the path PackedLinear avoids by casting to bfloat16), or
    None where the layer does not use the kernel."""
    if layer.precision != "int8" or not layer.fused:
        return None
    x, scale = torch.randn(rows, layer.weight.shape[1]), layer.scale.float()
    return lambda: torch.ops.aten._weight_int8pack_mm(x, layer.weight, scale)


@torch.inference_mode()
def run(precisions: list[str], repeats: int, threads: int, entries: int, chain: int, context: int) -> dict:
    """Precisions take turns repeat by repeat (one drafter each), so load from other jobs hits all alike;
    every timed call follows a target forward."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    gpt = load_model("llamagen").gpt
    R, D = 2, gpt.hidden_dim  # one image with CFG
    if context + entries + chain > gpt.num_image_tokens:
        raise SystemExit(f"error: --context + --entries + --chain must fit the image's {gpt.num_image_tokens} tokens")
    labels, tokens = torch.tensor([0, gpt.null_class]), torch.randint(gpt.vocab_size, (R, 16))
    drafters = {p: load_drafter() for p in precisions}
    vocab = min(gpt.vocab_size, next(iter(drafters.values())).args.vocab_size)
    feed, hidden = torch.randint(vocab, (R, entries)), torch.randn(R, max(entries, context), D)
    calls = {}  # (precision, what) -> a timed callable
    for p, d in drafters.items():
        d.setup_decoding(R, gpt.num_image_tokens, resolve_drafter_precision(p, "cpu"))
        d.decode(torch.randint(vocab, (R, context)), hidden[:, :context], torch.arange(context).expand(R, -1))
        for name in MATRICES:
            layer = getattr(d, name)
            x = torch.randn(R, layer.weight.shape[1]).to(d._act_dtype)
            calls[p, name] = (lambda layer=layer, x=x: layer(x))
            slow = int8_fp32_input(layer, R)
            if slow is not None:
                calls[p, name + ":fp32-input"] = slow
    steps = {p: [] for p in precisions}
    times = {key: [] for key in calls}
    for i in range(WARMUP + repeats):
        for p, d in drafters.items():
            target_forward(gpt, labels, tokens)
            step = drafting_step(d, feed, hidden, context, chain)
            if i >= WARMUP:  # the first calls of a precision pay one-time kernel set-up (oneDNN bf16)
                steps[p].append(step)
        for key, fn in calls.items():
            target_forward(gpt, labels, tokens)
            t = timed(fn)
            if i >= WARMUP:
                times[key].append(t)
    results = {}
    for p, d in drafters.items():
        catch = statistics.median(c for c, _ in steps[p])
        ext = statistics.median(e for _, e in steps[p])
        total = statistics.median(c + (chain - 1) * e for c, e in steps[p])
        matrices = {name: {"shape": list(getattr(d, name).weight.shape), "s": statistics.median(times[p, name]),
                           "int8_kernel_fp32_input_s": (statistics.median(times[p, name + ":fp32-input"])
                                                        if (p, name + ":fp32-input") in times else None)}
                    for name in MATRICES}
        results[p] = {"resolved": d.decoding_precision, "step_s": total, "catch_up_s": catch, "extend_s": ext,
                      "matrices": matrices}
    return {"results": results, "env": environment(threads, "fp32"), "entries": entries, "chain": chain,
            "context": context, "repeats": repeats}


def markdown(r: dict, command: str) -> str:
    env, res = r["env"], r["results"]
    names = list(res)
    base = res.get("fp32")
    lines = [
        "## Drafter head: one step's drafting per --drafter-precision (bundled drafter, after a target forward)",
        "",
        f"Command: `{command}`",
        "",
        f"Environment: {env['cpu']}, {env['threads']} threads, torch {env['torch']}, python {env['python']}, commit "
        f"{env['commit']}, {env['date_utc']}. CPU shared with other jobs: absolute times are noisy; ratios come "
        f"from this one run.",
        "",
        f"A step = a catch-up feed of {r['entries']} entries at slot {r['context']} of a filled cache, then "
        f"{r['chain'] - 1} single-entry extensions, with the LM head after each call; 2 rows (one image with CFG); "
        f"every timed call follows a target forward; precisions take turns. Medians of {r['repeats']} repeats after "
        f"{WARMUP} untimed ones.",
        "",
        "| precision | step (ms) | vs fp32 | catch-up (us) | one extension (us) |",
        "|---|---|---|---|---|",
    ]
    for n in names:
        x = res[n]
        label = n if x["resolved"] == n else f"{n} (= {x['resolved']})"
        ratio = f"{x['step_s'] / base['step_s']:.2f}x" if base else "-"
        lines.append(f"| {label} | {x['step_s'] * 1e3:.2f} | {ratio} | {x['catch_up_s'] * 1e6:.0f} | {x['extend_s'] * 1e6:.0f} |")
    lines += ["", "Each packed matrix on 2 rows, after a target forward (us):", "",
              "| matrix (out x in) | " + " | ".join(names) + " | int8 kernel, float32 input |",
              "|---|" + "---|" * (len(names) + 1)]
    for m in MATRICES:
        cells = [f"{res[n]['matrices'][m]['s'] * 1e6:.1f}" for n in names]
        fp32_in = next((res[n]["matrices"][m]["int8_kernel_fp32_input_s"] for n in names
                        if res[n]["matrices"][m]["int8_kernel_fp32_input_s"] is not None), None)
        shape = "x".join(str(s) for s in res[names[0]]["matrices"][m]["shape"])
        lines.append(f"| {m.strip('_')} ({shape}) | " + " | ".join(cells) + f" | {'-' if fp32_in is None else f'{fp32_in * 1e6:.1f}'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m genaccel.bench drafter")
    p.add_argument("--precisions", default="fp32,bf16,int8,auto",
                   help=f"comma-separated, of {', '.join(DRAFTER_PRECISIONS)}")
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--entries", type=int, default=5, help="entries of the catch-up feed (committed per step)")
    p.add_argument("--chain", type=int, default=4, help="drafts per step (the draft length)")
    p.add_argument("--context", type=int, default=128, help="cache slots already filled (the image position)")
    p.add_argument("--write", action="store_true", help="record the result in docs/benchmarks.md")
    a = p.parse_args(argv)
    precisions = [x.strip() for x in a.precisions.split(",") if x.strip()]
    bad = [x for x in precisions if x not in DRAFTER_PRECISIONS]
    if bad or a.repeats < 1 or a.chain < 1 or a.entries < 1 or a.context < 1:
        raise SystemExit(f"error: --precisions takes {', '.join(DRAFTER_PRECISIONS)} (got {bad}); --repeats, "
                         f"--chain, --entries and --context must be >= 1")
    r = run(precisions, a.repeats, a.threads, a.entries, a.chain, a.context)
    body = markdown(r, "python -m genaccel.bench drafter " + " ".join(argv or []))
    print(body)
    if a.write:
        write_section("drafter-precision", body)
    return r


if __name__ == "__main__":
    main()
