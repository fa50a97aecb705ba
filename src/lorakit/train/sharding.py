"""``--shard``: the frozen base and the adapters split across torchrun's processes with FSDP2.

Why: DDP keeps a whole copy of the base on every device, so a base that does not fit one device
cannot train at all. PyTorch's FSDP2 (``torch.distributed.fsdp.fully_shard``) keeps 1/N of every
parameter on each of N processes and all-gathers one transformer block just before it runs,
freeing it again after; gradients are reduce-scattered, so each process also keeps 1/N of the
adapters' gradients and optimizer state. Frozen parameters are gathered but never reduced.

Units: one per transformer block (the classes a Hugging Face model names in
``_no_split_modules``, or else the members of the longest list of identical modules), plus the
root for what lies outside the blocks (embeddings, final norm, head).

NF4 bases (QLoRA): a bitsandbytes 4-bit weight carries its quantisation state (block scales,
code book) on the parameter object, which FSDP replaces when it gathers. The state is also kept
on the layer, where bitsandbytes' own forward looks for it when the parameter lost it, so the
gathered bytes are read with the right scales. 8-bit bases keep their scales in the parameter's
own fields with no such recovery path, and are refused.

Checkpoints never hold shards: adapter tensors and the optimizer state are gathered into
whole tensors (every process takes part, rank 0 writes), in the same layout as an unsharded
run's. A run may therefore resume with or without ``--shard`` and on another number of
processes: the global batch of a step does not depend on either.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from lorakit.errors import ConfigError


def _dtensor_class():
    from torch.distributed.tensor import DTensor

    return DTensor


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of ``model``, each one FSDP unit.

    A Hugging Face model lists its block classes in ``_no_split_modules`` (kept whole across
    devices by accelerate too); any other model is cut at the longest ``nn.ModuleList`` of
    modules of one class."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    if names:
        blocks = [m for m in model.modules() if type(m).__name__ in names]
        # a block nested in another block (none in transformers today) would be a unit twice
        blocks = [b for b in blocks if not any(b is not o and _contains(o, b) for o in blocks)]
        if blocks:
            return blocks
    best: list[nn.Module] = []
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > len(best) and len({type(m) for m in module}) == 1:
            best = list(module)
    return best


def _contains(outer: nn.Module, inner: nn.Module) -> bool:
    return any(m is inner for m in outer.modules())


def check_shardable(model: nn.Module) -> None:
    """Refuse, before any sharding, a base FSDP cannot gather correctly (int8 weights)."""
    for name, module in model.named_modules():
        if type(module).__name__ == "Linear8bitLt":
            raise ConfigError(f"--shard cannot split an 8-bit base ({name} is bitsandbytes' Linear8bitLt, whose "
                              "scales live in fields of the weight that sharding drops); use --quantize nf4 or none")


def _keep_quantisation_state(model: nn.Module, device: torch.device) -> None:
    """Keep each NF4 layer's quantisation state on the layer itself (see the module docstring)."""
    for module in model.modules():
        if type(module).__name__ != "Linear4bit":
            continue
        state = getattr(module.weight, "quant_state", None)
        if state is None:
            continue
        if device.type != "cpu":
            state.to(device)
        module.quant_state = state
        # On CPUs with AVX512-BF16, bitsandbytes repacks the weight in place on its first
        # no-grad forward; a gathered copy is thrown away afterwards while the shared state would
        # say "repacked", so the next gather would be read in the wrong layout.
        module.support_avx512bf16_for_cpu = False


