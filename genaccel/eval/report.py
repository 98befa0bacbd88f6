"""``genaccel report runs/*.json``: one table (JSON + Markdown) and a speed-vs-quality plot across runs.

Input: run records (schema ``genaccel.run/1``) written by ``genaccel eval sample`` (``<out>/run.json``) or
``genaccel eval throughput``. Runs that share a name and sampler options are merged (e.g. quality from a
``sample`` run and speed from a ``throughput`` run). The merge does not depend on file names or their order:
where two runs give a field different values, the newest run (its ``created`` time, else the file's
modification time) wins and a warning names both values. FD-domain is always labelled FD-domain; FID appears
only when a run measured it with Inception weights.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import sys
from pathlib import Path
from typing import Any

from genaccel.utils.io import atomic_write, save_json, stored_path

RUN_SCHEMA = "genaccel.run/1"

# (key in the row, column title, number format); speed first, then quality.
COLUMNS: list[tuple[str, str, str]] = [
    ("name", "run", "{}"),
    ("sampler", "sampler", "{}"),
    ("latency_median_s", "latency bs1 (s, median)", "{:.3f}"),
    ("images_per_s", "images/s", "{:.2f}"),
    ("nfe_per_image", "NFE/image", "{:.1f}"),
    ("step_compression", "step compression", "{:.2f}"),
    ("num_images", "images scored", "{}"),
    ("fd_domain", "FD-domain ↓", "{:.3f}"),
    ("class_accuracy", "class acc ↑", "{:.3f}"),
    ("fid", "FID ↓", "{:.2f}"),
    ("inception_score_mean", "IS ↑", "{:.2f}"),
    ("precision", "precision ↑", "{:.3f}"),
    ("recall", "recall ↑", "{:.3f}"),
]
QUALITY_KEYS = ("fd_domain", "fid")  # plotted on the y axis, first one present wins


def load_run(path: str | Path) -> dict:
    """Read one run JSON; raises ValueError naming the file when it is not a genaccel run record."""
    path = Path(path)
    try:
        run = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(run, dict) or run.get("schema") != RUN_SCHEMA:
        raise ValueError(f"{path} is not a run record (expected \"schema\": \"{RUN_SCHEMA}\", written by genaccel eval)")
    return run


def run_row(run: dict) -> dict[str, Any]:
    """Flatten one run record into a table row."""
    row: dict[str, Any] = {"name": run.get("name"), "sampler": (run.get("sampler") or {}).get("name")}
    row["sampler_options"] = (run.get("sampler") or {}).get("options", {})
    for key, value in {**run.get("speed", {}), **run.get("metrics", {})}.items():
        if isinstance(value, (int, float, str)) or value is None:
            row[key] = value
    speed = run.get("speed") or {}
    times, batch = speed.get("batch_times_s"), speed.get("throughput_batch_size")
    if isinstance(times, list) and len(times) > 1 and batch:  # repeats: spread of images/s over timed batches
        rates = [batch / t for t in times if t > 0]
        mean = sum(rates) / len(rates)
        row["images_per_s_std"] = math.sqrt(sum((r - mean) ** 2 for r in rates) / (len(rates) - 1))
        row["images_per_s_repeats"] = len(rates)
    row["command"] = run.get("command")
    env = run.get("environment", {})
    row["device"] = env.get("gpu") or env.get("device")
    row["torch"] = env.get("torch")
    row["threads"] = env.get("torch_threads")
    row["processes"] = (run.get("speed") or {}).get("processes") or env.get("world_size")
    row["load_avg_1m"] = env.get("load_avg_1m")
    row["created"] = run.get("created")
    return row


MERGE_IGNORED = ("created", "source", "load_avg_1m")  # differ between runs by nature: no conflict warning


def merge_rows(rows: list[dict]) -> list[dict]:
    """Merge rows with the same name and sampler options, independent of their order: rows are taken oldest
    first (``created``, then ``source`` for a stable tie-break), a newer non-missing value replaces an older
    one, and each replaced differing value is a warning naming both sources. Commands are all kept."""
    import warnings

    merged: dict[str, dict] = {}
    origin: dict[tuple[str, str], str] = {}
    for row in sorted(rows, key=lambda r: (str(r.get("created") or ""), str(r.get("source") or ""))):
        key = json.dumps([row["name"], row.get("sampler_options")], sort_keys=True, default=str)
        target = merged.setdefault(key, {"commands": []})
        for k, v in row.items():
            if k == "command":
                if v:
                    target["commands"].append(v)
                continue
            if v is None:
                continue
            old = target.get(k)
            if old is not None and old != v and k not in MERGE_IGNORED:
                warnings.warn(f"run {row['name']!r}: {k} = {old!r} ({origin[key, k]}) and {v!r} ({row.get('source')}); "
                              "keeping the newer", stacklevel=2)
            target[k] = v
            origin[key, k] = str(row.get("source"))
    return list(merged.values())


def format_cell(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


def markdown_table(rows: list[dict]) -> str:
    """Markdown table of the columns any row has, followed by the command behind each run."""
    cols = [c for c in COLUMNS if any(r.get(c[0]) is not None for r in rows)]
    lines = ["| " + " | ".join(title for _, title, _ in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(format_cell(r.get(k), f) for k, _, f in cols) + " |" for r in rows]
    lines.append("")
    for r in rows:
        for cmd in r.get("commands", []):
            lines.append(f"- `{r['name']}`: `{cmd}`")
    envs = sorted({f"{r.get('device')}, torch {r.get('torch')}, {r.get('processes') or 1} process(es) x "
                   f"{r.get('threads')} thread(s)" for r in rows})
    lines.append("")
    lines.append("Environment: " + "; ".join(envs))
    loads = [r["load_avg_1m"] for r in rows if r.get("load_avg_1m") is not None]
    if loads:
        lines.append(f"Machine load average while measuring: {min(loads):.1f}-{max(loads):.1f} (timings on a busy "
                     "machine are noisy).")
    return "\n".join(lines) + "\n"


def speed_quality_plot(rows: list[dict], path: Path) -> Path | None:
    """Scatter of speed (images/s, else 1/latency) against FD-domain (or FID); None if no run has both.

    Made to be read, not to flatter: both axes start at zero (so small differences look small), each run
    has its own marker and a legend entry with its sample count outside the axes (no labels on top of each
    other or of the frame), and images/s carries +-1 std error bars where timed repeats exist."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    qkey = next((k for k in QUALITY_KEYS if any(r.get(k) is not None for r in rows)), None)
    skey = "images_per_s" if any(r.get("images_per_s") for r in rows) else "latency_median_s"
    points = [r for r in rows if qkey and r.get(qkey) is not None and r.get(skey)]
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(9.5, 4.5))
    markers = "osD^vP*Xh<>p"
    for i, r in enumerate(points):
        x = r[skey] if skey == "images_per_s" else 1.0 / r[skey]
        xerr = r.get("images_per_s_std") if skey == "images_per_s" else None
        n = r.get("num_images")
        reps = f", {r['images_per_s_repeats']} timed batches" if xerr is not None else ""
        ax.errorbar(x, r[qkey], xerr=xerr, fmt=markers[i % len(markers)], capsize=3, markersize=7,
                    label=f"{r['name']} (n={n if n is not None else '?'}{reps})")
    ax.set_xlim(left=0, right=ax.get_xlim()[1] * 1.05)
    ax.set_ylim(bottom=0, top=ax.get_ylim()[1] * 1.05)
    ax.set_xlabel("images / s (axis from 0)" if skey == "images_per_s" else "1 / latency at batch 1 (1/s, axis from 0)")
    ax.set_ylabel({"fd_domain": "FD-domain (crop-classifier features, not FID)", "fid": "FID"}[qkey] + ", from 0")
    ax.set_title("speed vs quality (lower right is better)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, frameon=False, title="run (n = images scored)",
              title_fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight", pad_inches=0.15))
    plt.close(fig)
    return path


def _sourced_row(path: str) -> dict:
    """A file's row with its source and creation time (the run's ``created``, else the file's mtime)."""
    import datetime
    import os

    row = run_row(load_run(path))
    row["source"] = stored_path(path)
    if not row.get("created"):
        mtime = os.path.getmtime(path)
        row["created"] = datetime.datetime.fromtimestamp(mtime, datetime.timezone.utc).isoformat(timespec="seconds")
    return row


def build_report(paths: list[str], out: Path, title: str = "genaccel report") -> dict:
    """Read runs, write ``<out>.json``, ``<out>.md`` and ``<out>.png``; returns the JSON content."""
    files = sorted({p for spec in paths for p in (glob.glob(spec) or [spec])})
    if not files:
        raise ValueError("no run files given: pass e.g. runs/*.json")
    missing = [f for f in files if not Path(f).is_file()]
    if missing:
        raise FileNotFoundError(f"run file(s) not found: {', '.join(missing)}")
    rows = merge_rows([_sourced_row(f) for f in files])
    md = f"# {title}\n\n" + markdown_table(rows)
    plot = speed_quality_plot(rows, out.with_suffix(".png"))
    atomic_write(out.with_suffix(".md"), lambda tmp: Path(tmp).write_text(md))
    report = {"title": title, "runs": [stored_path(f) for f in files], "rows": rows,
              "plot": stored_path(plot) if plot else None}
    save_json(report, out.with_suffix(".json"))
    return report


def main(argv: list[str] | None = None) -> dict:
    """``genaccel report RUN.json... [--out reports/report]``."""
    p = argparse.ArgumentParser(prog="genaccel report", description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="run JSON files (globs allowed)")
    p.add_argument("--out", default="reports/report", help="output stem: writes .json, .md and .png")
    p.add_argument("--title", default="genaccel report")
    a = p.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        report = build_report(a.runs, Path(a.out), a.title)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"genaccel report: {e}") from e
    print(Path(a.out).with_suffix(".md").read_text())
    return report


if __name__ == "__main__":
    from genaccel.cli import run_command

    sys.exit(run_command(main))
