"""The token gate: one per adapted module.

    h_i = W0 x_i + b + S_i · M(x_i),    S_i = 1( r_i ≥ τ ),    r_i = ‖M(x_i)‖₂ / ‖W0 x_i‖₂

            x_i ──► W0 ──────────────► (+) ──► h_i
             │                          ▲
             └──► M (LoRA/DoRA/adapter) ─┤ × S_i    S_i = 1 if ‖M(x_i)‖ / ‖W0 x_i‖ ≥ τ
                                              (no gradient; τ is set by the τ rule, tau_rule.py)

`TokenGate` decides S from the two per-token norms and keeps the statistics the τ rule needs; the
peft variant in variant.py (LoRA, DoRA) or the hooks in attach.py (other layers) feed it the norms and apply
S. Only real (non-pad) tokens are counted. Per call: the counts in one fp32 matrix-vector product (added to
fp64 totals), the bin of log10 r by one `bucketize` on fixed bin edges (shared by the r histogram and the
c_i histogram of the backward pass), one fp64 index-add; no host-device sync.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from .config import TokenSelectiveConfig

GATE_STATE = ("tau", "allocated_kept", "loss_slope")  # persistent per-gate τ-rule state (scalars)
GATE_SAVED = GATE_STATE + ("loss_curve", "loss_curve_square")  # what adapter files and checkpoints hold per gate
GATE_ADDED_LATER = ("loss_curve", "loss_curve_square")  # folders saved before these existed lack them: restart at 0
LEGACY_STATE_NAMES = {"allocated_kept": "kept_target"}  # the names adapters saved before the rename use
RETIRED_GATE_BUFFERS = (".ts_gate.band_low", ".ts_gate.band_high")  # the earlier slope rule's: ignored on load


class TokenCounts(NamedTuple):
    """`TokenGate.kept_counts`, by name: since the last reset_stats(), over real tokens."""

    kept: float  # tokens whose update was applied
    real: float  # real (non-pad) tokens seen
    r_sum: float  # Σ r


KEPT, REAL, R_SUM = range(len(TokenCounts._fields))  # positions in kept_counts
R_MAX = 1e30  # the largest r: 1e30 × 3e8 tokens still fits fp32 (far above the histogram's range, 10^2 by default)


class RuleTokens(NamedTuple):
    """Where `TokenGate.record_changes` files each token's c_i: its r bin, and 1 / 0 for real / pad tokens (None:
    every token is real)."""

    bins: torch.Tensor
    real: torch.Tensor | None


class GateDecision(NamedTuple):
    """`TokenGate.forward`: the keep mask S (bool, shape of r) and, while the τ rule collects statistics, the
    tokens' `RuleTokens` (else None)."""

    keep: torch.Tensor
    rule_tokens: RuleTokens | None


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
        self.register_buffer("loss_slope", torch.tensor(0.0))  # estimate of ∂L/∂u at the current u
        # Since the last τ update, per bin of log10 r over real tokens: token count, and Σ c_i (c_i: first-order
        # loss change from keeping token i), from which the rule builds the module's loss-vs-kept curve.
        self.register_buffer("r_histogram", torch.zeros(config.histogram_bins, dtype=torch.float64), persistent=False)
        self.register_buffer("change_histogram", torch.zeros(config.histogram_bins, dtype=torch.float64),
                             persistent=False)
        # Running mean of that curve on a grid of kept fractions (tau_rule.py), saved with the adapter.
        self.register_buffer("loss_curve", torch.zeros(config.curve_points + 1, dtype=torch.float64))
        # Running mean of its square (same β): the curve's step-to-step variance, i.e. how noisy the estimate is.
        self.register_buffer("loss_curve_square", torch.zeros(config.curve_points + 1, dtype=torch.float64))
        # Since the last reset_stats(): `TokenCounts` (kept, real, Σ r over real tokens; what `kept_fractions()`
        # reports).
        self.register_buffer("kept_counts", torch.zeros(len(TokenCounts._fields), dtype=torch.float64),
                             persistent=False)
        self.collect_rule_stats = True
        self.calibrating = False  # TSPeftModel.calibrating_thresholds: r histograms also outside training
        self.record_keep_mask = False  # analysis: keep the last forward's mask in `last_keep_mask`
        self.last_keep_mask: torch.Tensor | None = None
        self._bin_edges: dict[torch.device, torch.Tensor] = {}  # per device: fixed by the config, not saved
        self._ones: dict[torch.device, torch.Tensor] = {}  # per device: the fp64 1 of the histograms' unit weights

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

    _COUNTS = ("r_histogram", "change_histogram", "loss_curve", "loss_curve_square", "kept_counts")

    @staticmethod
    def relative_magnitude(update_norm: torch.Tensor, base_norm: torch.Tensor) -> torch.Tensor:
        """r = ‖M x‖ / ‖W0 x‖ in fp32; a zero base output gives r = 0 for a zero update, else a large finite r (at most
        R_MAX, so Σ r over any batch stays finite in fp32); NaN (a NaN update) gives 0."""
        tiny = torch.finfo(torch.float32).tiny
        r = update_norm.float() / base_norm.float().clamp_min(tiny)
        return r.clamp_max_(R_MAX).nan_to_num_(nan=0.0)  # r is ours: in place, no second per-token tensor

    def forward(self, r: torch.Tensor, real: torch.Tensor | None) -> GateDecision:
        """Decide S from r and record statistics over real tokens (`real`: bool mask of r's shape, None: all)."""
        if self.config.selection == "random":  # the control: kept with probability u whatever r is (no host sync)
            keep = torch.rand(r.shape, device=r.device) < self.allocated_kept
        else:
            keep = r >= self.tau
        if self.record_keep_mask:
            self.last_keep_mask = keep.detach().cpu()
        # Recomputation inside backward (activation checkpointing): already counted, but reentrant checkpointing
        # backpropagates through the recomputed graph, whose c_i hook needs the tokens' bins.
        # (Not under torch.compile, which traces no recomputation here and cannot trace this call.)
        recomputing = not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1
        with torch.no_grad():  # weighted sums, not boolean indexing: no host-device sync on GPUs
            flat_r = r.reshape(-1).float()
            weight = torch.ones_like(flat_r) if real is None else real.reshape(-1).float()
            if not recomputing:
                # (Σ kept·w, Σ w, Σ r·w) in one fp32 matrix-vector product (w is 0/1, so Σ w·w = Σ w; counts are
                # exact below 2^24 tokens per call; the stack casts the bool mask), added to the fp64 totals.
                self.kept_counts.add_(torch.mv(torch.stack((keep.reshape(-1), weight, flat_r)), weight))
            if not ((self.training and self.collect_rule_stats) or self.calibrating):
                return GateDecision(keep, None)
            tokens = RuleTokens(self.bin_of(flat_r), None if real is None else weight)
            if not recomputing:
                self.r_histogram.index_add_(0, tokens.bins, self._histogram_weight(tokens))
        return GateDecision(keep, tokens)

    def bin_of(self, r: torch.Tensor) -> torch.Tensor:
        """Histogram bin of log10 r for every token (flat; values outside the range go to the end bins): bin j
        holds lo + j·w ≤ log10 r < lo + (j + 1)·w, w = (hi − lo) / bins, found by one `bucketize`."""
        edges = self._bin_edges.get(r.device)
        if edges is None:
            lo, hi = self.config.log10_r_range
            bins = self.config.histogram_bins
            exponents = torch.linspace(lo, hi, bins + 1, dtype=torch.float64, device=r.device)[1:-1]
            edges = self._bin_edges[r.device] = torch.pow(10.0, exponents).float()  # once per device
        flat_r = (r if r.dim() == 1 else r.reshape(-1)).float()
        return torch.bucketize(flat_r, edges, right=True, out_int32=True)  # int32: kept for backward

    def _histogram_weight(self, tokens: RuleTokens) -> torch.Tensor:
        if tokens.real is None:  # every token real: a stride-0 view of one cached 1, nothing allocated per call
            one = self._ones.get(tokens.bins.device)
            if one is None:
                one = self._ones[tokens.bins.device] = torch.ones((), dtype=torch.float64, device=tokens.bins.device)
            return one.expand(tokens.bins.shape[0])
        return tokens.real.double()

    def record_changes(self, loss_changes: torch.Tensor, tokens: RuleTokens) -> None:
        """Add c_i = ⟨∂L/∂h_i, M(x_i)⟩ (the first-order loss change from keeping token i, for every token, kept or
        not) to the bin of its r; `tokens` comes from `forward`. An index-add: no host-device sync."""
        changes = loss_changes.reshape(-1).double()
        if tokens.real is not None:
            changes = changes * tokens.real.double()
        self.change_histogram.index_add_(0, tokens.bins, changes)

    def clear_rule_stats(self) -> None:
        self.r_histogram.zero_()
        self.change_histogram.zero_()

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
