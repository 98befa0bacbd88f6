"""CLI: a smoke run on a tiny random model through ``sample.py``, and one-line errors for bad input."""

import json
import os
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


def run_in_process(argv, monkeypatch, capsys) -> tuple[int, str, str]:
    """``python argv`` (``-m module ...`` or ``script.py ...``) run in this process by runpy, as the interpreter
    runs it: (exit status, stdout, stderr). It skips a subprocess's start-up (importing torch, ~5 s on one CPU
    thread); each entry kind still has one case run as a real subprocess. The status follows the interpreter:
    ``SystemExit(None)`` is 0, an int is itself, anything else is printed and gives 1."""
    import runpy
    import warnings

    target, args = (argv[1], argv[2:]) if argv[0] == "-m" else (argv[0], argv[1:])
    monkeypatch.setattr(sys, "argv", [target, *args])
    capsys.readouterr()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # runpy: "found in sys.modules" (imported by tests)
            if argv[0] == "-m":
                runpy.run_module(target, run_name="__main__", alter_sys=True)
            else:
                runpy.run_path(target, run_name="__main__")
        code = 0
    except SystemExit as e:
        code = 0 if e.code is None else e.code if isinstance(e.code, int) else 1
        if not isinstance(e.code, int) and e.code is not None:
            print(e.code, file=sys.stderr)
    out = capsys.readouterr()
    return code, out.out, out.err


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


def test_nar_official_layout_checkpoint_through_sample_script(tiny_ckpts, tmp_path, monkeypatch, capsys):
    """`--model nar --ckpt last_version.pt` (official {"model": sd}, no stored config) samples with 2n-1 forwards;
    the nar sampler is the NAR family's default. A custom size needs --n-head (shapes cannot tell it)."""
    from genaccel.models.nar import build_nar

    torch.manual_seed(1)
    nar = build_nar(None, dim=64, n_layer=2, n_head=1, vocab_size=32, num_classes=3, block_size=16, multiple_of=32)
    for p in nar.parameters():
        torch.nn.init.normal_(p, 0, 0.2)
    torch.save({"model": nar.state_dict()}, tmp_path / "last_version.pt")
    out = tmp_path / "out"
    common = ["--model", "nar", "--ckpt", str(tmp_path / "last_version.pt"), "--vq-ckpt", str(tiny_ckpts / "vq.pt")]
    monkeypatch.chdir(tmp_path)
    code, _, err = run_in_process([str(ROOT / "sample.py"), *common, "--image-size", "16", "--out", str(out)],
                                  monkeypatch, capsys)
    assert code == 2 and "pass --n-head H" in err
    r = run_script([*common, "--image-size", "16", "--n-head", "1", "--classes", "0", "1", "2", "--batch-size", "2",
                    "--top-k", "4", "--out", str(out), "--no-progress"], tmp_path)
    assert r.returncode == 0, r.stderr
    stats = json.loads((out / "stats.json").read_text())
    assert stats["sampler"] == "nar" and stats["num_images"] == 3 and stats["nfe_per_image"] == 7
    assert len(list(out.glob("0*.png"))) == 3 and (out / "grid.png").is_file()


# ----------------------------------------------------------------------------- issue #17: command line rough edges
def tiny_args(tiny_ckpts):
    return ["--ckpt", str(tiny_ckpts / "gpt.safetensors"), "--vq-ckpt", str(tiny_ckpts / "vq.pt"), "--no-progress"]


def one_error_line(capsys, *fragments):
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    for f in fragments:
        assert f in err, err
    return err


def test_sampler_config_names_the_sampler_and_typed_flags_win():
    from genaccel.cli import build_sample_parser, resolve_sampler, sampler_flag_specs, sampler_options

    lantern = str(ROOT / "configs/samplers/lantern.yaml")
    args = build_sample_parser().parse_args(["--sampler-config", lantern])
    file_opts = resolve_sampler(args)
    assert args.sampler == "lantern"  # the file's sampler: key, not the model's baseline 'ar'
    args = build_sample_parser().parse_args(["--sampler", "lantern", "--sampler-config", lantern,
                                             "--cfg-scale", "1.0", "--draft-len", "2"])
    opts = sampler_options(args, sampler_flag_specs(), resolve_sampler(args))
    assert opts["cfg_scale"] == 1.0 and opts["draft_len"] == 2 and opts["lantern_delta"] == 0.3
    assert file_opts["cfg_scale"] == 4.0
    assert file_opts["drafter_precision"] == "auto"
    args = build_sample_parser().parse_args(["--sampler", "sd", "--drafter-precision", "fp32"])
    assert sampler_options(args, sampler_flag_specs(), resolve_sampler(args))["drafter_precision"] == "fp32"


