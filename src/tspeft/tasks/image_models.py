"""Image classifiers: EfficientNet-lite0 from packages, or any transformers image-classification model folder.

    model, preprocessing = load_image_model("efficientnet-lite0", num_labels=10, image_size=64)
    targets = image_target_modules(model)      # its pointwise (1×1) convolutions

Spatial positions are the tokens. A 1×1 convolution maps every position's channel vector on its own,
h_p = W0 x_p, so peft's Conv2d LoRA on it is a per-position update M(x_p) and the gate decides per position:

    feature map (B, C, H, W) ──► 1×1 conv W0 ──────────────► (+) ──► h      S_p = 1(‖M(x_p)‖ / ‖W0 x_p‖ ≥ τ)
                             └─► LoRA/DoRA M (1×1 convs) ──┘ × S_p        norms over channels (dim 1)

Models:
* ``efficientnet-lite0``: EfficientNet-lite0 with ImageNet weights, shipped by two pip packages (the model code,
  which imports torch only, and the .pth weights, read with ``torch.load(weights_only=True)``), wrapped in
  `ImageClassifier`: pooled features → dropout → a new linear head ``classifier``.
* a folder: ``AutoModelForImageClassification`` (ResNet, ConvNeXt, MobileNet, ViT, ...), its head replaced by
  a new one for ``num_labels`` classes.

The backbone is frozen, so its BatchNorm layers always normalise with their stored statistics (in train mode
they would update them, and those statistics are not part of the adapter) and stochastic depth is off.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from transformers.modeling_outputs import ImageClassifierOutputWithNoAttention

from . import resources

EFFICIENTNET_LITE0 = "efficientnet-lite0"
EFFICIENTNET_LITE0_WEIGHTS = "models/efficientnet-lite0-57934424.pth"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
LITE_MEAN, LITE_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)  # (x − 127) / 128, as the TF EfficientNet-lite builder
HEAD_NAMES = ("classifier",)


@dataclass(frozen=True)
class ImagePreprocessing:
    """How images are turned into the model's input: resized to size × size, scaled to [0, 1], (x − mean) / std."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "ImagePreprocessing":
        return cls(int(values["size"]), tuple(values["mean"]), tuple(values["std"]))


class ImageClassifier(nn.Module):
    """A convolutional backbone's feature map, average-pooled, through dropout and a new linear head."""

    def __init__(self, backbone: nn.Module, feature_channels: int, num_labels: int, dropout: float = 0.0):
        super().__init__()
        self.backbone = backbone
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(feature_channels, num_labels)
        self.num_labels = num_labels

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None, **loss_kwargs):
        # loss_kwargs: the Trainer's num_items_in_batch; a per-image mean loss needs no global count
        features = self.backbone.extract_features(pixel_values).mean(dim=(2, 3))
        logits = self.classifier(self.dropout(features))
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return ImageClassifierOutputWithNoAttention(loss=loss, logits=logits)


def _use_running_statistics(module: nn.Module, args) -> None:
    module.training = False  # a frozen BatchNorm: normalise with (and never update) the stored statistics


def freeze_batch_norm(model: nn.Module) -> nn.Module:
    """Make every BatchNorm layer of `model` behave as in eval mode, also while the model trains."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.register_forward_pre_hook(_use_running_statistics)
    return model


def _efficientnet_package():
    """The packaged EfficientNet-lite model code, loaded from the tspeft cache (it imports only torch)."""
    name = "efficientnet_lite_pytorch"
    if name not in sys.modules:
        folder = resources.ensure_package(resources.EFFICIENTNET_LITE.dist, resources.EFFICIENTNET_LITE.version)
        spec = importlib.util.spec_from_file_location(name, folder / "__init__.py",
                                                      submodule_search_locations=[str(folder)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
    return sys.modules[name]


def _plain_pointwise_convolutions(model: nn.Module) -> None:
    """Swap the package's "same"-padding 1×1 convolutions (no padding at all for 1×1) for plain nn.Conv2d with the
    same weights, so peft's Conv2d LoRA builds its own layers from a standard convolution."""
    for name, conv in list(model.named_modules()):
        if (isinstance(conv, nn.Conv2d) and type(conv) is not nn.Conv2d and conv.kernel_size == (1, 1)
                and not isinstance(getattr(conv, "static_padding", None), nn.ZeroPad2d)):
            plain = nn.Conv2d(conv.in_channels, conv.out_channels, 1, stride=conv.stride, groups=conv.groups,
                              bias=conv.bias is not None)
            plain.weight, plain.bias = conv.weight, conv.bias
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, plain)


