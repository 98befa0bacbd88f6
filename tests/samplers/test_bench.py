"""genaccel/bench/samplers.py: the docs section is a targeted edit between its markers."""

from __future__ import annotations

from genaccel.bench.samplers import BEGIN, END, sampler_options, update_doc


def test_update_doc_replaces_only_its_section(tmp_path):
    doc = tmp_path / "benchmarks.md"
    doc.write_text(f"# Benchmarks\n\nother team's table\n\n{BEGIN}\nold\n{END}\n\nafter\n")
    update_doc(doc, f"{BEGIN}\nnew\n{END}")
    assert doc.read_text() == f"# Benchmarks\n\nother team's table\n\n{BEGIN}\nnew\n{END}\n\nafter\n"


def test_update_doc_appends_markers_when_absent(tmp_path):
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n")
    update_doc(doc, f"{BEGIN}\nnew\n{END}")
    assert doc.read_text() == f"# Benchmarks\n\n{BEGIN}\nnew\n{END}\n"


def test_sampler_options_parse_per_sampler_overrides():
    opts = sampler_options(["gsd.group_size=50", "lantern.lantern_delta=0.3"], ["ar", "gsd", "lantern"], 4.0)
    assert opts["gsd"] == {"cfg_scale": 4.0, "group_size": 50}
    assert opts["lantern"]["lantern_delta"] == 0.3 and opts["ar"] == {"cfg_scale": 4.0}
