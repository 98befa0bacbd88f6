"""CLI: a smoke run on a tiny random model through ``sample.py``, and one-line errors for bad input."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from genaccel.cli import main as cli_main
from genaccel.models.llamagen import ModelArgs, build_gpt
from genaccel.tokenizers.vq import build_vq
from genaccel.utils.io import save_safetensors

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    gpt = build_gpt(None, dim=64, n_layer=2, n_head=4, vocab_size=32, num_classes=3, block_size=16, multiple_of=32)
    for p in gpt.parameters():
        torch.nn.init.normal_(p, 0, 0.2)
    cfg = {k: getattr(gpt.args, k) for k in ModelArgs.field_names()}
    save_safetensors(gpt.state_dict(), d / "gpt.safetensors", metadata={"config": json.dumps(cfg)})
    vq = build_vq(None, ch=32, encoder_ch_mult=[1, 2, 2], decoder_ch_mult=[1, 2, 2], z_channels=32, codebook_size=32)
    torch.save({"model": vq.state_dict()}, d / "vq.pt")
    return d


def run_script(args, cwd):
    return subprocess.run([sys.executable, str(ROOT / "sample.py"), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_sample_script_writes_pngs_grid_and_stats(tiny_ckpts, tmp_path):
    out = tmp_path / "out"
    r = run_script(["--model", "llamagen", "--sampler", "ar", "--ckpt", str(tiny_ckpts / "gpt.safetensors"),
                    "--vq-ckpt", str(tiny_ckpts / "vq.pt"), "--classes", "0", "2", "--num-images", "5",
                    "--batch-size", "2", "--cfg-scale", "2.0", "--top-k", "8", "--seed", "3", "--out", str(out),
                    "--no-progress"], tmp_path)
    assert r.returncode == 0, r.stderr
    pngs = sorted(p.name for p in out.glob("0*.png"))
    assert pngs == ["00000_class0000.png", "00001_class0002.png", "00002_class0000.png", "00003_class0002.png",
                    "00004_class0000.png"]
    stats = json.loads((out / "stats.json").read_text())
    assert stats["num_images"] == 5 and stats["nfe_per_image"] == 16 and stats["options"]["top_k"] == 8
    from PIL import Image

    assert Image.open(out / "00000_class0000.png").size == (16, 16)
    assert (out / "grid.png").is_file()
    assert not list(out.glob("*.tmp"))


def test_same_seed_same_images(tiny_ckpts, tmp_path):
    common = ["--ckpt", str(tiny_ckpts / "gpt.safetensors"), "--vq-ckpt", str(tiny_ckpts / "vq.pt"),
              "--classes", "1", "--seed", "7", "--no-progress"]
    assert cli_main(["sample", *common, "--out", str(tmp_path / "a")]) == 0
    assert cli_main(["sample", *common, "--out", str(tmp_path / "b")]) == 0
    assert (tmp_path / "a/00000_class0001.png").read_bytes() == (tmp_path / "b/00000_class0001.png").read_bytes()


def test_sampler_specific_flags_reach_the_sampler(tiny_ckpts, tmp_path):
    out = tmp_path / "sjd"
    common = ["sample", "--ckpt", str(tiny_ckpts / "gpt.safetensors"), "--vq-ckpt", str(tiny_ckpts / "vq.pt"),
              "--classes", "1", "--no-progress"]
    assert cli_main(common + ["--sampler", "sjd", "--window", "4", "--out", str(out)]) == 0
    stats = json.loads((out / "stats.json").read_text())
    assert stats["options"]["window"] == 4 and stats["nfe_per_image"] < 16


@pytest.mark.parametrize("args,message", [
    (["--sampler", "ar", "--window", "4"], "option --window does not apply to sampler 'ar'"),
    (["--sampler", "sjd", "--window", "0"], "window must lie in"),
    (["--sampler", "nope"], "unknown sampler 'nope'; available:"),
    (["--classes", "9"], "class id 9 out of range"),
    (["--cfg-scale", "-1"], "cfg_scale must be >= 0"),
    (["--ckpt", "missing.pt"], "checkpoint not found: missing.pt"),
])
def test_bad_input_gives_one_clear_line(tiny_ckpts, tmp_path, capsys, args, message):
    base = ["sample", "--vq-ckpt", str(tiny_ckpts / "vq.pt"), "--no-progress", "--out", str(tmp_path / "o")]
    if "--ckpt" not in args:
        base += ["--ckpt", str(tiny_ckpts / "gpt.safetensors")]
    assert cli_main(base + args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_nar_official_layout_checkpoint_through_sample_script(tiny_ckpts, tmp_path):
    """`--model nar --ckpt last_version.pt` (official {"model": sd}, no stored config) samples with 2n-1 forwards;
    the nar sampler is the NAR family's default."""
    from genaccel.models.nar import build_nar

    torch.manual_seed(1)
    nar = build_nar(None, dim=64, n_layer=2, n_head=1, vocab_size=32, num_classes=3, block_size=16, multiple_of=32)
    for p in nar.parameters():
        torch.nn.init.normal_(p, 0, 0.2)
    torch.save({"model": nar.state_dict()}, tmp_path / "last_version.pt")
    out = tmp_path / "out"
    r = run_script(["--model", "nar", "--ckpt", str(tmp_path / "last_version.pt"), "--vq-ckpt", str(tiny_ckpts / "vq.pt"),
                    "--image-size", "16", "--classes", "0", "1", "2", "--batch-size", "2", "--top-k", "4",
                    "--out", str(out), "--no-progress"], tmp_path)
    assert r.returncode == 0, r.stderr
    stats = json.loads((out / "stats.json").read_text())
    assert stats["sampler"] == "nar" and stats["num_images"] == 3 and stats["nfe_per_image"] == 7
    assert len(list(out.glob("0*.png"))) == 3 and (out / "grid.png").is_file()
