"""NAR (Neighboring Autoregressive modeling, arXiv 2503.10696): LlamaGen plus a vertical head.

State-dict compatible with ThisisBillhe/NAR (`NAR-images/autoregressive/models/gpt.py`): the LlamaGen GPT
whose ``layers`` hold ``n_layer + 1`` blocks. The trunk (``layers[:n_layer]``) feeds the horizontal head
(``norm`` -> ``output``: the token to the RIGHT); the extra block ``layers[n_layer]``, with its own KV cache,
feeds the vertical head (``medusa_norm`` -> ``medusa_output``: the token BELOW).

Token (h, w) is decoded at step h + w (its anti-diagonal). Storage, RoPE and KV slots stay in raster order;
only the mask changes: the proximity mask lets an image token see the class slot and every image token
whose Manhattan distance from the top-left is <= its own (shared/reference/parallel.md §2.2).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from genaccel.models.contract import ModelOutput
from genaccel.models.llamagen import GPT_PRESETS, LlamaGenGPT, ModelArgs, RMSNorm

# NAR's configurations: LlamaGen's sizes plus GPT-M (18 layers at 1024); each has one extra head block.
NAR_PRESETS: dict[str, dict] = {
    "NAR-B": GPT_PRESETS["GPT-B"],
    "NAR-M": dict(n_layer=18, n_head=16, dim=1024),
    "NAR-L": GPT_PRESETS["GPT-L"],
    "NAR-XL": GPT_PRESETS["GPT-XL"],
    "NAR-XXL": GPT_PRESETS["GPT-XXL"],
}


def nar_args(name: str, **overrides) -> ModelArgs:
    """ModelArgs of a NAR preset (``n_layer`` counts the trunk, without the extra head block)."""
    if name not in NAR_PRESETS:
        raise ValueError(f"unknown NAR preset {name!r}; available: {', '.join(NAR_PRESETS)}")
    return ModelArgs(**{**NAR_PRESETS[name], **overrides})


def diagonal_index(grid_size: int) -> torch.Tensor:
    """(grid_size**2,) anti-diagonal h + w of every raster cell."""
    cells = torch.arange(grid_size * grid_size)
    return cells // grid_size + cells % grid_size


def diagonal_cells(grid_size: int, diagonal: int) -> torch.Tensor:
    """Raster indices of the cells on one anti-diagonal, by increasing row (NAR's order)."""
    rows = torch.arange(max(0, diagonal - grid_size + 1), min(diagonal, grid_size - 1) + 1)
    return rows * grid_size + (diagonal - rows)


def proximity_mask(grid_size: int, cls_token_num: int = 1, length: int | None = None) -> torch.Tensor:
    """(length, length) bool, True = may attend: causal over the class slots, and image token t sees the
    class slots plus every image token s with diag(s) <= diag(t) (its own diagonal included)."""
    n_image = grid_size * grid_size
    length = length or cls_token_num + n_image
    mask = torch.tril(torch.ones(length, length, dtype=torch.bool))
    d = diagonal_index(grid_size)
    image = slice(cls_token_num, cls_token_num + n_image)
    mask[image, image] = d[None, :] <= d[:, None]
    return mask


class NARModel(LlamaGenGPT):
    """LlamaGen trunk + vertical head, implementing the sampler contract (see genaccel.models.contract)."""

    condition_bank_size = 0  # its vertical head keeps caches of its own that a banked refill would not restart

    decoding_order = "diagonal"  # only samplers for next-neighbour decoding may run it (Sampler.orders)

    def __init__(self, args: ModelArgs):
        super().__init__(args)
        self.medusa_norm = RMSNorm(args.dim, args.norm_eps)
        self.medusa_output = nn.Linear(args.dim, args.vocab_size, bias=False)
        self._proximity: torch.Tensor | None = None

    @staticmethod
    def drop_path_rates(args: ModelArgs) -> list[float]:
        """n_layer + 1 blocks (trunk + vertical head), rates as NAR's torch.linspace(0, rate, n_layer + 1)."""
        return [args.drop_path_rate * i / max(1, args.n_layer) for i in range(args.n_layer + 1)]

    # ----------------------------------------------------------------- masks
    def proximity(self, length: int) -> torch.Tensor:
        """The proximity mask over ``length`` cache slots (cached per length)."""
        if self._proximity is None or self._proximity.shape[0] != length:
            self._proximity = proximity_mask(self.grid_size, self.cls_token_num, length)
        return self._proximity

    def default_mask(self, positions: torch.Tensor, kv_len: int) -> torch.Tensor:
        """Proximity rows of the fed slots over the first ``kv_len`` slots: (1, L, kv_len) for slots shared by
        every row (broadcast over the batch), (B, L, kv_len) for per-row slots."""
        pos = positions if positions.dim() == 2 else positions[None]
        table = self.proximity(self.max_seq_len).to(pos.device)
        return table[pos][..., :kv_len]

    # ----------------------------------------------------------------- both heads
    def _run_blocks(self, h, freqs, positions=None, mask=None, kv_len=None) -> ModelOutput:
        n = self.args.n_layer
        for layer in self.layers[:n]:
            h = layer(h, freqs, positions, mask, kv_len)
        below = self.layers[n](h, freqs, positions, mask, kv_len)
        h = self.norm(h)
        below_logits = self.medusa_output(self.medusa_norm(below)).float()
        return ModelOutput(logits=self.output(h).float(), hidden=h, extra={"below": below_logits})

    def teacher_forced(self, labels: torch.Tensor, tokens: torch.Tensor) -> ModelOutput:
        """NAR's training objective: per-cell logits (B, n*n, V) in raster order from one forward over
        [class, all tokens] under the proximity mask.

        Cell (0, 0): mean of both heads at the class slot; first row: the right head at (0, w-1); first
        column: the vertical head at (h-1, 0); interior: mean of right-of-(h, w-1) and below-(h-1, w).
        """
        T, n = self.cls_token_num, self.grid_size
        cond = self.cls_embedding(labels)[:, :T]
        h = self.tok_dropout(torch.cat([cond, self.tok_embeddings(tokens)], dim=1))
        freqs = self.freqs_cis[: h.shape[1]].to(h.device)[None]
        mask = self.proximity(h.shape[1]).to(h.device)[None, None]
        out = self._run_blocks(h, freqs, mask=mask)
        right, below = out.logits[:, T - 1 :], out.extra["below"][:, T - 1 :]
        return ModelOutput(logits=cell_logits(right, below, n), hidden=out.hidden[:, T - 1 :])


def cell_logits(right: torch.Tensor, below: torch.Tensor, grid_size: int) -> torch.Tensor:
    """Combine both heads' outputs at [last class slot, cells 0..n*n-1] (B, 1 + n*n, V) into each cell's logits."""
    B, _, V = right.shape
    n = grid_size
    first = (right[:, 0] + below[:, 0]) / 2
    r = right[:, 1:].reshape(B, n, n, V)  # r[h, w] predicts (h, w + 1)
    b = below[:, 1:].reshape(B, n, n, V)  # b[h, w] predicts (h + 1, w)
    logits = torch.empty(B, n, n, V, dtype=right.dtype, device=right.device)
    logits[:, 0, 0] = first
    logits[:, 0, 1:] = r[:, 0, :-1]
    logits[:, 1:, 0] = b[:, :-1, 0]
    logits[:, 1:, 1:] = (r[:, 1:, :-1] + b[:, :-1, 1:]) / 2
    return logits.reshape(B, n * n, V)


def build_nar(name: str | None = None, **overrides) -> NARModel:
    """A NAR model from a preset name and/or explicit ModelArgs fields."""
    return NARModel(nar_args(name, **overrides) if name else ModelArgs(**overrides))

