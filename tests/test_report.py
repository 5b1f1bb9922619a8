"""Fast tests for the HTML run report (synthetic run folders, no models)."""
from __future__ import annotations

import base64
import json
import re

import numpy as np
import pytest

from tspeft.analysis.report import write_report
from tspeft.analysis.tokens import layer_index, layer_token_matrix, module_type

PNG_SIG = b"\x89PNG\r\n\x1a\n"
MODULES = [f"bert.encoder.layer.{layer}.attention.self.{t}" for layer in range(3) for t in ("query", "value")]


def _make_run(path, with_masks=True, with_metrics=True, with_log=True):
    path.mkdir(parents=True, exist_ok=True)
    if with_metrics:
        metrics = {
            "task": "sst2&co", "model": "bert-tiny", "method": "tspeft", "seed": 17,
            "accuracy": 0.8125, "kept_fraction": 0.4375,
            "per_module": {m: 0.2 + 0.1 * i for i, m in enumerate(MODULES)},
            "train_seconds": 12.5, "trainable_params": 123456, "lr": 3e-4,
        }
        (path / "metrics.json").write_text(json.dumps(metrics))
    if with_log:
        lines = []
        for s in range(0, 50, 5):
            frac = 1.0 - s / 100
            lines.append(json.dumps({
                "step": s, "loss": 1.0 / (1 + s), "kept_fraction": frac, "mean_tau": s / 50,
                "kept_per_module": {m: frac - 0.01 * i for i, m in enumerate(MODULES)},
                "tau_per_module": {m: s / 50 + 0.02 * i for i, m in enumerate(MODULES)},
                "kept_target_per_module": {m: 0.5 for m in MODULES},
            }))
        lines.append('{"step": 50, "loss": 0.1, "kept_')  # truncated last line (interrupted run)
        (path / "train_log.jsonl").write_text("\n".join(lines) + "\n")
    if with_masks:
        tokens = ["<s>", "the", "movie", "&", "\"good\"", "</s>"]
        rng = np.random.default_rng(0)
        ex = [{"tokens": tokens, "masks": {m: rng.integers(0, 2, len(tokens)).tolist() for m in MODULES}}
              for _ in range(5)]
        (path / "token_masks.json").write_text(json.dumps({"examples": ex}))
    return path


def _embedded_pngs(text):
    return [base64.b64decode(b) for b in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)]


def test_full_report(tmp_path):
    run = _make_run(tmp_path / "run")
    out = write_report(run)
    assert out == run / "report.html" and out.is_file()
    text = out.read_text(encoding="utf-8")
    for value in ("sst2&amp;co", "bert-tiny", "tspeft", "17", "0.8125", "0.4375", "12.5", "123,456"):
        assert value in text
    assert "sst2&co" not in text
    # every embedded image is a valid PNG; 4 plots + 4 token examples (of 5) = 8
    imgs = _embedded_pngs(text)
    assert len(imgs) == 8 and all(b.startswith(PNG_SIG) for b in imgs)
    pngs = sorted((run / "report").glob("*.png"))
    assert {p.name for p in pngs} == {"kept_fraction.png", "tau.png", "module_heatmap.png", "loss.png",
                                      "tokens_0.png", "tokens_1.png", "tokens_2.png", "tokens_3.png"}
    assert all(p.read_bytes().startswith(PNG_SIG) for p in pngs)
    # tokens with HTML special characters are escaped
    assert "&lt;s&gt;" in text and "&lt;/s&gt;" in text and "&quot;good&quot;" in text
    assert "<s>" not in text and "</s>" not in text
    assert "skipped 1 unreadable line" in text
    assert not list(run.glob(".*.tmp")) and not list((run / "report").glob(".*.tmp"))


def test_missing_inputs_raise_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"metrics\.json.*train_log\.jsonl"):
        write_report(tmp_path / "empty")
    with pytest.raises(ValueError, match="does not exist"):
        write_report(tmp_path / "nope")


def test_report_without_token_masks(tmp_path):
    run = _make_run(tmp_path / "run", with_masks=False)
    text = write_report(run).read_text(encoding="utf-8")
    assert "No token masks were recorded" in text
    assert len(_embedded_pngs(text)) == 4
    assert not list((run / "report").glob("tokens_*.png"))


def test_report_with_only_one_input(tmp_path):
    run = _make_run(tmp_path / "m", with_masks=False, with_log=False)
    text = write_report(run).read_text(encoding="utf-8")
    assert "train_log.jsonl was not found" in text and "0.8125" in text
    assert len(_embedded_pngs(text)) == 1  # module heatmap from metrics.json
    run = _make_run(tmp_path / "l", with_masks=False, with_metrics=False)
    text = write_report(run).read_text(encoding="utf-8")
    assert "metrics.json was not found" in text
    assert len(_embedded_pngs(text)) == 4  # heatmap falls back to the last log entry


def test_module_name_parsing_and_token_aggregation():
    assert layer_index("bert.encoder.layer.3.attention.self.query") == 3
    assert module_type("bert.encoder.layer.3.attention.self.query") == "query"
    assert layer_index("model.layers.5.self_attn.q_proj") == 5
    assert module_type("model.layers.5.self_attn.q_proj") == "q_proj"
    assert layer_index("2") == 2 and module_type("2") == "module"
    assert layer_index("classifier") == -1 and module_type("classifier") == "classifier"
    layers, mat = layer_token_matrix(["a", "b", "c"], {"l.0.q": [1, 0, 1], "l.0.v": [1, 1], "l.1.q": [0, 0, 0]})
    assert layers == [0, 1]
    np.testing.assert_allclose(mat, [[1.0, 0.5, 1.0], [0.0, 0.0, 0.0]])
