"""Hugging Face AR image generators on the sampler contract: Janus(-Pro) and Emu3 through ``transformers``.

"My model, my processor, your sampler": wrap a ``JanusForConditionalGeneration`` or an
``Emu3ForConditionalGeneration`` (weights and prompts prepared as for its own ``generate``) and every raster
sampler -- ``ar``, ``sjd``, ``mcsjd``, ``gsd``, ``lantern``, ``sd`` -- runs on it::

    adapter = wrap_hf_model(model, prompts=processor(text=..., generation_mode="image")["input_ids"])
    sampler = build_hf_sampler("sjd", adapter, cfg_scale=5.0)
    tokens = sampler.generate(adapter, torch.arange(adapter.num_classes)).tokens  # codebook ids, raster order

Prompts as classes. The contract's "labels" index the prompts given to the adapter (``num_classes`` of them);
the null class ``num_classes`` is the unconditional prompt of each family's CFG convention, built per row from
the conditional prompt it is paired with (rows ``[cond_0..cond_{B-1}; uncond_0..uncond_{B-1}]``, as
:func:`genaccel.models.contract.cfg_labels` lays them out):

* Janus (``generate(generation_mode="image")``): the same prompt with every token except BOS and
  ``<begin_of_image>`` replaced by the pad token; logits come from the generation head (``gen_head``) over
  the VQ codebook, image tokens are fed through ``generation_embeddings`` + ``generation_aligner``.
* Emu3: a negative prompt (``negative_prompt_ids``, processed like the prompt) or, without one, the prompt's
  last token, as ``UnbatchedClassifierFreeGuidanceLogitsProcessor`` does. Image tokens are text-vocabulary
  ids ``<|visual token NNNNNN|>``; logits are the LM head restricted to them in codebook order (what the
  prefix-constrained generation samples from: every other token is -inf). An end-of-line token
  (``<|extra_200|>``) follows every row of ``width`` tokens; the adapter feeds it itself, so samplers see
  only the ``height * width`` codebook tokens. Guidance on the restricted logits gives the same distribution
  as HF's log-softmax guidance over the full vocabulary (the two differ by a per-row constant).

Cache layout. Contract slot ``s < cls_token_num`` holds prompt token ``s`` (prompts are left-padded to a
common length ``cls_token_num``; padding slots are never attended), slot ``cls_token_num + i`` image token i.
The adapter keeps its own K/V buffers (:class:`SlotCache`, handed to the HF decoder in place of its cache)
so that every row writes at its own slots and reads through a mask: per-row valid lengths, rollback without
copying and ``select_rows``, as the contract asks. RoPE positions count real tokens only (a row's position =
its slot minus its padding, as ``generate`` derives them from the attention mask).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from genaccel.models.contract import ModelOutput

MIN_TRANSFORMERS = "5.17.0"


def require_transformers_class(name: str):
    """The ``transformers`` class ``name``, or one clear error naming the package and the version needed."""
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - transformers is a dependency
        raise ImportError(f"the Hugging Face adapter needs transformers>={MIN_TRANSFORMERS}: pip install "
                          f"'transformers>={MIN_TRANSFORMERS}'") from e
    cls = getattr(transformers, name, None)
    if cls is None:
        raise ImportError(f"transformers {transformers.__version__} has no {name}; the Hugging Face adapter needs "
                          f"transformers>={MIN_TRANSFORMERS}: pip install -U 'transformers>={MIN_TRANSFORMERS}'")
    return cls


class SlotCache:
    """K/V buffers (R, H, S + 1, D) per layer, written at per-row slots; stands in for the HF ``Cache``.

    The HF attention layers call ``update(key, value, layer_idx, ...)`` and attend over what it returns; this
    one scatters the new keys/values to ``write_slots`` (R, L) and returns the whole buffer, so a 4-D mask
    over all slots decides what each query sees. The extra last slot is scratch for padding entries.
    """

    def __init__(self, rows: int, slots: int):
        self.rows, self.slots = rows, slots
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.write_slots: torch.Tensor | None = None

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Write (R, H, L, D) ``key``/``value`` at ``write_slots``; return the full buffers of ``layer_idx``."""
        if layer_idx not in self.keys:
            R, H, _, D = key.shape
            self.keys[layer_idx] = key.new_zeros(R, H, self.slots + 1, D)
            self.values[layer_idx] = value.new_zeros(R, H, self.slots + 1, D)
        k, v = self.keys[layer_idx], self.values[layer_idx]
        index = self.write_slots[:, None, :, None].expand(-1, key.shape[1], -1, key.shape[3])
        k.scatter_(2, index, key.to(k.dtype))
        v.scatter_(2, index, value.to(v.dtype))
        return k, v

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.slots

    def select_rows(self, index: torch.Tensor) -> None:
        for d in (self.keys, self.values):
            for i in d:
                d[i] = d[i].index_select(0, index)
        self.rows = int(index.numel())

    def clear(self) -> None:
        for d in (self.keys, self.values):
            for t in d.values():
                t.zero_()


