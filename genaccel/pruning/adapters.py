"""Where each supported Hugging Face VLM keeps its pieces, and where its visual tokens sit in the sequence.

An adapter answers model-specific questions only (which module is the LLM, which token id marks an image,
how many tokens each image expands to, which vision-tower patch each LLM token came from); everything else in
the pruning module is model-agnostic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass
class ImageLayout:
    """One image's (or video's) run of placeholder tokens and the vision-tower patch behind each token.

    `source` indexes the flattened captured vision rows ([rows * tokens]); -1 marks tokens that are not
    patches (LLaVA-NeXT newline embeddings), which are always kept. `partition` / `base_crop` / `base_chunk`
    describe AnyRes crops (0 = base image) for HiRED. `pixels` is the image's own pixel tensor (seeds the
    per-image random stream, so it does not depend on the batch). `grid` is the AnyRes crop grid
    (rows, columns) of crops after the base image (LLaVA-NeXT), which VisionZip's NeXT path lays its kept
    tokens out on.
    """

    length: int
    token_id: int
    source: torch.Tensor | None = None
    partition: torch.Tensor | None = None
    base_crop: torch.Tensor | None = None
    base_chunk: torch.Tensor | None = None
    pixels: torch.Tensor | None = None
    grid: tuple[int, int] | None = None
    global_attention: torch.Tensor | None = None  # received attention per token (indexed like `source`)

    @property
    def always_keep(self) -> torch.Tensor:
        if self.source is None:
            return torch.zeros(self.length, dtype=torch.bool)
        return self.source < 0


@dataclass
class VisualSpan:
    """The sequence columns one image occupies in one sample."""

    sample: int
    columns: torch.Tensor
    layout: ImageLayout


class VLMAdapter:
    """Model-specific accessors; subclasses cover one transformers model family."""

    model_types: tuple[str, ...] = ()
    has_cls: bool = False
    has_frames: bool = False  # videos are runs of per-frame token blocks that can be budgeted one by one

    def __init__(self, model: nn.Module, per_frame: bool = False):
        if per_frame and not self.has_frames:
            raise ValueError(
                f"video_budget='per_frame' needs a model with video frames; {type(model).__name__} has none"
            )
        self.per_frame = per_frame
        self.model = model
        self.outer = model.model
        self.text_model = self.outer.language_model
        self.layers = self.text_model.layers
        self.text_config = self.text_model.config

    def vision_layers(self) -> nn.ModuleList | None:
        """Vision encoder layers whose q/k projections can be captured (None: no [CLS] signal)."""
        return None

    def projector(self) -> nn.Module | None:
        """The vision-to-LLM projector when one crop's pre-projector features map row-wise to its LLM tokens
        (VisionZip's official merge needs it); None where the packed layout breaks that (AnyRes, merges)."""
        return None

    def vision_heads(self) -> int:
        return self.outer.config.vision_config.num_attention_heads

    # How `global_attention_module` exposes its queries/keys: "qk" (q_proj / k_proj outputs, no rotary: CLIP,
    # SigLIP) or "qwen" (fused qkv, 2-D rotary from the call's position_embeddings, blocks from cu_seqlens).
    global_kind: str = "qk"

    def global_attention_module(self) -> nn.Module | None:
        """The vision attention whose received attention is the "global attention" signal (None: none)."""
        return None

    def global_attention(self, modality: str, record: Any, layouts: list[ImageLayout] | None) -> None:
        """Turn the captured q/k of one encoding into per-token received attention: fill
        `layout.global_attention` of `layouts` or store a vector in `record.kwargs` for `layouts(call)`."""
        raise NotImplementedError

    def vision_layer_index(self, call: dict[str, Any], which: str) -> int:
        raise NotImplementedError

    def layouts(self, call: dict[str, Any]) -> list[ImageLayout]:
        """Layouts of every image in the call, in the order the model scatters them into the sequence."""
        raise NotImplementedError

    def output_layouts(self, modality: str, kwargs: dict[str, Any], output: Any) -> list[ImageLayout] | None:
        """Layouts read off an encoder's output when its inputs do not fix them (None: use `layouts`)."""
        return None

    def decode_positions(
        self, q_len: int, past: int, attention_mask: torch.Tensor | None, device: torch.device
    ) -> torch.Tensor:
        """Positions the unpatched model would compute for `q_len` new tokens after `past` (unpruned) ones.

        Llama-style text models ignore the padding mask here and count columns.
        """
        return (torch.arange(q_len, device=device) + past)[None]


def find_spans(input_ids: torch.Tensor, layouts: list[ImageLayout]) -> list[list[VisualSpan]]:
    """Split each sample's placeholder tokens into per-image spans, consuming layouts in scatter order.

    The models fill placeholders row-major over the batch (`masked_scatter`), so images are assigned to samples
    in order; adjacent images with no separator are split by their known lengths.
    """
    spans: list[list[VisualSpan]] = [[] for _ in range(input_ids.shape[0])]
    for token_id in sorted({layout.token_id for layout in layouts}):
        queue = [layout for layout in layouts if layout.token_id == token_id]
        positions = [(row == token_id).nonzero().squeeze(1) for row in input_ids]
        total = sum(p.numel() for p in positions)
        if total != sum(layout.length for layout in queue):
            raise ValueError(
                f"{total} placeholder tokens (id {token_id}) but the images expand to "
                f"{sum(layout.length for layout in queue)}; check the processor output"
            )
        for sample, columns in enumerate(positions):
            while columns.numel():
                layout = queue.pop(0)
                if layout.length > columns.numel():
                    raise ValueError(f"an image of {layout.length} tokens is split across samples; check the batch")
                spans[sample].append(VisualSpan(sample, columns[: layout.length], layout))
                columns = columns[layout.length :]
    for row in spans:
        row.sort(key=lambda span: int(span.columns[0]))
    return spans


def clip_layer_index(feature_layer: int, num_layers: int) -> int:
    """Encoder layer whose output is `hidden_states[feature_layer]` (index 0 is the embedding output)."""
    index = feature_layer % (num_layers + 1) - 1
    if index < 0:
        raise ValueError(f"vision_feature_layer {feature_layer} selects the embeddings; no attention to score with")
    return index


class LlavaAdapter(VLMAdapter):
    """LlavaForConditionalGeneration: CLIP-style tower with [CLS], 1 run of patch tokens per image."""

    model_types = ("llava",)
    has_cls = True

    def vision_layers(self):
        return self.outer.vision_tower.encoder.layers

    def projector(self):
        return self.outer.multi_modal_projector

    def global_attention_module(self):
        return self.vision_layers()[self.vision_layer_index({}, "deep")].self_attn

    def global_attention(self, modality, record, layouts):
        """[CLS] included as a query and a key, as in the tower; read through `source` like [CLS] attention."""
        from genaccel.pruning import signals as sig

        attention, heads = self.global_attention_module(), self.vision_heads()
        q, k = (sig.split_heads(record.vision[("global", name)], heads) for name in ("q", "k"))
        record.vision[("global", "scores")] = sig.received_attention(q, k, attention.scale)

    def feature_choice(self, call: dict[str, Any]) -> tuple[int, str]:
        config = self.outer.config
        layer = call.get("vision_feature_layer")
        layer = config.vision_feature_layer if layer is None else layer
        strategy = call.get("vision_feature_select_strategy") or config.vision_feature_select_strategy
        if not isinstance(layer, int):
            raise TypeError(f"vision_feature_layer={layer!r}: [CLS]-attention strategies need a single layer")
        return layer, strategy

    def vision_layer_index(self, call, which):
        if which == "shallow":
            return 0
        return clip_layer_index(self.feature_choice(call)[0], len(self.vision_layers()))

    def patches_per_side(self) -> int:
        vision = self.outer.config.vision_config
        return vision.image_size // vision.patch_size

    def layouts(self, call):
        pixel_values = call.get("pixel_values")
        if pixel_values is None:
            return []
        n_patches = self.patches_per_side() ** 2
        first = 1 if self.feature_choice(call)[1] == "default" else 0
        width = n_patches + 1
        return [
            ImageLayout(
                length=width - first,
                token_id=self.outer.config.image_token_id,
                source=image * width + torch.arange(first, width),
                pixels=pixel_values[image],
            )
            for image in range(pixel_values.shape[0])
        ]


class LlavaNextAdapter(LlavaAdapter):
    """LlavaNextForConditionalGeneration: AnyRes base + crops, unpadded, with newline tokens per row.

    The token -> (crop, patch) map is obtained by running the model's own `pack_image_features` on index
    tensors, so unpadding and newlines are reproduced exactly.
    """

    model_types = ("llava_next",)

    def projector(self):
        """Row-wise per crop too; VisionZip's official NeXT rule works on whole crops (`crop_*` signals)."""
        return self.outer.multi_modal_projector

    def layouts(self, call):
        from transformers.models.llava_next.modeling_llava_next import (
            get_anyres_image_grid_shape,
            image_size_to_num_patches,
        )

        pixel_values, image_sizes = call.get("pixel_values"), call.get("image_sizes")
        if pixel_values is None:
            return []
        config = self.outer.config
        side = self.patches_per_side()
        first = 1 if self.feature_choice(call)[1] == "default" else 0
        width = side * side + 1
        feats, grids, row0 = [], [], 0
        for size in image_sizes:
            n_rows = image_size_to_num_patches(size, config.image_grid_pinpoints, config.vision_config.image_size)
            grid_h, grid_w = get_anyres_image_grid_shape(
                size, config.image_grid_pinpoints, config.vision_config.image_size
            )
            rows = torch.arange(n_rows, dtype=torch.float64)[:, None]
            patch = torch.arange(first, width, dtype=torch.float64)[None]
            source = (row0 + rows) * width + patch
            partition = rows.expand_as(source)
            cell = patch - first
            crop = 1 + (cell // side * grid_h // side) * grid_w + (cell % side * grid_w // side)
            base_crop = torch.where(rows == 0, crop, torch.full_like(source, -1.0))
            # HiRED's code reshapes the base scores to (crops, -1): chunk i of the flattened grid votes for crop i.
            chunk = 1 + cell * (grid_h * grid_w) // (side * side)
            base_chunk = torch.where(rows == 0, chunk, torch.full_like(source, -1.0))
            feats.append(torch.stack([source, partition, base_crop, base_chunk], dim=-1))
            grids.append((int(grid_h), int(grid_w)))
            row0 += n_rows
        strategy = self.feature_choice(call)[1]
        newline = torch.full((4,), -1.0, dtype=torch.float64)
        packed, _ = self.outer.pack_image_features(feats, image_sizes, strategy, image_newline=newline)
        return [
            ImageLayout(
                length=p.shape[0],
                token_id=config.image_token_id,
                source=p[:, 0].round().long(),
                partition=p[:, 1].round().long(),
                base_crop=p[:, 2].round().long(),
                base_chunk=p[:, 3].round().long(),
                pixels=pixels[: int(p[:, 1].max().round()) + 1] if pixels.dim() == 4 else pixels,
                grid=grid,
            )
            for p, pixels, grid in zip(packed, pixel_values, grids)
        ]


class Qwen2VLAdapter(VLMAdapter):
    """Qwen2-VL / Qwen2.5-VL: no [CLS]; images and videos sized by their (t, h, w) grids.

    Qwen2.5-VL differs only inside the vision tower (window attention, `window_index` reordering, undone before
    the features are scattered), so the LLM-side layout, M-RoPE positions and decode offsets are the same. A
    video's tokens are t / temporal_patch_size frames of (h/2 x w/2) tokens, frame-major: one span by default
    (the budget applies to the whole video), or one span per frame with `per_frame` (the budget per frame).
    """

    model_types = ("qwen2_vl", "qwen2_5_vl")
    has_frames = True
    global_kind = "qwen"

    def global_attention_module(self):
        return self.outer.visual.blocks[-1].attn

    def global_attention(self, modality, record, layouts):
        """Last vision block: rotary re-applied to the captured fused qkv, received attention within each of
        the block's attention segments (frames, or windows in Qwen2.5-VL's windowed blocks), averaged over
        each 2x2 group the PatchMerger fuses, and put back in token order (Qwen2.5-VL's `window_index`)."""
        from genaccel.pruning import signals as sig

        attention = self.global_attention_module()
        qkv = record.vision[("global", "qkv")]
        cos, sin = record.vision[("global", "cos")], record.vision[("global", "sin")]
        q, k, _ = qkv.reshape(qkv.shape[0], 3, attention.num_heads, -1).unbind(1)
        cos, sin = cos[:, None].float(), sin[:, None].float()
        q, k = q.float() * cos + sig.rotate_half(q.float()) * sin, k.float() * cos + sig.rotate_half(k.float()) * sin
        scores = sig.received_attention_segments(q, k, record.vision[("global", "cu_seqlens")], attention.scaling)
        merge = self.outer.config.vision_config.spatial_merge_size**2
        merged = scores.view(-1, merge).mean(dim=1)
        window_index = record.vision.get(("global", "window_index"))
        if window_index is not None:
            merged = merged[torch.argsort(window_index.to(merged.device))]
        record.kwargs[f"{modality}_global_attention"] = merged

    def layouts(self, call):
        config = self.outer.config
        merge = config.vision_config.spatial_merge_size**2
        grids = [
            (call.get("image_grid_thw"), call.get("pixel_values"), config.image_token_id),
            (call.get("video_grid_thw"), call.get("pixel_values_videos"), config.video_token_id),
        ]
        layouts = []
        for (grid, pixels, token_id), modality in zip(grids, ("image", "video")):
            if grid is None:
                continue
            scores, offset = call.get(f"{modality}_global_attention"), 0
            rows = [0, *grid.prod(dim=-1).cumsum(0).tolist()]
            for index, thw in enumerate(grid):
                patches = None if pixels is None else pixels[rows[index] : rows[index + 1]]
                frames = int(thw[0]) if self.per_frame and token_id == config.video_token_id else 1
                frame_rows = (rows[index + 1] - rows[index]) // frames
                for frame in range(frames):
                    part = None if patches is None else patches[frame * frame_rows : (frame + 1) * frame_rows]
                    length = int(thw.prod()) // merge // frames
                    received = None if scores is None else scores[offset : offset + length]
                    offset += length
                    layouts.append(ImageLayout(length, token_id, pixels=part, global_attention=received))
        return layouts

    def decode_positions(self, q_len, past, attention_mask, device):
        """Qwen2-VL counts real tokens through the padding mask, then adds the cached M-RoPE offsets."""
        if attention_mask is not None:
            text = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)[:, -q_len:]
        else:
            text = (torch.arange(q_len, device=device) + past)[None]
        deltas = self.outer.rope_deltas
        positions = text[None].expand(3, -1, -1)
        return positions if deltas is None else positions + deltas.to(device)


class LlavaOnevisionAdapter(VLMAdapter):
    """LlavaOnevisionForConditionalGeneration: SigLIP tower (no [CLS]), AnyRes packing that may *interpolate*
    the unpadded crop grid (anyres_max_9) and videos pooled 2x per frame with one newline at the end.

    Interpolated tokens have no single source patch, so layouts are read off the encoder output instead:
    rows equal to `image_newline` are newlines (always kept). Only strategies that need no [CLS] apply.
    """

    model_types = ("llava_onevision",)
    has_frames = True

    def global_attention_module(self):
        tower = self.outer.vision_tower
        layers = getattr(tower, "vision_model", tower).encoder.layers
        layer = self.outer.config.vision_feature_layer
        if not isinstance(layer, int):
            return None
        return layers[clip_layer_index(layer, len(layers))].self_attn

    def global_attention(self, modality, record, layouts):
        """SigLIP received attention per crop patch, laid out like the features: the model's own
        `pack_image_features` (unpad, AnyRes interpolation) on the 1-channel score map for images, its
        `apply_pooling` for video frames; newline slots come out NaN and are never read."""
        from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

        from genaccel.pruning import signals as sig

        attention, heads = self.global_attention_module(), self.vision_heads()
        q, k = (sig.split_heads(record.vision[("global", name)], heads) for name in ("q", "k"))
        scores = sig.received_attention(q, k, attention.scale)
        if (
            record.kwargs.get("vision_feature_select_strategy") or self.outer.config.vision_feature_select_strategy
        ) == "default":
            scores = scores[:, 1:]
        scores = scores[..., None]
        nan = torch.full((1,), float("nan"), device=scores.device)
        if modality == "image":
            sizes = record.kwargs["image_sizes"]
            config = self.outer.config
            counts = [
                image_size_to_num_patches(size, config.image_grid_pinpoints, config.vision_config.image_size)
                for size in sizes
            ]
            if sum(counts) != scores.shape[0]:
                counts = [1] * len(sizes)  # multi-image samples are encoded without AnyRes crops
            aspect = record.kwargs.get("vision_aspect_ratio") or config.vision_aspect_ratio
            packed, _ = self.outer.pack_image_features(
                list(torch.split(scores, counts)), sizes, image_newline=nan, vision_aspect_ratio=aspect
            )
            vectors = [p[:, 0] for p in packed]
        else:
            frames = record.kwargs.get("pixel_values_videos", record.kwargs.get("pixel_values")).shape[1]
            pooled = self.outer.apply_pooling(scores)
            vectors = [torch.cat([video.flatten(), nan]) for video in pooled.split(frames)]
        self._assign_vectors(layouts, vectors)

    @staticmethod
    def _assign_vectors(layouts: list[ImageLayout], vectors: list[torch.Tensor]) -> None:
        """Give every layout its image's / video's score vector (per-frame layouts share their video's)."""
        index, covered = -1, 0
        for layout in layouts:
            if index < 0 or covered >= vectors[index].numel():
                index, covered = index + 1, 0
            layout.global_attention = vectors[index]
            covered += layout.length

    def output_layouts(self, modality, kwargs, output):
        features = output.pooler_output
        newline = self.outer.image_newline.detach()
        token_id = self.outer.config.image_token_id if modality == "image" else self.outer.config.video_token_id
        # transformers < 5.24 names the video argument `pixel_values` and appends the video's newline later.
        pixels = kwargs.get("pixel_values_videos", kwargs.get("pixel_values"))
        layouts = []
        for index, packed in enumerate(features):
            is_newline = (packed.detach() == newline.to(packed)).all(dim=-1).cpu()
            if modality == "video" and not bool(is_newline[-1]):
                is_newline = torch.cat([is_newline, torch.ones(1, dtype=torch.bool)])
            source = torch.where(is_newline, -1, torch.arange(is_newline.numel()))
            first = None if pixels is None else pixels[index]
            if modality == "image" and first is not None and first.dim() == 4:
                first = first[0]  # the base crop: never padding, unlike the stacked crops of a batch
            if modality == "video" and self.per_frame:
                frames = pixels.shape[1]
                per_frame = (source.numel() - 1) // frames
                for frame in range(frames):
                    part = source[frame * per_frame : (frame + 1) * per_frame]
                    if frame == frames - 1:
                        part = source[frame * per_frame :]  # the trailing newline joins the last frame
                    layouts.append(ImageLayout(part.numel(), token_id, source=part, pixels=first[frame]))
                continue
            layouts.append(ImageLayout(source.numel(), token_id, source=source, pixels=first))
        return layouts

    def layouts(self, call):
        return list(call.get("image_layouts") or []) + list(call.get("video_layouts") or [])


ADAPTERS: dict[str, type[VLMAdapter]] = {
    model_type: adapter
    for adapter in (LlavaAdapter, LlavaNextAdapter, Qwen2VLAdapter, LlavaOnevisionAdapter)
    for model_type in adapter.model_types
}
SUPPORTED_CLASSES = (
    "LlavaForConditionalGeneration",
    "LlavaNextForConditionalGeneration",
    "Qwen2VLForConditionalGeneration",
    "Qwen2_5_VLForConditionalGeneration",
    "LlavaOnevisionForConditionalGeneration",
)


def adapter_for(model: nn.Module, per_frame: bool = False) -> VLMAdapter:
    """The adapter for `model`, or an error naming the supported classes."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if type(model).__name__ not in SUPPORTED_CLASSES or model_type not in ADAPTERS:
        raise TypeError(
            f"visual-token pruning does not support {type(model).__name__}; supported: {', '.join(SUPPORTED_CLASSES)}"
        )
    return ADAPTERS[model_type](model, per_frame=per_frame)
