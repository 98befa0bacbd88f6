"""Benchmark plumbing: docs sections are targeted edits; the samplers table's derived ratios."""

from __future__ import annotations

import math

from genaccel.bench.samplers import engine_share, forward_cost_bound, goal_lines, sampler_options
from genaccel.bench.sections import write_section


def test_write_section_replaces_only_its_section(tmp_path):
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\nother team's table\n\n<!-- BEGIN samplers -->\nold\n<!-- END samplers -->\n\nafter\n")
    write_section("samplers", "new", doc)
    assert doc.read_text() == (
        "# Benchmarks\n\nother team's table\n\n<!-- BEGIN samplers -->\nnew\n<!-- END samplers -->\n\nafter\n"
    )
    write_section("samplers-bf16", "other", doc)  # a second section is appended, the first kept
    text = doc.read_text()
    assert "<!-- BEGIN samplers -->\nnew\n<!-- END samplers -->" in text
    assert text.endswith("<!-- BEGIN samplers-bf16 -->\nother\n<!-- END samplers-bf16 -->\n")


def test_sampler_options_parse_per_sampler_overrides():
    opts = sampler_options(["gsd.group_size=50", "lantern.lantern_delta=0.3"], ["ar", "gsd", "lantern"], 4.0)
    assert opts["gsd"] == {"cfg_scale": 4.0, "group_size": 50}
    assert opts["lantern"]["lantern_delta"] == 0.3 and opts["ar"] == {"cfg_scale": 4.0}


def _result(nfe, target, draft, wall, latency):
    return {"nfe": nfe, "target_time_s": target, "draft_time_s": draft, "wall_time_s": wall, "latency_s": latency,
            "step_compression": 256 / nfe, "fd_domain": 1.0}


def test_forward_cost_bound_and_engine_share():
    # ar: 256 forwards of 2 ms; sjd: 128 forwards of 5 ms (a verify costs 2.5x an AR forward), 0.1 s engine.
    results = {"ar": _result(256, 0.512, 0.0, 0.6, 0.6), "sjd": _result(128, 0.64, 0.0, 0.74, 0.74)}
    assert math.isclose(forward_cost_bound(results, "sjd"), 0.4)
    assert math.isclose(forward_cost_bound(results, "ar"), 1.0)
    assert math.isclose(engine_share(results["sjd"]), 0.1 / 0.74)
    line = [g for g in goal_lines(results) if "wall-clock" in g][0]
    assert line.startswith("- NOT met: sjd") and "forward-cost bound 0.40" in line
