"""``genaccel eval metrics`` / ``stats`` with FD-domain and class accuracy (small random classifier)."""

import numpy as np
import pytest
import torch

from genaccel.eval.__main__ import main
from genaccel.eval.fd import fd_from_stats, feature_stats, heldout_reference_images
from genaccel.eval.images import save_adm_npz


def _samples(tmp_path, n: int = 32):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 64, 64, 3), dtype=np.uint8)
    labels = np.arange(n) % 16
    return save_adm_npz(tmp_path / "samples.npz", images, labels), images, labels


def test_fd_domain_and_class_accuracy_match_direct_computation(tmp_path, small_classifier):
    model, clf = small_classifier
    path, images, labels = _samples(tmp_path)
    out = main(["metrics", str(path), "--metrics", "fd_domain,class_accuracy", "--classifier", str(clf)])
    ref = feature_stats(model.features(heldout_reference_images(64, seed=123)))
    expected = fd_from_stats(feature_stats(model.features(torch.from_numpy(images))), ref)
    assert out["fd_domain"] == pytest.approx(expected, rel=1e-9)
    expected_acc = float((model.predict(torch.from_numpy(images)).numpy() == labels).mean())
    assert out["class_accuracy"] == pytest.approx(expected_acc)
    assert "fid" not in out


def test_stats_file_reference_gives_the_same_fd_domain(tmp_path, small_classifier):
    _, clf = small_classifier
    path, _, _ = _samples(tmp_path)
    main(["stats", "heldout", "--out", str(tmp_path / "ref.npz"), "--classifier", str(clf)])
    with np.load(tmp_path / "ref.npz") as z:
        assert z["mu"].shape == (128,) and z["sigma"].shape == (128, 128)
    common = ["metrics", str(path), "--metrics", "fd_domain", "--classifier", str(clf)]
    from_file = main([*common, "--domain-reference", str(tmp_path / "ref.npz")])["fd_domain"]
    assert from_file == pytest.approx(main(common)["fd_domain"], rel=1e-9)


def test_class_accuracy_without_labels_is_an_error_only_when_asked(tmp_path, small_classifier):
    _, clf = small_classifier
    save_adm_npz(tmp_path / "nolabels.npz", np.zeros((4, 64, 64, 3), np.uint8))
    auto = main(["metrics", str(tmp_path / "nolabels.npz"), "--classifier", str(clf)])
    assert "fd_domain" in auto and "class_accuracy" not in auto
    with pytest.raises(SystemExit, match="no 'arr_1'"):
        main(["metrics", str(tmp_path / "nolabels.npz"), "--metrics", "class_accuracy", "--classifier", str(clf)])
    with pytest.raises(SystemExit, match="unknown metric"):
        main(["metrics", str(tmp_path / "nolabels.npz"), "--metrics", "fid2"])
