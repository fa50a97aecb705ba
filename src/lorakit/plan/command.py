"""``lorakit plan``: will this training run fit, and what does it cost per token?"""

from __future__ import annotations

import argparse
import json
import re
from typing import Any

from lorakit.errors import ConfigError

# The `lorakit train` settings that change memory or FLOPs, read from --config and the flags alike.
TRAIN_FIELDS = ("task", "method", "rank", "method_options", "dropout", "targets", "exclude_modules",
                "layers_to_transform", "layers_pattern", "rank_pattern", "alpha_pattern", "init", "quantize",
                "batch_size", "grad_accum", "max_length", "gradient_checkpointing", "bf16", "max_grad_norm")
DEFAULT_LENGTH = 2048  # lorakit train's longest chosen length
UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> int:
    """Bytes from '80GiB', '24GB', '512 MiB' (GB: 10⁹, GiB: 2³⁰)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]i?[bB]|[bB])\s*", str(text))
    if match is None:
        raise ConfigError(f"--gpu-memory takes a size with its unit, e.g. 80GiB or 24GB, got {text!r}")
    value = float(match.group(1)) * UNITS[match.group(2).lower()]
    if value <= 0:
        raise ConfigError(f"--gpu-memory must be more than 0, got {text!r}")
    return int(value)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from lorakit.plan.shapes import BUILT_IN_SHAPES
    from lorakit.train.config import TrainConfig, _comment_help

    comments = _comment_help()
    parser.add_argument("--config", default=argparse.SUPPRESS,
                        help="a `lorakit train` YAML file: its settings that change memory are read; flags override it")
    parser.add_argument("--model", default=argparse.SUPPRESS,
                        help="a model folder or its config.json (no weights needed), 'default', 'smollm2', "
                             f"'random:<arch>,...', or a built-in shape: {', '.join(BUILT_IN_SHAPES)}")
    train = parser.add_argument_group("training settings (as `lorakit train` takes them)")
    defaults = {f.name: f.default for f in TrainConfig.__dataclass_fields__.values()}
    for name in TRAIN_FIELDS:
        flag = "--" + name.replace("_", "-")
        if name == "gradient_checkpointing":
            train.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                               help=comments.get(name, "") + " (default: off)")
            continue
        kind = type(defaults[name]) if defaults[name] is not None else str
        kind = int if name in ("rank", "batch_size", "grad_accum", "max_length") else kind
        default = "from the model" if name == "task" else f"min({DEFAULT_LENGTH}, the model's positions)" \
            if name == "max_length" else defaults[name]
        comment = "tokens per example; a plan fills every row" if name == "max_length" else comments.get(name, "")
        text = f"{comment} (default: {default})".replace("%", "%%")
        train.add_argument(flag, type=kind, default=argparse.SUPPRESS, help=text, metavar=name.upper())
    plan = parser.add_argument_group("where it runs")
    plan.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                      help="the base weights as loaded; auto: the config's dtype, as `lorakit train` loads it "
                           "(float32 when the config names none)")
    plan.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                      help="what the plan is for: --bf16 auto means on for cuda (a bf16 GPU), and on for cpu only "
                           "where this CPU has AMX")
    plan.add_argument("--gpus", type=int, default=1, help="devices the step's batch is split over")
    plan.add_argument("--gpu-memory", "--memory", dest="gpu_memory", default="80GiB",
                      help="memory of one device, e.g. 80GiB or 24GB")
    plan.add_argument("--shard", action="store_true",
                      help="FSDP: weights, gradients and optimizer state divided over --gpus")
    plan.add_argument("--json", action="store_true", help="print every figure as JSON instead of the table")


def request_from(args: argparse.Namespace):
    """Check every argument, then read the model's config: a PlanRequest."""
    import torch

    from lorakit.plan.planner import PlanRequest
    from lorakit.plan.shapes import DTYPES, model_source
    from lorakit.train.config import TrainConfig, read_yaml
    from lorakit.train.loop import bf16_is_fast

    memory = parse_size(args.gpu_memory)
    if args.gpus < 1:
        raise ConfigError("--gpus must be at least 1")
    if args.shard and args.gpus == 1:
        raise ConfigError("--shard divides the weights over --gpus; give --gpus 2 or more")
    values: dict[str, Any] = {}
    if getattr(args, "config", None):
        values = {k: v for k, v in read_yaml(args.config).items() if k in (*TRAIN_FIELDS, "model")}
    values.update({name: getattr(args, name) for name in (*TRAIN_FIELDS, "model")
                   if getattr(args, name, None) is not None})
    if "model" not in values:
        raise ConfigError("lorakit plan needs --model (or a --config that names one)")
    source = model_source(values["model"])
    values.setdefault("task", "causal-lm" if source.causal_lm else "classify")
    if values.get("max_length") is None:
        values["max_length"] = min(DEFAULT_LENGTH, _positions(source.config) or DEFAULT_LENGTH)
    train = TrainConfig(**values)
    if train.quantize == "int8":
        raise ConfigError("lorakit plan models --quantize nf4 (QLoRA), not int8")
    dtype = source.stored_dtype if args.dtype == "auto" else DTYPES[args.dtype]
    autocast = train.bf16 == "on" or (train.bf16 == "auto" and (
        args.device == "cuda" or bf16_is_fast(torch.device("cpu"))))
    return PlanRequest(source=source, train=train, dtype=dtype, autocast=autocast, devices=args.gpus,
                       device_memory=memory, shard=args.shard, device_type=args.device)


def _positions(config) -> int | None:
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def run(args: argparse.Namespace) -> int:
    from transformers.utils import logging as transformers_logging

    from lorakit.plan.planner import make_plan
    from lorakit.plan.report import as_json, describe

    transformers_logging.set_verbosity_error()  # its notes on configs and caches concern real models, not this one
    plan = make_plan(request_from(args))
    print(json.dumps(as_json(plan), indent=2) if args.json else describe(plan))
    return 0
