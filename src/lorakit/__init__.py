"""lorakit: LoRA and its family on any PyTorch model, in HF PEFT's file format.

Quick start::

    import lorakit
    model = lorakit.adapt(model, lorakit.AdapterConfig(r=8, alpha=16, target_modules=["query", "value"]))
    model.print_trainable_parameters()
    ...train...
    lorakit.save_adapter(model, "out/adapter")
"""

from lorakit.config import AdapterConfig
from lorakit.errors import (
    AdapterFileError,
    AdapterNotFoundError,
    ConfigError,
    FingerprintMismatchError,
    LorakitError,
    TargetNotFoundError,
)
from lorakit.io.adapter_files import load_adapter, read_adapter, save_adapter
from lorakit.model import AdaptedModel, AdapterInfo, adapt
from lorakit.report import module_table, summary_line
from lorakit.training_rules import DeltaLoRA, loraplus_param_groups

__version__ = "0.1.0"

__all__ = [
    "AdaptedModel",
    "AdapterConfig",
    "AdapterFileError",
    "AdapterInfo",
    "AdapterNotFoundError",
    "ConfigError",
    "DeltaLoRA",
    "FingerprintMismatchError",
    "LorakitError",
    "TargetNotFoundError",
    "adapt",
    "load_adapter",
    "loraplus_param_groups",
    "module_table",
    "read_adapter",
    "save_adapter",
    "summary_line",
]
