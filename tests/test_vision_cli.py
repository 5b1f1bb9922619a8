"""`tspeft train/eval/report` on image folders and Fashion-MNIST, with a tiny random transformers ResNet."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import ResNetConfig, ResNetForImageClassification

from test_vision_data import make_image_folder, use_generated_fashion_mnist
from tspeft.cli.main import main
from tspeft.tasks import image_data

FAST = ["--image-size", "16", "--batch-size", "4", "--device", "cpu", "--no-report"]


@pytest.fixture
def resnet_dir(tmp_path):
    """A random 2-stage bottleneck ResNet (1×1 convolutions in every block) saved as a model folder."""
    torch.manual_seed(0)
    config = ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                          layer_type="bottleneck", num_labels=2)
    ResNetForImageClassification(config).save_pretrained(tmp_path / "resnet")
    return tmp_path / "resnet"


@pytest.fixture
def folders(tmp_path):
    return (make_image_folder(tmp_path / "train", per_class=6, classes=("ant", "bee", "cow")),
            make_image_folder(tmp_path / "eval", per_class=2, classes=("ant", "bee", "cow")))


def fails(argv, capsys) -> str:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]  # the error itself is one line (after any usage)


def test_image_folder_train_eval_report(tmp_path, resnet_dir, folders, capsys):
    train_dir, eval_dir = folders
    out = tmp_path / "run"
    assert main(["train", "--data", str(train_dir), "--eval-data", str(eval_dir), "--model", str(resnet_dir),
                 "--method", "ts-lora", "--max-steps", "3", "--warmup-steps", "1", "--target-kept", "0.5",
                 "--out", str(out), *FAST]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task_kind"] == "image" and metrics["label_names"] == ["ant", "bee", "cow"]
    assert metrics["image_size"] == 16 and metrics["n_train"] == 18 and metrics["n_eval"] == 6
    assert all("convolution" in name for name in metrics["per_module"])
    masks = json.loads((out / "position_masks.json").read_text())
    assert len(masks["examples"]) == 4 and not (out / "token_masks.json").exists()
    first = masks["examples"][0]["masks"]
    assert {len(m) for m in first.values()} <= {8, 4, 2}  # feature maps of a 16×16 input: 8×8 and coarser
    capsys.readouterr()
    assert main(["eval", "--adapter", str(out)]) == 0
    assert "accuracy" in capsys.readouterr().out
    assert main(["report", str(out)]) == 0
    html = (out / "report.html").read_text()
    assert "Which positions each layer updated" in html and "Which tokens each layer updated" not in html


@pytest.mark.parametrize("method", ["ts-dora", "ts-adapter", "adapter"])
def test_eval_reproduces_the_training_accuracy(tmp_path, resnet_dir, folders, method):
    from tspeft.training.evaluate import evaluate
    from tspeft.training.run_config import EvalConfig

    train_dir, eval_dir = folders
    out = tmp_path / "run"
    assert main(["train", "--data", str(train_dir), "--eval-data", str(eval_dir), "--model", str(resnet_dir),
                 "--method", method, "--max-steps", "2", "--warmup-steps", "0", "--out", str(out), *FAST]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    again = evaluate(EvalConfig(adapter=str(out)))
    assert again["accuracy"] == metrics["accuracy"] and again["kept_fraction"] == metrics["kept_fraction"]
    other = evaluate(EvalConfig(adapter=str(out), data=str(train_dir)))  # another folder with the same classes
    assert other["n_eval"] == 18


def test_explicit_kind_and_linear_probe(tmp_path, resnet_dir, folders):
    train_dir, _ = folders
    out = tmp_path / "probe"
    assert main(["train", "--data", str(train_dir), "--task-kind", "image", "--model", str(resnet_dir),
                 "--method", "none", "--max-steps", "2", "--n-eval", "6", "--out", str(out), *FAST]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["linear_probe"] and metrics["kept_fraction"] is None
    assert metrics["trainable_params"] == 16 * 3 + 3  # the new head only
    assert metrics["n_eval"] == 6 and metrics["n_train"] == 12  # one folder, split


def test_fashion_mnist_task_on_generated_files(tmp_path, resnet_dir, monkeypatch):
    use_generated_fashion_mnist(tmp_path, monkeypatch, n_train=20, n_test=10, seed=0)
    out = tmp_path / "fm"
    try:
        assert main(["train", "--task", "fashion_mnist", "--model", str(resnet_dir), "--method", "lora",
                     "--max-steps", "2", "--n-train", "8", "--n-eval", "5", "--out", str(out), *FAST]) == 0
    finally:
        image_data.fashion_mnist.cache_clear()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_labels"] == 10 and metrics["label_names"][0] == "t-shirt/top" and metrics["n_eval"] == 5


@pytest.mark.parametrize("bad, message", [
    ("empty_class", "class folder 'dog' holds no images"),
    ("unreadable", "broken.png: cannot read this image"),
    ("one_class", "found 1 class folder"),
    ("classes_differ", "--eval-data"),
    ("column_flag", "argument --label-column: column flags apply to .jsonl/.csv files"),
    ("image_size_on_text", "--image-size applies to image runs"),
])
def test_bad_image_inputs_give_one_line_errors(tmp_path, resnet_dir, bad, message, capsys):
    train_dir = make_image_folder(tmp_path / "train")
    eval_dir = make_image_folder(tmp_path / "eval")
    extra = []
    if bad == "empty_class":
        for image in (train_dir / "dog").iterdir():
            image.unlink()
    elif bad == "unreadable":
        (train_dir / "cat" / "broken.png").write_bytes(b"not an image")
    elif bad == "one_class":
        train_dir = make_image_folder(tmp_path / "single", classes=("cat",))
    elif bad == "classes_differ":
        eval_dir = make_image_folder(tmp_path / "other", classes=("cat", "emu"))
    elif bad == "column_flag":
        extra = ["--label-column", "y"]
    if bad == "image_size_on_text":
        from test_training import write_classification

        text = write_classification(tmp_path / "t.jsonl", n=20)
        argv = ["train", "--data", str(text), "--image-size", "16", "--method", "lora", "--out", str(tmp_path / "r")]
    else:
        argv = ["train", "--data", str(train_dir), "--eval-data", str(eval_dir), "--model", str(resnet_dir),
                "--max-steps", "1", "--out", str(tmp_path / "r"), *FAST, *extra]
    assert message in fails(argv, capsys)
