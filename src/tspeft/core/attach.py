"""Forward hooks that put a `TokenGate` on an adapted module, without touching the adapter's own code.

Three ways, each with a single pass of the base layer and of the adapter:

* `LoraDownProjectionHooks` (plain LoRA): the gate sits on z = A·dropout(x). Since M(x) = s·B z,
  ‖M(x)‖² = s² zᵀ(BᵀB)z costs an r×r Gram matrix, and zeroing z_i drops token i's update exactly
  (W0 x_i + b + 0). c_i = ⟨∂L/∂z̃_i, z_i⟩ = ⟨∂L/∂h_i, M(x_i)⟩ comes from z's gradient, so the τ rule
  needs no extra activation memory. Without autograd (inference) and with few kept tokens, the update is
  computed for the kept rows only ("skip" path, see `LoraDownProjectionHooks`).
* `DoraUpdateHooks` (peft's DoRA on a Linear layer): peft's DoRA module (`lora_magnitude_vector[adapter]`)
  returns exactly the update M(x) that peft adds to the base output, so the gate sits on that output:
  h = W0 x + b + where(S, M, 0). No subtraction of outputs and no second output-sized select in backward.
* `OutputDifferenceHooks` (bottleneck adapters, DoRA convolutions, anything with a `base_layer`): the base
  layer's output is captured as it is computed, M(x) = adapted − base, and h = where(S, adapted, base).

Where each sits (`attach_gate` chooses; S = the gate's keep mask, ⊙S zeroes the tokens it drops):

    plain LoRA        x ─► W0 ─────────────────────────────► (+) ─► h     gate on z: ‖M x‖ from z and BᵀB
                      x ─► dropout ─► A ─► z ─►[⊙S]─► B·s ──┘
    DoRA (Linear)     x ─► W0 ─────────────────────────────► (+) ─► h     gate on the output of peft's
                      x ─► lora_magnitude_vector ─► M ─►[⊙S]┘              DoRA module (= M x)
    other             x ─► base_layer ─► base ──────────┐
                      x ─► the whole adapted layer ─► adapted ─► where(S, adapted, base) ─► h

Every path files c_i = ⟨∂L/∂h_i, M(x_i)⟩ of every real token by its r bin (`TokenGate.record_changes`): the τ
rule's loss-vs-kept curve. For LoRA this is O(rank) per token; the other paths keep M(x) for backward.
"""

from __future__ import annotations

import math

import torch
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora import LoraLayer
from peft.tuners.lora.layer import _ConvNd as LoraConv  # peft-private: DoRA/LoRA convolutions gate on dim 1
from peft.tuners.lora.variants import DoraLinearVariant
from torch import nn

from .adapter import BottleneckLayer
from .gate import TokenGate


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


def _norm_without_bias(output: torch.Tensor, bias: torch.Tensor | None, feature_dim: int) -> torch.Tensor:
    """‖output − b‖ per token, accumulated in fp32 (‖·‖² of fp16/bf16 activations would overflow)."""
    if bias is None:
        return torch.linalg.vector_norm(output, dim=feature_dim, dtype=torch.float32)
    if output.dtype == torch.float32:
        # ‖o − b‖² = ‖o‖² − 2⟨o, b⟩ + ‖b‖²: no tokens × features temporary (it cost ~15 % of the base matmul).
        # Rounding error ≈ 1e-7 ‖b‖² / ‖W0 x‖² relative: 1e-3 even when ‖W0 x‖ is 1 % of ‖b‖.
        b = bias.detach().float()
        squared = torch.linalg.vector_norm(output, dim=feature_dim).square_()
        squared.add_(output.movedim(feature_dim, -1) @ b, alpha=-2).add_(b.dot(b))
        return squared.clamp_min_(0).sqrt_()
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

    def _wants_changes(self, output: torch.Tensor) -> bool:
        return self.gate.training and self.gate.collect_rule_stats and output.requires_grad

    def _remember_base_norm(self, module, args, output):
        """Forward hook on the base layer: ‖W0 x‖ per token, for the next gate decision of this layer."""
        with torch.no_grad():
            self._base_norm = _norm_without_bias(output, getattr(module, "bias", None), -1)


