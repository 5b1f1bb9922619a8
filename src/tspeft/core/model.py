"""`TSPeftModel`: a peft-adapted model whose adapted modules each carry a `TokenGate`.

    model = get_ts_peft_model(base, LoraConfig(r=8, target_modules=["query", "value"]), TokenSelectiveConfig())
    ... train; call model.update_thresholds() after every optimizer step (the Trainer callback does) ...
    model.save_pretrained(folder);  TSPeftModel.from_pretrained(other_base, folder)
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
from typing import Any, Callable, Iterator

import torch
from peft import (
    LoraConfig,
    PeftConfig,
    PeftModel,
    get_peft_model,
    get_peft_model_state_dict,
    set_peft_model_state_dict,
)
from torch import nn

from . import io
from .adapter import BottleneckConfig, inject_bottleneck_adapters
from .attach import attach_gate, is_gateable
from .config import TokenSelectiveConfig
from .gate import GATE_ADDED_LATER, GATE_SAVED, LEGACY_STATE_NAMES, RETIRED_GATE_BUFFERS, TokenCounts, TokenGate
from .tau_rule import CHANGES, calibrate_thresholds, update_thresholds
from .tokens import TokenMask


def get_ts_peft_model(model: nn.Module, peft_config: LoraConfig | BottleneckConfig,
                      ts_config: TokenSelectiveConfig | None = None) -> "TSPeftModel":
    """Adapt `model` with peft (LoRA, DoRA) or a bottleneck adapter and gate every adapted module."""
    ts_config = copy.deepcopy(ts_config) if ts_config is not None else TokenSelectiveConfig()
    if isinstance(peft_config, LoraConfig):
        ts_config.base_method = "dora" if peft_config.use_dora else "lora"
        adapted = get_peft_model(model, peft_config)
    elif isinstance(peft_config, BottleneckConfig):
        ts_config.base_method = "adapter"
        inject_bottleneck_adapters(model, peft_config)
        adapted = model
    else:
        raise ValueError(f"unknown base method {type(peft_config).__name__}: tspeft gates LoraConfig "
                         "(LoRA; DoRA with use_dora=True) and tspeft.BottleneckConfig adapters")
    return TSPeftModel(adapted, peft_config, ts_config)


class TSPeftModel(nn.Module):
    def __init__(self, model: nn.Module, peft_config: LoraConfig | BottleneckConfig, ts_config: TokenSelectiveConfig):
        super().__init__()
        self.model = model
        self.peft_config, self.ts_config = peft_config, ts_config
        self.register_buffer("rule_step", torch.tensor(0, dtype=torch.long))
        self.token_mask = TokenMask()
        self._mask_pinned = False
        self.gates: dict[str, TokenGate] = {}
        self._attachments = []
        inner = self.get_base_model()
        for name, module in inner.named_modules():
            if is_gateable(module):
                gate = TokenGate(ts_config).to(next(module.parameters()).device)
                module.ts_gate = gate  # a child module, so τ and the rule state show up in state_dict()
                self.gates[name] = gate
                self._attachments.append(attach_gate(module, gate, self.token_mask))
        # Every call of the inner model sets the mask (None without attention_mask). It is not cleared after
        # the forward: reentrant activation checkpointing re-runs the layers during backward and needs it.
        self._attachments.append(inner.register_forward_pre_hook(self._capture_mask, with_kwargs=True))

    # ----- real-token mask -------------------------------------------------------------------------------------
    def _set_mask(self, mask: torch.Tensor | None) -> None:
        if not self._mask_pinned:
            self.token_mask.mask = mask if mask is None or mask.dim() == 2 else None

    def _capture_mask(self, module, args, kwargs):
        self._set_mask(kwargs.get("attention_mask"))

    @contextlib.contextmanager
    def real_tokens(self, mask: torch.Tensor) -> Iterator[None]:
        """For models without an `attention_mask` argument: `with model.real_tokens(mask): model(x)`."""
        self._set_mask(mask)
        self._mask_pinned = True
        try:
            yield
        finally:
            self._mask_pinned = False
            self._set_mask(None)

    # ----- forwarding ------------------------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        return self.model.generate(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    def get_base_model(self) -> nn.Module:
        return self.model.get_base_model() if isinstance(self.model, PeftModel) else self.model

    # ----- the τ rule and statistics ---------------------------------------------------------------------------
    def update_thresholds(self, all_reduce=None) -> None:
        """One τ-rule step (call after each optimizer step; one host-device sync on a GPU). Under torch.distributed,
        statistics are summed over ranks."""
        self.rule_step += 1
        if all_reduce is None and torch.distributed.is_available() and torch.distributed.is_initialized():
            all_reduce = _distributed_rule_statistics
        update_thresholds(list(self.gates.values()), self.ts_config, self.rule_step, all_reduce)  # read once

    @contextlib.contextmanager
    def calibrating_thresholds(self, all_reduce=None) -> Iterator[None]:
        """Forward passes inside gather r histograms in any mode; on exit τ_m = Q_m(1 − u_m) exactly, so the kept
        fraction measured the same way (e.g. eval mode, the final weights) is the allocation u (docs/method.md)."""
        if all_reduce is None and torch.distributed.is_available() and torch.distributed.is_initialized():
            all_reduce = _distributed_rule_statistics
        gates = list(self.gates.values())
        for gate in gates:
            gate.clear_rule_stats()
            gate.calibrating = True
        try:
            yield
        finally:
            for gate in gates:
                gate.calibrating = False
        calibrate_thresholds(gates, all_reduce)

    def calibrate(self, run_passes: Callable[[], None], max_rounds: int = 4, tolerance: float = 0.005,
                  all_reduce=None) -> int:
        """Calibrate τ by fixed-point rounds of `calibrating_thresholds`; returns the rounds run.

        A module's r depends on the gates upstream (they change its input), so τ set from one pass, in which every
        gate still had its old τ, is off for the deeper modules once the upstream τ move. Each round runs
        `run_passes()` (the same forward passes every round) with the τ of the previous round and sets τ again;
        it stops when every module kept within `tolerance` of its u during the round's passes (the τ in force
        then already realised u), or of what it kept in the previous round (a fixed point: the histogram's
        resolution can leave a module a little off u for good), after `max_rounds` at most (docs/method.md,
        "Hitting the target")."""
        previous: dict[str, float | None] = {}
        for rounds in range(1, max_rounds + 1):
            self.reset_stats()
            with self.calibrating_thresholds(all_reduce):
                run_passes()
            self.reduce_stats()
            kept, allocated = self.kept_fractions(), self.allocated_kept()
            if all(v is None or abs(v - allocated[n]) <= tolerance for n, v in kept.items()):
                break
            if previous and all(v is None or previous[n] is None or abs(v - previous[n]) <= tolerance
                                for n, v in kept.items()):
                break
            previous = kept
        self.reset_stats()
        return rounds

    def kept_fractions(self) -> dict[str, float | None]:
        """Kept fraction of real tokens per module since the last `reset_stats()` (None: no token seen)."""
        return {name: gate.kept_fraction() for name, gate in self.gates.items()}

    def kept_fraction(self) -> float | None:
        """Overall kept fraction of real token updates since the last `reset_stats()`."""
        counts = TokenCounts(*torch.stack([g.kept_counts for g in self.gates.values()]).sum(0).tolist())
        return counts.kept / counts.real if counts.real else None

    def thresholds(self) -> dict[str, float]:
        return {name: float(gate.tau) for name, gate in self.gates.items()}

    def set_thresholds(self, tau: float | dict[str, float]) -> None:
        """Set τ by hand (one value, or {module: value}); +inf drops every update. The τ rule may move it again."""
        values = tau if isinstance(tau, dict) else {name: tau for name in self.gates}
        for name, value in values.items():
            if name not in self.gates:
                raise KeyError(f"set_thresholds: no gated module named {name!r}; known: {list(self.gates)[:5]}...")
            if not (float(value) >= 0):  # also rejects NaN
                raise ValueError(f"set_thresholds: τ for {name!r} must be >= 0, got {value!r}")
            self.gates[name].tau.fill_(float(value))

    def allocated_kept(self) -> dict[str, float]:
        """The τ rule's per-module allocated kept fraction u_m (what τ is steered to realise; under a target,
        their token-weighted mean is the global `ts_config.target_kept`)."""
        return {name: float(gate.allocated_kept) for name, gate in self.gates.items()}

    def loss_slopes(self) -> dict[str, float]:
        """Running estimate of ∂L/∂u per module (> 0: keeping more tokens raises the loss)."""
        return {name: float(gate.loss_slope) for name, gate in self.gates.items()}

    def reduce_stats(self, all_reduce=None) -> None:
        """Sum the kept/real token counts over ranks (every rank must call this), so `kept_fractions()` is global."""
        if all_reduce is None:
            if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
                return
            all_reduce = _distributed_sum
        counts = all_reduce(torch.stack([g.kept_counts for g in self.gates.values()]))
        for gate, reduced in zip(self.gates.values(), counts.to(next(iter(self.gates.values())).kept_counts.device)):
            gate.kept_counts.copy_(reduced)

    def reset_stats(self) -> None:
        if self.gates:
            torch._foreach_zero_([gate.kept_counts for gate in self.gates.values()])

    def trainable_parameters(self) -> tuple[int, int]:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return trainable, sum(p.numel() for p in self.parameters())

    # ----- merging ---------------------------------------------------------------------------------------------
    def merge_and_unload(self, accept_ungated: bool = False) -> nn.Module:
        if not accept_ungated:
            raise RuntimeError("a token-selective adapter cannot be folded into W0: the merged weights would apply "
                               "the update at every token. Call merge_and_unload(accept_ungated=True) to drop the "
                               "gate.")
        if self.ts_config.base_method == "adapter":
            raise ValueError("a bottleneck adapter is nonlinear and cannot be merged into the base weights")
        self._remove_gates()
        return self.model.merge_and_unload()

    def _remove_gates(self) -> None:
        for attachment in self._attachments:
            attachment.remove()
        self._attachments = []
        for name in self.gates:
            del self.get_base_model().get_submodule(name).ts_gate
        self.gates = {}

    # ----- files -----------------------------------------------------------------------------------------------
    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The adapter's weights, whole. Under FSDP2 (`fully_shard`) they are gathered from the ranks' shards:
        every rank must then call this (and `save_pretrained`)."""
        if isinstance(self.model, PeftModel):
            weights = get_peft_model_state_dict(self.model)
        else:
            weights = {k: v for k, v in self.model.state_dict().items() if _is_bottleneck_key(k, self.peft_config)}
        return {k: _whole(v) for k, v in weights.items()}

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        tensors = {f"adapter.{k}": v for k, v in self.adapter_state_dict().items()}
        for name, gate in self.gates.items():
            tensors.update({f"gate.{name}.{field}": getattr(gate, field).reshape(-1) for field in GATE_SAVED})
        tensors["gate.rule_step"] = self.rule_step.reshape(1)
        base = self.get_base_model()
        manifest = {
            "library": "tspeft",
            "base_method": self.ts_config.base_method,
            "ts_config": self.ts_config.to_dict(),
            "peft_config": self.peft_config.to_dict(),
            "gated_modules": list(self.gates),
            "base_model_class": type(base).__name__,
            "base_model_name_or_path": getattr(getattr(base, "config", None), "_name_or_path", None),
        }
        io.write_adapter_folder(folder, tensors, manifest)

    @classmethod
    def from_pretrained(cls, model: nn.Module, folder: str | os.PathLike, is_trainable: bool = False) -> "TSPeftModel":
        manifest, tensors = io.read_adapter_folder(folder)
        ts_config = TokenSelectiveConfig.from_dict(manifest["ts_config"])
        peft_values = dict(manifest["peft_config"])
        if manifest["base_method"] == "adapter":
            peft_config = BottleneckConfig.from_dict(peft_values)
        else:
            peft_config = PeftConfig.from_peft_type(**peft_values)
            peft_config.inference_mode = not is_trainable
        ts_model = get_ts_peft_model(model, peft_config, ts_config)
        ts_model.load_state_from(folder, manifest, tensors)
        if not is_trainable:
            ts_model.eval()
            for parameter in ts_model.parameters():
                parameter.requires_grad_(False)
        return ts_model

    def load_state_from(self, folder: str | os.PathLike, manifest: dict | None = None,
                        tensors: dict[str, torch.Tensor] | None = None) -> None:
        """Load a `save_pretrained` folder into this model in place: adapter weights, τ, the τ-rule state and
        `rule_step` (used by `from_pretrained` and when a Trainer resumes from a checkpoint)."""
        if manifest is None or tensors is None:
            manifest, tensors = io.read_adapter_folder(folder)
        missing = sorted(set(manifest["gated_modules"]) ^ set(self.gates))
        if missing:
            raise ValueError(f"{folder}: the adapted modules do not match this base model "
                             f"({type(self.get_base_model()).__name__}); differing: {missing[:5]}")
        weights = {_current_name(k[len("adapter."):]): v for k, v in tensors.items()
                   if k.startswith("adapter.") and not k.endswith(RETIRED_GATE_BUFFERS)}
        for key, value in self.adapter_state_dict().items():
            if key.endswith(tuple(f".ts_gate.{f}" for f in GATE_ADDED_LATER)) and key not in weights:
                weights[key] = torch.zeros_like(value)  # saved before the field existed: it restarts from zero
        self._load_adapter_weights(weights, folder)
        states = {name: _checked_gate_state(_saved_gate_state(tensors, name, folder), name, folder)
                  for name in self.gates}
        if "gate.rule_step" not in tensors:
            raise ValueError(f"{folder}: the adapter file holds no gate.rule_step (not a complete tspeft save)")
        with torch.no_grad():
            for name, gate in self.gates.items():
                for field, value in states[name].items():
                    getattr(gate, field).copy_(value.reshape(getattr(gate, field).shape))
            self.rule_step.copy_(tensors["gate.rule_step"].reshape(()))

    def _load_adapter_weights(self, weights: dict[str, torch.Tensor], folder) -> None:
        if isinstance(self.model, PeftModel):
            expected = get_peft_model_state_dict(self.model)
        else:
            expected = self.adapter_state_dict()
        mismatched = [f"{k}: saved {tuple(weights[k].shape)}, model {tuple(v.shape)}"
                      for k, v in expected.items() if k in weights and weights[k].shape != v.shape]
        absent = sorted(set(expected) ^ set(weights))
        if mismatched or absent:
            raise ValueError(f"{folder}: the saved adapter weights do not fit this base model "
                             f"({type(self.get_base_model()).__name__}): " + "; ".join(mismatched[:3] + absent[:3]))
        if isinstance(self.model, PeftModel):
            set_peft_model_state_dict(self.model, weights)
        else:
            self.model.load_state_dict(weights, strict=False)


