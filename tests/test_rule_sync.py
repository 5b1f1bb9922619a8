"""The τ rule (`update_thresholds`, once per optimizer step) reads the device once and writes back without a sync.

On a GPU a value read from device memory (`.item()`, `float()`, `.tolist()`, `.cpu()`, `nonzero`, ...) waits
for the device. On CPU nothing waits, so the test tracks which tensors would live on the device: the model's
buffers (gate statistics, τ-rule state, `rule_step`) and everything computed from them, until a copy to the
host (`.to("cpu", copy=True)`, aten `_to_copy` with device cpu) hands out a host tensor. Each such copy counts
as one device read; so does any value read or value-dependent op on a device tensor. The rule must do exactly
one read per call. `scripts/gpu_extras.py sync` checks the same on CUDA with `set_sync_debug_mode`.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from models import ts_mlp
from test_sync_free import READS, SYNCING_OPS, _caller

aten = torch.ops.aten


class DeviceReadRecorder(TorchDispatchMode):
    """Tensors derived from `device_tensors` are 'on the device'; records every read of one (op, caller)."""

    def __init__(self, device_tensors: list[torch.Tensor]):
        super().__init__()
        self.reads: list[tuple[str, str | None]] = []
        self._alive: list[torch.Tensor] = []  # held, so no storage address is reused while recording
        self._device: set[int] = set()
        for tensor in device_tensors:
            self.mark(tensor)

    def mark(self, tensor: torch.Tensor) -> None:
        self._alive.append(tensor)
        self._device.add(tensor.untyped_storage().data_ptr())

    def on_device(self, tensor) -> bool:
        return isinstance(tensor, torch.Tensor) and tensor.untyped_storage().data_ptr() in self._device

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        from_device = any(self.on_device(t) for t in inputs)
        out = func(*args, **kwargs)
        to_host = func is aten._to_copy.default and kwargs.get("device") == torch.device("cpu")
        if from_device and (to_host or func in SYNCING_OPS):
            self.reads.append((str(func), _caller()))
        elif from_device:
            for tensor in tree_flatten(out)[0]:
                if isinstance(tensor, torch.Tensor):
                    self.mark(tensor)
        return out


def record_reads(monkeypatch, model, call):
    recorder = DeviceReadRecorder([*model.buffers()])
    for name in READS:  # reads that bypass the dispatcher
        original = getattr(torch.Tensor, name)

        def wrapped(self, *args, _original=original, _name=name, **kwargs):
            if recorder.on_device(self):
                recorder.reads.append((f"Tensor.{_name}", _caller()))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, wrapped)
    with recorder:
        call()
    monkeypatch.undo()
    return recorder.reads


def trained(**rule):
    model = ts_mlp("lora", **{"target_kept": 0.5, "warmup_steps": 1, **rule})
    model.train()
    x = torch.randn(4, 6, 12)
    for _ in range(2):
        model(x).pow(2).mean().backward()
        model.update_thresholds()
    model(x).pow(2).mean().backward()  # statistics for the checked step
    return model


def test_update_thresholds_reads_the_device_once(monkeypatch):
    for rule in ({}, {"target_kept": None}, {"allocation": "uniform"}):
        model = trained(**rule)
        step = int(model.rule_step)
        reads = record_reads(monkeypatch, model, model.update_thresholds)
        assert [op for op, _ in reads] == ["aten._to_copy.default"], reads
        assert reads[0][1].endswith(":to_host"), reads
        assert int(model.rule_step) == step + 1
        if rule.get("target_kept", 0.5) is not None:  # target mode at kept 0.5: the rule has moved τ off 0
            assert all(t > 0 for t in model.thresholds().values()), rule


def test_the_recorder_sees_every_read(monkeypatch):
    """Positive control: reporting reads every gate's τ on the host (`float(gate.tau)`)."""
    model = trained()
    reads = record_reads(monkeypatch, model, model.thresholds)
    assert sum(op == "Tensor.__float__" for op, _ in reads) == len(model.gates), reads
    assert {op for op, _ in reads} <= {"Tensor.__float__", "aten._local_scalar_dense.default"}, reads
