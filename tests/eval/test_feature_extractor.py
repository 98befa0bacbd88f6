import pytest
import torch

from genaccel.eval.fd import class_accuracy, fd_domain
from genaccel.eval.feature_extractor import (
    ASSET,
    load_feature_extractor,
)


def test_uint8_nhwc_and_float_nchw_inputs_give_the_same_features(small_classifier):
    model, _ = small_classifier
    u8 = torch.randint(0, 256, (5, 64, 64, 3), dtype=torch.uint8)
    as_float = u8.permute(0, 3, 1, 2).float() / 127.5 - 1.0
    feats = model.features(u8)
    assert feats.shape == (5, 128)
    torch.testing.assert_close(feats, model.features(as_float))
    assert model.features(torch.zeros(2, 32, 32, 3, dtype=torch.uint8)).shape == (2, 128)  # resized to 64


def test_wrong_layouts_raise(small_classifier):
    model, _ = small_classifier
    with pytest.raises(ValueError, match="NHWC"):
        model.features(torch.zeros(2, 3, 64, 64, dtype=torch.uint8))
    with pytest.raises(ValueError, match="NCHW"):
        model.features(torch.zeros(2, 64, 64, 3))
    with pytest.raises(RuntimeError, match="eval"):
        model.train().features(torch.zeros(2, 3, 64, 64))


def test_roundtrip_and_missing_file_errors(small_classifier, tmp_path):
    model, path = small_classifier
    loaded = load_feature_extractor(path)
    x = torch.rand(3, 3, 64, 64) * 2 - 1
    torch.testing.assert_close(loaded.logits(x), model.logits(x))
    with pytest.raises(FileNotFoundError, match="python -m genaccel.train classifier"):
        load_feature_extractor(tmp_path / "absent.safetensors")


def test_fd_domain_of_a_set_with_itself_is_zero_and_grows_with_noise(small_classifier):
    model, _ = small_classifier
    x = torch.rand(40, 3, 64, 64) * 2 - 1
    assert abs(fd_domain(x, x, extractor=model)) < 1e-6
    assert fd_domain(x, (x + 0.5 * torch.randn_like(x)).clamp(-1, 1), extractor=model) > 0
    with pytest.raises(ValueError, match="one requested label per image"):
        class_accuracy(x, torch.zeros(3), extractor=model)


def test_bundled_classifier_matches_its_recorded_heldout_accuracy():
    import json

    from genaccel.data.skimage_crops import make_crops

    model = load_feature_extractor()
    assert model.feature_dim >= 128
    recorded = json.loads(ASSET.with_suffix(".json").read_text())["metrics"]["heldout_accuracy"]
    x, y = make_crops("heldout", 16, seed=7)  # a fresh held-out sample, not the one recorded
    assert class_accuracy(x, y, extractor=model) >= recorded - 0.05
    assert recorded >= 0.85
