"""Building the model to train: a local HF folder, the embedded default, or a random architecture.

``random:<arch>,key=value,...`` builds a transformers architecture from its config with random
weights (for benchmarks and tests: speed does not depend on weight values). Architectures:
llama, gpt2, bert. Keys are the config's own (hidden_size, num_hidden_layers, ...) with short
aliases: hidden, layers, heads, vocab, intermediate.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.errors import ConfigError

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
ALIASES = {"hidden": "hidden_size", "layers": "num_hidden_layers", "heads": "num_attention_heads",
           "vocab": "vocab_size", "intermediate": "intermediate_size", "kv_heads": "num_key_value_heads"}
RANDOM_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
              "intermediate_size": 128, "vocab_size": 512, "max_position_embeddings": 2048},
    "gpt2": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 512,
             "n_positions": 2048},
    "bert": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128,
             "vocab_size": 512},
}


def resolve_model_dir(spec: str) -> Path | None:
    """The folder of a model spec, or None for a random architecture. Checks weights exist.

    ``default`` is the embedded MiniLM and ``smollm2`` the embedded LLM, and so are their hub
    names (what adapters trained on them record as their base) unless a folder of that name exists.
    """
    from lorakit import embedded_llm
    from lorakit.embedded import default_model_dir, is_default_model

    if spec.startswith("random:"):
        return None
    folder = Path(spec)
    if is_default_model(spec) and not folder.is_dir():
        return default_model_dir()
    if embedded_llm.is_embedded_llm(spec) and not folder.is_dir():
        return embedded_llm.model_dir()
    if not folder.is_dir():
        raise ConfigError(f"model {spec!r} is neither a folder, 'default', 'smollm2', nor 'random:<arch>'")
    if not (folder / "config.json").is_file():
        raise ConfigError(f"model folder {folder} has no config.json")
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        raise ConfigError(f"model folder {folder} has no weights (looked for {', '.join(WEIGHT_FILES)})")
    return folder


def loads_offline(spec: str) -> bool:
    """Whether :func:`resolve_model_dir` can find ``spec`` on this machine: a random architecture,
    an embedded model (by its short or hub name) with its package installed, or a folder."""
    from lorakit import embedded_llm
    from lorakit.embedded import is_default_model, model_installed

    if spec.startswith("random:") or Path(spec).is_dir():
        return True
    return (is_default_model(spec) and model_installed()) or (embedded_llm.is_embedded_llm(spec)
                                                              and embedded_llm.installed())


def name_for_files(spec: str) -> str | None:
    """What an adapter records as ``base_model_name_or_path`` for the base ``spec``.

    PEFT users load the base by that name, so it must mean something outside lorakit: the
    embedded model's hub name for ``default``, the folder as the user gave it for a real model
    (relative stays relative, as with ``from_pretrained``), None for a random architecture,
    which no one can load by name.
    """
    from lorakit import embedded_llm
    from lorakit.embedded import MODEL_NAME, is_default_model

    if spec.startswith("random:"):
        return None
    if is_default_model(spec) and not Path(spec).is_dir():
        return MODEL_NAME
    if embedded_llm.is_embedded_llm(spec) and not Path(spec).is_dir():
        return embedded_llm.HUB_NAME
    return spec


def random_config(spec: str):
    """A transformers config from ``random:<arch>,key=value,...``."""
    from transformers import AutoConfig

    body = spec[len("random:"):]
    arch, *pairs = [p.strip() for p in body.split(",") if p.strip()]
    if arch not in RANDOM_DEFAULTS:
        raise ConfigError(f"unknown random architecture {arch!r}; choose one of {', '.join(RANDOM_DEFAULTS)}")
    values = dict(RANDOM_DEFAULTS[arch])
    for pair in pairs:
        key, _, value = pair.partition("=")
        key = ALIASES.get(key, key)
        values[key] = _number(value)
    if arch == "gpt2":
        values["n_embd"] = values.pop("hidden_size")
        values["n_layer"] = values.pop("num_hidden_layers")
        values["n_head"] = values.pop("num_attention_heads")
        values.setdefault("bos_token_id", 0)
        values.setdefault("eos_token_id", 0)
    return AutoConfig.for_model(arch, **values)


def _number(text: str) -> int | float | str:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def load_model(spec: str, task: str, num_labels: int | None = None, seed: int = 0,
               shapes_only: bool = False) -> nn.Module:
    """The base model for ``task``; random weights come from ``seed``. ``shapes_only``: built on
    the meta device from its config, no weights read (a sharded run's other ranks, whose values
    come from rank 0)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    folder = resolve_model_dir(spec)
    torch.manual_seed(seed)
    if shapes_only:
        from transformers import AutoConfig

        config = random_config(spec) if folder is None else AutoConfig.from_pretrained(folder)
        if task == "classify":
            config.num_labels = num_labels
        with torch.device("meta"):
            auto = AutoModelForSequenceClassification if task == "classify" else AutoModelForCausalLM
            return auto.from_config(config)
    if task == "classify":
        if folder is None:
            config = random_config(spec)
            config.num_labels = num_labels
            return AutoModelForSequenceClassification.from_config(config)
        return AutoModelForSequenceClassification.from_pretrained(folder, num_labels=num_labels)
    if folder is None:
        return AutoModelForCausalLM.from_config(random_config(spec))
    return AutoModelForCausalLM.from_pretrained(folder)


def load_tokenizer(spec: str):
    """The model folder's tokenizer; random architectures get a byte-level stand-in."""
    from transformers import AutoTokenizer

    folder = resolve_model_dir(spec)
    if folder is not None:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    else:
        tokenizer = ByteTokenizer(int(random_config(spec).vocab_size))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


class ByteTokenizer:
    """UTF-8 bytes as tokens (ids 3..258), for random models that have no tokenizer of their own."""

    pad_token_id, eos_token_id, bos_token_id = 0, 1, 2
    pad_token, eos_token = "<pad>", "</s>"
    chat_template = None
    padding_side = "right"

    def __init__(self, vocab_size: int) -> None:
        if vocab_size < 259:
            raise ConfigError(f"random models need a vocabulary of at least 259 for byte tokens, got {vocab_size}")
        self.vocab_size = vocab_size

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [b + 3 for b in text.encode("utf-8")]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return bytes(i - 3 for i in ids if 3 <= i < 259).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages: list[dict], tokenize: bool = False, add_generation_prompt: bool = False,
                            chat_template: str | None = None) -> str:
        """A --chat-template given to a random model, rendered with the variables transformers passes."""
        import jinja2

        template = chat_template or self.chat_template
        if not template:
            raise ConfigError("this byte tokenizer has no chat template; give one with --chat-template")
        environment = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
        return environment.from_string(template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, bos_token="", eos_token="")

    def save_pretrained(self, directory: str | Path) -> None:
        """Nothing to save: a byte tokenizer is fully described by its class."""
