"""The token gate: one per adapted module.

    h_i = W0 x_i + b + S_i · M(x_i),    S_i = 1( r_i ≥ τ ),    r_i = ‖M(x_i)‖₂ / ‖W0 x_i‖₂

            x_i ──► W0 ──────────────► (+) ──► h_i
             │                          ▲
             └──► M (LoRA/DoRA/adapter) ─┤ × S_i    S_i = 1 if ‖M(x_i)‖ / ‖W0 x_i‖ ≥ τ
                                              (no gradient; τ is set by the τ rule, tau_rule.py)

`TokenGate` decides S from the two per-token norms and keeps the statistics the τ rule needs; the
hooks in attach.py feed it the norms and apply S. Only real (non-pad) tokens are counted.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from .config import TokenSelectiveConfig

GATE_STATE = ("tau", "allocated_kept", "loss_slope", "band_low", "band_high")  # persistent per-gate τ-rule state
LEGACY_STATE_NAMES = {"allocated_kept": "kept_target"}  # the names adapters saved before the rename use


class TokenCounts(NamedTuple):
    """`TokenGate.kept_counts`, by name: since the last reset_stats(), over real tokens."""

    kept: float  # tokens whose update was applied
    real: float  # real (non-pad) tokens seen
    r_sum: float  # Σ r


class BandStats(NamedTuple):
    """`TokenGate.band_stats`, by name: since the last τ update."""

    band_sum: float  # Σ c_i over real tokens in the band around τ
    band_count: float  # how many real tokens were in the band
    real_count: float  # real tokens seen in training


KEPT, REAL, R_SUM = range(len(TokenCounts._fields))  # positions in kept_counts
BAND_SUM, BAND_COUNT, REAL_COUNT = range(len(BandStats._fields))  # positions in band_stats


class TokenGate(nn.Module):
    """τ for one module, its rule state (saved with the adapter) and its running statistics."""

    def __init__(self, config: TokenSelectiveConfig):
        super().__init__()
        self.config = config
        # A buffer, not a parameter: no gradient ever moves τ, and FSDP / ZeRO-3 shard parameters only, so τ stays
        # one whole scalar on every rank (FSDP2's fully_shard also rejects 0-d parameters).
        self.register_buffer("tau", torch.tensor(float(config.tau_init)))
        # τ-rule state (persistent: saved with the adapter and in Trainer checkpoints).
        # u_m: this module's allocated kept fraction, what τ is steered to realise (≠ the global target_kept k*)
        self.register_buffer("allocated_kept", torch.tensor(1.0))
        self.register_buffer("loss_slope", torch.tensor(0.0))  # running estimate of ∂L/∂u
        self.register_buffer("band_low", torch.tensor(0.0))  # tokens with r in [low, high] estimate ∂L/∂u
        self.register_buffer("band_high", torch.tensor(float("inf")))
        # Since the last τ update: histogram of log10 r, and `BandStats` (Σ c_i and count over band tokens, real
        # tokens). One tensor each, so a step all-reduces them at once.
        self.register_buffer("r_histogram", torch.zeros(config.histogram_bins, dtype=torch.float64), persistent=False)
        self.register_buffer("band_stats", torch.zeros(len(BandStats._fields), dtype=torch.float64), persistent=False)
        # Since the last reset_stats(): `TokenCounts` (kept, real, Σ r over real tokens; what `kept_fractions()`
        # reports).
        self.register_buffer("kept_counts", torch.zeros(len(TokenCounts._fields), dtype=torch.float64),
                             persistent=False)
        self.collect_rule_stats = True
        self.record_keep_mask = False  # analysis: keep the last forward's mask in `last_keep_mask`
        self.last_keep_mask: torch.Tensor | None = None

    def _apply(self, fn, recurse=True):
        # `.to(torch.bfloat16)` on the model must not round τ or token counts: only the device of these buffers
        # follows `fn`; their values are copied from before it, in fp32 (fp64 for counts).
        before = dict(self._buffers)
        super()._apply(fn, recurse)
        for name, buffer in self._buffers.items():
            dtype = torch.float64 if before[name].dtype == torch.float64 or name in self._COUNTS else torch.float32
            source = buffer if before[name].is_meta else before[name]  # `to_empty()` from the meta device
            self._buffers[name] = source.to(device=buffer.device, dtype=dtype)
        return self

    _COUNTS = ("r_histogram", "band_stats", "kept_counts")

    @staticmethod
    def relative_magnitude(update_norm: torch.Tensor, base_norm: torch.Tensor) -> torch.Tensor:
        """r = ‖M x‖ / ‖W0 x‖ in fp32; a zero base output gives r = 0 for a zero update, else a large finite r."""
        tiny = torch.finfo(torch.float32).tiny
        r = update_norm.float() / base_norm.float().clamp_min(tiny)
        return torch.nan_to_num(r, nan=0.0, posinf=torch.finfo(torch.float32).max)

    def forward(self, r: torch.Tensor, real: torch.Tensor | None) -> torch.Tensor:
        """Return the keep mask S (bool, shape of r) and record statistics over real tokens."""
        keep = r >= self.tau
        if self.record_keep_mask:
            self.last_keep_mask = keep.detach().cpu()
        if torch._C._current_graph_task_id() != -1:
            return keep  # recomputation inside backward (activation checkpointing): already counted
        with torch.no_grad():  # weighted sums, not boolean indexing: no host-device sync on GPUs
            r64 = r.reshape(-1).double()
            weight = torch.ones_like(r64) if real is None else real.reshape(-1).to(torch.float64)
            # (Σ kept·w, Σ w, Σ r·w) in one matrix-vector product (w is 0/1, so Σ w·w = Σ w).
            sums = weight @ torch.stack((keep.reshape(-1).to(torch.float64), weight, r64), 1)
            self.kept_counts.add_(sums)
            if self.training and self.collect_rule_stats:
                lo, hi = self.config.log10_r_range
                bins = self.config.histogram_bins
                log_r = torch.log10(r.reshape(-1).clamp(min=10**lo, max=10**hi))
                index = ((log_r - lo) * (bins / (hi - lo))).long().clamp_(0, bins - 1)
                self.r_histogram.scatter_add_(0, index, weight)
                self.band_stats[REAL_COUNT].add_(sums[REAL])
        return keep

    def in_band(self, r: torch.Tensor, real: torch.Tensor | None) -> torch.Tensor:
        """Real tokens whose r lies in the band around τ used to estimate ∂L/∂u."""
        band = (r >= self.band_low) & (r <= self.band_high)
        return band if real is None else band & real

    def record_band(self, loss_changes: torch.Tensor, in_band: torch.Tensor | None = None) -> None:
        """Add c_i = ⟨∂L/∂h_i, M(x_i)⟩ of band tokens (all of `loss_changes`, or where `in_band`):
        the first-order loss change from keeping token i."""
        changes = loss_changes.reshape(-1).double()
        weight = torch.ones_like(changes) if in_band is None else in_band.reshape(-1).to(torch.float64)
        # (Σ c_i, count) over the band, into the adjacent BAND_SUM, BAND_COUNT slots
        self.band_stats[BAND_SUM:BAND_COUNT + 1].add_(weight @ torch.stack((changes, weight), 1))

    def clear_rule_stats(self) -> None:
        self.r_histogram.zero_()
        self.band_stats.zero_()

    def token_counts(self) -> TokenCounts:
        return TokenCounts(*self.kept_counts.tolist())

    def kept_fraction(self) -> float | None:
        counts = self.token_counts()
        return counts.kept / counts.real if counts.real else None

    def mean_relative_magnitude(self) -> float | None:
        counts = self.token_counts()
        return counts.r_sum / counts.real if counts.real else None

    def extra_repr(self) -> str:
        return f"tau={self.tau.item():.4g}, allocated_kept={self.allocated_kept.item():.3f}"