@pytest.mark.parametrize("precision,expect", [("auto", "int8"), ("fp32", "fp32")])
def test_stats_json_reports_what_drafter_precision_auto_became(tiny_ckpts, tmp_path, precision, expect):
    from genaccel.models.drafter import EagleDrafter, drafter_metadata
    from genaccel.models.loading import read_state_dict

    gpt = build_gpt(None, dim=64, n_layer=2, n_head=4, vocab_size=32, num_classes=3, block_size=16, multiple_of=32)
    gpt.load_state_dict(read_state_dict(tiny_ckpts / "gpt.safetensors")[0])
    drafter = EagleDrafter.from_target(gpt)
    save_safetensors(drafter.state_dict(), tmp_path / "drafter.safetensors", metadata=drafter_metadata(drafter.args))
    out = tmp_path / "o"
    assert cli_main(["sample", *tiny_args(tiny_ckpts), "--sampler", "sd", "--drafter", str(tmp_path / "drafter.safetensors"),
                     "--drafter-precision", precision, "--classes", "0", "1", "--out", str(out)]) == 0
    stats = json.loads((out / "stats.json").read_text())
    assert stats["options"]["drafter_precision"] == precision
    assert stats["resolved_options"] == {"drafter_precision": expect}


def test_sampler_config_end_to_end_flags_over_file(tiny_ckpts, tmp_path):
    cfg = tmp_path / "sjd.yaml"
    cfg.write_text("sampler: sjd\ncfg_scale: 3.0\ntop_k: 5\nwindow: 4\n")
    out = tmp_path / "o"
    assert cli_main(["sample", *tiny_args(tiny_ckpts), "--sampler-config", str(cfg), "--cfg-scale", "1.0",
                     "--classes", "0", "--out", str(out)]) == 0
    stats = json.loads((out / "stats.json").read_text())
    assert stats["sampler"] == "sjd" and stats["options"]["cfg_scale"] == 1.0
    assert stats["options"]["top_k"] == 5 and stats["options"]["window"] == 4


def test_continuous_batching_flag_streams_and_counts_the_stream(tiny_ckpts, tmp_path):
    """``--continuous-batching``: greedy images equal the batched run's (greedy speculative = greedy AR), and
    stats.json records the flag and counts forwards per batch slot of the stream, not the stream's total per
    image."""
    base = ["sample", *tiny_args(tiny_ckpts), "--sampler", "sjd", "--window", "4", "--temperature", "0",
            "--classes", "0", "1", "2", "--num-images", "7", "--batch-size", "3"]
    assert cli_main([*base, "--out", str(tmp_path / "b")]) == 0
    assert cli_main([*base, "--continuous-batching", "--out", str(tmp_path / "c")]) == 0
    for i, c in enumerate([0, 1, 2, 0, 1, 2, 0]):
        name = f"{i:05d}_class{c:04d}.png"
        assert (tmp_path / "b" / name).read_bytes() == (tmp_path / "c" / name).read_bytes(), name
    batched, stream = (json.loads((tmp_path / d / "stats.json").read_text()) for d in "bc")
    assert stream["continuous_batching"] and not batched["continuous_batching"]
    assert 1 < stream["batch_nfe_per_image"] < 16  # a stream of ~7 * 16 / compression forwards, spread over 3 rows
    assert stream["step_compression_batch"] == pytest.approx(16 / stream["batch_nfe_per_image"])
    assert stream["nfe_per_image"] <= stream["batch_nfe_per_image"] + 1e-9


def test_sampler_contradicting_the_config_file_is_one_error(tiny_ckpts, tmp_path, capsys):
    assert cli_main(["sample", *tiny_args(tiny_ckpts), "--sampler", "ar", "--sampler-config",
                     str(ROOT / "configs/samplers/lantern.yaml"), "--out", str(tmp_path / "o")]) == 2
    one_error_line(capsys, "--sampler ar contradicts 'sampler: lantern'")
    assert not (tmp_path / "o").exists()


