"""A bottleneck adapter (Houlsby-style) for linear layers and 1×1 convolutions, since peft has none.

    h = W0 x + b                       (frozen base layer)
    M = up(act(down(h)))               (adapter update; `up` starts at zero, so M = 0 at step 0)
    output = h + M                     (residual)

On a 1×1 convolution (a per-position linear layer) down and up are 1×1 convolutions too: the same
bottleneck applied at every spatial position, over the channels.

Target modules are matched by peft's own matcher, so `target_modules` means what it means in peft.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from peft.tuners.tuners_utils import check_target_module_exists
from torch import nn

from .targets import ADAPTABLE, out_features

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


@dataclass
class BottleneckConfig:
    target_modules: list[str] | str | None = None
    bottleneck_size: int = 16
    non_linearity: str = "relu"
    exclude_modules: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    target_parameters: None = field(default=None, repr=False)  # read by peft's matcher; unused here
    layers_to_transform: None = field(default=None, repr=False)
    layers_pattern: None = field(default=None, repr=False)
    peft_type: str = field(default="BOTTLENECK", init=False)

    def __post_init__(self) -> None:
        if not self.target_modules:
            raise ValueError("BottleneckConfig.target_modules: name the modules to adapt (e.g. ['query', 'value'])")
        if not isinstance(self.bottleneck_size, int) or self.bottleneck_size < 1:
            raise ValueError(f"BottleneckConfig.bottleneck_size={self.bottleneck_size!r}: must be an int >= 1")
        if self.non_linearity not in ACTIVATIONS:
            raise ValueError(f"BottleneckConfig.non_linearity={self.non_linearity!r}: "
                             f"choose one of {sorted(ACTIVATIONS)}")

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init and f.repr}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "BottleneckConfig":
        return cls(**{k: v for k, v in values.items() if k != "peft_type"})


def is_pointwise_conv(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1) and module.groups == 1


class BottleneckLayer(nn.Module):
    """Wraps a frozen linear layer (nn.Linear or GPT-2's Conv1D) or 1×1 convolution; only `adapter_down` /
    `adapter_up` train."""

    def __init__(self, base_layer: nn.Module, config: BottleneckConfig):
        super().__init__()
        self.base_layer = base_layer
        conv = is_pointwise_conv(base_layer)
        width = base_layer.out_channels if conv else out_features(base_layer)
        make = (lambda i, o: nn.Conv2d(i, o, 1)) if conv else nn.Linear  # noqa: E731
        self.feature_dim = 1 if conv else -1  # where the features are in the output (channels for a convolution)
        self.adapter_down = make(width, config.bottleneck_size)
        self.adapter_act = ACTIVATIONS[config.non_linearity]()
        self.adapter_up = make(config.bottleneck_size, width)
        nn.init.zeros_(self.adapter_up.weight)
        nn.init.zeros_(self.adapter_up.bias)
        self.to(base_layer.weight.device)

    def forward(self, x):
        h = self.base_layer(x)
        update = self.adapter_up(self.adapter_act(self.adapter_down(h.to(self.adapter_down.weight.dtype))))
        return h + update.to(h.dtype)


def inject_bottleneck_adapters(model: nn.Module, config: BottleneckConfig) -> list[str]:
    """Replace every matching nn.Linear / Conv1D by a `BottleneckLayer`; freeze all else. Returns adapted names."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    names = [name for name, module in model.named_modules()
             if (isinstance(module, ADAPTABLE) or is_pointwise_conv(module))
             and bool(check_target_module_exists(config, name))]
    if not names:
        raise ValueError(f"BottleneckConfig.target_modules={config.target_modules!r} matched no nn.Linear/Conv1D "
                         f"or 1×1 nn.Conv2d in {type(model).__name__}")
    for name, module in model.named_modules():
        if any(name == m or name.endswith(f".{m}") for m in config.modules_to_save or []):
            module.requires_grad_(True)  # e.g. a classification head trained in full, as peft's modules_to_save
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, BottleneckLayer(getattr(parent, child), config))
    return names
