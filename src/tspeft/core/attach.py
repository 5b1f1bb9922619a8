"""Forward hooks that put a `TokenGate` on an adapted module, without touching the adapter's own code.

Two ways, both with a single pass of the base layer and of the adapter:

* `LoraDownProjectionHooks` (plain LoRA): the gate sits on z = A·dropout(x). Since M(x) = s·B z,
  ‖M(x)‖² = s² zᵀ(BᵀB)z costs an r×r Gram matrix, and zeroing z_i drops token i's update exactly
  (W0 x_i + b + 0). c_i = ⟨∂L/∂z̃_i, z_i⟩ = ⟨∂L/∂h_i, M(x_i)⟩ comes from z's gradient, so the τ rule
  needs no extra activation memory.
* `OutputDifferenceHooks` (DoRA, bottleneck adapters, anything with a `base_layer`): the base layer's
  output is captured as it is computed, M(x) = adapted − base, and h = where(S, adapted, base).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .gate import TokenGate


class TokenMask:
    """The attention mask of the forward pass in flight, so gates count real tokens only."""

    def __init__(self) -> None:
        self.mask: torch.Tensor | None = None

    def real_tokens(self, lead_shape: torch.Size) -> torch.Tensor | None:
        mask = self.mask
        if mask is None:
            return None
        if len(lead_shape) == 2 and mask.dim() == 2 and mask.shape[0] == lead_shape[0] and mask.shape[1] >= lead_shape[1]:
            # With a KV cache the layer sees only the newest positions: the mask's last columns.
            return mask[:, mask.shape[1] - lead_shape[1]:].to(torch.bool)
        if mask.numel() == math.prod(lead_shape):
            return mask.reshape(lead_shape).to(torch.bool)
        return None  # shapes unrelated to the sequence (e.g. a vision layer): every position is real


def _norm_without_bias(output: torch.Tensor, bias: torch.Tensor | None, feature_dim: int) -> torch.Tensor:
    """‖output − b‖ per token, accumulated in fp32 (‖·‖² of fp16/bf16 activations would overflow)."""
    if bias is None:
        return torch.linalg.vector_norm(output, dim=feature_dim, dtype=torch.float32)
    if output.dtype == torch.float32:
        # ‖o − b‖² = ‖o‖² − 2⟨o, b⟩ + ‖b‖²: no tokens × features temporary (it cost ~15 % of the base matmul).
        # Rounding error ≈ 1e-7 ‖b‖² / ‖W0 x‖² relative: 1e-3 even when ‖W0 x‖ is 1 % of ‖b‖.
        b = bias.detach().float()
        squared = (torch.linalg.vector_norm(output, dim=feature_dim).square()
                   - 2 * (output.movedim(feature_dim, -1) @ b) + b.dot(b))
        return squared.clamp_min(0).sqrt()
    shape = [1] * output.dim()
    shape[feature_dim] = -1
    return torch.linalg.vector_norm(output - bias.view(shape), dim=feature_dim, dtype=torch.float32)


class _Hooks:
    def __init__(self, gate: TokenGate, token_mask: TokenMask):
        self.gate, self.token_mask = gate, token_mask
        self.handles: list[torch.utils.hooks.RemovableHandle] = []

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def _wants_band(self, output: torch.Tensor) -> bool:
        return self.gate.training and self.gate.collect_rule_stats and output.requires_grad


class LoraDownProjectionHooks(_Hooks):
    def __init__(self, layer: nn.Module, adapter_name: str, gate: TokenGate, token_mask: TokenMask):
        super().__init__(gate, token_mask)
        self.layer, self.adapter_name = layer, adapter_name
        self._base_norm: torch.Tensor | None = None
        self.handles += [
            layer.base_layer.register_forward_hook(self._remember_base_norm),
            layer.lora_A[adapter_name].register_forward_hook(self._gate_down_projection),
        ]

    def _remember_base_norm(self, module, args, output):
        with torch.no_grad():
            self._base_norm = _norm_without_bias(output, getattr(module, "bias", None), -1)

    def _gate_down_projection(self, module, args, z):
        base_norm, self._base_norm = self._base_norm, None
        up = self.layer.lora_B[self.adapter_name].weight
        with torch.no_grad():
            z32 = z.detach().float()
            gram = up.detach().float().T @ up.detach().float()
            update_sq = ((z32 @ gram) * z32).sum(-1).clamp_min(0)
            update_norm = update_sq.sqrt() * abs(float(self.layer.scaling[self.adapter_name]))
            r = self.gate.relative_magnitude(update_norm, base_norm)
            real = self.token_mask.real_tokens(z.shape[:-1])
        keep = self.gate(r, real)
        gated = z * keep.unsqueeze(-1).to(z.dtype)
        if self._wants_band(gated):
            band = self.gate.in_band(r, real)  # z is rank-sized: keep it whole rather than index (no GPU sync)
            gated.register_hook(lambda grad: self.gate.record_band((grad.float() * z32).sum(-1), band))
        return gated


class OutputDifferenceHooks(_Hooks):
    def __init__(self, layer: nn.Module, gate: TokenGate, token_mask: TokenMask, feature_dim: int = -1):
        super().__init__(gate, token_mask)
        self.feature_dim = feature_dim
        self._base_output: torch.Tensor | None = None
        self.handles += [
            layer.base_layer.register_forward_hook(self._remember_base_output),
            layer.register_forward_hook(self._gate_output),
        ]
        self._bias = getattr(layer.base_layer, "bias", None)

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
            r = self.gate.relative_magnitude(update_norm, _norm_without_bias(base.detach(), self._bias, fd))
            lead_shape = update_norm.shape
            real = self.token_mask.real_tokens(lead_shape) if fd == adapted.dim() - 1 else None
        keep = self.gate(r, real)
        gated = torch.where(keep.unsqueeze(fd), adapted, base.to(adapted.dtype))
        if self._wants_band(gated):
            band = self.gate.in_band(r, real)
            update_band = update.movedim(fd, -1)[band]
            gated.register_hook(
                lambda grad: self.gate.record_band((grad.movedim(fd, -1)[band].float() * update_band).sum(-1))
            )
        return gated