def test_out_that_is_a_file_fails_before_sampling(tiny_ckpts, tmp_path, capsys, monkeypatch):
    import genaccel.pipeline

    monkeypatch.setattr(genaccel.pipeline, "load_model", lambda *a, **k: pytest.fail("sampled before checking --out"))
    (tmp_path / "f").write_text("x")
    assert cli_main(["sample", *tiny_args(tiny_ckpts), "--out", str(tmp_path / "f")]) == 2
    one_error_line(capsys, "is an existing file")
    assert cli_main(["sample", *tiny_args(tiny_ckpts), "--out", str(tmp_path / "f" / "sub")]) == 2
    one_error_line(capsys, "is a file, not a folder")


def test_unwritable_out_fails_before_sampling(tiny_ckpts, tmp_path, capsys, monkeypatch):
    import os

    import genaccel.pipeline

    monkeypatch.setattr(genaccel.pipeline, "load_model", lambda *a, **k: pytest.fail("sampled before checking --out"))
    if os.geteuid() == 0:  # root writes into read-only folders; /proc takes no new files
        target = Path("/proc/genaccel-test/out")
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        target = ro / "out"
    assert cli_main(["sample", *tiny_args(tiny_ckpts), "--out", str(target)]) == 2
    one_error_line(capsys, "cannot write to --out")


