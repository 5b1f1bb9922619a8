"""Any transformers model from a folder: tiny random Llama, GPT-2 (Conv1D layers), Qwen2 and BERT, each trained a
few steps with a token-selective adapter through `train()`, saved, and loaded back by `evaluate()`; target
modules come from tspeft's defaults, else peft's, else the user must name them."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.pytorch_utils import Conv1D

from tspeft import TokenSelectiveConfig, get_ts_peft_model
from tspeft.core.targets import default_suffixes, target_module_names
from tspeft.training.evaluate import evaluate
from tspeft.training.run_config import EvalConfig, TrainConfig
from tspeft.training.train import train


def _causal_lm(arch: str, vocab: int, tok):
    ids = dict(pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    if arch == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=2, n_positions=256, **ids))
    config = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, **ids)
    return (LlamaForCausalLM(LlamaConfig(**config)) if arch == "llama" else Qwen2ForCausalLM(Qwen2Config(**config)))


def _folder(tmp_path, name, model, tokenizer):
    folder = tmp_path / name
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _rows(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


@pytest.mark.parametrize("arch, source", [("llama", "tspeft"), ("gpt2", "peft"), ("qwen2", "peft")])
def test_causal_lm_trains_saves_and_loads(tmp_path, tiny_tokenizer, arch, source):
    torch.manual_seed(0)
    model = _causal_lm(arch, len(tiny_tokenizer), tiny_tokenizer)
    assert default_suffixes(model, {"llama": ["q_proj", "k_proj", "v_proj", "o_proj"]})[1] == source
    folder = _folder(tmp_path, arch, model, tiny_tokenizer)
    sums = [{"prompt": f"{a}+{b}=", "response": str(a + b)} for a in range(5) for b in range(4)]
    data = _rows(tmp_path / "d.jsonl", sums)
    out = tmp_path / "run"
    metrics = train(TrainConfig(model=str(folder), data=data, method="ts-lora", max_steps=3, batch_size=4,
                                out=str(out),
                                n_eval=4, max_new_tokens=3, warmup_steps=1, lr=1e-2, answer_pattern=r"\d+"))
    assert metrics["task_kind"] == "generation" and 0 <= metrics["accuracy"] <= 1
    assert metrics["kept_fraction"] is not None and metrics["perplexity"] > 0
    manifest = json.loads((out / "ts_config.json").read_text())
    if arch == "gpt2":
        assert all(name.endswith("c_attn") for name in manifest["gated_modules"])
        assert manifest["peft_config"]["fan_in_fan_out"] is True
    again = evaluate(EvalConfig(adapter=str(out)))
    assert again["accuracy"] == metrics["accuracy"]
    assert again["kept_fraction"] == pytest.approx(metrics["kept_fraction"])


def test_bert_classification_trains_saves_and_loads(tmp_path, tiny_tokenizer):
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=256, pad_token_id=tiny_tokenizer.pad_token_id)
    folder = _folder(tmp_path, "bert", BertForSequenceClassification(config), tiny_tokenizer)
    data = _rows(tmp_path / "d.jsonl", [{"text": t * 3, "label": i % 2} for i, t in enumerate("abcdefghijklmnop")])
    out = tmp_path / "run"
    metrics = train(TrainConfig(model=str(folder), data=data, method="ts-lora", max_steps=3, batch_size=4,
                                out=str(out),
                                n_eval=4, warmup_steps=1))
    assert metrics["task_kind"] == "classification" and metrics["kept_fraction"] is not None
    assert evaluate(EvalConfig(adapter=str(out)))["accuracy"] == metrics["accuracy"]


def test_gpt2_conv1d_gate_drops_the_update_exactly(tiny_tokenizer):
    torch.manual_seed(0)
    model = _causal_lm("gpt2", len(tiny_tokenizer), tiny_tokenizer).eval()
    ids = torch.tensor([tiny_tokenizer("hello there")["input_ids"]])
    base_logits = model(input_ids=ids).logits
    names = target_module_names(model, {}, {"lm_head"})
    assert names and all(isinstance(model.get_submodule(n), Conv1D) for n in names)
    ts = get_ts_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=names, fan_in_fan_out=True),
                           TokenSelectiveConfig()).eval()
    for name, parameter in ts.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.5)
    adapted = ts(input_ids=ids).logits
    assert not torch.allclose(adapted, base_logits)
    ts.set_thresholds(float("inf"))  # every update dropped: exactly the base model
    assert torch.allclose(ts(input_ids=ids).logits, base_logits, atol=1e-6)


def test_model_without_defaults_asks_for_target_modules(tiny_tokenizer):
    config = DistilBertConfig(vocab_size=len(tiny_tokenizer), dim=32, n_layers=1, n_heads=2, hidden_dim=64)
    model = DistilBertForSequenceClassification(config)
    with pytest.raises(ValueError, match="no default target modules for model type 'distilbert'.*--target-modules"):
        target_module_names(model, {}, set())
    assert target_module_names(model, {}, set(), ["q_lin", "v_lin"]) == [
        "distilbert.transformer.layer.0.attention.q_lin", "distilbert.transformer.layer.0.attention.v_lin"]
