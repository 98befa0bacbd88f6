"""The metric-stage memory benchmark runs and reports one row per step with a non-decreasing peak RSS."""

from genaccel.eval.memory import measure, section_body


def test_memory_measure_small():
    rows = measure(generated=300, reference=120, dim=16, block=64)
    assert [r["peak_rss_mib"] for r in rows] == sorted(r["peak_rss_mib"] for r in rows)
    assert 0.0 <= rows[-1]["result"]["precision"] <= 1.0
    body = section_body(rows, "python -m genaccel.eval.memory --generated 300", threads=1)
    assert body.count("\n| ") == len(rows) + 1 and "--generated 300" in body
