"""The gate on a CUDA device: equivalences in fp32 / bf16 / fp16, no host sync in a training step, Trainer bf16,
greedy generation. Marked `cuda` and skipped without a CUDA device (scripts/gpu_check.sh runs them).

Tolerances: τ = 0 against peft 1e-5 (fp32) / 2e-2 (bf16, fp16) relative and absolute — the gated model computes
the same ops as peft, but a gate multiplies z by an all-ones mask, which rounds identically, so equality is
expected and the tolerance only absorbs kernel choice; τ = ∞ against the base model: exact.
"""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from torch import nn

from models import MLP, lora
from tspeft import BottleneckConfig, TokenSelectiveConfig, get_ts_peft_model

# TSPEFT_CUDA_TESTS_DEVICE=cpu runs these tests' code on the CPU (a dry run of the tests themselves; the sync check
# then only runs the step), so they can be checked on a machine without a GPU.
DEVICE = os.environ.get("TSPEFT_CUDA_TESTS_DEVICE", "cuda")
ON_CUDA = DEVICE == "cuda"
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(ON_CUDA and not torch.cuda.is_available(),
                                                   reason="needs a CUDA device (scripts/gpu_check.sh)")]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def lora_config(dora: bool = False) -> LoraConfig:
    return lora(["lin0", "lin1"], dora=dora, r=8)


def models(method: str, dtype: torch.dtype):
    """(TS model, ungated reference, base) with equal weights, the base in `dtype` on CUDA."""
    torch.manual_seed(0)
    base = MLP(64).to(DEVICE, dtype)
    if method == "adapter":
        config = BottleneckConfig(target_modules=["lin0", "lin1"], bottleneck_size=8)
        ts_config = TokenSelectiveConfig(target_kept=0.5, warmup_steps=0)
        ts_model = get_ts_peft_model(copy.deepcopy(base), config, ts_config)
        with torch.no_grad():
            for name, parameter in ts_model.named_parameters():
                if "adapter_up" in name:
                    parameter.normal_(0, 0.2)
        reference = copy.deepcopy(ts_model)
        reference._remove_gates()
        return ts_model.to(DEVICE), reference.model.to(DEVICE), base
    reference = get_peft_model(copy.deepcopy(base), lora_config(method == "dora")).to(DEVICE)
    ts_model = get_ts_peft_model(copy.deepcopy(base), lora_config(method == "dora"),
                                 TokenSelectiveConfig(target_kept=0.5, warmup_steps=0)).to(DEVICE)
    set_peft_model_state_dict(ts_model.model, get_peft_model_state_dict(reference))
    return ts_model, reference, base


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("method", ["lora", "dora", "adapter"])
def test_gate_on_cuda_tau_zero_is_peft_tau_inf_is_base_and_it_trains(method, dtype):
    ts_model, reference, base = models(method, DTYPES[dtype])
    x = torch.randn(4, 96, 64, device=DEVICE, dtype=DTYPES[dtype])
    tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype == "fp32" else {"rtol": 2e-2, "atol": 2e-2}
    with torch.no_grad():
        torch.testing.assert_close(ts_model(x), reference(x), **tolerance)
        ts_model.set_thresholds(math.inf)
        assert torch.equal(ts_model(x), base(x))
        ts_model.set_thresholds(0.0)
    ts_model.train()
    optimizer = torch.optim.AdamW([p for p in ts_model.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(6):
        optimizer.zero_grad()
        ts_model(x).float().pow(2).mean().backward()
        assert all(torch.isfinite(p.grad).all() for p in ts_model.parameters() if p.grad is not None)
        optimizer.step()
        ts_model.update_thresholds()
    taus = ts_model.thresholds()
    assert all(math.isfinite(t) and t >= 0 for t in taus.values()) and any(t > 0 for t in taus.values())
    for gate in ts_model.gates.values():  # τ fp32 and the counts fp64 on the device, whatever the base dtype
        assert gate.tau.dtype == torch.float32 and gate.kept_counts.dtype == torch.float64
        assert gate.tau.device.type == DEVICE
    ts_model.reset_stats()
    with torch.no_grad():
        ts_model(x)
    assert 0.2 < ts_model.kept_fraction() < 0.8


def _sync_free_model(case: str):
    torch.manual_seed(0)
    config = TokenSelectiveConfig(target_kept=0.5, warmup_steps=0)
    if case == "conv-lora":
        base = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1))
        model = get_ts_peft_model(base, LoraConfig(r=4, target_modules=["0"], init_lora_weights=False), config)
        return model.to(DEVICE), torch.randn(4, 3, 16, 16, device=DEVICE)
    if case == "adapter":
        model, _, _ = models("adapter", torch.float32)
    else:
        model = get_ts_peft_model(MLP(64), lora_config(case == "dora"), config).to(DEVICE)
    return model, torch.randn(4, 96, 64, device=DEVICE)


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("case", ["lora", "dora", "adapter", "conv-lora"])
def test_training_step_has_no_host_sync(case, autocast):
    """`torch.cuda.set_sync_debug_mode("error")` raises on any synchronising call: forward and backward of a
    training step (the gate's hooks included) must not issue one; the τ rule (once per step) may."""
    model, x = _sync_free_model(case)
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)

    def forward_backward():
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=autocast):
            loss = model(x).float().pow(2).mean()
        loss.backward()

    for _ in range(3):  # warm-up: lazy CUDA initialisation may sync; τ > 0 afterwards
        optimizer.zero_grad()
        forward_backward()
        optimizer.step()
        model.update_thresholds()
    optimizer.zero_grad()
    if not ON_CUDA:
        forward_backward()
        return
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        forward_backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert any(t > 0 for t in model.thresholds().values())


