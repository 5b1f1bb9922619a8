"""Image data: ImageFolder layout and its one-line errors, Fashion-MNIST idx files, batches, overlays."""

from __future__ import annotations

import gzip
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from tspeft.analysis.overlays import plot_position_overlay, upsample_mask
from tspeft.tasks import image_data
from tspeft.tasks.image_classification import ImageCollator, png_base64, resized_pixels
from tspeft.tasks.image_data import load_pixels, read_idx, read_image_folder, verify_images
from tspeft.tasks.image_models import ImagePreprocessing


def make_image_folder(root, classes=("cat", "dog"), per_class=3, sizes=((9, 7), (5, 5)), modes=("RGB", "L")):
    """Tiny PNG/JPEG images of varying size and mode, one sub-folder per class."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            width, height = sizes[i % len(sizes)]
            mode = modes[i % len(modes)]
            shape = (height, width, 3) if mode == "RGB" else (height, width)
            pixels = rng.integers(0, 256, shape, dtype=np.uint8)
            suffix = ".jpg" if i == 2 else ".png"
            Image.fromarray(pixels, mode).save(root / name / f"{i}{suffix}")
    return root


def test_folder_classes_are_sorted_names_and_every_image_is_read(tmp_path):
    root = make_image_folder(tmp_path / "train", classes=("zebra", "ant", "moth"))
    (root / ".DS_Store").write_text("x")
    examples, names = read_image_folder(root)
    assert names == ["ant", "moth", "zebra"]
    assert len(examples) == 9 and {e["label"] for e in examples} == {0, 1, 2}
    assert all(e["image"].endswith((".png", ".jpg")) for e in examples)
    verify_images(examples)


def test_grayscale_is_expanded_and_any_size_is_resized(tmp_path):
    Image.fromarray(np.full((4, 6), 200, np.uint8), "L").save(tmp_path / "g.png")
    pixels = load_pixels(str(tmp_path / "g.png"))
    assert pixels.shape == (3, 4, 6) and pixels.dtype == torch.uint8 and (pixels == 200).all()
    batch = resized_pixels([{"image": str(tmp_path / "g.png")}, {"image": torch.zeros(28, 28, dtype=torch.uint8)}], 16)
    assert batch.shape == (2, 3, 16, 16) and (batch[0] == 200).all() and (batch[1] == 0).all()
    collated = ImageCollator(ImagePreprocessing(8, (0.5,) * 3, (0.5,) * 3))(
        [{"image": torch.full((5, 5), 255, dtype=torch.uint8), "label": 1}])
    assert collated["pixel_values"].shape == (1, 3, 8, 8) and torch.allclose(collated["pixel_values"], torch.ones(1))
    assert collated["labels"].tolist() == [1]


def test_empty_class_folder_is_named(tmp_path):
    root = make_image_folder(tmp_path / "d")
    (root / "bird").mkdir()
    with pytest.raises(ValueError, match=r"class folder 'bird' holds no images"):
        read_image_folder(root)


def test_unreadable_image_names_the_file(tmp_path):
    root = make_image_folder(tmp_path / "d")
    (root / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    examples, _ = read_image_folder(root)
    with pytest.raises(ValueError, match=r"broken\.png: cannot read this image"):
        verify_images(examples)
    whole = (root / "dog" / "0.png").read_bytes()
    (root / "dog" / "cut.png").write_bytes(whole[:len(whole) // 2])  # header fine, pixel data cut short
    with pytest.raises(ValueError, match=r"cut\.png: cannot read this image"):
        resized_pixels([{"image": str(root / "dog" / "cut.png")}], 8)


def test_train_and_eval_classes_must_match(tmp_path):
    make_image_folder(tmp_path / "train", classes=("cat", "dog"))
    make_image_folder(tmp_path / "eval", classes=("cat", "emu"))
    _, names = read_image_folder(tmp_path / "train")
    with pytest.raises(ValueError, match=r"--eval-data .*differ.*only here: \['emu'\]; missing here: \['dog'\]"):
        read_image_folder(tmp_path / "eval", names, flag="--eval-data")


def test_fewer_than_two_classes(tmp_path):
    make_image_folder(tmp_path / "one", classes=("cat",))
    with pytest.raises(ValueError, match=r"found 1 class folder.*at least two"):
        read_image_folder(tmp_path / "one")
    (tmp_path / "none").mkdir()
    with pytest.raises(ValueError, match=r"found 0 class folder"):
        read_image_folder(tmp_path / "none")


@pytest.mark.parametrize("bad", ["loose_image", "text_file", "missing", "a_file"])
def test_other_layout_errors_are_one_line(tmp_path, bad):
    root = make_image_folder(tmp_path / "d")
    if bad == "loose_image":
        Image.fromarray(np.zeros((3, 3), np.uint8), "L").save(root / "stray.png")
        match = r"stray\.png is not a class folder"
    elif bad == "text_file":
        (root / "dog" / "notes.txt").write_text("hello")
        match = r"notes\.txt: not an image file"
    elif bad == "missing":
        root = tmp_path / "nowhere"
        match = r"nowhere: no such folder"
    else:
        root = root / "dog" / "0.png"
        match = r"0\.png: is a file; image data is a folder"
    with pytest.raises(ValueError, match=match) as info:
        read_image_folder(root)
    assert "\n" not in str(info.value)


def write_idx(path, array: np.ndarray, magic: int) -> None:
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def use_generated_fashion_mnist(folder, monkeypatch, n_train: int, n_test: int, seed: int) -> None:
    """Random 28×28 images with labels 0, 1, 2, ... in Fashion-MNIST's idx files, read from `folder`."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        images_file, labels_file = image_data.FASHION_MNIST_FILES[split]
        write_idx(folder / images_file, rng.integers(0, 256, (n, 28, 28)), 0x803)
        write_idx(folder / labels_file, np.arange(n) % 10, 0x801)
    monkeypatch.setenv("TSPEFT_FASHION_MNIST", str(folder))
    image_data.fashion_mnist.cache_clear()


