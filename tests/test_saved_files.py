"""Adapter folders under damage: a save killed midway, truncated or corrupt files."""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
import time

import pytest
import torch
from peft import LoraConfig
from torch import nn

from models import MLP, lora
from tspeft import TokenSelectiveConfig, TSPeftModel, get_ts_peft_model


def _stamped(model: TSPeftModel, i: int) -> None:
    """Put a recognisable state number i into every saved tensor."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.fill_(float(i))
        model.set_thresholds(i / 1000)
        for gate in model.gates.values():
            gate.allocated_kept.fill_(1 / (i + 2))
        model.rule_step.fill_(i)


def _save_loop(folder: str, progress: str, model: TSPeftModel) -> None:
    torch.set_num_threads(1)
    for i in range(1, 10**6):
        _stamped(model, i)
        model.save_pretrained(folder)
        with open(progress, "a") as handle:  # after the save returned: state i is committed
            handle.write(f"{i}\n")


def _big_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256))


def _loaded_state_number(folder) -> int:
    loaded = TSPeftModel.from_pretrained(_big_model(), folder)
    i = int(loaded.rule_step)
    trainable = [p for n, p in loaded.named_parameters() if "lora_" in n]
    assert trainable and all(torch.all(p == float(i)) for p in trainable), "weights from another save"
    assert all(t == pytest.approx(i / 1000) for t in loaded.thresholds().values()), "τ from another save"
    assert all(v == pytest.approx(1 / (i + 2)) for v in loaded.allocated_kept().values())
    return i


@pytest.mark.skipif(not hasattr(os, "fork"), reason="uses fork to start the saving process quickly")
def test_killed_save_leaves_a_loadable_folder(tmp_path):
    model = get_ts_peft_model(_big_model(), LoraConfig(r=64, target_modules=["0", "2"]), TokenSelectiveConfig())
    folder, progress = tmp_path / "adapter", tmp_path / "progress"
    _stamped(model, 0)
    model.save_pretrained(tmp_path / "earlier")
    context = multiprocessing.get_context("fork")
    rng = random.Random(0)
    outcomes = []
    for kill in range(8):
        progress.write_text("")
        before = [int(v) for v in (tmp_path / "progress_all").read_text().split()] if kill else []
        process = context.Process(target=_save_loop, args=(str(folder), str(progress), model), daemon=True)
        process.start()
        time.sleep(rng.uniform(0.02, 0.4))
        os.kill(process.pid, signal.SIGKILL)
        process.join(10)
        done = [int(v) for v in progress.read_text().split()]
        with open(tmp_path / "progress_all", "a") as handle:
            handle.write("".join(f"{v}\n" for v in done))
        committed = before + done
        try:
            i = _loaded_state_number(folder)
        except ValueError as error:  # allowed only while nothing was ever committed
            assert not committed, f"a committed save was lost: {error}"
            outcomes.append("ValueError")
            continue
        # the state loaded is the last committed one, or the one being saved when killed (state last + 1)
        if done:
            assert i in (done[-1], done[-1] + 1), (i, done[-3:])
        outcomes.append(i)
    assert _loaded_state_number(tmp_path / "earlier") == 0
    print(f"\n[killed saves] loaded state after each kill: {outcomes}")
    assert any(isinstance(o, int) for o in outcomes), outcomes


@pytest.fixture
def saved(tmp_path):
    model = get_ts_peft_model(MLP(), lora(["lin0"]), TokenSelectiveConfig())
    model.save_pretrained(tmp_path)
    return tmp_path


def test_truncated_manifest_gives_value_error(saved):
    manifest = saved / "ts_config.json"
    manifest.write_text(manifest.read_text()[: len(manifest.read_text()) // 2])
    with pytest.raises(ValueError, match="corrupt"):
        TSPeftModel.from_pretrained(MLP(), saved)


@pytest.mark.parametrize("cut", [0, 8, 100])
def test_truncated_or_empty_weights_give_value_error(saved, cut):
    weights = next(saved.glob("ts_adapter-*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:cut])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        TSPeftModel.from_pretrained(MLP(), saved)


def test_missing_weights_file_gives_value_error(saved):
    next(saved.glob("ts_adapter-*.safetensors")).unlink()
    with pytest.raises(ValueError, match="missing"):
        TSPeftModel.from_pretrained(MLP(), saved)


@pytest.mark.parametrize("damage", ["drop_weights_file", "not_a_dict", "drop_ts_config"])
def test_damaged_manifest_gives_value_error(saved, damage):
    """A manifest that is valid JSON but not a tspeft manifest raises KeyError/AttributeError, not ValueError."""
    path = saved / "ts_config.json"
    manifest = json.loads(path.read_text())
    if damage == "not_a_dict":
        manifest = [manifest]
    else:
        del manifest[damage[len("drop_"):]]
    path.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="ts_config.json"):
        TSPeftModel.from_pretrained(MLP(), saved)


def test_weights_without_gate_state_give_value_error(saved):
    """A weights file whose checksum matches but lacks τ-rule state."""
    from safetensors.torch import load_file, save_file

    from tspeft.core import io

    manifest = json.loads((saved / "ts_config.json").read_text())
    tensors = {k: v for k, v in load_file(saved / manifest["weights_file"]).items() if not k.endswith(".tau")}
    save_file(tensors, saved / manifest["weights_file"])
    manifest["weights_sha256"] = io._sha256(saved / manifest["weights_file"])
    (saved / "ts_config.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="tau"):
        TSPeftModel.from_pretrained(MLP(), saved)
