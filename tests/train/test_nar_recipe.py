"""NAR recipe on minute settings: initialised from a tiny GPT, 3 steps with a resume, strict reload."""

from __future__ import annotations

import torch
from recipe_helpers import GRID, tiny_gpt_file

from genaccel.models import load_nar
from genaccel.train import nar as recipe
from genaccel.train.nar import nar_from_gpt, step_lr


def test_vertical_head_starts_as_a_copy_of_the_last_block_and_head(tmp_path):
    gpt = tiny_gpt_file(tmp_path)
    nar = nar_from_gpt(gpt)
    for key, value in gpt.state_dict().items():
        assert torch.equal(nar.state_dict()[key], value)
    assert torch.equal(nar.layers[2].attention.wqkv.weight, gpt.layers[1].attention.wqkv.weight)
    assert torch.equal(nar.medusa_output.weight, gpt.output.weight)


def test_step_schedule_follows_nar_milestones():
    lrs = [step_lr(s, 12, 1.0, (0.5, 2 / 3, 5 / 6), 0.2) for s in range(12)]
    assert lrs[:6] == [1.0] * 6 and lrs[6:8] == [0.2] * 2 and abs(lrs[8] - 0.04) < 1e-12 and abs(lrs[11] - 0.008) < 1e-12


def test_three_steps_resume_and_export_loads_strictly(tmp_path):
    tiny_gpt_file(tmp_path)
    args = ["--config", "configs/train/nar.yaml"]
    for s in (f"out_dir={tmp_path}", f"gpt_path={tmp_path / 'gpt.safetensors'}", "export_path=''", "batch_size=4",
              "steps=3", "threads=1", "log_every=1", "ckpt_every=1"):
        args += ["--set", s]
    assert recipe.main([*args, "--set", "stop_at=1"])["steps"] == 1
    metrics = recipe.main(args)
    assert metrics["steps"] == 3 and "resumed from" in (tmp_path / "train.log").read_text()
    model = load_nar(tmp_path / "nar.safetensors")
    assert model.args.n_layer == 2 and len(model.layers) == 3 and model.grid_size == GRID
