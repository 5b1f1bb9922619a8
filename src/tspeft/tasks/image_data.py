"""Image classification examples: Fashion-MNIST (the shipped image task) and users' image folders.

An example is ``{"image": source, "label": int}``; ``source`` is a file path (str) or a uint8 tensor of shape
(H, W) (grayscale) or (H, W, 3) (RGB). `load_pixels` turns a source into a uint8 (3, H, W) tensor (grayscale
expanded to three channels); resizing to the model's input size happens when batches are built
(tasks/image_classification.py).

Users' images, ``--data DIR [--eval-data DIR]``, in the ImageFolder layout::

    DIR/<class name>/<image>.png|.jpg|...      one sub-folder per class (sorted names -> class ids 0, 1, ...)

Hidden files (``.DS_Store``) are skipped; any other non-image file, an empty class folder, an image that does
not decode, fewer than two classes, or eval class folders that differ from the train ones is a one-line error.

Fashion-MNIST comes from Debian's ``dataset-fashion-mnist`` package (``/usr/share/datasets/fashion-mnist``,
installed by scripts/setup.sh; ``$TSPEFT_FASHION_MNIST`` points elsewhere): 60,000 train and 10,000 test
28×28 grayscale images in 10 classes, read from the idx files.
"""

from __future__ import annotations

import gzip
import os
from functools import lru_cache
from pathlib import Path

import torch

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
FASHION_MNIST_LABELS = ("t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker",
                        "bag", "ankle boot")
FASHION_MNIST_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
                       "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
_IDX_MAGIC = {0x00000803: 3, 0x00000801: 1}  # unsigned-byte idx files: images (3 dims), labels (1 dim)

Example = dict


# ----------------------------------------------------------------------------------------------- Fashion-MNIST
def fashion_mnist_folder() -> Path:
    return Path(os.environ.get("TSPEFT_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))


def read_idx(path: Path) -> torch.Tensor:
    """An unsigned-byte idx file (gzip-compressed) as a uint8 tensor; ValueError naming the file if it is not one."""
    try:
        with gzip.open(path, "rb") as handle:
            raw = handle.read()
    except (OSError, EOFError) as error:
        raise ValueError(f"{path}: cannot read this idx.gz file ({error})") from None
    magic = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else None
    if magic not in _IDX_MAGIC:
        raise ValueError(f"{path}: not an unsigned-byte idx file (magic number {magic!r})")
    dims = _IDX_MAGIC[magic]
    shape = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(dims)]
    offset = 4 + 4 * dims
    if len(raw) != offset + torch.Size(shape).numel():
        raise ValueError(f"{path}: {len(raw) - offset} data bytes, but the header promises shape {shape}")
    return torch.frombuffer(bytearray(raw[offset:]), dtype=torch.uint8).reshape(shape)


@lru_cache(maxsize=None)
def fashion_mnist() -> tuple[list[Example], list[Example]]:
    """(train pool of 60,000, eval pool of 10,000) Fashion-MNIST examples; the images are (28, 28) uint8 tensors."""
    folder = fashion_mnist_folder()
    if not folder.is_dir():
        raise ValueError(f"Fashion-MNIST not found at {folder}: install Debian's dataset-fashion-mnist package "
                         "(scripts/setup.sh does: apt-get install -y dataset-fashion-mnist) or set "
                         "$TSPEFT_FASHION_MNIST")
    pools = []
    for split in ("train", "test"):
        images_file, labels_file = (folder / name for name in FASHION_MNIST_FILES[split])
        images, labels = read_idx(images_file), read_idx(labels_file)
        if images.dim() != 3 or labels.dim() != 1 or len(images) != len(labels):
            raise ValueError(f"{folder}: {split} images {tuple(images.shape)} and labels {tuple(labels.shape)} "
                             "do not pair up")
        pools.append([{"image": image, "label": int(label)} for image, label in zip(images, labels)])
    return pools[0], pools[1]


# ----------------------------------------------------------------------------------------------- image folders
def is_image_folder(path: str | os.PathLike | None) -> bool:
    """Whether `path` is a folder (the ImageFolder layout): what makes `--data` an image task."""
    return path is not None and Path(path).is_dir()


def _class_folders(root: Path, flag: str) -> dict[str, list[Path]]:
    """{class name: its image files, sorted}; every check of the layout except decoding."""
    if root.is_file():
        raise ValueError(f"{flag} {root}: is a file; image data is a folder with one sub-folder per class")
    if not root.is_dir():
        raise ValueError(f"{flag} {root}: no such folder")
    classes: dict[str, list[Path]] = {}
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            continue
        if not entry.is_dir():
            raise ValueError(f"{flag} {root}: {entry.name} is not a class folder: put each image in a sub-folder "
                             "named after its class")
        files = [f for f in sorted(entry.rglob("*")) if f.is_file() and not f.name.startswith(".")]
        odd = [f for f in files if f.suffix.lower() not in IMAGE_SUFFIXES]
        if odd:
            raise ValueError(f"{odd[0]}: not an image file (expected one of {', '.join(IMAGE_SUFFIXES)})")
        if not files:
            raise ValueError(f"{flag} {root}: class folder {entry.name!r} holds no images")
        classes[entry.name] = files
    if len(classes) < 2:
        raise ValueError(f"{flag} {root}: found {len(classes)} class folder(s) {sorted(classes)}; image "
                         "classification needs at least two (one sub-folder per class)")
    return classes


def read_image_folder(root: str | os.PathLike, label_names: list[str] | None = None,
                      flag: str = "--data") -> tuple[list[Example], list[str]]:
    """(examples, class names) of one folder; with `label_names` its class folders must be exactly those."""
    root = Path(root)
    classes = _class_folders(root, flag)
    names = sorted(classes)
    if label_names is not None and names != list(label_names):
        only_here = sorted(set(names) - set(label_names))
        missing = sorted(set(label_names) - set(names))
        raise ValueError(f"{flag} {root}: its class folders differ from the training classes "
                         f"(only here: {only_here}; missing here: {missing})")
    examples = [{"image": str(path), "label": names.index(name)} for name, files in classes.items() for path in files]
    return examples, names


def verify_images(examples: list[Example]) -> None:
    """Check every file-backed image's header and structure without decoding it (Pillow's verify), so a file
    that is no image fails before training, with its name. A file broken further in fails when its batch is
    built, also with its name (`load_pixels`)."""
    from PIL import Image, UnidentifiedImageError

    for example in examples:
        if isinstance(example["image"], str):
            try:
                with Image.open(example["image"]) as image:
                    image.verify()
            except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as error:
                raise ValueError(f"{example['image']}: cannot read this image ({error})") from None


def load_pixels(source: str | torch.Tensor) -> torch.Tensor:
    """A uint8 (3, H, W) tensor from a file or a (H, W) / (H, W, 3) tensor; grayscale becomes three equal channels."""
    if isinstance(source, torch.Tensor):
        pixels = source if source.dim() == 3 else source.unsqueeze(-1)
        return pixels.permute(2, 0, 1).expand(3, -1, -1)
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(source) as image:
            image.load()
            grayscale = image.mode in ("1", "L", "LA", "I", "I;16", "F")
            image = image.convert("L" if grayscale else "RGB")
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as error:
        raise ValueError(f"{source}: cannot read this image ({error})") from None
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).reshape(image.height, image.width, -1)
    return pixels.permute(2, 0, 1).expand(3, -1, -1)
