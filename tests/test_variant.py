"""The peft LoRA-variant route (core/variant.py) against plain peft and against the hook route it replaced.

* which layers take the variant slot, and that they carry no module hooks;
* kept-token gradients: TS-LoRA at a τ that drops some tokens has the gradients of peft's LoRA whose update is
  zeroed for the dropped tokens (the definition), and at τ = 0 exactly peft's gradients (LoRA and DoRA);
* peft's own merge refuses a gated layer; `merge_and_unload(accept_ungated=True)` gives peft's variant back;
* the in-place inference paths equal the training path's output.
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from peft.tuners.lora.variants import DoraLinearVariant
from torch import nn

from models import MLP, lora
from tspeft import BottleneckConfig, TokenSelectiveConfig, get_ts_peft_model
from tspeft.core.attach import OutputDifferenceHooks
from tspeft.core.variant import TokenSelectiveVariant


class ConvMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.lin0 = nn.Linear(4, 4)

    def forward(self, x):
        return self.lin0(self.conv(x).permute(0, 2, 3, 1))


def twins(dora: bool = False, seed: int = 0):
    """A TS model and plain peft with equal weights, on MLP(12) with LoRA (DoRA) on lin0 and lin1."""
    torch.manual_seed(seed)
    base = MLP(act=nn.Tanh)
    reference = get_peft_model(copy.deepcopy(base), lora(["lin0", "lin1"], dora=dora))
    ts_model = get_ts_peft_model(copy.deepcopy(base), lora(["lin0", "lin1"], dora=dora), TokenSelectiveConfig())
    set_peft_model_state_dict(ts_model.model, get_peft_model_state_dict(reference))
    return ts_model, reference


def layer_hooks(module: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


@pytest.mark.parametrize("dora", [False, True])
def test_linear_lora_and_dora_take_the_variant_slot_without_hooks(dora):
    ts_model, _ = twins(dora)
    base = ts_model.get_base_model()
    for name in ("lin0", "lin1"):
        layer = base.get_submodule(name)
        variant = layer.lora_variant["default"]
        assert isinstance(variant, TokenSelectiveVariant) and variant.gate is ts_model.gates[name]
        assert isinstance(variant.inner, DoraLinearVariant) if dora else variant.inner is None
        assert layer_hooks(layer) == 0, "a gated Linear layer runs one forward with no module hooks"


def test_convolutions_bias_lora_and_bottleneck_adapters_keep_the_hook_route():
    conv = get_ts_peft_model(ConvMLP(), lora(["conv", "lin0"]), TokenSelectiveConfig())
    kinds = {type(a).__name__ for a in conv._attachments[:-1]}
    assert kinds == {"TokenSelectiveVariant", "OutputDifferenceHooks"}
    biased = get_ts_peft_model(MLP(), lora(["lin0"], lora_bias=True), TokenSelectiveConfig())
    assert isinstance(biased._attachments[0], OutputDifferenceHooks)
    adapter = get_ts_peft_model(MLP(), BottleneckConfig(target_modules=["lin0"]), TokenSelectiveConfig())
    assert isinstance(adapter._attachments[0], OutputDifferenceHooks)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dora", [False, True])
def test_tau_zero_training_gives_peft_s_outputs_and_gradients_exactly(dora, dtype):
    ts_model, reference = twins(dora)
    x = torch.randn(3, 7, 12, generator=torch.Generator().manual_seed(1)).to(dtype)
    outputs = []
    for model in (ts_model.to(dtype).train(), reference.to(dtype).train()):
        out = model(x)
        out.pow(2).mean().backward()
        outputs.append(out)
    assert torch.equal(outputs[0], outputs[1])
    grads = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
    for name, p in ts_model.model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p.grad, grads[name]), name


def test_kept_token_gradients_equal_peft_with_dropped_updates_zeroed():
    """Definition: h = W0 x + b + S ⊙ s·B A x. peft with S applied to A's output by a hook is that definition."""
    ts_model, reference = twins()
    x = torch.randn(4, 9, 12, generator=torch.Generator().manual_seed(2))
    ts_model.train()
    for gate in ts_model.gates.values():
        gate.record_keep_mask = True
    with torch.no_grad():
        ts_model(x)
    ts_model.set_thresholds({n: g.mean_relative_magnitude() for n, g in ts_model.gates.items()})
    ts_model(x).pow(2).mean().backward()
    masks = {name: gate.last_keep_mask for name, gate in ts_model.gates.items()}
    assert all(0 < float(m.float().mean()) < 1 for m in masks.values()), "τ must drop some tokens"
    base = reference.get_base_model()
    for name, mask in masks.items():
        base.get_submodule(name).lora_A["default"].register_forward_hook(
            lambda module, args, z, mask=mask: z * mask.unsqueeze(-1))
    reference.train()
    reference(x).pow(2).mean().backward()
    grads = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
    for name, p in ts_model.model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[name], rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize("dora", [False, True])
def test_peft_merge_refuses_and_dropping_the_gate_restores_peft_s_variant(dora):
    ts_model, reference = twins(dora)
    layer = ts_model.get_base_model().get_submodule("lin0")
    with pytest.raises(RuntimeError, match="cannot be merged into W0"):
        layer.merge()
    x = torch.randn(2, 5, 12)
    merged = ts_model.merge_and_unload(accept_ungated=True)
    assert isinstance(layer.lora_variant.get("default"), DoraLinearVariant) if dora else not layer.lora_variant
    with torch.no_grad():
        torch.testing.assert_close(merged(x), reference.merge_and_unload()(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("kept_rows_path", [False, True])
def test_in_place_inference_equals_the_training_path(dora, kept_rows_path, monkeypatch):
    ts_model, _ = twins(dora)
    x = torch.randn(4, 16, 12, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ts_model.eval()(x)
    ts_model.set_thresholds({n: g.mean_relative_magnitude() for n, g in ts_model.gates.items()})
    monkeypatch.setattr(TokenSelectiveVariant, "skip_min_elements", 0 if kept_rows_path else 1 << 40)
    monkeypatch.setattr(TokenSelectiveVariant, "skip_max_kept", 1.0)
    with torch.no_grad():
        in_place = ts_model(x)
    with_autograd = ts_model(x)  # eval mode with autograd: the training path's operations
    assert with_autograd.requires_grad
    torch.testing.assert_close(in_place, with_autograd.detach(), rtol=1e-6, atol=1e-6)
