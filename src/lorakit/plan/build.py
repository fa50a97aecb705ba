"""The model a plan measures: built from its config on the meta device, quantised, checkpointed
and adapted in the order ``lorakit train`` does it (:func:`lorakit.train.setup.prepare`), through
lorakit's own attach path, so targets, rank patterns and trained heads resolve exactly as in
training. Then every tensor becomes a fake one (:class:`torch._subclasses.FakeTensorMode`):
meta storage that reports a device, so autocast, dtype rules and lorakit's own device checks behave
as on a real device while nothing is allocated.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from lorakit.errors import ConfigError
from lorakit.plan.shapes import ModelSource
from lorakit.train.config import TrainConfig


@dataclass
class PlannedModel:
    model: nn.Module  # what the training step calls: the AdaptedModel, or the bare model for full / head
    fake_mode: object  # the FakeTensorMode its tensors belong to
    device: torch.device
    causal_lm: bool


def build_planned(source: ModelSource, config: TrainConfig, dtype: torch.dtype, *, num_labels: int = 2,
                  device: str = "cpu", layers: int | None = None) -> PlannedModel:
    """``source`` prepared for ``config`` as ``lorakit train`` would, every tensor fake; with
    ``layers``, cut to that many blocks."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    causal_lm = config.task == "causal-lm"
    model = _meta_model(source, causal_lm, dtype, num_labels, layers)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = 0
    if config.quantize == "nf4":
        from lorakit.plan.nf4 import quantize_planned

        quantize_planned(model)
    elif config.quantize != "none":
        raise ConfigError(f"lorakit plan models --quantize nf4 only, not {config.quantize}")
    if config.gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
        with warnings.catch_warnings():  # prepare() makes the same call; its deprecation is not the plan's news
            warnings.simplefilter("ignore", FutureWarning)
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)  # the meta base meets fake adapters while attaching
    with fake_mode:  # adapters of a meta base are made on the CPU: here, fake CPU tensors
        model = _attach(model, config)
    _fake_everything(model, fake_mode, torch.device(device))
    return PlannedModel(model.train(), fake_mode, torch.device(device), causal_lm)


def _meta_model(source: ModelSource, causal_lm: bool, dtype: torch.dtype, num_labels: int,
                layers: int | None) -> nn.Module:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    config = copy.deepcopy(source.config)
    if layers is not None:
        config.num_hidden_layers = layers
    if not causal_lm:
        config.num_labels = num_labels
    auto = AutoModelForCausalLM if causal_lm else AutoModelForSequenceClassification
    try:
        with torch.device("meta"):
            return auto.from_config(config, dtype=dtype)
    except ValueError as exc:
        task = "causal-lm" if causal_lm else "classify"
        raise ConfigError(f"--model {source.name} cannot be built for --task {task}: {exc}") from None


def _attach(model: nn.Module, config: TrainConfig) -> nn.Module:
    """prepare()'s adapter step: the adapter (or the baselines' trainable set) on the model."""
    import lorakit
    from lorakit.train.setup import _baseline_trainable, adapter_config

    if config.method in ("full", "head"):
        _baseline_trainable(model, config)
        return model
    adapter = adapter_config(config, model)
    offsets = adapter.init in ("pissa", "gradient-svd")
    if offsets:  # both keep their initial update as a frozen rank-r offset; its values need the weights
        adapter = dataclasses.replace(adapter, init="default")
    adapted = lorakit.adapt(model, adapter)
    if offsets:
        _add_offsets(adapted)
    return adapted


def _add_offsets(adapted) -> None:
    """The frozen rank-r offset PiSSA and gradient-SVD leave beside the trained factors."""
    for module in adapted.adapter_modules("default").values():
        if hasattr(module, "offset_A"):
            module.offset_A = torch.empty(module.lora_A.shape, dtype=module.lora_A.dtype)
            module.offset_B = torch.empty(module.lora_B.shape, dtype=module.lora_B.dtype)


def _fake_everything(model: nn.Module, fake_mode, device: torch.device) -> None:
    """Replace every meta parameter and buffer by a fake tensor of the same shape on ``device``
    (tied tensors stay tied)."""
    made: dict[int, torch.Tensor] = {}

    def fake_of(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in made:
            with fake_mode:
                new = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=device)
            made[id(t)] = nn.Parameter(new, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else new
        return made[id(t)]

    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for name, t in table.items():
                if t is not None and t.device.type == "meta":
                    table[name] = fake_of(t)


def repeated_blocks(model: nn.Module) -> nn.ModuleList | None:
    """The model's blocks: its ModuleList holding the most bytes (the decoder or encoder layers)."""
    from lorakit.plan.tracker import storage_bytes

    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 1]
    if not lists:
        return None
    return max(lists, key=lambda m: storage_bytes([*m.parameters(), *m.buffers()]))


def identical_blocks(model: nn.Module, config) -> bool:
    """Whether every block holds the same modules and tensors (no per-layer ranks, adapters on
    some layers only, or per-layer attention kinds in the config), so a plan may measure a model
    of a few blocks and extrapolate."""
    blocks = repeated_blocks(model)
    layers = getattr(config, "num_hidden_layers", None)
    if blocks is None or layers is None or len(blocks) != layers:
        return False
    per_layer = [v for v in vars(config).values() if isinstance(v, (list, tuple)) and len(v) == layers and layers > 1]
    if any(len(set(map(str, v))) > 1 for v in per_layer):
        return False

    def signature(block: nn.Module) -> tuple:
        tensors = [(n, tuple(t.shape), t.dtype, t.requires_grad) for n, t in
                   (*block.named_parameters(), *block.named_buffers())]
        return tuple(tensors), tuple((n, type(m).__name__) for n, m in block.named_modules())

    first = signature(blocks[0])
    return all(signature(block) == first for block in blocks)