def _current_name(key: str) -> str:
    """An adapter weight's key with a gate field renamed since it was saved (peft's state dict holds the gates'
    buffers too, as `....ts_gate.<field>`) given its current name."""
    for new, old in LEGACY_STATE_NAMES.items():
        if key.endswith(f".ts_gate.{old}"):
            return key[:-len(old)] + new
    return key


def _saved_state(tensors: dict[str, torch.Tensor], gate: str, field: str, folder) -> torch.Tensor:
    """A gate's saved τ-rule state, also from folders saved before a field was renamed (LEGACY_STATE_NAMES)."""
    for name in (field, LEGACY_STATE_NAMES.get(field)):
        if name is not None and f"gate.{gate}.{name}" in tensors:
            return tensors[f"gate.{gate}.{name}"]
    raise ValueError(f"{folder}: the saved adapter has no {field!r} for gated module {gate!r}")


def _saved_gate_state(tensors: dict[str, torch.Tensor], name: str, folder) -> dict[str, torch.Tensor]:
    """The GATE_SAVED fields of one module; folders written before a GATE_ADDED_LATER field existed lack it (it
    then restarts from zero)."""
    return {field: _saved_state(tensors, name, field, folder) for field in GATE_SAVED
            if field not in GATE_ADDED_LATER or f"gate.{name}.{field}" in tensors}


