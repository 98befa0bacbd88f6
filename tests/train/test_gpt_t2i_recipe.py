"""Tiny t2i recipe on minute settings: the c2i GPT's weights carried over, captions from a local text encoder,
3 steps with a resume, an export that loads strictly as a t2i model."""

from __future__ import annotations

import json

import pytest
import torch
from recipe_helpers import GRID, tiny_gpt_file

from genaccel.data.skimage_crops import PHOTO_NAMES
from genaccel.models.t2i import load_t2i
from genaccel.train import gpt_t2i as recipe

WIDTH = 12  # caption feature width of the tiny text encoder


def test_captions_cover_every_photo_with_distinct_train_and_heldout_wording():
    train, heldout = recipe.captions(recipe.TRAIN_TEMPLATES), recipe.captions(recipe.HELDOUT_TEMPLATES)
    assert len(train) == len(PHOTO_NAMES) * len(recipe.TRAIN_TEMPLATES) and not set(train) & set(heldout)
    assert train[len(recipe.TRAIN_TEMPLATES) * PHOTO_NAMES.index("moon") + 1] == "a photo of the moon"


def test_t2i_model_keeps_every_gpt_weight_but_the_class_table(tmp_path):
    gpt = tiny_gpt_file(tmp_path)
    model = recipe.t2i_from_gpt(gpt, 4, WIDTH, 0.1, torch.Generator().manual_seed(0))
    own = model.state_dict()
    for key, value in gpt.state_dict().items():
        if key.startswith("cls_embedding."):
            assert key not in own
        else:
            assert torch.equal(own[key], value), key
    assert own["cls_embedding.cap_proj.fc1.weight"].shape == (32, WIDTH) and model.cls_token_num == 4


def test_three_steps_resume_and_export_loads_as_t2i(tmp_path, tiny_t5):
    tiny_gpt_file(tmp_path)
    tiny_t5(tmp_path / "text", WIDTH)
    args = ["--config", "configs/train/gpt_t2i.yaml"]
    for s in (f"out_dir={tmp_path}", f"gpt_path={tmp_path / 'gpt.safetensors'}", f"text_encoder={tmp_path / 'text'}",
              "caption_tokens=6", f"export_path={tmp_path / 'export.safetensors'}", "batch_size=4", "steps=3",
              "threads=1", "log_every=1", "ckpt_every=1"):
        args += ["--set", s]
    assert recipe.main([*args, "--set", "stop_at=1"])["steps"] == 1
    metrics = recipe.main(args)
    assert metrics["steps"] == 3 and "resumed from" in (tmp_path / "train.log").read_text()
    assert metrics["heldout_nll_null_caption"] > 0 and metrics["at_init"]["heldout_nll_train_captions"] > 0
    model = load_t2i(tmp_path / "export.safetensors")
    assert model.args.model_type == "t2i" and model.cls_token_num == 6 and model.grid_size == GRID
    record = json.loads((tmp_path / "export.json").read_text())
    assert record["train_captions"][0] == "an astronaut"


def test_missing_text_encoder_package_is_one_clear_error():
    with pytest.raises(SystemExit, match="is not installed: pip install no-such-encoder-pkg"):
        recipe.text_encoder_folder("package:no-such-encoder-pkg")
