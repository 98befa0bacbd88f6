"""``--model flextok``: a 1-D GPT over FlexTok tokens, k tokens in k forwards, any prefix decoded; the
speculative samplers on 1-D sequences (neighbours from the FSQ codes, 2-D-only options refused)."""

import json

import pytest
import torch

from genaccel.cli import main as cli_main
from genaccel.models.llamagen import ModelArgs, build_gpt
from genaccel.pipeline import load_model
from genaccel.samplers import build_sampler
from genaccel.tokenizers.flex import FlexTokArgs, FlexTokenizer, export_metadata
from genaccel.utils.io import save_safetensors

K = 6


def random_tokenizer(decoders: str, seed: int) -> FlexTokenizer:
    """A tiny FlexTok tokenizer (64x64 images in 16 patches, K = 6, 60 codes) with N(0, 0.2) weights."""
    torch.manual_seed(seed)
    tok = FlexTokenizer(FlexTokArgs(image_size=64, patch_size=16, width=32, depth=1, decoder_depth=1, heads=2,
                                    num_tokens=K, fsq_levels=[5, 4, 3], decoders=decoders))
    with torch.no_grad():
        for p in tok.parameters():
            p.normal_(0.0, 0.2)
    return tok


@pytest.fixture(scope="module")
def flex_ckpts(tmp_path_factory):
    """A tiny random FlexTok tokenizer (64x64 images in 16 patches, K = 6, 60 codes) and a 1-D GPT over its tokens."""
    d = tmp_path_factory.mktemp("flex")
    tok = random_tokenizer("direct", seed=0)
    save_safetensors(tok.state_dict(), d / "flextok.safetensors", metadata=export_metadata(tok))
    gpt = build_gpt(None, dim=32, n_layer=1, n_head=2, vocab_size=60, num_classes=3, block_size=K, multiple_of=32,
                    layout="1d")
    for p in gpt.parameters():
        torch.nn.init.normal_(p, 0, 0.3)
    cfg = {k: getattr(gpt.args, k) for k in ModelArgs.field_names()}
    save_safetensors(gpt.state_dict(), d / "gpt.safetensors", metadata={"config": json.dumps(cfg)})
    return d


def pipeline(d, num_tokens=None):
    return load_model("flextok", ckpt=d / "gpt.safetensors", vq_ckpt=d / "flextok.safetensors", num_tokens=num_tokens)


@pytest.mark.parametrize("k", [1, 3, K])
def test_k_tokens_take_k_forwards_and_decode_as_that_prefix(flex_ckpts, k, one_thread):
    pipe = pipeline(flex_ckpts, k)
    out = build_sampler("ar", cfg_scale=2.0).generate(pipe.gpt, torch.tensor([0, 2]), torch.Generator().manual_seed(0))
    assert out.tokens.shape == (2, k) and out.stats.nfe == k
    images = pipe.decode(out.tokens)
    assert images.shape == (2, 64, 64, 3) and images.dtype == torch.uint8
    expected = torch.clamp(127.5 * pipe.vq.detokenize(out.tokens) + 128.0, 0, 255).to(torch.uint8)
    assert torch.equal(images, expected.permute(0, 2, 3, 1))


def test_a_shorter_budget_generates_the_prefix_of_the_longer_one_greedy(flex_ckpts, one_thread):
    """Any prefix is a valid FlexTok sequence: greedy k tokens equal the first k of greedy K tokens."""
    full = build_sampler("ar", top_k=1).generate(pipeline(flex_ckpts).gpt, torch.tensor([1]), torch.Generator())
    short = build_sampler("ar", top_k=1).generate(pipeline(flex_ckpts, 3).gpt, torch.tensor([1]), torch.Generator())
    assert torch.equal(short.tokens, full.tokens[:, :3])


@pytest.mark.parametrize("name", ["sjd", "gsd", "lantern"])
def test_speculative_samplers_run_on_1d_tokens_greedy_equal_to_ar(flex_ckpts, name, one_thread):
    pipe = pipeline(flex_ckpts)
    ar = build_sampler("ar", top_k=1).generate(pipe.gpt, torch.tensor([2]), torch.Generator())
    sampler = pipe.prepare_sampler(build_sampler(name, top_k=1, init="random"))  # lantern: no drafter -> Jacobi
    out = sampler.generate(pipe.gpt, torch.tensor([2]), torch.Generator().manual_seed(0))
    assert out.tokens.shape == (1, K)
    if name == "sjd":  # exact: greedy equals ar
        assert torch.equal(out.tokens, ar.tokens)


def test_lantern_and_gsd_neighbours_come_from_the_fsq_codes(flex_ckpts):
    pipe = pipeline(flex_ckpts)
    sampler = pipe.prepare_sampler(build_sampler("lantern"))
    assert torch.equal(sampler.codebook_for(pipe.gpt), pipe.vq.codebook_vectors())


def test_2d_only_options_are_one_clear_error(flex_ckpts):
    pipe = pipeline(flex_ckpts)
    with pytest.raises(ValueError, match="needs a 2-D token grid"):
        build_sampler("sjd", init="repeat_horizon").generate(pipe.gpt, torch.tensor([0]), torch.Generator())
    with pytest.raises(ValueError, match="grid"):
        build_sampler("zipar").generate(pipe.gpt, torch.tensor([0]), torch.Generator())
    with pytest.raises(ValueError, match="trained for diagonal decoding"):
        build_sampler("nar").generate(pipe.gpt, torch.tensor([0]), torch.Generator())
    with pytest.raises(ValueError, match="--num-tokens"):
        load_model("llamagen", num_tokens=8)


