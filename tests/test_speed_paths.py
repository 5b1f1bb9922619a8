"""The fast paths equal their reference definitions.

* τ rule: `histogram_quantiles` (every module in one batched call) and the exact sort-based
  `project_onto_budget` against the per-module / bisection definitions kept below as test helpers.
* DoRA gate on peft's DoRA module output against the output-difference definition h = where(S, adapted, base).
* Inference skip path (LoRA, eval + no_grad, B·z only for kept rows) against the dense-masked path.
"""

from __future__ import annotations

import math

import pytest
import torch
from peft import LoraConfig
from torch import nn

import tspeft.core.attach as attach
from models import MLP
from tspeft import TokenSelectiveConfig, get_ts_peft_model
from tspeft.core.tau_rule import histogram_quantiles, project_onto_budget
from tspeft.core.variant import TokenSelectiveVariant


# ----- reference definitions (the former per-module implementations) ------------------------------------------
def reference_quantile(histogram: torch.Tensor, q: float, log10_range: tuple[float, float]) -> float:
    total = float(histogram.sum())
    if total <= 0:
        return 0.0
    lo, hi = log10_range
    width = (hi - lo) / histogram.numel()
    cumulative = torch.cumsum(histogram, 0)
    # Normalised by its own last value, so the cdf ends at exactly 1: with a separately summed total it can end one
    # rounding step below 1, and q = 1 then lands in the last bin even when that bin and those before it are empty.
    cdf = cumulative / cumulative[-1]
    q = min(max(q, 0.0), 1.0)
    index = int(torch.searchsorted(cdf, torch.tensor(q, dtype=cdf.dtype)).clamp(max=histogram.numel() - 1))
    before = float(cdf[index - 1]) if index > 0 else 0.0
    inside = (q - before) / max(float(cdf[index]) - before, 1e-12)
    return 10 ** (lo + width * (index + min(max(inside, 0.0), 1.0)))


def reference_projection(u: torch.Tensor, weights: torch.Tensor, target: float, low: float) -> torch.Tensor:
    weights = weights / weights.sum()
    nu_low, nu_high = float(u.min()) - 1.0, float(u.max()) + 1.0
    for _ in range(200):
        nu = 0.5 * (nu_low + nu_high)
        if float((weights * (u - nu).clamp(low, 1.0)).sum()) > target:
            nu_low = nu
        else:
            nu_high = nu
    return (u - 0.5 * (nu_low + nu_high)).clamp(low, 1.0)


# ----- τ rule ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(20))
def test_histogram_quantiles_equal_the_per_module_reference(seed):
    generator = torch.Generator().manual_seed(seed)
    modules, bins = int(torch.randint(1, 40, (1,), generator=generator)), 64
    histograms = torch.rand(modules, bins, generator=generator, dtype=torch.float64)
    histograms *= torch.rand(modules, bins, generator=generator, dtype=torch.float64) < 0.3  # empty bins
    histograms *= torch.randint(0, 1000, (modules, bins), generator=generator)  # token counts
    histograms[0] = 0  # an empty module
    if modules > 1:
        histograms[1] = 0
        histograms[1, 5] = 7  # all mass in one bin
    q = torch.rand(modules, 5, generator=generator, dtype=torch.float64) * 1.4 - 0.2  # also outside [0, 1]
    q[:, 0], q[:, 1] = 0.0, 1.0
    log10_range = (-6.0, 2.0)
    fast = histogram_quantiles(histograms, q, log10_range)
    slow = torch.tensor([[reference_quantile(h, float(p), log10_range) for p in row] for h, row in zip(histograms, q)],
                        dtype=torch.float64)
    torch.testing.assert_close(fast, slow, rtol=1e-12, atol=0)


