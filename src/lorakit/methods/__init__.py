"""The registry of adapter methods: adding a method is one file and one line here."""

from __future__ import annotations

from lorakit.methods.base import AdapterMethod
from lorakit.methods.dora import DoRA
from lorakit.methods.lora import LoRA, LoRAFA
from lorakit.methods.vera import VeRA, VeraProjections

METHODS: dict[str, type[AdapterMethod]] = {
    "lora": LoRA,
    "lora-fa": LoRAFA,
    "dora": DoRA,
    "vera": VeRA,
}

__all__ = ["METHODS", "AdapterMethod", "DoRA", "LoRA", "LoRAFA", "VeRA", "VeraProjections"]
