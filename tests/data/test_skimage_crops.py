"""The bundled dataset: determinism, class count, and held-out crops disjoint from training crops."""

import torch

from genaccel.data.skimage_crops import CROP, NUM_CLASSES, PHOTO_NAMES, load_photo, make_crops, split_regions


def test_at_least_12_distinct_photo_classes():
    assert NUM_CLASSES >= 12 and len(set(PHOTO_NAMES)) == NUM_CLASSES
    assert "cat" not in PHOTO_NAMES  # duplicate of chelsea


def test_crops_are_deterministic_given_seed():
    a, la = make_crops("train", 3, seed=5)
    b, lb = make_crops("train", 3, seed=5)
    c, _ = make_crops("train", 3, seed=6)
    assert torch.equal(a, b) and torch.equal(la, lb)
    assert not torch.equal(a, c)
    assert a.shape == (3 * NUM_CLASSES, 3, CROP, CROP) and a.min() >= -1 and a.max() <= 1


def test_heldout_region_disjoint_from_train_region():
    for name in PHOTO_NAMES:
        img = load_photo(name)
        r = split_regions(img.shape[2], img.shape[1])
        assert r["train"].x1 <= r["heldout"].x0  # no shared column, hence no shared pixel
        assert r["heldout"].x1 - r["heldout"].x0 >= CROP and r["train"].x1 - r["train"].x0 >= CROP


def test_no_heldout_crop_equals_any_train_crop():
    train, _ = make_crops("train", 16, seed=0, augment=False)
    held, _ = make_crops("heldout", 16, seed=0)
    dist = torch.cdist(held.flatten(1), train.flatten(1))
    assert dist.min() > 1.0
