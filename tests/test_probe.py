"""The frozen baseline (`--method none` on text classification): a probe fitted to convergence on pooled features."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cli_helpers import write_jsonl
from test_training import read_log
from tspeft.training.evaluate import evaluate
from tspeft.training.probe import PooledClassifier, fit_standardised_probe, model_pooling, pool
from tspeft.training.run_config import EvalConfig, TrainConfig
from tspeft.training.train import train


def test_probe_fits_separable_features_and_folds_the_standardisation():
    """Two classes apart along a feature of a large offset and scale: the fitted Linear takes the raw features
    (standardisation folded in) and separates them; the L2 weight comes from the grid."""
    torch.manual_seed(0)
    y = torch.arange(200) % 2
    x = torch.randn(200, 6)
    x[:, 2] = 1000.0 + 50.0 * (2 * y - 1) + 5.0 * torch.randn(200)
    head, fit = fit_standardised_probe(x, y, 2)
    with torch.no_grad():
        accuracy = (head(x).argmax(-1) == y).float().mean().item()
    assert accuracy >= 0.99 and fit.l2 in (1e-4, 1e-3, 1e-2, 1e-1) and len(fit.validation) == 4
    with pytest.raises(ValueError, match="at least 5 training examples"):
        fit_standardised_probe(x[:3], y[:3], 2)


def test_pooling_is_the_models_own(tmp_path):
    hidden = torch.tensor([[[1.0, 0.0], [3.0, 2.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])  # the last token is padding: it must not count
    torch.testing.assert_close(pool(hidden, mask, ["mean"]), torch.tensor([[2.0, 1.0]]))
    torch.testing.assert_close(pool(hidden, mask, ["cls", "max"]), torch.tensor([[1.0, 0.0, 3.0, 2.0]]))

    class Config:
        _name_or_path = str(tmp_path)

    model = torch.nn.Module()
    model.config = Config()
    assert model_pooling(model) == ["mean"]  # no sentence-transformers config: mean over real tokens
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    assert model_pooling(model) == ["cls"]


def test_method_none_fits_the_probe_saves_and_evaluates(tmp_path, bert_dir):
    """`train --method none` on text classification: the fitted probe, not SGD steps on a head; its folder
    reloads through `tspeft eval` to the same accuracy; the probe learns a task the words decide."""
    words = {0: "bad awful grim", 1: "good great fine"}
    rows = [{"text": f"{words[i % 2]} {i}", "label": i % 2} for i in range(60)]
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    out = tmp_path / "none"
    metrics = train(TrainConfig(out=str(out), data=str(data), model=str(bert_dir), method="none", n_eval=20,
                                batch_size=8, max_length=24, device="cpu"))
    assert metrics["linear_probe"] and metrics["train_steps"] == 0 and metrics["kept_fraction"] is None
    assert metrics["probe"]["l2"] in metrics["probe"]["l2_grid"] and metrics["accuracy"] >= 0.9
    assert json.loads((out / "run_manifest.json").read_text())["probe_pooling"] == ["mean"]
    assert read_log(out)[0]["step"] == 0
    again = evaluate(EvalConfig(adapter=str(out), device="cpu"))
    assert again["accuracy"] == pytest.approx(metrics["accuracy"])
    from tspeft.analysis.report import write_report

    assert Path(write_report(out)).is_file()  # `tspeft report` reads the probe's run like any other


def test_pooled_classifier_freezes_the_encoder(tiny_bert):
    classifier = PooledClassifier(tiny_bert, ["mean"], 3)
    assert {n for n, p in classifier.named_parameters() if p.requires_grad} == {"probe.weight", "probe.bias"}
    ids = torch.tensor([[2, 5, 6, 0]])
    out = classifier(input_ids=ids, attention_mask=torch.tensor([[1, 1, 1, 0]]), labels=torch.tensor([1]))
    assert out.logits.shape == (1, 3) and out.loss.ndim == 0
