"""The transformers API the pruning hooks touch, in one place, across the releases CI tests.

transformers 5.24 renamed the KV-cache argument of every model forward (and of `create_causal_mask`) from
`past_key_values` to `cache`, keeping the old name as a deprecated alias. A forward pre-hook sees the call's
keyword arguments as the caller spelled them, so the hooks must read either name; the mask builder is called
with whichever name the installed release declares.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any

import transformers
from packaging.version import Version
from transformers.masking_utils import create_causal_mask

# The releases `.ci/run` runs the pruning tests on (the lowest in its second venv, the newest in the main one).
# Keep in step with pyproject.toml's lower bound and docs/pruning.md.
TESTED_TRANSFORMERS = ("5.17.0", "5.25.0")

# Names of a forward's KV-cache keyword argument, current first.
CACHE_ARGUMENTS = ("cache", "past_key_values")


def cache_argument(kwargs: dict[str, Any]) -> Any:
    """The KV cache a forward call was given, under whichever name the caller used (None if none)."""
    for name in CACHE_ARGUMENTS:
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


def mask_cache_parameter() -> str:
    """The name `create_causal_mask` declares for its cache argument in the installed release."""
    parameters = inspect.signature(create_causal_mask).parameters
    for name in CACHE_ARGUMENTS:
        if name in parameters:
            return name
    raise ImportError(
        f"transformers {transformers.__version__}: create_causal_mask takes none of {CACHE_ARGUMENTS} "
        f"(parameters: {list(parameters)}); genaccel.pruning is tested with transformers "
        f"{TESTED_TRANSFORMERS[0]}..{TESTED_TRANSFORMERS[1]}"
    )


MASK_CACHE_PARAMETER = mask_cache_parameter()


def build_causal_mask(config: Any, inputs_embeds, attention_mask, cache, layer_idx: int) -> Any:
    """`create_causal_mask` with the cache passed under the installed release's name."""
    return create_causal_mask(
        config=config,
        inputs_embeds=inputs_embeds,
        attention_mask=attention_mask,
        position_ids=None,
        layer_idx=layer_idx,
        **{MASK_CACHE_PARAMETER: cache},
    )


def _tested_range() -> str:
    return f"genaccel.pruning is tested with transformers {TESTED_TRANSFORMERS[0]} to {TESTED_TRANSFORMERS[1]}"


def _missing_parameters(function, required: tuple[str, ...], any_of: tuple[str, ...] = ()) -> list[str]:
    """Names in `required` the signature lacks, plus `any_of` as one item when it has none of them."""
    parameters = inspect.signature(function).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()) and not any_of:
        return []
    missing = [name for name in required if name not in parameters]
    if any_of and not any(name in parameters for name in any_of):
        missing.append(" or ".join(any_of))
    return missing


def api_problems() -> list[str]:
    """Every part of the transformers API the hooks rely on that the installed release lacks, one line each.

    Signatures and attributes only, plus one shape check: the rotary tables a decoder layer receives must be
    (batch, length, dim) for Qwen2-VL too (releases before 5.17 passed the 3-section M-RoPE tables, which the
    kept-token gather cannot use).
    """
    from transformers import DynamicCache
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer
    from transformers.models.llava.modeling_llava import LlavaModel
    from transformers.models.llava_next import modeling_llava_next
    from transformers.models.qwen2_vl import modeling_qwen2_vl

    version = transformers.__version__
    problems = []

    def need(ok: bool, what: str) -> None:
        if not ok:
            problems.append(f"transformers {version}: {what}; {_tested_range()}")

    mask_missing = _missing_parameters(
        create_causal_mask, ("config", "inputs_embeds", "attention_mask", "position_ids", "layer_idx"), CACHE_ARGUMENTS
    )
    need(not mask_missing, f"masking_utils.create_causal_mask lacks parameter(s) {mask_missing}")
    for layer in (LlamaDecoderLayer, modeling_qwen2_vl.Qwen2VLDecoderLayer):
        missing = _missing_parameters(
            layer.forward, ("hidden_states", "attention_mask", "position_ids", "position_embeddings"), CACHE_ARGUMENTS
        )
        need(not missing, f"{layer.__name__}.forward lacks parameter(s) {missing}")
    need(
        "layer_idx" in inspect.signature(DynamicCache.get_seq_length).parameters,
        "DynamicCache.get_seq_length takes no layer_idx",
    )
    for outer in (LlavaModel, modeling_llava_next.LlavaNextModel, modeling_qwen2_vl.Qwen2VLModel):
        need(hasattr(outer, "get_image_features"), f"{outer.__name__} has no get_image_features")
    need(
        hasattr(modeling_llava_next.LlavaNextModel, "pack_image_features"), "LlavaNextModel has no pack_image_features"
    )
    for name in ("get_anyres_image_grid_shape", "image_size_to_num_patches"):
        need(hasattr(modeling_llava_next, name), f"modeling_llava_next has no {name}")
    need(hasattr(modeling_qwen2_vl, "Qwen2VLTextModel"), "modeling_qwen2_vl has no Qwen2VLTextModel")
    _check_global_attention_api(need)
    if hasattr(modeling_qwen2_vl, "Qwen2VLTextModel"):
        need(
            _qwen2vl_rotary_is_per_token(modeling_qwen2_vl),
            "Qwen2-VL's decoder layers receive rotary tables that are not (batch, length, dim)",
        )
    return problems


