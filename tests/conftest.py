"""Fixtures shared across test folders."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def one_thread():
    """Run a test on one torch thread (tiny models are faster so, and timings stay comparable), then restore."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Word-level vocabulary of the tiny text encoder: ids 3.. in this order (pad 0, </s> 1, unknown words 2).
TINY_T5_WORDS = ("a", "photo", "of", "cat", "coffee", "moon", "rocket", "brick", "wall", "on", "the")


@pytest.fixture
def tiny_t5():
    """``save(folder, d_model)``: a random 1-layer T5 encoder and a T5-style word-level tokenizer (appends </s>,
    pads with id 0) saved to ``folder``, as a local --t5-path for text-to-image tests (no download)."""

    def save(folder, d_model: int) -> None:
        from tokenizers import Tokenizer, models, pre_tokenizers, processors
        from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

        vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(TINY_T5_WORDS)}}
        tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
        PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                unk_token="<unk>").save_pretrained(folder)
        torch.manual_seed(3)
        config = T5Config(vocab_size=len(vocab), d_model=d_model, d_kv=4, d_ff=16, num_layers=1, num_heads=2,
                          pad_token_id=0, eos_token_id=1)
        T5EncoderModel(config).eval().save_pretrained(folder)

    return save
