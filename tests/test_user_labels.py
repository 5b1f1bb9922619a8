"""Labels are part of the model: saved with the run, eval files mapped through them by value, bad label sets refused.

Issue #14 cases: 1 (eval remapped labels silently), 4 (one class trained a regression head), eval-only labels
(untrained classes), integer labels {0, 5} (a 6-class head).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cli_helpers import fails_in_one_line, run_cli, sentiment_rows, tiny_bert_folder, tiny_train_flags, write_jsonl
from tspeft.tasks.data import load_file, load_user_data
from tspeft.tasks.labels import LabelSet


# ----------------------------------------------------------------------------------------------- tasks level
def test_label_set_maps_by_value_and_refuses_unknown_or_mistyped_labels():
    strings = LabelSet.of(["rotten", "fresh", "fresh"])
    assert strings.values == ("fresh", "rotten") and strings.id_of("rotten", "f: line 1") == 1
    with pytest.raises(ValueError, match=r"f: line 3: label 0 is a number, but the model's labels are names"):
        strings.id_of(0, "f: line 3")
    with pytest.raises(ValueError, match=r"f: line 2: label 'meh' is not one of the model's labels"):
        strings.id_of("meh", "f: line 2")
    numbers = LabelSet.of([0, 5, 5])
    assert numbers.values == (0, 5) and numbers.id_of(5, "x") == 1  # by value: two classes, not six
    with pytest.raises(ValueError, match="label 'pos' is a name, but the model's labels are numbers"):
        numbers.id_of("pos", "x")
    with pytest.raises(ValueError, match="label 3 is not one of the model's labels"):
        numbers.id_of(3, "x")
    task = LabelSet.for_task(["rotten", "fresh"])  # a shipped task: ids 0, 1 with names
    assert task.id_of(1, "x") == 1 and task.id_of("rotten", "x") == 0
    assert LabelSet.from_json(json.loads(json.dumps(numbers.to_json()))) == numbers
    with pytest.raises(ValueError, match="mix integers"):
        LabelSet.of([1, "pos"])


def test_training_labels_are_the_classes_trained_on(tmp_path):
    ints = write_jsonl(tmp_path / "ints.jsonl", [{"text": f"t{i}", "label": [0, 5][i % 2]} for i in range(20)])
    data = load_user_data(ints)
    assert data.labels.values == (0, 5) and data.num_labels == 2
    assert {ex["label"] for ex in data.train + data.eval} == {0, 1}

    one = write_jsonl(tmp_path / "one.jsonl", [{"text": f"t{i}", "label": "pos"} for i in range(20)])
    with pytest.raises(ValueError, match=r"one\.jsonl: the training examples hold one class \('pos'\)"):
        load_user_data(one)

    train = write_jsonl(tmp_path / "train.jsonl", sentiment_rows(20))
    extra = write_jsonl(tmp_path / "eval.jsonl", [{"text": "x", "label": "pos"}, {"text": "y", "label": "eel"}])
    with pytest.raises(ValueError, match=r"eval\.jsonl: line 2: label 'eel' is not one of the model's labels"):
        load_user_data(train, extra)

    trained = load_user_data(train).labels
    examples, _ = load_file(write_jsonl(tmp_path / "e.jsonl", [{"text": "z", "label": "pos"}]), labels=trained)
    assert examples[0]["label"] == 1
    with pytest.raises(ValueError, match=r"zero\.jsonl: line 1: label 0 is a number"):
        load_file(write_jsonl(tmp_path / "zero.jsonl", [{"text": "z", "label": 0}]), labels=trained)


# -------------------------------------------------------------------------------------------------- the CLI
@pytest.fixture(scope="module")
def string_run(tmp_path_factory):
    """A finished lora run trained on the labels 'fresh' / 'rotten' (ids by sorted name: fresh 0, rotten 1)."""
    root = tmp_path_factory.mktemp("labels")
    model_dir = tiny_bert_folder(root / "bert")
    data = write_jsonl(root / "train.jsonl", sentiment_rows(32, labels=("fresh", "rotten")))
    main_args = ["train", "--data", data, "--method", "lora", "--max-steps", "1", *tiny_train_flags(model_dir),
                 "--out", root / "run"]
    from tspeft.cli.main import main

    assert main([str(a) for a in main_args]) == 0
    return root, model_dir


def test_labels_are_saved_with_the_run(string_run):
    root, _ = string_run
    saved = json.loads((root / "run" / "labels.json").read_text())
    assert saved["values"] == ["fresh", "rotten"] and saved["names"] == ["fresh", "rotten"]


def test_case1_eval_on_integer_labels_of_a_string_label_run_is_refused(string_run, capsys, tmp_path):
    root, _ = string_run
    zero_one = write_jsonl(tmp_path / "01.jsonl", [{"text": "the film was good", "label": i % 2} for i in range(6)])
    line = fails_in_one_line(["eval", "--adapter", root / "run", "--data", zero_one, "--device", "cpu"], capsys)
    assert "01.jsonl: line 1: label 0 is a number, but the model's labels are names ('fresh', 'rotten')" in line


def test_eval_maps_labels_by_value_whatever_their_order_in_the_file(string_run, capsys, tmp_path):
    """A file holding one class must score that class: accuracy on both = mean of the one-class accuracies."""
    root, _ = string_run
    from tspeft.training.evaluate import evaluate
    from tspeft.training.run_config import EvalConfig

    rows = sentiment_rows(8, labels=("fresh", "rotten"))
    files = {name: write_jsonl(tmp_path / f"{name}.jsonl", chosen) for name, chosen in (
        ("both", rows), ("fresh", [r for r in rows if r["label"] == "fresh"]),
        ("rotten", [r for r in reversed(rows) if r["label"] == "rotten"]))}
    accuracy = {name: evaluate(EvalConfig(adapter=str(root / "run"), data=path, device="cpu"))["accuracy"]
                for name, path in files.items()}
    assert accuracy["both"] == pytest.approx((accuracy["fresh"] + accuracy["rotten"]) / 2)
    code, out, _ = run_cli(["eval", "--adapter", root / "run", "--data", files["rotten"], "--device", "cpu"], capsys)
    assert code == 0 and f"{accuracy['rotten']:.4f}" in out


def test_eval_refuses_a_label_the_model_never_saw(string_run, capsys, tmp_path):
    root, _ = string_run
    unknown = write_jsonl(tmp_path / "u.jsonl", [{"text": "a", "label": "fresh"}, {"text": "b", "label": "meh"}])
    line = fails_in_one_line(["eval", "--adapter", root / "run", "--data", unknown, "--device", "cpu"], capsys)
    assert "u.jsonl: line 2: label 'meh' is not one of the model's labels ('fresh', 'rotten')" in line


def test_case4_one_class_is_refused_and_leaves_no_run_folder(string_run, capsys, tmp_path):
    _, model_dir = string_run
    one = write_jsonl(tmp_path / "one.jsonl", [{"text": f"text {i}", "label": "pos"} for i in range(20)])
    out = tmp_path / "run"
    line = fails_in_one_line(["train", "--data", one, "--method", "lora", *tiny_train_flags(model_dir), "--out", out],
                             capsys)
    assert "the training examples hold one class ('pos'); a classifier needs at least two" in line
    assert not out.exists() and not list(tmp_path.glob(".run*"))


def test_eval_only_labels_are_refused_at_training(string_run, capsys, tmp_path):
    _, model_dir = string_run
    train = write_jsonl(tmp_path / "train.jsonl", sentiment_rows(16))
    extra = write_jsonl(tmp_path / "eval.jsonl", [{"text": "x", "label": "pos"}, {"text": "y", "label": "eel"}])
    line = fails_in_one_line(["train", "--data", train, "--eval-data", extra, "--method", "lora",
                              *tiny_train_flags(model_dir), "--out", tmp_path / "run"], capsys)
    assert "eval.jsonl: line 2: label 'eel' is not one of the model's labels ('neg', 'pos')" in line
    assert not (tmp_path / "run").exists()


def test_integer_labels_with_gaps_train_one_output_per_class(string_run, tmp_path):
    _, model_dir = string_run
    from tspeft.cli.main import main

    rows = [{"text": f"word {i % 2} {i}", "label": [0, 5][i % 2]} for i in range(24)]
    data = write_jsonl(tmp_path / "gaps.jsonl", rows)
    out = tmp_path / "run"
    assert main(["train", "--data", data, "--method", "lora", "--max-steps", "1", *tiny_train_flags(model_dir),
                 "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_labels"] == 2
    assert json.loads((out / "labels.json").read_text())["values"] == [0, 5]
    # an eval file with only the label 5 maps to id 1 (by value), and is scored against that class
    from tspeft.training.evaluate import evaluate
    from tspeft.training.run_config import EvalConfig

    fives = write_jsonl(tmp_path / "fives.jsonl", [{"text": "word 1 x", "label": 5}] * 4)
    assert evaluate(EvalConfig(adapter=str(out), data=fives, device="cpu"))["n_eval"] == 4
    assert Path(out / "labels.json").is_file()
