"""The tiny models every test builds on: a custom MLP, random BERT / Llama configurations, and peft configs.

    MLP(12)                                  lin0: 12 -> 24, ReLU, lin1: 24 -> 12 (the names peft targets)
    MLP(4, 6, act=nn.Tanh, layers=1)         lin0 only
    tiny_bert(), tiny_llama()                2 layers, hidden 32, vocabulary 50, seeded, in eval mode
    lora(["lin0"]), method_config("dora"), ts_mlp("adapter", target_kept=0.5)

Each factory seeds torch itself where the test relies on fixed weights, so a model is the same wherever built.
"""

from __future__ import annotations

import torch
from peft import LoraConfig
from torch import nn
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

from tspeft import BottleneckConfig, TokenSelectiveConfig, TSPeftModel, get_ts_peft_model


class MLP(nn.Module):
    """lin0 (d_in -> hidden, default 2·d_out), activation, lin1 (hidden -> d_out); `layers=1`: lin0 (d_in -> d_out)."""

    def __init__(self, d_in: int = 12, d_out: int | None = None, hidden: int | None = None, act=nn.ReLU,
                 bias: bool = True, layers: int = 2):
        super().__init__()
        d_out = d_in if d_out is None else d_out
        if layers == 1:
            self.lin0 = nn.Linear(d_in, d_out, bias=bias)
            self.layers = 1
            return
        hidden = 2 * d_out if hidden is None else hidden
        self.lin0 = nn.Linear(d_in, hidden, bias=bias)
        self.act = act()
        self.lin1 = nn.Linear(hidden, d_out, bias=bias)
        self.layers = 2

    def forward(self, x):
        if self.layers == 1:
            return self.lin0(x)
        return self.lin1(self.act(self.lin0(x)))


class ThreeLinear(nn.Module):
    """a, b, c: three 8 -> 8 Linear layers with ReLU between them."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def tiny_bert(vocab_size: int = 50, intermediate_size: int = 48, max_position_embeddings: int = 32,
              dropout: float | None = None, eval_mode: bool = True, hidden_size: int = 32,
              **config) -> BertForSequenceClassification:
    """Random 2-layer BERT (hidden 32, 2 heads, 2 labels), seeded; `dropout`: hidden and attention dropout."""
    torch.manual_seed(0)
    if dropout is not None:
        config.update(hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    config = BertConfig(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=intermediate_size, max_position_embeddings=max_position_embeddings,
                        num_labels=2, **config)
    model = BertForSequenceClassification(config)
    return model.eval() if eval_mode else model


def tiny_llama(vocab_size: int = 50, intermediate_size: int = 48, max_position_embeddings: int = 64,
               eval_mode: bool = True, **config) -> LlamaForCausalLM:
    """Random 2-layer Llama (hidden 32, 4 heads, 2 KV heads), seeded; pad id 0 unless given."""
    torch.manual_seed(0)
    config.setdefault("pad_token_id", 0)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=intermediate_size,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=max_position_embeddings, **config)
    model = LlamaForCausalLM(config)
    return model.eval() if eval_mode else model


def lora(targets, dora: bool = False, r: int = 4, **kwargs) -> LoraConfig:
    """LoRA (DoRA with `dora`) of rank r, alpha 2r, with random B so that the update is not zero."""
    return LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False, use_dora=dora, **kwargs)


def method_config(method: str, targets=("lin0", "lin1")):
    """The peft config of "lora", "dora" or "adapter" (bottleneck size 4) on `targets`."""
    if method == "adapter":
        return BottleneckConfig(target_modules=list(targets), bottleneck_size=4)
    return lora(list(targets), dora=method == "dora")


def ts_mlp(method: str, seed: int = 0, **ts_kwargs) -> TSPeftModel:
    """A gated MLP(12) with `method`'s adapter on lin0 and lin1 (TokenSelectiveConfig(**ts_kwargs))."""
    torch.manual_seed(seed)
    model = get_ts_peft_model(MLP(), method_config(method), TokenSelectiveConfig(**ts_kwargs))
    if method == "adapter":  # the bottleneck adapter starts at M = 0: give it an update to gate
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "adapter_up" in name:
                    p.normal_(0, 0.3)
    return model


def training_bert() -> BertForSequenceClassification:
    """`tiny_bert` without dropout, in training mode (runs compared step by step must not draw dropout masks)."""
    return tiny_bert(dropout=0.0, eval_mode=False)


def training_llama() -> LlamaForCausalLM:
    """`tiny_llama` in training mode."""
    return tiny_llama(eval_mode=False)
