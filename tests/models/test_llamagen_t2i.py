"""LlamaGen t2i: caption embedder, official left padding and caption mask, null-caption CFG against a float64
reference, strict loading of the official key layout, the local T5 text side, samplers and CLI."""

import json
import math
from dataclasses import asdict

import pytest
import torch
from model_helpers import official_block_keys, random_llamagen

from genaccel.models.contract import combine_cfg
from genaccel.models.llamagen import (
    T2I_PRESETS,
    LlamaGenT2I,
    ModelArgs,
    build_gpt,
    caption_attention_mask,
    left_pad_captions,
)
from genaccel.models.loading import CheckpointError, diff_state_dict
from genaccel.models.t2i import CaptionEncoder, load_t2i, read_prompts, t2i_args_for_checkpoint
from genaccel.samplers import build_sampler

T, C = 6, 12  # caption slots and caption width of the tiny models


def tiny_t2i(seed: int = 0, **kw) -> LlamaGenT2I:
    args = dict(dim=64, n_layer=2, n_head=4, vocab_size=50, block_size=16, multiple_of=32, model_type="t2i",
                cls_token_num=T, caption_dim=C, token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0)
    return random_llamagen(seed, 0.3, **{**args, **kw})


def official_t2i_keys(dim: int, n_layer: int, hidden: int, vocab: int = 16384, caption_dim: int = 2048,
                      tokens: int = 120) -> dict:
    """Key names and shapes of LlamaGen's t2i Transformer (autoregressive/models/gpt.py, model_type='t2i')."""
    keys = {"cls_embedding.uncond_embedding": (tokens, caption_dim),
            "cls_embedding.cap_proj.fc1.weight": (dim, caption_dim), "cls_embedding.cap_proj.fc2.weight": (dim, dim),
            "tok_embeddings.weight": (vocab, dim), "norm.weight": (dim,), "output.weight": (vocab, dim)}
    return {**keys, **official_block_keys(dim, n_layer, hidden)}


