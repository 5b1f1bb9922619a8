"""The warm-up fits the run (issue #14, case 5): a TS run shorter than its warm-up used to be a dense run
labelled ts-lora (kept 1.0 against target 0.7). Now the warm-up (and a ramp) are capped so the gate has
`DEFAULTS.gate_settle_steps` steps at its target; a run too short even for that says so and records it."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from cli_helpers import fails_in_one_line, run_cli, sentiment_rows, tiny_bert_folder, tiny_train_flags, write_jsonl
from tspeft.training.defaults import DEFAULTS


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("warmup")
    model_dir = tiny_bert_folder(root / "bert")
    data = write_jsonl(root / "train.jsonl", sentiment_rows(32))
    return root, model_dir, ["--data", data, *tiny_train_flags(model_dir), "--method", "ts-lora"]


def test_fitting_schedule_caps_warmup_and_ramp():
    from tspeft.training.run_config import fit_gate_schedule

    settle = DEFAULTS.gate_settle_steps
    assert fit_gate_schedule(20, 0, total_steps=1000) == (20, 0, True)
    assert fit_gate_schedule(20, 0, total_steps=settle + 3) == (3, 0, True)  # capped: the gate gets `settle` steps
    assert fit_gate_schedule(20, 10, total_steps=settle + 12) == (2, 10, True)
    assert fit_gate_schedule(0, 30, total_steps=settle + 12) == (0, 12, True)  # the ramp too
    assert fit_gate_schedule(20, 0, total_steps=2) == (0, 0, False)  # cannot reach the target


def test_case5_short_run_is_capped_so_the_gate_bites(setup, tmp_path, capsys):
    _, _, flags = setup
    steps = DEFAULTS.gate_settle_steps + 2
    code, _, err = run_cli(["train", *flags, "--max-steps", steps, "--logging-steps", "1", "--out", tmp_path / "r"],
                           capsys)
    assert code == 0
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert metrics["warmup_steps"] == 2 and metrics["warmup_steps_requested"] == DEFAULTS.warmup_steps
    assert metrics["target_reached"] is True
    assert f"warm-up capped at 2 of {steps} steps" in err
    log = [json.loads(line) for line in (tmp_path / "r" / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["mean_tau"] > 0 and log[-1]["kept_fraction"] < 1.0
    assert metrics["kept_fraction"] < 1.0


def test_case5_run_too_short_for_the_target_says_so_and_records_it(setup, tmp_path, capsys):
    _, _, flags = setup
    code, _, err = run_cli(["train", *flags, "--max-steps", "2", "--out", tmp_path / "r"], capsys)
    assert code == 0
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert metrics["target_reached"] is False and metrics["warmup_steps"] == 0
    assert "too short for the gate to reach its target" in err
    assert metrics["kept_fraction"] < 1.0  # the gate bit even so


def test_importance_refuses_a_run_whose_gate_never_bit(setup, tmp_path, capsys):
    """An older run whose warm-up covered it all: every τ is 0 and every module is tied at kept 1.0."""
    root, model_dir, flags = setup
    out = tmp_path / "r"
    assert run_cli(["train", *flags, "--max-steps", "2", "--out", out], capsys)[0] == 0
    from transformers import AutoModelForSequenceClassification

    from tspeft import TSPeftModel

    model = TSPeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(model_dir), out)
    model.set_thresholds(0.0)
    with torch.no_grad():
        for gate in model.gates.values():
            gate.allocated_kept.fill_(1.0)
    model.save_pretrained(out)
    line = fails_in_one_line(["importance", "--adapter", out, "--n-batches", "1"], capsys)
    assert "every module's τ is 0: the gate of this run never bit" in line
    shutil.rmtree(out)
