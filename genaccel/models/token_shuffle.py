"""Token-Shuffle (arXiv 2504.17789): s x s neighbouring tokens fused into one transformer position.

A LlamaGen c2i backbone whose sequence holds one position per s x s window of the n x n token grid, so an
image takes (n/s)**2 positions instead of n**2 (16x16 tokens at s = 2: 64 positions, 4x fewer). There is
no official code; this file follows the paper as summarised in shared/reference/parallel.md §5:

* token-shuffle (input): every token embedding (dim d) goes through one SHARED linear map d -> d/s**2, the
  s**2 compressed embeddings of a window are concatenated along channels into one vector of width d, then
  ``shuffle_blocks`` residual MLP blocks refine it (the paper found 2 enough).
* the backbone: LlamaGen's transformer blocks, unchanged, with causal attention over fused positions.
* token-unshuffle (output): ``unshuffle_blocks`` residual MLP blocks on the final hidden state, its channels
  split into s**2 parts of d/s**2 (same order as the input concatenation), a shared map d/s**2 -> d per
  part, then the backbone's final norm and LM head: s**2 logit vectors per position.

Choices the paper leaves open, and what this file does:

1. Window layout. Windows are numbered in raster order on the coarse (n/s) x (n/s) grid; inside a window
   token (i, j) (row i, column j, 0 <= i, j < s) is part k = i * s + j (row-major). Fine cell
   (r, c) = (p_r * s + i, p_c * s + j) belongs to window p = p_r * (n/s) + p_c. :func:`shuffle_tokens` /
   :func:`unshuffle_tokens` are this bijection and its inverse; channel block k of the fused embedding is
   part k, and output part k predicts token k of the window.
2. Compression before concatenation (project-then-concat, the paper's order; one unofficial README
   describes concat-then-project). The compression and the expansion are single bias-free ``nn.Linear``
   layers (LlamaGen has no biases anywhere); the paper's "MLP d/s**2 -> d" is read as one linear layer, the
   nonlinearity living in the residual blocks next to it. This also lets s = 1 be exactly the identity.
3. Residual MLP block (:class:`ResidualMLP`): ``x + W_down(GELU(W_up(RMSNorm(x))))``, hidden width d, no
   biases, pre-norm like the transformer blocks. ``W_down`` is zero-initialised, so a fresh block is the
   identity and training starts from the plain shuffle/unshuffle maps.
4. The unshuffle blocks read the last transformer block's output BEFORE the final norm; the final RMSNorm
   and the LM head are the backbone's, shared by the s**2 parts (the paper: "the normal LM head").
5. Positions. One cache slot and one RoPE position per window; LlamaGen's 2-D RoPE on the COARSE grid
   (window row, window column); class slots as in LlamaGen (``cls_token_num`` slots, zero RoPE).
6. Objective. Position p (the last class slot for p = 0, window p - 1 otherwise) predicts the s**2 tokens
   of window p from [class, windows 0..p-1]: next-WINDOW prediction; the s**2 tokens of one window are
   predicted independently given that prefix (cross-entropy over all tokens).
7. Token dropout (``token_dropout_p``) acts on the fused sequence, where LlamaGen applies it to embeddings.
8. ``ModelOutput.hidden`` is per token, (B, L, s**2, d): the normed state the LM head reads for each part.
9. Optional intra-window head (``intra_window_head``; the issue's "sequential within the window" option, not
   in the paper). :class:`IntraWindowHead` lets part k also see the tokens of parts j < k of its own window:
   each of those tokens' embeddings is compressed d -> d/s**2 (its own map), placed in channel block j of a
   width-d context (blocks j >= k zero), and one residual MLP on [part k's expanded state + context] adjusts
   the state before the shared norm and LM head. Its output layer starts at zero, so a fresh head gives the
   independent logits. Trained jointly (the recipe adds its teacher-forced cross-entropy, ground-truth
   earlier parts, to the independent one), used by ``token-shuffle --window-sampling sequential``.

Identity at s = 1 (checked by the tests). With s = 1 the compression and expansion are d x d maps; set both
to the identity and zero every residual block's ``W_down`` (:func:`make_identity_shuffle`) and the model
computes exactly LlamaGen's logits with the same backbone weights: identity matmuls and ``x + 0`` are exact
in floating point.

Sampler contract (:mod:`genaccel.models.contract`, the planned ``tokens_per_position`` extension):
``forward_tokens`` takes tokens (B, L, s**2) (window p written at slot ``cls_token_num + p``) and returns
logits (B, L, s**2, V); ``grid_size`` is the fine token grid n (images decode as for LlamaGen) and
``num_image_tokens`` = n * n counts tokens, so NFE and step compression keep their meaning;
``decoding_order = "shuffle"``, so raster samplers refuse the model.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from genaccel.models.contract import ModelOutput
from genaccel.models.llamagen import LlamaGenGPT, ModelArgs, RMSNorm, precompute_freqs_cis_2d
from genaccel.models.loading import CheckpointError, config_from_metadata, load_strict, read_state_dict


# ----------------------------------------------------------------------------- configuration
@dataclass
class TokenShuffleArgs:
    """The fields Token-Shuffle adds to a LlamaGen backbone's :class:`ModelArgs`.

    ``window`` is the shuffle window s (tokens fused per position = s * s; the paper's default 2);
    ``shuffle_blocks`` / ``unshuffle_blocks`` count the residual MLP blocks on each side (paper: 2);
    ``intra_window_head`` adds the optional head for sequential sampling inside a window (docstring item 9).
    """

    window: int = 2
    shuffle_blocks: int = 2
    unshuffle_blocks: int = 2
    intra_window_head: bool = False

    def check(self, args: ModelArgs) -> None:
        """Raise one clear error when the window does not fit the backbone's grid or width."""
        if self.window < 1:
            raise ValueError(f"token-shuffle window must be >= 1 (1 = no fusion, paper default 2), got {self.window}")
        if self.shuffle_blocks < 0 or self.unshuffle_blocks < 0:
            raise ValueError("shuffle_blocks and unshuffle_blocks must be >= 0")
        if args.grid_size % self.window:
            raise ValueError(f"token-shuffle window {self.window} must divide the token grid side {args.grid_size}")
        if args.dim % (self.window * self.window):
            raise ValueError(f"dim {args.dim} must be divisible by window**2 = {self.window ** 2} (channel split)")

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


# ----------------------------------------------------------------------------- token layout
def shuffle_tokens(tokens: torch.Tensor, window: int) -> torch.Tensor:
    """Raster tokens (B, n*n, *rest) -> windows (B, (n/s)**2, s*s, *rest) in the layout of the module docstring.

    Window p = raster index on the coarse grid; part k = i * s + j inside it. Trailing dimensions (logits,
    hidden states) ride along, so the same function reorders tokens and per-token outputs.
    """
    n = math.isqrt(tokens.shape[1])
    if n * n != tokens.shape[1] or n % window:
        raise ValueError(f"{tokens.shape[1]} tokens are not an n x n grid with n divisible by window {window}")
    m, rest = n // window, tokens.shape[2:]
    grid = tokens.reshape(tokens.shape[0], m, window, m, window, *rest)  # (B, p_r, i, p_c, j, *rest)
    grid = grid.transpose(2, 3)  # (B, p_r, p_c, i, j, *rest)
    return grid.reshape(tokens.shape[0], m * m, window * window, *rest)


def unshuffle_tokens(windows: torch.Tensor, window: int) -> torch.Tensor:
    """Windows (B, (n/s)**2, s*s, *rest) -> raster tokens (B, n*n, *rest); the exact inverse of shuffle_tokens."""
    m = math.isqrt(windows.shape[1])
    if m * m != windows.shape[1] or windows.shape[2] != window * window:
        raise ValueError(f"windows of shape {tuple(windows.shape)} are not (B, m*m, {window * window}, ...)")
    rest = windows.shape[3:]
    grid = windows.reshape(windows.shape[0], m, m, window, window, *rest)  # (B, p_r, p_c, i, j, *rest)
    grid = grid.transpose(2, 3)  # (B, p_r, i, p_c, j, *rest)
    return grid.reshape(windows.shape[0], (m * window) ** 2, *rest)


# ----------------------------------------------------------------------------- modules
class ResidualMLP(nn.Module):
    """``x + down(GELU(up(RMSNorm(x))))`` at width ``dim``, no biases; ``down`` starts at zero (identity block)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.norm = RMSNorm(dim, eps)
        self.up = nn.Linear(dim, dim, bias=False)
        self.down = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(F.gelu(self.up(self.norm(x))))


class IntraWindowHead(nn.Module):
    """Part k's expanded state adjusted by the tokens of parts j < k of the same window (docstring item 9).

    ``forward(state, windows)``: state (..., s*s, d) before the final norm, windows (..., s*s) token ids; part k
    reads only windows[..., j] for j < k, so the other entries may hold anything. ``part`` computes one part.
    """

    def __init__(self, dim: int, parts: int, eps: float = 1e-5):
        super().__init__()
        self.parts = parts
        self.proj = nn.Linear(dim, dim // parts, bias=False)
        self.norm = RMSNorm(dim, eps)
        self.up = nn.Linear(dim, dim, bias=False)
        self.down = nn.Linear(dim, dim, bias=False)
        self.register_buffer("earlier", torch.ones(parts, parts).tril(-1), persistent=False)  # [k, j] = j < k

    def forward(self, state: torch.Tensor, embedded: torch.Tensor, part: int | None = None) -> torch.Tensor:
        """``embedded`` = token embeddings of the window (..., s*s, d); returns the adjusted state(s)."""
        ctx = self.proj(embedded)  # (..., s*s [j], d/s²)
        earlier = self.earlier if part is None else self.earlier[part : part + 1]
        ctx = (earlier[..., None] * ctx.unsqueeze(-3)).flatten(-2)  # (..., parts [k], d): block j = token j < k
        if part is not None:
            state = state[..., part : part + 1, :]
        return state + self.down(F.gelu(self.up(self.norm(state) + ctx)))


class TokenShuffleGPT(LlamaGenGPT):
    """LlamaGen backbone over fused s x s windows, implementing the sampler contract with ``tokens_per_position``."""

    condition_bank_size = 0  # its class-slot outputs are unshuffled windows, not checked against the bank

    decoding_order = "shuffle"  # only samplers that emit a whole window per forward may run it (Sampler.orders)

    def __init__(self, args: ModelArgs, shuffle: TokenShuffleArgs | None = None):
        shuffle = shuffle or TokenShuffleArgs()
        shuffle.check(args)
        super().__init__(args)
        self.shuffle_args = shuffle
        part = args.dim // (shuffle.window * shuffle.window)
        self.shuffle_proj = nn.Linear(args.dim, part, bias=False)
        self.shuffle_mlps = nn.ModuleList(ResidualMLP(args.dim, args.norm_eps) for _ in range(shuffle.shuffle_blocks))
        self.unshuffle_mlps = nn.ModuleList(
            ResidualMLP(args.dim, args.norm_eps) for _ in range(shuffle.unshuffle_blocks)
        )
        self.unshuffle_proj = nn.Linear(part, args.dim, bias=False)
        self.intra_window = (IntraWindowHead(args.dim, self.tokens_per_position, args.norm_eps)
                             if shuffle.intra_window_head else None)
        # RoPE over window positions: the coarse (n/s) x (n/s) grid, class slots zero as in LlamaGen.
        self.freqs_cis = precompute_freqs_cis_2d(self.position_grid, args.head_dim, args.rope_base, args.cls_token_num)

    # ----------------------------------------------------------------- contract attributes
    @property
    def shuffle_window(self) -> int:
        """The window side s."""
        return self.shuffle_args.window

    @property
    def tokens_per_position(self) -> int:
        """Tokens fed and predicted per transformer position: s * s."""
        return self.shuffle_window * self.shuffle_window

    @property
    def position_grid(self) -> int:
        """Side of the coarse grid of windows, n / s."""
        return self.grid_size // self.shuffle_window

    @property
    def num_positions(self) -> int:
        """Image positions in the sequence, (n / s)**2 (= target forwards of a one-window-per-step sampler)."""
        return self.position_grid * self.position_grid

    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """LlamaGen's initialisation (N(0, initializer_range), zero LM head) plus zero residual-block outputs."""
        super().init_weights(generator)
        head = [] if self.intra_window is None else [self.intra_window]
        for block in [*self.shuffle_mlps, *self.unshuffle_mlps, *head]:
            nn.init.zeros_(block.down.weight)

    # ----------------------------------------------------------------- shuffle / unshuffle
    def embed_windows(self, windows: torch.Tensor) -> torch.Tensor:
        """Token-shuffle: windows (B, L, s*s) of token ids -> fused embeddings (B, L, d)."""
        h = self.shuffle_proj(self.tok_embeddings(windows)).flatten(-2)  # part k -> channels k*d/s² .. (k+1)*d/s²
        for block in self.shuffle_mlps:
            h = block(h)
        return h

    def unshuffle(self, h: torch.Tensor) -> ModelOutput:
        """Token-unshuffle: last-block hidden (B, L, d) -> logits (B, L, s*s, V) and normed hidden (B, L, s*s, d).

        With the intra-window head, ``extra["window_state"]`` holds the parts' states before the final norm
        (B, L, s*s, d), the input of :meth:`intra_window_logits`.
        """
        for block in self.unshuffle_mlps:
            h = block(h)
        parts = h.unflatten(-1, (self.tokens_per_position, -1))  # (B, L, s*s, d/s²), part k = token k
        state = self.unshuffle_proj(parts)
        h = self.norm(state)
        extra = {"window_state": state} if self.intra_window is not None else {}
        return ModelOutput(logits=self.output(h).float(), hidden=h, extra=extra)

    def intra_window_logits(self, state: torch.Tensor, windows: torch.Tensor, part: int | None = None) -> torch.Tensor:
        """Logits of the intra-window head: part k given its window's state and the window's tokens j < k.

        ``state`` (..., s*s, d) from ``extra["window_state"]``, ``windows`` (..., s*s) token ids (entries
        j >= k are not read). Returns (..., s*s, V), or (..., V) for one ``part``.
        """
        if self.intra_window is None:
            raise ValueError("this Token-Shuffle model has no intra-window head (trained with "
                             "intra_window_head: false); sample its windows independently")
        adjusted = self.intra_window(state, self.tok_embeddings(windows), part)
        logits = self.output(self.norm(adjusted)).float()
        return logits if part is None else logits[..., 0, :]

    def _run_blocks(self, h, freqs, positions=None, mask=None, kv_len=None) -> ModelOutput:
        for layer in self.layers:
            h = layer(h, freqs, positions, mask, kv_len)
        return self.unshuffle(h)

    # ----------------------------------------------------------------- training / reference path
    def teacher_forced(self, labels: torch.Tensor, tokens: torch.Tensor) -> ModelOutput:
        """Logits (B, n*n, V) in RASTER order predicting every token of ``tokens`` (B, n*n), no cache.

        One causal forward over [class, windows 0..P-2]; position p's s*s outputs (window p) come from
        [class, windows 0..p-1] and are put back in raster order (``hidden`` likewise, (B, n*n, d)). With the
        intra-window head, ``extra["sequential_logits"]`` (B, n*n, V) adds, for part k, the true tokens of
        parts j < k of its window.
        """
        T = self.cls_token_num
        windows = shuffle_tokens(tokens, self.shuffle_window)
        cond = self.cls_embedding(labels)[:, :T]
        h = self.tok_dropout(torch.cat([cond, self.embed_windows(windows[:, :-1])], dim=1))
        freqs = self.freqs_cis[: h.shape[1]].to(h.device)[None]
        out = self._run_blocks(h, freqs)
        window = self.shuffle_window
        extra = {}
        if self.intra_window is not None:  # every part given the true earlier tokens of its window
            sequential = self.intra_window_logits(out.extra["window_state"][:, T - 1 :], windows)
            extra["sequential_logits"] = unshuffle_tokens(sequential, window)
        return ModelOutput(logits=unshuffle_tokens(out.logits[:, T - 1 :], window),
                           hidden=unshuffle_tokens(out.hidden[:, T - 1 :], window), extra=extra)

    # ----------------------------------------------------------------- sampler contract
    def setup_cache(self, batch_size: int, max_seq_len: int | None = None, dtype=None, device=None) -> None:
        """As LlamaGen's, sized by default for the class slots plus one slot per window."""
        super().setup_cache(batch_size, max_seq_len or self.cls_token_num + self.num_positions, dtype, device)

    def forward_tokens(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor | None = None,
        rope_positions: torch.Tensor | None = None,
    ) -> ModelOutput:
        """Feed windows (B, L, s*s) into cache slots ``positions`` ((L,) or (B, L)); logits (B, L, s*s, V)."""
        if tokens.dim() != 3 or tokens.shape[-1] != self.tokens_per_position:
            raise ValueError(
                f"token-shuffle forward_tokens takes windows (B, L, {self.tokens_per_position}) of token ids "
                f"(see shuffle_tokens), got shape {tuple(tokens.shape)}"
            )
        self._require_cache(tokens.shape[0])
        return self._forward_embeddings(self.embed_windows(tokens), positions, mask, rope_positions)


def make_identity_shuffle(model: TokenShuffleGPT) -> TokenShuffleGPT:
    """Set an s = 1 model's shuffle and unshuffle to the identity (both projections I, residual blocks zeroed),
    so it computes exactly LlamaGen's function of the backbone weights."""
    if model.shuffle_window != 1:
        raise ValueError(f"only an s = 1 token-shuffle can be the identity (window is {model.shuffle_window})")
    with torch.no_grad():
        model.shuffle_proj.weight.copy_(torch.eye(model.args.dim))
        model.unshuffle_proj.weight.copy_(torch.eye(model.args.dim))
        for block in [*model.shuffle_mlps, *model.unshuffle_mlps]:
            block.down.weight.zero_()
    return model


def build_token_shuffle(
    name: str | None = None, shuffle: TokenShuffleArgs | None = None, **overrides
) -> TokenShuffleGPT:
    """A Token-Shuffle model on a LlamaGen backbone preset (GPT-B, ...) and/or explicit ModelArgs fields.

    No Token-Shuffle c2i checkpoints exist, so the backbone presets are LlamaGen's.
    """
    args = ModelArgs.from_name(name, **overrides) if name else ModelArgs(**overrides)
    return TokenShuffleGPT(args, shuffle)


# ----------------------------------------------------------------------------- checkpoints
def export_metadata(model: TokenShuffleGPT) -> dict[str, str]:
    """Safetensors metadata of a genaccel Token-Shuffle export: the backbone ``config``, the ``token_shuffle``
    fields, ``tokens_per_position``, ``shuffle_window`` and ``family``."""
    config = {k: getattr(model.args, k) for k in ModelArgs.field_names()}
    return {"config": json.dumps(config), "token_shuffle": json.dumps(asdict(model.shuffle_args)),
            "tokens_per_position": str(model.tokens_per_position), "shuffle_window": str(model.shuffle_window),
            "family": "token-shuffle"}


def suggest_token_shuffle_config(sd: dict) -> str | None:
    """What the weight shapes say about the window and block counts, for a mismatch error."""
    proj = sd.get("shuffle_proj.weight")
    if proj is None:
        return ("not a Token-Shuffle checkpoint (shuffle_proj.weight is missing); a plain GPT loads with "
                "--model llamagen")
    s2 = proj.shape[1] // max(proj.shape[0], 1)
    blocks = {side: len({k.split(".")[1] for k in sd if k.startswith(f"{side}.")})
              for side in ("shuffle_mlps", "unshuffle_mlps")}
    head = any(k.startswith("intra_window.") for k in sd)
    return (f"the weights have window**2 = {s2}, shuffle_blocks={blocks['shuffle_mlps']}, "
            f"unshuffle_blocks={blocks['unshuffle_mlps']}, intra_window_head={head}; build the model with those")


def load_token_shuffle(
    path: str | os.PathLike,
    gpt_model: str | None = None,
    image_size: int = 256,
    downsample: int = 16,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    prefer: str | None = None,
    **overrides,
) -> TokenShuffleGPT:
    """Load a genaccel Token-Shuffle export strictly; the config comes from its safetensors metadata.

    ``gpt_model``, ``image_size`` and ``downsample`` are accepted for the pipeline's common loader signature
    and unused: the stored config fixes the grid (there are no official checkpoints whose shapes would need
    a preset). ``overrides`` may set ModelArgs or TokenShuffleArgs fields.
    """
    del gpt_model, image_size, downsample
    sd, meta = read_state_dict(path, prefer=prefer)
    config, shuffle = config_from_metadata(meta), meta.get("token_shuffle")
    if not config or not shuffle:
        raise CheckpointError(
            f"{path} is not a genaccel Token-Shuffle export: its safetensors metadata lacks 'config' and "
            "'token_shuffle' (train and export one with `python -m genaccel.train token-shuffle`; a plain "
            "LlamaGen GPT loads with --model llamagen)"
        )
    unknown = set(overrides) - set(ModelArgs.field_names()) - set(TokenShuffleArgs.field_names())
    if unknown:
        raise ValueError(f"unknown config field(s) {sorted(unknown)} for a Token-Shuffle model")
    backbone = {k: v for k, v in overrides.items() if k in ModelArgs.field_names()}
    window = {k: v for k, v in overrides.items() if k in TokenShuffleArgs.field_names()}
    model = TokenShuffleGPT(ModelArgs(**{**config, **backbone}), TokenShuffleArgs(**{**json.loads(shuffle), **window}))
    load_strict(model, sd, str(path), suggest_token_shuffle_config)
    return model.to(device=device, dtype=dtype).eval()


__all__ = ["IntraWindowHead", "ResidualMLP", "TokenShuffleArgs", "TokenShuffleGPT", "build_token_shuffle", "export_metadata",
           "load_token_shuffle", "make_identity_shuffle", "shuffle_tokens", "suggest_token_shuffle_config",
           "unshuffle_tokens"]