# ----------------------------------------------------------------------------- float64 reference
def gelu_tanh(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def reference_logits(model: LlamaGenT2I, captions, caption_mask, tokens) -> torch.Tensor:
    """LlamaGen's t2i forward re-computed in float64 from its written recipe: caption slots = fc2(gelu(fc1 c)),
    RoPE (0, 0) on caption slots, causal attention with masked caption slots hidden except from themselves."""
    a = model.args
    sd = {k: v.double() for k, v in model.state_dict().items()}
    cond = gelu_tanh(captions.double() @ sd["cls_embedding.cap_proj.fc1.weight"].T) @ sd["cls_embedding.cap_proj.fc2.weight"].T
    x = torch.cat([cond, sd["tok_embeddings.weight"][tokens[:, :-1]]], dim=1)
    B, S = x.shape[:2]
    hd, g = a.dim // a.n_head, math.isqrt(a.block_size)
    cos = torch.zeros(S, hd // 2, dtype=torch.float64)
    sin = torch.zeros(S, hd // 2, dtype=torch.float64)
    for s in range(T, S):
        r, c = divmod(s - T, g)
        for j in range(hd // 4):
            w = a.rope_base ** (-(2 * j) / (hd // 2))
            cos[s, j], sin[s, j] = math.cos(r * w), math.sin(r * w)
            cos[s, hd // 4 + j], sin[s, hd // 4 + j] = math.cos(c * w), math.sin(c * w)

    def rope(t):
        even, odd = t[..., 0::2], t[..., 1::2]
        out = torch.empty_like(t)
        out[..., 0::2] = even * cos[None, :, None] - odd * sin[None, :, None]
        out[..., 1::2] = odd * cos[None, :, None] + even * sin[None, :, None]
        return out

    def rms(t, w):
        return t / torch.sqrt((t * t).mean(-1, keepdim=True) + a.norm_eps) * w

    allowed = torch.zeros(B, S, S, dtype=torch.bool)
    for b in range(B):
        for i in range(S):
            for j in range(i + 1):
                allowed[b, i, j] = i == j or j >= T or bool(caption_mask[b, j])
    for i in range(a.n_layer):
        p = f"layers.{i}."
        h = rms(x, sd[p + "attention_norm.weight"])
        q, k, v = (h @ sd[p + "attention.wqkv.weight"].T).split(a.dim, dim=-1)
        q, k = (rope(t.view(B, S, a.n_head, hd)).transpose(1, 2) for t in (q, k))
        v = v.view(B, S, a.n_head, hd).transpose(1, 2)
        att = ((q @ k.transpose(-1, -2)) / math.sqrt(hd)).masked_fill(~allowed[:, None], float("-inf")).softmax(-1)
        x = x + (att @ v).transpose(1, 2).reshape(B, S, a.dim) @ sd[p + "attention.wo.weight"].T
        h = rms(x, sd[p + "ffn_norm.weight"])
        x = x + (torch.nn.functional.silu(h @ sd[p + "feed_forward.w1.weight"].T) * (h @ sd[p + "feed_forward.w3.weight"].T)) @ sd[p + "feed_forward.w2.weight"].T
    return (rms(x, sd["norm.weight"]) @ sd["output.weight"].T)[:, T - 1 :]


def right_padded(lengths: list[int], batch: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    features = torch.randn(len(lengths), T, C)
    mask = torch.tensor([[1] * n + [0] * (T - n) for n in lengths])
    return features, mask


# ----------------------------------------------------------------------------- structure and official layout
@pytest.mark.parametrize("name, grid", [("t2i-XL-stage1", 16), ("t2i-XL-stage2", 32)])
def test_xl_stage_presets_have_official_keys_on_meta(name, grid):
    with torch.device("meta"):
        model = build_gpt(None, **T2I_PRESETS[name])
    assert isinstance(model, LlamaGenT2I) and model.grid_size == grid and model.cls_token_num == 120
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == official_t2i_keys(1280, 36, 3584)
    assert model.freqs_cis.shape == (120 + grid * grid, 32, 2) and torch.all(model.freqs_cis[:120] == 0)


def test_official_xl_shapes_infer_the_preset_and_load_strictly_on_meta():
    sd = {k: torch.empty(shape, device="meta") for k, shape in official_t2i_keys(1280, 36, 3584).items()}
    args = t2i_args_for_checkpoint(sd, None, None)
    assert (args.dim, args.n_layer, args.n_head, args.cls_token_num, args.caption_dim) == (1280, 36, 20, 120, 2048)
    with torch.device("meta"):
        model = LlamaGenT2I(args)
    assert diff_state_dict(model, sd) == ([], [], [])
    stage2 = t2i_args_for_checkpoint(sd, "t2i-XL-stage2", None)
    assert stage2.block_size == 1024


def test_caption_embedder_matches_direct_mlp():
    model = tiny_t2i()
    x = torch.randn(3, T, C)
    w1 = model.cls_embedding.cap_proj.fc1.weight.double()
    w2 = model.cls_embedding.cap_proj.fc2.weight.double()
    ref = gelu_tanh(x.double() @ w1.T) @ w2.T
    torch.testing.assert_close(model.cls_embedding(x).double(), ref, rtol=0, atol=1e-5)
    # the null caption is a saved buffer, not a trained parameter (as upstream's register_buffer)
    names = dict(model.named_parameters())
    assert "cls_embedding.uncond_embedding" not in names and "cls_embedding.uncond_embedding" in model.state_dict()


def test_left_padding_and_mask_follow_the_official_sampling():
    features, mask = right_padded([2, 6, 4])
    padded, new_mask = left_pad_captions(features, mask)
    for b, n in enumerate([2, 6, 4]):
        want = torch.cat([features[b, n:], features[b, :n]])  # upstream: pads first, valid tokens last
        want_mask = mask[b].flip(0)
        torch.testing.assert_close(padded[b], want * want_mask[:, None], rtol=0, atol=0)
        assert new_mask[b].tolist() == want_mask.bool().tolist()
    kept, kept_mask = left_pad_captions(features, mask, left_pad=False)
    torch.testing.assert_close(kept, features * mask[:, :, None], rtol=0, atol=0)
    assert torch.equal(kept_mask, mask.bool())


def test_caption_attention_mask_definition():
    m = caption_attention_mask(torch.tensor([[0, 0, 1]]), 5)[0]
    want = torch.tensor([[1, 0, 0, 0, 0],   # a pad slot sees only itself
                         [0, 1, 0, 0, 0],
                         [0, 0, 1, 0, 0],
                         [0, 0, 1, 1, 0],   # image tokens see the valid caption slot and earlier tokens
                         [0, 0, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(m, want)


# ----------------------------------------------------------------------------- numerics and CFG
def test_teacher_forced_matches_float64_reference_with_caption_mask():
    model = tiny_t2i()
    features, mask = right_padded([2, 5])
    model.set_captions(features, mask)
    tokens = torch.randint(0, 50, (2, 16))
    ref = reference_logits(model, model.captions, model.caption_mask, tokens)
    ours = model.teacher_forced(model.captions, tokens, model.caption_mask).logits.double()
    assert ref.abs().max() > 1.0
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5 * float(ref.abs().max()))
    # the mask matters: without it the pad slots (zero features) dilute attention
    unmasked = model.teacher_forced(model.captions, tokens).logits.double()
    assert (unmasked - ref).abs().max() > 1e-3


def test_cached_cfg_with_null_caption_equals_direct_computation():
    """Prefill + one-token steps over [captions; null caption] rows, combined with CFG, against the float64
    reference of u + s (c - u), u = the null caption under the prompt's mask (upstream's emb_masks twice)."""
    model = tiny_t2i()
    features, mask = right_padded([3, 6])
    model.set_captions(features, mask)
    tokens = torch.randint(0, 50, (2, 16))
    null = model.cls_embedding.uncond_embedding.expand(2, -1, -1)
    cond = reference_logits(model, model.captions, model.caption_mask, tokens)
    uncond = reference_logits(model, null, model.caption_mask, tokens)
    scale = 3.5
    want = uncond + scale * (cond - uncond)

    labels = torch.tensor([0, 1, 2, 2])  # null_class = 2 = number of captions
    model.setup_cache(4)
    steps = [model.prefill(labels).logits[:, -1:]]
    both = torch.cat([tokens, tokens])
    for t in range(15):
        steps.append(model.forward_tokens(both[:, t : t + 1], torch.tensor([T + t])).logits)
    got = combine_cfg(torch.cat(steps, 1).double(), scale, True)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * float(want.abs().max()))


def test_greedy_ar_with_cfg_picks_the_reference_argmax():
    model = tiny_t2i()
    features, mask = right_padded([4, 2])
    model.set_captions(features, mask)
    out = build_sampler("ar", cfg_scale=2.0, temperature=0.0).generate(model, torch.tensor([0, 1]))
    tokens = out.tokens
    cond = reference_logits(model, model.captions, model.caption_mask, tokens)
    uncond = reference_logits(model, model.cls_embedding.uncond_embedding.expand(2, -1, -1), model.caption_mask, tokens)
    guided = uncond + 2.0 * (cond - uncond)
    picked = guided.gather(-1, tokens[:, :, None])[..., 0]
    assert torch.all(picked >= guided.max(-1).values - 1e-6)
    assert out.stats.nfe == 16


def test_training_dropout_swaps_in_the_null_caption_and_keeps_the_mask():
    model = tiny_t2i()
    features, mask = right_padded([3, 4])
    model.set_captions(features, mask)
    tokens = torch.randint(0, 50, (2, 16))
    dropped = model.teacher_forced(model.captions, tokens, model.caption_mask, drop=torch.tensor([True, False])).logits
    null = torch.stack([model.cls_embedding.uncond_embedding, model.captions[1]])
    direct = model.teacher_forced(null, tokens, model.caption_mask).logits
    torch.testing.assert_close(dropped, direct, rtol=0, atol=0)


# ----------------------------------------------------------------------------- strict loading
def official_state_dict(model: LlamaGenT2I) -> dict:
    """The model's weights under the official key names, listed from upstream's layout (not from our module)."""
    own = model.state_dict()
    a = model.args
    return {k: own[k].clone() for k in official_t2i_keys(a.dim, a.n_layer, a.ffn_hidden, a.vocab_size, C, T)}


def test_official_layout_checkpoint_loads_strictly_and_reports_bad_keys(tmp_path):
    model = tiny_t2i(block_size=16, vocab_size=50)
    sd = official_state_dict(model)
    path = tmp_path / "t2i_tiny.pt"
    torch.save({"model": sd, "steps": torch.tensor(3)}, path)
    loaded = load_t2i(path, image_size=64, downsample=16, n_head=4)
    assert isinstance(loaded, LlamaGenT2I) and loaded.grid_size == 4 and loaded.cls_token_num == T
    for k, v in sd.items():
        assert torch.equal(loaded.state_dict()[k], v), k

    broken = dict(sd)
    del broken["cls_embedding.uncond_embedding"]
    torch.save({"model": broken}, tmp_path / "broken.pt")
    with pytest.raises(CheckpointError, match="uncond_embedding"):
        load_t2i(tmp_path / "broken.pt", image_size=64, downsample=16, n_head=4)
    extra = {**sd, "cls_embedding.cap_proj.fc3.weight": torch.zeros(1)}
    torch.save({"model": extra}, tmp_path / "extra.pt")
    with pytest.raises(CheckpointError, match=r"unexpected keys: cls_embedding\.cap_proj\.fc3\.weight"):
        load_t2i(tmp_path / "extra.pt", image_size=64, downsample=16, n_head=4)
    c2i = {k: v for k, v in sd.items() if not k.startswith("cls_embedding")}
    c2i["cls_embedding.embedding_table.weight"] = torch.zeros(7, 64)
    torch.save({"model": c2i}, tmp_path / "c2i.pt")
    with pytest.raises(CheckpointError, match="--model llamagen"):
        load_t2i(tmp_path / "c2i.pt", image_size=64, downsample=16, n_head=4)
    with pytest.raises(CheckpointError, match="n_head"):
        load_t2i(path, image_size=64, downsample=16)


# ----------------------------------------------------------------------------- the T5 text side
def test_t5_encoder_tokenizes_to_max_length_and_returns_the_encoder_output(tmp_path, tiny_t5):
    from transformers import T5EncoderModel

    tiny_t5(tmp_path, C)
    enc = CaptionEncoder(tmp_path, max_length=T)
    prompts = ["A photo of  the MOON", "a cat on a brick wall on the moon", "moon"]
    features, mask = enc.encode(prompts)
    assert features.shape == (3, T, C) and mask.shape == (3, T)
    # ids written from the vocabulary: cleaned (lower-case, one space) words, </s> = 1, pad = 0; the long prompt
    # is truncated to T tokens with its </s> kept
    ids = torch.tensor([[3, 4, 5, 13, 8, 1], [3, 6, 12, 3, 10, 1], [8, 1, 0, 0, 0, 0]])
    assert mask.tolist() == [[True] * 6, [True] * 6, [True, True] + [False] * 4]
    direct = T5EncoderModel.from_pretrained(tmp_path).eval()(input_ids=ids, attention_mask=mask.long()).last_hidden_state
    torch.testing.assert_close(features, direct, rtol=0, atol=1e-6)


def test_greedy_ar_sjd_sd_agree_on_tiny_t2i_with_t5_captions(tmp_path, tiny_t5):
    tiny_t5(tmp_path, C)
    features, mask = CaptionEncoder(tmp_path, max_length=T).encode(["a photo of a cat", "moon", "a rocket"])
    model, draft = tiny_t2i(), tiny_t2i(seed=5)
    for m in (model, draft):
        m.set_captions(features, mask)
    labels = torch.tensor([0, 1, 2])
    opts = dict(cfg_scale=3.0, temperature=0.0)
    ar = build_sampler("ar", **opts).generate(model, labels)
    sjd = build_sampler("sjd", window=4, **opts).generate(model, labels)
    sd = build_sampler("sd", draft_len=3, **opts)
    sd.set_draft_model(draft)
    spec = sd.generate(model, labels)
    assert torch.equal(sjd.tokens, ar.tokens) and torch.equal(spec.tokens, ar.tokens)
    assert sjd.stats.nfe <= ar.stats.nfe and spec.stats.nfe <= ar.stats.nfe
    # each image alone gives the same tokens (the caption mask follows its row through the batch)
    alone = build_sampler("ar", **opts).generate(model, torch.tensor([1])).tokens
    assert torch.equal(alone[0], ar.tokens[1])


# ----------------------------------------------------------------------------- pipeline and CLI
def save_tiny_t2i_safetensors(path, vocab: int, grid: int) -> None:
    from safetensors.torch import save_file

    model = tiny_t2i(vocab_size=vocab, block_size=grid * grid, dim=32, n_head=2)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path),
              metadata={"config": json.dumps(asdict(model.args))})


def run_cli(argv):
    from genaccel.cli import run_command, run_sample

    return run_command(lambda a: run_sample(a, prog="sample.py"), argv)


def test_cli_samples_prompts_end_to_end(tmp_path, capsys, tiny_t5):
    from genaccel.models import BUNDLED

    tiny_t5(tmp_path / "t5", C)
    save_tiny_t2i_safetensors(tmp_path / "t2i.safetensors", vocab=1024, grid=16)
    (tmp_path / "prompts.txt").write_text("a photo of a cat\n\nthe moon\n", encoding="utf-8")
    out = tmp_path / "out"
    code = run_cli(["--model", "llamagen-t2i", "--ckpt", str(tmp_path / "t2i.safetensors"), "--vq-ckpt",
                    str(BUNDLED["vq"]), "--t5-path", str(tmp_path / "t5"), "--prompt", "a rocket", "--prompts-file",
                    str(tmp_path / "prompts.txt"), "--temperature", "0", "--out", str(out), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    stats = json.loads((out / "stats.json").read_text())
    assert stats["prompts"] == ["a rocket", "a photo of a cat", "the moon"] and stats["num_images"] == 3
    assert sorted(p.name for p in out.glob("0*.png")) == ["00000_class0000.png", "00001_class0001.png",
                                                          "00002_class0002.png"]


@pytest.mark.parametrize("argv, message", [
    (["--model", "llamagen", "--prompt", "a cat"], "--prompt is for a text-to-image model"),
    (["--model", "llamagen", "--t5-path", "x"], "--t5-path is for a text-to-image model"),
    (["--model", "llamagen-t2i", "--classes", "1"], "not --classes"),
    (["--model", "llamagen-t2i"], "needs prompts"),
    (["--model", "llamagen-t2i", "--prompt", " "], "must not be empty"),
    (["--model", "llamagen-t2i", "--prompts-file", "/nonexistent/prompts.txt"], "does not exist"),
    (["--model", "llamagen-t2i", "--prompt", "a cat", "--ckpt", "a.pt"], "pass its VQ as well (--vq-ckpt"),
    (["--model", "llamagen-t2i", "--prompt", "a cat", "--ckpt", "a.pt", "--vq-ckpt", "b.pt"], "needs --t5-path"),
    (["--model", "llamagen-t2i", "--prompt", "a cat", "--ckpt", "a.pt", "--vq-ckpt", "b.pt", "--t5-path",
      "/nonexistent/t5"], "is not a folder"),
    (["--model", "llamagen-t2i", "--prompt", "a", "--gpt-model", "GPT-Q", "--ckpt", "a.pt"], "unknown --gpt-model"),
])
def test_cli_error_paths(argv, message, capsys, tmp_path):
    assert run_cli([*argv, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_t5_folder_without_config_and_empty_prompts_file(tmp_path, capsys):
    (tmp_path / "t5").mkdir()
    (tmp_path / "empty.txt").write_text("\n  \n", encoding="utf-8")
    code = run_cli(["--model", "llamagen-t2i", "--prompt", "a", "--ckpt", "a.pt", "--vq-ckpt", "b.pt", "--t5-path",
                    str(tmp_path / "t5"), "--out", str(tmp_path / "o")])
    assert code == 2 and "no config.json" in capsys.readouterr().err
    with pytest.raises(ValueError, match="holds no prompt"):
        read_prompts(None, tmp_path / "empty.txt")


def test_sampling_before_captions_is_a_clear_error():
    model = tiny_t2i()
    with pytest.raises(RuntimeError, match="set_captions"):
        build_sampler("ar").generate(model, torch.tensor([0]))
    with pytest.raises(ValueError, match=r"\(P >= 1, 6, 12\)"):
        model.set_captions(torch.zeros(1, 5, C))
    with pytest.raises(ValueError, match="model_type"):
        ModelArgs(model_type="t2v")


def test_preset_table_lists_the_official_t2i_configs():
    assert {"t2i-XL-stage1", "t2i-XL-stage2", "GPT-XL", "GPT-1B", "GPT-7B"} <= set(T2I_PRESETS)
    assert T2I_PRESETS["GPT-7B"]["dim"] == 4096 and T2I_PRESETS["GPT-1B"]["n_layer"] == 22
