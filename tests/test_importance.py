"""Module importance criteria on a tiny model."""

import json

import pytest
import torch
from peft import LoraConfig

from models import ThreeLinear
from tspeft import BottleneckConfig, TokenSelectiveConfig, get_ts_peft_model
from tspeft.analysis.importance import module_importance
from tspeft.training.targets import rank_modules, top_k_modules


def build(dora=False, seed=0):
    torch.manual_seed(seed)
    config = LoraConfig(r=2, target_modules=["a", "b", "c"], init_lora_weights=False, use_dora=dora)
    model = get_ts_peft_model(ThreeLinear(), config, TokenSelectiveConfig())
    model.set_thresholds(0.3)
    return model


def batches(pad_garbage: bool):
    torch.manual_seed(5)
    real = torch.randn(3, 4, 8)
    if not pad_garbage:
        return real, torch.ones(3, 4)
    return torch.cat([real, 1e3 * torch.randn(3, 2, 8)], 1), torch.cat([torch.ones(3, 4), torch.zeros(3, 2)], 1)


def scores_of(model, pad_garbage):
    x, mask = batches(pad_garbage)
    with model.real_tokens(mask):
        return module_importance(model, [{"x": x}], seed=0)


@pytest.mark.parametrize("dora", [False, True])
def test_rankings_are_deterministic_for_a_seed(dora):
    first, second = scores_of(build(dora), False), scores_of(build(dora), False)
    assert {k: rank_modules(v) for k, v in first.items()} == {k: rank_modules(v) for k, v in second.items()}
    assert ("dora_magnitude_change" in first) == dora
    assert set(first["random"]) == {"a", "b", "c"}


def test_data_criteria_count_real_tokens_only():
    clean, padded = scores_of(build(), False), scores_of(build(), True)
    for criterion in ("kept_fraction", "relative_magnitude"):
        assert clean[criterion] == pytest.approx(padded[criterion], rel=1e-6)


def test_bottleneck_adapter_has_weight_criteria():
    torch.manual_seed(0)
    model = get_ts_peft_model(ThreeLinear(), BottleneckConfig(target_modules=["a", "c"], bottleneck_size=2),
                              TokenSelectiveConfig())
    scores = module_importance(model)
    assert set(scores["delta_weight_norm"]) == {"a", "c"}


def test_top_k_modules_reads_file_and_rejects_bad_k(tmp_path):
    path = tmp_path / "importance.json"
    path.write_text(json.dumps({"scores": {"kept_fraction": {"a": 0.2, "b": 0.9, "c": 0.5}}}))
    assert top_k_modules(path, "kept_fraction", 2) == ["b", "c"]
    with pytest.raises(ValueError, match="top-k 4"):
        top_k_modules(path, "kept_fraction", 4)
    with pytest.raises(ValueError, match="no criterion 'weights'"):
        top_k_modules(path, "weights", 1)
