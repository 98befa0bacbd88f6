"""FID / IS / P&R plumbing offline, with a random-weight Inception file made here (numbers mean nothing)."""

import numpy as np
import pytest
import torch

from genaccel.eval.__main__ import main
from genaccel.eval.images import save_adm_npz
from genaccel.eval.inception import inception_features, load_inception


def _images(seed: int, n: int = 10, size: int = 32) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (1, size, size, 3))
    return np.clip(base + rng.integers(-60, 60, (n, size, size, 3)), 0, 255).astype(np.uint8)


class _Uint8CHW(torch.utils.data.Dataset):
    def __init__(self, images: np.ndarray):
        self.images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


def test_cli_fid_equals_torch_fidelity_and_reports_is_prc(tmp_path, random_inception, capsys):
    from torch_fidelity import calculate_metrics

    gen, real = _images(0), _images(1)
    save_adm_npz(tmp_path / "gen.npz", gen)
    save_adm_npz(tmp_path / "real.npz", real)
    ours = main(["metrics", str(tmp_path / "gen.npz"), "--metrics", "fid,is,prc", "--reference",
                 str(tmp_path / "real.npz"), "--inception-weights", str(random_inception)])
    theirs = calculate_metrics(input1=_Uint8CHW(gen), input2=_Uint8CHW(real), fid=True, cuda=False, cache=False,
                               verbose=False, feature_extractor_weights_path=str(random_inception), batch_size=10,
                               save_cpu_ram=True)
    assert ours["fid"] == pytest.approx(theirs["frechet_inception_distance"], rel=1e-3)
    assert ours["fid"] > 0
    # IS = exp(E KL(p(y|x) || p(y))) >= 1; a random network's near-uniform predictions put it at 1 up to
    # float rounding (0.9999999999999998 measured on an AMD EPYC), so the bound allows 1e-9.
    assert ours["inception_score_mean"] >= 1.0 - 1e-9
    assert 0.0 <= ours["precision"] <= 1.0 and 0.0 <= ours["recall"] <= 1.0
    assert "fd_domain" not in ours


def test_adm_reference_stats_give_the_same_fid_as_reference_images(tmp_path, random_inception):
    from genaccel.eval.fd import feature_stats

    gen, real = _images(0), _images(1)
    save_adm_npz(tmp_path / "gen.npz", gen)
    model = load_inception(random_inception)
    stats = feature_stats(inception_features(model, real, progress=False)["2048"])
    np.savez(tmp_path / "VIRTUAL_ref.npz", mu=stats.mu, sigma=stats.sigma)  # ADM reference layout, no arr_0
    save_adm_npz(tmp_path / "real.npz", real)
    common = ["metrics", str(tmp_path / "gen.npz"), "--metrics", "fid", "--inception-weights", str(random_inception)]
    from_stats = main([*common, "--reference", str(tmp_path / "VIRTUAL_ref.npz")])["fid"]
    from_images = main([*common, "--reference", str(tmp_path / "real.npz")])["fid"]
    assert from_stats == pytest.approx(from_images, rel=1e-9)
    with pytest.raises(SystemExit, match="holds only mu/sigma"):
        main([*common[:3], "prc", *common[4:], "--reference", str(tmp_path / "VIRTUAL_ref.npz")])


def test_missing_or_wrong_inception_weights_name_the_file(tmp_path, monkeypatch):
    monkeypatch.delenv("GENACCEL_INCEPTION_WEIGHTS", raising=False)
    save_adm_npz(tmp_path / "gen.npz", _images(0, n=4))
    missing = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    with pytest.raises(SystemExit, match=f"Inception weights file not found: {missing}"):
        main(["metrics", str(tmp_path / "gen.npz"), "--metrics", "is", "--inception-weights", str(missing)])
    with pytest.raises(SystemExit, match="--inception-weights PATH or set GENACCEL_INCEPTION_WEIGHTS"):
        main(["metrics", str(tmp_path / "gen.npz"), "--metrics", "is"])
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "not_inception.pth")
    with pytest.raises(SystemExit, match="not an InceptionV3 state dict"):
        main(["metrics", str(tmp_path / "gen.npz"), "--metrics", "is", "--inception-weights",
              str(tmp_path / "not_inception.pth")])
