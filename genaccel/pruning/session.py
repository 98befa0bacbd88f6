"""Hook a Hugging Face VLM so that prefill drops visual tokens, and decode stays consistent with it.

Mechanism (reference §3.2-3.3): a forward pre-hook on decoder layer K (K = 0 for pre-LLM strategies) gathers
the kept tokens of every sample, re-pads the batch on the left, gathers the rotary cos/sin tables (so kept
tokens keep their ORIGINAL positions) and builds the compact attention mask for layers >= K; later layers get
the same mask and tables. The KV cache of layers >= K then holds only kept tokens. In decode, `generate`
still counts positions on the unpruned length (convention A), so only the mask of layers >= K is rebuilt from
the stored compact prefix mask. Scores come from q/k projection outputs captured by forward hooks, never from
`output_attentions`, so SDPA stays on.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import time
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from genaccel.pruning import signals as sig
from genaccel.pruning.adapters import VisualSpan, adapter_for, find_spans
from genaccel.pruning.budget import Keep, reserve_count, resolve_budget, uniform_indices, validate_keep
from genaccel.pruning.compact import (
    compact_hidden,
    compact_padding_mask,
    gather_plan,
    gather_tokens,
    write_overrides,
)
from genaccel.pruning.compat import build_causal_mask, cache_argument
from genaccel.pruning.robustness import cutoff_margin, jaccard
from genaccel.pruning.strategies import SpanSignals, Strategy

MEDIA_INPUTS = ("pixel_values", "pixel_values_videos")
VISION_SIGNALS = frozenset(
    {"cls_attention", "cls_attention_shallow", "vision_keys", "partition", "base_crop", "base_chunk"}
)
FEATURE_SIGNALS = frozenset({"vision_features", "cls_feature", "project"})
# Whole-crop views of the same captures (VisionZip's official NeXT rule); filled for AnyRes layouts only.
CROP_SIGNALS = frozenset({"crop_cls_attention", "crop_keys", "crop_features", "crop_grid", "crop_source"})
GLOBAL_SIGNALS = frozenset({"global_attention"})  # received attention in the vision tower, any tower
LLM_SIGNALS = frozenset({"text_attention", "key_norms", "text_pivots", "columns", "text_pivot_columns"})


@dataclass
class SpanReport:
    """One image in one prefill: how many tokens it had and kept, and how stable that choice was."""

    sample: int
    start: int
    n_tokens: int
    n_kept: int
    margin: float
    jitter_overlap: float | None = None
    selected: torch.Tensor | None = None  # sequence columns of the tokens the rule chose (see PruneReport)
    prunable: torch.Tensor | None = None  # sequence columns of the image's prunable tokens (newlines excluded)


@dataclass
class PruneReport:
    """One pruned prefill: kept sequence columns per sample (original indices), per-image stats, timings.

    `keep_columns` are the columns whose slots enter layer K (text, newlines and kept visual tokens);
    `selected_columns` only the visual tokens the rule chose: the same visual columns for plain selection,
    the chosen patches (dominant + contextual targets) where a rule writes merged tokens into other slots
    (VisionZip official). Keep-set overlaps should compare `selected_columns`.
    """

    strategy: str
    layer: int
    input_length: int
    kept_length: int
    keep_columns: list[torch.Tensor]
    spans: list[SpanReport] = field(default_factory=list)
    score_seconds: float = 0.0
    selected_columns: list[torch.Tensor] = field(default_factory=list)


@dataclass
class SpanSurrogate:
    """One image's differentiable ranking surrogate (`Strategy.surrogate`), for the attack probe.

    `scores` [N] carry gradients back to the pixels; `kept` [N] is the reference keep set the attack pushes
    against, `reserved` [N] the uniform reserve (kept whatever the scores say)."""

    scores: torch.Tensor
    kept: torch.Tensor
    reserved: torch.Tensor


class SurrogatesReady(Exception):
    """Raised at layer K in surrogate mode: the forward stops once every image's surrogate is computed."""


@dataclass
class EncodingRecord:
    """Inputs of one `get_*_features` call and the vision q/k captured while it ran."""

    kwargs: dict[str, Any]
    vision: dict[tuple[str, ...], torch.Tensor] = field(default_factory=dict)


@dataclass
class CacheRecord:
    """What decode needs to know about a pruned cache: layers >= `layer` hold `prefix_mask.shape[1]` slots
    standing for the first `full_length` columns of the unpruned sequence."""

    layer: int
    full_length: int
    prefix_mask: torch.Tensor

    @property
    def kept_length(self) -> int:
        return self.prefix_mask.shape[1]


