"""Which layers of a transformers model get an adapter (and a gate).

    user's target_modules  ──►  given?  yes ─► used as given (peft's matcher: suffixes or a regex)
                                  │ no
                                  ▼
    tspeft's own per-architecture defaults (`own`, by config.model_type)
                                  │ none
                                  ▼
    peft's per-architecture defaults (TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING)
                                  │ none
                                  ▼
    ValueError: name the modules (--target-modules)

Adaptable layers are `nn.Linear` and transformers' GPT-2-style `Conv1D` (a linear layer with its weight
stored transposed; peft adapts it as a LoRA Linear with fan_in_fan_out=True). Heads, the LM head and the
pooler are never chosen by default.
"""

from __future__ import annotations

from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULTS
from torch import nn
from transformers.pytorch_utils import Conv1D

ADAPTABLE = (nn.Linear, Conv1D)


def out_features(layer: nn.Module) -> int:
    """Output width of an adaptable layer (Conv1D calls it `nf`)."""
    return layer.nf if isinstance(layer, Conv1D) else layer.out_features


def uses_conv1d(model: nn.Module, names: list[str]) -> bool:
    """Whether any of the named layers is a Conv1D (peft then needs fan_in_fan_out=True)."""
    return any(isinstance(model.get_submodule(name), Conv1D) for name in names)


def default_suffixes(model: nn.Module, own: dict[str, list[str]]) -> tuple[list[str], str]:
    """(module-name suffixes to adapt, where they come from) for the model's architecture."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in own:
        return list(own[model_type]), "tspeft"
    if model_type in PEFT_DEFAULTS:
        return list(PEFT_DEFAULTS[model_type]), "peft"
    raise ValueError(f"no default target modules for model type {model_type!r} ({type(model).__name__}) in tspeft "
                     "or peft; name the layers to adapt with --target-modules (e.g. q_proj,v_proj)")


def target_module_names(model: nn.Module, own: dict[str, list[str]], skip: set[str],
                        suffixes: list[str] | None = None) -> list[str]:
    """Full names of the adaptable layers matching `suffixes` as peft matches a target_modules list (the full
    name, or its ending after a dot; default: the architecture's defaults), outside any module named in `skip`
    (heads, pooler: a user's own suffixes may name them)."""
    given = suffixes is not None
    suffixes = suffixes if given else default_suffixes(model, own)[0]
    names = [name for name, module in model.named_modules()
             if isinstance(module, ADAPTABLE) and (given or not (set(name.split(".")) & skip))
             and any(name == key or name.endswith(f".{key}") for key in suffixes)]
    if not names:
        kinds = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, ADAPTABLE)})
        raise ValueError(f"target modules {suffixes} match no nn.Linear/Conv1D layer of {type(model).__name__}; "
                         f"its layer names end in: {', '.join(kinds[:20])}")
    return names
