"""Adapter folders: safetensors + JSON, written atomically, verified on load, never unpickled.

Layout of a saved folder:
    ts_config.json                     manifest, written last (one atomic rename commits the save):
                                       both configs, the weights file's name and SHA-256
    ts_adapter-<sha12>.safetensors     adapter weights (peft's keys) + τ and τ-rule state
    adapter_config.json                a stub whose peft_type makes plain peft fail loudly instead of
                                       silently loading an ungated adapter

A save killed midway leaves the previous manifest and the weights it names in place; files that no
manifest names are removed only after the new manifest is committed.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

MANIFEST = "ts_config.json"
FORMAT_VERSION = 1
PEFT_STUB = {
    "peft_type": "TSPEFT_TOKEN_SELECTIVE: this folder holds a token-selective adapter; plain peft would load it "
                 "without its token gate. Load it with tspeft.TSPeftModel.from_pretrained(base_model, folder)."
}


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call write(temporary path) in path's folder, fsync, then rename over `path`: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_adapter_folder(folder: str | os.PathLike, tensors: dict[str, torch.Tensor],
                         manifest: dict[str, Any]) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    staging = folder / ".ts_adapter.staging.safetensors"
    atomic_write(staging, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    sha = _sha256(staging)
    weights_name = f"ts_adapter-{sha[:12]}.safetensors"
    os.replace(staging, folder / weights_name)
    manifest = {**manifest, "format_version": FORMAT_VERSION, "weights_file": weights_name, "weights_sha256": sha}
    atomic_write(folder / "adapter_config.json", lambda tmp: Path(tmp).write_text(json.dumps(PEFT_STUB, indent=2)))
    atomic_write(folder / MANIFEST,
                 lambda tmp: Path(tmp).write_text(json.dumps(manifest, indent=2, default=_jsonable)))
    _fsync_dir(folder)
    for stale in folder.glob("ts_adapter-*.safetensors"):
        if stale.name != weights_name:
            stale.unlink()


def read_adapter_folder(folder: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    folder = Path(folder)
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        plain_peft = (folder / "adapter_model.safetensors").exists()
        hint = " (it looks like a plain peft adapter: load it with peft)" if plain_peft else ""
        raise ValueError(f"{folder} is not a tspeft adapter folder: {MANIFEST} is missing{hint}")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{manifest_path} is corrupt (not valid JSON: {error})") from None
    required = ("format_version", "weights_file", "weights_sha256", "base_method", "ts_config", "peft_config",
                "gated_modules")
    if not isinstance(manifest, dict) or any(key not in manifest for key in required):
        missing = [k for k in required if not isinstance(manifest, dict) or k not in manifest]
        raise ValueError(f"{manifest_path} is corrupt: not a tspeft manifest (missing {missing})")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{manifest_path}: format_version {manifest.get('format_version')!r} is not supported "
                         f"(this tspeft reads version {FORMAT_VERSION})")
    weights_path = folder / manifest["weights_file"]
    if not weights_path.is_file():
        raise ValueError(f"{folder}: the weights file {manifest['weights_file']} named by {MANIFEST} is missing")
    if _sha256(weights_path) != manifest["weights_sha256"]:
        raise ValueError(f"{weights_path} is corrupt or truncated: its SHA-256 does not match {MANIFEST}")
    try:
        tensors = load_file(weights_path)
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{weights_path} could not be read as safetensors: {error}") from None
    return manifest, tensors


def _jsonable(value: Any) -> Any:
    if isinstance(value, (set, frozenset, tuple)):
        return sorted(value) if isinstance(value, (set, frozenset)) else list(value)
    if hasattr(value, "value"):  # enums such as peft's PeftType / TaskType
        return value.value
    raise TypeError(f"cannot store {type(value).__name__} in {MANIFEST}")
