"""FID / IS / P&R plumbing offline, with a random-weight Inception file made here (numbers mean nothing)."""

import numpy as np
import pytest
import torch
from eval_helpers import cli_metrics_run, noisy_images

from genaccel.eval.__main__ import main
from genaccel.eval.images import save_adm_npz
from genaccel.eval.inception import inception_features, load_inception


class _Uint8CHW(torch.utils.data.Dataset):
    def __init__(self, images: np.ndarray):
        self.images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, random_inception):
    """Six generated and five real images saved as ADM .npz files, and the CLI's fid/is/prc of one against the
    other: run once, shared by the two tests below (FID's 2048-d eigenvalues are the slow part)."""
    return cli_metrics_run(tmp_path_factory.mktemp("inception_cli"), "fid,is,prc", random_inception)


def test_cli_fid_equals_torch_fidelity_and_reports_is_prc(cli_run, random_inception):
    from torch_fidelity import calculate_metrics

    ours = cli_run["ours"]
    theirs = calculate_metrics(input1=_Uint8CHW(cli_run["gen"]), input2=_Uint8CHW(cli_run["real"]), fid=True,
                               cuda=False, cache=False, verbose=False,
                               feature_extractor_weights_path=str(random_inception), batch_size=10,
                               save_cpu_ram=True)
    assert ours["fid"] == pytest.approx(theirs["frechet_inception_distance"], rel=1e-3)
    assert ours["fid"] > 0
    # IS = exp(E KL(p(y|x) || p(y))) >= 1; a random network's near-uniform predictions put it at 1 up to
    # float rounding (0.9999999999999998 measured on an AMD EPYC), so the bound allows 1e-9.
    assert ours["inception_score_mean"] >= 1.0 - 1e-9
    assert 0.0 <= ours["precision"] <= 1.0 and 0.0 <= ours["recall"] <= 1.0
    assert "fd_domain" not in ours


def test_adm_reference_stats_give_the_same_fid_as_reference_images(tmp_path, random_inception, cli_run):
    from genaccel.eval.fd import feature_stats

    model = load_inception(random_inception)
    stats = feature_stats(inception_features(model, cli_run["real"], progress=False).pool)
    np.savez(tmp_path / "VIRTUAL_ref.npz", mu=stats.mu, sigma=stats.sigma)  # ADM reference layout, no arr_0
    common = ["metrics", str(cli_run["folder"] / "gen.npz"), "--metrics", "fid", "--inception-weights",
              str(random_inception)]
    from_stats = main([*common, "--reference", str(tmp_path / "VIRTUAL_ref.npz")])["fid"]
    from_images = cli_run["ours"]["fid"]  # the same generated images against real.npz's images
    assert from_stats == pytest.approx(from_images, rel=1e-9)
    with pytest.raises(SystemExit, match="holds only mu/sigma"):
        main([*common[:3], "prc", *common[4:], "--reference", str(tmp_path / "VIRTUAL_ref.npz")])


def test_missing_or_wrong_inception_weights_name_the_file(tmp_path, monkeypatch):
    monkeypatch.delenv("GENACCEL_INCEPTION_WEIGHTS", raising=False)
    save_adm_npz(tmp_path / "gen.npz", noisy_images(0, n=4))
    missing = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    with pytest.raises(SystemExit, match=f"Inception weights file not found: {missing}"):
        main(["metrics", str(tmp_path / "gen.npz"), "--metrics", "is", "--inception-weights", str(missing)])
    with pytest.raises(SystemExit, match="--inception-weights PATH or set GENACCEL_INCEPTION_WEIGHTS"):
        main(["metrics", str(tmp_path / "gen.npz"), "--metrics", "is"])
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "not_inception.pth")
    with pytest.raises(SystemExit, match="not an InceptionV3 state dict"):
        main(["metrics", str(tmp_path / "gen.npz"), "--metrics", "is", "--inception-weights",
              str(tmp_path / "not_inception.pth")])


def test_weights_formats_unwrapped_or_refused_in_one_line(tmp_path, random_inception):
    """Wrapped / DDP-prefixed state dicts load; ADM's .pb, TorchScript, pickles and ambiguous dicts give one line."""
    from genaccel.eval.inception import read_inception_state_dict

    sd = torch.load(random_inception, weights_only=True)
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3}, tmp_path / "wrapped.pth")
    unwrapped = read_inception_state_dict(tmp_path / "wrapped.pth")
    assert unwrapped.keys() == sd.keys()
    load_inception(tmp_path / "wrapped.pth")  # loads strictly
    (tmp_path / "classify_image_graph_def.pb").write_bytes(b"\n\x0c\n\x05input\x12\x0bPlaceholder" * 10)
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), tmp_path / "inception-2015-12-05.pt")
    torch.save({"state_dict": sd, "ema": {}, "model": sd}, tmp_path / "two.pth")
    torch.save({"args": argparse_namespace()}, tmp_path / "pickled.pth")
    sd_bad = dict(sd)
    sd_bad.pop("fc.weight")
    sd_bad["head.weight"] = torch.zeros(1)
    torch.save(sd_bad, tmp_path / "bad_keys.pth")
    save_adm_npz(tmp_path / "gen.npz", noisy_images(0, n=4))
    for name, message in [("classify_image_graph_def.pb", "ADM's TensorFlow GraphDef"),
                          ("inception-2015-12-05.pt", "TorchScript archive"),
                          ("two.pth", r"several state dicts \(state_dict, model\)"),
                          ("pickled.pth", "cannot be read as a plain state dict"),
                          ("bad_keys.pth", r"missing keys 1 \(fc.weight\), unexpected keys 1 \(head.weight\)")]:
        with pytest.raises(SystemExit, match=message) as err:
            main(["metrics", str(tmp_path / "gen.npz"), "--metrics", "is", "--inception-weights",
                  str(tmp_path / name)])
        assert "\n" not in str(err.value), name


def argparse_namespace():
    import argparse

    return argparse.Namespace(lr=1e-4)
