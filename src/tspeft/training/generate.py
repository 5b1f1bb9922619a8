"""`tspeft generate`: load a saved adapter onto its base model and stream greedy answers.

    generate(GenerateConfig(adapter="runs/asdiv", prompt="Tom has 3 apples and buys 2. How many?\\nAnswer:"))

The base model is the run's (metrics.json `model`), else the one named in the adapter's ts_config.json, or
`model` when given. With `chat`, each prompt becomes one user turn rendered with the tokenizer's chat template
(and the template's generation prompt). With `show_kept` (token-selective adapters), each generated token is
printed on its own line after the share of gated modules that applied their update at the position whose
logits chose it (decoding.KeptShare); otherwise the text streams as it is decoded.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..tasks.decoding import KeptShare, TokenPrinter, greedy_generate
from ..tasks.generation import DEFAULT_MAX_NEW_TOKENS
from .build import load_base
from .run_config import resolve_device
from .run_folder import METRICS, TS_CONFIG, is_token_selective, load_adapter


@dataclass(kw_only=True)
class GenerateConfig:
    adapter: str
    prompt: str | None = None
    prompts: str | None = None  # a text file, one prompt per line (.jsonl: objects with a "prompt" field)
    model: str | None = None
    max_new_tokens: int | None = None
    chat: bool = False
    show_kept: bool = False
    device: str = "auto"

    @classmethod
    def from_namespace(cls, args) -> "GenerateConfig":
        names = cls.__dataclass_fields__
        return cls(**{k: v for k, v in vars(args).items() if k in names})


def read_prompts(cfg: GenerateConfig) -> list[str]:
    """The prompts to answer: `prompt`, or the lines (JSONL: "prompt" fields) of the `prompts` file."""
    if (cfg.prompt is None) == (cfg.prompts is None):
        raise ValueError("give exactly one of --prompt TEXT and --prompts FILE")
    if cfg.prompt is not None:
        return [cfg.prompt]
    path = Path(cfg.prompts)
    if not path.is_file():
        raise ValueError(f"--prompts {path}: no such file")
    lines = [(i, line) for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if line.strip()]
    if path.suffix.lower() != ".jsonl":
        prompts = [line.replace("\\n", "\n") for _, line in lines]  # a literal \n in a line is a line break
    else:
        prompts = []
        for number, line in lines:
            try:
                value = json.loads(line).get("prompt")
            except (json.JSONDecodeError, AttributeError):
                value = None
            if not isinstance(value, str):
                raise ValueError(f"{path}: line {number}: expected a JSON object with a text field 'prompt'")
            prompts.append(value)
    if not prompts:
        raise ValueError(f"--prompts {path}: the file holds no prompt")
    return prompts


def base_model_name(folder: Path, given: str | None) -> str:
    if given:
        return given
    for name, key in ((METRICS, "model"), (TS_CONFIG, "base_model_name_or_path")):
        if (folder / name).is_file():
            value = json.loads((folder / name).read_text()).get(key)
            if value:
                return value
    raise ValueError(f"--adapter {folder}: cannot tell the base model (no metrics.json or ts_config.json); "
                     "pass --model")


def encode_prompt(tokenizer, text: str, chat: bool) -> list[int]:
    if not chat:
        return tokenizer(text)["input_ids"]
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("--chat: this model's tokenizer has no chat template; drop --chat to use the prompt as it is")
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    return tokenizer(rendered, add_special_tokens=False)["input_ids"]


def generate(cfg: GenerateConfig, write: Callable[[str], None]) -> list[list[int]]:
    """Answer every prompt, streaming to `write`; returns the generated token ids per prompt."""
    folder = Path(cfg.adapter)
    if not folder.is_dir():
        raise ValueError(f"--adapter {folder}: no such folder")
    prompts = read_prompts(cfg)
    device = resolve_device(cfg.device)
    base, tokenizer = load_base(base_model_name(folder, cfg.model), "generation", None)
    gated = is_token_selective(folder)
    if cfg.show_kept and not gated:
        raise ValueError(f"--show-kept: {folder} holds no token-selective adapter (no ts_config.json)")
    model = load_adapter(base, folder, "ts-lora" if gated else "lora").to(device).eval()
    answers = []
    for index, text in enumerate(prompts):
        if len(prompts) > 1:
            write(f"### prompt {index + 1}\n")
        ids = encode_prompt(tokenizer, text, cfg.chat)
        kept = KeptShare(model.gates) if cfg.show_kept else None
        streamer = TokenPrinter(tokenizer, write, kept)
        with torch.no_grad(), (kept or contextlib.nullcontext()):
            answers += greedy_generate(model, tokenizer, [ids], cfg.max_new_tokens or DEFAULT_MAX_NEW_TOKENS, device,
                                       streamer=streamer, kept=kept)
    return answers
