"""``lorakit plan``: the memory and FLOPs of a training step, before any weight is read.

The model is built from its config on the meta device, prepared as ``lorakit train`` prepares it
(quantised, checkpointed, adapted through lorakit's own attach path), and one training step runs
on fake tensors (meta storage that reports a device, so autocast applies). Every tensor the step
makes is counted from the operation that makes it until its last reference dies: activations,
gradients and temporaries come out measured, not estimated from a formula.

Modules: :mod:`shapes` (what --model names), :mod:`nf4` (bitsandbytes' NF4 bytes and a stand-in
layer), :mod:`build` (the shape-only model), :mod:`tracker` (counting bytes), :mod:`step` (the
measured step and its FLOPs), :mod:`memory` (per device, sharded or not), :mod:`planner` (the
variants and the recommendation), :mod:`report` (text and JSON), :mod:`command` (the CLI).
"""

from lorakit.plan.planner import Plan, PlanRequest, make_plan

__all__ = ["Plan", "PlanRequest", "make_plan"]
