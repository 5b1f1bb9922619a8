"""Shared fixtures: a character-level tokenizer and tiny random BERT / Llama models built offline."""

from __future__ import annotations

import string

import pytest
from tokenizers import Tokenizer, models, processors
from transformers import BertForSequenceClassification, LlamaForCausalLM, PreTrainedTokenizerFast

from models import tiny_bert as build_tiny_bert
from models import tiny_llama as build_tiny_llama

SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>"]  # ids 0-3; <s> is bos/cls, </s> is eos/sep


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character (printable ASCII); single texts get "<s> text", pairs "<s> a </s> b"."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for char in string.printable:
        vocab.setdefault(char, len(vocab))
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A </s> $B:1", special_tokens=[("<s>", 2), ("</s>", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", cls_token="<s>", sep_token="</s>")


@pytest.fixture
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    return build_tiny_tokenizer()


@pytest.fixture
def tiny_bert(tiny_tokenizer) -> BertForSequenceClassification:
    """Random 2-layer BERT with a 2-class head over the tiny tokenizer's vocabulary, in eval mode."""
    return build_tiny_bert(vocab_size=len(tiny_tokenizer), intermediate_size=64, max_position_embeddings=256,
                           pad_token_id=tiny_tokenizer.pad_token_id)


@pytest.fixture
def tiny_llama(tiny_tokenizer) -> LlamaForCausalLM:
    """Random 2-layer Llama over the tiny tokenizer's vocabulary, in eval mode."""
    return build_tiny_llama(vocab_size=len(tiny_tokenizer), intermediate_size=64, max_position_embeddings=512,
                            pad_token_id=tiny_tokenizer.pad_token_id, bos_token_id=tiny_tokenizer.bos_token_id,
                            eos_token_id=tiny_tokenizer.eos_token_id)


def _saved(folder, model, tokenizer):
    """A model folder loadable by from_pretrained, as `--model PATH` expects."""
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def bert_dir(tmp_path, tiny_bert, tiny_tokenizer):
    return _saved(tmp_path / "bert", tiny_bert, tiny_tokenizer)


@pytest.fixture
def llama_dir(tmp_path, tiny_llama, tiny_tokenizer):
    return _saved(tmp_path / "llama", tiny_llama, tiny_tokenizer)
