"""Draft sources: Jacobi initialisation and recycling, the EAGLE-style head's cached decoding."""

from __future__ import annotations

import pytest
import torch
from spec_helpers import tiny_gpt

from genaccel.models.drafter import EagleDrafter, PackedLinear, int8_matmul_available, resolve_drafter_precision
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


# ---------------------------------------------------------------------- drafter precision (PackedLinear)


def float64_reference(layer: PackedLinear, x: torch.Tensor) -> torch.Tensor:
    """What the layer claims to compute: its matmul input (bf16-rounded unless fp32) times its dequantized
    weight, in float64."""
    x = x if layer.precision == "fp32" else x.to(torch.bfloat16)
    return x.double() @ layer.dequantized().double().T


@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8"])
@pytest.mark.parametrize("K", [64, 24])  # 24: not a multiple of 16, the int8 kernel cannot take it
def test_packed_linear_matches_a_float64_reference(precision, K):
    gen = torch.Generator().manual_seed(K)
    w = torch.randn(40, K, generator=gen) * torch.linspace(0.01, 3.0, 40)[:, None]  # rows of very different scale
    layer = PackedLinear(w, precision)
    x = torch.randn(7, K, generator=gen)
    act = torch.float32 if precision == "fp32" else torch.bfloat16
    out = layer(x.to(act))
    ref = float64_reference(layer, x)
    assert out.shape == (7, 40) and out.dtype == act
    tol = 1e-5 if precision == "fp32" else 2 ** -7  # bf16 output rounding
    assert torch.allclose(out.double(), ref, rtol=tol, atol=tol * ref.abs().max().item())
    deq = layer.dequantized()
    if precision == "int8":  # each row is quantized against its own scale: error at most one step
        assert layer.weight.dtype == torch.int8 and layer.weight.abs().max() <= 127
        assert ((deq - w).abs() <= layer.scale.float()[:, None] * 1.01).all()
        assert layer.fused == (K % 16 == 0)
    else:
        assert torch.allclose(deq, w, rtol=2 ** -8 if precision == "bf16" else 0, atol=0)
    three_d = layer(x.to(act).view(7, 1, K))  # batched inputs take the same path
    assert torch.allclose(three_d.view(7, 40).double(), out.double(), rtol=1e-6, atol=1e-6)


def test_int8_kernel_and_dequantizing_fallback_agree():
    """The fused kernel (``aten._weight_int8pack_mm``) and the dequantize-then-matmul fallback give the same
    sums on the widths the kernel serves (one and several entries, bf16 and fp32 inputs)."""
    gen = torch.Generator().manual_seed(3)
    layer = PackedLinear(torch.randn(33, 128, generator=gen), "int8")
    assert layer.fused
    fallback = PackedLinear(layer.dequantized(), "int8")
    fallback.weight, fallback.scale, fallback.fused = layer.weight, layer.scale, False
    for rows in (1, 5):
        x = torch.randn(rows, 128, generator=gen)
        for dtype in (torch.bfloat16, torch.float32):
            a, b = layer(x.to(dtype)).double(), fallback(x.to(dtype)).double()
            assert torch.allclose(a, b, rtol=2 ** -7, atol=2 ** -7 * b.abs().max().item()), (rows, dtype)


def test_torch_still_has_the_int8_kernel_we_rely_on():
    """torch's CPU weight-only int8 matmul (``aten._weight_int8pack_mm(x, int8 W (N, K), scales (N,))``,
    torch >= 2.3) is the fast path of drafter_precision int8/auto. If a torch release renames or changes it,
    this test names the release; the code then falls back to dequantizing (correct, slower)."""
    op = getattr(torch.ops.aten, "_weight_int8pack_mm", None)
    assert op is not None, f"torch {torch.__version__} has no aten._weight_int8pack_mm: drafter int8 falls back"
    gen = torch.Generator().manual_seed(0)
    for K, N, M in ((16, 1, 1), (64, 33, 5), (256, 7, 17)):
        q = torch.randint(-127, 128, (N, K), generator=gen, dtype=torch.int8)
        s = (torch.rand(N, generator=gen) + 0.5).to(torch.bfloat16)
        x = torch.randn(M, K, generator=gen).to(torch.bfloat16)
        ref = x.double() @ (q.double() * s.double()[:, None]).T
        out = op(x, q, s).double()
        assert torch.allclose(out, ref, rtol=2 ** -7, atol=2 ** -7 * ref.abs().max().item()), \
            f"torch {torch.__version__}: aten._weight_int8pack_mm changed its result for K={K}, N={N}, M={M}"
    assert int8_matmul_available(torch.zeros(4, 32, dtype=torch.int8))
    assert not int8_matmul_available(torch.zeros(4, 24, dtype=torch.int8))


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_drafter_decode_at_low_precision_stays_close_to_fp32(precision):
    """decode/logits with packed weights follow the fp32 path: logits within a small fraction of their spread
    and the same top-1 token for nearly every entry, over a multi-entry feed and single-entry extends."""
    target = tiny_gpt(block=16, seed=7)
    torch.manual_seed(1)
    drafter = EagleDrafter.from_target(target).eval()
    for param in drafter.parameters():
        param.data.add_(0.05 * torch.randn_like(param))
    R = 4
    tokens, hidden = torch.randint(32, (R, 8)), torch.randn(R, 8, target.hidden_dim)
    outs = {}
    with torch.no_grad():
        for prec in ("fp32", precision):
            drafter.setup_decoding(R, 16, prec)
            assert drafter.decoding_precision == prec
            feed = drafter.logits(drafter.decode(tokens[:, :5], hidden[:, :5], torch.arange(5).expand(R, -1)))
            h, extends = hidden[:, 5:6], []
            for k in range(3):
                h = drafter.decode(tokens[:, 5 + k : 6 + k], h, torch.full((R, 1), 5 + k))
                extends.append(drafter.logits(h))
            outs[prec] = torch.cat([feed, *extends], 1)
    ref, low = outs["fp32"], outs[precision]
    assert low.dtype == torch.float32 and low.shape == ref.shape
    spread = (ref.amax(-1) - ref.amin(-1)).mean()
    assert (low - ref).abs().max() < 0.05 * spread
    assert (low.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9


def test_drafter_precision_auto_and_bad_values():
    assert resolve_drafter_precision("auto", "cpu") == "int8"  # this torch has the kernel (test above)
    assert resolve_drafter_precision("auto", "meta") == "fp32"
    assert resolve_drafter_precision("bf16", "cpu") == "bf16"
    drafter = EagleDrafter.from_target(tiny_gpt(block=16)).eval()
    drafter.setup_decoding(1, 16)
    assert drafter.decoding_precision == "fp32"  # the module's own default: the trained weights
    drafter.setup_decoding(1, 16, "auto")
    assert drafter.decoding_precision == "int8"
    with pytest.raises(ValueError, match="drafter_precision must be one of"):
        drafter.setup_decoding(1, 16, "fp16")
    with pytest.raises(ValueError, match="resolve 'auto' first"):
        PackedLinear(torch.zeros(2, 16), "auto")
