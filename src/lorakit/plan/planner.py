"""A plan: the step measured with and without gradient checkpointing, per-device totals, and the
cheapest change that makes it fit.

Changes are tried in order of what they cost: gradient checkpointing (about a third more compute),
sharding over the devices already there (communication), NF4 (a quantised base), and each
combination; when none is enough, the most rows per device that fit, as a --grad-accum.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from lorakit.plan.memory import Blocks, DeviceMemory, block_bytes, device_memory, rows_per_device, usable_bytes
from lorakit.plan.memory import format_bytes as _gib
from lorakit.plan.shapes import ModelSource
from lorakit.plan.step import ExtrapolatedStep, StepMeasurement
from lorakit.plan.tracker import StaticBytes
from lorakit.train.config import TrainConfig


@dataclass(frozen=True)
class PlanRequest:
    source: ModelSource
    train: TrainConfig  # the `lorakit train` settings planned for (max_length set)
    dtype: torch.dtype  # the base weights as loaded
    autocast: bool  # bf16 autocast around the forward
    devices: int = 1
    device_memory: int = 80 * 2**30
    shard: bool = False
    device_type: str = "cuda"  # what the plan is for; the shapes run as fake CPU tensors either way

    @property
    def rows(self) -> int:
        return rows_per_device(self.train.batch_size, self.train.grad_accum, self.devices)

    @property
    def length(self) -> int:
        return int(self.train.max_length)


@dataclass(frozen=True)
class Variant:
    """One measured setting: the model's static bytes, its blocks and one step."""

    checkpointing: bool
    nf4: bool
    static: StaticBytes
    blocks: Blocks
    step: StepMeasurement | ExtrapolatedStep
    adapted_modules: int

    def memory(self, devices: int, shard: bool) -> DeviceMemory:
        return device_memory(self.static, self.step, self.blocks, devices, shard)

    def flops_per_token(self) -> float:
        return self.step.flops / (self.step.rows * self.step.length)


@dataclass
class Recommendation:
    fits: bool
    flags: list[str]  # what to add to the command ([] when it fits as given)
    total: int  # bytes per device with those flags
    usable: int
    rows: int  # rows per device in that setting
    grad_accum: int | None = None  # when only fewer rows fit: the --grad-accum that gets there
    devices_needed: int | None = None  # when nothing fits on these devices: how many sharded would
    text: str = ""

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Plan:
    request: PlanRequest
    variants: dict[tuple[bool, bool], Variant] = field(default_factory=dict)  # (checkpointing, nf4) → measured
    recommendation: Recommendation | None = None

    def given(self, checkpointing: bool) -> Variant:
        return self.variants[(checkpointing, self.request.train.quantize == "nf4")]


# A model of identical blocks is measured cut to these block counts and extrapolated (ExtrapolatedStep).
CUT_LAYERS = (2, 3, 4)


def measure(request: PlanRequest, checkpointing: bool, nf4: bool, rows: int | None = None,
            extrapolate: bool = True) -> Variant:
    """Build the model for ``request`` with these two settings and measure one step of ``rows``.

    The whole model gives the static bytes; the step runs on the whole model, or, when its blocks
    are identical, on two cut copies whose figures extrapolate exactly (seconds instead of minutes
    for a 70B model).
    """
    from lorakit.plan.build import build_planned, identical_blocks
    from lorakit.plan.step import ExtrapolatedStep
    from lorakit.plan.tracker import static_bytes

    train = dataclasses.replace(request.train, gradient_checkpointing=checkpointing,
                                quantize="nf4" if nf4 else "none")
    whole = build_planned(request.source, train, request.dtype)
    static, blocks = static_bytes(whole.model), block_bytes(whole.model)
    adapted = getattr(whole.model, "adapted_layers", None)
    modules = len(adapted()) if callable(adapted) else 0
    layers = getattr(request.source.config, "num_hidden_layers", 0)
    step = None
    if extrapolate and layers > CUT_LAYERS[-1] and identical_blocks(whole.model, request.source.config):
        cut = ExtrapolatedStep({n: _step(request, build_planned(request.source, train, request.dtype, layers=n), train,
                                         rows) for n in CUT_LAYERS}, layers)
        shares = (1.0, 1 / request.devices) if request.devices > 1 else (1.0,)
        step = cut if cut.consistent(shares) else None
    if step is None:  # blocks that differ, or figures that do not grow evenly with the blocks
        step = _step(request, whole, train, rows)
    return Variant(checkpointing, nf4, static, blocks, step, modules)


def _step(request: PlanRequest, planned, train: TrainConfig, rows: int | None):
    import warnings

    from lorakit.plan.step import full_batch, measure_step

    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if request.autocast else torch.autocast("cpu",
                                                                                                  enabled=False)
    with planned.fake_mode, warnings.catch_warnings():
        # DoRA keys its norm cache on data_ptr(), which fake tensors answer with a warning (and 0)
        warnings.filterwarnings("ignore", message="Accessing the data pointer of FakeTensor")
        batch = full_batch(rows or request.rows, request.length, planned.causal_lm, planned.device, mask=False)
        return measure_step(planned.model, batch, autocast, max_grad_norm=train.max_grad_norm,
                            foreach=request.device_type == "cuda")


