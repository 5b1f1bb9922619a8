"""The `tspeft` command: argument errors, train/eval/report on a tiny model, compare at tiny sizes."""

from __future__ import annotations

import json

import pytest

from test_training import write_classification
from tspeft.cli.main import main


@pytest.fixture
def data_file(tmp_path):
    return write_classification(tmp_path / "train.jsonl", n=40)


def fails(argv, capsys) -> str:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["train", "--task", "no_such_task", "--out", "x"], "argument --task: unknown task 'no_such_task'"),
    (["train", "--out", "x"], "one of --task or --data is required"),
    (["train", "--task", "rotten_tomatoes", "--data", "DATA", "--out", "x"], "not both"),
    (["train", "--task", "rotten_tomatoes"], "--out"),
    (["train", "--task", "rotten_tomatoes", "--target-kept", "0", "--out", "x"], "argument --target-kept"),
    (["train", "--task", "rotten_tomatoes", "--target-kept", "1.5", "--out", "x"], "(0, 1]"),
    (["train", "--task", "rotten_tomatoes", "--target-kept", "abc", "--out", "x"], "argument --target-kept"),
    (["train", "--task", "rotten_tomatoes", "--method", "lora", "--target-kept", "0.5", "--out", "x"],
     "applies only to the ts-* methods"),
    (["train", "--task", "rotten_tomatoes", "--method", "lora", "--allocation", "uniform", "--out", "x"],
     "argument --allocation: applies only to the ts-* methods"),
    (["train", "--task", "rotten_tomatoes", "--selection", "top", "--out", "x"], "argument --selection"),
    (["train", "--task", "rotten_tomatoes", "--method", "prefix", "--out", "x"], "argument --method"),
    (["train", "--task", "rotten_tomatoes", "--epochs", "-1", "--out", "x"], "argument --epochs"),
    (["train", "--task", "rotten_tomatoes", "--n-train", "0", "--out", "x"], "argument --n-train"),
    (["train", "--task", "rotten_tomatoes", "--text-column", "t", "--out", "x"], "argument --text-column"),
    (["train", "--data", "missing.jsonl", "--out", "x"], "argument --data: file not found"),
    (["train", "--eval-data", "DATA", "--out", "x"], "argument --eval-data: needs --data"),
    (["train", "--task", "rotten_tomatoes", "--model", "no/such/folder", "--out", "x"], "argument --model"),
    (["train", "--task", "rotten_tomatoes", "--device", "tpu", "--out", "x"], "argument --device"),
    (["compare", "--task", "rotten_tomatoes", "--methods", "lora,bogus"], "argument --methods: unknown value 'bogus'"),
    (["compare", "--task", "rotten_tomatoes", "--seeds", "0,x"], "argument --seeds"),
    (["compare", "--task", "rotten_tomatoes", "--methods", "lora:random"], "argument --methods: unknown value"),
    (["eval", "--adapter", "no/such/run"], "argument --adapter"),
    ([], "required"),
])
def test_argument_errors(argv, message, capsys, data_file):
    argv = [str(data_file) if a == "DATA" else a for a in argv]
    assert message in fails(argv, capsys)


