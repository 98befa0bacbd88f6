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


def test_open_images_streams_an_adm_npz_in_batches(tmp_path):
    from genaccel.eval.images import open_images

    images = np.random.default_rng(0).integers(0, 256, (23, 8, 6, 3), dtype=np.uint8)
    save_adm_npz(tmp_path / "s.npz", images)
    source = open_images(tmp_path / "s.npz")
    assert (len(source), source.image_shape) == (23, (8, 6, 3))
    batches = list(source.batches(5))
    assert [len(b) for b in batches] == [5, 5, 5, 5, 3] and all(b.flags.writeable for b in batches)
    np.testing.assert_array_equal(np.concatenate(batches), images)
    np.savez(tmp_path / "float.npz", arr_0=images.astype(np.float32))
    with pytest.raises(ValueError, match="uint8"):
        open_images(tmp_path / "float.npz")


def test_truncated_npz_is_an_error_naming_the_row(tmp_path):
    import zipfile

    from genaccel.eval.images import open_images

    images = np.zeros((10, 4, 4, 3), np.uint8)
    with zipfile.ZipFile(tmp_path / "cut.npz", "w") as zf, zf.open("arr_0.npy", "w") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": images.shape})
        f.write(images[:7].tobytes())  # header says 10 rows, 7 are there
    with pytest.raises(ValueError, match="truncated"):
        list(open_images(tmp_path / "cut.npz").batches(4))
