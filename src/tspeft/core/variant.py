"""Token-selective LoRA and DoRA through peft's own LoRA-variant mechanism: one forward per layer, no hooks.

    h_i = W0 x_i + b + S_i · M(x_i),    S_i = 1(r_i ≥ τ),    r_i = ‖M(x_i)‖ / ‖W0 x_i‖

peft's `lora.Linear.forward` computes `result = W0 x + b` and then, for an adapter listed in
`layer.lora_variant`, returns `variant.forward(layer, adapter, x, result)` in place of its own
`result + lora_B(lora_A(dropout(x)))·s` (peft ≥ 0.15; DoRA is such a variant). `TokenSelectiveVariant`
takes that slot, and wraps DoRA's:

    LoRA   x ─► dropout ─► A ─► z ─┬─► z⊙S ─► B ─► ·s ─► result + … ─► h        training, or many tokens kept
                                   ├─► z[kept] ─► B ─► result[kept] += ·s      inference, few kept (in place)
                                   └─► ‖M x‖² = zᵀ(s²BᵀB)z                     a rank × rank Gram matrix
    DoRA   x ─► peft's DoRA module (lora_magnitude_vector) ─► M ─► addcmul(result, M, S) ─► h
                                   (inference: result += M⊙S in place)
    both   ‖W0 x‖ = ‖result − b‖ from peft's own `result`

Training runs peft's own operations on z⊙S (LoRA) or result + M⊙S (DoRA), so τ = 0 is bit-identical
to peft and a dropped token's output is exactly W0 x + b; a tensor hook on the gated tensor files
c_i = ⟨∂L/∂h_i, M(x_i)⟩ of every token for the τ rule (`TokenGate.record_changes`): O(rank) per token
for LoRA, M(x) kept for backward for DoRA. Without autograd the update is added in place (no broadcast
zero row, no output-sized temporary beyond B·z), only for the kept rows when a call keeps at most
`skip_max_kept` of its tokens.

Covered: peft `lora.Linear` layers (nn.Linear, GPT-2's Conv1D) with plain LoRA or DoRA and no `lora_bias`.
Everything else (bottleneck adapters, convolutions, other variants, quantized layers) keeps the hooks in
attach.py. Merging is refused: a gated update cannot be folded into W0 (`TSPeftModel.merge_and_unload`
removes this variant first). Relies on peft's variant interface (`LoraVariant`, `Linear.lora_variant`),
which peft marks as subject to change; tests/test_core.py checks the equivalences on the pinned peft.
"""

from __future__ import annotations

import torch
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora.layer import LoraVariant
from peft.tuners.lora.variants import DoraLinearVariant
from torch import nn

from .gate import RuleTokens, TokenGate
from .tokens import TokenMask, norm_without_bias


