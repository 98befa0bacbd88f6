"""Where visual tokens sit, and which vision patch each one came from."""

from __future__ import annotations

import pytest
import torch
from tiny_vlms import IMAGE, VIDEO, llava_next_inputs

from genaccel.pruning.adapters import ImageLayout, Qwen2VLAdapter, adapter_for, clip_layer_index, find_spans


def test_find_spans_splits_adjacent_images_and_walks_the_batch_in_order():
    ids = torch.tensor([[5, IMAGE, IMAGE, IMAGE, IMAGE, IMAGE, 6], [IMAGE, IMAGE, 7, 7, 7, 7, 7]])
    layouts = [ImageLayout(2, IMAGE), ImageLayout(3, IMAGE), ImageLayout(2, IMAGE)]
    spans = find_spans(ids, layouts)
    assert [s.columns.tolist() for s in spans[0]] == [[1, 2], [3, 4, 5]]
    assert [s.columns.tolist() for s in spans[1]] == [[0, 1]]
    assert spans[0][1].layout is layouts[1]


def test_find_spans_interleaves_token_kinds_by_position():
    ids = torch.tensor([[VIDEO, VIDEO, 3, IMAGE]])
    spans = find_spans(ids, [ImageLayout(1, IMAGE), ImageLayout(2, VIDEO)])
    assert [s.layout.token_id for s in spans[0]] == [VIDEO, IMAGE]


def test_find_spans_rejects_a_count_mismatch():
    with pytest.raises(ValueError, match="3 placeholder tokens .* expand to 4"):
        find_spans(torch.tensor([[IMAGE, IMAGE, IMAGE]]), [ImageLayout(4, IMAGE)])


def test_clip_layer_index():
    assert clip_layer_index(-2, 24) == 22 and clip_layer_index(3, 24) == 2
    with pytest.raises(ValueError, match="selects the embeddings"):
        clip_layer_index(0, 24)


def test_llava_next_source_map_reproduces_packing(llava_next):
    inputs = llava_next_inputs(llava_next, [(40, 60), (64, 30)])
    outer = llava_next.model
    projected = {}
    handle = outer.multi_modal_projector.register_forward_hook(lambda m, a, out: projected.__setitem__("x", out))
    with torch.no_grad():
        packed = outer.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output
    handle.remove()
    layouts = adapter_for(llava_next).layouts(inputs)
    flat = projected["x"].flatten(0, 1)
    n_patches = projected["x"].shape[1]
    for layout, features in zip(layouts, packed):
        patch = layout.source >= 0
        row, column = layout.source[patch] // (n_patches + 1), layout.source[patch] % (n_patches + 1)
        torch.testing.assert_close(features[patch], flat[row * n_patches + column - 1])
        torch.testing.assert_close(features[~patch], outer.image_newline.expand(int((~patch).sum()), -1))
        assert layout.length == features.shape[0]
        assert torch.equal(layout.partition[patch], row - row.min())


def test_llava_next_base_tokens_vote_for_the_crop_covering_them(llava_next):
    inputs = llava_next_inputs(llava_next, [(40, 60)])
    layout = adapter_for(llava_next).layouts(inputs)[0]
    base = layout.partition == 0
    # (40, 60) picks the 64x64 pinpoint: a 2x2 crop grid, so each quadrant of the 8x8 base votes for its crop.
    row, column = torch.arange(64) // 8, torch.arange(64) % 8
    assert torch.equal(layout.base_crop[base], 1 + (row // 4) * 2 + column // 4)
    assert bool((layout.base_crop[~base] == -1).all())


def test_qwen2vl_layouts_follow_merged_grids(qwen2vl):
    adapter = adapter_for(qwen2vl)
    assert isinstance(adapter, Qwen2VLAdapter) and not adapter.has_cls
    call = {"image_grid_thw": torch.tensor([[1, 8, 8], [1, 4, 4]]), "video_grid_thw": torch.tensor([[2, 4, 4]])}
    assert [(lay.length, lay.token_id) for lay in adapter.layouts(call)] == [(16, IMAGE), (4, IMAGE), (8, VIDEO)]