@pytest.mark.parametrize("seed", range(30))
def test_exact_projection_equals_bisection(seed):
    generator = torch.Generator().manual_seed(seed)
    modules = int(torch.randint(1, 50, (1,), generator=generator))
    u = torch.rand(modules, generator=generator, dtype=torch.float64) * 1.6 - 0.3
    weights = torch.rand(modules, generator=generator, dtype=torch.float64) * 1000
    weights[torch.rand(modules, generator=generator) < 0.2] = 0  # modules that saw no token
    if float(weights.sum()) == 0:
        weights[0] = 1.0
    low = [0.0, 0.1, 0.3][seed % 3]
    target = [0.3, 0.5, 0.9, 1.0, low][seed % 5]
    fast = project_onto_budget(u, weights, target, low)
    slow = reference_projection(u, weights, target, low)
    counted = weights > 0  # zero-weight modules are not constrained (the rule keeps their old u)
    torch.testing.assert_close(fast[counted], slow[counted], rtol=0, atol=1e-9)
    if target >= low:
        assert abs(float((weights * fast).sum() / weights.sum()) - target) < 1e-9


def test_projection_handles_ties_and_a_target_under_the_floor():
    u = torch.tensor([0.5, 0.5, 0.5], dtype=torch.float64)
    torch.testing.assert_close(project_onto_budget(u, torch.ones(3, dtype=torch.float64), 0.4, 0.0),
                               torch.full((3,), 0.4, dtype=torch.float64))
    torch.testing.assert_close(project_onto_budget(u, torch.ones(3, dtype=torch.float64), 0.05, 0.1),
                               torch.full((3,), 0.1, dtype=torch.float64))
    torch.testing.assert_close(project_onto_budget(u, torch.ones(3, dtype=torch.float64), 1.0, 0.0),
                               torch.ones(3, dtype=torch.float64))


# ----- gate paths -----------------------------------------------------------------------------------------------
def build(method: str, d: int = 16, bias: bool = True, seed: int = 0, dropout: float = 0.0):
    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["lin0", "lin1"], init_lora_weights=False,
                        use_dora=method == "dora", lora_dropout=dropout)
    return get_ts_peft_model(MLP(d, act=nn.Tanh, bias=bias), config,
                             TokenSelectiveConfig(target_kept=0.5, warmup_steps=0))


def with_output_difference_hooks(ts_model):
    """The same model gated by the generic definition: M = adapted − base, h = where(S, adapted, base)."""
    for hooks in ts_model._attachments[:-1]:
        hooks.remove()
    base = ts_model.get_base_model()
    ts_model._attachments = [attach.OutputDifferenceHooks(base.get_submodule(name), gate, ts_model.token_mask)
                       for name, gate in ts_model.gates.items()] + ts_model._attachments[-1:]
    return ts_model


