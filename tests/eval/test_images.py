import numpy as np
import pytest
from PIL import Image

from genaccel.eval.images import load_images, save_adm_npz


def _rgb(size: int, value: int = 100) -> Image.Image:
    return Image.fromarray(np.full((size, size, 3), value, np.uint8))


def test_adm_npz_roundtrip_leaves_no_temp_files(tmp_path):
    imgs = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    path = save_adm_npz(tmp_path / "samples.npz", imgs, labels=np.arange(5))
    with np.load(path) as z:
        assert z.files == ["arr_0", "arr_1"]
        np.testing.assert_array_equal(z["arr_0"], imgs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["samples.npz"]


def test_folder_with_mismatched_sizes_is_rejected(tmp_path):
    _rgb(16).save(tmp_path / "a.png")
    _rgb(32).save(tmp_path / "b.png")
    with pytest.raises(ValueError, match="differ in size.*a.png is 16x16 but b.png is 32x32"):
        load_images(tmp_path)


def test_empty_folder_is_rejected(tmp_path):
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match="contains no images"):
        load_images(tmp_path)


def test_npz_without_arr_0_is_rejected(tmp_path):
    np.savez(tmp_path / "x.npz", images=np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match=r"has keys \['images'\] but no 'arr_0'"):
        load_images(tmp_path / "x.npz")


def test_float_or_nchw_arrays_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        save_adm_npz(tmp_path / "f.npz", np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="NHWC"):
        save_adm_npz(tmp_path / "c.npz", np.zeros((2, 3, 8, 8), np.uint8))
    assert not list(tmp_path.iterdir())


def test_folder_images_load_sorted_as_uint8(tmp_path):
    _rgb(8, 10).save(tmp_path / "b.png")
    _rgb(8, 20).convert("L").save(tmp_path / "a.png")
    imgs = load_images(tmp_path)
    assert imgs.shape == (2, 8, 8, 3) and imgs.dtype == np.uint8
    assert imgs[0, 0, 0, 0] == 20 and imgs[1, 0, 0, 0] == 10
