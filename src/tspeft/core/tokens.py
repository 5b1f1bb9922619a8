"""What every gate route needs besides the gate: the real-token mask and the base-output norm ‖W0 x‖.

    real_i = attention_mask_i (1 = a real token, 0 = padding; counted by the gate only when real)
    ‖W0 x_i‖ = ‖result_i − b‖  from the base layer's output, accumulated in fp32

`TSPeftModel` sets the mask once per forward of the wrapped model (a forward pre-hook on it); each gated
layer reads the part of it that matches its own token shape.
"""

from __future__ import annotations

import math

import torch


class TokenMask:
    """The attention mask of the forward pass in flight, so gates count real tokens only."""

    def __init__(self) -> None:
        self._mask: torch.Tensor | None = None

    @property
    def mask(self) -> torch.Tensor | None:
        return self._mask

    @mask.setter
    def mask(self, mask: torch.Tensor | None) -> None:
        # Converted once per forward of the model, not once per gate.
        self._mask = mask if mask is None or mask.dtype == torch.bool else mask.to(torch.bool)

    def real_tokens(self, lead_shape: torch.Size) -> torch.Tensor | None:
        mask = self._mask
        if mask is None:
            return None
        if (len(lead_shape) == 2 and mask.dim() == 2 and mask.shape[0] == lead_shape[0]
                and mask.shape[1] >= lead_shape[1]):
            # With a KV cache the layer sees only the newest positions: the mask's last columns.
            return mask if mask.shape[1] == lead_shape[1] else mask[:, mask.shape[1] - lead_shape[1]:]
        if mask.numel() == math.prod(lead_shape):
            return mask.reshape(lead_shape)
        return None  # shapes unrelated to the sequence (e.g. a vision layer): every position is real


def norm_without_bias(output: torch.Tensor, bias: torch.Tensor | None, feature_dim: int) -> torch.Tensor:
    """‖output − b‖ per token, accumulated in fp32 (‖·‖² of fp16/bf16 activations would overflow)."""
    if bias is None:
        return torch.linalg.vector_norm(output, dim=feature_dim, dtype=torch.float32)
    if output.dtype == torch.float32:
        # ‖o − b‖² = ‖o‖² − 2⟨o, b⟩ + ‖b‖²: no tokens × features temporary (it cost ~15 % of the base matmul).
        # Rounding error ≈ 1e-7 ‖b‖² / ‖W0 x‖² relative: 1e-3 even when ‖W0 x‖ is 1 % of ‖b‖.
        b = bias.float()  # callers hold torch.no_grad
        squared = torch.linalg.vector_norm(output, dim=feature_dim).square_()
        last = feature_dim % output.dim() == output.dim() - 1  # features last: no movedim (a view op) needed
        squared.add_((output if last else output.movedim(feature_dim, -1)) @ b, alpha=-2).add_(b.dot(b))
        return squared.clamp_min_(0).sqrt_()
    shape = [1] * output.dim()
    shape[feature_dim] = -1
    return torch.linalg.vector_norm(output - bias.view(shape), dim=feature_dim, dtype=torch.float32)
