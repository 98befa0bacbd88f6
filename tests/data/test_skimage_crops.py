"""The bundled dataset: determinism, class count, and held-out crops disjoint from training crops."""

import pytest
import torch

from genaccel.data.skimage_crops import (
    CROP,
    GAP,
    HELDOUT_SIDE,
    NUM_CLASSES,
    PHOTO_NAMES,
    SIDES,
    Region,
    load_photo,
    make_crops,
    photo_regions,
    split_regions,
)


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


def _separation(a: Region, b: Region) -> int:
    """Pixels between two boxes along the axis that separates them (negative if they overlap)."""
    return max(b.x0 - a.x1, a.x0 - b.x1, b.y0 - a.y1, a.y0 - b.y1)


def test_heldout_region_disjoint_from_train_region():
    for name in PHOTO_NAMES:
        img = load_photo(name)
        r = photo_regions(name)
        assert _separation(r["train"], r["heldout"]) >= GAP  # no shared pixel, and a gap between
        for box in r.values():  # both hold a full crop and lie inside the photo
            assert box.x1 - box.x0 >= CROP and box.y1 - box.y0 >= CROP
            assert 0 <= box.x0 and box.x1 <= img.shape[2] and 0 <= box.y0 and box.y1 <= img.shape[1]


@pytest.mark.parametrize("side", SIDES)
def test_every_heldout_side_splits_disjointly(side):
    r = split_regions(300, 224, side)
    assert _separation(r["train"], r["heldout"]) == GAP


def test_heldout_side_table_names_real_photos_and_sides():
    assert set(HELDOUT_SIDE) <= set(PHOTO_NAMES) and set(HELDOUT_SIDE.values()) <= set(SIDES)
    with pytest.raises(ValueError, match="held-out side"):
        split_regions(300, 224, "middle")
    with pytest.raises(ValueError, match="unknown photo"):
        photo_regions("cat")


def test_no_heldout_crop_equals_any_train_crop():
    train, _ = make_crops("train", 16, seed=0, augment=False)
    held, _ = make_crops("heldout", 16, seed=0)
    dist = torch.cdist(held.flatten(1), train.flatten(1))
    assert dist.min() > 1.0


def test_128_crops_cover_the_64_field_of_view_and_stay_disjoint():
    """size = 64 f: the photo resized f times, band / gap / crop scaled alike, so the held-out band is the same part
    of each photo; at size 64 nothing changed."""
    a, la = make_crops("heldout", 2, seed=3, size=128)
    assert a.shape == (2 * NUM_CLASSES, 3, 128, 128) and a.min() >= -1 and a.max() <= 1
    assert torch.equal(make_crops("train", 2, seed=4)[0], make_crops("train", 2, seed=4, size=64)[0])
    for name in PHOTO_NAMES:
        small, big = photo_regions(name), photo_regions(name, 2)
        img = load_photo(name, 2)
        assert _separation(big["train"], big["heldout"]) >= 2 * GAP
        for key in ("train", "heldout"):
            box, half = big[key], small[key]
            assert box.x1 - box.x0 >= 128 and box.y1 - box.y0 >= 128
            assert 0 <= box.x0 and box.x1 <= img.shape[2] and 0 <= box.y0 and box.y1 <= img.shape[1]
            # the same part of the photo, up to the 1-pixel rounding of the resized sizes
            assert abs(box.x0 - 2 * half.x0) <= 2 and abs(box.x1 - 2 * half.x1) <= 2
            assert abs(box.y0 - 2 * half.y0) <= 2 and abs(box.y1 - 2 * half.y1) <= 2


def test_crop_size_must_be_a_multiple_of_64():
    for bad in (32, 96):
        with pytest.raises(ValueError, match="multiple of 64"):
            make_crops("train", 1, size=bad)
