"""Draft sources: Jacobi initialisation and recycling, the EAGLE-style head's cached decoding."""

from __future__ import annotations

import torch
from spec_helpers import tiny_gpt

from genaccel.models.drafter import EagleDrafter
from genaccel.samplers.base import SamplerStats, SamplingOptions
from genaccel.samplers.drafting import JacobiDrafter
from genaccel.samplers.speculative import DecodeState, StepOutcome, Verification


def state_for(model, n: int, B: int = 2) -> DecodeState:
    tokens = torch.arange(B * model.num_image_tokens).view(B, -1) % model.vocab_size
    return DecodeState(model, SamplingOptions(cfg_scale=1.0), torch.zeros(B, dtype=torch.long), tokens, n,
                       torch.Generator().manual_seed(0), SamplerStats())


def test_repeat_horizon_copies_the_left_token_within_a_row():
    model = tiny_gpt(block=16)  # 4x4 grid
    state = state_for(model, n=2)
    source = JacobiDrafter(window=6, init="repeat_horizon")
    source.start(state, None)
    draft = source.propose(state, 5)  # positions 2..6; 4 starts row 1
    left = state.tokens[:, 1]
    assert torch.equal(draft.tokens[:, 0], left) and torch.equal(draft.tokens[:, 1], left)
    assert torch.equal(draft.tokens[:, 4], draft.tokens[:, 2])  # position 6 copies position 5 (= the row-start draw)
    assert torch.equal(draft.q.argmax(-1), draft.tokens) and torch.equal(draft.q.sum(-1), torch.ones(2, 5))


def test_jacobi_recycles_own_tokens_then_target_samples_with_q_equal_p():
    model = tiny_gpt(block=16)
    state = state_for(model, n=1)
    source = JacobiDrafter(window=4)
    source.start(state, None)
    source.propose(state, 3)
    p = torch.zeros(2, 4, model.vocab_size)
    p[..., 5] = 1.0
    own = torch.tensor([[9, 8, 7, 6], [1, 2, 3, 4]])
    v = Verification(accepted=torch.tensor([3, 1]), tokens=own)
    source.observe(state, StepOutcome(v, p, torch.zeros(2, 4, 8), advance=1))
    assert source.count.tolist() == [3, 3]
    assert torch.equal(source.tokens[:, :3], torch.tensor([[8, 7, 5], [5, 5, 5]]))
    assert torch.equal(source.q[:, :3], p[:, 1:])


def test_drafter_cached_steps_match_the_teacher_forced_forward():
    target = tiny_gpt(block=16, seed=5)
    torch.manual_seed(0)
    drafter = EagleDrafter.from_target(target).eval()
    tokens = torch.randint(32, (2, 10))
    hidden = torch.randn(2, 10, target.hidden_dim)
    full = drafter(tokens, hidden)
    drafter.setup_cache(2, 16)
    first = drafter.step(tokens[:, :4], hidden[:, :4], 0)
    drafter.step(torch.zeros_like(tokens[:, 4:7]), hidden[:, 4:7] * 3, 4)  # speculative entries, discarded
    rest = drafter.step(tokens[:, 4:], hidden[:, 4:], 4)
    assert torch.allclose(torch.cat([first.logits, rest.logits], 1), full.logits, atol=1e-4)
    assert torch.equal(drafter.output.weight, target.output.weight)
    assert not drafter.output.weight.requires_grad and not drafter.tok_embeddings.weight.requires_grad
