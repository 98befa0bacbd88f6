"""Tiny random-config VLMs built locally (no downloads) and inputs for them (shared by tests/pruning)."""

from __future__ import annotations

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    SiglipVisionConfig,
)

IMAGE = 100
VIDEO = 101
VISION_START = 102
VISION_END = 103
VOCAB = 128


def tiny_clip() -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32, patch_size=4
    )


def tiny_llama() -> LlamaConfig:
    return LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=512,
        pad_token_id=0,
    )


def build_llava(attn: str = "sdpa") -> LlavaForConditionalGeneration:
    torch.manual_seed(0)
    config = LlavaConfig(vision_config=tiny_clip(), text_config=tiny_llama(), image_token_id=IMAGE, image_seq_length=64)
    config._attn_implementation = attn
    return LlavaForConditionalGeneration(config).eval()


def build_llava_next(attn: str = "sdpa") -> LlavaNextForConditionalGeneration:
    torch.manual_seed(0)
    config = LlavaNextConfig(
        vision_config=tiny_clip(),
        text_config=tiny_llama(),
        image_token_id=IMAGE,
        image_grid_pinpoints=[[32, 64], [64, 32], [64, 64]],
    )
    config._attn_implementation = attn
    return LlavaNextForConditionalGeneration(config).eval()


def build_llava_onevision(max_patches: int = 9) -> LlavaOnevisionForConditionalGeneration:
    """SigLIP tower (no [CLS]) + Qwen2 LLM; 8x8 patches per crop, AnyRes up to 2x2 crops; `max_patches` below 4
    makes the packing interpolate the unpadded grid (anyres_max_N)."""
    torch.manual_seed(0)
    config = LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=4,
        ),
        text_config={"model_type": "qwen2", **{k: v for k, v in QWEN_TEXT.items() if k != "rope_parameters"}},
        image_token_id=IMAGE,
        video_token_id=VIDEO,
        image_grid_pinpoints=[[32, 64], [64, 32], [64, 64]],
        vision_aspect_ratio=f"anyres_max_{max_patches}",
        vision_feature_layer=-1,
    )
    return LlavaOnevisionForConditionalGeneration(config).eval()


def llava_onevision_inputs(model, image_sizes: list[tuple[int, int]], frames: int = 0, seed: int = 0):
    """One image per sample (placeholder counts from the model's own packing); with `frames`, sample 0 also
    holds a video of that many frames after its image."""
    torch.manual_seed(seed)
    pixel_values = torch.randn(len(image_sizes), 5, 3, 32, 32)
    sizes = torch.tensor(image_sizes)
    with torch.no_grad():
        lengths = [f.shape[0] for f in model.model.get_image_features(pixel_values, sizes).pooler_output]
    rows = [text_ids(3 + i, seed + i) + [IMAGE] * n + text_ids(4, seed + 5 + i) for i, n in enumerate(lengths)]
    inputs = {"pixel_values": pixel_values, "image_sizes": sizes}
    if frames:
        videos = torch.randn(1, frames, 3, 32, 32)
        with torch.no_grad():
            features = model.model.get_video_features(videos).pooler_output[0]
        # one newline after the frames (inside the encoder output from transformers 5.24 on, added later before)
        n_video = features.shape[0] + int(not bool((features[-1] == model.model.image_newline).all()))
        rows[0] += [VIDEO] * n_video + text_ids(3, seed + 11)
        inputs["pixel_values_videos"] = videos
    ids, mask = left_pad(rows)
    return {"input_ids": ids, "attention_mask": mask, **inputs}


QWEN_TEXT = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": VOCAB,
    "max_position_embeddings": 512,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}
QWEN_TOKENS = {
    "image_token_id": IMAGE,
    "video_token_id": VIDEO,
    "vision_start_token_id": VISION_START,
    "vision_end_token_id": VISION_END,
}