@dataclass
class LayerOverride:
    """Inputs that replace the text model's own for decoder layers >= K during one forward."""

    hidden: torch.Tensor | None
    attention_mask: Any
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None


class MethodWrap:
    """Shadow `owner.name` with `wrapper(original, *args, **kwargs)` on the instance; `remove()` restores it."""

    def __init__(self, owner: Any, name: str, wrapper):
        self.owner, self.name = owner, name
        original = getattr(owner, name)
        setattr(owner, name, functools.wraps(original)(functools.partial(wrapper, original)))

    def remove(self) -> None:
        self.owner.__dict__.pop(self.name, None)


class PruningSession:
    """Pruning state for one model; see `genaccel.pruning.apply` for the public entry point."""

    def __init__(
        self,
        model: nn.Module,
        strategy: Strategy,
        keep: Keep,
        layer: int | None = None,
        reserve: float = 0.0,
        robustness: bool = False,
        jitter: float = 1e-3,
        seed: int = 0,
        video_budget: str = "per_video",
    ):
        validate_keep(keep)
        reserve_count(0, reserve)
        if video_budget not in ("per_video", "per_frame"):
            raise ValueError(f"video_budget must be 'per_video' or 'per_frame'; got {video_budget!r}")
        self.adapter = adapter_for(model, per_frame=video_budget == "per_frame")
        self.strategy, self.keep, self.reserve = strategy, keep, reserve
        self.robustness, self.jitter, self.seed = robustness, jitter, seed
        self.layer = self._resolve_layer(layer)
        self.requested = self._resolve_signals()
        self._check_text_model()
        self.reports: list[PruneReport] = []
        self._handles: list[Any] = []
        self._records: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._encodings: dict[int, tuple[weakref.ref, EncodingRecord]] = {}
        self._active_encoding: EncodingRecord | None = None
        # Surrogate mode (robustness.attack_overlap): per image, in report span order, the reference kept mask;
        # prefill then computes differentiable ranking scores instead of pruning, and stops at layer K.
        self.surrogate_targets: list[torch.Tensor] | None = None
        self.surrogates: list[SpanSurrogate] = []
        self._encoding_seconds = 0.0
        self._reset_call()

    # ----- configuration checks ---------------------------------------------------------------------------

    def _resolve_layer(self, layer: int | None) -> int:
        n_layers = len(self.adapter.layers)
        if not self.strategy.in_llm:
            if layer not in (None, 0):
                raise ValueError(f"strategy {self.strategy.name!r} prunes before the LLM; layer must be None or 0")
            return 0
        layer = 2 if layer is None else layer
        if not 1 <= layer < n_layers:
            raise ValueError(f"strategy {self.strategy.name!r} needs 1 <= layer < {n_layers} (LLM layers); got {layer}")
        return layer

    def _resolve_signals(self) -> frozenset[str]:
        available = set()
        if self.adapter.has_cls:
            available |= VISION_SIGNALS
            if self.adapter.projector() is not None:
                available |= FEATURE_SIGNALS | CROP_SIGNALS
        if self.adapter.global_attention_module() is not None:
            available |= GLOBAL_SIGNALS
        if self.strategy.in_llm:
            available |= LLM_SIGNALS
        missing = self.strategy.needs - available
        if missing:
            raise ValueError(
                f"strategy {self.strategy.name!r} needs {sorted(missing)}, which {type(self.adapter.model).__name__} "
                "cannot provide (its vision tower has no [CLS] token); use global-attention (the [CLS]-free analogue "
                "of fastervlm), divprune, mmr, fastv, dart, uniform, pool or random"
            )
        if getattr(self.strategy, "mode", None) == "official" and self.strategy.name == "visionzip":
            if not FEATURE_SIGNALS <= available:
                raise ValueError(
                    f"visionzip mode='official' merges pre-projector features of one crop, which "
                    f"{type(self.adapter.model).__name__} does not lay out row-wise; use mode='llm'"
                )
        return frozenset(self.strategy.needs | (self.strategy.wants & available))

    def _check_text_model(self) -> None:
        config = self.adapter.text_config
        if any(kind != "full_attention" for kind in getattr(config, "layer_types", None) or []):
            raise ValueError("pruning supports full-attention LLM layers only (sliding-window layers found)")

    # ----- hook management --------------------------------------------------------------------------------

    def attach(self) -> None:
        """Register every hook; `detach` removes them all."""
        adapter = self.adapter
        if "get_image_features" in vars(adapter.outer):
            raise RuntimeError("a pruning block is already active on this model; nested `apply` is not supported")
        self._hook(adapter.outer.register_forward_pre_hook(self._on_outer, with_kwargs=True))
        self._hook(adapter.outer.register_forward_hook(lambda *_: self._reset_call()))
        self._hook(adapter.text_model.register_forward_pre_hook(self._on_text_model, with_kwargs=True))
        self._hook(adapter.text_model.register_forward_hook(lambda *_: self._reset_forward()))
        for index in range(self.layer, len(adapter.layers)):
            self._hook(adapter.layers[index].register_forward_pre_hook(self._layer_hook(index), with_kwargs=True))
        for modality in ("image", "video"):
            if hasattr(adapter.outer, f"get_{modality}_features"):
                self._hook(MethodWrap(adapter.outer, f"get_{modality}_features", self._recording_encoder(modality)))
        if self.strategy.in_llm:
            attention = adapter.layers[self.layer - 1].self_attn
            self._capture_llm(attention)
        sources = {"cls_attention": "deep", "vision_keys": "deep", "cls_attention_shallow": "shallow"}
        for which in sorted({layer for signal, layer in sources.items() if signal in self.requested}):
            attention = adapter.vision_layers()[adapter.vision_layer_index({}, which)].self_attn
            self._capture_vision(attention, which)
        if "vision_features" in self.requested:
            self._capture_features(adapter.vision_layers()[adapter.vision_layer_index({}, "deep")])
        if "global_attention" in self.requested:
            self._capture_global(adapter.global_attention_module())
        self._hook(MethodWrap(adapter.model, "generate", self._checked_generate))

    def detach(self) -> None:
        for handle in reversed(self._handles):
            handle.remove()
        self._handles.clear()

    def _hook(self, handle) -> None:
        self._handles.append(handle)

    def _capture_llm(self, attention: nn.Module) -> None:
        """Keep the q/k projection outputs of decoder layer K-1 during prefill."""
        for name in ("q", "k"):

            def keep_output(module, args, output, slot=("llm", name)):
                if self._call.get("prefill"):
                    self._llm_captured[slot] = output

            self._hook(getattr(attention, f"{name}_proj").register_forward_hook(keep_output))

    def _capture_vision(self, attention: nn.Module, which: str) -> None:
        """Keep the vision q/k projection outputs in the encoding being recorded."""
        for name in ("q", "k"):

            def keep_output(module, args, output, slot=(which, name)):
                if self._active_encoding is not None:
                    self._active_encoding.vision[slot] = output

            self._hook(getattr(attention, f"{name}_proj").register_forward_hook(keep_output))

    def _capture_features(self, layer: nn.Module) -> None:
        """Keep the output of the vision feature layer (pre-projector states, [CLS] included)."""

        def keep_output(module, args, output):
            if self._active_encoding is not None:
                self._active_encoding.vision[("deep", "features")] = output[0] if isinstance(output, tuple) else output

        self._hook(layer.register_forward_hook(keep_output))

    def _capture_global(self, attention: nn.Module) -> None:
        """Keep what the "global attention" signal is recomputed from (adapter.global_kind says which)."""

        def store(slot, value):
            if self._active_encoding is not None:
                self._active_encoding.vision[("global", slot)] = value

        if self.adapter.global_kind == "qk":
            for name in ("q", "k"):
                projection = getattr(attention, f"{name}_proj")
                self._hook(projection.register_forward_hook(lambda m, a, out, name=name: store(name, out)))
            return

        def keep_inputs(module, args, kwargs):
            store("cu_seqlens", kwargs["cu_seqlens"] if "cu_seqlens" in kwargs else args[1])
            cos, sin = kwargs["position_embeddings"] if "position_embeddings" in kwargs else args[2]
            store("cos", cos)
            store("sin", sin)

        self._hook(attention.register_forward_pre_hook(keep_inputs, with_kwargs=True))
        self._hook(attention.qkv.register_forward_hook(lambda m, a, out: store("qkv", out)))
        visual = self.adapter.outer.visual
        if hasattr(visual, "permute_input_for_window_attn"):  # Qwen2.5-VL: tokens enter the blocks window-ordered

            def window_order(original, tensor, window_index, *args, **kwargs):
                store("window_index", window_index)
                return original(tensor, window_index, *args, **kwargs)

            self._hook(MethodWrap(visual, "permute_input_for_window_attn", window_order))

    @staticmethod
    def _checked_generate(original, *args, **kwargs):
        """Refuse beam search and several returned sequences before `generate` expands the inputs.

        `generate` repeats `input_ids` per beam / returned sequence but the encoder outputs are expanded by a
        separate path, so the placeholder runs no longer line up one-to-one with the recorded images.
        """
        config = kwargs.get("generation_config")
        for name in ("num_beams", "num_return_sequences"):
            value = kwargs.get(name, getattr(config, name, None) if config is not None else None)
            if value is None:
                value = getattr(getattr(original.__self__, "generation_config", None), name, 1)
            if value is not None and value > 1:
                raise ValueError(
                    f"visual-token pruning does not support {name}={value} (generate expands the prompt per beam/"
                    "sequence); run one call per sequence, or generate outside the `apply` block"
                )
        return original(*args, **kwargs)

    def _recording_encoder(self, modality: str):
        """Wrap `get_<modality>_features` to record its layout inputs and the vision q/k it produces.

        `generate` encodes images before the first forward and then drops `image_sizes` / grids from the
        forward's kwargs, passing only the encoder outputs (again on every step when there is no cache), so the
        record is kept per encoder-output object and found again from `mm_encoder_outputs`.
        """

        def wrapper(original, *args, **kwargs):
            names = list(inspect.signature(original).parameters)
            record = EncodingRecord({**dict(zip(names, args)), **kwargs})
            self._active_encoding = record
            try:
                output = original(*args, **kwargs)
            finally:
                self._active_encoding = None
            layouts = self.adapter.output_layouts(modality, record.kwargs, output)
            if layouts is not None:
                record.kwargs[f"{modality}_layouts"] = layouts
            if "global_attention" in self.requested:
                start = time.perf_counter()
                self.adapter.global_attention(modality, record, layouts)
                # Scoring done at encoding time still counts towards the prefill's `score_seconds`.
                self._encoding_seconds += time.perf_counter() - start
            self._encodings = {key: value for key, value in self._encodings.items() if value[0]() is not None}
            self._encodings[id(output)] = (weakref.ref(output), record)
            self._call_encodings.append(record)
            return output

        return wrapper

    def _records_for_call(self) -> list[EncodingRecord]:
        """Encodings made inside this forward, or recorded for the encoder outputs it was given."""
        records = list(self._call_encodings)
        for output in (self._call.get("mm_encoder_outputs") or {}).values():
            ref, record = self._encodings.get(id(output), (lambda: None, None))
            if ref() is output:
                records.append(record)
        if not records:
            raise ValueError(
                "the images were encoded outside the pruning block; run the whole call inside `apply(...)`"
            )
        return records

    def _reset_call(self) -> None:
        """Forget everything about the last outer forward (encodings stay findable by their outputs)."""
        self._call: dict[str, Any] = {}
        self._call_encodings: list[EncodingRecord] = []
        self._llm_captured: dict[tuple[str, str], torch.Tensor] = {}
        self._vision_captured: dict[tuple[str, str], torch.Tensor] = {}
        self._reset_forward()

    def _reset_forward(self) -> None:
        self._pending: list[list[VisualSpan]] | None = None
        self._mask2d: torch.Tensor | None = None
        self._override: LayerOverride | None = None

    # ----- hooks ------------------------------------------------------------------------------------------

    def _on_outer(self, module, args, kwargs):
        """Remember the call's inputs; in decode, supply positions on the unpruned length if none were given."""
        call = {key: value for key, value in kwargs.items() if value is not None}
        if args:
            call["input_ids"] = args[0]
        cache = cache_argument(call)
        call["prefill"] = cache is None or cache.get_seq_length() == 0
        call["has_media"] = any(key in call for key in MEDIA_INPUTS) or bool(call.get("mm_encoder_outputs"))
        if call["has_media"] and call.get("input_ids") is None:
            raise ValueError("visual-token pruning needs input_ids (to find image placeholders), not inputs_embeds")
        self._call = call
        self._call_encodings = []
        record = self._records.get(cache) if cache is not None else None
        if record is not None and kwargs.get("position_ids") is None:
            kwargs["position_ids"] = self._decode_positions(call, cache, record)
        return args, kwargs

    def _decode_positions(self, call: dict[str, Any], cache, record: CacheRecord) -> torch.Tensor:
        """Positions the unpruned model would use: the cache stands for `full_length` prompt tokens."""
        tokens = call.get("input_ids") if call.get("input_ids") is not None else call["inputs_embeds"]
        offset = record.full_length - record.kept_length if record.layer == 0 else 0
        past = cache.get_seq_length() + offset
        return self.adapter.decode_positions(tokens.shape[1], past, call.get("attention_mask"), tokens.device)

    def _on_text_model(self, module, args, kwargs):
        """Stash the 2-D padding mask; in prefill, locate the visual spans to prune."""
        self._reset_forward()
        mask = kwargs.get("attention_mask")
        if mask is not None and (not isinstance(mask, torch.Tensor) or mask.dim() != 2):
            raise ValueError(
                "visual-token pruning needs a 2-D attention_mask (or none); got a prepared 4-D/dict mask, which "
                "happens with static caches: use the default DynamicCache"
            )
        self._mask2d = mask
        input_ids = self._call.get("input_ids")
        embeds = kwargs.get("inputs_embeds")
        if not self._call.get("prefill") or not self._call.get("has_media") or embeds.shape[1] != input_ids.shape[1]:
            return args, kwargs
        records = self._records_for_call()
        recorded = {key: value for record in records for key, value in record.kwargs.items()}
        for record in records:
            self._vision_captured.update(record.vision)
        spans = find_spans(input_ids, self.adapter.layouts({**recorded, **self._call}))
        self._pending = spans if any(spans) else None
        return args, kwargs

    def _layer_hook(self, index: int):
        def hook(module, args, kwargs):
            if index == self.layer:
                self._prepare_override(args, kwargs)
            if self._override is None:
                return args, kwargs
            if index == self.layer and self._override.hidden is not None:
                args, kwargs = self._replace_hidden(args, kwargs, self._override.hidden)
            kwargs["attention_mask"] = self._override.attention_mask
            if self._override.position_embeddings is not None:
                kwargs["position_embeddings"] = self._override.position_embeddings
            # Gapped position ids would look like packed sequences to FlashAttention; RoPE uses the gathered tables.
            kwargs["position_ids"] = None
            return args, kwargs

        return hook

    @staticmethod
    def _hidden_of(args, kwargs) -> torch.Tensor:
        return args[0] if args else kwargs["hidden_states"]

    @staticmethod
    def _replace_hidden(args, kwargs, hidden):
        if args:
            return (hidden, *args[1:]), kwargs
        kwargs["hidden_states"] = hidden
        return args, kwargs

    def _prepare_override(self, args, kwargs) -> None:
        """At layer K: prune (prefill) or rebuild the compact mask over the pruned cache (decode)."""
        cache = cache_argument(kwargs)
        hidden = self._hidden_of(args, kwargs)
        if self._pending is not None:
            self._override = self._prune(hidden, kwargs, cache)
            self._pending = None
        elif cache is not None and cache in self._records:
            self._override = self._decode_override(hidden, cache, self._records[cache])

    def _decode_override(self, hidden: torch.Tensor, cache, record: CacheRecord) -> LayerOverride:
        """Mask for layers >= K over [compact prompt prefix, everything after the prompt]."""
        q_len = hidden.shape[1]
        tail = cache.get_seq_length(self.layer) - record.kept_length + q_len
        mask = self._mask2d
        if mask is None:
            mask_tail = torch.ones(hidden.shape[0], tail, dtype=torch.long, device=hidden.device)
        elif mask.shape[1] != record.full_length + tail:
            raise ValueError(
                f"attention_mask has {mask.shape[1]} columns but the pruned cache stands for "
                f"{record.full_length + tail}; pass the mask of the full (unpruned) sequence"
            )
        else:
            mask_tail = mask[:, record.full_length :].long()
        compact = torch.cat([record.prefix_mask.to(hidden.device), mask_tail], dim=1)
        return LayerOverride(hidden=None, attention_mask=self._causal_mask(hidden, compact, cache))

    def _causal_mask(self, hidden: torch.Tensor, mask2d: torch.Tensor, cache) -> Any:
        """The text model's own mask builder, sized against layer K's (compact) cache."""
        return build_causal_mask(self.adapter.text_config, hidden, mask2d, cache, self.layer)

    # ----- prefill pruning --------------------------------------------------------------------------------

    def _host(self, value: torch.Tensor) -> torch.Tensor:
        """CPU float32 copy for selection; keeps the autograd graph in surrogate mode."""
        value = value if self.surrogate_targets is not None else value.detach()
        return value.float().cpu()

    def _prune(self, hidden: torch.Tensor, kwargs: dict[str, Any], cache) -> LayerOverride:
        start = time.perf_counter()
        spans, mask2d = self._pending, self._mask2d
        batch, length = hidden.shape[:2]
        cos, sin = kwargs["position_embeddings"]
        context = self._sample_context(hidden, cos, sin, mask2d)
        if self.surrogate_targets is not None:
            self._compute_surrogates(spans, hidden, context)
        keep_columns, selected_columns, overrides, span_reports = [], [], [], []
        for sample in range(batch):
            dropped = torch.zeros(length, dtype=torch.bool)
            selected = []
            for ordinal, span in enumerate(spans[sample]):
                kept, merged, report = self._select_span(span, hidden, context, ordinal)
                dropped[span.columns] = True
                dropped[kept] = False
                overrides.extend(merged)
                span_reports.append(report)
                selected.append(report.selected)
            keep_columns.append((~dropped).nonzero().squeeze(1))
            selected_columns.append(torch.cat(selected).sort().values if selected else torch.zeros(0, dtype=torch.long))
        index, valid = gather_plan(keep_columns, hidden.device)
        compact = compact_hidden(write_overrides(hidden, overrides), index, valid)
        mask_c = compact_padding_mask(mask2d, index, valid)
        tables = (gather_tokens(cos, index), gather_tokens(sin, index))
        if cache is not None:
            self._records[cache] = CacheRecord(self.layer, length, mask_c)
        self.reports.append(
            PruneReport(
                strategy=self.strategy.name,
                layer=self.layer,
                input_length=length,
                kept_length=compact.shape[1],
                keep_columns=keep_columns,
                spans=span_reports,
                score_seconds=time.perf_counter() - start + self._encoding_seconds,
                selected_columns=selected_columns,
            )
        )
        self._encoding_seconds = 0.0
        return LayerOverride(
            hidden=compact, attention_mask=self._causal_mask(compact, mask_c, cache), position_embeddings=tables
        )

    def _compute_surrogates(self, spans: list[list[VisualSpan]], hidden, context) -> None:
        """Every image's `Strategy.surrogate` against its reference keep set; then stop the forward."""
        flat = [span for row in spans for span in row]
        if len(flat) != len(self.surrogate_targets):
            raise ValueError(f"{len(flat)} images in this call but {len(self.surrogate_targets)} reference keep sets")
        self.surrogates = []
        for span, kept in zip(flat, self.surrogate_targets):
            prunable = (~span.layout.always_keep).nonzero().squeeze(1)
            signals = self._span_signals(span, prunable, hidden, context)
            budget = resolve_budget(self.keep, prunable.numel())
            reserved = torch.zeros(prunable.numel(), dtype=torch.bool)
            reserved[uniform_indices(prunable.numel(), reserve_count(budget, self.reserve))] = True
            scores = self.strategy.surrogate(signals, kept)
            self.surrogates.append(SpanSurrogate(scores=scores, kept=kept, reserved=reserved))
        raise SurrogatesReady

    def _sample_context(self, hidden, cos, sin, mask2d) -> dict[str, torch.Tensor]:
        """Batch-level signals, computed once per prefill and sliced per image."""
        context: dict[str, torch.Tensor] = {}
        if self.requested & VISION_SIGNALS:
            context.update(self._vision_context())
        if ("global", "scores") in self._vision_captured and "global_attention" in self.requested:
            context["global_attention"] = self._vision_captured[("global", "scores")].flatten()
        if self.requested & LLM_SIGNALS:
            context.update(self._llm_context(hidden, cos, sin, mask2d))
        return context

    def _vision_context(self) -> dict[str, torch.Tensor]:
        """Requested [CLS]-attention rows and key metrics over all captured vision rows, flattened."""
        layer, _ = self.adapter.feature_choice(self._call)
        if layer != self.adapter.feature_choice({})[0]:
            raise ValueError(
                "a per-call vision_feature_layer differs from the config; [CLS] strategies use the config's"
            )
        heads = self.adapter.vision_heads()
        scale = self.adapter.vision_layers()[0].self_attn.scale
        captured = self._vision_captured
        context = {}
        for which, name in (("deep", "cls_attention"), ("shallow", "cls_attention_shallow")):
            if name in self.requested:
                rows = sig.cls_attention(captured[(which, "q")], captured[(which, "k")], heads, scale)
                context[name] = rows.mean(dim=1).flatten()
        if "vision_keys" in self.requested:
            context["vision_keys"] = sig.head_mean_keys(captured[("deep", "k")], heads).flatten(0, 1)
        if "vision_features" in self.requested:
            if self.adapter.feature_choice(self._call)[1] != "default":
                raise ValueError(
                    "visionzip mode='official' needs vision_feature_select_strategy='default' ([CLS] not a "
                    "placeholder token); use mode='llm'"
                )
            features = captured[("deep", "features")]
            context["vision_features"] = features.flatten(0, 1)
            context["tokens_per_row"] = torch.tensor(features.shape[1])
        return context

    def _project(self, features: torch.Tensor) -> torch.Tensor:
        """The model's own projector on pre-projector features (CPU float32 in, CPU float32 out)."""
        projector = self.adapter.projector()
        weight = next(projector.parameters())
        with torch.no_grad():
            return projector(features.to(weight.device, weight.dtype)).float().cpu()

    def _llm_context(self, hidden, cos, sin, mask2d) -> dict[str, torch.Tensor]:
        """Requested layer K-1 attention signals for every sample ([B, L] each)."""
        attention = self.adapter.layers[self.layer - 1].self_attn
        config = self.adapter.text_config
        batch, length = hidden.shape[:2]
        device = hidden.device
        valid = torch.ones(batch, length, dtype=torch.bool, device=device) if mask2d is None else mask2d.bool()
        queries, keys = self._llm_captured[("llm", "q")], self._llm_captured[("llm", "k")]
        cos, sin = cos.expand(batch, -1, -1), sin.expand(batch, -1, -1)
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
        context = {"valid": valid}
        if "text_attention" in self.requested:
            last = (torch.arange(length, device=device)[None] * valid).argmax(dim=1)
            context["text_attention"] = sig.last_query_attention(
                queries, keys, cos, sin, last, valid, heads, kv_heads, attention.scaling
            )
        if self.requested & {"key_norms", "text_pivots"}:
            context["key_norms"] = sig.rotated_key_l1(keys, cos, sin, kv_heads)
        if getattr(self.strategy, "normed_hidden", False):
            # DART's reference compares hidden states after the LLM's final norm (`normlayer(hidden_states)`).
            with torch.set_grad_enabled(self.surrogate_targets is not None and torch.is_grad_enabled()):
                context["normed"] = self.adapter.text_model.norm(hidden)
        return context

    def _generator(self, layout, ordinal: int, stream: int = 0) -> torch.Generator:
        """Random stream of one image in one call: seeded by `seed`, the prefill's index in this session, the
        image's own pixels (when the model passes them and the stream is drawn from) and its ordinal within the
        sample, so different images and calls draw different sets while a sample prunes the same alone or batched
        (same call index)."""
        digest = hashlib.blake2b(digest_size=8)
        digest.update(repr((self.seed, len(self.reports), ordinal, stream)).encode())
        # Hashing the pixels costs a pass over them; only streams that are drawn from need it.
        if layout.pixels is not None and (self.strategy.uses_generator or stream > 0):
            pixels = layout.pixels.detach().float().cpu().contiguous()
            digest.update(repr(tuple(pixels.shape)).encode())
            digest.update(pixels.numpy().tobytes())
        return torch.Generator().manual_seed(int.from_bytes(digest.digest(), "little") >> 1)

    def _select_span(self, span: VisualSpan, hidden, context, ordinal: int):
        """Run the strategy on one image; return kept columns, merged states, and the span report."""
        layout = span.layout
        prunable = (~layout.always_keep).nonzero().squeeze(1)
        signals = self._span_signals(span, prunable, hidden, context)
        budget = resolve_budget(self.keep, prunable.numel())
        reserved = uniform_indices(prunable.numel(), reserve_count(budget, self.reserve))
        selection = self.strategy.select(signals, budget, reserved, self._generator(layout, ordinal))
        overlap = None
        if self.robustness:
            jittered = signals.jittered(self.jitter, self._generator(layout, ordinal, stream=1))
            again = self.strategy.select(jittered, budget, reserved, self._generator(layout, ordinal))
            overlap = jaccard(selection.selected, again.selected)
        if selection.whole_span:
            kept_columns, always = span.columns[selection.keep], span.columns[:0]
        else:
            kept_columns, always = span.columns[prunable[selection.keep]], span.columns[layout.always_keep]
        merged = [] if selection.embeds is None else [(span.sample, kept_columns, selection.embeds)]
        report = SpanReport(
            sample=span.sample,
            start=int(span.columns[0]),
            n_tokens=layout.length,
            n_kept=kept_columns.numel() + always.numel(),
            margin=cutoff_margin(selection.scores, selection.selected, reserved, selection.ranked),
            jitter_overlap=overlap,
            selected=span.columns[prunable[selection.selected]],
            prunable=span.columns[prunable],
        )
        return torch.cat([kept_columns, always]), merged, report

    def _span_signals(self, span: VisualSpan, prunable, hidden, context) -> SpanSignals:
        """Slice this image's signals; strategies run on CPU float32 (N is a few hundred to a few thousand)."""
        columns = span.columns[prunable]
        layout = span.layout
        states = context.get("normed", hidden)
        fields: dict[str, Any] = {"embeds": self._host(states[span.sample, columns.to(hidden.device)])}
        for name in ("cls_attention", "cls_attention_shallow", "vision_keys", "vision_features"):
            if name in context:
                fields[name] = self._host(context[name][layout.source[prunable].to(context[name].device)])
        if "cls_feature" in self.requested and prunable.numel():
            width = int(context["tokens_per_row"])
            row_start = int(layout.source[prunable[0]]) // width * width
            fields["cls_feature"] = context["vision_features"][row_start].detach().float().cpu()
        if "project" in self.requested:
            fields["project"] = self._project
        if "global_attention" in self.requested:
            scores = layout.global_attention if layout.global_attention is not None else context["global_attention"]
            index = prunable if layout.source is None else layout.source[prunable]
            fields["global_attention"] = self._host(scores[index.to(scores.device)])
        if "crop_features" in self.requested and layout.grid is not None and prunable.numel():
            fields.update(self._crop_signals(layout, prunable, context))
        for name in ("text_attention", "key_norms"):
            if name in context and name in self.requested:
                fields[name] = context[name][span.sample, columns.to(context[name].device)].cpu()
        if self.requested & {"partition", "base_crop", "base_chunk"}:
            for name in ("partition", "base_crop", "base_chunk"):
                value = getattr(layout, name)
                fields[name] = None if value is None else value[prunable]
        if "text_pivots" in self.requested:
            first = int(context["valid"][span.sample].float().argmax())
            top = self._text_pivots(span, context)
            fields["text_pivots"] = self._host(states[span.sample, top.to(hidden.device)])
            fields["columns"] = columns.cpu() - first
            fields["text_pivot_columns"] = top - first
        return SpanSignals(**fields)

    def _crop_signals(self, layout, prunable, context) -> dict[str, Any]:
        """Every patch of every crop of one AnyRes image (unpadding dropped some from the span), [CLS] first in
        the features: the inputs VisionZip's NeXT path selects from."""
        width = int(context["tokens_per_row"])
        row0 = int(layout.source[prunable].min()) // width
        n_crops = int(layout.partition.max()) + 1
        block = slice(row0 * width, (row0 + n_crops) * width)
        source = layout.source[prunable] - row0 * width
        return {
            "crop_features": self._host(context["vision_features"][block].view(n_crops, width, -1)),
            "crop_cls_attention": self._host(context["cls_attention"][block].view(n_crops, width)[:, 1:]),
            "crop_keys": self._host(context["vision_keys"][block].view(n_crops, width, -1)[:, 1:]),
            "crop_grid": layout.grid,
            "crop_source": source // width * (width - 1) + source % width - 1,
        }

    def _text_pivots(self, span: VisualSpan, context) -> torch.Tensor:
        """Columns of the text tokens after this image with the largest key norms, in descending order.

        DART's reference takes its query pivots only from the tokens after the image (the question), and
        we leave out other images' placeholders there.
        """
        sample = span.sample
        text = context["valid"][sample].cpu().clone()
        text[: int(span.columns[-1]) + 1] = False
        for other in self._pending[sample]:
            text[other.columns] = False
        columns = text.nonzero().squeeze(1)
        count = min(getattr(self.strategy, "pivot_text", 4), columns.numel())
        return columns[torch.topk(context["key_norms"][sample].cpu()[columns], count).indices]
