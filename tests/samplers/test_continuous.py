"""Continuous batching (``generate_stream``): refilled rows keep exact rules exact, greedy streams equal AR,
the contract's ``prefill_rows`` restarts only the rows it names, stats count per image and per batch."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch
from spec_helpers import exact_joint, sequence_index, tiny_gpt
from test_speculative import chi_square_pvalue, make_sampler

from genaccel.models.llamagen import build_gpt
from genaccel.samplers import build_sampler

STREAM_CASES = [
    ("sjd", {"window": 4, "init": "repeat_horizon", "cfg_interval": 1}, 1024),
    ("sjd", {"window": 3, "draft_coupling": "gumbel", "top_k": 3}, 1024),
    ("sd-model", {"draft_len": 2, "top_p": 0.8}, 0),  # refills computed (no class-slot bank)
]


@pytest.mark.parametrize("kind,options,bank", STREAM_CASES)
def test_refilled_rows_each_follow_their_own_target_distribution(kind, options, bank, monkeypatch):
    """6000 images of mixed classes through 200 rows: about 30 images pass through every row, each
    starting at whatever step the previous one ended; every image must follow its class's AR joint."""
    model = tiny_gpt(vocab=4, block=4, seed=11, head_std=0.3)
    monkeypatch.setattr(model, "condition_bank_size", bank)
    sampler = make_sampler(kind, model, cfg_scale=1.5, **options)
    labels = torch.arange(6000) % 4
    out = sampler.generate_stream(model, labels, 200, torch.Generator().manual_seed(5))
    assert out.stats.extra["continuous"] and out.stats.extra["refills"] > 20  # rows were refilled
    # with the bank every label's class slots were computed once, by the first prefill (all 4 labels + null)
    assert out.stats.extra["prefill_forwards"] == (1 if bank else 1 + out.stats.extra["refills"])
    seqs = sequence_index(out.tokens, model.vocab_size)
    for label in range(4):
        probs = exact_joint(model, label, sampler.options)
        assert chi_square_pvalue(seqs[labels == label], probs) > 1e-3, label


def test_distribution_test_detects_a_refill_that_keeps_the_old_condition(monkeypatch):
    """A refill whose new image still attends to the previous image's class slot must fail the same test:
    the stream test can see a leak between the images of a row."""
    model = tiny_gpt(vocab=4, block=4, seed=11, head_std=0.3)
    sampler = make_sampler("sjd", model, cfg_scale=1.5, window=3)
    real = type(model).prefill_rows

    def leaky(self, index, labels):
        old = [(c.k_cache[index, :, :1].clone(), c.v_cache[index, :, :1].clone())
               for c in (layer.attention.kv_cache for layer in self.layers)]
        out = real(self, index, labels)
        for layer, (k, v) in zip(self.layers, old):
            layer.attention.kv_cache.k_cache[index, :, :1], layer.attention.kv_cache.v_cache[index, :, :1] = k, v
        return out

    labels = torch.arange(6000) % 4
    monkeypatch.setattr(type(model), "prefill_rows", leaky)
    out = sampler.generate_stream(model, labels, 200, torch.Generator().manual_seed(5))
    seqs = sequence_index(out.tokens, model.vocab_size)
    pvalues = [chi_square_pvalue(seqs[labels == c], exact_joint(model, c, sampler.options)) for c in range(4)]
    assert min(pvalues) < 1e-6, pvalues


@pytest.mark.parametrize("kind,options", [("sjd", {"draft_coupling": "maximal"}), ("sd-model", {}), ("sd-head", {})])
def test_fp32_greedy_stream_equals_single_image_ar(kind, options):
    """Every image of a greedy stream (7 images, 3 rows in flight, refilled at different steps) equals its
    own single-image ``ar`` greedy run token for token. Greedy drafts of a drafter or draft model are
    deterministic, so there the stream's accepted lengths must also be the single runs' (a draft source
    that kept a refilled row's old state would draft worse)."""
    model = tiny_gpt(block=25, seed=2)
    labels = torch.tensor([0, 1, 2, 3, 0, 2, 1])
    ar = build_sampler("ar", temperature=0.0)
    singles = torch.cat([ar.generate(model, labels[i : i + 1]).tokens for i in range(len(labels))])
    sampler = make_sampler(kind, model, temperature=0.0, **options)
    out = sampler.generate_stream(model, labels, 3)
    assert out.stats.extra["continuous"] and out.stats.extra["refills"] > 1
    assert torch.equal(out.tokens, singles)
    if kind != "sjd":  # Jacobi drafts start random: their accepted lengths depend on the draws
        hist = Counter()
        for i in range(len(labels)):
            hist.update(sampler.generate(model, labels[i : i + 1]).stats.extra["accepted_length_hist"])
        assert out.stats.extra["accepted_length_hist"] == dict(hist)


