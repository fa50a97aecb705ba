"""One training step of a shape-only model, run as ``lorakit train`` runs it, with its memory and
FLOPs counted: activations (what the forward leaves for the backward), the step's peak and the
gradients live at that peak, and the multiply-adds of the forward and backward.

The step is ``Trainer.train_step`` on one micro-batch of full-length rows: the training loss
(:func:`lorakit.train.loop.batch_loss`) under the run's autocast, its backward, gradient clipping
and an AdamW step that already has its state (as from the second step on).
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from lorakit.plan.tracker import LiveBytes, SavedBytes, storage_bytes

aten = torch.ops.aten


PHASES = ("forward", "backward", "optimizer")


@dataclass
class StepMeasurement:
    """What one micro-batch of ``rows`` × ``length`` tokens costs on one device."""

    rows: int
    length: int
    activations: int  # live bytes the forward leaves for the backward (logits' share included)
    saved: int  # of which saved_tensors_hooks saw (without checkpointing: all but the loss itself)
    optimizer_state: int  # AdamW's two moments (and step counters) of the trainable tensors
    flops: int  # forward + backward (+ recomputation under checkpointing) of the micro-batch
    other: list[int] = field(repr=False, default_factory=list)  # live bytes after each event, gradients apart
    grads: list[int] = field(repr=False, default_factory=list)  # live gradient bytes after each event
    phase_ends: tuple[int, int] = (0, 0)  # events before the backward, and before the optimizer step

    def peak(self, grad_share: float = 1.0, phase: str | None = None) -> int:
        """The highest live bytes above the weights and optimizer state (in one phase of the step,
        or in all), gradients counted at ``grad_share`` (1/N when N devices shard them)."""
        if phase is None:
            return max(self.peak(grad_share, name) for name in PHASES)
        bounds = (0, *self.phase_ends, len(self.other))
        lo, hi = bounds[PHASES.index(phase)], bounds[PHASES.index(phase) + 1]
        return int(max((o + grad_share * g for o, g in zip(self.other[lo:hi], self.grads[lo:hi], strict=True)),
                       default=0))

    def with_rows(self, rows: int) -> StepMeasurement:
        """This step at another number of rows: activations and temporaries grow with the rows
        (every tensor they hold has a row or token dimension); gradients do not."""
        ratio = rows / self.rows
        return dataclasses.replace(self, rows=rows, activations=int(self.activations * ratio),
                                   saved=int(self.saved * ratio), flops=int(self.flops * ratio),
                                   other=[int(o * ratio) for o in self.other])


def _affine(points: list[tuple[int, float]], at: int) -> float:
    (x0, y0), (x1, y1) = points[-2:]
    return y0 + (y1 - y0) * (at - x0) / (x1 - x0)


@dataclass
class ExtrapolatedStep:
    """A step of a model of ``layers`` identical blocks, from steps measured on the same model cut
    to a few blocks (``measured``: block count → measurement, at least three counts).

    Each block adds the same tensors, so within a phase of the step (forward, backward, optimizer)
    every figure is affine in the number of blocks: a first and last block's extras and the head's
    are in the intercept, and the phase's highest point falls at the same place in each (the end of
    the forward, where the loss is computed; the start of the backward, or its end for a fully
    trained model). The phases' slopes differ (a forward's peak also holds what the model's
    output keeps until the loss is computed), so each phase extrapolates on its own and the peak
    is the highest. :func:`consistent` checks the affinity on the three counts before a plan uses it.
    """

    measured: dict[int, StepMeasurement]
    layers: int

    def _at(self, figure) -> int:
        points = sorted((n, float(figure(m))) for n, m in self.measured.items())
        return round(_affine(points, self.layers))

    @property
    def rows(self) -> int:
        return next(iter(self.measured.values())).rows

    @property
    def length(self) -> int:
        return next(iter(self.measured.values())).length

    @property
    def activations(self) -> int:
        return self._at(lambda m: m.activations)

    @property
    def saved(self) -> int:
        return self._at(lambda m: m.saved)

    @property
    def optimizer_state(self) -> int:
        return self._at(lambda m: m.optimizer_state)

    @property
    def flops(self) -> int:
        return self._at(lambda m: m.flops)

    def peak(self, grad_share: float = 1.0, phase: str | None = None) -> int:
        if phase is None:
            return max(self.peak(grad_share, name) for name in PHASES)
        return self._at(lambda m: m.peak(grad_share, phase))

    def with_rows(self, rows: int) -> ExtrapolatedStep:
        return ExtrapolatedStep({n: m.with_rows(rows) for n, m in self.measured.items()}, self.layers)

    def consistent(self, grad_shares: tuple[float, ...] = (1.0,)) -> bool:
        """Whether the first two block counts predict the third exactly (to 0.1 %) for every figure."""
        points = sorted(self.measured.items())
        if len(points) < 3:
            return False
        (n0, a), (n1, b), (n2, c) = points[:3]
        figures = [lambda m: m.activations, lambda m: m.flops, lambda m: m.optimizer_state]
        figures += [lambda m, s=s, p=p: m.peak(s, p) for s in grad_shares for p in PHASES]
        for figure in figures:
            predicted = _affine([(n0, figure(a)), (n1, figure(b))], n2)
            if abs(predicted - figure(c)) > 1e-3 * max(abs(figure(c)), 1):
                return False
        return True


class _ShapeOnlyScalars(TorchDispatchMode):
    """Answers the scalar reads a shape-only run cannot make.

    Two are known: ``batch_loss`` counts its loss units with ``int(...)`` (the loss is divided by
    it: any positive count leaves memory unchanged) and AdamW reads its step counter. Both get 1.
    A yes/no read (a model branching on its values) is left to fail, as it would change the path.
    """

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is aten._local_scalar_dense.default and args[0].dtype != torch.bool:
            return 1.0 if args[0].dtype.is_floating_point else 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _unpacked_rows():
    """Tell transformers the rows are not packed, which it cannot read off fake position ids.

    Without an attention mask and a cache (gradient checkpointing turns the cache off), transformers
    looks for packed sequences in the position ids; unable to read fake ones, it would build the
    block mask a packed batch needs. A plan's rows are never packed: the answer is "none".
    """
    try:
        from transformers import masking_utils
    except ImportError:
        yield
        return
    original = getattr(masking_utils, "find_packed_sequence_indices", None)
    if original is None:
        yield
        return
    masking_utils.find_packed_sequence_indices = lambda position_ids: None
    try:
        yield
    finally:
        masking_utils.find_packed_sequence_indices = original


def _cpu_attention_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    causal = kwargs.get("is_causal", args[1] if len(args) > 1 else False)
    return sdpa_flop_count(query, key, value) // (2 if causal else 1)


def _cpu_attention_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_backward_flop_count

    causal = kwargs.get("is_causal", args[3] if len(args) > 3 else False)  # after out, logsumexp, dropout_p
    return sdpa_backward_flop_count(grad_out, query, key, value) // (2 if causal else 1)


class FlopCount(TorchDispatchMode):
    """FLOPs of the matrix products, convolutions and attention that run, by torch's formulas
    (``torch.utils.flop_counter``), plus what they do not list: the CPU flash attention and the
    in-place accumulating products (``addmm_``, ``baddbmm_``) lorakit's adapters add their update
    with. A causal mask halves attention's S² products, as causal kernels skip the masked half.

    torch's own FlopCounterMode also tracks modules with hooks, which keep the tensors a
    gradient-checkpointing recomputation makes alive (300 MiB instead of 86 MiB measured in
    one case), so the plan counts with this plain mode instead.
    """

    def __init__(self) -> None:
        super().__init__()
        from torch.utils.flop_counter import flop_registry, shape_wrapper

        self.formulas = {**flop_registry,
                         aten.addmm_: flop_registry[aten.addmm], aten.baddbmm_: flop_registry[aten.baddbmm],
                         aten._scaled_dot_product_flash_attention_for_cpu: shape_wrapper(_cpu_attention_flops),
                         aten._scaled_dot_product_flash_attention_for_cpu_backward:
                             shape_wrapper(_cpu_attention_backward_flops)}
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = self.formulas.get(func._overloadpacket)
        if formula is not None:
            self.total += int(formula(*args, **kwargs, out_val=out))
        return out


def full_batch(rows: int, length: int, causal_lm: bool, device: torch.device, *,
               mask: bool = True) -> dict[str, torch.Tensor | None]:
    """``batches.collate``'s output for ``rows`` examples that all fill ``length`` tokens.

    ``mask=False`` leaves the attention mask out. A shape-only run needs that: transformers reads
    an all-ones mask's values to drop it (SDPA then runs causal, mask-free kernels), and, unable
    to read a fake tensor, would build and keep a rows × length × length mask a real run never makes.
    """
    ids = torch.zeros(rows, length, dtype=torch.long, device=device)
    labels = torch.zeros(rows, length, dtype=torch.long, device=device) if causal_lm else \
        torch.zeros(rows, dtype=torch.long, device=device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids) if mask else None, "labels": labels}


def measure_step(model: nn.Module, batch: dict[str, torch.Tensor], autocast, *, max_grad_norm: float = 1.0,
                 foreach: bool | None = None, values_known: bool = False) -> StepMeasurement:
    """Run one training step of ``model`` on ``batch`` and count it. Works on real tensors as on
    fake ones (``values_known``: real tensors, whose scalars can be read)."""
    from lorakit.train.loop import batch_loss

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, foreach=foreach)
    for p in trainable:  # the state AdamW has from the first step on
        p.grad = torch.zeros_like(p)
    scalars = contextlib.nullcontext() if values_known else _ShapeOnlyScalars()
    unpacked = contextlib.nullcontext() if values_known else _unpacked_rows()
    with scalars:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    state = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    known = [*model.parameters(), *model.buffers(), *state, *(t for t in batch.values() if t is not None)]
    live, saved, flops = LiveBytes(known), SavedBytes(known), FlopCount()
    model.train()
    with unpacked, live, scalars, flops:
        with autocast, saved:
            loss_sum, units = batch_loss(model, batch)
        live.mark("forward")
        (loss_sum / units).backward()
        del loss_sum
        live.mark("backward")
        grad_tokens = {live.token_of(p.grad) for p in trainable if p.grad is not None}
        if max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    other, grads = live.timeline(grad_tokens - {None})
    after_forward = live.marks["forward"] - 1
    rows, length = batch["input_ids"].shape
    return StepMeasurement(rows=rows, length=length, activations=other[after_forward] if other else 0,
                           saved=saved.total, optimizer_state=storage_bytes(state), flops=flops.total,
                           other=other, grads=grads, phase_ends=(live.marks["forward"], live.marks["backward"]))