def test_sample_cli_with_num_tokens(flex_ckpts, tmp_path, capsys):
    out = tmp_path / "out"
    rc = cli_main(["sample", "--model", "flextok", "--sampler", "sjd", "--num-tokens", "4", "--ckpt",
                   str(flex_ckpts / "gpt.safetensors"), "--vq-ckpt", str(flex_ckpts / "flextok.safetensors"),
                   "--classes", "0", "1", "--out", str(out), "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    stats = json.loads((out / "stats.json").read_text())
    assert stats["tokens_per_image"] == 4 and stats["options"]["init"] == "random"  # the family's default
    assert stats["checkpoints"]["num_tokens"] == 4
    rc = cli_main(["sample", "--model", "flextok", "--num-tokens", "9", "--ckpt", str(flex_ckpts / "gpt.safetensors"),
                   "--vq-ckpt", str(flex_ckpts / "flextok.safetensors"), "--out", str(tmp_path / "o2")])
    assert rc == 2 and "--num-tokens must lie in [1, 6]" in capsys.readouterr().err


def test_flextok_benchmark_smoke_writes_rows_per_k_and_goal_lines(flex_ckpts, tmp_path, one_thread):
    from genaccel.bench import flextok as bench

    doc = tmp_path / "bench.md"
    out = bench.main(["--ks", "2,4", "--num-images", "3", "--batch-size", "3", "--latency-images", "1",
                      "--recon-per-class", "1", "--reference-per-class", "2", "--threads", "1",
                      "--ckpt", str(flex_ckpts / "gpt.safetensors"), "--tokenizer", str(flex_ckpts / "flextok.safetensors"),
                      "--doc", str(doc), "--png", str(tmp_path / "plot.png"), "--json", str(tmp_path / "r.json")])
    assert list(out["reconstruction"]) == [1, 2, 4, K]
    gen = out["generation"]
    assert gen["ar"]["nfe"] == 256 and gen["k2"]["nfe"] == 2 and gen["k4"]["nfe"] == 4
    assert all(r["total_s"] >= r["sample_s"] for r in gen.values())
    text = doc.read_text()
    assert "| flextok | 4 | 4 |" in text and "not measured: k = 32" in text
    assert (tmp_path / "plot.png").stat().st_size > 0


def test_flow_decoder_through_the_pipeline_and_the_cli(flex_ckpts, tmp_path, capsys, one_thread):
    """--decoder flow decodes with the rectified-flow decoder (noise from the batch's generator), is recorded in
    stats.json, and is refused for tokenizers without one and for VQ models, before any sampling."""
    from genaccel.eval.fd import quantize_like_samples

    both = random_tokenizer("both", seed=1)
    save_safetensors(both.state_dict(), tmp_path / "both.safetensors", metadata=export_metadata(both))
    pipe = load_model("flextok", ckpt=flex_ckpts / "gpt.safetensors", vq_ckpt=tmp_path / "both.safetensors",
                      decoder="flow", decode_steps=2)
    tokens = torch.randint(0, 60, (2, 4), generator=torch.Generator().manual_seed(0))
    got = pipe.decode(tokens, torch.Generator().manual_seed(5))
    want = both.detokenize(tokens, steps=2, decoder="flow", generator=torch.Generator().manual_seed(5))
    assert torch.equal(got, quantize_like_samples(want))
    assert not torch.equal(got, quantize_like_samples(both.detokenize(tokens, decoder="direct")))

    with pytest.raises(ValueError, match="decoders='direct'; cannot decode with 'flow'"):
        load_model("flextok", ckpt=flex_ckpts / "gpt.safetensors", vq_ckpt=flex_ckpts / "flextok.safetensors",
                   decoder="flow")
    with pytest.raises(ValueError, match="--decoder chooses a FlexTok decoder"):
        load_model("llamagen", decoder="flow")

    out = tmp_path / "out"
    rc = cli_main(["sample", "--model", "flextok", "--num-tokens", "3", "--decoder", "flow", "--decode-steps", "2",
                   "--ckpt", str(flex_ckpts / "gpt.safetensors"), "--vq-ckpt", str(tmp_path / "both.safetensors"),
                   "--classes", "0", "--out", str(out), "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    recorded = json.loads((out / "stats.json").read_text())["checkpoints"]
    assert recorded["decoder"] == "flow" and recorded["decode_steps"] == 2


def test_eval_shard_resumed_with_the_flow_decoder_gives_bit_identical_images(flex_ckpts, tmp_path, one_thread):
    """An eval job decodes each shard with the shard's generator, not the global RNG: a shard sampled again
    (a resumed job, whose process starts from another global RNG state) has the same flow-decoded images."""
    import numpy as np

    from genaccel.eval.job import DistInfo, SampleJob, prepare_job_dir, read_shard, release_job_lock, sample_shards

    both = random_tokenizer("both", seed=1)
    save_safetensors(both.state_dict(), tmp_path / "both.safetensors", metadata=export_metadata(both))
    pipe = load_model("flextok", ckpt=flex_ckpts / "gpt.safetensors", vq_ckpt=tmp_path / "both.safetensors",
                      decoder="flow", decode_steps=2)
    job, info = SampleJob(out_dir=str(tmp_path / "job"), num_images=4, batch_size=2), DistInfo()

    def run(global_seed: int) -> list:
        prepare_job_dir(job, info)
        torch.manual_seed(global_seed)
        sample_shards(pipe, build_sampler("ar"), job, info, progress=False)
        release_job_lock(job.out)
        return [read_shard(job, k)["images"] for k in range(job.num_shards)]

    first = run(0)
    job.shard_path(1).unlink()
    again = run(1)  # only shard 1 is missing: sampled and decoded again
    assert np.array_equal(again[1], first[1]) and np.array_equal(again[0], first[0])
    assert not np.array_equal(first[0], first[1])
