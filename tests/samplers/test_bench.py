"""Benchmark plumbing: docs sections are targeted edits; the samplers table's derived ratios."""

from __future__ import annotations

import math

import pytest
import torch

from genaccel.bench.samplers import engine_share, forward_cost_bound, goal_lines, parse_runs, sampler_options
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
    runs = {"ar": "ar", "gsd": "gsd", "lantern": "lantern"}
    opts = sampler_options(["gsd.group_size=50", "lantern.lantern_delta=0.3"], runs)
    assert opts["gsd"] == {"cfg_scale": 4.0, "group_size": 50}
    assert opts["lantern"]["lantern_delta"] == 0.3 and opts["ar"] == {"cfg_scale": 4.0}


def _result(nfe, target, draft, wall, latency, sampler="ar", family="llamagen", size=64):
    return {"nfe": nfe, "target_time_s": target, "draft_time_s": draft, "wall_time_s": wall, "latency_s": latency,
            "step_compression": 256 / nfe, "fd_domain": 1.0, "sampler": sampler, "family": family, "image_size": size}


def test_forward_cost_bound_and_engine_share():
    # ar: 256 forwards of 2 ms; sjd: 128 forwards of 5 ms (a verify costs 2.5x an AR forward), 0.1 s engine.
    results = {"ar": _result(256, 0.512, 0.0, 0.6, 0.6), "sjd": _result(128, 0.64, 0.0, 0.74, 0.74, "sjd")}
    assert math.isclose(forward_cost_bound(results, "sjd"), 0.4)
    assert math.isclose(forward_cost_bound(results, "ar"), 1.0)
    assert math.isclose(engine_share(results["sjd"]), 0.1 / 0.74)
    line = [g for g in goal_lines(results) if "wall-clock" in g][0]
    assert line.startswith("- NOT met: sjd") and "forward-cost bound 0.40" in line


def test_runs_take_labels_and_families_and_ar_comes_first():
    runs = parse_runs("zipar,zipar-j4=zipar,ts128=token-shuffle@token-shuffle-128,nar")
    assert list(runs) == ["ar", "zipar", "zipar-j4", "ts128", "nar"]
    assert runs["zipar-j4"] == ("zipar", "llamagen") and runs["nar"] == ("nar", "nar")
    assert runs["ts128"] == ("token-shuffle", "token-shuffle-128")
    for bad, message in [("zipar,zipar", "appears twice"), ("x=nope", "unknown sampler 'nope'"),
                         ("x=ar@nope", "unknown model family 'nope'"), ("ar=zipar", "'ar' is the reference")]:
        with pytest.raises(SystemExit, match=message):
            parse_runs(bad)


def test_token_shuffle_128_goal_checks_time_per_image_and_class_accuracy():
    results = {"ar": _result(256, 0.5, 0.0, 0.6, 0.6),
               "ts128": {**_result(256, 0.6, 0.0, 0.66, 0.66, "token-shuffle", "token-shuffle-128", 128),
                         "class_accuracy": 0.75}}
    line = [g for g in goal_lines(results) if "ts128" in g][0]
    assert line.startswith("- met: ts128: 128x128 images at 1.10x") and "75.0%" in line
    results["ts128"]["class_accuracy"] = 0.6
    assert [g for g in goal_lines(results) if "ts128" in g][0].startswith("- NOT met")


def test_throughput_from_a_continuous_stream_counts_its_batch_forwards():
    """``bench samplers --continuous``: each sampler's batch-B figures come from one stream over all labels."""
    from types import SimpleNamespace

    from spec_helpers import tiny_gpt

    from genaccel.bench.samplers import measure_throughput
    from genaccel.samplers import build_sampler

    model, labels = tiny_gpt(block=16, seed=2), torch.arange(10) % 4
    pipe = SimpleNamespace(gpt=model, decode=lambda t: t.view(-1, 4, 4, 1).to(torch.uint8))
    samplers = {"ar": build_sampler("ar"), "sjd": build_sampler("sjd", window=4)}
    out = measure_throughput({n: pipe for n in samplers}, samplers, labels, 4, 0, continuous=True)
    assert out["ar"][0]["nfe_per_batch"] == pytest.approx(16 * 3 * 4 / 10)  # batches of 4, 4, 2: 3 x 16 forwards
    sjd, images = out["sjd"]
    assert images.shape == (10, 4, 4, 1) and sjd["nfe_per_batch"] < out["ar"][0]["nfe_per_batch"]
    assert sjd["step_compression_batch"] == pytest.approx(16 / sjd["nfe_per_batch"])
