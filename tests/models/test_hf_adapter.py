"""The Hugging Face adapter (genaccel/models/hf.py) against transformers' own Janus and Emu3 image generation.

Tiny random configs built here (no downloads). References: the models' own ``generate`` (greedy, token for
token) and a teacher-forced full-sequence forward of the HF model itself (no cache, no adapter) for the
exact joint distribution of the chi-square test.
"""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import pytest
import torch
import transformers
from transformers import (
    Emu3Config,
    Emu3ForConditionalGeneration,
    Emu3TextConfig,
    Emu3VQVAEConfig,
    JanusConfig,
    JanusForConditionalGeneration,
    JanusVisionConfig,
    JanusVQVAEConfig,
    LlamaConfig,
)

from genaccel.models.hf import (
    Emu3ImageAdapter,
    JanusImageAdapter,
    build_hf_sampler,
    require_transformers_class,
    wrap_hf_model,
)
from genaccel.samplers.base import SamplingOptions, target_probs

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "samplers"))
from spec_helpers import sequence_index  # noqa: E402
from test_speculative import chi_square_pvalue  # noqa: E402

PAD, BOS, BOI = 0, 1, 5  # Janus special ids in the tiny text vocabulary
TEXT_VOCAB = 64


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def randomise(model: torch.nn.Module, seed: int, std: float = 0.3) -> torch.nn.Module:
    """Random weights large enough that greedy decoding does not collapse onto one token (HF's init is tiny)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model.eval()


def tiny_janus(codes: int = 16, side: int = 3, layers: int = 2, seed: int = 0) -> JanusForConditionalGeneration:
    text = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=TEXT_VOCAB, max_position_embeddings=256, pad_token_id=PAD,
                       bos_token_id=BOS, eos_token_id=2)
    vision = JanusVisionConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=8,
                               projection_dim=32, num_image_tokens=side * side, depth=1)
    vq = JanusVQVAEConfig(embed_dim=4, num_embeddings=codes, latent_channels=32, base_channels=32,
                          channel_multiplier=[1, 1], num_res_blocks=1, num_patches=side, projection_dim=32,
                          image_token_embed_dim=32)
    torch.manual_seed(seed)
    model = JanusForConditionalGeneration(JanusConfig(text_config=text, vision_config=vision, vq_config=vq,
                                                      image_token_id=3))
    model.generation_config.pad_token_id, model.generation_config.bos_token_id = PAD, BOS
    model.generation_config.generation_kwargs = {"boi_token_id": BOI}
    return randomise(model, seed)


EMU_VISUAL0, EMU_EOL, EMU_IMAGE, EMU_WRAP, EMU_EOF = 40, 30, 31, 32, 33


def tiny_emu3(codes: int = 16, seed: int = 0) -> Emu3ForConditionalGeneration:
    vocab_map = {f"<|visual token {i:06d}|>": EMU_VISUAL0 + i for i in range(codes)}
    vocab_map.update({"<|extra_200|>": EMU_EOL, "<image>": EMU_IMAGE, "<|image token|>": EMU_WRAP,
                      "<|extra_201|>": EMU_EOF})
    text = Emu3TextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=EMU_VISUAL0 + codes, max_position_embeddings=256,
                          pad_token_id=PAD, bos_token_id=BOS, eos_token_id=2, attention_dropout=0.0)
    vq = Emu3VQVAEConfig(codebook_size=codes, embed_dim=4, latent_channels=4, base_channels=32,
                         channel_multiplier=[1, 1], num_res_blocks=1, attn_resolutions=[], hidden_size=32,
                         num_attention_heads=1, temporal_downsample_factor=1)
    torch.manual_seed(seed)
    model = Emu3ForConditionalGeneration(Emu3Config(vq_config=vq, text_config=text, vocabulary_map=vocab_map))
    model.generation_config.pad_token_id = PAD
    return randomise(model, seed)


def emu3_prefix_fn(height: int, width: int, visual: list[int]):
    """Emu3's prefix-constrained image generation (transformers' Emu3 docs): visual tokens, EOL after each row."""
    def allowed(batch_id: int, ids: torch.Tensor) -> list[int]:
        start = int((ids == EMU_WRAP).nonzero()[0, 0])
        offset = ids.shape[0] - start
        if offset % (width + 1) == 0:
            return [EMU_EOL]
        if offset == (width + 1) * height + 1:
            return [EMU_EOF]
        return visual
    return allowed


def greedy(name: str, adapter, cfg: float, **options) -> torch.Tensor:
    sampler = build_hf_sampler(name, adapter, cfg_scale=cfg, temperature=0.0, **options)
    return sampler.generate(adapter, torch.arange(adapter.num_classes)).tokens


JANUS_PROMPTS = [[BOS, 7, 8, 9, BOI], [BOS, 10, 11, 12, BOI]]


def test_janus_greedy_ar_equals_generate_image_mode():
    model = tiny_janus()
    ids = torch.tensor(JANUS_PROMPTS)
    with torch.no_grad():
        try:
            ref = model.generate(ids, attention_mask=torch.ones_like(ids), generation_mode="image", do_sample=False,
                                 guidance_scale=5.0)
        except TypeError as e:  # transformers 5.17.0: its own image generation calls a helper with a missing argument
            if "_prepare_static_cache" not in str(e):
                raise
            pytest.skip(f"transformers {transformers.__version__}'s own Janus image generation fails ({e}); "
                        "the reference runs on releases where it works")
    assert len(set(ref.flatten().tolist())) > 3  # a non-degenerate reference
    adapter = wrap_hf_model(model, ids)
    assert isinstance(adapter, JanusImageAdapter)
    assert torch.equal(greedy("ar", adapter, 5.0), ref)


EMU_PROMPTS = [[BOS, 7, 8, 9, EMU_WRAP], [BOS, 10, 11, 12, EMU_WRAP]]
EMU_NEGATIVE = [BOS, 20, 21, EMU_WRAP]


@pytest.mark.parametrize("negative", [EMU_NEGATIVE, None])
def test_emu3_greedy_ar_equals_prefix_constrained_generate(negative):
    H, W = 3, 4
    model = tiny_emu3()
    ids = torch.tensor(EMU_PROMPTS)
    visual = model.vocabulary_mapping.image_tokens
    kw = {} if negative is None else {"negative_prompt_ids": torch.tensor([negative] * len(EMU_PROMPTS))}
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=(W + 1) * H, do_sample=False,
                             guidance_scale=3.0, prefix_allowed_tokens_fn=emu3_prefix_fn(H, W, visual), **kw)
    ref = out[:, ids.shape[1]:]
    adapter = wrap_hf_model(model, ids, height=H, width=W, negative_prompt_ids=negative)
    assert isinstance(adapter, Emu3ImageAdapter)
    tokens = greedy("ar", adapter, 3.0)
    assert len(set(tokens.flatten().tolist())) > 3
    assert torch.equal(adapter.to_hf_sequence(tokens), ref)


def janus_ragged():
    """Prompts of different lengths (left-padded into the prompt slots)."""
    return wrap_hf_model(tiny_janus(), [[BOS, 7, 8, 9, BOI], [BOS, 10, BOI], [BOS, 13, 14, 15, 16, 17, BOI]])


def emu3_ragged():
    return wrap_hf_model(tiny_emu3(), [[BOS, 7, 8, 9, EMU_WRAP], [BOS, 10, EMU_WRAP], [BOS, 13, 14, 15, 16, EMU_WRAP]],
                         height=3, width=3, negative_prompt_ids=EMU_NEGATIVE)


@pytest.mark.parametrize("make", [janus_ragged, emu3_ragged], ids=["janus", "emu3"])
def test_padded_prompt_batch_equals_each_prompt_alone(make):
    adapter = make()
    batch = greedy("ar", adapter, 4.0)
    for i, prompt in enumerate(adapter.prompts):
        alone = JanusImageAdapter if isinstance(adapter, JanusImageAdapter) else Emu3ImageAdapter
        kw = {} if alone is JanusImageAdapter else dict(height=3, width=3, negative_prompt_ids=EMU_NEGATIVE)
        single = alone(adapter.hf, [prompt], **kw)
        assert torch.equal(greedy("ar", single, 4.0)[0], batch[i]), i


SPECULATIVE = [
    ("sjd", {"window": 4}),
    ("mcsjd", {"window": 5}),
    ("gsd", {"window": 4, "group_size": 1}),  # group of one = the exact test
    ("lantern", {"window": 4, "lantern_k": 4, "lantern_delta": 0.0}),  # no moved mass = the exact test (Jacobi drafts)
]


@pytest.mark.parametrize("make", [janus_ragged, emu3_ragged], ids=["janus", "emu3"])
@pytest.mark.parametrize("name,options", SPECULATIVE, ids=[s[0] for s in SPECULATIVE])
def test_exact_speculative_greedy_equals_ar(make, name, options):
    adapter = make()
    assert torch.equal(greedy(name, adapter, 4.0, **options), greedy("ar", adapter, 4.0))


@pytest.mark.parametrize("make", [janus_ragged, emu3_ragged], ids=["janus", "emu3"])
@pytest.mark.parametrize("draft_kind", ["smaller", "same-weights"])
def test_sd_with_an_hf_draft_model_greedy_equals_ar(make, draft_kind):
    """A smaller random draft model (few drafts accepted) and the target's own weights in a second adapter
    (every greedy draft accepted: the draft cache's rollback and refeeding must stay in step)."""
    adapter = make()
    janus = isinstance(adapter, JanusImageAdapter)
    hf = adapter.hf if draft_kind == "same-weights" else (tiny_janus(layers=1, seed=3) if janus else tiny_emu3(seed=3))
    kw = {} if janus else dict(height=3, width=3, negative_prompt_ids=EMU_NEGATIVE)
    draft = type(adapter)(hf, adapter.prompts, **kw)
    sampler = build_hf_sampler("sd", adapter, cfg_scale=4.0, temperature=0.0, draft_len=3)
    sampler.set_draft_model(draft)
    out = sampler.generate(adapter, torch.arange(adapter.num_classes))
    assert torch.equal(out.tokens, greedy("ar", adapter, 4.0))
    if draft_kind == "same-weights":  # 1 prefill + ceil((9 - 1) / 4) verify steps
        assert out.stats.nfe == 3


def test_lossy_samplers_run_with_the_models_own_codebook():
    adapter = janus_ragged()
    for name in ("gsd", "lantern"):
        sampler = build_hf_sampler(name, adapter, cfg_scale=4.0, window=4, lantern_k=4)
        assert torch.equal(sampler._codebook, torch.nn.functional.normalize(
            adapter.hf.model.vqmodel.quantize.embedding.weight.float(), dim=-1))
        out = sampler.generate(adapter, torch.arange(3), torch.Generator().manual_seed(0))
        assert out.tokens.shape == (3, 9) and int(out.tokens.max()) < adapter.vocab_size
        assert out.stats.step_compression >= 1.0
    emu = emu3_ragged()
    assert torch.equal(build_hf_sampler("gsd", emu)._codebook, emu.hf.model.vqmodel.quantize.embedding.weight.float())


# ----------------------------------------------------------------------------- exactness (chi-square)
def hf_image_logits(adapter, rows: list[list[int]], seqs: torch.Tensor) -> torch.Tensor:
    """Teacher-forced image-token logits (S, N, V) of every sequence after each row's prompt, computed by the
    HF model itself over the full sequence (its own embeddings, heads and causal mask; no cache)."""
    hf, N = adapter.hf, adapter.num_image_tokens
    out = []
    for prompt, seq in zip(rows, seqs):
        p = torch.tensor(prompt)
        if isinstance(adapter, JanusImageAdapter):
            emb = torch.cat([hf.get_input_embeddings()(p), hf.prepare_embeddings_for_image_generation(seq)])
            h = hf.model.language_model(inputs_embeds=emb[None]).last_hidden_state[0]
            logits = hf.model.generation_head(h)
        else:
            ids = torch.cat([p, adapter.to_hf_sequence(seq[None])[0]])
            logits = hf(input_ids=ids[None]).logits[0][:, adapter.visual_ids]
        # the outputs predicting image tokens: the last prompt token and each image entry but the last one
        picks = [len(prompt) - 1]
        step = adapter.rows_per_line
        for i in range(1, N):
            picks.append(len(prompt) + (i // adapter.width) * step + i % adapter.width - 1)
        out.append(logits[picks])
    return torch.stack(out)


def exact_joint(adapter, opts: SamplingOptions) -> torch.Tensor:
    """Probability of every token sequence (base-V index) under AR sampling of prompt 0 with ``opts``."""
    V, N = adapter.vocab_size, adapter.num_image_tokens
    seqs = torch.tensor(list(itertools.product(range(V), repeat=N)))
    cond = adapter.prompts[0].tolist()
    uncond = adapter.uncond_prompt(adapter.prompts[0]).tolist()
    with torch.no_grad():
        logits = torch.cat([hf_image_logits(adapter, [cond] * len(seqs), seqs),
                            hf_image_logits(adapter, [uncond] * len(seqs), seqs)]).float()
        probs = target_probs(logits, opts, torch.arange(N))
    return probs.gather(-1, seqs[..., None]).squeeze(-1).prod(-1).double()


def tiny_vocab_adapter(family: str):
    if family == "janus":
        return JanusImageAdapter(randomise(tiny_janus(codes=4, side=2, seed=5), 5, std=0.15), [[BOS, 7, 8, BOI]])
    return Emu3ImageAdapter(randomise(tiny_emu3(codes=4, seed=5), 5, std=0.15), [[BOS, 7, 8, EMU_WRAP]], height=2,
                            width=2, negative_prompt_ids=[BOS, 20, EMU_WRAP])


@pytest.mark.parametrize("family", ["janus", "emu3"])
@pytest.mark.parametrize("name,options", [("sjd", {"window": 3}), ("mcsjd", {"window": 4, "top_k": 3})])
def test_speculative_sampling_through_the_adapter_is_exact(family, name, options):
    adapter = tiny_vocab_adapter(family)
    sampler = build_hf_sampler(name, adapter, cfg_scale=2.0, **options)
    probs = exact_joint(adapter, sampler.options)
    assert probs.max() < 0.2  # a spread-out target, so the test has power
    tokens = torch.cat([sampler.generate(adapter, torch.zeros(1000, dtype=torch.long),
                                         torch.Generator().manual_seed(100 + i)).tokens for i in range(6)])
    assert chi_square_pvalue(sequence_index(tokens, adapter.vocab_size), probs) > 1e-3


def test_chi_square_detects_a_wrong_cfg_convention():
    """Power check: Janus samples drawn with the unconditional rows' prompt left unmasked (no CFG effect)
    must fail the test against the true Janus target."""
    adapter = tiny_vocab_adapter("janus")
    sampler = build_hf_sampler("sjd", adapter, cfg_scale=2.0, window=3)
    probs = exact_joint(adapter, sampler.options)
    adapter.uncond_prompt = lambda prompt: prompt  # uncond = cond: guidance has no effect
    tokens = torch.cat([sampler.generate(adapter, torch.zeros(1000, dtype=torch.long),
                                         torch.Generator().manual_seed(100 + i)).tokens for i in range(6)])
    assert chi_square_pvalue(sequence_index(tokens, adapter.vocab_size), probs) < 1e-6


# ----------------------------------------------------------------------------- errors
def test_missing_transformers_class_names_the_package_and_version():
    """What an older transformers without Janus/Emu3 raises (a class this release lacks stands in for them)."""
    with pytest.raises(ImportError, match=r"transformers .* has no NoSuchImageGenerator.*pip install -U 'transformers>=5\.17\.0'"):
        require_transformers_class("NoSuchImageGenerator")
    assert require_transformers_class("JanusForConditionalGeneration") is JanusForConditionalGeneration


def test_bad_inputs_give_one_clear_error():
    model = tiny_janus()
    with pytest.raises(TypeError, match="JanusForConditionalGeneration and Emu3ForConditionalGeneration"):
        wrap_hf_model(torch.nn.Linear(2, 2), [[1]])
    with pytest.raises(ValueError, match="at least one prompt"):
        wrap_hf_model(model, [])
    adapter = wrap_hf_model(model, JANUS_PROMPTS)
    adapter.setup_cache(2)
    with pytest.raises(ValueError, match="must pair with a conditional"):
        adapter.prefill(torch.tensor([2, 0]))
    model.generation_config.generation_kwargs = {}
    with pytest.raises(ValueError, match="boi_token_id"):
        wrap_hf_model(model, JANUS_PROMPTS)


def test_bench_hf_rows_on_a_tiny_janus(tmp_path):
    from genaccel.bench.hf import main

    path = tmp_path / "hf.json"
    results = main(["--shape", "tiny", "--samplers", "ar,sjd,sd", "--json", str(path)])
    assert results["ar"]["nfe"] == 16 and results["ar"]["step_compression"] == 1.0  # 1 prefill + 15 forwards
    assert results["sjd"]["nfe"] <= 16 and results["sd"]["step_compression"] >= 1.0
    assert "bench hf --shape tiny" in path.read_text()
    other, odd = tmp_path / "gsd.json", tmp_path / "odd.json"
    main(["--shape", "tiny", "--samplers", "gsd", "--json", str(other)])
    merged = main(["--merge", str(path), str(other)])
    assert list(merged) == ["ar", "sjd", "sd", "gsd"] and merged["gsd"] == json.loads(other.read_text())["results"]["gsd"]
    main(["--shape", "tiny", "--samplers", "ar", "--cfg-scale", "3", "--json", str(odd)])
    with pytest.raises(SystemExit, match="other cfg_scale"):
        main(["--merge", str(path), str(odd)])


@pytest.mark.parametrize("make", [janus_ragged, emu3_ragged], ids=["janus", "emu3"])
def test_explicit_causal_mask_equals_the_default_mask(make):
    """An explicit contract mask (slots <= own among the prompt and this call's slots) gives the default's outputs,
    and a rollback hides what was written after the kept length from later tokens."""
    adapter = make()
    labels = torch.tensor([0, 1, 2])
    T, L = adapter.cls_token_num, 6
    tokens = torch.randint(adapter.vocab_size, (3, L), generator=torch.Generator().manual_seed(0))
    slots = torch.arange(T, T + L)
    outs = []
    for explicit in (False, True):
        adapter.setup_cache(3)
        adapter.prefill(labels)
        k = torch.arange(T + adapter.num_image_tokens)
        mask = (k[None, :] <= slots[:, None])[None] if explicit else None
        outs.append(adapter.forward_tokens(tokens, slots, mask=mask).logits)
    torch.testing.assert_close(outs[0], outs[1])
    # rollback hides stale slots: after it, a token fed at slot T+4 sees tokens 0, 1 and itself, not 2, 3
    adapter.rollback(T + 2)
    after = adapter.forward_tokens(tokens[:, 4:5], slots[4:5]).logits
    adapter.setup_cache(3)
    adapter.prefill(labels)
    adapter.forward_tokens(tokens[:, :2], slots[:2])
    fresh = adapter.forward_tokens(tokens[:, 4:5], slots[4:5]).logits
    torch.testing.assert_close(after, fresh, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(after, outs[0][:, 4:5], atol=1e-3)  # what seeing tokens 2, 3 would have given
