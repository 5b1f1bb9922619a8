"""Mixed precision: bf16 autocast training, gate statistics under a bf16 cast, half-precision bases."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from models import MLP, lora, method_config, ts_mlp
from tspeft import TokenSelectiveConfig, get_ts_peft_model


@pytest.mark.parametrize("method", ["lora", "dora", "adapter"])
def test_bf16_autocast_forward_backward_and_tau_rule(method):
    model = ts_mlp(method, target_kept=0.5, warmup_steps=1)
    teacher = nn.Linear(12, 12)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    torch.manual_seed(1)
    for step in range(10):
        x = torch.randn(8, 6, 12)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
            loss = nn.functional.mse_loss(out.float(), teacher(x).detach())
        assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
        loss.backward()
        for name, p in model.named_parameters():
            if p.requires_grad:
                assert p.grad is not None and torch.isfinite(p.grad).all(), name
        optimizer.step()
        optimizer.zero_grad()
        model.update_thresholds()
        if step == 7:
            model.reset_stats()
    taus = model.thresholds()
    assert all(math.isfinite(t) and t > 0 for t in taus.values()), taus
    for gate in model.gates.values():  # the gate's state stays fp32 / fp64 under autocast
        assert gate.tau.dtype == torch.float32 and gate.kept_counts.dtype == torch.float64
    assert 0.2 < model.kept_fraction() < 0.8


def test_gate_statistics_keep_precision_when_the_model_is_cast_to_bf16():
    """`ts_model.to(torch.bfloat16)` (or FSDP MixedPrecision(buffer_dtype=bf16)) casts τ and the float64
    statistics buffers too: bf16 represents integers exactly only up to 256, so token counts and the
    r histogram (hence the quantiles that set τ) go wrong, and τ itself is rounded."""
    model = get_ts_peft_model(MLP(), lora(["lin0"]), TokenSelectiveConfig()).to(torch.bfloat16)
    model.set_thresholds(0.3)
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(257, 12, dtype=torch.bfloat16))
    gate = model.gates["lin0"]
    assert gate.kept_counts[1].item() == 3 * 257, f"counted {gate.kept_counts[1].item()} of {3 * 257} tokens"
    assert model.thresholds()["lin0"] == pytest.approx(0.3, rel=1e-6)
    # τ and the rule state set before the cast keep their fp32 values exactly (bf16 would round 0.3 to 0.30078)
    before = get_ts_peft_model(MLP(), lora(["lin0"]), TokenSelectiveConfig())
    before.set_thresholds(0.3)
    before.gates["lin0"].loss_slope.fill_(1e-3)
    cast = before.to(torch.bfloat16).gates["lin0"]
    assert cast.tau.dtype == torch.float32 and cast.tau.item() == torch.tensor(0.3).item()
    assert cast.loss_slope.item() == torch.tensor(1e-3).item()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_bottleneck_adapter_on_half_precision_base(dtype):
    """peft's LoRA keeps fp32 adapter weights on a fp16/bf16 base and casts its input; `BottleneckLayer`
    builds fp32 layers and does not cast, so the first forward on a half-precision base crashes."""
    torch.manual_seed(0)
    model = get_ts_peft_model(MLP().to(dtype), method_config("adapter"), TokenSelectiveConfig())
    out = model(torch.randn(2, 3, 12, dtype=dtype))
    assert out.dtype == dtype and torch.isfinite(out).all()
