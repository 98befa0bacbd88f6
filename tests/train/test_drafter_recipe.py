"""Drafter recipe: the CFG-combined loss (``cfg_loss``) against its definition, and the recipe end to end."""

from __future__ import annotations

import json

import torch
from recipe_helpers import tiny_gpt_file

from genaccel.models.drafter import EagleDrafter, load_drafter
from genaccel.train import drafter as drafter_recipe


def test_cfg_loss_compares_guided_distributions_of_target_and_drafter(tmp_path):
    """With ``cfg_scale`` the acceptance and CE of ``drafter_loss`` are those of u + s (c - u) for the target and
    the drafter, each half run separately (a reference from the definition), and differ from the plain loss."""
    target = tiny_gpt_file(tmp_path).eval()
    torch.manual_seed(1)
    drafter = EagleDrafter.from_target(target).eval()
    tokens = torch.randint(0, target.vocab_size, (3, 16))
    labels = torch.tensor([0, 1, 2])
    with torch.no_grad():
        cond = target.teacher_forced(labels, tokens).hidden
        uncond = target.teacher_forced(torch.full_like(labels, target.null_class), tokens).hidden
        s = 2.5
        _, parts = drafter_recipe.drafter_loss(drafter, target, tokens, torch.cat([cond, uncond]), 0.0, 0.1, None, s)
        _, plain = drafter_recipe.drafter_loss(drafter, target, tokens, cond, 0.0, 0.1, None)

        def guided(fc, fu):
            return (fu + s * (fc - fu)).double()

        tc, tu = target.output(cond[:, 1:]).float(), target.output(uncond[:, 1:]).float()
        dc = drafter(tokens[:, :-1], cond[:, :-1]).logits
        du = drafter(tokens[:, :-1], uncond[:, :-1]).logits
        p, q = guided(tc, tu).softmax(-1), guided(dc, du).softmax(-1)
    assert abs(parts["accept"] - torch.minimum(p, q).sum(-1).mean().item()) < 1e-5
    assert abs(parts["ce"] - (-(p * q.log()).sum(-1).mean().item())) < 1e-4
    assert abs(parts["accept"] - plain["accept"]) > 1e-4


def test_drafter_recipe_with_cfg_loss_exports_a_loadable_drafter(tmp_path):
    tiny_gpt_file(tmp_path)
    out = tmp_path / "drafter"
    metrics = drafter_recipe.main([
        "--config", "configs/train/drafter.yaml", "--set", f"out_dir={out}",
        "--set", f"gpt_path={tmp_path / 'gpt.safetensors'}", "--set", f"tokens_path={tmp_path / 'tokens_train.pt'}",
        "--set", "real_sequences=6", "--set", "self_distill_images=2", "--set", "eval_sequences=2",
        "--set", "steps=3", "--set", "batch_size=2", "--set", "cfg_loss=true", "--set", "export_path=",
    ])
    assert metrics["steps"] == 3 and 0 < metrics["accept"] <= 1
    drafter = load_drafter(out / "drafter.safetensors")
    assert drafter.args.vocab_size == 24 and drafter.args.grid_size == 4
    record = json.loads((out / "drafter_metrics.json").read_text())
    assert record["recipe"]["cfg_loss"] is True