def _checked_gate_state(state: dict[str, torch.Tensor], name: str, folder) -> dict[str, torch.Tensor]:
    """One module's saved τ-rule state, checked: a NaN or negative τ (a damaged or hand-edited file) would
    silently gate everything or nothing. τ = +inf is valid (set_thresholds: drop every update)."""
    tau, kept = float(state["tau"]), float(state["allocated_kept"])
    if not tau >= 0:  # also NaN
        raise ValueError(f"{folder}: τ of module {name} is {tau} in the adapter file; τ must be a number >= 0")
    if not 0 <= kept <= 1:
        raise ValueError(f"{folder}: the allocated kept fraction u of module {name} is {kept} in the adapter "
                         "file; it must lie in [0, 1]")
    curves = [state.get(field, torch.zeros(1)) for field in GATE_ADDED_LATER]
    if not (math.isfinite(float(state["loss_slope"])) and all(bool(torch.isfinite(c).all()) for c in curves)):
        raise ValueError(f"{folder}: the τ-rule state of module {name} is damaged (NaN or negative values)")
    return state


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor's full value: FSDP2 holds each rank's shard of a parameter in a DTensor (gathering is a collective)."""
    if torch.distributed.is_available():
        from torch.distributed.tensor import DTensor

        if isinstance(tensor, DTensor):
            return tensor.full_tensor()
    return tensor


def _is_bottleneck_key(key: str, config: BottleneckConfig) -> bool:
    if ".adapter_down." in key or ".adapter_up." in key:
        return True
    return any(f"{m}." in f".{key}" for m in (config.modules_to_save or []))


def _distributed_rule_statistics(stats: torch.Tensor) -> torch.Tensor:
    reduced = _distributed_sum(stats)
    # Each rank's c_i come from its own mean loss, and DDP averages gradients over ranks: average Σc_i too.
    reduced[:, CHANGES] /= torch.distributed.get_world_size()
    return reduced


def _distributed_sum(tensor: torch.Tensor) -> torch.Tensor:
    backend = torch.distributed.get_backend()
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    reduced = tensor.to(device)
    torch.distributed.all_reduce(reduced, op=torch.distributed.ReduceOp.SUM)
    return reduced
