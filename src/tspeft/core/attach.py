"""Forward hooks that put a `TokenGate` on an adapted layer the peft variant (variant.py) does not cover.

    h_i = where(S_i, adapted_i, base_i),    M(x_i) = adapted_i − base_i,    S_i = 1(‖M(x_i)‖ / ‖base_i − b‖ ≥ τ)

            x ─► base_layer ─► base ─────────────┐   (forward hook on the base layer keeps `base`)
            x ─► the whole adapted layer ─► adapted ─► where(S, adapted, base) ─► h   (forward hook on the layer)

`OutputDifferenceHooks` works for any layer with a `base_layer`: bottleneck adapters, LoRA/DoRA convolutions
(features on dim 1), LoRA with `lora_bias` or another peft variant, quantized LoRA layers. It costs one
output-sized subtraction, and in training keeps M(x) of every token for backward, where a hook on the gated
output's gradient files c_i = ⟨∂L/∂h_i, M(x_i)⟩ by r bin (`TokenGate.record_changes`). `attach_gate` picks
the route: peft `lora.Linear` layers with plain LoRA or DoRA get `TokenSelectiveVariant` (one forward, no
hooks), every other gateable layer these hooks.
"""

from __future__ import annotations

import torch
from peft.tuners.lora import LoraLayer
from peft.tuners.lora.layer import _ConvNd as LoraConv  # peft-private: DoRA/LoRA convolutions gate on dim 1
from torch import nn

from .adapter import BottleneckLayer
from .gate import TokenGate
from .tokens import TokenMask, norm_without_bias
from .variant import TokenSelectiveVariant


class OutputDifferenceHooks:
    """The general gate: M(x) = adapted − base from the layer's own two outputs, h = where(S, adapted, base).

    A forward hook on `layer.base_layer` keeps the base output W0 x + b as the layer computes it; a forward hook
    on `layer` then has the adapted output, so ‖M x‖ = ‖adapted − base‖ and ‖W0 x‖ = ‖base − b‖ per token along
    `feature_dim` (1 for convolutions). Works for any layer with a `base_layer` (bottleneck adapters, LoRA with
    a bias or another variant, DoRA convolutions) at the cost of one output-sized subtraction; with autograd, c_i
    of every token comes from a hook on the gated output's gradient.
    """

    def __init__(self, layer: nn.Module, gate: TokenGate, token_mask: TokenMask, feature_dim: int = -1):
        self.gate, self.token_mask, self.feature_dim = gate, token_mask, feature_dim
        self._base_output: torch.Tensor | None = None
        self.handles = [
            layer.base_layer.register_forward_hook(self._remember_base_output),
            layer.register_forward_hook(self._gate_output),
        ]
        self._bias = getattr(layer.base_layer, "bias", None)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def _remember_base_output(self, module, args, output):
        self._base_output = output

    def _gate_output(self, module, args, adapted):
        base, self._base_output = self._base_output, None
        if base is None or adapted is base:  # adapter disabled or merged: nothing to gate
            return None
        fd = self.feature_dim % adapted.dim()
        with torch.no_grad():
            update = adapted.detach().float() - base.detach().float()
            update_norm = torch.linalg.vector_norm(update, dim=fd)
            r = self.gate.relative_magnitude(update_norm, norm_without_bias(base.detach(), self._bias, fd))
            lead_shape = update_norm.shape
            real = self.token_mask.real_tokens(lead_shape) if fd == adapted.dim() - 1 else None
        keep, tokens = self.gate(r, real)
        gated = torch.where(keep.unsqueeze(fd), adapted, base.to(adapted.dtype))
        if tokens is not None and self.gate.training and self.gate.collect_rule_stats and gated.requires_grad:
            gated.register_hook(lambda grad: None if grad is None else
                                self.gate.record_changes((grad.float() * update).sum(fd), tokens))
        return gated


def is_gateable(module: nn.Module) -> bool:
    """Whether `module` is an adapted layer tspeft can gate (a peft LoRA/DoRA layer or a bottleneck layer)."""
    return isinstance(module, (LoraLayer, BottleneckLayer))


def attach_gate(module: nn.Module, gate: TokenGate,
                token_mask: TokenMask) -> TokenSelectiveVariant | OutputDifferenceHooks:
    """Put `gate` on the adapted `module`: peft's variant slot where it is exact for the layer, else the hooks."""
    if isinstance(module, BottleneckLayer):
        return OutputDifferenceHooks(module, gate, token_mask, feature_dim=module.feature_dim)
    if len(module.active_adapters) != 1:
        raise ValueError(f"tspeft gates exactly one active adapter per module, found {module.active_adapters}")
    adapter = module.active_adapters[0]
    if TokenSelectiveVariant.covers(module, adapter):
        return TokenSelectiveVariant.install(module, adapter, gate, token_mask)
    return OutputDifferenceHooks(module, gate, token_mask, feature_dim=1 if isinstance(module, LoraConv) else -1)