def test_previous_run_is_refused_then_replaced_with_overwrite(tiny_ckpts, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    for i in range(3):
        (out / f"{i:05d}_class0001.png").write_bytes(b"old")
    (out / "notes.txt").write_text("mine")
    base = ["sample", *tiny_args(tiny_ckpts), "--classes", "2", "--out", str(out)]
    assert cli_main(base) == 2
    one_error_line(capsys, "already holds a previous run", "--overwrite")
    assert cli_main(base + ["--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["00000_class0002.png", "grid.png", "notes.txt", "stats.json"]
    assert not list(tmp_path.glob(".*partial"))


def test_help_documents_overwrite_and_defaults():
    r = run_script(["--help"], ROOT)
    assert r.returncode == 0
    text = " ".join(r.stdout.split())
    for fragment in ["--overwrite", "(default: 4.0)", "0 = greedy", "(default: 8)", "(default: cpu)",
                     "(default: 0)", "refused unless --overwrite"]:
        assert fragment in text, fragment


def test_cuda_without_gpu_is_one_line(tiny_ckpts, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli_main(["sample", *tiny_args(tiny_ckpts), "--device", "cuda", "--out", str(tmp_path / "o")]) == 2
    one_error_line(capsys, "--device cuda", "use --device cpu")
    assert cli_main(["sample", *tiny_args(tiny_ckpts), "--device", "gpu0", "--out", str(tmp_path / "o")]) == 2
    one_error_line(capsys, "unknown --device 'gpu0'")


@pytest.mark.parametrize("args,message", [
    (["--gpt-model", "GPT-Q"], "unknown --gpt-model 'GPT-Q' for --model llamagen; available: GPT-B"),
    (["--gpt-model", "GPT-B"], "--gpt-model GPT-B applies only with --ckpt"),
    (["--model", "nar", "--gpt-model", "NAR-Q"], "unknown --gpt-model 'NAR-Q' for --model nar"),
])
def test_gpt_model_with_the_bundled_model_is_not_ignored(tmp_path, capsys, args, message):
    assert cli_main(["sample", "--no-progress", "--out", str(tmp_path / "o"), *args]) == 2
    one_error_line(capsys, message)


def test_checkpoint_of_the_wrong_kind_names_the_problem(tiny_ckpts, tmp_path, capsys):
    gpt, vq = str(tiny_ckpts / "gpt.safetensors"), str(tiny_ckpts / "vq.pt")
    assert cli_main(["sample", "--ckpt", gpt, "--vq-ckpt", gpt, "--out", str(tmp_path / "o")]) == 2
    err = one_error_line(capsys, "is not a VQ tokenizer (--vq-ckpt) checkpoint", "pass it as --ckpt")
    assert "unexpected keyword" not in err
    from genaccel.models import BUNDLED

    assert cli_main(["sample", "--ckpt", str(BUNDLED["vq"]), "--vq-ckpt", vq, "--out", str(tmp_path / "o")]) == 2
    one_error_line(capsys, "is not a generator (--ckpt) checkpoint", "pass it as --vq-ckpt")


def test_pickled_args_checkpoint_is_one_plain_line(tiny_ckpts, tmp_path, capsys):
    import argparse

    from genaccel.models import CheckpointError
    from genaccel.models.loading import read_state_dict

    gpt = build_gpt(None, dim=64, n_layer=2, n_head=4, vocab_size=32, num_classes=3, block_size=16, multiple_of=32)
    torch.save({"model": gpt.state_dict(), "args": argparse.Namespace(lr=1e-4)}, tmp_path / "train.pt")
    with pytest.raises(CheckpointError) as e:
        read_state_dict(tmp_path / "train.pt")
    msg = str(e.value)
    assert "\x1b[" not in msg and "\n" not in msg and "argparse.Namespace" in msg and "plain state dict" in msg
    assert cli_main(["sample", "--ckpt", str(tmp_path / "train.pt"), "--vq-ckpt", str(tiny_ckpts / "vq.pt"),
                     "--out", str(tmp_path / "o")]) == 2
    one_error_line(capsys, "weights_only=True")
    # the README's conversion recipe turns it into a file that loads
    obj = torch.load(tmp_path / "train.pt", map_location="cpu", weights_only=False)
    torch.save(obj["model"], tmp_path / "plain.pt")
    assert set(read_state_dict(tmp_path / "plain.pt")[0]) == set(gpt.state_dict()) - {"freqs_cis"}


def test_top_level_help_lists_commands_and_unknown_command_is_named(monkeypatch, capsys):
    code, out, _ = run_in_process(["-m", "genaccel", "--help"], monkeypatch, capsys)
    assert code == 0 and "sample" in out and "benchmarks" in out and "training" in out
    r = subprocess.run([sys.executable, "-m", "genaccel", "foo"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "unknown command 'foo'" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("argv", [["train", "--help"], ["bench", "--help"], ["train", "-h"]])
def test_train_and_bench_help_exit_zero(argv, capsys):
    assert cli_main(argv) == 0
    out = capsys.readouterr().out
    assert "usage:" in out and ("vq" in out or "samplers" in out)


def test_bench_sections_is_not_a_benchmark(capsys):
    from genaccel.bench.__main__ import available
    from genaccel.bench.__main__ import main as bench_main

    assert "sections" not in available() and "samplers" in available()
    with pytest.raises(SystemExit) as e:
        bench_main(["sections", "--help"])
    assert e.value.code == 2 and "unknown benchmark 'sections'" in capsys.readouterr().err
    assert cli_main(["train", "nope"]) == 2 and "unknown training recipe 'nope'" in capsys.readouterr().err


def test_ctrl_c_during_sampling_is_one_line_exit_130_and_writes_nothing(tiny_ckpts, tmp_path, capsys, monkeypatch):
    from genaccel.pipeline import ImagePipeline

    real = ImagePipeline.generate_batches

    def interrupted(self, *a, **k):
        for i, item in enumerate(real(self, *a, **k)):
            if i == 1:
                raise KeyboardInterrupt
            yield item

    monkeypatch.setattr(ImagePipeline, "generate_batches", interrupted)
    out = tmp_path / "o"
    assert cli_main(["sample", *tiny_args(tiny_ckpts), "--classes", "0", "1", "2", "--batch-size", "1",
                     "--out", str(out)]) == 130
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "interrupted after 1 of 3 images" in err and "Traceback" not in err
    assert not out.exists() and not list(tmp_path.iterdir())


def test_ctrl_c_while_writing_leaves_no_half_run(tmp_path, monkeypatch):
    import genaccel.utils.io as io
    from genaccel.cli import write_outputs

    calls = {"n": 0}
    real = io.save_image

    def flaky(img, path):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(img, path)

    monkeypatch.setattr(io, "save_image", flaky)
    images = torch.zeros(3, 8, 8, 3, dtype=torch.uint8)
    with pytest.raises(KeyboardInterrupt):
        write_outputs(tmp_path / "o", images, torch.tensor([0, 1, 2]), {"x": 1})
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------- issue #17 item 7: one set of conventions
def test_dtype_takes_both_spellings_everywhere_and_keeps_the_short_one():
    from genaccel.bench.samplers import parse_args as bench_samplers_args
    from genaccel.cli import build_sample_parser
    from genaccel.eval.__main__ import build_parser as build_eval_parser
    from genaccel.eval.throughput import environment

    assert build_sample_parser().parse_args(["--dtype", "bfloat16"]).dtype == "bf16"
    assert build_sample_parser().parse_args(["--dtype", "fp16"]).dtype == "fp16"
    eval_sample = ["sample", "--out", "o", "--num-images", "1"]
    assert build_eval_parser().parse_args([*eval_sample, "--dtype", "bf16"]).dtype == "bf16"
    assert build_eval_parser().parse_args([*eval_sample, "--dtype", "float32"]).dtype == "fp32"
    assert build_eval_parser().parse_args(["throughput", "--out", "o.json"]).dtype == "fp32"  # the default
    assert bench_samplers_args(["--dtype", "bfloat16"]).dtype == "bf16"
    with pytest.raises(SystemExit) as e:
        bench_samplers_args(["--dtype", "fp16"])  # this benchmark runs fp32 and bf16 only
    assert e.value.code == 2
    assert environment("cpu", torch.bfloat16)["dtype"] == "bf16"


def test_dtype_help_lists_the_short_names_and_the_accepted_aliases(capsys):
    from genaccel.bench.forward import main as bench_forward_main
    from genaccel.cli import build_sample_parser

    for show_help in (lambda: build_sample_parser().parse_args(["--help"]), lambda: bench_forward_main(["--help"])):
        with pytest.raises(SystemExit) as e:
            show_help()
        assert e.value.code == 0
        text = " ".join(capsys.readouterr().out.split())
        assert "{fp32,bf16,fp16}" in text and "(float32, bfloat16, float16 also accepted)" in text


def eval_args(*argv: str):
    from genaccel.eval.__main__ import build_parser

    return build_parser().parse_args(["sample", "--out", "o", "--num-images", "1", *argv])


def test_eval_takes_sample_py_sampler_flags_and_keeps_opt_as_alias(tmp_path):
    from genaccel.cli import UsageError
    from genaccel.eval.__main__ import sampler_options_given

    a = eval_args("--sampler", "sjd", "--cfg-scale", "2.0", "--top-k", "5", "--temperature", "0", "--window", "4")
    assert sampler_options_given(a) == {"cfg_scale": 2.0, "top_k": 5, "temperature": 0.0, "window": 4}
    a = eval_args("--opt", "cfg_scale=2.0", "--top-p", "0.9")
    assert a.sampler is None and sampler_options_given(a) == {"cfg_scale": 2.0, "top_p": 0.9}
    assert a.sampler == "ar"  # the model's baseline, as in sample.py
    cfg = tmp_path / "gsd.yaml"
    cfg.write_text("sampler: gsd\ncfg_scale: 3.0\ngroup_size: 50\n")
    a = eval_args("--sampler-config", str(cfg), "--cfg-scale", "1.5")
    assert sampler_options_given(a) == {"cfg_scale": 1.5, "group_size": 50} and a.sampler == "gsd"
    with pytest.raises(UsageError, match=r"option --window does not apply to sampler 'ar'"):
        sampler_options_given(eval_args("--window", "4"))
    with pytest.raises(UsageError, match=r"\['cfg_scale'\] given twice"):
        sampler_options_given(eval_args("--cfg-scale", "2.0", "--opt", "cfg_scale=3.0"))


def test_eval_sample_end_to_end_records_flags_canonical_dtype_and_absolute_paths(tiny_ckpts, tmp_path, monkeypatch):
    from genaccel.eval.__main__ import main as eval_main

    monkeypatch.chdir(tiny_ckpts)
    out = tmp_path / "job"
    argv = ["sample", "--out", str(out), "--num-images", "2", "--batch-size", "2", "--metrics", "none",
            "--no-progress", "--threads", "1", "--ckpt", "gpt.safetensors", "--vq-ckpt", "vq.pt",
            "--dtype", "float32", "--sampler", "sjd", "--window", "4", "--cfg-scale", "2.0", "--top-k", "5"]
    run = eval_main(argv)
    assert run["sampler"]["options"]["window"] == 4 and run["sampler"]["options"]["cfg_scale"] == 2.0
    assert run["sampler"]["options"]["top_k"] == 5
    assert run["model"]["gpt"] == str(tiny_ckpts / "gpt.safetensors") and run["samples"] == str(out / "samples.npz")
    assert run["job"]["model"]["vq_ckpt"] == str(tiny_ckpts / "vq.pt") and run["job"]["model"]["dtype"] == "fp32"
    assert run["environment"]["dtype"] == "fp32"
    # the same job typed another way resumes: the other dtype spelling, the checkpoint by its absolute path,
    # and a job.json written before this convention (path as typed, dtype 'float32')
    job_file = out / "job.json"
    old = json.loads(job_file.read_text())
    old["model"].update(ckpt="gpt.safetensors", vq_ckpt="vq.pt", dtype="float32")
    job_file.write_text(json.dumps(old))
    again = [*argv[:argv.index("--ckpt")], "--ckpt", str(tiny_ckpts / "gpt.safetensors"), "--vq-ckpt", "vq.pt",
             "--dtype", "fp32", *argv[argv.index("--sampler"):]]
    assert eval_main(again)["speed"]["resumed_shards"] == 1


def test_eval_continuous_batching_is_part_of_the_job(tiny_ckpts, tmp_path, monkeypatch):
    """``genaccel eval sample --continuous-batching`` streams the shards, records it in job.json, resumes with
    it, and refuses to resume the job without it (the images would come from other draws)."""
    from genaccel.eval.__main__ import main as eval_main

    monkeypatch.chdir(tiny_ckpts)
    out = tmp_path / "job"
    argv = ["sample", "--out", str(out), "--num-images", "6", "--batch-size", "2", "--metrics", "none",
            "--no-progress", "--threads", "1", "--ckpt", "gpt.safetensors", "--vq-ckpt", "vq.pt",
            "--sampler", "sjd", "--window", "4", "--continuous-batching"]
    run = eval_main(argv)
    assert run["job"]["continuous_batching"] is True
    shards = sorted((out / "shards").glob("*.npz"))
    assert len(shards) == 3
    shards[-1].unlink()
    assert eval_main(argv)["speed"]["resumed_shards"] == 2
    with pytest.raises(SystemExit, match=r"fields differ: \['continuous_batching'\]"):
        eval_main([a for a in argv if a != "--continuous-batching"])


def test_bench_samplers_takes_the_shared_flags_and_keeps_set_per_run():
    from genaccel.bench.samplers import parse_args, sampler_options
    from genaccel.cli import sampler_flag_specs, typed_sampler_flags

    a = parse_args(["--samplers", "ar,sjd,zipar", "--temperature", "0", "--window", "4", "--cfg-scale", "2",
                    "--set", "sjd.window=8"])
    runs = {"ar": "ar", "sjd": "sjd", "zipar": "zipar"}
    opts = sampler_options(a.set, runs, typed_sampler_flags(a, sampler_flag_specs()))
    assert opts["ar"] == {"cfg_scale": 2.0, "temperature": 0.0}  # ar has no window: not given one
    assert opts["zipar"] == {"cfg_scale": 2.0, "temperature": 0.0, "window": 4}
    assert opts["sjd"]["window"] == 8  # --set wins for its run
    a = parse_args(["--samplers", "ar,sjd", "--draft-len", "2"])
    with pytest.raises(SystemExit, match="option --draft-len applies to none of the runs"):
        sampler_options(a.set, {"ar": "ar", "sjd": "sjd"}, typed_sampler_flags(a, sampler_flag_specs()))


def test_bench_eval_passes_the_shared_flags_on_and_checks_them_first():
    from genaccel.bench.eval import eval_command, parse_args
    from genaccel.cli import UsageError

    a = parse_args(["--sampler", "sjd", "--cfg-scale", "2.0", "--window", "4", "--opt", "top_k=5"])
    cmd = eval_command(1, 1, Path("o"), a)
    assert cmd[cmd.index("--cfg-scale") + 1] == "2.0" and cmd[cmd.index("--window") + 1] == "4"
    assert cmd[cmd.index("--opt") + 1] == "top_k=5"
    with pytest.raises(UsageError, match="--window does not apply to sampler 'ar'"):
        parse_args(["--window", "4"])


def test_bench_quality_takes_cfg_scale_and_keeps_cfg(capsys):
    from genaccel.bench.quality import main as quality_main

    with pytest.raises(SystemExit):
        quality_main(["--help"])
    assert "--cfg-scale CFG [CFG ...], --cfg CFG [CFG ...]" in capsys.readouterr().out


def test_sample_records_absolute_checkpoint_paths_like_the_bundled_ones(tiny_ckpts, tmp_path, monkeypatch):
    monkeypatch.chdir(tiny_ckpts)
    out = tmp_path / "o"
    assert cli_main(["sample", "--ckpt", "gpt.safetensors", "--vq-ckpt", "./vq.pt", "--classes", "0", "--no-progress",
                     "--dtype", "float32", "--out", str(out)]) == 0
    stats = json.loads((out / "stats.json").read_text())
    assert stats["checkpoints"]["gpt"] == str(tiny_ckpts / "gpt.safetensors")
    assert stats["checkpoints"]["vq"] == str(tiny_ckpts / "vq.pt") and stats["dtype"] == "fp32"
    from genaccel.pipeline import load_model

    assert Path(load_model("llamagen").info["gpt"]).is_absolute()  # bundled: absolute too


def test_report_records_absolute_paths(tmp_path, monkeypatch):
    from genaccel.eval.report import RUN_SCHEMA, build_report

    monkeypatch.chdir(tmp_path)
    Path("a.json").write_text(json.dumps({"schema": RUN_SCHEMA, "name": "ar", "sampler": {"name": "ar"},
                                          "speed": {"images_per_s": 2.0}, "metrics": {"fd_domain": 1.0}}))
    report = build_report(["*.json"], Path("rep/r"))
    assert report["runs"] == [str(tmp_path / "a.json")] and report["plot"] == str(tmp_path / "rep/r.png")


@pytest.mark.parametrize("argv,message", [
    (["eval", "metrics", "missing.npz"], "image set not found: missing.npz"),
    (["report", "missing.json", "--out", "r"], "run file(s) not found: missing.json"),
    (["train", "gpt", "--config", "missing.yaml"], "config file not found: missing.yaml"),
    (["train", "gpt", "--set", "lr_typo=1"], "unknown field 'lr_typo'"),
    (["bench", "samplers", "--threads", "1", "--samplers", "x=nope"], "unknown sampler 'nope'"),
    (["eval", "sample", "--out", "o", "--num-images", "1", "--window", "4"], "--window does not apply to sampler 'ar'"),
])
def test_bad_input_exits_2_with_one_line_in_every_command(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    try:
        assert cli_main(argv) == 2
    finally:
        torch.set_num_threads(threads)
    one_error_line(capsys, message)
    assert not list(tmp_path.iterdir())  # nothing written


def test_run_command_exit_statuses():
    import errno

    from genaccel.cli import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, run_command

    def raising(exc):
        def fn(argv):
            raise exc

        return fn

    assert (EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED) == (0, 1, 2, 130)
    assert run_command(lambda argv: None, []) == 0
    assert run_command(raising(SystemExit(0)), []) == 0  # --help
    assert run_command(raising(SystemExit(2)), []) == 2  # argparse's usage error
    assert run_command(raising(SystemExit("unknown field 'x'")), []) == 2
    assert run_command(raising(FileNotFoundError("no such file")), []) == 2
    assert run_command(raising(OSError(errno.ENOSPC, "No space left on device")), []) == 1
    assert run_command(raising(RuntimeError("CUDA out of memory")), []) == 1
    assert run_command(raising(KeyboardInterrupt()), []) == 130


@pytest.mark.parametrize("argv, subprocess_run", [
    (["-m", "genaccel.eval", "metrics", "missing.npz"], True),
    (["-m", "genaccel.train", "gpt", "--config", "missing.yaml"], False),
    (["-m", "genaccel.train"], False),
    (["-m", "genaccel.eval.report", "missing.json"], False),
])
def test_module_entry_points_exit_2_on_bad_input(argv, subprocess_run, tmp_path, monkeypatch, capsys):
    """Exit status 2 and a one-line error; one entry point as a real ``python -m`` subprocess, the others run
    in-process by runpy (an uncaught exception there fails the test instead of printing a traceback)."""
    if subprocess_run:
        r = subprocess.run([sys.executable, *argv], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
        code, err = r.returncode, r.stderr
    else:
        monkeypatch.chdir(tmp_path)
        code, _, err = run_in_process(argv, monkeypatch, capsys)
    assert code == 2, err
    assert "Traceback" not in err and err.startswith(("error: ", "usage: ")), err