def test_train_eval_report(tmp_path, bert_dir, data_file, capsys):
    out = tmp_path / "run"
    assert main(["train", "--data", str(data_file), "--model", str(bert_dir), "--method", "ts-lora",
                 "--max-steps", "4", "--warmup-steps", "1", "--target-kept", "0.5", "--batch-size", "8",
                 "--max-length", "24",
                 "--device", "cpu", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "accuracy" in printed and "kept_fraction" in printed and "report.html" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["target_kept"] == 0.5 and metrics["train_steps"] == 4
    assert (out / "report.html").is_file()
    stats = json.loads((out / "token_stats.json").read_text())
    assert set(stats) >= {"by_kind", "by_position", "most_kept_tokens", "least_kept_tokens"}
    assert "Which kinds of tokens are kept" in (out / "report.html").read_text()

    assert main(["eval", "--adapter", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert f"{metrics['accuracy']:.4f}" in printed and f"{metrics['kept_fraction']:.4f}" in printed

    (out / "report.html").unlink()
    assert main(["report", str(out)]) == 0
    assert (out / "report.html").is_file() and "report.html" in capsys.readouterr().out


def test_loss_driven_rule_flag(tmp_path, bert_dir, data_file):
    out = tmp_path / "ld"
    main(["train", "--data", str(data_file), "--model", str(bert_dir), "--target-kept", "none", "--max-steps", "2",
          "--warmup-steps", "1", "--device", "cpu", "--no-report", "--out", str(out)])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["target_kept"] is None and metrics["tau_rule"] == "loss-driven"


def test_control_flags_reach_the_rule(tmp_path, bert_dir, data_file):
    out = tmp_path / "uniform-random"
    main(["train", "--data", str(data_file), "--model", str(bert_dir), "--allocation", "uniform", "--selection",
          "random", "--target-kept", "0.5", "--max-steps", "3", "--warmup-steps", "1", "--device", "cpu",
          "--no-report", "--out", str(out)])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["allocation"] == "uniform" and metrics["selection"] == "random"
    saved = json.loads((out / "ts_config.json").read_text())["ts_config"]
    assert saved["allocation"] == "uniform" and saved["selection"] == "random"


def test_bad_data_is_a_clear_error(tmp_path, bert_dir, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"txt": "no text column", "label": 1}) + "\n")
    err = fails(["train", "--data", str(bad), "--model", str(bert_dir), "--out", str(tmp_path / "o")], capsys)
    assert "missing column 'text'" in err


def test_compare(tmp_path, bert_dir, data_file, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", "--data", str(data_file), "--model", str(bert_dir), "--methods", "lora,ts-lora",
                 "--seeds", "0,1", "--max-steps", "2", "--warmup-steps", "1", "--batch-size", "8",
                 "--max-length", "24", "--device", "cpu", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| lora | 2 |" in printed and "| ts-lora | 2 |" in printed
    summary = json.loads((out / "compare.json").read_text())
    assert [r["method"] for r in summary["summary"]] == ["lora", "ts-lora"]
    assert {(r["method"], r["seed"]) for r in summary["runs"]} == {("lora", 0), ("lora", 1), ("ts-lora", 0),
                                                                   ("ts-lora", 1)}
    lora = summary["summary"][0]
    assert lora["kept_fraction_mean"] == 1.0 and lora["accuracy_std"] is not None
    assert "± " in (out / "compare.md").read_text()
    assert (out / "ts-lora-s0" / "report.html").is_file() and not (out / "lora-s0" / "report.html").exists()


def test_compare_runs_the_random_control_through_the_same_path(tmp_path, bert_dir, data_file, capsys):
    """`ts-lora:random` is ts-lora with random tokens at the target in every module: its own row and run folder,
    its metrics say so."""
    out = tmp_path / "cmp"
    assert main(["compare", "--data", str(data_file), "--model", str(bert_dir), "--methods", "ts-lora,ts-lora:random",
                 "--seeds", "0", "--max-steps", "6", "--warmup-steps", "1", "--target-kept", "0.5", "--batch-size",
                 "8", "--max-length", "24", "--device", "cpu", "--no-report", "--out", str(out)]) == 0
    assert "| ts-lora:random | 1 |" in capsys.readouterr().out
    summary = json.loads((out / "compare.json").read_text())
    assert [r["method"] for r in summary["summary"]] == ["ts-lora", "ts-lora:random"]
    control = json.loads((out / "ts-lora.random-s0" / "metrics.json").read_text())
    assert control["method"] == "ts-lora" and (control["allocation"], control["selection"]) == ("uniform", "random")
    learned = json.loads((out / "ts-lora-s0" / "metrics.json").read_text())
    assert (learned["allocation"], learned["selection"]) == ("learned", "magnitude")
    assert "random tokens at the same kept fraction" in (out / "compare.md").read_text()


def test_setup_calls_prepare_all(monkeypatch, capsys, tmp_path):
    import tspeft.tasks.resources as resources

    calls = []
    monkeypatch.setattr(resources, "prepare_all", lambda log=print: calls.append(log) or {"minilm": tmp_path})
    assert main(["setup"]) == 0
    assert calls and "setup complete" in capsys.readouterr().out


def test_importance_then_train_on_top_modules(tmp_path, bert_dir, data_file, capsys):
    run = tmp_path / "ts"
    common = ["--data", str(data_file), "--model", str(bert_dir), "--max-steps", "3", "--warmup-steps", "1",
              "--batch-size", "8", "--max-length", "24", "--device", "cpu", "--no-report"]
    main(["train", *common, "--method", "ts-lora", "--out", str(run)])
    assert main(["importance", "--adapter", str(run), "--n-batches", "2"]) == 0
    assert "importance.json" in capsys.readouterr().out
    result = json.loads((run / "importance.json").read_text())
    criteria = {"kept_fraction", "relative_magnitude", "delta_weight_norm", "factor_norm", "random"}
    assert criteria <= set(result["scores"])
    assert (run / "importance.png").is_file()
    again = json.loads(json.dumps(result["ranking"]))
    main(["importance", "--adapter", str(run), "--n-batches", "2", "--out", str(tmp_path / "again.json")])
    assert json.loads((tmp_path / "again.json").read_text())["ranking"] == again  # deterministic for a seed

    top = tmp_path / "top"
    main(["train", *common, "--method", "lora", "--modules-from", str(run / "importance.json"), "--top-k", "3",
          "--out", str(top)])
    metrics = json.loads((top / "metrics.json").read_text())
    assert metrics["target_modules"] == result["ranking"]["kept_fraction"][:3]


def test_importance_refuses_a_dense_adapter(tmp_path, bert_dir, data_file, capsys):
    run = tmp_path / "dense"
    main(["train", "--data", str(data_file), "--model", str(bert_dir), "--method", "lora", "--max-steps", "1",
          "--device", "cpu", "--no-report", "--out", str(run)])
    assert "not a token-selective adapter folder" in fails(["importance", "--adapter", str(run)], capsys)


@pytest.mark.parametrize("extra, message", [
    (["--top-k", "2"], "give both or neither"),
    (["--modules-from", "missing.json", "--top-k", "2"], "argument --modules-from: no such file"),
])
def test_modules_from_flag_errors(extra, message, capsys):
    assert message in fails(["train", "--task", "rotten_tomatoes", "--out", "x", *extra], capsys)
