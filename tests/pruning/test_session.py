"""End-to-end behaviour of `genaccel.pruning.apply` on tiny LLaVA, LLaVA-NeXT and Qwen2-VL models."""

from __future__ import annotations

import inspect

import pytest
import torch
from tiny_vlms import (
    IMAGE,
    VIDEO,
    llava_inputs,
    llava_next_inputs,
    llava_onevision_inputs,
    qwen2vl_image_and_video,
    qwen2vl_inputs,
    tiny_llama,
)
from transformers import LlamaForCausalLM, LlavaForConditionalGeneration

from genaccel import pruning


def greedy(model, inputs, steps: int = 3, **kwargs):
    torch.manual_seed(0)
    with torch.no_grad():
        return model.generate(
            **inputs, max_new_tokens=steps, do_sample=False, output_logits=True, return_dict_in_generate=True, **kwargs
        )


def all_logits(output) -> torch.Tensor:
    return torch.stack(output.logits, dim=1)


def model_inputs(name: str, model) -> dict[str, torch.Tensor]:
    """A padded batch of 2 for each model family (one sample holds two images where supported)."""
    if name in ("llava", "llava_eager"):
        return llava_inputs([1, 2])
    if name == "llava_next":
        return llava_next_inputs(model, [(40, 60), (64, 30)])
    if name.startswith("llava_onevision"):
        return llava_onevision_inputs(model, [(40, 60), (64, 30)], frames=2)
    return qwen2vl_inputs([[(1, 8, 8)], [(1, 4, 8), (1, 4, 4)]])


@pytest.mark.parametrize("name", ["llava", "llava_next", "qwen2vl", "qwen25vl", "llava_onevision"])
def test_keep_all_reproduces_unpatched_prefill_and_decode(name, request):
    model = request.getfixturevalue(name)
    inputs = model_inputs(name, model)
    reference = greedy(model, inputs)
    with pruning.apply(model, "keep-all") as session:
        patched = greedy(model, inputs)
    assert torch.equal(all_logits(patched), all_logits(reference))
    assert torch.equal(patched.sequences, reference.sequences)
    assert session.reports[0].kept_length == inputs["input_ids"].shape[1]


def test_qwen2vl_prunes_images_and_videos_in_one_prompt(qwen2vl):
    inputs = qwen2vl_image_and_video()
    reference = greedy(qwen2vl, inputs)
    with pruning.apply(qwen2vl, "keep-all"):
        assert torch.equal(all_logits(greedy(qwen2vl, inputs)), all_logits(reference))
    with pruning.apply(qwen2vl, "divprune", keep=3) as session:
        greedy(qwen2vl, inputs)
    spans = session.reports[0].spans
    assert [(span.n_tokens, span.n_kept) for span in spans] == [(16, 3), (8, 3)]
    kept = inputs["input_ids"][0, session.reports[0].keep_columns[0]]
    assert int((kept == IMAGE).sum()) == 3 and int((kept == VIDEO).sum()) == 3


def additive_mask(allowed: torch.Tensor) -> torch.Tensor:
    """[B, Lq, Lk] boolean -> [B, 1, Lq, Lk] float mask for the attention functions."""
    return torch.zeros(allowed.shape, dtype=torch.float32).masked_fill(~allowed, float("-inf"))[:, None]


