"""The pinned-allocation diagnostic arms of benchmarks/controls.py hold the allocation they are given."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import LoraConfig
from torch import nn

from tspeft import TokenSelectiveConfig, get_ts_peft_model
from tspeft.core import rule_math

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _pinned():
    spec = importlib.util.spec_from_file_location("_bench_pinned_allocation", BENCHMARKS / "pinned_allocation.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


class TwoBranches(nn.Module):
    def __init__(self, d: int = 8):
        super().__init__()
        self.a, self.b = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        return self.a(x) + self.b(x)


def test_pinned_u_mirrors_about_the_target_in_the_gates_order():
    pinned = _pinned()
    allocation = {"a": 0.3, "b": 0.7}
    assert pinned.pinned_u(allocation, ["b", "a"], 0.5, False, 0.0) == pytest.approx([0.7, 0.3])
    assert pinned.pinned_u(allocation, ["b", "a"], 0.5, True, 0.0) == pytest.approx([0.3, 0.7])
    # 0.95 at k 0.4 mirrors to −0.15, outside [0, 1]: projected back onto the budget
    mirrored = pinned.pinned_u({"a": 0.95, "b": 0.05, "c": 0.2}, ["a", "b", "c"], 0.4, True, 0.0)
    assert mirrored.min() >= 0.0 and mirrored.mean() == pytest.approx(0.4)
    with pytest.raises(SystemExit, match="no module 'c'"):
        pinned.pinned_u(allocation, ["a", "c"], 0.5, False, 0.0)


def test_training_inside_the_pin_holds_the_allocation_and_the_rule_comes_back():
    pinned = _pinned()
    torch.manual_seed(0)
    config = TokenSelectiveConfig(target_kept=0.5, warmup_steps=2, allocation="uniform")
    model = get_ts_peft_model(TwoBranches(), LoraConfig(r=2, target_modules=["a", "b"]), config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    original = rule_math.new_allocation
    with pinned.pinned_allocation(np.array([0.2, 0.8])):
        for _ in range(6):
            model(torch.randn(4, 6, 8)).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
            model.update_thresholds()
    assert list(model.allocated_kept().values()) == pytest.approx([0.2, 0.8])
    assert rule_math.new_allocation is original
    model(torch.randn(4, 6, 8)).square().mean().backward()
    model.update_thresholds()  # the uniform arm again: both modules at the target
    assert list(model.allocated_kept().values()) == pytest.approx([0.5, 0.5])
