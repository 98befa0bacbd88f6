"""Tiny models and exact reference distributions shared by the sampler tests."""


from __future__ import annotations

import itertools

import torch

from genaccel.models.contract import ModelOutput
from genaccel.models.llamagen import LlamaGenGPT, build_gpt
from genaccel.samplers.base import SamplingOptions, target_probs


def tiny_gpt(vocab: int = 32, classes: int = 4, block: int = 16, seed: int = 0, dim: int = 64,
             n_layer: int = 2, head_std: float = 0.5) -> LlamaGenGPT:
    """Random GPT whose (normally zero-initialised) output head is random, so distributions are not uniform."""
    gen = torch.Generator().manual_seed(seed)
    model = build_gpt(None, dim=dim, n_layer=n_layer, n_head=4, vocab_size=vocab, num_classes=classes,
                      block_size=block, multiple_of=32)
    model.init_weights(gen)
    torch.nn.init.normal_(model.output.weight, 0.0, head_std, generator=gen)
    return model.eval()


def exact_joint(model: LlamaGenGPT, label: int, opts: SamplingOptions) -> torch.Tensor:
    """Probability of every token sequence (V ** N of them, base-V index) under AR sampling with ``opts``."""
    V, N = model.vocab_size, model.num_image_tokens
    seqs = torch.tensor(list(itertools.product(range(V), repeat=N)))
    labels = torch.full((seqs.shape[0],), label)
    with torch.no_grad():
        logits = model.teacher_forced(labels, seqs).logits
        if opts.use_cfg:
            uncond = model.teacher_forced(torch.full_like(labels, model.null_class), seqs).logits
            logits = torch.cat([logits, uncond])
        probs = target_probs(logits, opts, torch.arange(N))
    return probs.gather(-1, seqs[..., None]).squeeze(-1).prod(-1).double()


def sequence_index(tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    weights = vocab ** torch.arange(tokens.shape[1] - 1, -1, -1)
    return (tokens * weights).sum(-1)


class MarkovChainModel:
    """A sampler-contract model whose next-token distribution depends only on the previous token.

    No cache and no transformer, so tens of thousands of samples take a fraction of a second, and the exact
    joint of every sequence is a product of table entries. Strong dependence on the previous token makes
    the target at a position change between Jacobi iterations -- what a draft-coupling bug needs to show.
    """

    num_classes, null_class, cls_token_num, grid_size, hidden_dim = 1, 1, 1, 0, 1

    def __init__(self, first: torch.Tensor, table: torch.Tensor, num_tokens: int):
        self.first, self.table, self.num_image_tokens = first.log(), table.log(), num_tokens
        self.vocab_size = table.shape[0]

    def parameters(self):
        return iter([self.table])

    def setup_cache(self, batch_size: int, max_seq_len=None, dtype=None, device=None) -> None:
        """Nothing to allocate: outputs depend on the fed token alone."""

    def prefill(self, labels: torch.Tensor) -> ModelOutput:
        B = labels.shape[0]
        return ModelOutput(self.first.expand(B, 1, -1).clone(), torch.zeros(B, 1, 1))

    def forward_tokens(self, tokens, positions, mask=None, rope_positions=None) -> ModelOutput:
        return ModelOutput(self.table[tokens], torch.zeros(*tokens.shape, 1))

    def rollback(self, length) -> None:
        """No cache to roll back."""

    def select_rows(self, index: torch.Tensor) -> None:
        """No per-row state."""

    def clear_cache(self) -> None:
        """No cache."""

    def joint(self) -> torch.Tensor:
        """Probability of every sequence (base-V index order, as :func:`sequence_index`)."""
        V, N = self.vocab_size, self.num_image_tokens
        seqs = torch.tensor(list(itertools.product(range(V), repeat=N)))
        logp = self.first[seqs[:, 0]] + self.table[seqs[:, :-1], seqs[:, 1:]].sum(-1)
        return logp.exp().double()