def _check_global_attention_api(need) -> None:
    """The pieces the global-attention signal and the LLaVA-OneVision layouts call (adapters.py, session.py):
    Qwen2.5-VL's window permutation (its window_index is recorded to undo the order) and LLaVA-OneVision's
    own packing, pooling and patch count."""
    from transformers.models.llava_onevision import modeling_llava_onevision
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl

    tower = getattr(modeling_qwen2_5_vl, "Qwen2_5_VisionTransformerPretrainedModel", None)
    permute = getattr(tower, "permute_input_for_window_attn", None)
    need(permute is not None, "Qwen2_5_VisionTransformerPretrainedModel has no permute_input_for_window_attn")
    if permute is not None:
        order = list(inspect.signature(permute).parameters)[1:3]
        need(order == ["input_tensor", "window_index"],
             f"Qwen2.5-VL permute_input_for_window_attn takes {order} first, not (input_tensor, window_index)")
    outer = modeling_llava_onevision.LlavaOnevisionModel
    need(hasattr(outer, "pack_image_features"), "LlavaOnevisionModel has no pack_image_features")
    if hasattr(outer, "pack_image_features"):
        pack = _missing_parameters(outer.pack_image_features,
                                   ("image_features", "image_sizes", "image_newline", "vision_aspect_ratio"))
        need(not pack, f"LlavaOnevisionModel.pack_image_features lacks parameter(s) {pack}")
    need(hasattr(outer, "apply_pooling"), "LlavaOnevisionModel has no apply_pooling")
    need(hasattr(modeling_llava_onevision, "image_size_to_num_patches"),
         "modeling_llava_onevision has no image_size_to_num_patches")


def _qwen2vl_rotary_is_per_token(modeling_qwen2_vl) -> bool:
    """Run a one-layer Qwen2-VL text model's rotary embedding on 3-section positions and check its shape."""
    import torch

    config = modeling_qwen2_vl.Qwen2VLTextConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=8,
        bos_token_id=0,
        eos_token_id=0,
        rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 10000.0},
    )
    rotary = modeling_qwen2_vl.Qwen2VLTextModel(config).rotary_emb
    hidden = torch.zeros(1, 4, 16)
    cos, _ = rotary(hidden, torch.arange(4).expand(3, 1, 4))
    return tuple(cos.shape) == (1, 4, 8)


def untested_version_message(version: str) -> str | None:
    """A warning text when `version` lies outside the tested range (patch releases of the newest tested
    minor release count as tested), else None."""
    low, high = (Version(v) for v in TESTED_TRANSFORMERS)
    installed = Version(Version(version).base_version)
    if low <= installed and installed.release[:2] <= high.release[:2]:  # patch releases of the newest count
        return None
    return f"{_tested_range()}; transformers {version} is installed, so pruning runs but its guarantees are unchecked on this release"


_warned = False


def warn_if_untested() -> None:
    """Warn once per process when the installed transformers is outside the tested range."""
    global _warned
    message = untested_version_message(transformers.__version__)
    if message is not None and not _warned:
        _warned = True
        warnings.warn(message, UserWarning, stacklevel=3)
