"""Token-level analysis: kinds, positions and vocabulary, real tokens only."""

import torch
from peft import LoraConfig
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from models import tiny_bert
from tspeft import TokenSelectiveConfig, get_ts_peft_model
from tspeft.training.token_stats import token_kind, token_statistics

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "the", "film", "great", ",", ".", "dull", "a", "plot"]


def tokenizer():
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]")


def test_token_kinds():
    special = {"[CLS]", "<s>"}
    assert [token_kind(t, special) for t in ["[CLS]", ",", "The", "Ġfilm", "##s", "▁and"]] == [
        "special", "punctuation", "stop word", "content", "content", "stop word"]


def test_statistics_cover_real_tokens_only():
    torch.manual_seed(0)
    tok = tokenizer()
    base = tiny_bert(vocab_size=len(WORDS), hidden_size=16, intermediate_size=32, max_position_embeddings=512,
                     eval_mode=False)
    model = get_ts_peft_model(base, LoraConfig(r=2, target_modules=["query", "value"], init_lora_weights=False),
                              TokenSelectiveConfig())
    model.set_thresholds(0.05)
    batch = tok(["[CLS] the film great . [SEP]", "[CLS] a dull plot , [SEP]"] * 2, padding=True, return_tensors="pt")
    padded = tok(["[CLS] the film great . [SEP]", "[CLS] a dull plot , [SEP] [PAD] [PAD] [PAD]"] * 2, padding=True,
                 return_tensors="pt")
    padded["attention_mask"][1::2, -3:] = 0
    first, second = token_statistics(model, tok, [dict(batch)]), token_statistics(model, tok, [dict(padded)])
    assert first["by_kind"] == second["by_kind"]
    counts = sum(v["tokens"] for v in first["by_kind"]["0"].values())
    assert counts == 24  # 4 sequences x 6 real tokens in layer 0
    assert "[PAD]" not in [row[0] for row in first["most_kept_tokens"] + first["least_kept_tokens"]]
    assert all(g.record_keep_mask is False for g in model.gates.values())
