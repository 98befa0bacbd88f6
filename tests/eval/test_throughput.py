import json

import pytest

from genaccel.eval.throughput import environment, measure_latency, measure_throughput
from genaccel.pipeline import load_model
from genaccel.samplers import build_sampler


@pytest.fixture(scope="module")
def tiny_pipeline(tiny_models):
    gpt, vq = tiny_models
    return load_model(ckpt=gpt, vq_ckpt=vq, image_size=16)


def test_latency_reports_median_nfe_and_environment(tiny_pipeline):
    out = measure_latency(tiny_pipeline, build_sampler("ar", cfg_scale=2.0), warmup=1, repeats=3)
    assert len(out["latencies_s"]) == 3 and out["latency_min_s"] <= out["latency_median_s"] <= out["latency_max_s"]
    assert out["nfe_per_image"] == 16 and out["step_compression"] == 1.0  # 4x4 grid, one token per forward
    assert out["batch_size"] == 1 and out["include_decode"] is True
    assert out["environment"]["device"] == "cpu" and out["environment"]["torch_threads"] >= 1
    assert out["peak_rss_mb"] > 0
    json.dumps(out)


def test_throughput_counts_images_and_accepts_a_bare_model(tiny_pipeline):
    out = measure_throughput(tiny_pipeline.gpt, build_sampler("ar"), batch_size=4, num_batches=2, warmup=0)
    assert out["images_per_s"] == pytest.approx(8 / sum(out["batch_times_s"]))
    assert out["include_decode"] is False  # a bare GPT has no decoder
    with pytest.raises(ValueError, match="repeats"):
        measure_latency(tiny_pipeline, build_sampler("ar"), repeats=0)


def test_environment_names_dtype_and_versions():
    import torch

    env = environment("cpu", torch.bfloat16)
    assert env["dtype"] == "bf16" and env["torch"] == torch.__version__  # the canonical (short) dtype name
