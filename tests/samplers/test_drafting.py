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


def test_drafter_lean_decode_equals_the_reference_step_with_ragged_rows():
    """decode (the samplers' path) == step (the shared TransformerBlock) in fp32, per-row slots, discarded
    entries overwritten, a single-entry chain, and after select_rows; both == the teacher-forced forward."""
    target = tiny_gpt(block=16, seed=7)
    torch.manual_seed(1)
    drafter = EagleDrafter.from_target(target).eval()
    for param in drafter.parameters():  # a trained-looking layer, not the near-identity of a fresh init
        param.data.add_(0.05 * torch.randn_like(param))
    R = 3
    tokens = torch.randint(32, (R, 12))
    hidden = torch.randn(R, 12, target.hidden_dim)
    drafter.setup_cache(R, 16)
    drafter.setup_decoding(R, 16)
    with torch.no_grad():
        full = drafter(tokens, hidden)
        starts = torch.tensor([0, 0, 0])  # then rows stand at different slots (re-fed entries are the same)
        for width, after in ((5, [5, 3, 1]), (3, None), (1, None), (2, None)):  # a multi-entry feed, a single entry, then entries beyond a discarded chain
            slots = starts[:, None] + torch.arange(width)
            toks, hid = tokens.gather(1, slots), hidden.gather(1, slots[..., None].expand(-1, -1, hidden.shape[-1]))
            ref = drafter.step(toks, hid, slots)
            lean = drafter.decode(toks, hid, slots)
            assert torch.allclose(drafter.logits(lean), ref.logits, atol=1e-5, rtol=0)
            assert torch.allclose(lean, ref.hidden, atol=1e-5, rtol=0)
            expect = full.logits.gather(1, slots[..., None].expand(-1, -1, full.logits.shape[-1]))
            assert torch.allclose(drafter.logits(lean), expect, atol=1e-4)
            junk_tokens, junk_hidden = torch.zeros(R, 2, dtype=torch.long), 5 * torch.randn(R, 2, target.hidden_dim)
            junk_slots = slots[:, -1:] + 1 + torch.arange(2)  # a speculative chain, discarded by the next feed
            garbage = drafter.decode(junk_tokens, junk_hidden, junk_slots)
            drafter.step(junk_tokens, junk_hidden, junk_slots)
            assert garbage.abs().sum() > 0
            starts = torch.tensor(after) if after else starts + width  # the next feed overwrites discarded entries
        keep = torch.tensor([0, 2])
        drafter.select_rows(keep)
        slots = starts[keep][:, None]
        toks, hid = tokens[keep].gather(1, slots), hidden[keep].gather(1, slots[..., None].expand(-1, -1, hidden.shape[-1]))
        lean, ref = drafter.decode(toks, hid, slots), drafter.step(toks, hid, slots)
        assert torch.allclose(drafter.logits(lean), ref.logits, atol=1e-5, rtol=0)
        assert torch.allclose(drafter.logits(lean), full.logits[keep].gather(1, slots[..., None].expand(-1, -1, 32)), atol=1e-4)


def test_drafter_decode_needs_its_buffers():
    drafter = EagleDrafter.from_target(tiny_gpt(block=16)).eval()
    try:
        drafter.decode(torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 1, drafter.args.dim), torch.zeros(1, 1, dtype=torch.long))
    except RuntimeError as e:
        assert "setup_decoding" in str(e)
    else:
        raise AssertionError("decode without setup_decoding must fail")


def test_drafter_decode_folds_weights_without_touching_the_module():
    """setup_decoding derives decode's folded weights (token table, norm gains in wqkv and w1/w3) from the
    module's, leaves those unchanged, and re-derives them: after a weight update decode still equals step."""
    drafter = EagleDrafter.from_target(tiny_gpt(block=16, seed=3)).eval()
    before = {k: v.clone() for k, v in drafter.state_dict().items()}
    drafter.setup_cache(2, 16)
    drafter.setup_decoding(2, 16)
    assert all(torch.equal(before[k], v) for k, v in drafter.state_dict().items())
    with torch.no_grad():
        for norm in (drafter.layer.attention_norm, drafter.layer.ffn_norm):
            norm.weight.mul_(torch.linspace(0.5, 2.0, norm.weight.numel()))  # gains that matter
        drafter.fc.bias.add_(0.3)
        drafter.setup_decoding(2, 16)
        tokens, hidden = torch.randint(32, (2, 3)), torch.randn(2, 3, drafter.args.dim)
        slots = torch.tensor([[0, 1, 2], [4, 5, 6]])
        ref = drafter.step(tokens, hidden, slots)
        assert torch.allclose(drafter.decode(tokens, hidden, slots), ref.hidden, atol=1e-5, rtol=0)
