"""A training step's forward and backward issue no host-device synchronisation from tspeft's gate.

On a GPU every one of these waits for the device: reading a value (`.item()`, `float()`, `int()`, `bool()`,
`.tolist()`, `.cpu()`, `.numpy()`), and every op whose output size depends on values (`nonzero`, boolean
indexing, `masked_select`, `unique`, ...). On CPU nothing waits, so the test records them instead: a
TorchDispatchMode sees every aten op (forward and backward, hooks included) and the Python frames that issued
it, and the few reads that bypass the dispatcher are wrapped on `torch.Tensor`. An op counts against tspeft when
the innermost Python frame outside torch is a tspeft file. The τ rule (`update_thresholds`, once per optimizer
step) may sync and is not checked. The same check runs on CUDA with `torch.cuda.set_sync_debug_mode("error")` in
scripts/gpu_check.sh (tests/test_cuda.py).
"""

from __future__ import annotations

import contextlib
import os
import sys

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import tspeft
import tspeft.core.attach as attach
from models import MLP, lora, method_config, tiny_bert
from tspeft import TokenSelectiveConfig, get_ts_peft_model
from tspeft.core.variant import TokenSelectiveVariant

TSPEFT_DIR = os.path.dirname(tspeft.__file__)
TORCH_DIR = os.path.dirname(torch.__file__)
THIS_FILE = os.path.abspath(__file__)
aten = torch.ops.aten
SYNCING_OPS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
               aten.is_nonzero.default, aten.equal.default, aten.allclose.default, aten._unique2.default,
               aten.unique_dim.default, aten.unique_consecutive.default, aten.repeat_interleave.Tensor}
READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")


def _caller() -> str | None:
    """The innermost frame outside torch and this file: file:line:function."""
    frame = sys._getframe(2)
    while frame is not None:
        name = os.path.abspath(frame.f_code.co_filename)
        if not name.startswith(TORCH_DIR) and name != THIS_FILE:
            return f"{name}:{frame.f_lineno}:{frame.f_code.co_name}"
        frame = frame.f_back
    return None


def _has_bool_index(indices) -> bool:
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ())


class SyncRecorder(TorchDispatchMode):
    """Records (op, caller) for every syncing op and every aten op issued from tspeft (`tspeft_ops`)."""

    def __init__(self):
        super().__init__()
        self.syncs: list[tuple[str, str]] = []
        self.tspeft_ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        caller = _caller()
        if caller and caller.startswith(TSPEFT_DIR):
            self.tspeft_ops += 1
            bool_index = func in (aten.index.Tensor, aten.index_put_.default, aten.index_put.default) and \
                _has_bool_index(args[1])
            if func in SYNCING_OPS or bool_index:
                self.syncs.append((str(func), caller))
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def recording_syncs(monkeypatch):
    recorder = SyncRecorder()
    for name in READS:
        original = getattr(torch.Tensor, name)

        def wrapped(self, *args, _original=original, _name=name, **kwargs):
            caller = _caller()
            if caller and caller.startswith(TSPEFT_DIR):
                recorder.syncs.append((f"Tensor.{_name}", caller))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, wrapped)
    with recorder:
        yield recorder
    monkeypatch.undo()


# ----- tiny models, one per hook kind ------------------------------------------------------------------------
class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)

    def forward(self, x):
        return self.conv(x)


def bert_inputs():
    generator = torch.Generator().manual_seed(0)
    mask = torch.ones(4, 16, dtype=torch.long)
    mask[1, 9:] = 0
    mask[3, 4:] = 0
    return {"input_ids": torch.randint(1, 50, (4, 16), generator=generator), "attention_mask": mask,
            "labels": torch.tensor([0, 1, 1, 0])}


def mlp_inputs():
    return {"x": torch.randn(4, 16, 12)}


CASES = {  # name -> (base, peft/adapter config, inputs, hook class expected)
    "lora": (MLP, lambda: method_config("lora"), mlp_inputs, TokenSelectiveVariant),
    "dora": (MLP, lambda: method_config("dora"), mlp_inputs, TokenSelectiveVariant),
    "adapter": (MLP, lambda: method_config("adapter"), mlp_inputs, attach.OutputDifferenceHooks),
    "conv-lora": (ConvNet, lambda: lora(["conv"]), lambda: {"x": torch.randn(2, 3, 6, 6)},
                  attach.OutputDifferenceHooks),
    "bert-lora": (tiny_bert, lambda: lora(["query", "value", "dense"]), bert_inputs, TokenSelectiveVariant),
    "bert-dora": (tiny_bert, lambda: lora(["query", "value"], dora=True), bert_inputs, TokenSelectiveVariant),
}


def loss_of(output):
    if hasattr(output, "loss") and output.loss is not None:
        return output.loss
    return output.float().pow(2).mean()


def trained_model(case: str):
    """A few steps in target mode, so τ > 0 and the band lies around τ, before the checked step."""
    make_base, make_config, make_inputs, hook_class = CASES[case]
    torch.manual_seed(0)
    model = get_ts_peft_model(make_base(), make_config(), TokenSelectiveConfig(target_kept=0.5, warmup_steps=0))
    if case == "adapter":  # the adapter's up-projection starts at zero: give it an update to gate
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "adapter_up" in name:
                    parameter.normal_(0, 0.5)
    assert any(isinstance(h, hook_class) for h in model._attachments)
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    inputs = make_inputs()
    for _ in range(3):
        optimizer.zero_grad()
        loss_of(model(**inputs)).backward()
        optimizer.step()
        model.update_thresholds()
    assert any(t > 0 for t in model.thresholds().values())
    return model, inputs


@pytest.mark.parametrize("case", list(CASES))
def test_training_forward_and_backward_issue_no_sync_from_the_gate(case, monkeypatch):
    model, inputs = trained_model(case)
    with recording_syncs(monkeypatch) as recorder:
        loss_of(model(**inputs)).backward()
    assert recorder.syncs == [], recorder.syncs
    assert recorder.tspeft_ops > 10 * len(model.gates), "the recorder must see the gate's own ops"


def test_the_recorder_catches_syncs_from_tspeft(monkeypatch):
    """Positive control: the inference kept-rows path calls nonzero (its one sync) and `kept_fraction()` reads
    counts on the host: the recorder must report both."""
    model, inputs = trained_model("lora")
    monkeypatch.setattr(TokenSelectiveVariant, "skip_min_elements", 0)
    monkeypatch.setattr(TokenSelectiveVariant, "skip_max_kept", 1.0)
    model.eval()
    with recording_syncs(monkeypatch) as recorder, torch.no_grad():
        model(**inputs)
        model.kept_fraction()
    ops = {op for op, _ in recorder.syncs}
    assert {"aten.nonzero.default", "Tensor.tolist"} <= ops, recorder.syncs
    assert all(caller.startswith(TSPEFT_DIR) for _, caller in recorder.syncs)