class TokenSelectiveVariant(LoraVariant):
    """The gate of one peft `lora.Linear` layer, in the layer's `lora_variant` slot (`inner`: peft's DoRA variant
    it replaces, or None for plain LoRA)."""

    skip_max_kept = 0.5  # inference: the kept-rows path when a call keeps at most this share of its tokens
    skip_min_elements = 1 << 18  # ... and tokens × out_features is at least this: below, its host sync and
    # index ops outweigh the saving (e.g. decoding steps of a few tokens)

    def __init__(self, layer: LoraLinear, adapter: str, gate: TokenGate, token_mask: TokenMask,
                 inner: LoraVariant | None):
        self.layer, self.adapter, self.gate, self.token_mask, self.inner = layer, adapter, gate, token_mask, inner

    @staticmethod
    def covers(layer: nn.Module, adapter: str) -> bool:
        return (isinstance(layer, LoraLinear) and not layer.lora_bias.get(adapter, False)
                and type(layer.lora_variant.get(adapter)) in (type(None), DoraLinearVariant))

    @classmethod
    def install(cls, layer: LoraLinear, adapter: str, gate: TokenGate,
                token_mask: TokenMask) -> "TokenSelectiveVariant":
        variant = cls(layer, adapter, gate, token_mask, layer.lora_variant.get(adapter))
        layer.lora_variant[adapter] = variant
        return variant

    def remove(self) -> None:
        """Give the layer back peft's own variant (none for plain LoRA)."""
        if self.inner is None:
            self.layer.lora_variant.pop(self.adapter, None)
        else:
            self.layer.lora_variant[self.adapter] = self.inner

    def supports_lora_conversion(self) -> bool:
        return False

    @staticmethod
    def _refuse(*args, **kwargs):
        raise RuntimeError("a token-selective adapter cannot be merged into W0: the merged weights would apply the "
                           "update at every token (TSPeftModel.merge_and_unload(accept_ungated=True) drops the gate)")

    merge_safe = merge_unsafe = unmerge = _refuse

    def forward(self, module: LoraLinear, active_adapter: str, x: torch.Tensor, result: torch.Tensor,
                **kwargs) -> torch.Tensor:
        with torch.no_grad():  # reads only: no detach needed
            base_norm = norm_without_bias(result, getattr(module.get_base_layer(), "bias", None), -1)
        if self.inner is None:
            return self._lora(module, active_adapter, x, result, base_norm)
        return self._dora(module, active_adapter, x, result, base_norm)

    def _wants_changes(self, tokens: RuleTokens | None, gated: torch.Tensor) -> bool:
        return tokens is not None and self.gate.training and self.gate.collect_rule_stats and gated.requires_grad

    def _lora(self, layer: LoraLinear, adapter: str, x: torch.Tensor, result: torch.Tensor,
              base_norm: torch.Tensor) -> torch.Tensor:
        lora_b, scaling = layer.lora_B[adapter], layer.scaling[adapter]
        z = layer.lora_A[adapter](layer.lora_dropout[adapter](x))
        with torch.no_grad():
            z32 = z.float()  # under no_grad: z itself in fp32 (no detach op needed: nothing here records autograd)
            update_sq = ((z32 @ _scaled_gram(lora_b.weight, float(scaling))) * z32).sum(-1)
            # A rounding-negative ‖M x‖² (M x ≈ 0) gives NaN here, which relative_magnitude maps to r = 0.
            r = self.gate.relative_magnitude(update_sq.sqrt_(), base_norm)
            real = self.token_mask.real_tokens(z.shape[:-1])
        keep, tokens = self.gate(r, real)
        if not _records_autograd(z, result):
            return self._add_lora_in_place(result, z, keep, lora_b, float(scaling))
        gated = z * keep.unsqueeze(-1)  # bool × float: no dtype copy of the mask
        if self._wants_changes(tokens, gated):
            gate = self.gate  # z is rank-sized: c_i of every token costs O(rank)
            gated.register_hook(lambda grad: None if grad is None else
                                gate.record_changes((grad.float() * z32).sum(-1), tokens))
        return result + lora_b(gated) * scaling  # peft's own line, on z⊙S

    def _add_lora_in_place(self, result: torch.Tensor, z: torch.Tensor, keep: torch.Tensor, lora_b: nn.Module,
                           scaling: float) -> torch.Tensor:
        """Inference: result += s·B(z⊙S), for the kept rows only when few are kept (`skip_max_kept`)."""
        flat_keep = keep.reshape(-1)
        if flat_keep.numel() * lora_b.weight.shape[0] >= self.skip_min_elements:
            kept = flat_keep.nonzero().squeeze(1)  # the one host sync of this path
            if kept.numel() <= self.skip_max_kept * flat_keep.numel():
                result = result.contiguous()
                if kept.numel():
                    rows = result.view(-1, result.shape[-1])
                    update = lora_b(z.reshape(-1, z.shape[-1]).index_select(0, kept))
                    rows.index_add_(0, kept, update.to(rows.dtype), alpha=scaling)
                return result
        return result.add_(lora_b(z * keep.unsqueeze(-1)), alpha=scaling)

    def _dora(self, layer: LoraLinear, adapter: str, x: torch.Tensor, result: torch.Tensor,
              base_norm: torch.Tensor) -> torch.Tensor:
        # peft's DoraLinearVariant.forward up to its `result + …`: the DoRA module returns the update M(x).
        dropout = layer.lora_dropout[adapter]
        base_result = result
        if not (isinstance(dropout, nn.Identity) or not layer.training):
            x, base_result = dropout(x), None
        update = layer.lora_magnitude_vector[adapter](
            x, lora_A=layer.lora_A[adapter], lora_B=layer.lora_B[adapter], scaling=layer.scaling[adapter],
            base_layer=layer.get_base_layer(), base_result=base_result, adapter_name=adapter)
        with torch.no_grad():
            update_norm = torch.linalg.vector_norm(update, dim=-1, dtype=torch.float32)
            r = self.gate.relative_magnitude(update_norm, base_norm)
            real = self.token_mask.real_tokens(update.shape[:-1])
        keep, tokens = self.gate(r, real)
        mask = keep.unsqueeze(-1)  # bool: addcmul casts it on the fly (no cast op, 1 byte per token kept for backward)
        if not _records_autograd(update, result):
            return result.addcmul_(update, mask)
        # result + M⊙S in one output-sized pass (peft's `result + M` when S = 1); its backward gives M the gradient
        # ∂L/∂h ⊙ S and needs only S.
        gated = torch.addcmul(result, update, mask)
        if self._wants_changes(tokens, gated):  # ∂L/∂h of every token arrives at the gated output
            gate, held = self.gate, [update.detach()]  # M(x) of every token, kept for backward until filed
            gated.register_hook(lambda grad: None if grad is None or not held else
                                gate.record_changes(_token_dots(grad, held.pop()), tokens))
        return gated


def _records_autograd(update: torch.Tensor, result: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and (update.requires_grad or result.requires_grad)


def _token_dots(grad: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """c_i = ⟨∂L/∂h_i, M(x_i)⟩ per token in fp32, from the copy of M(x) kept for backward, used once: an fp32 copy
    takes the product in place (no output-sized temporary; autograd saved none of M). The hook releases the copy
    after this call, so a second backward through a retained graph files no c_i for the layer."""
    if update.dtype == torch.float32:
        return update.mul_(grad).sum(-1)
    return (grad.float() * update.float()).sum(-1)


def _scaled_gram(up: torch.Tensor, scaling: float) -> torch.Tensor:
    """s²·BᵀB in fp32, so ‖M(x)‖² = zᵀ(s²BᵀB)z. Recomputed every call: a cache keyed on B's version counter would
    go stale (fused optimizers update parameters without bumping it)."""
    up32 = up.float()  # called under no_grad
    return (up32.T @ up32).mul_(scaling * scaling)
