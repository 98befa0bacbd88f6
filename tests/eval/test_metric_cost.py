"""``python -m genaccel.eval.metric_cost``: every metric timed, KID next to torch-fidelity's on the same features."""

import pytest

from genaccel.eval.metric_cost import main


def test_metric_cost_reports_every_metric_and_the_kid_gap(capsys):
    out = main(["--num-generated", "80", "--num-real", "70", "--dim", "32", "--kid-subsets", "3",
                "--kid-subset-size", "40"])
    assert set(out["seconds"]) == {"fd", "kid", "kid_torch_fidelity", "prc", "dc"}
    v = out["values"]
    assert v["kid_mean"] == pytest.approx(v["kid_mean_torch_fidelity"], rel=1e-3)
    assert v["kid_relative_gap"] < 1e-3 and 0 <= v["coverage"] <= 1 and 0 <= v["precision"] <= 1
    assert '"kid_relative_gap"' in capsys.readouterr().out
