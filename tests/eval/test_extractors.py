"""The --feature-extractor registry: names and errors, CLIP / DINOv2 from tiny random transformers folders
(saved to tmp_path, nothing downloaded), and the feature metrics through ``genaccel eval metrics``."""

import numpy as np
import pytest
import torch

from genaccel.eval.__main__ import main
from genaccel.eval.density_coverage import density_coverage, f_score
from genaccel.eval.extractors import available_feature_extractors, build_feature_extractor, parse_feature_extractor
from genaccel.eval.fd import fd_from_stats, feature_stats, heldout_reference_images
from genaccel.eval.images import save_adm_npz
from genaccel.eval.inception import precision_recall
from genaccel.eval.kid import kernel_distance

SIDE = 32


@pytest.fixture(scope="module")
def tiny_dinov2(tmp_path_factory):
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("dinov2")
    config = Dinov2Config(hidden_size=24, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48,
                          image_size=SIDE, patch_size=8)
    Dinov2Model(config).eval().save_pretrained(folder)
    BitImageProcessor(size={"shortest_edge": SIDE}, crop_size={"height": SIDE, "width": SIDE}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("clip")
    config = CLIPConfig(
        text_config={"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32,
                     "vocab_size": 64, "max_position_embeddings": 16, "bos_token_id": 0, "eos_token_id": 1,
                     "pad_token_id": 1},
        vision_config={"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32,
                       "image_size": SIDE, "patch_size": 8},
        projection_dim=12)
    CLIPModel(config).eval().save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": SIDE}, crop_size={"height": SIDE, "width": SIDE}).save_pretrained(folder)
    return folder


def _images(n: int, seed: int, bright: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(rng.integers(0, 200, (n, 48, 48, 3)) + bright, 0, 255).astype(np.uint8)


def _processed(folder, images: np.ndarray) -> torch.Tensor:
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(folder)(images=list(images), return_tensors="pt")["pixel_values"]


def test_names_and_errors(tmp_path):
    assert available_feature_extractors()[:4] == ["domain", "inception", "clip:<dir>", "dinov2:<dir>"]
    with pytest.raises(ValueError, match="unknown feature extractor 'vgg16'; choose from domain, inception"):
        parse_feature_extractor("vgg16")
    with pytest.raises(ValueError, match=r"needs a local directory: --feature-extractor clip:<dir>"):
        parse_feature_extractor("clip")
    with pytest.raises(ValueError, match=f"dinov2 weights directory {tmp_path / 'nope'} does not exist"):
        parse_feature_extractor(f"dinov2:{tmp_path / 'nope'}")
    with pytest.raises(ValueError, match="has no config.json"):
        parse_feature_extractor(f"clip:{tmp_path}")
    with pytest.raises(ValueError, match="takes no path"):
        parse_feature_extractor("domain:/x")


def test_cli_refuses_a_bad_extractor_before_any_work(tmp_path, tiny_clip):
    save_adm_npz(tmp_path / "s.npz", _images(4, 0))
    with pytest.raises(SystemExit, match="unknown feature extractor 'clipp:/m'"):
        main(["metrics", str(tmp_path / "s.npz"), "--feature-extractor", "clipp:/m"])
    with pytest.raises(SystemExit, match="need a reference"):
        main(["metrics", str(tmp_path / "s.npz"), "--feature-extractor", f"clip:{tiny_clip}", "--metrics", "kid"])
    np.savez(tmp_path / "stats_only.npz", mu=np.zeros(3), sigma=np.eye(3))
    with pytest.raises(SystemExit, match="Inception statistics, which do not apply"):
        main(["metrics", str(tmp_path / "s.npz"), "--feature-extractor", f"clip:{tiny_clip}", "--metrics", "fd",
              "--reference", str(tmp_path / "stats_only.npz")])


def test_dinov2_features_are_the_normed_cls_token(tiny_dinov2):
    from transformers import Dinov2Model

    images = _images(5, 1)
    ext = build_feature_extractor(f"dinov2:{tiny_dinov2}")
    model = Dinov2Model.from_pretrained(tiny_dinov2).eval()
    with torch.no_grad():
        hidden = model(pixel_values=_processed(tiny_dinov2, images)).last_hidden_state  # after the final layernorm
    assert ext.dim == 24 and ext.label == "dinov2"
    torch.testing.assert_close(ext.features(images), hidden[:, 0], rtol=1e-5, atol=1e-6)


def test_clip_features_are_the_projected_image_embedding(tiny_clip):
    from transformers import CLIPModel

    images = _images(5, 2)
    ext = build_feature_extractor(f"clip:{tiny_clip}")
    model = CLIPModel.from_pretrained(tiny_clip).eval()
    with torch.no_grad():
        out = model.get_image_features(pixel_values=_processed(tiny_clip, images))
    expected = out.pooler_output if hasattr(out, "pooler_output") else out
    assert ext.dim == 12
    torch.testing.assert_close(ext.features(images), expected, rtol=1e-5, atol=1e-6)


def test_clip_folder_given_as_dinov2_is_refused(tiny_clip):
    with pytest.raises(ValueError, match="not DINOv2"):
        build_feature_extractor(f"dinov2:{tiny_clip}")


def test_eval_metrics_on_dinov2_features(tmp_path, tiny_dinov2):
    gen, real = _images(24, 3), _images(30, 4, bright=40)
    save_adm_npz(tmp_path / "gen.npz", gen)
    # an ADM-style reference with Inception mu/sigma: they must be ignored for DINOv2 (the images are used)
    save_adm_npz(tmp_path / "ref_images.npz", real)
    with np.load(tmp_path / "ref_images.npz") as z:
        np.savez(tmp_path / "ref.npz", arr_0=z["arr_0"], mu=np.zeros(2048), sigma=np.eye(2048))
    out = main(["metrics", str(tmp_path / "gen.npz"), "--feature-extractor", f"dinov2:{tiny_dinov2}",
                "--reference", str(tmp_path / "ref.npz"), "--metrics", "fd,kid,prc,dc", "--kid-subsets", "3",
                "--kid-subset-size", "20", "--feature-batch-size", "7"])
    ext = build_feature_extractor(f"dinov2:{tiny_dinov2}")
    fg, fr = ext.features(gen), ext.features(real)
    assert out["fd_dinov2"] == pytest.approx(fd_from_stats(feature_stats(fg), feature_stats(fr)), rel=1e-6)
    kid = kernel_distance(fg, fr, subsets=3, subset_size=20)
    assert out["kd_dinov2_mean"] == pytest.approx(kid["mean"], rel=1e-6, abs=1e-9)
    pr = precision_recall(fg, fr)
    assert (out["precision_dinov2"], out["recall_dinov2"]) == (pr["precision"], pr["recall"])
    assert out["f_score_dinov2"] == pytest.approx(f_score(pr["precision"], pr["recall"]))
    dc = density_coverage(fg, fr)
    assert (out["density_dinov2"], out["coverage_dinov2"]) == (dc["density"], dc["coverage"])
    assert out["feature_extractor"].startswith("dinov2:") and "fid" not in out and "precision" not in out
    auto = main(["metrics", str(tmp_path / "gen.npz"), "--feature-extractor", f"dinov2:{tiny_dinov2}",
                 "--reference", str(tmp_path / "ref.npz"), "--metrics", "auto"])
    assert {"fd_dinov2", "precision_dinov2", "density_dinov2"} <= set(auto) and "kd_dinov2_mean" not in auto


def test_eval_metrics_on_crop_classifier_features(tmp_path, small_classifier):
    model, clf = small_classifier
    gen = _images(40, 5)
    save_adm_npz(tmp_path / "gen.npz", gen)
    out = main(["metrics", str(tmp_path / "gen.npz"), "--classifier", str(clf), "--feature-extractor", "domain",
                "--metrics", "fd_domain,fd,kid,prc,dc", "--kid-subsets", "4", "--kid-subset-size", "30"])
    fg = model.features(torch.from_numpy(gen))
    fr = model.features(heldout_reference_images(64, seed=123))
    assert out["fd_domain"] == pytest.approx(fd_from_stats(feature_stats(fg), feature_stats(fr)))
    assert out["kd_domain_mean"] == pytest.approx(kernel_distance(fg, fr, 4, 30)["mean"], rel=1e-9)
    assert out["precision_domain"] == precision_recall(fg, fr)["precision"]
    assert out["coverage_domain"] == density_coverage(fg, fr)["coverage"]
    main(["stats", "heldout", "--out", str(tmp_path / "ref.npz"), "--classifier", str(clf)])
    with pytest.raises(SystemExit, match="holds only mu/sigma: use 'heldout' or an image set"):
        main(["metrics", str(tmp_path / "gen.npz"), "--classifier", str(clf), "--feature-extractor", "domain",
              "--metrics", "dc", "--domain-reference", str(tmp_path / "ref.npz")])


def test_eval_metrics_on_inception_features(tmp_path, random_inception):
    """KID, P&R + F-score, density/coverage on Inception pool features: usual key names, same values as the
    functions on features extracted here; 'auto' adds density/coverage wherever P&R runs."""
    from genaccel.eval.inception import inception_features, load_inception

    gen, real = _images(6, 6), _images(7, 7, bright=50)  # density/coverage k=5 needs > 5 per set
    save_adm_npz(tmp_path / "gen.npz", gen)
    save_adm_npz(tmp_path / "ref.npz", real)
    common = ["metrics", str(tmp_path / "gen.npz"), "--inception-weights", str(random_inception),
              "--reference", str(tmp_path / "ref.npz"), "--cache-dir", "none"]
    # FID comes from the 'auto' run below (one 2048-d eigenvalue problem per run is the slow part)
    out = main([*common, "--metrics", "kid,prc,dc", "--kid-subsets", "2", "--kid-subset-size", "5"])
    model = load_inception(random_inception)
    fg = inception_features(model, gen, progress=False).pool
    fr = inception_features(model, real, progress=False).pool
    assert out["kid_mean"] == pytest.approx(kernel_distance(fg, fr, 2, 5)["mean"], rel=1e-6, abs=1e-12)
    pr = precision_recall(fg, fr)
    assert (out["precision"], out["recall"]) == (pr["precision"], pr["recall"])
    assert out["f_score"] == pytest.approx(f_score(pr["precision"], pr["recall"]))
    dc = density_coverage(fg, fr)
    assert (out["density"], out["coverage"]) == (dc["density"], dc["coverage"])
    assert "torch-fidelity" in out["kid_protocol"] and "k=5" in out["dc_protocol"]
    with pytest.raises(SystemExit, match="lower --kid-subset-size"):
        main([*common, "--metrics", "kid"])  # 6 images < the default subset of 1000
    auto = main([*common, "--metrics", "auto"])
    assert {"fid", "precision", "f_score", "density", "coverage"} <= set(auto) and "kid_mean" not in auto
    assert auto["fid"] == pytest.approx(fd_from_stats(feature_stats(fg), feature_stats(fr)), rel=1e-6)
    assert (auto["precision"], auto["density"]) == (pr["precision"], dc["density"])
