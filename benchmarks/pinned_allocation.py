"""Diagnostic arms of controls.py: the kept budget shared among modules by a fixed, given allocation.

Does accuracy depend on how the budget is shared among modules at all? The arms pin every module's kept fraction
u_m from the end of the warm-up on, at the final allocation of the same seed's learned-prior run:

    fixed-prior      u_m = u*_m                 the learned allocation, from the first gated step
    inverted-prior   u_m = P(2k − u*_m)         its mirror image about the target k: the modules the rule
                                                favoured get the least (P: projection back onto the budget)

If both score like the uniform allocation, no allocation rule can gain over uniform on that task, whatever it
learns; if the inverted one loses clearly, the learned allocation carries information the uniform one lacks.

The pin replaces the rule's allocation step (`rule_math.new_allocation`) for one run, exactly on the budget;
everything else (τ as the module's quantile, calibration, evaluation) is the uniform arm's code path.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import numpy as np

from tspeft.core import rule_math

PINNED_ARMS = {"fixed-prior": False, "inverted-prior": True}  # arm -> mirror the source allocation
SOURCE_ARM = "learned-prior"  # whose final allocation (same task, setting, seed and kept) the arms pin


def pinned_u(allocation: dict[str, float], names: list[str], kept: float, invert: bool, low: float) -> np.ndarray:
    """The pinned allocation in `names`' order: the source's u (or 2k − u), projected onto the budget k."""
    missing = [name for name in names if name not in allocation]
    if missing:
        raise SystemExit(f"the {SOURCE_ARM} allocation has no module {missing[0]!r}: not the same model")
    u = np.array([allocation[name] for name in names], dtype=np.float64)
    return rule_math.project_onto_budget(2 * kept - u if invert else u, np.ones_like(u), kept, low)


@contextmanager
def pinned_allocation(u: np.ndarray) -> Iterator[None]:
    """Within: every allocation step returns `u` (projected onto the step's scheduled budget)."""
    original = rule_math.new_allocation

    def pinned(old_u, curves, weights, config, step, variances=None):
        return rule_math.project_onto_budget(u, weights, rule_math.scheduled_target(config, step), config.min_kept)

    rule_math.new_allocation = pinned
    try:
        yield
    finally:
        rule_math.new_allocation = original
