"""Training recipes end to end on minute settings: outputs load strictly, runs resume, stop_at is honoured."""

import json

import torch

from genaccel.models import load_gpt, load_vq
from genaccel.train import gpt as gpt_recipe
from genaccel.train import vq as vq_recipe


def test_vq_then_gpt_recipes_produce_loadable_weights_and_resume(tmp_path):
    torch.manual_seed(0)
    vq_dir, gpt_dir = tmp_path / "vq", tmp_path / "gpt"
    metrics = vq_recipe.main(["--config", "configs/train/vq.yaml", "--set", f"out_dir={vq_dir}", "--set", "steps=4",
                              "--set", "stop_at=2", "--set", "eval_per_class=1", "--set", "batch_size=4"])
    assert metrics["steps"] == 2 and 0 < metrics["codebook_usage"] <= 1
    vq = load_vq(vq_dir / "vq.safetensors")
    assert vq.args.codebook_size == 1024 and vq.downsample == 4

    args = ["--config", "configs/train/gpt.yaml", "--set", f"out_dir={gpt_dir}", "--set",
            f"vq_path={vq_dir / 'vq.safetensors'}", "--set", "train_per_class=1", "--set", "heldout_per_class=1",
            "--set", "dim=64", "--set", "n_layer=1", "--set", "batch_size=4", "--set", "steps=3", "--set", "stop_at=1"]
    first = gpt_recipe.main(args)
    assert first["steps"] == 1
    second = gpt_recipe.main(args[:-2] + ["--set", "stop_at=null"])  # resumes from last.pt, finishes the schedule
    assert second["steps"] == 3
    assert "resumed from" in (gpt_dir / "train.log").read_text()
    gpt = load_gpt(gpt_dir / "gpt.safetensors")
    assert gpt.num_image_tokens == 256 and gpt.vocab_size == 1024
    recorded = json.loads((gpt_dir / "gpt_metrics.json").read_text())
    assert recorded["config"]["dim"] == 64 and recorded["metrics"]["heldout_nll_nats"] > 0


def test_unknown_recipe_field_is_rejected(tmp_path):
    import pytest

    with pytest.raises(SystemExit, match="unknown field 'lr_typo'"):
        vq_recipe.main(["--set", "lr_typo=1"])


def test_export_weights_writes_the_run_pair_and_the_asset_pair(tmp_path):
    from safetensors.torch import load_file

    from genaccel.train.common import export_weights

    state, record = {"w": torch.arange(6.0).view(2, 3)}, {"metrics": {"steps": 3}}
    export_weights(state, {"config": "{}"}, record, tmp_path, "model", str(tmp_path / "asset.safetensors"))
    for weights, metrics in (("model.safetensors", "model_metrics.json"), ("asset.safetensors", "asset.json")):
        assert torch.equal(load_file(tmp_path / weights)["w"], state["w"])
        assert json.loads((tmp_path / metrics).read_text()) == record
    export_weights(state, {}, record, tmp_path / "run", "model", "")  # no export_path: only the run's pair
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["model.safetensors", "model_metrics.json"]


def test_llamagen_adamw_decays_matrices_only():
    from genaccel.train.common import llamagen_adamw

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    opt = llamagen_adamw(model, {"lr": 0.5, "weight_decay": 0.05})
    decay, rest = opt.param_groups
    assert [p.shape for p in decay["params"]] == [(4, 3)] and decay["weight_decay"] == 0.05
    assert len(rest["params"]) == 3 and rest["weight_decay"] == 0.0
    assert opt.defaults["betas"] == (0.9, 0.95) and decay["lr"] == 0.5
