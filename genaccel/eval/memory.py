"""Peak memory of the metric stage at ADM scale: FID statistics and precision/recall of N generated vs M reference
feature vectors, measured as the process's peak RSS after each step.

``python -m genaccel.eval.memory --generated 50000 --reference 10000`` uses random non-negative float32
features of Inception's pool dimension (2048): the metric code cannot tell them from real ones, and running
Inception over 60k images takes hours on a CPU. ``--write-doc`` records the result in docs/benchmarks.md
(section "eval-memory").
"""

from __future__ import annotations

import argparse
import resource
import shlex
import sys
import time

import torch

SECTION = "eval-memory"


def peak_rss_mb() -> float:
    """The process's peak resident set size so far (Linux ``ru_maxrss`` is in KiB), in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(generated: int, reference: int, dim: int = 2048, block: int = 10000, dtype: str = "fp32",
            seed: int = 0) -> list[dict]:
    """Run the metric stage on random features and return one row per step: step, seconds, peak RSS (MiB)."""
    from genaccel.eval.fd import fd_from_stats, feature_stats
    from genaccel.eval.inception import precision_recall

    rows = [{"step": "baseline after imports (torch, genaccel.eval.fd / inception)", "seconds": 0.0, "peak_rss_mib": peak_rss_mb()}]

    def step(name: str, fn):
        start = time.perf_counter()
        out = fn()
        rows.append({"step": name, "seconds": time.perf_counter() - start, "peak_rss_mib": peak_rss_mb()})
        return out

    g = torch.Generator().manual_seed(seed)
    gen = step(f"{generated} x {dim} generated + {reference} x {dim} reference features (float32)",
               lambda: (torch.randn(generated, dim, generator=g).abs_(), torch.randn(reference, dim, generator=g).abs_()))
    gen, ref = gen
    fid = step("FID: float64 statistics of both sets + Frechet distance",
               lambda: fd_from_stats(feature_stats(gen), feature_stats(ref)))
    prc = step(f"precision/recall (k=3, {block}-row tiles, {dtype})",
               lambda: precision_recall(gen, ref, k=3, block=block,
                                        dtype=torch.float16 if dtype == "fp16" else torch.float32))
    rows[-1]["result"] = {"fid": fid, **prc}
    return rows


def section_body(rows: list[dict], command: str, threads: int) -> str:
    """Markdown for docs/benchmarks.md: the command, the machine, one line per step."""
    import platform

    lines = [
        "## eval: peak memory of the metric stage at 50k generated vs 10k reference",
        "",
        f"Command: `{command}` (CPU, {threads} torch thread(s), torch {torch.__version__}, "
        f"{platform.processor() or platform.machine()}).",
        "",
        "Random non-negative float32 features of Inception's pool dimension stand in for real ones (the metric code",
        "is the same; Inception over 60k images takes hours on this CPU). Peak RSS is the process's high-water mark",
        "after each step (`ru_maxrss`), so each line includes everything before it. Feature extraction itself is",
        "streamed from the `.npz` in batches and keeps pool features + unbiased logits, 50,000 x (2048 + 1008) x 4 B",
        "= 0.61 GB (computed, not measured here), plus the 2023 x 2023 float64 spatial statistics.",
        "",
        "| step | seconds | peak RSS (MiB) |",
        "|---|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['step']} | {r['seconds']:.1f} | {r['peak_rss_mib']:.0f} |")
    res = rows[-1].get("result", {})
    if res:
        lines += ["", f"Values on these random features (meaningless, for reproduction): FID {res['fid']:.4f}, "
                      f"precision {res['precision']:.4f}, recall {res['recall']:.4f}."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    """Entry point of ``python -m genaccel.eval.memory``."""
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(prog="python -m genaccel.eval.memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--generated", type=int, default=50000)
    p.add_argument("--reference", type=int, default=10000)
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--block", type=int, default=10000, help="precision/recall tile rows (ADM: 10000)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--write-doc", action="store_true", help="write the section 'eval-memory' of docs/benchmarks.md")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    rows = measure(a.generated, a.reference, a.dim, a.block, a.dtype)
    for r in rows:
        print(f"{r['step']:<80} {r['seconds']:8.1f} s {r['peak_rss_mib']:8.0f} MiB")
    if a.write_doc:
        from genaccel.bench.sections import write_section

        command = "python -m genaccel.eval.memory " + shlex.join(argv)
        write_section(SECTION, section_body(rows, command, a.threads))
    return rows


if __name__ == "__main__":
    main()