class LoraDownProjectionHooks(_Hooks):
    """Gate plain LoRA on z = A·dropout(x).

    Dense-masked path (training, or whenever autograd records): z̃ = S·z goes on through peft's lora_B, so
    the update of a dropped token is computed and is exactly zero.

    Skip path (z does not require grad, i.e. inference; used when this call keeps at most `skip_max_kept`
    of its tokens and the output has at least `skip_min_elements` entries): the lora_A hook hands peft a
    zero z of shape (1, …, 1, r), so peft's own `result + lora_B(z)·scaling` only broadcasts a zero row, and
    the hook on the LoRA layer adds `lora_B(z[kept])·scaling` to the kept rows of peft's output in place
    (`index_add_`). Only peft's modules are called; the output equals the dense-masked one up to float
    rounding of the row-subset matmul. The token decision and every statistic are the same in both paths.
    """

    skip_max_kept = 0.5  # the skip path's saved work (B·z, scaling, add for dropped rows) beats its indexing
    skip_min_elements = 1 << 18  # tokens × out_features below this: per-call overhead (a host sync for the kept
    # count, nonzero, index ops) outweighs the saving, e.g. for decoding steps of a few tokens

    def __init__(self, layer: nn.Module, adapter_name: str, gate: TokenGate, token_mask: TokenMask):
        super().__init__(gate, token_mask)
        self.layer, self.adapter_name = layer, adapter_name
        self._base_norm: torch.Tensor | None = None
        self._skipped: tuple[torch.Tensor, torch.Tensor] | None = None  # (z rows to add, their flat indices)
        self.handles += [
            layer.base_layer.register_forward_hook(self._remember_base_norm),
            layer.lora_A[adapter_name].register_forward_hook(self._gate_down_projection),
            layer.register_forward_hook(self._add_kept_updates),
        ]

    def _remember_base_norm(self, module, args, output):
        self._skipped = None  # a new forward of the layer: nothing pending from an interrupted one
        super()._remember_base_norm(module, args, output)

    def _gate_down_projection(self, module, args, z):
        base_norm, self._base_norm = self._base_norm, None
        up = self.layer.lora_B[self.adapter_name].weight
        with torch.no_grad():
            z32 = z.detach().float()
            update_sq = ((z32 @ self._scaled_gram(up)) * z32).sum(-1)
            r = self.gate.relative_magnitude(update_sq.clamp_min_(0).sqrt_(), base_norm)
            real = self.token_mask.real_tokens(z.shape[:-1])
        keep = self.gate(r, real)
        if not z.requires_grad and self._skip_pays(keep, up.shape[0]):
            index = keep.reshape(-1).nonzero().squeeze(1)
            self._skipped = (z.reshape(-1, z.shape[-1]).index_select(0, index), index)
            return z.new_zeros((1,) * (z.dim() - 1) + (z.shape[-1],))  # peft's B·z and add: one broadcast zero row
        gated = z * keep.unsqueeze(-1)  # bool × float: no dtype copy of the mask
        if self._wants_changes(gated):
            tokens = self.gate.rule_tokens(r, real)  # z is rank-sized: c_i of every token costs O(rank)
            gated.register_hook(lambda grad: None if grad is None else
                                self.gate.record_changes((grad.float() * z32).sum(-1), tokens))
        return gated

    def _scaled_gram(self, up: torch.Tensor) -> torch.Tensor:
        """s²·BᵀB in fp32, so ‖M(x)‖² = zᵀ(s²BᵀB)z. Recomputed every call: a cache keyed on B's version counter
        would go stale (fused optimizers update parameters without bumping it)."""
        scaling = float(self.layer.scaling[self.adapter_name])
        up32 = up.detach().float()
        return (up32.T @ up32).mul_(scaling * scaling)

    def _skip_pays(self, keep: torch.Tensor, out_features: int) -> bool:
        if keep.numel() * out_features < self.skip_min_elements:
            return False
        return int(keep.sum()) <= self.skip_max_kept * keep.numel()

    def _add_kept_updates(self, module, args, output):
        skipped, self._skipped = self._skipped, None
        if skipped is None:
            return None
        z_kept, index = skipped
        output = output.contiguous()
        flat = output.view(-1, output.shape[-1])
        if z_kept.shape[0]:
            update = self.layer.lora_B[self.adapter_name](z_kept)
            flat.index_add_(0, index, update.to(flat.dtype), alpha=float(self.layer.scaling[self.adapter_name]))
        return output