def test_prefill_rows_restarts_only_the_named_rows():
    """After ``prefill_rows``, the restarted rows give the outputs of a fresh batch of their labels and the
    other rows the outputs they had: no row reads another's cache or its own old image."""
    model = tiny_gpt(block=16, seed=3)
    gen = torch.Generator().manual_seed(0)
    labels, old, x = torch.tensor([0, 1, 2, 3]), torch.randint(32, (4, 5), generator=gen), torch.randint(32, (4, 1), generator=gen)
    model.setup_cache(4, 17)
    model.prefill(labels)
    model.forward_tokens(old, torch.arange(1, 6))
    model.prefill_rows(torch.tensor([2, 0]), torch.tensor([3, 1]))
    got = model.forward_tokens(x, torch.tensor([[1], [6], [1], [6]])).logits

    model.setup_cache(4, 17)
    model.prefill(torch.tensor([1, 1, 3, 3]))
    fresh = model.forward_tokens(x, torch.tensor([1])).logits
    model.setup_cache(4, 17)
    model.prefill(labels)
    model.forward_tokens(old, torch.arange(1, 6))
    kept = model.forward_tokens(x, torch.tensor([6])).logits
    torch.testing.assert_close(got[[0, 2]], fresh[[0, 2]], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[[1, 3]], kept[[1, 3]], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bank", [0, 2, 1024])
def test_banked_refills_equal_computed_ones(bank):
    """Refills served from the class-slot bank (all of it, part of it when the bank is full, none when off)
    write the K/V and return the outputs a computed refill does, and say how many rows they ran."""
    model, ref = tiny_gpt(block=16, seed=3), tiny_gpt(block=16, seed=3)
    model.condition_bank_size, ref.condition_bank_size = bank, 0
    x = torch.randint(32, (4, 1), generator=torch.Generator().manual_seed(1))
    computed = []
    for m in (model, ref):
        m.setup_cache(4, 17)
        m.prefill(torch.tensor([0, 1, 0, 4]))  # 4 = null class
    for index, labels in [([2, 0], [1, 0]), ([1, 3], [3, 2]), ([0, 1, 2, 3], [2, 3, 0, 4])]:
        index, labels = torch.tensor(index), torch.tensor(labels)
        got, want = model.prefill_rows(index, labels), ref.prefill_rows(index, labels)
        torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got.hidden, want.hidden, rtol=1e-5, atol=1e-5)
        computed.append(int(got.extra["computed_rows"]))
        assert int(want.extra["computed_rows"]) == len(labels)
        out = [m.forward_tokens(x, torch.tensor([1])).logits for m in (model, ref)]
        for m in (model, ref):
            m.rollback(1)
        torch.testing.assert_close(out[0], out[1], rtol=1e-5, atol=1e-5)
    # bank 1024: labels 0, 1, 4 from the prefill, 3 and 2 computed once; bank 2 keeps only 0 and 1
    assert computed == {0: [2, 2, 4], 2: [0, 2, 3], 1024: [0, 2, 0]}[bank]


def test_the_bank_keeps_no_more_than_its_byte_budget():
    """A label's entry is its per-layer K/V plus its outputs; a budget of one and a half entries keeps one."""
    model = tiny_gpt(block=16, seed=3)
    model.setup_cache(2, 17)
    model.prefill(torch.tensor([0, 4]))
    entry = model._bank.nbytes // 2  # two labels banked: 0 and the null class
    model.condition_bank_bytes = entry * 3 // 2
    model.setup_cache(2, 17)
    model.prefill(torch.tensor([0, 4]))
    assert list(model._bank.entries) == [0] and model._bank.nbytes == entry
    assert int(model.prefill_rows(torch.tensor([0, 1]), torch.tensor([0, 4])).extra["computed_rows"]) == 1


