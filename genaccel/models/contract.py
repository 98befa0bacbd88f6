"""The sampler contract: the only model surface a genaccel sampler may use.

A sampler is to an AR model what a diffusers scheduler is to a UNet: it never reaches into layers.
Any model implementing :class:`ARModel` (LlamaGen GPT today; NAR, Token-Shuffle and 1D-token models next)
works with every sampler whose needs it meets.

Sequence layout. Cache slot ``s`` holds the class token(s) for ``s < cls_token_num`` and image token
``s - cls_token_num`` (raster order) otherwise. By default the RoPE position of a fed token equals its slot;
samplers that place tokens elsewhere (tree drafts, neighbour decoding) pass ``rope_positions``.

Batch layout with classifier-free guidance. Rows are ``[cond_0..cond_{B-1}; uncond_0..uncond_{B-1}]``:
the first half carries the requested labels, the second the null class ``num_classes``; both halves
always receive the same image tokens (:func:`cfg_labels`, :func:`combine_cfg`).

Calls.
1. ``setup_cache(batch_size, max_seq_len=None, dtype=None, device=None)`` allocates static K/V buffers once.
   Samplers call the contract under ``torch.inference_mode``; a cache that is reused across calls must
   be reallocated when it was made inside inference mode and is set up outside it
   (:func:`reusable_outside_inference`), since an inference tensor cannot be written in place there.
2. ``prefill(labels)`` writes the class slots and returns logits/hidden for them; it resets every row's
   valid length to 0 first, so one cache serves many images.
3. ``forward_tokens(tokens (B, L), positions (L,) or (B, L), mask=None, rope_positions=None)`` writes the
   tokens' K/V at ``positions`` and returns :class:`ModelOutput` with ``logits`` (B, L, V) float32 and
   ``hidden`` (B, L, D), the final-normed hidden state fed to the LM head (what EAGLE-style drafters read).
   ``mask`` is a boolean (B or 1, L, max_seq_len) tensor, True = may attend, over cache slots; by default
   a token sees every slot <= its own that is valid or written in this call.
4. ``rollback(length)`` marks only slots < length valid (int, or a (B,) tensor for per-row lengths). No
   copying: stale K/V beyond the valid length are hidden by the default mask and overwritten later.
5. Optional ``select_rows(index)``: keep only cache rows ``index`` (a (B',) long tensor, in that order), with
   their K/V and valid lengths; later calls use B' rows. Ragged speculative batches drop complete images
   with it so they stop costing compute; a model without it keeps them (correct, only slower). It covers
   every cache the model owns.
6. Optional ``prefill_rows(index, labels)``: restart cache rows ``index`` (a (R',) long tensor of distinct rows)
   with the conditions ``labels`` (R',): as ``prefill`` does for a whole batch, their valid lengths become 0
   and their class slots are written; every other row keeps its K/V and valid length. Returns the
   :class:`ModelOutput` of those rows' class slots, in ``index`` order. Continuous batching refills the row of
   a complete image with the next request this way; with CFG the sampler passes the cond row and its paired
   uncond row (``index = [b..; b + B..]``, ``labels = [label..; null..]``), so the ``[cond; uncond]`` layout of
   the batch is kept. A model without it runs a job as consecutive batches (correct, only slower). Class
   slots that depend on the label alone may be served from a bank of conditions the model computed since
   its last ``setup_cache`` (LlamaGen c2i: ``condition_bank_size``); ``extra["computed_rows"]`` (a 0-d
   tensor) says how many rows ran through the network, and a call with 0 ran no forward (not counted in NFE).

Built extensions (additive; every earlier sampler keeps working):
* NAR (``genaccel/models/nar.py``; two dimension-oriented heads, the vertical one with its own extra block
  and KV cache): one ``forward_tokens`` whose ``logits`` are the right-neighbour head's and whose
  ``ModelOutput.extra["below"]`` are the vertical head's; its default ``mask`` is the proximity mask (a
  token sees the class slot and every slot on its own or an earlier anti-diagonal), storage stays raster.
  ``rollback`` covers every cache the model owns (they share the valid lengths).
* ZipAR: per-row slots ``(B, L)``, an auxiliary token written at a slot that is later overwritten, an
  explicit causal-by-slot ``mask`` that also exposes unwritten slots, and ``clear_cache()``, which zeroes
  the K/V buffers so those unwritten slots hold zeros as in the reference's freshly allocated caches.
* Token-Shuffle (``genaccel/models/token_shuffle.py``; s x s tokens fused per position): a
  ``tokens_per_position`` attribute (s*s; absent = 1); ``forward_tokens`` takes tokens (B, L, s*s) and
  returns logits (B, L, s*s, V); ``num_image_tokens`` still counts tokens, so NFE and step compression keep
  their meaning; ``decoding_order = "shuffle"``.
* ``decoding_order`` (absent = "raster"): the order a model is trained for; a sampler lists the orders it
  can run (``Sampler.orders``) and refuses others with one line naming the fix.

Planned extensions (designed, not built; each is additive, so today's samplers keep working):
* 1-D tokenizers (FlexTok-style, a chosen number of tokens): ``grid_size`` becomes 0 for "no 2-D layout"
  and the token budget is a ``generate`` argument bounded by ``num_image_tokens``; samplers that rely on the
  grid (``repeat_horizon`` init, NAR, ZipAR) check ``grid_size`` and raise one clear error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch


@dataclass
class ModelOutput:
    """Logits (float32) and final hidden states for every fed position.

    ``extra`` holds further per-position outputs a family provides (NAR: ``{"below": (B, L, V)}`` logits of
    its vertical head); samplers that do not know a key ignore it.
    """

    logits: torch.Tensor
    hidden: torch.Tensor
    extra: dict[str, torch.Tensor] = field(default_factory=dict)


@runtime_checkable
class ARModel(Protocol):
    """Structural type every sampler relies on (see module docstring)."""

    vocab_size: int
    num_classes: int
    null_class: int
    cls_token_num: int
    grid_size: int
    num_image_tokens: int
    hidden_dim: int

    def setup_cache(
        self, batch_size: int, max_seq_len: int | None = None, dtype=None, device=None
    ) -> None: ...

    def prefill(self, labels: torch.Tensor) -> ModelOutput: ...

    def forward_tokens(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor | None = None,
        rope_positions: torch.Tensor | None = None,
    ) -> ModelOutput: ...

    def rollback(self, length) -> None: ...

    # optional: def select_rows(self, index: torch.Tensor) -> None (see the module docstring, call 5)
    # optional: def prefill_rows(self, index: torch.Tensor, labels: torch.Tensor) -> ModelOutput (call 6)

    def clear_cache(self) -> None: ...


def cfg_labels(labels: torch.Tensor, null_class: int, use_cfg: bool) -> torch.Tensor:
    """Batch labels as [cond; uncond] when CFG is on, else unchanged."""
    if not use_cfg:
        return labels
    return torch.cat([labels, torch.full_like(labels, null_class)])


def combine_cfg(logits: torch.Tensor, scale: float, use_cfg: bool) -> torch.Tensor:
    """LlamaGen's guidance ``uncond + scale * (cond - uncond)`` over the [cond; uncond] halves."""
    if not use_cfg:
        return logits
    cond, uncond = logits.chunk(2, dim=0)
    return uncond + scale * (cond - uncond)


def check_labels(labels: torch.Tensor, num_classes: int) -> None:
    """One clear error for class ids a user may get wrong."""
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"class labels must be an integer tensor, got {labels.dtype}")
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if bad.numel():
        raise ValueError(
            f"class id {int(bad[0])} out of range: this model has {num_classes} classes (valid ids 0..{num_classes - 1})"
        )


def reusable_outside_inference(buffer: torch.Tensor) -> bool:
    """Whether a cache buffer may be written in place now: not an inference tensor used outside inference mode."""
    return torch.is_inference_mode_enabled() or not buffer.is_inference()