class DoraUpdateHooks(_Hooks):
    """Gate peft's DoRA (Linear) on the update its DoRA module returns: peft computes
    `result + lora_magnitude_vector[adapter](x, …)`, and that module output is M(x) (magnitude rescaling and
    direction update). The hook returns where(S, M, 0), so a dropped token's output is exactly W0 x + b."""

    def __init__(self, layer: nn.Module, adapter_name: str, gate: TokenGate, token_mask: TokenMask):
        super().__init__(gate, token_mask)
        self._base_norm: torch.Tensor | None = None
        self.handles += [
            layer.base_layer.register_forward_hook(self._remember_base_norm),
            layer.lora_magnitude_vector[adapter_name].register_forward_hook(self._gate_update),
        ]

    def _gate_update(self, module, args, update):
        base_norm, self._base_norm = self._base_norm, None
        with torch.no_grad():
            update_norm = torch.linalg.vector_norm(update.detach(), dim=-1, dtype=torch.float32)
            r = self.gate.relative_magnitude(update_norm, base_norm)
            real = self.token_mask.real_tokens(update.shape[:-1])
        keep = self.gate(r, real)
        gated = torch.where(keep.unsqueeze(-1), update, update.new_zeros(()))
        if self._wants_changes(gated):
            tokens = self.gate.rule_tokens(r, real)
            kept_update = update.detach()  # M(x) of every token is kept for backward (c_i of dropped tokens too)
            gated.register_hook(lambda grad: None if grad is None else
                                self.gate.record_changes((grad.float() * kept_update.float()).sum(-1), tokens))
        return gated


class OutputDifferenceHooks(_Hooks):
    """The general gate: M(x) = adapted − base from the layer's own two outputs, h = where(S, adapted, base).

    A forward hook on `layer.base_layer` keeps the base output W0 x + b as the layer computes it; a forward hook
    on `layer` then has the adapted output, so ‖M x‖ = ‖adapted − base‖ and ‖W0 x‖ = ‖base − b‖ per token along
    `feature_dim` (1 for convolutions). Works for any layer with a `base_layer` (bottleneck adapters, LoRA with
    a bias or a variant, DoRA convolutions) at the cost of one output-sized subtraction; with autograd, c_i for
    the band comes from a hook on the gated output's gradient.
    """

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
        if self._wants_changes(gated):
            tokens = self.gate.rule_tokens(r, real)
            gated.register_hook(lambda grad: None if grad is None else
                                self.gate.record_changes((grad.float() * update).sum(fd), tokens))
        return gated


def is_gateable(module: nn.Module) -> bool:
    """Whether `module` is an adapted layer tspeft can gate (a peft LoRA/DoRA layer or a bottleneck layer)."""
    return isinstance(module, (LoraLayer, BottleneckLayer))


def attach_gate(module: nn.Module, gate: TokenGate, token_mask: TokenMask) -> _Hooks:
    """Put `gate` on the adapted `module` with the cheapest hooks that are exact for it (see the diagram)."""
    if isinstance(module, BottleneckLayer):
        return OutputDifferenceHooks(module, gate, token_mask, feature_dim=module.feature_dim)
    if len(module.active_adapters) != 1:
        raise ValueError(f"tspeft gates exactly one active adapter per module, found {module.active_adapters}")
    adapter = module.active_adapters[0]
    plain_lora = (isinstance(module, LoraLinear) and adapter not in module.lora_variant
                  and not module.lora_bias.get(adapter, False))
    if plain_lora:
        return LoraDownProjectionHooks(module, adapter, gate, token_mask)
    linear_dora = (isinstance(module, LoraLinear) and type(module.lora_variant.get(adapter)) is DoraLinearVariant
                   and not module.lora_bias.get(adapter, False))
    if linear_dora:  # peft's DoRA module returns the update M(x) itself: gate it there
        return DoraUpdateHooks(module, adapter, gate, token_mask)
    return OutputDifferenceHooks(module, gate, token_mask, feature_dim=1 if isinstance(module, LoraConv) else -1)
