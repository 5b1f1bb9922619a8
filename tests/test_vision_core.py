"""Token gates on convolutions: every spatial position of a 1×1 convolution's feature map is a token."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from torch import nn
from torch.nn import functional as F

from tspeft import TokenSelectiveConfig, TSPeftModel, get_ts_peft_model
from tspeft.tasks.image_models import freeze_batch_norm, image_target_modules


class TinyConvNet(nn.Module):
    """stem 3×3 conv -> BatchNorm -> 1×1 expand (bias) -> 1×1 project -> pooled linear head."""

    def __init__(self, num_labels: int = 3):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.norm = nn.BatchNorm2d(8)
        self.expand = nn.Conv2d(8, 16, 1)
        self.project = nn.Conv2d(16, 8, 1, bias=False)
        self.classifier = nn.Linear(8, num_labels)

    def forward(self, pixel_values, labels=None):
        x = F.relu(self.norm(self.stem(pixel_values)))
        x = self.project(F.relu(self.expand(x)))
        logits = self.classifier(x.mean(dim=(2, 3)))
        return logits if labels is None else F.cross_entropy(logits, labels)


def tiny_conv_net() -> nn.Module:
    torch.manual_seed(0)
    model = TinyConvNet()
    with torch.no_grad():  # non-trivial stored statistics, so a BatchNorm in train mode would differ
        model.norm.running_mean.uniform_(-0.5, 0.5)
        model.norm.running_var.uniform_(0.5, 2.0)
    return freeze_batch_norm(model).eval()


def conv_lora(dora: bool = False) -> LoraConfig:
    return LoraConfig(r=4, lora_alpha=8, target_modules=["expand", "project"], init_lora_weights=False,
                      use_dora=dora)


def gated_and_reference(dora: bool = False):
    torch.manual_seed(1)
    base = tiny_conv_net()
    reference = get_peft_model(copy.deepcopy(base), conv_lora(dora))
    ts_model = get_ts_peft_model(copy.deepcopy(base), conv_lora(dora), TokenSelectiveConfig())
    set_peft_model_state_dict(ts_model.model, get_peft_model_state_dict(reference))
    return ts_model.eval(), reference.eval()


def pixels(batch: int = 2, size: int = 6) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(2))


def test_pointwise_convolutions_are_the_targets():
    assert image_target_modules(tiny_conv_net()) == ["expand", "project"]


@pytest.mark.parametrize("dora", [False, True])
def test_tau_zero_matches_peft_conv_lora_and_tau_inf_matches_base(dora):
    ts_model, reference = gated_and_reference(dora)
    x = pixels()
    with torch.no_grad():
        assert torch.equal(ts_model(pixel_values=x), reference(pixel_values=x))
        assert ts_model.kept_fraction() == 1.0
        ts_model.set_thresholds(math.inf)
        with reference.disable_adapter():
            base = reference(pixel_values=x)
        assert torch.equal(ts_model(pixel_values=x), base)
        assert ts_model.kept_fraction() == 0.5  # the τ = 0 pass kept all, the τ = ∞ pass none


def test_gate_counts_every_position_of_the_feature_map():
    ts_model, _ = gated_and_reference()
    with torch.no_grad():
        ts_model(pixel_values=pixels(batch=3, size=5))
    for gate in ts_model.gates.values():
        assert gate.kept_counts[1].item() == 3 * 5 * 5  # positions, no padding mask


@pytest.mark.parametrize("dora", [False, True])
def test_positions_are_gated_independently(dora):
    """At a τ between the positions' r, each output position is the adapted one iff its own r ≥ τ."""
    ts_model, reference = gated_and_reference(dora)
    layer = ts_model.get_base_model().project
    ref_layer = reference.get_base_model().project
    features = torch.randn(2, 16, 4, 5, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        adapted = ref_layer(features)
        base = ref_layer.base_layer(features)
        r = (adapted - base).norm(dim=1) / base.norm(dim=1)
        tau = r.median().item()
        ts_model.set_thresholds({"project": tau})
        gated = layer(features)
    keep = r >= tau
    assert 0 < keep.sum() < keep.numel()
    expected = torch.where(keep.unsqueeze(1), adapted, base)
    assert torch.equal(gated, expected)
    # changing one dropped position's input changes no other position's decision or output
    p = tuple(int(i) for i in (~keep).nonzero()[0])
    changed = features.clone()
    changed[p[0], :, p[1], p[2]] += 1.0
    with torch.no_grad():
        again = layer(changed)
    others = torch.ones_like(keep)
    others[p] = False
    assert torch.equal(again.movedim(1, -1)[others], gated.movedim(1, -1)[others])


def test_adapter_gradient_flows_through_kept_positions_only():
    ts_model, _ = gated_and_reference()
    layer = ts_model.get_base_model().project
    features = torch.randn(1, 16, 3, 3, generator=torch.Generator().manual_seed(4))
    ts_model.train()
    ts_model.set_thresholds({"project": math.inf})
    layer(features).sum().backward()
    assert all(p.grad is None or not p.grad.any() for n, p in layer.named_parameters() if "lora_" in n)


def test_batch_norm_stays_frozen_in_train_mode():
    ts_model, _ = gated_and_reference()
    norm = ts_model.get_base_model().norm
    before = norm.running_mean.clone()
    ts_model.train()
    ts_model(pixel_values=pixels(), labels=torch.tensor([0, 1])).backward()
    assert torch.equal(norm.running_mean, before)
    ts_model.set_thresholds(math.inf)  # a fully gated model in train mode is the frozen base, eval-mode BN
    ts_model.train()
    with torch.no_grad():
        trained_mode = ts_model(pixel_values=pixels())
    ts_model.eval()
    with torch.no_grad():
        assert torch.equal(trained_mode, ts_model(pixel_values=pixels()))


@pytest.mark.parametrize("dora", [False, True])
def test_conv_adapter_save_load_is_bit_exact(dora, tmp_path):
    ts_model, _ = gated_and_reference(dora)
    ts_model.train()
    ts_model.ts_config.warmup_steps = 0
    ts_model.ts_config.target_kept = 0.5
    optimizer = torch.optim.SGD([p for p in ts_model.parameters() if p.requires_grad], lr=0.1)
    for step in range(3):
        ts_model(pixel_values=pixels(), labels=torch.tensor([0, 2])).backward()
        optimizer.step()
        optimizer.zero_grad()
        ts_model.update_thresholds()
    ts_model.eval()
    ts_model.save_pretrained(tmp_path / "adapter")
    loaded = TSPeftModel.from_pretrained(tiny_conv_net(), tmp_path / "adapter")
    assert loaded.thresholds() == ts_model.thresholds()
    assert any(t > 0 for t in loaded.thresholds().values())
    x = pixels(batch=3)
    with torch.no_grad():
        assert torch.equal(loaded(pixel_values=x), ts_model(pixel_values=x))


def test_bottleneck_adapter_on_pointwise_convolutions():
    """The bottleneck runs at every position; τ = 0 is the ungated adapter, τ = ∞ the base, positions counted."""
    from tspeft import BottleneckConfig
    from tspeft.core.adapter import inject_bottleneck_adapters

    config = BottleneckConfig(target_modules=["expand", "project"], bottleneck_size=4)
    reference = tiny_conv_net()
    inject_bottleneck_adapters(reference, config)
    torch.manual_seed(5)
    for name, parameter in reference.named_parameters():
        if "adapter_up" in name:
            nn.init.normal_(parameter)  # a non-zero update
    ts_model = get_ts_peft_model(tiny_conv_net(), config, TokenSelectiveConfig()).eval()
    ts_model.get_base_model().load_state_dict(reference.state_dict(), strict=False)
    assert isinstance(reference.expand.adapter_down, nn.Conv2d)
    x = pixels(batch=2, size=5)
    with torch.no_grad():
        adapted = reference(pixel_values=x)
        assert torch.equal(ts_model(pixel_values=x), adapted)
        assert ts_model.gates["expand"].kept_counts[1].item() == 2 * 5 * 5
        ts_model.set_thresholds(math.inf)
        assert torch.equal(ts_model(pixel_values=x), tiny_conv_net()(pixel_values=x))
        assert not torch.equal(adapted, tiny_conv_net()(pixel_values=x))


@pytest.mark.slow
def test_packaged_efficientnet_lite0_loads_and_keeps_its_function():
    """The packaged model: 32 pointwise convolutions; swapping the package's 1×1 convolutions for plain ones
    (so peft builds standard Conv2d LoRA layers) leaves the features unchanged."""
    from tspeft.tasks.image_models import _efficientnet_package, load_efficientnet_lite0

    model, preprocessing = load_efficientnet_lite0(num_labels=4, image_size=64)
    assert preprocessing.size == 64 and len(image_target_modules(model)) == 32
    original = _efficientnet_package().EfficientNet.from_name("efficientnet-lite0", image_size=64,
                                                              drop_connect_rate=0.0)
    original.load_state_dict(model.backbone.state_dict(), strict=False)  # same weights, package convolutions
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    model.eval(), original.eval()
    with torch.no_grad():
        assert torch.equal(model.backbone.extract_features(x), original.extract_features(x))
        assert model(pixel_values=x).logits.shape == (2, 4)
