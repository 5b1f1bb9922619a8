"""Damaged or mismatched saved files are one-line errors with exit 2 (issue #14): NaN τ, a truncated dense LoRA
file, a peft adapter whose head has another size; `--debug` shows the traceback; eval does not print
transformers' "newly initialized" report for a head that the adapter then loads."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from peft import LoraConfig
from safetensors.torch import load_file, save_file

from cli_helpers import fails_in_one_line, run_cli, sentiment_rows, tiny_train_flags, write_jsonl
from models import MLP
from tspeft import TokenSelectiveConfig, TSPeftModel, get_ts_peft_model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A headless tiny BERT folder (the head is new at every load, as with MiniLM) and a lora and a ts-lora run."""
    from transformers import BertConfig, BertModel

    from conftest import build_tiny_tokenizer
    from tspeft.cli.main import main

    root = tmp_path_factory.mktemp("load")
    tokenizer = build_tiny_tokenizer()
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(root / "bert")
    tokenizer.save_pretrained(root / "bert")
    data = write_jsonl(root / "train.jsonl", sentiment_rows(24))
    flags = ["--data", data, *tiny_train_flags(root / "bert"), "--max-steps", "1"]
    for method in ("lora", "ts-lora"):
        assert main([str(a) for a in ["train", *flags, "--method", method, "--out", root / method]]) == 0
    return root, flags


def copy_run(setup, tmp_path, method):
    root, _ = setup
    shutil.copytree(root / method, tmp_path / method)
    return tmp_path / method


@pytest.mark.parametrize("value", [math.nan, -1.0, -math.inf])
def test_nan_or_negative_tau_in_a_valid_adapter_file_is_refused(tmp_path, value):
    model = get_ts_peft_model(MLP(), LoraConfig(r=2, target_modules=["lin0"]), TokenSelectiveConfig())
    model.save_pretrained(tmp_path / "a")
    weights = next((tmp_path / "a").glob("ts_adapter-*.safetensors"))
    tensors = load_file(weights)
    key = next(k for k in tensors if k.startswith("gate.") and k.endswith(".tau"))
    tensors[key] = torch.tensor([value])
    # rewrite through the normal writer so the checksum is valid: only the value is wrong
    from tspeft.core import io

    manifest = json.loads((tmp_path / "a" / "ts_config.json").read_text())
    kept = {k: v for k, v in manifest.items() if k not in ("format_version", "weights_file", "weights_sha256")}
    io.write_adapter_folder(tmp_path / "a", tensors, kept)
    with pytest.raises(ValueError, match=r"τ of module lin0 is (nan|-1\.0|-inf).*must be a number >= 0"):
        TSPeftModel.from_pretrained(MLP(), tmp_path / "a")


def test_infinite_tau_set_by_hand_still_loads(tmp_path):
    model = get_ts_peft_model(MLP(), LoraConfig(r=2, target_modules=["lin0"]), TokenSelectiveConfig())
    model.set_thresholds(math.inf)  # documented: drops every update
    model.save_pretrained(tmp_path / "a")
    assert TSPeftModel.from_pretrained(MLP(), tmp_path / "a").thresholds() == {"lin0": math.inf}


def test_nan_tau_in_a_run_folder_is_one_line_at_eval(setup, tmp_path, capsys):
    run = copy_run(setup, tmp_path, "ts-lora")
    weights = next(run.glob("ts_adapter-*.safetensors"))
    tensors = load_file(weights)
    key = next(k for k in tensors if k.startswith("gate.") and k.endswith(".tau"))
    tensors[key] = torch.tensor([math.nan])
    from tspeft.core import io

    manifest = json.loads((run / "ts_config.json").read_text())
    io.write_adapter_folder(run, tensors, {k: v for k, v in manifest.items()
                                           if k not in ("format_version", "weights_file", "weights_sha256")})
    line = fails_in_one_line(["eval", "--adapter", run, "--device", "cpu"], capsys)
    assert "is nan" in line and "must be a number >= 0" in line


def test_truncated_dense_lora_file_is_one_line(setup, tmp_path, capsys):
    run = copy_run(setup, tmp_path, "lora")
    weights = run / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    line = fails_in_one_line(["eval", "--adapter", run, "--device", "cpu"], capsys)
    assert f"{weights}" in line and "corrupt or truncated" in line


def test_peft_adapter_with_another_head_size_is_one_line(setup, tmp_path, capsys):
    run = copy_run(setup, tmp_path, "lora")
    weights = run / "adapter_model.safetensors"
    tensors = load_file(weights)
    for key in [k for k in tensors if "classifier" in k]:
        shape = (3, *tensors[key].shape[1:])
        tensors[key] = torch.zeros(shape)
    save_file(tensors, weights)
    line = fails_in_one_line(["eval", "--adapter", run, "--device", "cpu"], capsys)
    assert "do not fit" in line and "classifier" in line


def test_debug_flag_shows_the_traceback(setup, tmp_path, capsys):
    run = copy_run(setup, tmp_path, "lora")
    (run / "adapter_model.safetensors").write_bytes(b"broken")
    code, _, err = run_cli(["--debug", "eval", "--adapter", run, "--device", "cpu"], capsys)
    assert code == 2 and "Traceback" in err


def test_eval_does_not_report_the_head_as_newly_initialized(setup, capfd, caplog):
    root, _ = setup
    for method in ("lora", "ts-lora"):
        code, out, err = run_cli(["eval", "--adapter", root / method, "--device", "cpu"], capfd)
        assert code == 0
        shown = out + err + caplog.text
        assert "newly initialized" not in shown and "LOAD REPORT" not in shown and "MISSING" not in shown
