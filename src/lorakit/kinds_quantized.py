"""Base layer kinds for bitsandbytes' quantised linears: 4-bit (NF4/FP4) and 8-bit (LLM.int8).

QLoRA (Dettmers et al. 2023, arXiv:2305.14314) keeps the base frozen in 4 bits and trains
full-precision adapters beside it. To a method such a layer is a Linear whose W is

    Linear4bit     dequantize_4bit(weight, weight.quant_state)          (out, in)
    Linear8bitLt   int8 codes · row scale (SCB) / 127                   (out, in)

and A x, B h are the Linear ones (x @ A.T). ``weight_matrix`` returns a dequantised *copy*, so
these kinds are not ``writable``: merging into the quantised weight is refused (it would round
the update into the quantisation grid); ``AdaptedModel.merge_and_unload`` returns plain
``nn.Linear`` layers holding the dequantised W plus the update instead.

bitsandbytes is never imported here. ``matches`` looks it up in ``sys.modules``: a model can
only hold its layers once the user (or :func:`lorakit.quantize.quantize_model`) imported it.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from lorakit.fingerprint import weight_fingerprint
from lorakit.kinds_base import LayerKind

# Where quantize_model keeps the fingerprint of the full-precision weight a layer was made from,
# so an adapter trained on the quantised base records (and loads onto) the original base.
FINGERPRINT_ATTRIBUTE = "lorakit_fingerprint"
# ... and the dtype of that weight (int8 layers do not keep it; NF4's quant_state does).
DTYPE_ATTRIBUTE = "lorakit_dtype"


def _bnb_class(name: str) -> type | None:
    bnb = sys.modules.get("bitsandbytes")
    nn_module = getattr(bnb, "nn", None) if bnb is not None else None
    return getattr(nn_module, name, None)


class _QuantizedLinearKind(LayerKind):
    """A bitsandbytes linear: Linear's A x and B h, W dequantised on request."""

    writable = False
    inplace_output = False  # with a bias, bitsandbytes returns a view made inside its autograd Function
    bnb_class: str

    @classmethod
    def matches(cls, module: nn.Module) -> bool:  # type: ignore[override]
        bnb_cls = _bnb_class(cls.bnb_class)
        return bnb_cls is not None and isinstance(module, bnb_cls)

    def __init__(self, module: nn.Module) -> None:  # no dequantisation just to read the shape
        self.out_features, self.in_features = module.out_features, module.in_features

    def weight_matrix(self, module: nn.Module) -> torch.Tensor:
        """W (out, in), dequantised: a new tensor, not a view of the stored codes."""
        raise NotImplementedError

    def original_dtype(self, module: nn.Module) -> torch.dtype:
        """The dtype of the full-precision weight the layer was quantised from."""
        recorded = getattr(module, DTYPE_ATTRIBUTE, None)
        if recorded is not None:
            return recorded
        state = getattr(module.weight, "quant_state", None)
        if state is not None:
            return getattr(state, "original_dtype", state.dtype)
        return module.bias.dtype if module.bias is not None else torch.float32

    def as_matrix(self, stored: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(
            f"a {self.name} weight holds quantised codes, not an (out, in) matrix; use weight_matrix(module)"
        )

    def to_plain(self, module: nn.Module, W: torch.Tensor | None = None) -> nn.Linear:
        """A plain nn.Linear holding ``W`` (default: the dequantised weight) and the layer's bias,
        in the dtype the layer was quantised from."""
        W = self.weight_matrix(module) if W is None else W
        bias = module.bias
        plain = nn.Linear(self.in_features, self.out_features, bias=bias is not None,
                          device=W.device, dtype=self.original_dtype(module))
        with torch.no_grad():
            plain.weight.copy_(W)
            if bias is not None:
                plain.bias.copy_(bias)
        plain.requires_grad_(False)
        return plain


class Linear4bitKind(_QuantizedLinearKind):
    """bitsandbytes ``Linear4bit`` (NF4 or FP4, double-quantised statistics or not)."""

    name = "Linear4bit"
    bnb_class = "Linear4bit"

    def weight_matrix(self, module: nn.Module) -> torch.Tensor:
        weight = module.weight
        state = weight.quant_state
        if state is None:
            raise ValueError("this Linear4bit is not quantised yet (move it to a device first: .to('cpu') or .cuda())")
        if getattr(state, "packing_format_for_cpu", False):
            return _dequantize_cpu_packed(weight.data, state)
        from bitsandbytes.functional import dequantize_4bit

        return dequantize_4bit(weight.data, state)


class Linear8bitLtKind(_QuantizedLinearKind):
    """bitsandbytes ``Linear8bitLt`` with int8 weights (``has_fp16_weights=False``)."""

    name = "Linear8bitLt"
    bnb_class = "Linear8bitLt"

    def weight_matrix(self, module: nn.Module) -> torch.Tensor:
        weight = module.weight
        if weight.dtype != torch.int8:  # has_fp16_weights=True: a plain float weight
            return weight.data.clone()
        # The row scales move from the parameter to the layer's state on the first forward.
        scales = weight.SCB if getattr(weight, "SCB", None) is not None else module.state.SCB
        if scales is None:
            raise ValueError("this Linear8bitLt holds int8 codes but no row scales (SCB)")
        return weight.data.float() * (scales.float().unsqueeze(1) / 127.0)


def _dequantize_cpu_packed(packed: torch.Tensor, state) -> torch.Tensor:
    """Dequantise bitsandbytes' AVX512-BF16 CPU layout (made on an eval forward) without undoing it.

    The layout (``_convert_weight_packed_for_cpu``): 4-bit codes of W (N, K) packed as [N, K/2]
    in tiles of 32 rows, absmax per block as a bf16 (K/blocksize, N) matrix.
    """
    N, K_half = packed.shape
    K = 2 * K_half
    tiles = packed.reshape(-1, 32)
    codes = torch.cat([tiles & 0xF, (tiles >> 4) & 0xF], dim=-1)  # each row: 32 low then 32 high nibbles
    codes = codes.reshape(N // 32, K_half, 32, 2).transpose(1, 2).reshape(N, K)
    values = state.code.to(packed.device).float()[codes.long()]
    absmax = state.absmax.t().float()  # (N, K / blocksize)
    W = (values.reshape(N, -1, state.blocksize) * absmax.unsqueeze(-1)).reshape(N, K)
    return W.to(getattr(state, "original_dtype", torch.float32))


def quantized_kind(module: nn.Module) -> _QuantizedLinearKind | None:
    """The kind of a bitsandbytes quantised linear, or None for any other module."""
    for kind in QUANTIZED_KINDS:
        if kind.matches(module):
            return kind(module)
    return None


def base_fingerprint(module: nn.Module) -> dict | None:
    """The fingerprint an adapter records for (and checks against) a base layer's weight.

    A quantised layer reports the full-precision weight it was made from when quantize_model
    recorded it, so its adapters load onto the original base; otherwise its dequantised weight.
    """
    kind = quantized_kind(module)
    if kind is not None and module.weight.device.type == "meta":
        return None  # shapes only (a sharded run's rank > 0), as for any weight on the meta device
    if kind is not None:
        recorded = getattr(module, FINGERPRINT_ATTRIBUTE, None)
        return recorded if recorded is not None else weight_fingerprint(kind.weight_matrix(module))
    return weight_fingerprint(module.weight)


QUANTIZED_KINDS: tuple[type[_QuantizedLinearKind], ...] = (Linear4bitKind, Linear8bitLtKind)  # listed in lorakit.kinds
