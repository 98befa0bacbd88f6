"""Tiny random LlamaGen GPT + VQ saved to tmp, so tests run the real CLI without the bundled weights."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from genaccel.utils.io import save_safetensors

TINY_GPT = {"dim": 64, "n_layer": 2, "n_head": 4, "vocab_size": 64, "num_classes": 16, "block_size": 16, "multiple_of": 32}
TINY_VQ = {"ch": 32, "encoder_ch_mult": [1, 2, 2], "decoder_ch_mult": [1, 2, 2], "z_channels": 64, "num_res_blocks": 1,
               "codebook_size": 64}
TINY_IMAGE_SIZE = 16  # 4x4 tokens, VQ downsample 4


def save_tiny_models(folder: Path) -> tuple[Path, Path]:
    """Write tiny random GPT and VQ safetensors (config in metadata) and return their paths."""
    from genaccel.models.llamagen import build_gpt
    from genaccel.tokenizers.vq import build_vq

    torch.manual_seed(0)
    gpt = build_gpt(None, **TINY_GPT)
    vq = build_vq(None, **TINY_VQ)
    gpt_path, vq_path = folder / "gpt.safetensors", folder / "vq.safetensors"
    save_safetensors(gpt.state_dict(), gpt_path, metadata={"config": json.dumps(asdict(gpt.args))})
    save_safetensors(vq.state_dict(), vq_path, metadata={"config": json.dumps(asdict(vq.args))})
    return gpt_path, vq_path


@pytest.fixture(autouse=True)
def _feature_cache_in_tmp(tmp_path, monkeypatch):
    """Reference-feature caching must never write to the user's cache folder from a test."""
    monkeypatch.setenv("GENACCEL_CACHE_DIR", str(tmp_path / "feature_cache"))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> tuple[Path, Path]:
    return save_tiny_models(tmp_path_factory.mktemp("tiny_models"))


@pytest.fixture(scope="session")
def tiny_model_args(tiny_models) -> list[str]:
    gpt, vq = tiny_models
    return ["--ckpt", str(gpt), "--vq-ckpt", str(vq), "--image-size", str(TINY_IMAGE_SIZE)]


@pytest.fixture(scope="session")
def random_inception(tmp_path_factory) -> Path:
    """A random-init torch-fidelity InceptionV3 state dict: exercises the FID/IS/P&R plumbing offline."""
    from genaccel.eval.inception import make_random_inception_weights

    return make_random_inception_weights(tmp_path_factory.mktemp("inception") / "random_inception.pth")


@pytest.fixture
def small_classifier(tmp_path):
    """A random-weight crop classifier (128-d features) saved like the bundled one: (model, path)."""
    from genaccel.eval.feature_extractor import ClassifierConfig, CropClassifier, classifier_metadata

    torch.manual_seed(0)
    model = CropClassifier(ClassifierConfig(widths=[8, 8, 8, 128])).eval()
    path = save_safetensors(model.state_dict(), tmp_path / "clf.safetensors", metadata=classifier_metadata(model.config))
    return model, path
