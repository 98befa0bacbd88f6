"""The "global attention" signal (attention received, mean over heads and queries) on every tower, against
attention weights the towers themselves compute in eager mode, and the `global-attention` strategy."""

from __future__ import annotations

import importlib

import pytest
import tiny_vlms
import torch

from genaccel import pruning
from genaccel.pruning.signals import received_attention


class Recorder(pruning.Strategy):
    """Keeps everything and records each image's global-attention signal (a test probe, not a rule)."""

    name = "recorder"
    needs = frozenset({"global_attention"})

    def __init__(self):
        self.seen = []

    def select(self, signals, budget, preselected, generator):
        self.seen.append(signals.global_attention.clone())
        return pruning.Selection(keep=torch.arange(signals.n_tokens))


def recorded(model, inputs, **options) -> list[torch.Tensor]:
    recorder = Recorder()
    with pruning.apply(model, recorder, keep=1.0, **options), torch.no_grad():
        model(**inputs)
    return recorder.seen


def test_received_attention_is_the_mean_attention_row_in_float64():
    generator = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 7, 4, generator=generator), torch.randn(2, 3, 7, 4, generator=generator)
    weights = ((q.double() @ k.double().transpose(-1, -2)) * 0.5).softmax(-1)
    expected = weights.mean(dim=(1, 2))
    got = received_attention(q, k, 0.5, chunk=3)  # chunking over queries must not change the result
    torch.testing.assert_close(got.double(), expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got.sum(-1), torch.ones(2))


def test_clip_global_attention_equals_eager_attention_weights(llava_eager):
    inputs = tiny_vlms.llava_inputs([1, 1])
    with torch.no_grad():
        out = llava_eager.model.vision_tower(inputs["pixel_values"], output_attentions=True)
    layer = llava_eager.config.vision_feature_layer  # -2: hidden_states[-2] is the output of layer L-2
    weights = out.attentions[layer if layer < 0 else layer - 1]
    expected = weights.mean(dim=(1, 2))[:, 1:]  # received by each patch, [CLS] counted as a query
    for got, want in zip(recorded(llava_eager, inputs), expected):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


@pytest.fixture
def eager_vision_weights(monkeypatch):
    """Run the Qwen vision towers in eager mode and record every attention-weight block they compute."""
    seen = []

    def patch(module_name, model):
        module = importlib.import_module(module_name)
        original = module.eager_attention_forward

        def recording(*args, **kwargs):
            output, weights = original(*args, **kwargs)
            seen.append(weights.detach())
            return output, weights

        monkeypatch.setattr(module, "eager_attention_forward", recording)
        monkeypatch.setattr(model.model.visual.config, "_attn_implementation", "eager")
        return seen

    return patch


@pytest.mark.parametrize("family", ["qwen2vl", "qwen25vl"])
def test_qwen_global_attention_equals_the_last_blocks_eager_weights_merged_2x2(request, eager_vision_weights, family):
    model = request.getfixturevalue(family)
    module = f"transformers.models.{'qwen2_vl' if family == 'qwen2vl' else 'qwen2_5_vl'}.modeling_{family[:-2]}_vl"
    module = module.replace("qwen25_vl", "qwen2_5_vl")
    seen = eager_vision_weights(module, model)
    inputs = tiny_vlms.qwen2vl_inputs([[(1, 8, 8)], [(1, 8, 12)]])
    with torch.no_grad():  # window order -> token order, read off the tower: merger rows vs its final output
        merged = {}
        handle = model.model.visual.merger.register_forward_hook(lambda m, a, out: merged.setdefault("rows", out))
        final = model.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
        handle.remove()
    final = final.pooler_output if hasattr(final, "pooler_output") else final
    order = torch.cdist(final.float(), merged["rows"].float()).argmin(dim=1)  # token i = window row order[i]
    blocks = seen[-2:]  # the last block's two per-image attention blocks
    received = torch.cat([w[0].mean(dim=(0, 1)) for w in blocks])
    expected = received.view(-1, 4).mean(dim=1)[order]
    seen.clear()
    got = torch.cat(recorded(model, inputs))
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def test_onevision_global_attention_is_packed_like_the_features(llava_onevision):
    """SigLIP eager weights: the base crop's tokens (the first 64 of each image, row-major) carry its received
    attention; the packed vector has one score per non-newline token and no NaN reaches a strategy."""
    model = llava_onevision
    inputs = tiny_vlms.llava_onevision_inputs(model, [(32, 64), (64, 64)])
    model.model.vision_tower.config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            bases = inputs["pixel_values"][:, 0]
            out = model.model.vision_tower(bases, output_attentions=True)
        got = recorded(model, inputs)
    finally:
        model.model.vision_tower.config._attn_implementation = "sdpa"
    expected = out.attentions[-1].mean(dim=(1, 2))  # vision_feature_layer -1: the last layer
    for scores, base in zip(got, expected):
        assert not bool(scores.isnan().any())
        torch.testing.assert_close(scores[:64], base, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("family", ["qwen25vl", "llava_onevision", "llava"])
def test_global_attention_strategy_keeps_the_top_received_tokens_of_every_span(request, family):
    model = request.getfixturevalue(family)
    inputs = {
        "qwen25vl": tiny_vlms.qwen2vl_image_and_video,
        "llava_onevision": lambda: tiny_vlms.llava_onevision_inputs(model, [(32, 64), (64, 64)], frames=2),
        "llava": lambda: tiny_vlms.llava_inputs([1, 2]),
    }[family]()
    scores = recorded(model, inputs)
    with pruning.apply(model, "global-attention", keep=0.25) as session, torch.no_grad():
        model(**inputs)
    spans = session.reports[-1].spans
    assert len(spans) == len(scores)
    for span, score in zip(spans, scores):
        budget = round(0.25 * score.numel())
        expected = set(span.prunable[torch.topk(score, budget).indices].tolist())
        assert set(span.selected.tolist()) == expected


def test_cls_strategies_point_to_global_attention_on_towers_without_cls(qwen2vl):
    with pytest.raises(ValueError, match="no \\[CLS\\] token\\); use global-attention"):
        with pruning.apply(qwen2vl, "fastervlm"):
            pass
    assert pruning.build_strategy("global").name == "global-attention"