def median_thresholds(ts_model, x):
    """τ per gate at the median r of this input, so about half the tokens are kept."""
    ts_model.set_thresholds(0.0)
    rs = {}
    handles = []
    for name, gate in ts_model.gates.items():
        handles.append(gate.register_forward_hook(
            lambda m, args, out, name=name: rs.__setitem__(name, args[0].flatten())))
    with torch.no_grad():
        ts_model(x)
    for h in handles:
        h.remove()
    ts_model.set_thresholds({name: float(r.median()) for name, r in rs.items()})
    ts_model.reset_stats()
    for gate in ts_model.gates.values():
        gate.clear_rule_stats()


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("padded", [False, True])
def test_dora_gate_on_the_dora_module_equals_the_output_difference_gate(bias, padded):
    fast = build("dora", bias=bias).train()
    slow = with_output_difference_hooks(build("dora", bias=bias).train())
    assert any(isinstance(h, TokenSelectiveVariant) for h in fast._attachments)
    x = torch.randn(3, 10, 16, generator=torch.Generator().manual_seed(1))
    median_thresholds(fast, x)
    slow.set_thresholds(fast.thresholds())
    for gate in [*fast.gates.values(), *slow.gates.values()]:
        gate.record_keep_mask = True
    mask = torch.ones(3, 10, dtype=torch.bool)
    if padded:
        mask[1, 6:] = False
    for model in (fast, slow):
        with model.real_tokens(mask):
            out = model(x)
        out.pow(2).mean().backward()
    for name in fast.gates:  # same decisions, then same outputs and gradients
        assert torch.equal(fast.gates[name].last_keep_mask, slow.gates[name].last_keep_mask), name
        assert 0 < fast.gates[name].last_keep_mask.float().mean() < 1
    with torch.no_grad():
        torch.testing.assert_close(fast(x), slow(x), rtol=1e-5, atol=1e-6)
    for (name, p), (_, q) in zip(fast.named_parameters(), slow.named_parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
    for name in fast.gates:
        a, b = fast.gates[name], slow.gates[name]
        torch.testing.assert_close(a.kept_counts[:2], b.kept_counts[:2])
        # r differs by float rounding (M from peft's DoRA module vs adapted − base): a token on a bin edge may
        # land in the neighbouring bin, nowhere further.
        assert a.r_histogram.sum() == b.r_histogram.sum()
        assert (a.r_histogram.cumsum(0) - b.r_histogram.cumsum(0)).abs().max() <= 0.05 * a.r_histogram.sum()
        torch.testing.assert_close(a.change_histogram, b.change_histogram, rtol=1e-4, atol=1e-9)
        assert b.change_histogram.abs().sum() > 0


def test_dora_dropped_tokens_get_exactly_the_base_output():
    model = build("dora").eval()
    x = torch.randn(2, 5, 16)
    model.set_thresholds(math.inf)
    with torch.no_grad():
        gated = model(x)
        with model.model.disable_adapter():
            base = model(x)
    assert torch.equal(gated, base)


@pytest.mark.parametrize("kept", [0.0, 0.2, 0.5, 0.7, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_skip_path_equals_the_dense_masked_path(kept, dtype, monkeypatch):
    model = build("lora", d=32).eval().to(dtype)
    x = torch.randn(4, 64, 32, generator=torch.Generator().manual_seed(3)).to(dtype)
    with torch.no_grad():
        model.set_thresholds(0.0)
        rs = {}
        for name, gate in model.gates.items():  # τ per gate at the (1 − kept)-quantile of its r
            handle = gate.register_forward_hook(
                lambda m, args, out, name=name: rs.__setitem__(name, args[0].flatten()))
            model(x)
            handle.remove()
        model.set_thresholds({n: (0.0 if kept >= 1 else
                                  (math.inf if kept <= 0 else float(r.float().quantile(1 - kept))))
                              for n, r in rs.items()})
        monkeypatch.setattr(TokenSelectiveVariant, "skip_min_elements", 0)
        monkeypatch.setattr(TokenSelectiveVariant, "skip_max_kept", 1.0)  # always skip
        model.reset_stats()
        skipped = model(x)
        skipped_counts = {n: g.kept_counts.clone() for n, g in model.gates.items()}
        monkeypatch.setattr(TokenSelectiveVariant, "skip_max_kept", -1.0)  # never skip
        model.reset_stats()
        dense = model(x)
        dense_counts = {n: g.kept_counts.clone() for n, g in model.gates.items()}
    tolerance = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(skipped, dense, **tolerance)
    for name in dense_counts:
        assert torch.equal(skipped_counts[name], dense_counts[name]), name


def test_lora_skip_path_is_used_only_without_autograd(monkeypatch):
    monkeypatch.setattr(TokenSelectiveVariant, "skip_min_elements", 0)
    model = build("lora", d=32).train()
    model.set_thresholds(math.inf)  # keeps nothing
    rows = []  # rows that reach peft's lora_B, per call
    base = model.get_base_model()
    for name in model.gates:
        base.get_submodule(name).lora_B["default"].register_forward_pre_hook(
            lambda m, args: rows.append(args[0].reshape(-1, args[0].shape[-1]).shape[0]))
    x = torch.randn(2, 8, 32)
    out = model(x)
    out.pow(2).mean().backward()  # training: dense-masked path, gradients flow
    assert rows == [16, 16]
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_A" in n)
    rows.clear()
    with torch.no_grad():
        model.eval()
        model(x)
    assert rows == []  # kept-rows path with nothing kept: lora_B is not called (no broadcast zero row either)
