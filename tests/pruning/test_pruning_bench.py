"""The pruning benchmark runs end to end on a tiny model and reports consistent numbers."""

from __future__ import annotations

from genaccel.bench.pruning import ModelSize, render, run

TINY = ModelSize(hidden=64, layers=2, heads=1, mlp=128, vision_hidden=64, vision_layers=2, image_size=56, patch=14)


def test_tiny_benchmark_rows_and_markdown():
    result = run(["uniform", "fastv"], [4], repeats=1, warmup=0, threads=1, layer=1, size=TINY)
    rows = {row["strategy"]: row for row in result["rows"]}
    assert result["n_image"] == 16 and result["n_full"] == 35 + 16 + 20
    assert rows["uniform"]["tokens"] == result["n_full"] - 12
    assert rows["uniform"]["flops_ratio"] < rows["fastv"]["flops_ratio"] < 1.0
    text = render(result, "python -m genaccel.bench pruning --tiny", TINY, layer=1)
    assert "`python -m genaccel.bench pruning --tiny`" in text and "| uniform | 4 | 59 |" in text


def test_tiny_benchmark_for_the_qwen25vl_and_onevision_families():
    for family, n_image in (("qwen2_5_vl", 16), ("llava_onevision", 16 + 16 + 4)):
        result = run(["uniform", "dart"], [4], repeats=1, warmup=0, threads=1, layer=1, size=TINY, family=family)
        rows = {row["strategy"]: row for row in result["rows"]}
        assert result["n_image"] == n_image and result["family"] == family
        newlines = 4 if family == "llava_onevision" else 0
        assert rows["uniform"]["tokens"] == result["n_full"] - (n_image - newlines - 4)
        assert "Qwen2.5-VL-style" in render(result, "cmd", TINY, layer=1) or family != "qwen2_5_vl"
