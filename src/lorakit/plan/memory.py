"""Per-device bytes of a measured step, for a number of devices with or without sharding.

Data parallel (``torchrun``, DDP) replicates everything: weights, adapters, optimizer state and
gradients, plus DDP's gradient buckets (a flat copy of the gradients it all-reduces). Sharded
(FSDP) divides weights, adapters, gradients and optimizer state by the device count; each device
then holds one block's weights gathered in full while it runs and the next one prefetched, and the
root's own weights (embeddings, final norm, head) gathered for the whole step. Activations never
divide: each device runs its own rows. ``lorakit train``'s --batch-size is the optimizer step's,
split over devices and --grad-accum micro-batches, so more devices also means fewer rows each.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lorakit.plan.step import ExtrapolatedStep, StepMeasurement
from lorakit.plan.tracker import StaticBytes, storage_bytes

GiB = 2**30
CONTEXT_BYTES = GiB  # the CUDA context and the allocator's own reserve, per device
FRAGMENTATION = 0.10  # share of the device's memory the caching allocator cannot hand out


def format_bytes(n: float) -> str:
    """Bytes in GiB, or MiB below one GiB (small models print more than zeros)."""
    return f"{n / GiB:.2f} GiB" if abs(n) >= GiB else f"{n / 2**20:.1f} MiB"


def usable_bytes(device_bytes: int) -> int:
    """What a training step may use of a device: its memory less the context and fragmentation allowance."""
    return int(device_bytes * (1 - FRAGMENTATION)) - CONTEXT_BYTES


def rows_per_device(batch_size: int, grad_accum: int, devices: int) -> int:
    """Rows one device runs at once: ``batches.split_for`` cuts the step into --grad-accum chunks and
    strides each over the devices."""
    chunk = -(-batch_size // grad_accum)
    return max(1, -(-chunk // devices))


@dataclass(frozen=True)
class Blocks:
    """Weight bytes of the largest repeated block and of everything outside the blocks (FSDP's units)."""

    largest: int
    root: int


def block_bytes(model: nn.Module) -> Blocks:
    """The model's blocks are the children of its largest ModuleList (the decoder or encoder layers)."""
    from lorakit.plan.build import repeated_blocks

    layers = repeated_blocks(model)
    every = storage_bytes([*model.parameters(), *model.buffers()])
    if layers is None:
        return Blocks(largest=every, root=0)
    sizes = [storage_bytes([*block.parameters(), *block.buffers()]) for block in layers]
    return Blocks(largest=max(sizes), root=every - sum(sizes))


@dataclass(frozen=True)
class DeviceMemory:
    """Bytes on one device at the step's peak; ``total`` is their sum."""

    base: int
    adapter: int
    optimizer: int
    gradients: int  # all the trainable tensors' gradients (those live at the peak are inside step_peak)
    activations: int  # what the forward leaves for the backward
    step_peak: int  # activations, gradients and temporaries live together at the step's highest point
    gathered: int  # FSDP: weights gathered beyond this device's shard
    ddp_buckets: int  # DDP: its flat copy of the gradients
    total: int

    def as_dict(self) -> dict[str, int]:
        return dict(vars(self))


def device_memory(static: StaticBytes, step: StepMeasurement | ExtrapolatedStep, blocks: Blocks, devices: int,
                  shard: bool) -> DeviceMemory:
    share = 1 / devices if shard else 1.0
    base, adapter = int(static.base * share), int(static.adapter * share)
    optimizer, gradients = int(step.optimizer_state * share), int(static.trainable * share)
    peak = step.peak(grad_share=share)
    gathered = int((blocks.root + 2 * blocks.largest) * (1 - share)) if shard and devices > 1 else 0
    buckets = static.trainable if devices > 1 and not shard else 0
    return DeviceMemory(base=base, adapter=adapter, optimizer=optimizer, gradients=gradients,
                        activations=step.activations, step_peak=peak, gathered=gathered, ddp_buckets=buckets,
                        total=base + adapter + optimizer + peak + gathered + buckets)