def test_the_bank_is_emptied_by_setup_cache_and_off_in_training():
    """Weights may change between caches, and label dropout makes training-mode class slots random."""
    model = tiny_gpt(block=16, seed=3)
    model.setup_cache(2, 17)
    model.prefill(torch.tensor([0, 1]))
    assert int(model.prefill_rows(torch.tensor([0]), torch.tensor([1])).extra["computed_rows"]) == 0
    model.setup_cache(2, 17)
    model.train()
    model.prefill(torch.tensor([0, 1]))
    assert int(model.prefill_rows(torch.tensor([0]), torch.tensor([1])).extra["computed_rows"]) == 1
    model.eval()
    assert int(model.prefill_rows(torch.tensor([0]), torch.tensor([1])).extra["computed_rows"]) == 1


def test_prefill_rows_rejects_bad_rows():
    model = tiny_gpt(block=16, seed=3)
    model.setup_cache(2, 17)
    model.prefill(torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="distinct"):
        model.prefill_rows(torch.tensor([1, 1]), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="one label per row"):
        model.prefill_rows(torch.tensor([1]), torch.tensor([0, 0]))


def test_stream_stats_count_per_image_and_per_batch():
    """Per image: its prefill + the verify steps it took part in; per batch: the stream's forwards spread
    over batches of its width (``batch_forwards_per_image``); consecutive batches are merged alike."""
    model = tiny_gpt(block=16, seed=2)
    labels = torch.arange(10) % 4
    done = []
    out = build_sampler("sjd", window=4).generate_stream(model, labels, 4, torch.Generator().manual_seed(0),
                                                         on_complete=done.append)
    # images are reported once each as they complete, with their tokens, forwards and share of the NFE
    index = torch.cat([d.index for d in done])
    assert sorted(index.tolist()) == list(range(10)) and len(done) > 1
    assert torch.equal(torch.cat([d.tokens for d in done]), out.tokens[index])
    assert torch.cat([d.forwards for d in done]).tolist() == [out.stats.extra["image_forwards"][i] for i in index]
    charge = torch.cat([d.charge for d in done])
    assert float(charge.sum()) == pytest.approx(out.stats.nfe)
    assert charge.tolist() == pytest.approx([out.stats.extra["image_charge"][i] for i in index])
    st = out.stats
    assert st.images == 10 and st.rows_in_flight == 4
    assert sum(st.extra["image_forwards"]) == 10 + st.extra["row_verify_steps"]
    assert st.forwards_per_image == pytest.approx(sum(st.extra["image_forwards"]) / 10)
    assert st.nfe == st.extra["verify_steps"] + st.extra["prefill_forwards"]
    assert st.extra["prefill_forwards"] == 1 and st.extra["refills"] >= 2  # labels 0-3 banked by the prefill
    assert st.batch_forwards_per_image == pytest.approx(st.nfe * 4 / 10)
    assert st.step_compression == pytest.approx(16 / (st.nfe * 4 / 10))

    done.clear()
    ar = build_sampler("ar").generate_stream(model, labels, 4, torch.Generator().manual_seed(0), done.append)
    assert [d.index.tolist() for d in done] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert float(torch.cat([d.charge for d in done]).sum()) == pytest.approx(ar.stats.nfe)
    assert ar.stats.nfe == 3 * 16 and not ar.stats.extra["continuous"]  # batches of 4, 4, 2
    assert ar.stats.forwards_per_image == pytest.approx(16)
    assert ar.stats.step_compression == pytest.approx(16 / (48 * 4 / 10))


