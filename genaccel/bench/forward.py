"""``python -m genaccel.bench forward``: latency of one forward with 1 vs k tokens against a warm KV cache.

Speculative and parallel decoding pay off only when verifying k tokens costs little more than one; this
measures that ratio for a random-init model (GPT-B by default) on the current device.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from genaccel.bench.sections import write_section
from genaccel.cli import DTYPES, add_dtype_flag, environment
from genaccel.models.llamagen import build_gpt


def time_forward(model, tokens: torch.Tensor, start: int, repeats: int, warmup: int) -> float:
    """Median seconds of ``forward_tokens`` feeding ``tokens`` at slots start.., rolled back each time."""
    positions = torch.arange(start, start + tokens.shape[1])
    times = []
    for i in range(warmup + repeats):
        model.rollback(start)
        t0 = time.perf_counter()
        model.forward_tokens(tokens, positions)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.no_grad()
def run(preset: str, batch: int, context: int, ks: list[int], repeats: int, warmup: int, threads: int | None,
        dtype: str = "fp32") -> dict:
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_gpt(preset).eval()
    model.init_weights()
    model.to(DTYPES[dtype])
    model.setup_cache(batch)
    model.prefill(torch.zeros(batch, dtype=torch.long))
    model.forward_tokens(torch.randint(0, model.vocab_size, (batch, context)), torch.arange(1, context + 1))
    start = 1 + context
    results = {}
    for k in ks:
        toks = torch.randint(0, model.vocab_size, (batch, k))
        results[k] = time_forward(model, toks, start, repeats, warmup)
    return {"preset": preset, "batch": batch, "context": context, "dtype": dtype, "latency_s": results,
            "ratio_vs_1": {k: results[k] / results[ks[0]] for k in ks}, "environment": environment()}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m genaccel.bench forward")
    p.add_argument("--gpt-model", default="GPT-B")
    p.add_argument("--batch", type=int, default=2, help="rows in the forward (2 = one image with CFG)")
    p.add_argument("--context", type=int, default=128, help="tokens already in the cache")
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 16])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    add_dtype_flag(p)
    p.add_argument("--write", action="store_true", help="record the result in docs/benchmarks.md")
    a = p.parse_args(argv)
    r = run(a.gpt_model, a.batch, a.context, a.tokens, a.repeats, a.warmup, a.threads, a.dtype)
    cmd = "python -m genaccel.bench forward " + " ".join(argv or [])
    rows = "\n".join(f"| {k} | {r['latency_s'][k] * 1e3:.1f} | {r['ratio_vs_1'][k]:.2f}x |" for k in a.tokens)
    env = r["environment"]
    body = (f"## Forward latency: 1 vs k tokens (random-init {a.gpt_model}, batch {a.batch}, {a.context} cached)\n\n"
            f"Command: `{cmd.strip()}`  \nEnvironment: torch {env['torch']}, {env['threads']} threads, "
            f"{env['machine']} CPU, {a.dtype}.\n\n| tokens per forward | median latency (ms) | vs 1 token |\n|---|---|---|\n{rows}\n\n"
            f"Goal: 16 tokens <= 1.5x one token. "
            f"{'Met' if r['ratio_vs_1'].get(16, 0) <= 1.5 else 'Not met'} on this machine "
            f"({r['ratio_vs_1'].get(16, float('nan')):.2f}x).")
    print(body)
    if a.write:
        write_section(f"forward-{a.dtype}", body)
    return r


if __name__ == "__main__":
    main()