def test_trainer_bf16_on_cuda(tmp_path, tiny_bert, tiny_tokenizer):
    import random

    from transformers import Trainer, TrainingArguments

    from tspeft.training.callback import ThresholdCallback

    model = get_ts_peft_model(tiny_bert, LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                                    task_type="SEQ_CLS"),
                              TokenSelectiveConfig(target_kept=0.5, warmup_steps=1))
    features = []
    for i in range(32):
        ids = [2] + [random.Random(i).randint(5, 60) for _ in range(12)]
        features.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": i % 2})
    args = TrainingArguments(output_dir=str(tmp_path / "t"), max_steps=8, per_device_train_batch_size=4,
                             learning_rate=1e-2, logging_steps=4, report_to=[], save_strategy="no", bf16=True,
                             remove_unused_columns=False, disable_tqdm=True, use_cpu=not ON_CUDA)
    trainer = Trainer(model=model, args=args, train_dataset=features, callbacks=[ThresholdCallback()])
    trainer.train()
    assert int(model.rule_step) == 8
    assert all(p.dtype == torch.float32 and p.device.type == DEVICE for p in model.parameters() if p.requires_grad)
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert logged and all(math.isfinite(h["loss"]) and 0 < h["kept_fraction"] <= 1 for h in logged)
    assert any(t > 0 for t in model.thresholds().values())


def test_greedy_generation_on_cuda(tiny_llama, tiny_tokenizer):
    """Left-padded batch, KV cache: τ = 0 generates peft's tokens, τ = ∞ the base model's."""
    torch.manual_seed(0)
    base = tiny_llama.to(DEVICE)
    config = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    reference = get_peft_model(copy.deepcopy(base), config)
    ts_model = get_ts_peft_model(copy.deepcopy(base), config, TokenSelectiveConfig())
    set_peft_model_state_dict(ts_model.model, get_peft_model_state_dict(reference))
    tiny_tokenizer.padding_side = "left"
    batch = tiny_tokenizer(["hello there", "a much longer prompt here"], return_tensors="pt", padding=True).to(DEVICE)
    settings = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": tiny_tokenizer.pad_token_id}
    with torch.no_grad():
        expected = reference.generate(**batch, **settings)
        assert torch.equal(ts_model.generate(**batch, **settings), expected)
        ts_model.set_thresholds(math.inf)
        with reference.disable_adapter():
            base_tokens = reference.generate(**batch, **settings)
        assert torch.equal(ts_model.generate(**batch, **settings), base_tokens)
        ts_model.set_thresholds(0.05)
        ts_model.reset_stats()
        partly = ts_model.generate(**batch, **settings)
    assert partly.shape == expected.shape
    assert ts_model.kept_fraction() is not None