def load_efficientnet_lite0(num_labels: int, image_size: int = 224) -> tuple[ImageClassifier, ImagePreprocessing]:
    """EfficientNet-lite0 with its ImageNet weights and a new `num_labels`-way head, built for image_size² inputs."""
    package = _efficientnet_package()
    weights_file = resources.package_file(resources.EFFICIENTNET_LITE0, EFFICIENTNET_LITE0_WEIGHTS)
    backbone = package.EfficientNet.from_name(EFFICIENTNET_LITE0, image_size=image_size, drop_connect_rate=0.0)
    state = torch.load(weights_file, map_location="cpu", weights_only=True)
    backbone.load_state_dict(state, strict=True)
    backbone._fc = nn.Identity()  # the ImageNet head is replaced by `classifier`
    _plain_pointwise_convolutions(backbone)
    dropout = float(backbone._global_params.dropout_rate)
    model = ImageClassifier(backbone, backbone._bn1.num_features, num_labels, dropout)
    return freeze_batch_norm(model), ImagePreprocessing(image_size, LITE_MEAN, LITE_STD)


def _folder_preprocessing(folder: Path, config, image_size: int | None) -> ImagePreprocessing:
    values = {}
    if (folder / "preprocessor_config.json").is_file():
        values = json.loads((folder / "preprocessor_config.json").read_text())
    size = values.get("size")
    if isinstance(size, dict):
        size = size.get("height") or size.get("shortest_edge")
    size = image_size or size or getattr(config, "image_size", None) or 224
    mean = tuple(values.get("image_mean") or IMAGENET_MEAN)
    std = tuple(values.get("image_std") or IMAGENET_STD)
    return ImagePreprocessing(int(size), mean, std)


def load_image_model(name_or_path: str, num_labels: int,
                     image_size: int | None = None) -> tuple[nn.Module, ImagePreprocessing]:
    """(model with a new `num_labels`-way head, its preprocessing) for ``efficientnet-lite0`` or a model folder."""
    if num_labels < 2:
        raise ValueError(f"image classification needs at least two classes, got {num_labels}")
    if name_or_path == EFFICIENTNET_LITE0:
        return load_efficientnet_lite0(num_labels, image_size or 224)
    folder = Path(name_or_path)
    if not (folder / "config.json").is_file():
        raise ValueError(f"--model {name_or_path}: not {EFFICIENTNET_LITE0} and not a model folder with a config.json")
    from transformers import AutoConfig, AutoModelForImageClassification

    config = AutoConfig.from_pretrained(folder)
    try:
        model = AutoModelForImageClassification.from_pretrained(folder, num_labels=num_labels,
                                                                ignore_mismatched_sizes=True)
    except ValueError as error:
        raise ValueError(f"--model {name_or_path}: not an image classification model ({error})") from None
    return freeze_batch_norm(model), _folder_preprocessing(folder, config, image_size)


def image_target_modules(model: nn.Module) -> list[str]:
    """The layers to adapt: every pointwise convolution (1×1, not grouped) outside the head; a model without any
    (a vision transformer: patches are the tokens) gets its nn.Linear layers outside the head."""
    outside_head = lambda name: not set(name.split(".")) & set(HEAD_NAMES)  # noqa: E731
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)
             and m.groups == 1 and outside_head(name)]
    if not names:
        names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and outside_head(name)]
    if not names:
        raise ValueError(f"no 1×1 convolution or linear layer to adapt in {type(model).__name__}")
    return names