def masked_reference_masks(keep_columns, padding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal+padding mask, and the same with pruned keys hidden (a token still sees itself, avoiding empty rows)."""
    batch, length = padding.shape
    causal = torch.ones(length, length, dtype=torch.bool).tril()[None] & padding.bool()[:, None, :]
    kept = torch.zeros(batch, length, dtype=torch.bool)
    for row, columns in enumerate(keep_columns):
        kept[row, columns] = True
    eye = torch.eye(length, dtype=torch.bool)[None]
    return additive_mask(causal | eye), additive_mask((causal & kept[:, None, :]) | eye)


def run_masked_reference(model, inputs, keep_columns, prune_layer: int, position_ids) -> torch.Tensor:
    """Full-length forward where layers >= prune_layer cannot attend to pruned tokens (FastV's "mask" mode)."""
    full_mask, pruned_mask = masked_reference_masks(keep_columns, inputs["attention_mask"])
    layers = model.model.language_model.layers

    def swap(module, args, kwargs):
        kwargs["attention_mask"] = pruned_mask
        return args, kwargs

    handles = [layer.register_forward_pre_hook(swap, with_kwargs=True) for layer in layers[prune_layer:]]
    try:
        with torch.no_grad():
            out = model(**{**inputs, "attention_mask": full_mask}, position_ids=position_ids)
    finally:
        for handle in handles:
            handle.remove()
    return out.logits


def explicit_positions(name: str, model, inputs) -> torch.Tensor:
    """The positions the model would use, made explicit so the 4-D-mask reference sees the same ones."""
    if name.startswith("qwen"):
        compute = model.model.compute_3d_position_ids
        optional = {"video_grid_thw": None, "cache": None, "past_key_values": None}
        declared = inspect.signature(compute).parameters
        return compute(
            input_ids=inputs["input_ids"],
            inputs_embeds=None,
            image_grid_thw=inputs["image_grid_thw"],
            attention_mask=inputs["attention_mask"],
            mm_token_type_ids=inputs["mm_token_type_ids"],
            **{key: value for key, value in optional.items() if key in declared},
        )
    length = inputs["input_ids"].shape[1]
    return torch.arange(length)[None].expand(inputs["input_ids"].shape[0], -1)


@pytest.mark.parametrize(
    "name,strategy,layer",
    [
        ("llava", "divprune", None),
        ("llava", "fastv", 2),
        ("llava", "dart", 1),
        ("llava_eager", "fastv", 1),
        ("llava_next", "fastervlm", None),
        ("qwen2vl", "mmr", None),
        ("qwen2vl", "fastv", 1),
        ("qwen25vl", "divprune", None),
        ("qwen25vl", "dart", 2),
        ("llava_onevision", "mmr", None),
        ("llava_onevision_interpolated", "fastv", 1),
    ],
)
def test_pruning_equals_full_sequence_with_pruned_tokens_masked(name, strategy, layer, request):
    model = request.getfixturevalue(name)
    inputs = model_inputs(name, model)
    positions = explicit_positions(name, model, inputs)
    with pruning.apply(model, strategy, keep=6, layer=layer) as session, torch.no_grad():
        pruned = model(**inputs, position_ids=positions).logits
    report = session.reports[-1]
    assert report.kept_length < inputs["input_ids"].shape[1]
    reference = run_masked_reference(model, inputs, report.keep_columns, report.layer, positions)
    for row, columns in enumerate(report.keep_columns):
        real = columns[inputs["attention_mask"][row, columns].bool()]
        torch.testing.assert_close(
            pruned[row, -len(columns) :][-len(real) :], reference[row, real], atol=2e-5, rtol=1e-4
        )


@pytest.mark.parametrize("strategy", ["divprune", "random", "fastv", "visionzip", "dart"])
def test_batch_of_padded_prompts_equals_each_alone(llava, strategy):
    """Same call index in a fresh block each: `random` is seeded per image and per call of a session."""
    inputs = llava_inputs([1, 2])
    options = {"layer": 1} if strategy == "dart" else {}
    with pruning.apply(llava, strategy, keep=10, **options):
        batched = greedy(llava, inputs)
    alone = []
    for single in split_batch(inputs, images_per_sample=[1, 2]):
        with pruning.apply(llava, strategy, keep=10, **options):
            alone.append(greedy(llava, single))
    for row, single in enumerate(alone):
        torch.testing.assert_close(all_logits(batched)[row], all_logits(single)[0], atol=2e-5, rtol=1e-4)
        new_tokens = batched.sequences[row, inputs["input_ids"].shape[1] :]
        assert torch.equal(new_tokens, single.sequences[0, -new_tokens.numel() :])


def split_batch(inputs, images_per_sample: list[int]) -> list[dict[str, torch.Tensor]]:
    """Each sample on its own, without padding."""
    singles, first = [], 0
    for row, count in enumerate(images_per_sample):
        real = inputs["attention_mask"][row].bool()
        singles.append(
            {
                "input_ids": inputs["input_ids"][row, real][None],
                "attention_mask": torch.ones(1, int(real.sum()), dtype=torch.long),
                "pixel_values": inputs["pixel_values"][first : first + count],
            }
        )
        first += count
    return singles


@pytest.mark.parametrize("name", ["llava", "qwen2vl", "qwen25vl", "llava_onevision"])
def test_cached_decode_matches_recomputing_without_cache(name, request):
    model = request.getfixturevalue(name)
    inputs = model_inputs(name, model)
    with pruning.apply(model, "divprune", keep=5):
        cached = greedy(model, inputs, steps=4)
        uncached = greedy(model, inputs, steps=4, use_cache=False)
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(all_logits(cached), all_logits(uncached), atol=2e-5, rtol=1e-4)


def test_eager_attention_backend_keeps_the_same_guarantees(llava_eager):
    model = llava_eager
    inputs = llava_inputs([1, 2])
    reference = greedy(model, inputs)
    with pruning.apply(model, "keep-all"):
        assert torch.equal(all_logits(greedy(model, inputs)), all_logits(reference))
    with pruning.apply(model, "divprune", keep=5):
        cached, uncached = greedy(model, inputs), greedy(model, inputs, use_cache=False)
    torch.testing.assert_close(all_logits(cached), all_logits(uncached), atol=2e-5, rtol=1e-4)


def cache_spellings() -> list[str]:
    """Cache keyword names the installed LLaVA forward accepts: `past_key_values` always (a deprecated alias
    from transformers 5.24 on), `cache` from 5.24 on."""
    declared = inspect.signature(LlavaForConditionalGeneration.forward).parameters
    return ["past_key_values"] + (["cache"] if "cache" in declared else [])


@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")
@pytest.mark.parametrize("spelling", cache_spellings())
def test_manual_decode_without_position_ids_continues_at_unpruned_length(llava, spelling):
    inputs = llava_inputs([1])
    inputs.pop("attention_mask")
    next_token = torch.tensor([[5]])
    with pruning.apply(llava, "uniform", keep=8), torch.no_grad():
        prefill = llava(**inputs, use_cache=True)
        step = llava(input_ids=next_token, **{spelling: prefill.past_key_values}).logits[:, -1]
        full = llava(**{**inputs, "input_ids": torch.cat([inputs["input_ids"], next_token], dim=1)}).logits[:, -1]
    torch.testing.assert_close(step, full, atol=2e-5, rtol=1e-4)


def count_kept_visual(name_model, keep) -> tuple[int, int]:
    inputs = llava_inputs([1])
    with pruning.apply(name_model, "divprune", keep=keep) as session, torch.no_grad():
        logits = name_model(**inputs).logits
    return session.reports[0].spans[0].n_kept, logits.shape[1]


@pytest.mark.parametrize("keep,expected", [(0, 0), (0.0, 0), (1.0, 64), (64, 64), (10_000, 64), (0.25, 16), (7, 7)])
def test_keep_edge_cases(llava, keep, expected):
    n_kept, length = count_kept_visual(llava, keep)
    text_tokens = int((llava_inputs([1])["input_ids"] != IMAGE).sum())
    assert n_kept == expected
    assert length == text_tokens + expected


def test_keep_everything_by_ratio_reproduces_unpatched_logits(llava):
    inputs = llava_inputs([2, 1])
    reference = greedy(llava, inputs)
    with pruning.apply(llava, "mmr", keep=1.0):
        patched = greedy(llava, inputs)
    torch.testing.assert_close(all_logits(patched), all_logits(reference), atol=1e-5, rtol=1e-5)


def test_reserve_keeps_uniform_tokens_and_reports_stability(llava):
    inputs = llava_inputs([1])
    options = {"keep": 16, "reserve": 0.5, "robustness": True, "jitter": 0.0}
    with pruning.apply(llava, "fastervlm", **options) as session, torch.no_grad():
        llava(**inputs)
    report = session.reports[0]
    span = report.spans[0]
    uniform = span.start + pruning.budget.uniform_indices(64, 8)
    assert torch.isin(uniform, report.keep_columns[0]).all()
    assert span.jitter_overlap == 1.0
    assert span.n_kept == 16


def test_large_jitter_moves_attention_ranking(llava):
    with pruning.apply(llava, "fastervlm", keep=16, robustness=True, jitter=5.0) as session, torch.no_grad():
        llava(**llava_inputs([1]))
    span = session.reports[0].spans[0]
    assert span.jitter_overlap < 1.0
    assert span.margin >= 0.0  # a top-k cut-off, in units of the median neighbour gap


def test_hooks_are_removed_after_the_block(llava):
    inputs = llava_inputs([1])
    with pruning.apply(llava, "uniform", keep=4), torch.no_grad():
        short = llava(**inputs).logits.shape[1]
    with torch.no_grad():
        full = llava(**inputs).logits.shape[1]
    assert short < full == inputs["input_ids"].shape[1]
    assert "get_image_features" not in vars(llava.model)


def enter(*args, **kwargs) -> None:
    """Open and close a pruning block (configuration errors surface on entry)."""
    with pruning.apply(*args, **kwargs):
        pass


def test_unknown_strategy_lists_available(llava):
    with pytest.raises(ValueError, match="available: .*divprune"):
        enter(llava, "nope")


def test_negative_keep_is_rejected(llava):
    with pytest.raises(ValueError, match="keep must be >= 0"):
        enter(llava, "random", keep=-1)


def test_unsupported_model_class_is_named():
    with pytest.raises(TypeError, match="does not support LlamaForCausalLM; supported: LlavaForConditionalGeneration"):
        enter(LlamaForCausalLM(tiny_llama()), "random")


def test_cls_strategy_on_qwen_explains_missing_signal(qwen2vl):
    with pytest.raises(ValueError, match="needs \\['cls_attention'\\].*no \\[CLS\\] token"):
        enter(qwen2vl, "visionzip")


def test_nested_blocks_are_rejected(llava):
    with pruning.apply(llava, "uniform", keep=4), pytest.raises(RuntimeError, match="already active"):
        enter(llava, "random", keep=4)
    enter(llava, "random", keep=4)


def test_in_llm_layer_out_of_range(llava):
    with pytest.raises(ValueError, match="1 <= layer < 3"):
        enter(llava, "fastv", layer=3)


def test_random_differs_per_image_and_call_and_repeats_per_seed(llava):
    """The random subset depends on the image and the call, and a fresh block with the same seed repeats it."""
    inputs = llava_inputs([2])
    runs = []
    for _ in range(2):
        with pruning.apply(llava, "random", keep=8, seed=3) as session, torch.no_grad():
            llava(**inputs)
            llava(**inputs)
        runs.append([[span.selected - span.start for span in report.spans] for report in session.reports])
    (first_call, second_call), (again, _) = runs
    assert not torch.equal(first_call[0], first_call[1])  # two images of one prompt
    assert not torch.equal(first_call[0], second_call[0])  # the same image in the next call
    assert all(torch.equal(a, b) for a, b in zip(first_call, again))  # reproducible from the seed


@pytest.mark.parametrize("option", [{"num_beams": 2}, {"num_return_sequences": 2, "do_sample": True}])
def test_beam_search_and_several_sequences_raise_a_clear_error(llava, option):
    with pruning.apply(llava, "divprune", keep=4), pytest.raises(ValueError, match="does not support num_"):
        llava.generate(**llava_inputs([1]), max_new_tokens=2, **option)
    assert "generate" not in vars(llava)


@pytest.mark.parametrize("name", ["qwen2vl", "qwen25vl"])
def test_video_budget_per_frame_keeps_keep_tokens_in_every_frame(name, request):
    model = request.getfixturevalue(name)
    # A video of grid (4, 4, 4): 4 temporal patches (8 frames) of 4x4 patches, i.e. 4 blocks of 4 tokens.
    inputs = qwen2vl_image_and_video()
    inputs = dict(inputs, pixel_values_videos=torch.randn(64, 24), video_grid_thw=torch.tensor([[4, 4, 4]]))
    row = inputs["input_ids"][0]
    video = (row == VIDEO).nonzero().squeeze(1)
    ids = torch.cat([row[: video[0]], torch.full((16,), VIDEO), row[video[-1] + 1 :]])[None]
    inputs.update(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        mm_token_type_ids=(ids == IMAGE).int() + 2 * (ids == VIDEO).int(),
    )
    with pruning.apply(model, "divprune", keep=2, video_budget="per_frame") as session, torch.no_grad():
        model(**inputs)
    spans = session.reports[-1].spans
    assert [(span.n_tokens, span.n_kept) for span in spans] == [(16, 2), (4, 2), (4, 2), (4, 2), (4, 2)]
    with pruning.apply(model, "divprune", keep=2) as session, torch.no_grad():
        model(**inputs)
    assert [(span.n_tokens, span.n_kept) for span in session.reports[-1].spans] == [(16, 2), (16, 2)]
    with (
        pytest.raises(ValueError, match="needs a model with video frames"),
        pruning.apply(request.getfixturevalue("llava"), "divprune", video_budget="per_frame"),
    ):
        pass


def test_llava_onevision_batch_equals_each_alone_and_explains_cls_strategies(llava_onevision):
    model = llava_onevision
    inputs = llava_onevision_inputs(model, [(40, 60), (64, 30)])
    with pruning.apply(model, "divprune", keep=6):
        batched = greedy(model, inputs)
    for row in range(2):
        real = inputs["attention_mask"][row].bool()
        single = {
            "input_ids": inputs["input_ids"][row, real][None],
            "attention_mask": torch.ones(1, int(real.sum()), dtype=torch.long),
            "pixel_values": inputs["pixel_values"][row : row + 1],
            "image_sizes": inputs["image_sizes"][row : row + 1],
        }
        with pruning.apply(model, "divprune", keep=6):
            alone = greedy(model, single)
        torch.testing.assert_close(all_logits(batched)[row], all_logits(alone)[0], atol=2e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="no \\[CLS\\] token\\); use global-attention"):
        enter(model, "fastervlm")


def test_llava_onevision_newlines_stay_and_video_frames_are_budgeted(llava_onevision):
    model = llava_onevision
    inputs = llava_onevision_inputs(model, [(40, 60)], frames=3)
    with pruning.apply(model, "uniform", keep=4, video_budget="per_frame") as session, torch.no_grad():
        model(**inputs)
    image, *frames = session.reports[-1].spans
    newline = model.model.image_newline.detach()
    with torch.no_grad():
        packed = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output[0]
    n_newlines = int((packed == newline).all(dim=-1).sum())
    assert n_newlines > 0 and image.n_kept == 4 + n_newlines  # newlines kept outside the budget
    # 3 frames of 16 pooled tokens, the video's one newline joins the last frame's span
    assert [(f.n_tokens, f.n_kept) for f in frames] == [(16, 4), (16, 4), (17, 5)]


@pytest.mark.parametrize("strategy", ["divprune", "random", "dart"])
def test_qwen25vl_batch_of_padded_prompts_equals_each_alone(qwen25vl, strategy):
    grids = [[(1, 8, 8)], [(1, 4, 8), (1, 4, 4)]]
    inputs = qwen2vl_inputs(grids)
    options = {"layer": 1} if strategy == "dart" else {}
    with pruning.apply(qwen25vl, strategy, keep=5, **options):
        batched = greedy(qwen25vl, inputs)
    first_row, first_image = 0, 0
    for row, sample in enumerate(grids):
        real = inputs["attention_mask"][row].bool()
        rows = sum(t * h * w for t, h, w in sample)
        ids = inputs["input_ids"][row, real][None]
        single = {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "mm_token_type_ids": (ids == IMAGE).int(),
            "pixel_values": inputs["pixel_values"][first_row : first_row + rows],
            "image_grid_thw": inputs["image_grid_thw"][first_image : first_image + len(sample)],
        }
        first_row, first_image = first_row + rows, first_image + len(sample)
        with pruning.apply(qwen25vl, strategy, keep=5, **options):
            alone = greedy(qwen25vl, single)
        torch.testing.assert_close(all_logits(batched)[row], all_logits(alone)[0], atol=2e-5, rtol=1e-4)