def shard_model(model: nn.Module, device: torch.device, world: int) -> nn.Module:
    """Shard ``model`` in place across the process group: each block a unit, then the root.

    Parameters move to ``device`` as they are sharded, so a model built on the CPU never has to
    fit one accelerator whole."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    check_shardable(model)
    blocks = transformer_blocks(model)
    if not blocks:
        raise ConfigError("--shard found no repeated blocks to shard in this model (no _no_split_modules and no "
                          "list of identical layers); train it without --shard")
    _keep_quantisation_state(model, device)
    for module in model.modules():  # caches keyed by version counters, which FSDP's refills leave unchanged
        if hasattr(module, "reuse_norm_by_version"):
            module.reuse_norm_by_version = False
    mesh = init_device_mesh(device.type, (world,))
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)  # moves parameters (sharded) and buffers (whole) to the mesh's device
    return model


# Inits that read no base weight: the other ranks can build their adapters on a shapes-only base.
INITS_WITHOUT_WEIGHTS = ("default", "gaussian")


def rank0_reads_weights(shard: bool, world: int, quantize: str, init: str) -> bool:
    """Whether only rank 0 reads the base: the other ranks build it on the meta device and receive
    their shards (and an NF4 base's quantisation state) from rank 0 after sharding, so host memory
    holds one copy, not one per process. Not for inits that read W (PiSSA, gradient-SVD)."""
    return shard and world > 1 and quantize in ("none", "nf4") and init in INITS_WITHOUT_WEIGHTS


def _named_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return list(model.named_parameters()) + list(model.named_buffers())


def take_rank0_layout(model: nn.Module, rank: int) -> None:
    """Give every meta tensor of a shapes-only model rank 0's dtype, after checking that both
    sides hold the same tensors with the same shapes (a collective: every rank calls it before
    sharding). The meta model was built from the config, whose dtype may differ from the one
    rank 0 loaded the weights in."""
    import torch.distributed as dist

    layout = [[(name, t.dtype, tuple(t.shape)) for name, t in _named_tensors(model)] if rank == 0 else None]
    dist.broadcast_object_list(layout, src=0)
    mine = _named_tensors(model)
    theirs = layout[0]
    if [(n, s) for n, _, s in theirs] != [(n, tuple(t.shape)) for n, t in mine]:
        raise ConfigError("--shard: this rank's model does not have rank 0's tensors (a model folder that "
                          "differs between machines?)")
    for (name, dtype, _), (_, tensor) in zip(theirs, mine, strict=True):
        if tensor.device.type == "meta" and tensor.dtype != dtype:
            owner, _, leaf = name.rpartition(".")
            module = model.get_submodule(owner)
            if isinstance(tensor, nn.Parameter):
                setattr(module, leaf, nn.Parameter(tensor.to(dtype), requires_grad=tensor.requires_grad))
            else:
                module._buffers[leaf] = tensor.to(dtype)


def whole_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Rank 0's parameters and buffers by name, kept before sharding to send to the other ranks."""
    return {name: t.detach() for name, t in _named_tensors(model)}


def fill_from_rank0(model: nn.Module, whole: dict[str, torch.Tensor] | None, device: torch.device) -> None:
    """After sharding: rank 0 sends each tensor whole, one at a time; every rank keeps its shard
    (parameters) or the whole (buffers). ``whole`` is rank 0's :func:`whole_tensors`, None elsewhere,
    where the shapes-only model is first given real (uninitialised) storage."""
    import torch.distributed as dist

    if whole is None:
        model.to_empty(device=device)
    with torch.no_grad():
        for name, tensor in _named_tensors(model):
            if whole is not None:
                sent = whole[name].to(device)
            else:
                sent = torch.empty(tensor.shape, dtype=tensor.dtype, device=device)
            dist.broadcast(sent, src=0)
            copy_full_into(tensor, sent)
    _share_quantisation_state(model, device)


def _share_quantisation_state(model: nn.Module, device: torch.device) -> None:
    """Rank 0's NF4 quantisation state (block scales, code book), layer by layer, to the ranks that
    built their 4-bit layers from shapes alone (a collective)."""
    import torch.distributed as dist

    from lorakit.kinds_quantized import DTYPE_ATTRIBUTE

    for module in model.modules():
        if type(module).__name__ != "Linear4bit":
            continue
        state = getattr(module, "quant_state", None)
        sent: list[Any] = [None]
        if state is not None:
            values = {k: v.cpu() if torch.is_tensor(v) else v for k, v in state.as_dict().items()}
            sent = [(values, getattr(module, DTYPE_ATTRIBUTE, None))]
        dist.broadcast_object_list(sent, src=0)
        if state is None:
            from bitsandbytes.functional import QuantState

            values, dtype = sent[0]
            module.quant_state = QuantState.from_dict(values, device)
            setattr(module, DTYPE_ATTRIBUTE, dtype)


def parameter_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of parameters this process holds, bytes of the whole parameters): what sharding saved."""
    local = whole = 0
    for param in model.parameters():
        size = param.element_size()
        whole += param.numel() * size
        local += (param.to_local() if is_sharded(param) else param).numel() * size
    return local, whole


def settle(model: nn.Module) -> None:
    """Put the sharded parameters back on ``model`` (no-op when it is not sharded). FSDP leaves
    the root's parameters gathered after a forward without backward (an evaluation), and code
    that looks parameters up by module attribute must find the sharded ones the optimizer holds."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule):
        model.reshard()


def is_sharded(tensor: torch.Tensor) -> bool:
    return isinstance(tensor, _dtensor_class())


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: gathered from every process when sharded (a collective: every process
    must call it, in the same order), else itself."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def copy_full_into(target: torch.Tensor, whole: torch.Tensor) -> None:
    """Write the whole tensor ``whole`` into ``target``, which may hold only this process's shard."""
    if is_sharded(target):
        target.to_local().copy_(_local_part(whole, target))
    else:
        target.copy_(whole)


def _local_part(whole: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This process's part of ``whole``, laid out as the sharded tensor ``like`` (no communication)."""
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(whole.to(like.device, like.dtype), like.device_mesh, like.placements,
                             src_data_rank=None).to_local()


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``optimizer.state_dict()`` with every sharded state tensor gathered whole: the layout an
    unsharded run writes, whatever the number of processes."""
    state = optimizer.state_dict()
    gathered = {}
    for index, values in state["state"].items():
        gathered[index] = {k: full(v).detach().cpu() if torch.is_tensor(v) else v for k, v in values.items()}
    return {**state, "state": gathered}


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a whole-tensor optimizer state (:func:`full_optimizer_state`, or an unsharded run's)
    into an optimizer over sharded parameters: each process keeps its part."""
    optimizer.load_state_dict(state)
    for group in optimizer.param_groups:
        for param in group["params"]:
            if not is_sharded(param):
                continue
            values = optimizer.state.get(param, {})
            for key, value in list(values.items()):
                if torch.is_tensor(value) and not is_sharded(value) and value.shape == param.shape:
                    values[key] = _as_sharded(value, param)


def _as_sharded(whole: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(_local_part(whole, like), like.device_mesh, like.placements,
                              shape=like.shape, stride=like.stride())


def gather_parameters_in_place(model: nn.Module, params: list[nn.Parameter]) -> None:
    """Replace each sharded parameter in ``params`` by a plain one holding the whole tensor, so
    code that reads module attributes (saving an adapter file) sees whole tensors. Every process
    must call it; FSDP training of these parameters cannot go on afterwards."""
    settle(model)
    wanted = {id(p) for p in params}
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if id(param) in wanted and is_sharded(param):
                setattr(module, name, nn.Parameter(param.full_tensor().detach(), requires_grad=param.requires_grad))


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """FSDP's ``no_sync``: reduce-scatter gradients only on the last micro-batch of a step."""
    model.set_requires_gradient_sync(enabled)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)