def test_fashion_mnist_reader_on_generated_idx_files(tmp_path, monkeypatch):
    use_generated_fashion_mnist(tmp_path, monkeypatch, n_train=6, n_test=4, seed=1)
    try:
        train, evaluation = image_data.fashion_mnist()
    finally:
        image_data.fashion_mnist.cache_clear()
    assert len(train) == 6 and len(evaluation) == 4
    assert train[0]["image"].shape == (28, 28) and [e["label"] for e in evaluation] == [0, 1, 2, 3]
    write_idx(tmp_path / "bad.gz", np.zeros((2, 2)), 0x999)
    with pytest.raises(ValueError, match=r"bad\.gz: not an unsigned-byte idx file"):
        read_idx(tmp_path / "bad.gz")


def test_missing_fashion_mnist_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("TSPEFT_FASHION_MNIST", str(tmp_path / "absent"))
    image_data.fashion_mnist.cache_clear()
    with pytest.raises(ValueError, match=r"apt-get install -y dataset-fashion-mnist"):
        image_data.fashion_mnist()
    image_data.fashion_mnist.cache_clear()


def test_mask_upsampling_and_overlay_figure(tmp_path):
    up = upsample_mask([[1, 0], [0, 1]], 4, 6)
    assert up.shape == (4, 6) and up[0, :3].all() and not up[0, 3:].any() and up[3, 3:].all()
    pixels = torch.randint(0, 256, (3, 8, 8), dtype=torch.uint8)
    example = {"label": 0, "prediction": 1, "image_png": png_base64(pixels),
               "masks": {"backbone._blocks.0._project_conv": [[1, 0], [0, 0]], "head": [[1]]}}
    path = plot_position_overlay(example, tmp_path / "o.png", "test", ["a", "b"])
    assert path.stat().st_size > 1000
    assert json.loads(json.dumps(example)) == example and math.isfinite(up.mean())
