"""Core gate, τ rule and adapter files, on tiny custom models and tiny random transformers models."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from torch import nn

from models import MLP, lora, tiny_bert, tiny_llama
from tspeft import BottleneckConfig, TokenSelectiveConfig, TSPeftModel, get_ts_peft_model
from tspeft.core.adapter import inject_bottleneck_adapters
from tspeft.core.tau_rule import scheduled_target


def _bottleneck(targets, size=3):
    return BottleneckConfig(target_modules=targets, bottleneck_size=size)


def _ids(shape, mask: bool = False):
    def make():
        inputs = {"input_ids": torch.randint(1, 50, shape)}
        if mask:
            inputs["attention_mask"] = torch.ones(*shape, dtype=torch.long)
        return inputs
    return make


# The equivalence table, in the spirit of peft's tests/test_custom_models.py: every way tspeft gates a layer
# (core/attach.py: LoRA's down projection, DoRA's update, the output difference of a bottleneck adapter) on every
# model family. With τ = 0 each gated model computes what its ungated adapter computes (within 1e-6); with τ = ∞
# exactly what its base model computes. Row: (id, base model factory, peft config factory, inputs factory).
EQUIVALENCE_CASES = [
    ("mlp-lora", MLP, lambda: lora(["lin0", "lin1"]), lambda: {"x": torch.randn(3, 5, 12)}),
    ("mlp-dora", MLP, lambda: lora(["lin0", "lin1"], dora=True), lambda: {"x": torch.randn(3, 5, 12)}),
    ("mlp-2d-lora", MLP, lambda: lora(["lin0"]), lambda: {"x": torch.randn(7, 12)}),
    ("mlp-4d-lora", MLP, lambda: lora(["lin1"]), lambda: {"x": torch.randn(2, 3, 4, 12)}),
    ("mlp-adapter", MLP, lambda: _bottleneck(["lin0", "lin1"]), lambda: {"x": torch.randn(4, 6, 12)}),
    ("bert-lora", tiny_bert, lambda: lora(["query", "value", "dense"]), _ids((2, 9), mask=True)),
    ("bert-dora", tiny_bert, lambda: lora(["query", "key"], dora=True), _ids((2, 9))),
    ("llama-lora", tiny_llama, lambda: lora(["q_proj", "v_proj", "o_proj"]), _ids((2, 7))),
    ("llama-dora", tiny_llama, lambda: lora(["q_proj", "down_proj"], dora=True), _ids((2, 7))),
]
CASES = {case: row for case, *row in EQUIVALENCE_CASES}


def output_of(result):
    return result.logits if hasattr(result, "logits") else result


def gated_and_reference(case):
    """A TS model, the ungated reference with equal weights (plain peft, or the plain bottleneck adapter, whose
    up projection is drawn at random so that its update is not zero) and the base model."""
    make_base, make_config, make_inputs = CASES[case]
    torch.manual_seed(1)
    base = make_base()
    config = make_config()
    if isinstance(config, BottleneckConfig):
        reference = copy.deepcopy(base)
        inject_bottleneck_adapters(reference, config)
        for name, parameter in reference.named_parameters():
            if "adapter_up" in name:
                nn.init.normal_(parameter)
        ts_model = get_ts_peft_model(copy.deepcopy(base), make_config(), TokenSelectiveConfig())
        ts_model.model.load_state_dict(reference.state_dict(), strict=False)
    else:
        reference = get_peft_model(copy.deepcopy(base), config)
        ts_model = get_ts_peft_model(copy.deepcopy(base), make_config(), TokenSelectiveConfig())
        set_peft_model_state_dict(ts_model.model, get_peft_model_state_dict(reference))
    torch.manual_seed(2)
    return ts_model.eval(), reference.eval(), base.eval(), make_inputs()


@pytest.mark.parametrize("case", list(CASES))
def test_tau_zero_matches_ungated_adapter_and_tau_inf_matches_base(case):
    ts_model, reference, base, inputs = gated_and_reference(case)
    with torch.no_grad():
        expected = output_of(reference(**inputs))
        assert torch.allclose(output_of(ts_model(**inputs)), expected, atol=1e-6, rtol=0)
        assert ts_model.kept_fraction() == 1.0
        ts_model.set_thresholds(math.inf)
        assert torch.equal(output_of(ts_model(**inputs)), output_of(base(**inputs)))


@pytest.mark.parametrize("case", ["mlp-lora", "mlp-dora"])
def test_adapter_gets_gradient_only_through_kept_tokens(case):
    ts_model, _, _, inputs = gated_and_reference(case)
    x = inputs["x"]
    ts_model.train()
    with torch.no_grad():
        ts_model(x)
    ts_model.set_thresholds(math.inf)
    ts_model(x).sum().backward()
    grads = [p.grad for n, p in ts_model.named_parameters() if p.requires_grad]
    assert all(g is None or torch.count_nonzero(g) == 0 for g in grads), "dropped tokens must not train the adapter"
    ts_model.zero_grad()
    ts_model.set_thresholds(0.0)
    ts_model(x).sum().backward()
    assert any(g is not None and torch.count_nonzero(g) > 0 for g in (p.grad for p in ts_model.parameters()))


def regression_setup(helpful: bool, ts_config: TokenSelectiveConfig):
    """Base layer plus a random LoRA update M; the target is base + 2M (keeping helps) or base − M (it hurts)."""
    torch.manual_seed(0)
    model = get_ts_peft_model(nn.Sequential(nn.Linear(16, 16)), lora(["0"]), ts_config)
    x = torch.randn(8, 10, 16)
    with torch.no_grad():
        adapted = model(x)
        with model.model.disable_adapter():
            base = model(x)
    return model, x, base + (2 if helpful else -1) * (adapted - base)


@pytest.mark.parametrize("helpful", [True, False])
def test_surrogate_gradient_sign_and_tau_nonnegative(helpful):
    model, x, target = regression_setup(helpful, TokenSelectiveConfig(warmup_steps=0, sparsity_weight=0.0))
    model.train()
    for _ in range(5):
        loss = nn.functional.mse_loss(model(x), target)
        loss.backward()
        model.update_thresholds()
        model.zero_grad()
    slope = model.loss_slopes()["0"]
    tau = model.thresholds()["0"]
    assert tau >= 0
    if helpful:  # keeping the updates lowers the loss: ∂L/∂u < 0, so u stays at 1 and τ at 0
        assert slope < 0 and model.allocated_kept()["0"] == 1.0 and tau == 0.0
    else:  # dropping them lowers the loss: ∂L/∂u > 0, u falls and τ rises
        assert slope > 0 and model.allocated_kept()["0"] < 1.0 and tau > 0


def test_scheduled_target_ramps_cubically_from_one_to_target():
    config = TokenSelectiveConfig(target_kept=0.4, warmup_steps=10, ramp_steps=20)
    values = [scheduled_target(config, step) for step in range(0, 40)]
    assert values[:11] == [1.0] * 11 and values[30:] == [pytest.approx(0.4)] * 10
    assert all(a > b for a, b in zip(values[10:30], values[11:31]))  # strictly falling during the ramp
    assert values[20] == pytest.approx(0.4 + 0.6 * 0.5 ** 3)
    assert scheduled_target(TokenSelectiveConfig(target_kept=0.4, warmup_steps=10), 11) == pytest.approx(0.4)


@pytest.mark.parametrize("target,ramp", [(0.7, 0), (0.5, 0), (0.3, 0), (0.3, 30)])
def test_target_mode_reaches_requested_kept_fraction(target, ramp):
    torch.manual_seed(0)
    model = get_ts_peft_model(MLP(), LoraConfig(r=4, target_modules=["lin0", "lin1"]),
                              TokenSelectiveConfig(target_kept=target, warmup_steps=10, ramp_steps=ramp))
    teacher = nn.Linear(12, 12)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(80):
        x = torch.randn(16, 8, 12)
        loss = nn.functional.mse_loss(model(x), teacher(x).detach())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        model.update_thresholds()
        if step == 59:
            model.reset_stats()
    assert abs(model.kept_fraction() - target) <= 0.05
    assert all(t > 0 for t in model.thresholds().values())


def test_pad_tokens_do_not_change_statistics_or_tau():
    def run(pad: int):
        torch.manual_seed(0)
        model = get_ts_peft_model(MLP(), lora(["lin0", "lin1"]), TokenSelectiveConfig(target_kept=0.5, warmup_steps=0))
        torch.manual_seed(3)
        real = torch.randn(4, 6, 12)
        garbage = 1e3 * torch.randn(4, pad, 12)  # pad positions with wild activations must not count
        x = torch.cat([real, garbage], 1)
        mask = torch.cat([torch.ones(4, 6), torch.zeros(4, pad)], 1)
        model.train()
        with model.real_tokens(mask):
            model(x)[:, :6].pow(2).mean().backward()
        model.update_thresholds()
        return model.kept_fractions(), model.thresholds(), [g.kept_counts[1].item() for g in model.gates.values()]

    no_pad, padded = run(0), run(5)
    assert no_pad[2] == padded[2] == [24.0, 24.0]
    assert no_pad[0] == padded[0]
    assert no_pad[1] == pytest.approx(padded[1], rel=1e-6)


def test_attention_mask_is_used_by_transformers_models():
    model = get_ts_peft_model(tiny_bert(), lora(["query"]), TokenSelectiveConfig())
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        model(input_ids=torch.randint(1, 50, (2, 5)), attention_mask=mask)
    assert [g.kept_counts[1].item() for g in model.gates.values()] == [8.0, 8.0]


@pytest.mark.parametrize("case", ["mlp-lora", "mlp-dora", "bert-lora", "llama-dora"])
def test_save_load_roundtrip_is_bit_identical(case, tmp_path):
    ts_model, _, _, inputs = gated_and_reference(case)
    ts_model.set_thresholds({name: 0.05 * (i + 1) for i, name in enumerate(ts_model.gates)})
    ts_model.save_pretrained(tmp_path / "adapter")
    make_base = CASES[case][0]
    torch.manual_seed(1)  # the same frozen base as gated_and_reference's
    loaded = TSPeftModel.from_pretrained(make_base(), tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(output_of(loaded(**inputs)), output_of(ts_model(**inputs)))
    assert loaded.thresholds() == ts_model.thresholds()
    assert not any(p.requires_grad for p in loaded.parameters())
    torch.manual_seed(1)
    trainable = TSPeftModel.from_pretrained(make_base(), tmp_path / "adapter", is_trainable=True)
    assert any(p.requires_grad for p in trainable.parameters())


def test_bottleneck_save_load_roundtrip(tmp_path):
    torch.manual_seed(0)
    config = BottleneckConfig(target_modules=["lin1"], bottleneck_size=4)
    model = get_ts_peft_model(MLP(), config, TokenSelectiveConfig())
    nn.init.normal_(model.get_base_model().lin1.adapter_up.weight)
    model.set_thresholds(0.1)
    model.save_pretrained(tmp_path)
    torch.manual_seed(0)
    loaded = TSPeftModel.from_pretrained(MLP(), tmp_path)
    x = torch.randn(3, 4, 12)
    assert torch.equal(loaded(x), model(x))


def test_loading_into_mismatched_base_fails_clearly(tmp_path):
    model = get_ts_peft_model(MLP(12), lora(["lin0"]), TokenSelectiveConfig())
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="do not fit this base model"):
        TSPeftModel.from_pretrained(MLP(20), tmp_path)
    with pytest.raises(ValueError, match="adapted modules do not match|matched no|not found"):
        TSPeftModel.from_pretrained(nn.Sequential(nn.Linear(12, 12)), tmp_path)


def test_plain_peft_refuses_the_folder_loudly(tmp_path):
    model = get_ts_peft_model(MLP(), lora(["lin0"]), TokenSelectiveConfig())
    model.save_pretrained(tmp_path)
    with pytest.raises(Exception, match="token-selective adapter"):
        PeftModel.from_pretrained(MLP(), tmp_path)


def test_corrupt_or_truncated_weights_give_clear_error(tmp_path):
    model = get_ts_peft_model(MLP(), lora(["lin0"]), TokenSelectiveConfig())
    model.save_pretrained(tmp_path)
    weights = next(tmp_path.glob("ts_adapter-*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        TSPeftModel.from_pretrained(MLP(), tmp_path)
    (tmp_path / "ts_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt"):
        TSPeftModel.from_pretrained(MLP(), tmp_path)
    with pytest.raises(ValueError, match="not a tspeft adapter folder"):
        TSPeftModel.from_pretrained(MLP(), tmp_path / "missing")


def test_resave_replaces_weights_and_keeps_one_file(tmp_path):
    model = get_ts_peft_model(MLP(), lora(["lin0"]), TokenSelectiveConfig())
    model.save_pretrained(tmp_path)
    model.set_thresholds(0.3)
    model.save_pretrained(tmp_path)
    assert len(list(tmp_path.glob("ts_adapter-*.safetensors"))) == 1
    assert json.loads((tmp_path / "ts_config.json").read_text())["base_method"] == "lora"
    assert TSPeftModel.from_pretrained(MLP(), tmp_path).thresholds()["lin0"] == pytest.approx(0.3)


def test_merge_refuses_unless_gate_dropping_is_accepted():
    model = get_ts_peft_model(MLP(), lora(["lin0"]), TokenSelectiveConfig())
    x = torch.randn(2, 12)
    dense = model(x)
    with pytest.raises(RuntimeError, match="cannot be folded"):
        model.merge_and_unload()
    merged = model.merge_and_unload(accept_ungated=True)
    assert not any("ts_gate" in n for n, _ in merged.named_modules())
    assert torch.allclose(merged(x), dense, atol=1e-5)


@pytest.mark.parametrize("field,value,match", [
    ("tau_init", -0.1, "tau_init"), ("tau_init", float("nan"), "tau_init"), ("tau_init", float("inf"), "tau_init"),
    ("target_kept", 0.0, "target_kept"), ("target_kept", 1.5, "target_kept"),
    ("target_kept", float("nan"), "target_kept"),
    ("step_size", 0.0, "step_size"), ("step_size", 1.5, "step_size"), ("curve_points", 1, "curve_points"),
    ("ramp_steps", -1, "ramp_steps"), ("allocation", "greedy", "allocation"), ("selection", "top", "selection"),
])
def test_bad_config_values_name_the_field(field, value, match):
    with pytest.raises(ValueError, match=match):
        TokenSelectiveConfig(**{field: value})


def test_unknown_base_method_and_unmatched_targets():
    from peft import IA3Config

    with pytest.raises(ValueError, match="unknown base method IA3Config"):
        get_ts_peft_model(MLP(), IA3Config(target_modules=["lin0"], feedforward_modules=[]), TokenSelectiveConfig())
    with pytest.raises(ValueError, match="nothing_here"):
        get_ts_peft_model(MLP(), lora(["nothing_here"]), TokenSelectiveConfig())
    with pytest.raises(ValueError, match="matched no"):
        get_ts_peft_model(MLP(), BottleneckConfig(target_modules=["nothing_here"]), TokenSelectiveConfig())
    with pytest.raises(ValueError, match="must be >= 0"):
        get_ts_peft_model(MLP(), lora(["lin0"])).set_thresholds(-1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", ["mlp-lora", "mlp-dora"])
def test_edge_inputs_give_finite_outputs_and_statistics(dtype, case):
    ts_model, _, _, _ = gated_and_reference(case)
    ts_model = ts_model.to(dtype).train()
    cases = [torch.zeros(0, 12), torch.zeros(2, 1, 12), torch.randn(3, 1, 12), 300 * torch.randn(2, 4, 12)]
    for x in cases:
        out = ts_model(x.to(dtype))
        assert torch.isfinite(out).all()
        out.float().sum().backward()
    all_pad = torch.randn(2, 3, 12).to(dtype)
    with ts_model.real_tokens(torch.zeros(2, 3)):
        assert torch.isfinite(ts_model(all_pad)).all()
    ts_model.update_thresholds()
    assert all(math.isfinite(t) and t >= 0 for t in ts_model.thresholds().values())
    assert all(v is None or 0 <= v <= 1 for v in ts_model.kept_fractions().values())


def test_generation_with_kv_cache_counts_real_tokens():
    torch.manual_seed(0)
    model = get_ts_peft_model(tiny_llama(), lora(["q_proj", "v_proj"]), TokenSelectiveConfig())
    model.set_thresholds(0.02)
    ids = torch.randint(1, 50, (1, 5))
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    assert out.shape[1] == 9
    # 5 prompt tokens + 3 decoding steps of one token each reach every gated module
    assert {g.kept_counts[1].item() for g in model.gates.values()} == {8.0}


def test_generate_with_kv_cache_matches_stepwise_gated_forward():
    torch.manual_seed(0)
    model = get_ts_peft_model(tiny_llama(), lora(["q_proj", "k_proj", "v_proj", "o_proj"]), TokenSelectiveConfig())
    ids = torch.randint(1, 50, (2, 6))
    with torch.no_grad():
        model(input_ids=ids)
        model.set_thresholds({name: float(torch.rand(())) * 0.2 for name in model.gates})
        cached = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
        stepwise = ids
        for _ in range(6):  # full forward each step, no cache
            logits = model(input_ids=stepwise, attention_mask=torch.ones_like(stepwise), use_cache=False).logits
            stepwise = torch.cat([stepwise, logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert 0 < model.kept_fraction() < 1, "the thresholds must actually drop some tokens for this test to mean " \
                                          "anything"
    assert torch.equal(cached, stepwise)


def test_adapter_saved_before_the_allocated_kept_rename_still_loads():
    """tests/data/adapter_before_allocated_kept was saved by tspeft when the gate buffer was called kept_target
    (an nn.Sequential(Linear(4, 4), ReLU, Linear(4, 2)) with seed 0, LoRA r=2 on "0" and "2", kept_target set to
    0.25 / 0.75, τ to 0.1 / 0.2, rule_step 7)."""
    from pathlib import Path

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    loaded = TSPeftModel.from_pretrained(base, Path(__file__).parent / "data" / "adapter_before_allocated_kept")
    assert loaded.allocated_kept() == {"0": 0.25, "2": 0.75}
    assert loaded.thresholds() == pytest.approx({"0": 0.1, "2": 0.2})
    assert int(loaded.rule_step) == 7


class _NoInputGradient(torch.autograd.Function):
    """Doubles its input and gives it no gradient (as bitsandbytes' 4-bit matmul did on CPU after an eval pass)."""

    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, grad):
        return None


@pytest.mark.parametrize("method", ["lora", "dora", "adapter"])
def test_a_gated_output_without_gradient_records_nothing_and_does_not_fail(method):
    """Autograd calls the gate's backward hook with None when nothing downstream gives the output a gradient."""
    from models import ts_mlp

    model = ts_mlp(method, target_kept=0.5, warmup_steps=0).train()
    x = torch.randn(2, 5, 12)
    _NoInputGradient.apply(model(x)).sum().backward()
    assert all(float(gate.change_histogram.abs().sum()) == 0 for gate in model.gates.values())
