"""FlexTok recipe in its two stages on minute settings: stage 2 copies stage 1, trains only the flow decoder,
keeps the tokens, and exports a tokenizer that loads strictly with both decoders."""

import pytest
import torch

from genaccel.tokenizers.flex import load_flextok
from genaccel.train import flextok as recipe

SMALL = ["--set", "width=32", "--set", "depth=1", "--set", "decoder_depth=1", "--set", "heads=2",
         "--set", "num_tokens=8", "--set", "batch_size=4", "--set", "eval_per_class=1", "--set", "steps=2",
         "--set", "eval_flow_images=4", "--set", "eval_flow_steps=1"]


def stage1(tmp_path):
    out = tmp_path / "stage1"
    recipe.main(["--config", "configs/train/flextok.yaml", "--set", f"out_dir={out}", *SMALL])
    return out / "flextok.safetensors"


def stage2_args(tmp_path, init):
    return ["--config", "configs/train/flextok_flow.yaml", "--set", f"out_dir={tmp_path / 'stage2'}",
            "--set", f"init_from={init}", "--set", "export_path=''", *SMALL]


def test_flow_stage_trains_only_the_flow_decoder_and_keeps_the_tokens(tmp_path):
    torch.manual_seed(0)
    init = stage1(tmp_path)
    first = load_flextok(init)
    assert first.args.decoders == "direct"
    metrics = recipe.main(stage2_args(tmp_path, init))
    assert metrics["steps"] == 2 and set(metrics["flow"]) and set(metrics["direct"])
    both = load_flextok(tmp_path / "stage2" / "flextok.safetensors")
    assert both.args.decoders == "both"
    after = both.state_dict()
    for key, value in first.state_dict().items():  # encoder, FSQ and direct decoder: bit-identical
        assert torch.equal(after[key], value), key
    # the velocity head starts at zero (adaLN-zero): it is non-zero only if the flow decoder was trained
    assert after["flow.to_velocity.weight"].abs().max() > 0
    images = torch.rand(3, 3, 64, 64) * 2 - 1
    assert torch.equal(first.tokenize(images), both.tokenize(images))


def test_flow_stage_rejects_a_mismatched_or_missing_init(tmp_path):
    with pytest.raises(SystemExit, match="not found"):
        recipe.main(stage2_args(tmp_path, tmp_path / "missing.safetensors"))
    init = stage1(tmp_path)
    with pytest.raises(SystemExit, match="disagrees with this config"):
        recipe.main(stage2_args(tmp_path, init) + ["--set", "num_tokens=16"])
    with pytest.raises(SystemExit, match="unknown part"):
        recipe.main(stage2_args(tmp_path, init) + ["--set", "frozen=[decoder]"])
    with pytest.raises(SystemExit, match="not in init_from"):  # freezing the new flow decoder would leave it random
        recipe.main(stage2_args(tmp_path, init) + ["--set", "frozen=[encoder, flow]"])