def make_plan(request: PlanRequest) -> Plan:
    plan = Plan(request)
    nf4 = request.train.quantize == "nf4"
    for checkpointing in (False, True):
        plan.variants[(checkpointing, nf4)] = measure(request, checkpointing, nf4)
    plan.recommendation = recommend(plan)
    return plan


def _candidates(request: PlanRequest) -> list[tuple[bool, bool, bool]]:
    """(checkpointing, shard, nf4) settings from the given one, cheapest addition first."""
    given = (request.train.gradient_checkpointing, request.shard, request.train.quantize == "nf4")
    can_shard = request.devices > 1
    can_nf4 = request.train.method != "full"
    found: list[tuple[bool, bool, bool]] = []
    for add_nf4 in (False, True):
        for add_shard in (False, True):
            for add_gc in (False, True):
                if (add_shard and not can_shard) or (add_nf4 and not can_nf4):
                    continue
                setting = (given[0] or add_gc, given[1] or add_shard, given[2] or add_nf4)
                if setting not in found:
                    found.append(setting)
    return found


def _flags(request: PlanRequest, setting: tuple[bool, bool, bool]) -> list[str]:
    checkpointing, shard, nf4 = setting
    flags = []
    if nf4 and request.train.quantize != "nf4":
        flags.append("--quantize nf4")
    if checkpointing and not request.train.gradient_checkpointing:
        flags.append("--gradient-checkpointing")
    if shard and not request.shard:
        flags.append(f"--shard (over the {request.devices} devices)")
    return flags


def recommend(plan: Plan) -> Recommendation:
    request = plan.request
    usable = usable_bytes(request.device_memory)

    def variant(checkpointing: bool, nf4: bool) -> Variant:
        if (checkpointing, nf4) not in plan.variants:
            plan.variants[(checkpointing, nf4)] = measure(request, checkpointing, nf4)
        return plan.variants[(checkpointing, nf4)]

    for setting in _candidates(request):
        checkpointing, shard, nf4 = setting
        total = variant(checkpointing, nf4).memory(request.devices, shard).total
        if total <= usable:
            flags = _flags(request, setting)
            text = ("fits as given" if not flags else "needs " + " + ".join(flags)) + f": {_gib(total)} per device"
            return Recommendation(True, flags, total, usable, request.rows, text=text)
    return _fewer_rows(plan, _candidates(request)[-1], usable, variant)


def _fewer_rows(plan: Plan, setting: tuple[bool, bool, bool], usable: int, variant) -> Recommendation:
    """With every change on, the most rows per device that fit; or, at one row, how many sharded
    devices would hold it."""
    request = plan.request
    checkpointing, shard, nf4 = setting
    measured = variant(checkpointing, nf4)
    flags = _flags(request, setting)
    fixed = measured.memory(request.devices, shard)
    rows = request.rows
    for _ in range(3):
        per_row = _scaled(measured, 1, request.devices, shard)
        steady = fixed.total - fixed.step_peak
        per_row_peak = per_row.step_peak
        fitting = int((usable - steady) // max(per_row_peak, 1)) if usable > steady else 0
        fitting = min(fitting, rows - 1)
        if fitting < 1:
            break
        check = measure(request, checkpointing, nf4, rows=fitting)
        total = check.memory(request.devices, shard).total
        if total <= usable:
            accum = -(-request.train.batch_size // (fitting * request.devices))
            text = (f"does not fit at {request.rows} rows per device; "
                    + (f"with {' + '.join(flags)}, " if flags else "")
                    + f"{fitting} rows per device fit: --grad-accum {accum} (same --batch-size "
                    f"{request.train.batch_size}): {_gib(total)} per device")
            return Recommendation(False, [*flags, f"--grad-accum {accum}"], total, usable, fitting, grad_accum=accum,
                                  text=text)
        rows = fitting
    one_row = _scaled(measured, 1, request.devices, shard)
    needed = _devices_needed(measured, usable)
    unit = "GPU" if request.device_type == "cuda" else "device"
    text = (f"does not fit on {request.devices} {unit}{'s' if request.devices > 1 else ''} of "
            f"{request.device_memory / 2**30:.0f} GiB even at one row per {unit}"
            + (f" with {' + '.join(flags)}" if flags else "") + f" ({_gib(one_row.total)} each)")
    if needed is not None:
        needed_memory = _scaled(measured, 1, needed, True).total
        text += f"; sharded (--shard) over {needed} such {unit}s it would ({_gib(needed_memory)} each)"
    return Recommendation(False, flags, one_row.total, usable, 1, devices_needed=needed, text=text)


def _scaled(variant: Variant, rows: int, devices: int, shard: bool) -> DeviceMemory:
    """The memory at ``rows`` rows, scaled from the measured ones (``StepMeasurement.with_rows``)."""
    return device_memory(variant.static, variant.step.with_rows(rows), variant.blocks, devices, shard)


def _devices_needed(variant: Variant, usable: int) -> int | None:
    """The fewest devices (powers of two) that hold the step at one row each, sharded."""
    for devices in (2, 4, 8, 16, 32, 64, 128, 256, 512):
        if _scaled(variant, 1, devices, True).total <= usable:
            return devices
    return None
