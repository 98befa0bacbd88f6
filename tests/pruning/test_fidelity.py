"""Official behaviour on a real (tiny) model: what our session feeds the LLM against each method's own
definition, recomputed here from the model's tensors the way the official code obtains them."""

from __future__ import annotations

import pytest
import torch
from test_strategies import reference_dart_official
from tiny_vlms import build_llava, llava_inputs, llava_next_inputs

from genaccel import pruning
from genaccel.pruning.adapters import adapter_for


def layer_input(model, layer: int):
    """A pre-hook registered after the session's, so it sees what decoder layer `layer` really receives."""
    seen = {}

    def hook(module, args, kwargs):
        seen["hidden"] = (args[0] if args else kwargs["hidden_states"]).detach().clone()

    return seen, model.model.language_model.layers[layer].register_forward_pre_hook(hook, with_kwargs=True)


def visionzip_reference_tokens(model, pixel_values, dominant: int, contextual: int) -> torch.Tensor:
    """VisionZip's `CLIPVisionTower_VisionZip.forward` + projector for one image: eager CLIP with attention
    output at layer -2, metric = head-mean raw keys of that layer, hidden_states[-2] with [CLS]."""
    tower = model.model.vision_tower
    layer = tower.encoder.layers[-2].self_attn
    keys = {}
    handle = layer.k_proj.register_forward_hook(lambda m, a, out: keys.setdefault("k", out))
    with torch.no_grad():
        out = tower(pixel_values, output_hidden_states=True, output_attentions=True)
    handle.remove()
    heads = tower.config.num_attention_heads
    hidden = out.hidden_states[-2][0]  # [1 + N, Dv]
    metric = keys["k"][0].view(hidden.shape[0], heads, -1).mean(1)
    attention = out.attentions[-2][0, :, 0, 1:].sum(0)  # CLS row summed over heads
    top = (attention.topk(dominant - 1).indices + 1).tolist()
    keep = [0, *sorted(top)]
    rest = [i for i in range(hidden.shape[0]) if i not in keep]
    normed = metric[rest] / metric[rest].norm(dim=-1, keepdim=True)
    step = max(1, len(rest) // contextual)
    targets = list(range(0, len(rest), step))[:contextual]
    others = [j for j in range(len(rest)) if j not in targets]
    owner = (normed[others] @ normed[targets].T).argmax(dim=1)
    merged = []
    for slot, target in enumerate(targets):
        members = [rest[others[j]] for j in range(len(others)) if int(owner[j]) == slot]
        mean = hidden[members].mean(0) if members else torch.zeros_like(hidden[0])
        merged.append(hidden[rest[target]] + mean)
    tokens = torch.cat([hidden[keep], torch.stack(merged)])
    with torch.no_grad():
        return model.model.multi_modal_projector(tokens)


@pytest.mark.parametrize("keep,contextual", [(16, 10 / 64), (24, 0.25), (10, 0.5)])
def test_visionzip_official_feeds_the_llm_what_visionzip_feeds_it(llava_eager, keep, contextual):
    model = llava_eager
    inputs = llava_inputs([1])
    with pruning.apply(model, "visionzip", keep=keep, contextual=contextual) as session, torch.no_grad():
        seen, handle = layer_input(model, 0)
        model(**inputs)
        handle.remove()
    n_context = round(contextual * keep)
    expected = visionzip_reference_tokens(model, inputs["pixel_values"], keep - n_context, n_context)
    columns = session.reports[-1].keep_columns[0]
    image = (inputs["input_ids"][0] == model.config.image_token_id).nonzero().squeeze(1)
    slots = torch.isin(columns, image).nonzero().squeeze(1)
    assert columns[slots].tolist() == image[:keep].tolist()  # the first `keep` placeholder slots
    torch.testing.assert_close(seen["hidden"][0, slots], expected, atol=1e-5, rtol=1e-4)


def test_visionzip_official_is_refused_where_crops_are_packed(llava_next):
    with pytest.raises(ValueError, match="use mode='llm'"), pruning.apply(llava_next, "visionzip"):
        pass
    with pruning.apply(llava_next, "visionzip", mode="llm", keep=8) as session, torch.no_grad():
        llava_next(**llava_next_inputs(llava_next, [(40, 60)]))
    assert session.reports[-1].spans[0].n_kept > 8  # 8 plus the newline tokens


@pytest.mark.parametrize("keep,layer", [(16, 1), (24, 2), (40, 1)])
def test_dart_official_count_reproduces_the_reference_on_the_model(keep, layer):
    """The reference's inputs on an unpadded batch of 1: final-norm hidden states entering layer K and the
    L1 norms of layer K-1's cached (post-RoPE) keys; text pivots from the tokens after the image."""
    model = build_llava()
    with torch.no_grad():  # a non-trivial final norm, so comparing before vs after the norm differs
        model.model.language_model.norm.weight.copy_(torch.rand(64, generator=torch.Generator().manual_seed(1)) * 2)
    inputs = llava_inputs([1], seed=3)
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True, use_cache=True)
    cache = out.past_key_values
    keys = cache.layers[layer - 1].keys[0]  # [Hkv, L, dh]
    key_norms = keys.permute(1, 0, 2).reshape(keys.shape[1], -1).abs().sum(-1)
    with torch.no_grad():
        states = model.model.language_model.norm(out.hidden_states[layer][0])
    image = (inputs["input_ids"][0] == model.config.image_token_id).nonzero().squeeze(1)
    start, length = int(image[0]), image.numel()
    expected = reference_dart_official(states, key_norms, start, length, keep, 4, 4)
    with pruning.apply(model, "dart", keep=keep, layer=layer, count="official") as session, torch.no_grad():
        model(**inputs)
    assert (session.reports[-1].selected_columns[0] - start).tolist() == expected
    assert len(expected) == 4 + 8 * (keep // 8)


def test_llava_next_base_chunks_are_hireds_row_major_chunks(llava_next):
    inputs = llava_next_inputs(llava_next, [(40, 60), (64, 30)])
    layouts = adapter_for(llava_next).layouts(inputs)
    for layout in layouts:
        base = layout.partition == 0
        n_crops = int(layout.partition.max())
        cells = torch.arange(int(base.sum()))
        assert layout.base_chunk[base].tolist() == (1 + cells * n_crops // cells.numel()).tolist()
        assert bool((layout.base_chunk[~base] == -1).all())