def as_prompt_list(prompts, attention_mask: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Prompts as a list of 1-D id tensors: a list of id sequences, or a (P, S) tensor with an optional
    attention mask (a processor's padded batch; masked positions are dropped, left or right padding)."""
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() == 1:
            prompts = prompts[None]
        if prompts.dim() != 2:
            raise ValueError(f"prompt ids must be (num_prompts, length) or a list of 1-D id sequences, got shape "
                             f"{tuple(prompts.shape)}")
        mask = torch.ones_like(prompts, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        if mask.shape != prompts.shape:
            raise ValueError(f"attention_mask shape {tuple(mask.shape)} differs from the prompt ids' "
                             f"{tuple(prompts.shape)}; pass the processor's input_ids and attention_mask together")
        out = [row[m] for row, m in zip(prompts, mask)]
    else:
        if attention_mask is not None:
            raise ValueError("attention_mask applies to a (num_prompts, length) tensor of ids; a list of prompts "
                             "carries no padding")
        out = [torch.as_tensor(p, dtype=torch.long).flatten() for p in prompts]
    if not out or any(p.numel() == 0 for p in out):
        raise ValueError("give at least one prompt, each with at least one token (the processor's input_ids)")
    return [p.long().cpu() for p in out]


class HFImageAdapter(torch.nn.Module):
    """Shared machinery: prompts as classes, the per-row slot cache, masks and positions over it.

    Subclasses say how a family embeds image tokens (:meth:`embed_image`), turns final hidden states into
    image-token logits (:meth:`image_logits`), builds an unconditional prompt (:meth:`uncond_prompt`), and
    which fixed tokens the sequence carries between image rows (``eol_token``, ``width``).
    """

    decoding_order = "raster"
    eol_token: int | None = None  # a text token after every image row (Emu3), fed by the adapter

    def __init__(self, model, decoder, prompts, attention_mask, height: int, width: int, vocab_size: int):
        super().__init__()
        self.hf = model
        self.decoder = decoder
        self.prompts = as_prompt_list(prompts, attention_mask)
        self.height, self.width = int(height), int(width)
        self.vocab_size = int(vocab_size)
        self.num_image_tokens = self.height * self.width
        # grid_size is the row width: repeat_horizon copies along it; grid-geometry samplers need height == width
        self.grid_size = self.width
        self.num_classes = len(self.prompts)
        self.null_class = self.num_classes
        self.hidden_dim = int(decoder.config.hidden_size)
        self.cls_token_num = self.prompt_slots()
        self._cache_kwarg = "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"
        self.cache: SlotCache | None = None

    # ------------------------------------------------------------------ family hooks
    def embed_prompt(self, ids: torch.Tensor) -> torch.Tensor:
        return self.hf.get_input_embeddings()(ids)

    def embed_image(self, tokens: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def image_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def uncond_prompt(self, prompt: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def codebook(self) -> torch.Tensor:  # pragma: no cover - abstract
        """The image tokenizer's code vectors (V, d) in the geometry its quantizer uses (GSD/LANTERN neighbours)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ layout
    def prompt_slots(self) -> int:
        """Prompt slots: the longest conditional or unconditional prompt (shorter ones are left-padded)."""
        return max(max(p.numel(), self.uncond_prompt(p).numel()) for p in self.prompts)

    @property
    def rows_per_line(self) -> int:
        """Sequence entries per image row: ``width`` tokens, plus the end-of-line token if the family has one."""
        return self.width + (self.eol_token is not None)

    def hf_slot(self, slots: torch.Tensor) -> torch.Tensor:
        """Cache slot in the HF sequence of contract slot(s): image token i moves past the EOLs before it."""
        T = self.cls_token_num
        i = (slots - T).clamp(min=0)
        return torch.where(slots < T, slots, T + i + (i // self.width) * (self.rows_per_line - self.width))

    def key_owner(self, device) -> torch.Tensor:
        """(S_hf + 1,) the contract slot each HF cache slot belongs to (an EOL belongs to the token before it;
        the scratch slot to none, -1)."""
        T, N = self.cls_token_num, self.num_image_tokens
        contract = torch.arange(T + N, device=device)
        owner = torch.full((self.hf_slots + 1,), -1, dtype=torch.long, device=device)
        owner[self.hf_slot(contract)] = contract
        if self.eol_token is not None:
            ends = T + torch.arange(self.height, device=device) * self.width + self.width - 1
            owner[self.hf_slot(ends) + 1] = ends
        return owner

    @property
    def hf_slots(self) -> int:
        return self.cls_token_num + self.height * self.rows_per_line

    # ------------------------------------------------------------------ contract
    def setup_cache(self, batch_size: int, max_seq_len: int | None = None, dtype=None, device=None) -> None:
        """Fresh per-row K/V buffers for ``batch_size`` rows (allocated at the first forward, in its dtype)."""
        need = self.cls_token_num + self.num_image_tokens
        if max_seq_len is not None and max_seq_len > need:
            raise ValueError(f"max_seq_len {max_seq_len} exceeds the {need} slots of this adapter (prompt slots "
                             f"{self.cls_token_num} + {self.num_image_tokens} image tokens)")
        self.cache = SlotCache(batch_size, self.hf_slots)
        dev = self._device
        self.valid = torch.zeros(batch_size, dtype=torch.long, device=dev)
        self.pad = torch.zeros(batch_size, dtype=torch.long, device=dev)
        self._owner = self.key_owner(dev)

    @property
    def _device(self) -> torch.device:
        return next(self.hf.parameters()).device

    def row_prompts(self, labels: torch.Tensor) -> list[torch.Tensor]:
        """The prompt of every row: ``labels[r]``'s prompt, or for a null row the unconditional prompt of the
        conditional row it is paired with (the contract's [cond; uncond] halves)."""
        labels = labels.tolist()
        R, null = len(labels), self.null_class
        half = R // 2
        paired = R % 2 == 0 and all(v == null for v in labels[half:]) and all(v != null for v in labels[:half])
        rows = []
        for r, v in enumerate(labels):
            if not 0 <= v <= null:
                raise ValueError(f"prompt index {v} out of range: this adapter holds {self.num_classes} prompts "
                                 f"(0..{self.num_classes - 1}; {null} = unconditional)")
            if v != null:
                rows.append(self.prompts[v])
            elif paired:
                rows.append(self.uncond_prompt(self.prompts[labels[r - half]]))
            else:
                raise ValueError("an unconditional row must pair with a conditional one: rows are "
                                 "[cond_0..cond_{B-1}; uncond_0..uncond_{B-1}] (genaccel.models.contract.cfg_labels)")
        return rows

    def prefill(self, labels: torch.Tensor) -> ModelOutput:
        """Write every row's (left-padded) prompt into slots 0..cls_token_num-1; return the logits and final
        hidden state at the last prompt slot (the ones that predict image token 0; samplers read only those)."""
        if self.cache is None or self.cache.rows != labels.shape[0]:
            self.setup_cache(labels.shape[0])
        T, dev = self.cls_token_num, self._device
        rows = self.row_prompts(labels)
        ids = torch.zeros(len(rows), T, dtype=torch.long)
        for r, p in enumerate(rows):
            ids[r, T - p.numel():] = p
        self.pad = torch.tensor([T - p.numel() for p in rows], device=dev)
        self.valid = torch.zeros(len(rows), dtype=torch.long, device=dev)
        slots = torch.arange(T, device=dev).expand(len(rows), -1)
        hidden = self._run(self.embed_prompt(ids.to(dev)), slots, slots, None, None)
        last = hidden[:, -1:]
        return ModelOutput(logits=self.image_logits(last).float(), hidden=last)

    def forward_tokens(self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None = None,
                       rope_positions: torch.Tensor | None = None) -> ModelOutput:
        """Feed image tokens (R, L) at contract slots ``positions`` ((L,) or (R, L)); see the contract.

        With an end-of-line token, each token that ends an image row is followed by it in the HF sequence, and
        the output at that token is the EOL's (the one that predicts the next row's first token).
        """
        R, L = tokens.shape
        dev = tokens.device
        slots = positions.to(dev).expand(R, L) if positions.dim() == 1 else positions.to(dev)
        T, W = self.cls_token_num, self.width
        if self.cache is None:
            raise RuntimeError("call setup_cache and prefill before forward_tokens")
        if int(slots.min()) < T or int(slots.max()) >= T + self.num_image_tokens:
            raise ValueError(f"image-token slots must lie in [{T}, {T + self.num_image_tokens}) (prompt slots come "
                             f"first), got {int(slots.min())}..{int(slots.max())}")
        hf = self.hf_slot(slots)
        rope = hf if rope_positions is None else self.hf_slot(rope_positions.to(dev).expand(R, L))
        embeds = self.embed_image(tokens)
        if self.eol_token is None:
            return self._finish(self._run(embeds, slots, hf, mask, rope))
        # entries: every token, plus an EOL after each token that ends an image row
        eol = ((slots - T) % W == W - 1) & (slots >= T)
        count = 1 + eol.long()
        start = count.cumsum(1) - count
        E = int(count.sum(1).max())
        scratch = self.hf_slots
        entry_hf = torch.full((R, E), scratch, dtype=torch.long, device=dev)
        entry_rope = torch.zeros(R, E, dtype=torch.long, device=dev)
        entry_owner = torch.full((R, E), -1, dtype=torch.long, device=dev)
        entry_token = torch.zeros(R, E, dtype=torch.long, device=dev)  # which fed token's mask row applies
        entry_embeds = embeds.new_zeros(R, E, embeds.shape[-1])
        entry_hf.scatter_(1, start, hf)
        entry_rope.scatter_(1, start, rope)
        entry_owner.scatter_(1, start, slots)
        entry_token.scatter_(1, start, torch.arange(L, device=dev).expand(R, L))
        entry_embeds.scatter_(1, start[..., None].expand_as(embeds), embeds)
        eol_embed = self.embed_prompt(torch.tensor([self.eol_token], device=dev))[0]
        r, j = eol.nonzero(as_tuple=True)
        e = start[r, j] + 1
        entry_hf[r, e], entry_rope[r, e], entry_owner[r, e] = hf[r, j] + 1, rope[r, j] + 1, slots[r, j]
        entry_token[r, e] = j
        entry_embeds[r, e] = eol_embed.to(entry_embeds.dtype)
        hidden = self._run(entry_embeds, entry_owner, entry_hf, mask, entry_rope, token_of_entry=entry_token)
        out_entry = start + eol.long()
        return self._finish(hidden.gather(1, out_entry[..., None].expand(-1, -1, hidden.shape[-1])))

    def rollback(self, length) -> None:
        """Only contract slots < ``length`` (int or (R,) tensor) stay valid; nothing is copied. Slots written
        by a forward become valid, as in LlamaGen's cache."""
        length = torch.as_tensor(length, device=self.valid.device)
        self.valid = torch.minimum(self.valid, length.expand_as(self.valid))

    def select_rows(self, index: torch.Tensor) -> None:
        """Keep cache rows ``index`` (with their K/V, padding and valid lengths)."""
        index = index.to(self.valid.device)
        self.cache.select_rows(index)
        self.valid, self.pad = self.valid[index], self.pad[index]

    def clear_cache(self) -> None:
        """Zero every K/V buffer (unwritten slots then hold zeros)."""
        if self.cache is not None:
            self.cache.clear()

    # ------------------------------------------------------------------ internals
    def _finish(self, hidden: torch.Tensor) -> ModelOutput:
        return ModelOutput(logits=self.image_logits(hidden).float(), hidden=hidden)

    def _run(self, embeds: torch.Tensor, owner_q: torch.Tensor, hf_q: torch.Tensor, mask: torch.Tensor | None,
             rope: torch.Tensor | None, token_of_entry: torch.Tensor | None = None) -> torch.Tensor:
        """One decoder forward over entries (R, E) written at HF slots ``hf_q``; returns final hidden states.

        ``owner_q`` is each entry's contract slot (-1: padding entry); visibility is decided on contract slots
        (``mask`` or the default: slots <= own that are valid or written now, never prompt padding), then
        refined on HF slots so an entry never sees a later entry of the same contract slot (its own EOL).
        """
        R, E = owner_q.shape
        dev = embeds.device
        S_c = self.cls_token_num + self.num_image_tokens
        k = torch.arange(S_c, device=dev)
        real_q = owner_q >= 0
        if mask is None:
            written = torch.zeros(R, S_c + 1, dtype=torch.bool, device=dev)
            written.scatter_(1, torch.where(real_q, owner_q, S_c), True)
            seen = (k[None, :] < self.valid[:, None]) | written[:, :S_c]  # (R, S_c)
            vis = (k[None, None, :] <= owner_q[..., None]) & seen[:, None, :]
        else:
            mask = mask.to(dev).expand(R, -1, -1)[..., :S_c]
            vis = mask if token_of_entry is None else mask.gather(1, token_of_entry[..., None].expand(-1, -1, S_c))
        vis = vis & (k[None, None, :] >= self.pad[:, None, None]) & real_q[..., None]
        owner_k = self._owner  # (S_hf + 1,)
        vis_hf = vis.gather(2, owner_k.clamp(min=0)[None, None, :].expand(R, E, -1)) & (owner_k >= 0)
        same = owner_k[None, None, :] == owner_q[..., None]
        hf_k = torch.arange(owner_k.numel(), device=dev)
        vis_hf &= ~same | (hf_k[None, None, :] <= hf_q[..., None])
        dtype = embeds.dtype
        float_mask = torch.zeros(R, 1, E, owner_k.numel(), dtype=dtype, device=dev)
        float_mask.masked_fill_(~vis_hf[:, None], torch.finfo(dtype).min)
        if rope is None:
            rope = hf_q
        pad_hf = self.pad[:, None]  # padding sits in prompt slots, before every HF slot of a real token
        position_ids = (rope - pad_hf).clamp(min=0)
        self.cache.write_slots = hf_q
        out = self.decoder(inputs_embeds=embeds, attention_mask=float_mask, position_ids=position_ids,
                           use_cache=True, **{self._cache_kwarg: self.cache})
        # written slots become valid (as LlamaGen's cache: a later rollback shrinks the valid length again)
        self.valid = torch.maximum(self.valid, owner_q.max(dim=1).values + 1)
        return out.last_hidden_state


class JanusImageAdapter(HFImageAdapter):
    """``JanusForConditionalGeneration`` in image-generation mode (Janus / Janus-Pro through transformers).

    ``prompts``: the processor's ids for ``generation_mode="image"`` (they end with ``<begin_of_image>``).
    The image is ``num_image_tokens`` of the vision config (a square grid, 24 x 24 for Janus-Pro).
    ``bos_token_id`` / ``boi_token_id`` / ``pad_token_id`` default to the model's generation config, as
    its ``generate`` reads them for the unconditional rows.
    """

    def __init__(self, model, prompts, attention_mask: torch.Tensor | None = None, *, bos_token_id: int | None = None,
                 boi_token_id: int | None = None, pad_token_id: int | None = None):
        cls = require_transformers_class("JanusForConditionalGeneration")
        if not isinstance(model, cls):
            raise TypeError(f"JanusImageAdapter wraps a JanusForConditionalGeneration, got {type(model).__name__}")
        gen = model.generation_config
        self.bos = bos_token_id if bos_token_id is not None else gen.bos_token_id
        kw = getattr(gen, "generation_kwargs", None) or {}
        self.boi = boi_token_id if boi_token_id is not None else kw.get("boi_token_id")
        self.pad_id = pad_token_id if pad_token_id is not None else gen.pad_token_id
        missing = [n for n, v in (("bos_token_id", self.bos), ("boi_token_id", self.boi), ("pad_token_id", self.pad_id))
                   if v is None]
        if missing:
            raise ValueError(f"Janus CFG needs {', '.join(missing)}: the model's generation_config lacks them "
                             "(boi_token_id lives in generation_config.generation_kwargs); pass them to the adapter")
        n = int(model.model.vision_model.config.num_image_tokens)
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"Janus image of {n} tokens is not a square grid; vision_config.num_image_tokens must be "
                             "a square (576 = 24 x 24 for Janus-Pro)")
        vocab = model.model.vqmodel.config.num_embeddings
        super().__init__(model, model.model.language_model, prompts, attention_mask, side, side, vocab)

    def embed_image(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.hf.prepare_embeddings_for_image_generation(tokens)

    def image_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.hf.model.generation_head(hidden)

    def uncond_prompt(self, prompt: torch.Tensor) -> torch.Tensor:
        keep = (prompt == self.bos) | (prompt == self.boi)
        return torch.where(keep, prompt, torch.full_like(prompt, self.pad_id))

    @property
    def codebook(self) -> torch.Tensor:
        """Janus VQ codes, l2-normalised as its decoder looks them up (``get_codebook_entry``)."""
        return F.normalize(self.hf.model.vqmodel.quantize.embedding.weight.detach().float(), dim=-1)


class Emu3ImageAdapter(HFImageAdapter):
    """``Emu3ForConditionalGeneration`` generating an image of ``height x width`` tokens.

    ``prompts``: the processor's ids for ``return_for_image_generation=True`` (they end with
    ``<|image start|>{h}*{w}<|image token|>``); ``height``/``width`` in tokens, as its
    ``prefix_allowed_tokens_fn`` uses them (``image_sizes // spatial factor``). ``negative_prompt_ids``: the
    unconditional context for CFG (1-D, processed like a prompt); without it, each prompt's last token.
    """

    def __init__(self, model, prompts, attention_mask: torch.Tensor | None = None, *, height: int, width: int,
                 negative_prompt_ids: Sequence[int] | torch.Tensor | None = None):
        cls = require_transformers_class("Emu3ForConditionalGeneration")
        if not isinstance(model, cls):
            raise TypeError(f"Emu3ImageAdapter wraps an Emu3ForConditionalGeneration, got {type(model).__name__}")
        mapping = model.vocabulary_mapping
        img2bpe = mapping.img2bpe
        V = len(img2bpe)
        if sorted(img2bpe) != list(range(V)):
            raise ValueError("Emu3 vocabulary_map must hold <|visual token 000000|>.. for codes 0..V-1 without gaps")
        if mapping.eol_token_id is None:
            raise ValueError("Emu3 vocabulary_map has no end-of-line token <|extra_200|>")
        if height < 1 or width < 1:
            raise ValueError(f"height and width are image tokens (>= 1), got {height} x {width}")
        self.eol_token = int(mapping.eol_token_id)
        self.negative = None if negative_prompt_ids is None else torch.as_tensor(negative_prompt_ids).long().flatten().cpu()
        super().__init__(model, model.model.text_model, prompts, attention_mask, height, width, V)
        self.register_buffer("visual_ids", torch.tensor([img2bpe[i] for i in range(V)]), persistent=False)
        self.visual_ids = self.visual_ids.to(self._device)

    def embed_image(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.embed_prompt(self.visual_ids[tokens])

    def image_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head's visual rows only (V of its ~185k outputs); the slice is cached until the weight changes."""
        w, b = self.hf.lm_head.weight, self.hf.lm_head.bias
        key = (w.data_ptr(), w._version, w.dtype, w.device)
        if getattr(self, "_head_key", None) != key:
            self._head = (w[self.visual_ids], None if b is None else b[self.visual_ids])
            self._head_key = key
        return F.linear(hidden, *self._head)

    def uncond_prompt(self, prompt: torch.Tensor) -> torch.Tensor:
        return self.negative if self.negative is not None else prompt[-1:]

    def to_hf_sequence(self, tokens: torch.Tensor) -> torch.Tensor:
        """Codebook tokens (B, H*W) as the ids Emu3's ``generate`` emits: visual ids with an EOL after each row."""
        B = tokens.shape[0]
        ids = self.visual_ids[tokens].view(B, self.height, self.width)
        eol = torch.full((B, self.height, 1), self.eol_token, dtype=ids.dtype, device=ids.device)
        return torch.cat([ids, eol], dim=2).flatten(1)

    @property
    def codebook(self) -> torch.Tensor:
        """Emu3 VQ codes as its quantizer compares them (raw vectors, squared-distance argmin)."""
        return self.hf.model.vqmodel.quantize.embedding.weight.detach().float()


def wrap_hf_model(model, prompts, attention_mask: torch.Tensor | None = None, **kwargs) -> HFImageAdapter:
    """The contract adapter for a transformers AR image generator (Janus or Emu3), by the model's class."""
    name = type(model).__name__
    if name == "JanusForConditionalGeneration":
        return JanusImageAdapter(model, prompts, attention_mask, **kwargs)
    if name == "Emu3ForConditionalGeneration":
        return Emu3ImageAdapter(model, prompts, attention_mask, **kwargs)
    raise TypeError(f"no Hugging Face adapter for {name}: supported are JanusForConditionalGeneration and "
                    "Emu3ForConditionalGeneration")


def build_hf_sampler(name: str, adapter: HFImageAdapter, **options):
    """``build_sampler(name, **options)`` with GSD/LANTERN neighbours from the adapter's own image tokenizer."""
    from genaccel.samplers import build_sampler

    sampler = build_sampler(name, **options)
    if hasattr(sampler, "set_codebook") and not getattr(sampler.options, "codebook", ""):
        sampler.set_codebook(adapter.codebook)
    return sampler


__all__ = ["Emu3ImageAdapter", "HFImageAdapter", "JanusImageAdapter", "SlotCache", "build_hf_sampler",
           "require_transformers_class", "wrap_hf_model"]
