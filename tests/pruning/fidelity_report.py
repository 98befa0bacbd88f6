"""Keep-set Jaccard of each strategy (default and official modes) against the official definitions in the tests.

Run from tests/pruning: `python fidelity_report.py [--seeds 10]`. Signals are random per seed (N = 144
tokens, the loop-based references are slow); the references are the ones the unit tests assert against.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from test_strategies import (
    SpanSignals,
    reference_dart_official,
    reference_divprune,
    reference_hired_official,
    reference_top,
    reference_top_ordered,
    reference_visionzip_official,
    select,
    signals,
)

from genaccel.pruning.robustness import jaccard

N = 144


def anyres(seed: int) -> SpanSignals:
    """A 6x6 base image and a 2x2 crop grid of 6x6 tokens (partitions 1-4)."""
    s = signals(seed, n=36 * 5)
    partition = torch.arange(36 * 5) // 36
    cell = torch.arange(36)
    region = 1 + (cell // 6 * 2 // 6) * 2 + (cell % 6 * 2 // 6)
    chunk = 1 + cell * 4 // 36
    fill = torch.full((144,), -1)
    return SpanSignals(
        **{
            **vars(s),
            "partition": partition,
            "base_crop": torch.cat([region, fill]),
            "base_chunk": torch.cat([chunk, fill]),
        }
    )


def dart_case(seed: int, start: int = 35, n_text: int = 20):
    generator = torch.Generator().manual_seed(seed)
    states = torch.randn(start + N + n_text, 16, generator=generator)
    norms = torch.rand(start + N + n_text, generator=generator)
    image = torch.arange(start, start + N)
    text = start + N + torch.tensor(reference_top_ordered(norms[start + N :], 4))
    s = SpanSignals(
        embeds=states[image], key_norms=norms[image], text_pivots=states[text], columns=image, text_pivot_columns=text
    )
    return s, states, norms, start


def cases(seed: int, budget: int) -> dict[str, float]:
    s = signals(seed, n=N)
    out = {
        "fastervlm": jaccard(select("fastervlm", s, budget).keep, torch.tensor(reference_top(s.cls_attention, budget))),
        "fastv": jaccard(select("fastv", s, budget).keep, torch.tensor(reference_top(s.text_attention, budget))),
    }
    small = signals(seed, n=64)
    out["divprune"] = jaccard(
        select("divprune", small, budget // 2).keep, torch.tensor(reference_divprune(small.embeds, budget // 2))
    )
    n_context = round(10 / 64 * budget)
    chosen, _ = reference_visionzip_official(s, budget - n_context, n_context)
    out["visionzip official"] = jaccard(select("visionzip", s, budget).selected, torch.tensor(chosen))
    out["visionzip llm"] = jaccard(select("visionzip", s, budget, mode="llm").keep, torch.tensor(chosen))
    d, states, norms, start = dart_case(seed)
    expected = torch.tensor(reference_dart_official(states, norms, start, N, budget, 4, 4))
    out["dart count=official"] = jaccard(select("dart", d, budget, count="official").keep, expected)
    out["dart count=budget"] = jaccard(select("dart", d, budget).keep, expected)
    h = anyres(seed)
    expected = torch.tensor(reference_hired_official(h, budget, 0.5, 4))
    out["hired official"] = jaccard(select("hired", h, budget, mode="official").keep, expected)
    out["hired region"] = jaccard(select("hired", h, budget).keep, expected)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--budgets", type=int, nargs="+", default=[16, 32, 48])
    args = parser.parse_args()
    rows: dict[str, list[float]] = {}
    for seed in range(args.seeds):
        for budget in args.budgets:
            for name, value in cases(seed, budget).items():
                rows.setdefault(name, []).append(value)
    print("| strategy | Jaccard vs official: mean | min | cases |")
    print("|---|---|---|---|")
    for name, values in rows.items():
        print(f"| {name} | {statistics.mean(values):.3f} | {min(values):.3f} | {len(values)} |")


if __name__ == "__main__":
    main()
