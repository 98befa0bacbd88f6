import json

import pytest

from genaccel.eval.report import RUN_SCHEMA, build_report, main


def _run(path, name, **fields):
    run = {"schema": RUN_SCHEMA, "name": name, "command": f"genaccel eval sample --name {name}",
           "sampler": {"name": "ar", "options": {"cfg_scale": fields.pop("cfg", 4.0)}},
           "speed": fields.pop("speed", {}), "metrics": fields.pop("metrics", {}),
           "environment": {"device": "cpu", "torch": "2.x"}}
    path.write_text(json.dumps(run))
    return path


def test_report_merges_speed_and_quality_and_writes_all_outputs(tmp_path):
    _run(tmp_path / "a_quality.json", "ar", metrics={"fd_domain": 1.5, "class_accuracy": 0.8, "num_images": 64})
    _run(tmp_path / "a_speed.json", "ar", speed={"images_per_s": 3.0, "latency_median_s": 0.2, "nfe_per_image": 256})
    _run(tmp_path / "b.json", "fast", speed={"images_per_s": 6.0}, metrics={"fd_domain": 2.5}, cfg=1.0)
    report = build_report([str(tmp_path / "*.json")], tmp_path / "out" / "report")
    rows = {r["name"]: r for r in report["rows"]}
    assert rows["ar"]["fd_domain"] == 1.5 and rows["ar"]["images_per_s"] == 3.0 and len(rows["ar"]["commands"]) == 2
    md = (tmp_path / "out" / "report.md").read_text()
    assert "FD-domain" in md and "FID" not in md.replace("FD-domain", "")
    assert "| ar | ar | 0.200 | 3.00 | 256.0 |" in md
    assert (tmp_path / "out" / "report.png").stat().st_size > 1000


def test_report_rejects_non_run_json(tmp_path, capsys):
    (tmp_path / "x.json").write_text(json.dumps({"fid": 3.0}))
    with pytest.raises(SystemExit, match="x.json is not a run record"):
        main([str(tmp_path / "x.json"), "--out", str(tmp_path / "r")])
    with pytest.raises(SystemExit, match="not found"):
        main([str(tmp_path / "missing.json"), "--out", str(tmp_path / "r")])


def test_merge_keeps_the_newest_value_whatever_the_file_names(tmp_path):
    """The same two runs give the same merged row under either naming (was: the first file name won)."""
    results = []
    for old_name, new_name in [("a.json", "b.json"), ("b.json", "a.json")]:
        folder = tmp_path / old_name[0]
        folder.mkdir()
        old = json.loads(_run(folder / old_name, "ar", speed={"images_per_s": 1.54, "processes": 2}).read_text())
        old["created"] = "2026-12-01T10:00:00+00:00"
        (folder / old_name).write_text(json.dumps(old))
        new = json.loads(_run(folder / new_name, "ar", speed={"images_per_s": 1.65, "processes": 2}).read_text())
        new["created"] = "2026-12-02T10:00:00+00:00"
        (folder / new_name).write_text(json.dumps(new))
        with pytest.warns(UserWarning, match=r"images_per_s = 1.54 .* and 1.65 .*keeping the newer"):
            report = build_report([str(folder / "*.json")], folder / "report")
        results.append(report["rows"][0]["images_per_s"])
        assert "2 process(es) x" in (folder / "report.md").read_text()
    assert results == [1.65, 1.65]


def test_plot_axes_start_at_zero_with_error_bars_and_counts(tmp_path, monkeypatch):
    """The figure is drawn from the rows: zero-based axes, one legend entry per run with n, std of images/s."""
    import matplotlib.pyplot as plt

    seen = {}
    real_close = plt.close

    def keep(fig=None):
        if fig is not None and not seen:
            ax = fig.axes[0]
            seen.update(xlim=ax.get_xlim(), ylim=ax.get_ylim(),
                        labels=[t.get_text() for t in ax.get_legend().get_texts()], texts=len(ax.texts))
        real_close(fig)

    monkeypatch.setattr(plt, "close", keep)
    _run(tmp_path / "a.json", "ar", speed={"images_per_s": 4.0, "batch_times_s": [4.0, 4.2, 3.8],
                                           "throughput_batch_size": 16}, metrics={"fd_domain": 14.7, "num_images": 64})
    _run(tmp_path / "b.json", "fast", speed={"images_per_s": 9.0}, metrics={"fd_domain": 14.1, "num_images": 64},
         cfg=1.0)
    report = build_report([str(tmp_path / "*.json")], tmp_path / "r")
    row = {r["name"]: r for r in report["rows"]}["ar"]
    assert row["images_per_s_repeats"] == 3 and 0.1 < row["images_per_s_std"] < 0.3
    assert seen["xlim"][0] == 0 and seen["ylim"][0] == 0 and seen["texts"] == 0  # no labels drawn in the axes
    assert seen["labels"] == ["ar (n=64, 3 timed batches)", "fast (n=64)"]
