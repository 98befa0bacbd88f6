"""Token-Shuffle recipe on minute settings: a fake token cache, 3 steps, resume, strict reload of the export."""

from __future__ import annotations

import json

import pytest
import torch
from recipe_helpers import GRID, VOCAB, save_gpt, write_fake_token_cache
from safetensors import safe_open

from genaccel.data.skimage_crops import NUM_CLASSES
from genaccel.models.llamagen import build_gpt
from genaccel.models.token_shuffle import TokenShuffleArgs, load_token_shuffle
from genaccel.train import token_shuffle as recipe

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_args(out_dir, *extra: str) -> list[str]:
    sets = [f"out_dir={out_dir}", "gpt_path=''", "export_path=''", "dim=32", "n_layer=1", "n_head=2",
            "multiple_of=32", "batch_size=4", "steps=3", "warmup=1", "threads=1", "log_every=1", "ckpt_every=1",
            *extra]
    return ["--config", "configs/train/token_shuffle.yaml", *[a for s in sets for a in ("--set", s)]]


def test_three_steps_resume_and_export_loads_strictly(tmp_path):
    write_fake_token_cache(tmp_path)
    first = recipe.main(tiny_args(tmp_path, "stop_at=1"))
    assert first["steps"] == 1 and first["positions"] == 4 and first["tokens_per_position"] == 4
    second = recipe.main(tiny_args(tmp_path))  # resumes from last.pt and finishes the 3-step schedule
    assert second["steps"] == 3 and second["heldout_nll_nats"] > 0
    assert "resumed from" in (tmp_path / "train.log").read_text()

    path = tmp_path / "token_shuffle.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        assert all(f.get_tensor(k).dtype == torch.float16 for k in f.keys())
    assert (meta["family"], meta["tokens_per_position"], meta["shuffle_window"]) == ("token-shuffle", "4", "2")
    model = load_token_shuffle(path)
    assert (model.grid_size, model.num_positions, model.args.dim, model.vocab_size) == (GRID, 4, 32, VOCAB)
    recorded = json.loads((tmp_path / "token_shuffle_metrics.json").read_text())
    assert recorded["config"]["token_shuffle"] == {"window": 2, "shuffle_blocks": 2, "unshuffle_blocks": 2,
                                                  "intra_window_head": False}
    assert recorded["metrics"]["steps"] == 3


def tiny_gpt_file(tmp_path):
    gpt = build_gpt(None, dim=32, n_layer=1, n_head=2, vocab_size=VOCAB, num_classes=NUM_CLASSES,
                    block_size=GRID * GRID, multiple_of=32)
    gpt.init_weights(torch.Generator().manual_seed(1))
    return gpt, save_gpt(gpt, tmp_path / "gpt.safetensors")


def test_backbone_is_copied_from_the_gpt_and_shuffle_modules_are_fresh(tmp_path):
    gpt, _ = tiny_gpt_file(tmp_path)
    model = recipe.token_shuffle_from_gpt(gpt, TokenShuffleArgs(window=2), torch.Generator().manual_seed(0))
    ours = model.state_dict()
    for key, value in gpt.state_dict().items():
        assert torch.equal(ours[key], value)
    assert all(torch.count_nonzero(b.down.weight) == 0 for b in [*model.shuffle_mlps, *model.unshuffle_mlps])
    assert torch.count_nonzero(model.shuffle_proj.weight) > 0 and torch.count_nonzero(model.unshuffle_proj.weight) > 0


def test_one_step_from_a_gpt_backbone(tmp_path):
    write_fake_token_cache(tmp_path)
    _, gpt_path = tiny_gpt_file(tmp_path)
    metrics = recipe.main(tiny_args(tmp_path, f"gpt_path={gpt_path}", "steps=1"))
    assert metrics["steps"] == 1
    assert "backbone from" in (tmp_path / "train.log").read_text()


def test_budget_over_55_minutes_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="exceeds the 55-minute budget"):
        recipe.main(tiny_args(tmp_path, "max_minutes=60"))


def test_a_gpt_initialises_a_model_with_4x_the_tokens_in_its_own_positions(tmp_path):
    """The 128x128 recipe: a GPT on n x n tokens gives the backbone of a (2n x 2n)-token, s = 2 model whose
    n x n coarse grid is the GPT's grid (same RoPE table), and shuffle modules copy from another export."""
    gpt, _ = tiny_gpt_file(tmp_path)
    gen = torch.Generator().manual_seed(0)
    big = recipe.token_shuffle_from_gpt(gpt, TokenShuffleArgs(window=2), gen, block_size=4 * GRID * GRID)
    assert (big.grid_size, big.num_positions) == (2 * GRID, GRID * GRID)
    assert torch.equal(big.freqs_cis, gpt.freqs_cis)
    donor = recipe.token_shuffle_from_gpt(gpt, TokenShuffleArgs(window=2), torch.Generator().manual_seed(9))
    for block in donor.shuffle_mlps:
        torch.nn.init.normal_(block.down.weight, generator=gen)
    recipe.copy_shuffle_modules(donor, big)
    for key, value in donor.state_dict().items():
        if key.startswith(recipe.SHUFFLE_PREFIXES):
            assert torch.equal(big.state_dict()[key], value)
    with pytest.raises(SystemExit, match="must match"):
        recipe.copy_shuffle_modules(
            recipe.token_shuffle_from_gpt(gpt, TokenShuffleArgs(window=1), gen), big)


def test_image_size_other_than_64_or_128_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="image_size must be 64 or 128"):
        recipe.main(tiny_args(tmp_path, "image_size=96"))


def test_fewer_blocks_take_the_donors_first_ones_and_a_new_head_stays_fresh(tmp_path):
    gpt, _ = tiny_gpt_file(tmp_path)
    gen = torch.Generator().manual_seed(0)
    donor = recipe.token_shuffle_from_gpt(gpt, TokenShuffleArgs(window=2), gen)  # 2 + 2 blocks, no head
    for prm in donor.parameters():
        torch.nn.init.normal_(prm, generator=gen)
    small = recipe.token_shuffle_from_gpt(
        gpt, TokenShuffleArgs(window=2, shuffle_blocks=1, unshuffle_blocks=1, intra_window_head=True), gen)
    fresh = recipe.copy_shuffle_modules(donor, small)
    assert fresh and all(k.startswith("intra_window.") for k in fresh)
    for key, value in small.state_dict().items():
        if key.startswith(recipe.SHUFFLE_PREFIXES[:4]):
            assert torch.equal(value, donor.state_dict()[key])  # projections and block 0 of each side
    assert not small.intra_window.down.weight.any()  # the head starts as the identity


def test_intra_window_head_recipe_trains_both_objectives_and_exports_the_head(tmp_path):
    write_fake_token_cache(tmp_path)
    metrics = recipe.main(tiny_args(tmp_path, "intra_window_head=true", "shuffle_blocks=1", "unshuffle_blocks=1"))
    assert metrics["heldout_sequential_nll_nats"] is not None
    model = load_token_shuffle(tmp_path / "token_shuffle.safetensors")
    assert model.intra_window is not None and model.intra_window.down.weight.abs().sum() > 0  # it was trained
    assert len(model.shuffle_mlps) == 1 and len(model.unshuffle_mlps) == 1
