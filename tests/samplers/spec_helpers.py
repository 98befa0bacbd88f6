"""Tiny models and exact reference distributions shared by the sampler tests."""


from __future__ import annotations

import itertools

import torch

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
