"""What ``lorakit plan --model`` names: anything ``lorakit train --model`` takes, a bare config.json,
or a built-in shape of a public model.

A plan needs only the architecture, never the weights, so a folder needs only its config.json and
the built-in shapes let anyone ask "would Llama-2-70B fit?" without downloading it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lorakit.errors import ConfigError

# The published configs of Meta's Llama 2 (the Hugging Face repositories' config.json files): every
# field that sets a tensor's shape, and the dtype their weights are stored in.
_LLAMA_2 = {"vocab_size": 32000, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
            "dtype": "float16", "architectures": ["LlamaForCausalLM"]}
BUILT_IN_SHAPES: dict[str, dict[str, Any]] = {
    "llama-2-7b": {**_LLAMA_2, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "num_key_value_heads": 32},
    "llama-2-13b": {**_LLAMA_2, "hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40,
                    "num_attention_heads": 40, "num_key_value_heads": 40},
    "llama-2-70b": {**_LLAMA_2, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
                    "num_attention_heads": 64, "num_key_value_heads": 8},
}
# Encoder-only families: without a causal-LM architecture named in the config, they default to --task classify.
ENCODERS = frozenset({"bert", "roberta", "distilbert", "deberta", "deberta-v2", "electra", "xlm-roberta", "albert",
                      "mpnet", "camembert"})
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


@dataclass(frozen=True)
class ModelSource:
    """A model's architecture, and what ``lorakit train`` would make of it."""

    name: str
    config: Any  # a transformers PretrainedConfig
    stored_dtype: torch.dtype  # what from_pretrained(dtype="auto") loads: the config's dtype, else float32
    causal_lm: bool  # the task a plan assumes unless --task says otherwise


def model_source(spec: str) -> ModelSource:
    """Read ``spec``'s config, or raise a ConfigError that lists what --model takes."""
    from transformers import AutoConfig, LlamaConfig

    from lorakit import embedded_llm
    from lorakit.embedded import is_default_model
    from lorakit.train.models import random_config, resolve_model_dir

    path = Path(spec)
    if spec.lower() in BUILT_IN_SHAPES and not path.exists():
        config = LlamaConfig(**BUILT_IN_SHAPES[spec.lower()])
    elif spec.startswith("random:"):
        config = random_config(spec)
    elif path.is_file():
        if path.suffix != ".json":
            raise ConfigError(f"--model {spec}: a file must be a model's config.json")
        config = _read_config(AutoConfig, path, spec)
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"--model {spec}: the folder has no config.json")
        config = _read_config(AutoConfig, path, spec)
    elif is_default_model(spec) or embedded_llm.is_embedded_llm(spec):
        config = _read_config(AutoConfig, resolve_model_dir(spec), spec)
    else:
        raise ConfigError(
            f"--model {spec!r} is not a folder, a config.json, 'default', 'smollm2', 'random:<arch>,...' or a "
            f"built-in shape ({', '.join(BUILT_IN_SHAPES)})")
    return ModelSource(spec, config, _stored_dtype(config), _is_causal_lm(config))


def _read_config(auto_config, where: Path, spec: str):
    try:
        return auto_config.from_pretrained(str(where))
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"--model {spec}: cannot read a transformers config from {where}: {exc}") from None


def _stored_dtype(config) -> torch.dtype:
    """The dtype ``from_pretrained`` gives the weights by default (transformers 5: the config's)."""
    given = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(given, torch.dtype):
        return given
    if isinstance(given, str) and given in DTYPES:
        return DTYPES[given]
    return torch.float32


def _is_causal_lm(config) -> bool:
    architectures = getattr(config, "architectures", None) or []
    if architectures:
        return any("CausalLM" in name or "LMHead" in name for name in architectures)
    return config.model_type not in ENCODERS
