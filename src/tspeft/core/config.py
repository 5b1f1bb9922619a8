"""`TokenSelectiveConfig`: the settings of the token gate and of the τ rule.

Every field is explained in docs/method.md ("Hyperparameters"); the short version is in the field comments.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

ALLOCATIONS = ("learned", "uniform")  # how the kept budget is shared among modules
SELECTIONS = ("magnitude", "random")  # which tokens of a module are kept
RETIRED_FIELDS = ("band",)  # fields of the earlier slope rule: adapter folders saved with them still load


@dataclass
class TokenSelectiveConfig:
    # Initial threshold τ for every adapted module. 0 keeps every token, which avoids the dead start
    # (a zero-initialised adapter has r = 0 everywhere, so any τ > 0 would gate everything off forever).
    tau_init: float = 0.0
    # None: loss-driven rule (kept fraction found by the loss/sparsity trade-off `sparsity_weight`).
    # A number in (0, 1]: target mode, the overall kept fraction of real tokens the rule reaches.
    target_kept: float | None = None
    # Optimizer steps with τ held at 0 so the adapter can grow before the gate bites.
    warmup_steps: int = 20
    # Target mode: steps after the warm-up over which the kept target falls from 1 to `target_kept` along a
    # cubic schedule (gradual pruning), so the gate tightens while the adapter is still learning. 0: at once.
    ramp_steps: int = 0
    # λ (loss-driven mode only), relative: a slice of tokens is kept when its first-order loss benefit per token is
    # at least λ times the mean benefit per token of keeping every token of every module (scale-free: 0 keeps
    # every helpful token, 1 keeps the tokens at least as helpful as the average one).
    sparsity_weight: float = 0.5
    # γ: Frank–Wolfe step, the share of the way u moves toward the allocation that minimises the current
    # first-order loss model (0 < γ ≤ 1).
    step_size: float = 0.1
    # β: momentum of the running mean of each module's loss-vs-kept curve (one batch's curve is noisy).
    slope_momentum: float = 0.9
    # α: how far τ moves towards the threshold that realises the new u, per step (0 < α ≤ 1).
    tau_smoothing: float = 0.5
    # Pull each module's running curve toward the pooled per-token curve as far as its estimated noise says
    # (empirical Bayes, tau_rule.shrink_to_pooled), so noise alone does not move budget between modules. Off by
    # default: on sst5 it did not make the allocation more reproducible across seeds (docs/method.md).
    shrink_curves: bool = False
    # κ (target mode, learned allocation): price of moving a module's kept fraction away from the target, relative
    # to the mean benefit per token; the oracle minimises Σ_m N_m [F̂_m(u_m)/N_m + κ·b̄/2 (u_m − k)²] (a proximal
    # prior toward the uniform allocation). 0: the plain water-filling oracle; large: uniform. 1.0 was chosen on a
    # development split of trec (docs/method.md, "A prior toward the uniform allocation").
    allocation_prior: float = 1.0
    # Resolution of the loss-vs-kept curve: segments of width 1/curve_points in kept fraction.
    curve_points: int = 20
    # Lower bound on each module's kept fraction u, so no module is switched off entirely.
    min_kept: float = 0.0
    # Histogram of log10 r used for quantiles (all-reducible across ranks): range and bin count.
    log10_r_range: tuple[float, float] = (-6.0, 2.0)
    histogram_bins: int = 512
    # Controls, through the same code path as the rule. "learned": the loss decides how the kept budget is shared
    # among modules; "uniform": every module's kept fraction u is pinned at the (scheduled) target.
    allocation: str = "learned"
    # "magnitude": keep the tokens with r ≥ τ; "random": keep each real token with probability u (the module's kept
    # fraction), independent of r, in training and evaluation.
    selection: str = "magnitude"
    # Bookkeeping filled in by tspeft: the base method ("lora", "dora" or "adapter").
    base_method: str | None = field(default=None)

    def __post_init__(self) -> None:
        def require(ok: bool, name: str, why: str) -> None:
            if not ok:
                raise ValueError(f"TokenSelectiveConfig.{name}={getattr(self, name)!r}: {why}")

        finite = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)  # noqa: E731
        require(finite(self.tau_init) and self.tau_init >= 0, "tau_init", "must be a finite number >= 0")
        if self.target_kept is not None:
            require(finite(self.target_kept) and 0 < self.target_kept <= 1, "target_kept",
                    "the kept fraction must lie in (0, 1] (or be None for the loss-driven rule)")
        require(isinstance(self.warmup_steps, int) and self.warmup_steps >= 0, "warmup_steps", "must be an int >= 0")
        require(isinstance(self.ramp_steps, int) and self.ramp_steps >= 0, "ramp_steps", "must be an int >= 0")
        require(finite(self.sparsity_weight) and self.sparsity_weight >= 0, "sparsity_weight",
                "must be finite and >= 0")
        require(finite(self.step_size) and 0 < self.step_size <= 1, "step_size", "must lie in (0, 1]")
        require(finite(self.slope_momentum) and 0 <= self.slope_momentum < 1, "slope_momentum", "must lie in [0, 1)")
        require(finite(self.tau_smoothing) and 0 < self.tau_smoothing <= 1, "tau_smoothing", "must lie in (0, 1]")
        require(isinstance(self.curve_points, int) and 2 <= self.curve_points <= 200, "curve_points",
                "must be an int in [2, 200]")
        require(finite(self.min_kept) and 0 <= self.min_kept <= 1, "min_kept", "must lie in [0, 1]")
        if self.target_kept is not None:
            require(self.min_kept <= self.target_kept, "min_kept", "must not exceed target_kept")
        lo_hi = tuple(self.log10_r_range)
        require(len(lo_hi) == 2 and all(finite(v) for v in lo_hi) and lo_hi[0] < lo_hi[1], "log10_r_range",
                "must be two finite numbers (low, high) with low < high")
        self.log10_r_range = (float(lo_hi[0]), float(lo_hi[1]))
        require(isinstance(self.histogram_bins, int) and self.histogram_bins >= 16, "histogram_bins",
                "must be an int >= 16")
        require(finite(self.allocation_prior) and self.allocation_prior >= 0, "allocation_prior",
                "must be finite and >= 0")
        require(isinstance(self.shrink_curves, bool), "shrink_curves", "must be true or false")
        require(self.allocation in ALLOCATIONS, "allocation", f"must be one of {', '.join(ALLOCATIONS)}")
        require(self.selection in SELECTIONS, "selection", f"must be one of {', '.join(SELECTIONS)}")
        require(self.base_method in (None, "lora", "dora", "adapter"), "base_method",
                "unknown base method; expected 'lora', 'dora' or 'adapter'")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TokenSelectiveConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in values.items() if k not in RETIRED_FIELDS}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"TokenSelectiveConfig: unknown field(s) {unknown}; known fields are {sorted(known)}")
        values = dict(values)
        if "log10_r_range" in values:
            values["log10_r_range"] = tuple(values["log10_r_range"])
        return cls(**values)
