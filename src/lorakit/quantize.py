"""QLoRA's frozen base: every linear layer quantised to 4-bit NF4 or 8-bit through bitsandbytes.

Why: the frozen base dominates fine-tuning memory. In 4-bit NF4 with double quantisation
(Dettmers et al. 2023, arXiv:2305.14314) a weight costs about 0.52 bytes instead of 4 (fp32)
or 2 (bf16); in 8-bit (LLM.int8) 1 byte plus one scale per row. The adapters train at full
precision beside it, so the memory saved is the base's, and gradients still flow through the
quantised layers to the adapters below them.

What is quantised: every ``nn.Linear`` except the output heads (``lm_head``, classifiers:
:func:`lorakit.targets.output_head_names`), replaced in place by ``bnb.nn.Linear4bit``
(``quant_type="nf4"``, double-quantised statistics, computing in ``compute_dtype``) or
``bnb.nn.Linear8bitLt`` (int8 codes, ``has_fp16_weights=False``).

What stays full precision: biases, embeddings, norms, convolutions, output heads and every
adapter tensor. Merging cannot write into a quantised weight; ``merge_and_unload`` returns a
dequantised model instead (see :mod:`lorakit.kinds_quantized`), and the best merge of an adapter
trained on a quantised base is onto the full-precision base (``lorakit merge``).

Notes. Quantise before adding adapters. In eval mode an int8 layer also quantises its input
(LLM.int8), so its eval outputs differ slightly from its train-mode ones (which use the
dequantised weight); ``compute_dtype`` applies to NF4 only. Methods that write W (Delta-LoRA)
refuse a quantised base; DoRA reads the dequantised W for its norm on every forward, as PEFT does.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from lorakit.errors import ConfigError
from lorakit.fingerprint import weight_fingerprint
from lorakit.kinds_quantized import DTYPE_ATTRIBUTE, FINGERPRINT_ATTRIBUTE, quantized_kind
from lorakit.targets import output_head_names

MODES = ("nf4", "int8")
INSTALL_HINT = "pip install bitsandbytes"


def import_bitsandbytes():
    """bitsandbytes, or a ConfigError that names the pip command."""
    try:
        import bitsandbytes
    except ImportError as exc:
        raise ConfigError(
            f"quantising the base (QLoRA) needs bitsandbytes, which is not installed: {INSTALL_HINT}"
        ) from exc
    return bitsandbytes


def quantize_model(model: nn.Module, mode: str, compute_dtype: torch.dtype = torch.float32,
                   shapes_only: bool = False) -> nn.Module:
    """Replace every nn.Linear but the output heads by its bitsandbytes 4-bit/8-bit twin, in place.

    ``mode`` is "nf4" (4-bit NormalFloat, double-quantised statistics, computing in
    ``compute_dtype``) or "int8". Each layer is quantised on its own device, its bias kept, and
    the fingerprint of its full-precision weight recorded so adapters trained on the quantised
    model load onto the original base. Returns ``model``.

    ``shapes_only`` (NF4): the model is on the meta device, and each nn.Linear becomes a 4-bit layer
    of the shapes bitsandbytes stores, holding no values; a sharded run's rank 0 sends them and
    the quantisation state later (:mod:`lorakit.train.sharding`).
    """
    if mode not in MODES:
        raise ConfigError(f"quantize mode must be one of {', '.join(MODES)}, got {mode!r}")
    from lorakit.layer import AdaptedLayer

    if any(isinstance(m, AdaptedLayer) for m in model.modules()):
        raise ConfigError("quantize the base model before adding adapters (this model already carries some)")
    bnb = import_bitsandbytes()
    heads = output_head_names(model)
    # Exactly nn.Linear: subclasses (nn.MultiheadAttention's out_proj) are read as plain weights.
    chosen = [name for name, m in model.named_modules()
              if type(m) is nn.Linear and name not in heads and (m.weight.device.type == "meta") == shapes_only]
    if shapes_only and mode != "nf4":
        raise ConfigError("only an NF4 base can be built from shapes alone")
    if mode == "int8":
        _say_cast_notice_once()
    for name in chosen:  # one layer at a time, so the full-precision weights are freed as it goes
        linear = model.get_submodule(name)
        quantised = (_nf4_shapes(bnb, linear, compute_dtype) if shapes_only
                     else _quantize_linear(bnb, linear, mode, compute_dtype))
        setattr(quantised, FINGERPRINT_ATTRIBUTE, weight_fingerprint(linear.weight))
        setattr(quantised, DTYPE_ATTRIBUTE, linear.weight.dtype)
        _set_module(model, name, quantised)
        del linear
    return model


def _quantize_linear(bnb, linear: nn.Linear, mode: str, compute_dtype: torch.dtype) -> nn.Module:
    device = linear.weight.device
    has_bias = linear.bias is not None
    if mode == "nf4":
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=has_bias, compute_dtype=compute_dtype,
                                  compress_statistics=True, quant_type="nf4", device="meta")
        layer.weight = bnb.nn.Params4bit(linear.weight.detach(), requires_grad=False, quant_type="nf4",
                                         compress_statistics=True)
        # On CPUs with AVX512-BF16, bitsandbytes repacks the weight on the first eval forward
        # (bf16 block scales, so eval and train outputs differ) and a training forward after
        # that fails; keep the one layout.
        layer.support_avx512bf16_for_cpu = False
    else:  # Int8Params quantises when moved from the CPU to a device (the CPU included)
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=has_bias,
                                    has_fp16_weights=False, threshold=0.0, device="meta")
        layer.weight = bnb.nn.Int8Params(linear.weight.detach().cpu(), requires_grad=False, has_fp16_weights=False)
    if has_bias:
        layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    layer = layer.to(device)  # quantises here
    layer.train(linear.training)
    return layer


def _nf4_shapes(bnb, linear: nn.Linear, compute_dtype: torch.dtype) -> nn.Module:
    """An NF4 layer on the meta device with the shapes :func:`_quantize_linear` gives: two 4-bit
    codes per byte in a (⌈n/2⌉, 1) uint8 tensor."""
    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4", device="meta")
    codes = torch.empty(((linear.in_features * linear.out_features + 1) // 2, 1), dtype=torch.uint8, device="meta")
    layer.weight = bnb.nn.Params4bit(codes, requires_grad=False, quant_type="nf4", compress_statistics=True,
                                     bnb_quantized=True)
    layer.support_avx512bf16_for_cpu = False  # as in _quantize_linear
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
    layer.train(linear.training)
    return layer


@torch.no_grad()
def dequantize_model(model: nn.Module) -> dict[str, nn.Module]:
    """Replace every bitsandbytes quantised linear of ``model`` by a plain nn.Linear holding its
    dequantised weight (and its bias), in place; returns the new layers by path."""
    replaced: dict[str, nn.Module] = {}
    for name, module in list(model.named_modules()):
        kind = quantized_kind(module) if name else None
        if kind is not None:
            replaced[name] = kind.to_plain(module)
            _set_module(model, name, replaced[name])
    return replaced


class _OnceFilter(logging.Filter):
    """Lets a repeated bitsandbytes notice through once, then drops it."""

    def __init__(self, fragment: str) -> None:
        super().__init__()
        self.fragment = fragment
        self.seen = False

    def filter(self, record: logging.LogRecord) -> bool:
        if self.fragment not in record.getMessage():
            return True
        seen, self.seen = self.seen, True
        return not seen


def _say_cast_notice_once() -> None:
    """An int8 layer in eval mode logs "inputs will be cast ... to float16" on every call (LLM.int8
    quantises activations from fp16); say it once rather than once per layer per forward."""
    logger = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _OnceFilter) for f in logger.filters):
        logger.addFilter(_OnceFilter("will be cast from"))


def _set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, leaf, module)
