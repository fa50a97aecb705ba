"""``lorakit export``: a lorakit adapter in the format serving engines load.

``--to plain-lora`` writes any mergeable adapter as a plain PEFT LoRA: exactly where its update is
a plain LoRA (:mod:`lorakit.export.factors`), else by a truncated SVD of its weight change; the
written folder is measured against the original (:mod:`lorakit.export.plain_lora`).
"""

from lorakit.export.factors import ModuleExport, RankRule, plain_factors, require_exportable
from lorakit.export.plain_lora import ExportResult, export_plain_lora

__all__ = ["ExportResult", "ModuleExport", "RankRule", "export_plain_lora", "plain_factors", "require_exportable"]