def test_models_without_prefill_rows_run_consecutive_batches(monkeypatch):
    """A model lacking call 6 gets the batches a caller would have run, from the one generator in turn."""
    model = tiny_gpt(block=16, seed=2)
    labels = torch.arange(6) % 4
    sampler = build_sampler("sjd", window=4)
    monkeypatch.setattr(type(model), "prefill_rows", None)
    out = sampler.generate_stream(model, labels, 4, torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(0)
    batches = torch.cat([sampler.generate(model, c, gen).tokens for c in labels.split(4)])
    assert not out.stats.extra["continuous"] and torch.equal(out.tokens, batches)


def test_stream_is_reproducible_given_seed_and_batch_size():
    model = tiny_gpt(block=16, seed=2)
    labels = torch.arange(9) % 4
    sampler = build_sampler("sjd", window=4)
    a = sampler.generate_stream(model, labels, 3, torch.Generator().manual_seed(4)).tokens
    b = sampler.generate_stream(model, labels, 3, torch.Generator().manual_seed(4)).tokens
    assert torch.equal(a, b)


def test_bad_batch_size_is_one_clear_error():
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        build_sampler("sjd").generate_stream(tiny_gpt(block=16), torch.tensor([0]), 0)


def test_t2i_greedy_stream_with_caption_masks_equals_single_image_ar():
    """LlamaGen t2i's call 6 carries each refilled row's caption mask (cond row and its null-caption row)."""
    torch.manual_seed(0)
    model = build_gpt(None, dim=64, n_layer=2, n_head=4, vocab_size=32, block_size=16, multiple_of=32,
                      model_type="t2i", cls_token_num=4, caption_dim=8).eval()
    for prm in model.parameters():
        torch.nn.init.normal_(prm, 0.0, 0.3)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    model.set_captions(torch.randn(3, 4, 8), mask)
    labels = torch.tensor([0, 1, 2, 2, 0, 1])
    ar = build_sampler("ar", temperature=0.0, cfg_scale=3.0)
    singles = torch.cat([ar.generate(model, labels[i : i + 1]).tokens for i in range(len(labels))])
    out = build_sampler("sjd", temperature=0.0, cfg_scale=3.0, window=4).generate_stream(model, labels, 2)
    assert out.stats.extra["continuous"] and torch.equal(out.tokens, singles)


def test_pipeline_generate_batches_continuous_yields_one_stream():
    from genaccel.pipeline import ImagePipeline

    class TokenPipeline(ImagePipeline):
        def decode(self, tokens, generator=None):  # no tokenizer: the "images" are the tokens
            return tokens

    model = tiny_gpt(block=16, seed=2)
    pipe, labels = TokenPipeline(gpt=model, vq=None), torch.arange(7) % 4
    sampler = build_sampler("sjd", window=4)
    (chunk, images, stats), = list(pipe.generate_batches(labels, sampler, 3, seed=9, continuous=True))
    want = sampler.generate_stream(model, labels, 3, torch.Generator().manual_seed(9))
    assert torch.equal(chunk, labels) and torch.equal(images, want.tokens)
    assert stats.extra["continuous"] and stats.images == 7 and stats.rows_in_flight == 3


def test_compression_bench_reports_the_continuous_stream():
    from genaccel.bench.compression import markdown, measure, measure_stream

    model, labels = tiny_gpt(block=16, seed=2), torch.arange(6) % 4
    sampler = build_sampler("sjd", window=4)
    one, many = measure(model, sampler, labels, 1, 0), measure(model, sampler, labels, 3, 1)
    stream = measure_stream(model, sampler, labels, 3, 2)
    assert stream["continuous"] and stream["nfe"] == pytest.approx(stream["stream_forwards"] * 3 / 6)
    assert stream["step_compression"] == pytest.approx(16 / stream["nfe"])
    results = {"sjd": {"batch_1": one, "batch_3": many, "ratio": 1.0, "continuous": stream, "continuous_ratio": 0.5}}
    table = markdown(results, 3, "cmd")
    assert "continuous b=3" in table and f"{stream['step_compression']:.2f}x | 0.50 |" in table


def test_eval_job_streams_shards_and_keeps_per_image_counts(tmp_path):
    """``sample_shards(continuous=True)``: every shard written with its own labels, the stream's images in
    shard order, per-shard stats whose per-image forwards add up to the stream's."""
    from genaccel.eval.job import (
        DistInfo,
        SampleJob,
        prepare_job_dir,
        read_shard,
        sample_shards,
        shard_seed,
        summarize_stats,
    )
    from genaccel.pipeline import ImagePipeline

    class TokenPipeline(ImagePipeline):
        def decode(self, tokens, generator=None):  # "images" (B, 4, 4, 1) holding the tokens
            return tokens.view(-1, 4, 4, 1).to(torch.uint8)

    model, info = tiny_gpt(block=16, seed=2), DistInfo()
    job = SampleJob(out_dir=str(tmp_path / "job"), num_images=10, batch_size=3, sampler="sjd")
    prepare_job_dir(job, info)
    sampler = build_sampler("sjd", window=4)
    counts = sample_shards(TokenPipeline(gpt=model, vq=None), sampler, job, info, progress=False, continuous=True)
    assert counts["images_sampled"] == 10
    shards = [read_shard(job, k) for k in range(job.num_shards)]
    labels = np.concatenate([s["labels"] for s in shards])
    assert labels.tolist() == [i % 4 for i in range(10)]
    stats = [json.loads(str(s["stats"])) for s in shards]
    assert all(s["extra"]["continuous"] and s["extra"]["stream_images"] == 10 for s in stats)
    want = sampler.generate_stream(model, torch.tensor(labels), 3, torch.Generator().manual_seed(shard_seed(0, 0)))
    images = np.concatenate([s["images"] for s in shards]).reshape(10, 16)
    assert np.array_equal(images, want.tokens.to(torch.uint8).numpy())
    assert sum(s["extra"]["row_verify_steps"] for s in stats) == want.stats.extra["row_verify_steps"]
    assert summarize_stats(stats)["nfe_per_image"] == pytest.approx(want.stats.batch_forwards_per_image)


def test_consecutive_batches_merge_their_histograms(monkeypatch):
    model = tiny_gpt(block=16, seed=2)
    labels, sampler = torch.arange(5) % 4, build_sampler("sjd", window=4)
    monkeypatch.setattr(type(model), "prefill_rows", None)
    out = sampler.generate_stream(model, labels, 2, torch.Generator().manual_seed(0))
    parts = [b["accepted_length_hist"] for b in out.stats.extra["batches"]]
    assert len(parts) == 3 and sum(out.stats.extra["accepted_length_hist"].values()) == sum(
        sum(h.values()) for h in parts)


def test_eval_stream_writes_shards_as_they_complete_and_an_interrupted_job_resumes(tmp_path):
    """Shards are written mid-stream: a job killed while the stream runs keeps the shards that completed
    before, and the re-run streams only the missing ones, each with its own labels."""
    from genaccel.eval.job import DistInfo, SampleJob, missing_shards, prepare_job_dir, read_shard, sample_shards
    from genaccel.pipeline import ImagePipeline

    class Killed(Exception):
        pass

    class TokenPipeline(ImagePipeline):
        calls = 0

        def decode(self, tokens, generator=None):
            TokenPipeline.calls += 1
            if TokenPipeline.calls == 3:  # the third shard to complete: the job dies mid-stream
                raise Killed
            return tokens.view(-1, 4, 4, 1).to(torch.uint8)

    model, info = tiny_gpt(block=16, seed=2), DistInfo()
    job = SampleJob(out_dir=str(tmp_path / "job"), num_images=12, batch_size=3, sampler="sjd",
                    continuous_batching=True)
    prepare_job_dir(job, info)
    pipe, sampler = TokenPipeline(gpt=model, vq=None), build_sampler("sjd", window=4)
    with pytest.raises(Killed):
        sample_shards(pipe, sampler, job, info, progress=False)
    assert len(missing_shards(job, info)) == 2  # two shards were on disk before the stream ended
    counts = sample_shards(pipe, sampler, job, info, progress=False)
    assert counts["images_sampled"] == 6 and not missing_shards(job, info)
    labels = np.concatenate([read_shard(job, k)["labels"] for k in range(job.num_shards)])
    assert labels.tolist() == [i % 4 for i in range(12)]