def build_qwen25vl() -> Qwen2_5_VLForConditionalGeneration:
    """Qwen2.5-VL with window attention in the vision tower (window 8 px = 2x2 merged tokens, one full block)."""
    torch.manual_seed(0)
    config = Qwen2_5_VLConfig(
        vision_config={
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 4,
            "out_hidden_size": 64,
            "patch_size": 2,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 8,
            "fullatt_block_indexes": [1],
            "in_channels": 3,
        },
        text_config=dict(QWEN_TEXT),
        **QWEN_TOKENS,
    )
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def build_qwen2vl() -> Qwen2VLForConditionalGeneration:
    torch.manual_seed(0)
    config = Qwen2VLConfig(
        vision_config={
            "depth": 2,
            "embed_dim": 32,
            "hidden_size": 64,
            "num_heads": 4,
            "mlp_ratio": 2,
            "patch_size": 2,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "in_channels": 3,
        },
        text_config=dict(QWEN_TEXT),
        **QWEN_TOKENS,
    )
    return Qwen2VLForConditionalGeneration(config).eval()


def text_ids(n: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(1, 90, (n,), generator=generator).tolist()


def left_pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and mask for prompts of different lengths."""
    length = max(len(r) for r in rows)
    ids = torch.tensor([[0] * (length - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (length - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def llava_inputs(n_images: list[int], seed: int = 0) -> dict[str, torch.Tensor]:
    """A batch where sample i has n_images[i] images (64 tokens each) between text of varying length."""
    torch.manual_seed(seed)
    rows = []
    for i, count in enumerate(n_images):
        row = text_ids(3 + i, seed + i)
        for j in range(count):
            row += [IMAGE] * 64 + text_ids(2 + j, seed + 10 * i + j)
        rows.append(row + text_ids(4, seed + 7 * i))
    ids, mask = left_pad(rows)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.randn(sum(n_images), 3, 32, 32)}


def llava_next_inputs(model, image_sizes: list[tuple[int, int]], seed: int = 0) -> dict[str, torch.Tensor]:
    """One image per sample with AnyRes crops; placeholder counts come from the model's own packing."""
    torch.manual_seed(seed)
    pixel_values = torch.randn(len(image_sizes), 5, 3, 32, 32)
    sizes = torch.tensor(image_sizes)
    with torch.no_grad():
        lengths = [f.shape[0] for f in model.model.get_image_features(pixel_values, sizes).pooler_output]
    rows = [text_ids(3 + i, seed + i) + [IMAGE] * n + text_ids(4, seed + 5 + i) for i, n in enumerate(lengths)]
    ids, mask = left_pad(rows)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixel_values, "image_sizes": sizes}


def qwen2vl_inputs(grids: list[list[tuple[int, int, int]]], seed: int = 0) -> dict[str, torch.Tensor]:
    """Sample i holds images with (t, h, w) patch grids grids[i]; each becomes t*h*w/4 tokens."""
    torch.manual_seed(seed)
    rows = []
    for i, sample in enumerate(grids):
        row = text_ids(3 + i, seed + i)
        for j, (t, h, w) in enumerate(sample):
            row += [VISION_START] + [IMAGE] * (t * h * w // 4) + [VISION_END] + text_ids(2 + j, seed + 3 * i + j)
        rows.append(row + text_ids(3, seed + 9 * i))
    ids, mask = left_pad(rows)
    flat = [g for sample in grids for g in sample]
    n_patches = sum(t * h * w for t, h, w in flat)
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "mm_token_type_ids": (ids == IMAGE).int(),
        "pixel_values": torch.randn(n_patches, 3 * 2 * 2 * 2),
        "image_grid_thw": torch.tensor(flat),
    }


def qwen2vl_image_and_video(seed: int = 0) -> dict[str, torch.Tensor]:
    """One prompt with an image (8x8 patches -> 16 tokens) followed by a 2-frame video (2x4x4 -> 8 tokens)."""
    torch.manual_seed(seed)
    row = text_ids(3, seed) + [VISION_START] + [IMAGE] * 16 + [VISION_END] + text_ids(2, seed + 1)
    row += [VISION_START] + [VIDEO] * 8 + [VISION_END] + text_ids(3, seed + 2)
    ids = torch.tensor([row])
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "mm_token_type_ids": (ids == IMAGE).int() + 2 * (ids == VIDEO).int(),
        "pixel_values": torch.randn(64, 3 * 2 * 2 * 2),
        "image_grid_thw": torch.tensor([[1, 8, 8]]),
        "pixel_values_videos": torch.randn(32, 3 * 2 * 2 * 2),
        "video_grid_thw": torch.tensor([[2, 4, 4]]),
    }
