"""``python -m genaccel.bench drafter``: a short run on the bundled drafter gives a timing per precision and
per packed matrix, resolves auto, and refuses bad arguments in one line."""

import pytest

from genaccel.bench import drafter as bench


def test_drafter_bench_times_every_precision_and_matrix():
    r = bench.main(["--repeats", "2", "--precisions", "fp32,int8,auto", "--context", "16"])
    res = r["results"]
    assert list(res) == ["fp32", "int8", "auto"] and res["auto"]["resolved"] == "int8"
    for x in res.values():
        assert x["step_s"] > 0 and x["catch_up_s"] > 0 and x["extend_s"] > 0
        assert set(x["matrices"]) == set(bench.MATRICES) and all(m["s"] > 0 for m in x["matrices"].values())
    assert all(m["int8_kernel_fp32_input_s"] is None for m in res["fp32"]["matrices"].values())
    assert any(m["int8_kernel_fp32_input_s"] for m in res["int8"]["matrices"].values())
    text = bench.markdown(r, "cmd")
    assert "| auto (= int8) |" in text and "| head (" in text


@pytest.mark.parametrize("argv", [["--precisions", "fp16"], ["--repeats", "0"], ["--context", "300"]])
def test_drafter_bench_refuses_bad_arguments(argv):
    with pytest.raises(SystemExit, match="error:"):
        bench.main(argv)
