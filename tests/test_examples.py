"""The launch configs in examples/ parse and say what docs/distributed.md says they do (they run on GPUs only)."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_accelerate_fsdp_config():
    config = yaml.safe_load((EXAMPLES / "accelerate_fsdp.yaml").read_text())
    assert config["distributed_type"] == "FSDP" and config["use_cpu"] is False
    fsdp = config["fsdp_config"]
    assert fsdp["fsdp_use_orig_params"] is True and fsdp["fsdp_state_dict_type"] == "FULL_STATE_DICT"


def test_deepspeed_zero2_config():
    config = json.loads((EXAMPLES / "deepspeed_zero2.json").read_text())
    assert config["zero_optimization"]["stage"] == 2
    assert config["train_micro_batch_size_per_gpu"] == "auto"  # filled in by the Trainer's DeepSpeed integration
