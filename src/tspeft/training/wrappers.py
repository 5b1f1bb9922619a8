"""Finding the TSPeftModel inside the wrappers that training puts around it."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..core.model import TSPeftModel


def unwrap_ts_model(model: Any) -> TSPeftModel | None:
    """Find the TSPeftModel inside accelerate/DDP/compile wrappers (None if there is none)."""
    seen = 0
    while model is not None and seen < 8:
        if isinstance(model, TSPeftModel):
            return model
        # DDP / DataParallel / accelerate wrappers keep the model in `.module`; torch.compile in `._orig_mod`.
        inner = None
        for attr in ("module", "_orig_mod"):
            if isinstance(model, nn.Module) and attr in model._modules:
                inner = model._modules[attr]
                break
        model, seen = inner, seen + 1
    return None
