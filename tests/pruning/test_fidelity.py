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


def visionzip_reference_tokens(model, pixel_values, dominant: int, contextual: int, with_keep: bool = False):
    """VisionZip's `CLIPVisionTower_VisionZip.forward` + projector for one image: eager CLIP with attention
    output at layer -2, metric = head-mean raw keys of that layer, hidden_states[-2] with [CLS]. With
    `with_keep`, also the forward's `all_indices` ([CLS] = 0 and the dominant patches + 1)."""
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
        projected = model.model.multi_modal_projector(tokens)
    return (projected, keep) if with_keep else projected


def visionzip_next_reference(model, crops, grid_h: int, grid_w: int, dominant: int, contextual: int):
    """VisionZip's LLaVA-NeXT path for one image, written out from `prepare_inputs_labels_for_multimodal_visionzip`
    and `restore_image_features_sorted`: every crop through the one-crop rule, the base crop's tokens as they
    are, then the other crops' dominant tokens scattered into the (H*24, W*24) grid and read row-major (no
    unpad, no newline), their [CLS] tokens, their contextual tokens."""
    outputs = [visionzip_reference_tokens(model, crop[None], dominant, contextual, True) for crop in crops]
    image_feature = torch.stack([features for features, _ in outputs])
    keep_idx = torch.tensor([keep for _, keep in outputs])[1:]
    base, rest = image_feature[0], image_feature[1:]
    num_img, total_patches, feature_dim = rest.shape
    num_keep = keep_idx.shape[1]
    num_extra = total_patches - num_keep
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    restore = keep_idx.sort(dim=1).values[:, 1:] - 1
    restored = torch.zeros(num_img, side * side, feature_dim)
    mask = torch.zeros(num_img, side * side, dtype=torch.bool)
    mask.scatter_(1, restore, True)
    restored[mask] = rest[:, 1:num_keep].reshape(-1, feature_dim)
    restored = restored.view(grid_h, grid_w, side, side, feature_dim).permute(0, 2, 1, 3, 4).contiguous()
    restored = restored.view(grid_h * side, grid_w * side, feature_dim)
    mask = mask.view(grid_h, grid_w, side, side).permute(0, 2, 1, 3).contiguous().view(grid_h * side, grid_w * side)
    return torch.cat([base, restored[mask], rest[:, 0], rest[:, -num_extra:].reshape(-1, feature_dim)])


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


@pytest.fixture(scope="module")
def llava_next_eager():
    from tiny_vlms import build_llava_next

    return build_llava_next(attn="eager")


@pytest.mark.parametrize("sizes,keep,contextual", [([(64, 64)], 60, 10 / 64), ([(32, 64), (64, 40)], 45, 0.25)])
def test_visionzip_official_on_llava_next_feeds_the_llm_what_visionzips_next_path_feeds_it(
    llava_next_eager, sizes, keep, contextual
):
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

    model = llava_next_eager
    inputs = llava_next_inputs(model, sizes)
    with pruning.apply(model, "visionzip", keep=keep, contextual=contextual) as session, torch.no_grad():
        seen, handle = layer_input(model, 0)
        model(**inputs)
        handle.remove()
    report = session.reports[-1]
    config = model.config
    for sample, size in enumerate(inputs["image_sizes"]):
        grid_h, grid_w = get_anyres_image_grid_shape(size, config.image_grid_pinpoints, config.vision_config.image_size)
        n_crops = 1 + grid_h * grid_w
        per_crop = keep // n_crops
        n_context = round(contextual * per_crop)
        crops = inputs["pixel_values"][sample, :n_crops]
        expected = visionzip_next_reference(model, crops, grid_h, grid_w, per_crop - n_context, n_context)
        assert expected.shape[0] == n_crops * per_crop
        columns = report.keep_columns[sample]
        image = (inputs["input_ids"][sample] == config.image_token_id).nonzero().squeeze(1)
        slots = torch.isin(columns, image).nonzero().squeeze(1)
        assert columns[slots].tolist() == image[: expected.shape[0]].tolist()  # newlines dropped as VisionZip
        pad = seen["hidden"].shape[1] - columns.numel()  # the compact batch is re-padded on the left
        torch.testing.assert_close(seen["hidden"][sample, pad + slots], expected, atol=1e-5, rtol=1e-4)
        assert report.spans[sample].n_kept == expected.shape[0]


def test_visionzip_official_on_llava_next_budget_edges(llava_next):
    """Per-crop budgets: below one token per crop nothing stays (no newlines either, as VisionZip's layout has
    none); keep=1.0 keeps the image as it is, newlines included."""
    inputs = llava_next_inputs(llava_next, [(32, 64), (64, 64)])  # 3 and 5 crops
    kept = {}
    for keep in (0, 4, 1.0):
        with pruning.apply(llava_next, "visionzip", keep=keep) as session, torch.no_grad():
            llava_next(**inputs)
        kept[keep] = [span.n_kept for span in session.reports[-1].spans]
        lengths = [span.n_tokens for span in session.reports[-1].spans]
    assert kept[0] == [0, 0] and kept[4] == [3, 0] and kept[1.0] == lengths


def test_visionzip_official_on_llava_next_refuses_a_reserve(llava_next):
    with pruning.apply(llava_next, "visionzip", keep=30, reserve=0.2) as session, torch.no_grad():
        with pytest.raises(ValueError, match="reserve is not supported there"):
            llava_next(**llava_next_inputs(llava_next, [(40, 60)]))
    assert not session.reports
    with pruning.apply(llava_next, "visionzip", mode="llm", keep=8) as session, torch.no_grad():
        llava_next(**llava_next_inputs(llava_next, [(40, 60)]))
    assert session.reports[-1].spans[0].n_kept > 8  # mode="llm": 8 plus the newline tokens


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
