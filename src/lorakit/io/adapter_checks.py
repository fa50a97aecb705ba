"""Does an adapter file fit this model? Every check a load or hot swap makes before it changes anything.

Keys and shapes against the modules the adapter's config targets (each method says what it
expects: ``expected_shapes``, ``expected_shared_shapes`` for state shared across layers such as
VeRA's projections), ``modules_to_save`` copies, PEFT's copies of embedding base weights, the vocabulary size and
the base-weight fingerprint. A file that fails any of them is refused with the near misses
named, and the model is untouched.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from lorakit.errors import AdapterFileError, FingerprintMismatchError
from lorakit.fingerprint import fingerprint_mismatch
from lorakit.kinds import kind_for
from lorakit.kinds_quantized import base_fingerprint
from lorakit.methods import method_class
from lorakit.targets import matches_rules, plain_modules, resolve_targets

if TYPE_CHECKING:
    from lorakit.io.adapter_files import AdapterFile
    from lorakit.layer import AdaptedLayer

log = logging.getLogger("lorakit")

PREFIX = "base_model.model."  # + module path + "." + the method's name for the tensor
SHARED_PREFIX = "base_model."  # + the name of a tensor of the adapter's shared state
BASE_COPY = ".base_layer.weight"  # PEFT's copy of a targeted embedding layer's own weight


@dataclass
class Plan:
    targets: list[str]
    saved: list[str]


def check_against_model(
    root: nn.Module, adapter: AdapterFile, check_fingerprint: bool, layers: dict[str, AdaptedLayer]
) -> Plan:
    """The file fits ``root`` (``layers``: the layers lorakit already wraps in it, by path)."""
    config, source = adapter.config, adapter.source
    modules = plain_modules(root)
    try:
        targets = resolve_targets(root, config, modules)
    except Exception as exc:
        raise AdapterFileError(f"{source}: the adapter's targets do not fit this model: {exc}") from exc
    saved = [n for n in modules if config.modules_to_save and matches_rules(n, config.modules_to_save)]
    kinds = {path: layers[path].kind if path in layers else kind_for(modules[path]) for path in targets}
    cls = method_class(config.method)
    expected: dict[str, tuple[int, ...]] = {}
    for path, kind in kinds.items():
        expected.update({PREFIX + path + "." + k: v for k, v in cls.expected_shapes(kind, config, path).items()})
    if kinds:
        shared = cls.expected_shared_shapes(config, list(kinds.values()))
        expected.update({SHARED_PREFIX + k: v for k, v in shared.items()})
    for path in saved:
        for pname, value in modules[path].state_dict().items():
            expected[PREFIX + path + "." + pname] = tuple(value.shape)
    base_copies = [path for path in targets if PREFIX + path + BASE_COPY in adapter.tensors]
    for path in base_copies:
        expected[PREFIX + path + BASE_COPY] = tuple(modules[path].weight.shape)

    found = adapter.tensors
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing or unexpected:
        raise AdapterFileError(
            f"{source}: the adapter's tensors do not match this model's modules "
            f"({len(expected) - len(missing)} of {len(expected)} expected tensors found). "
            + (f"Missing: {preview(missing)}. " if missing else "")
            + (f"Unexpected: {preview(unexpected)}. " if unexpected else "")
            + "Is this adapter for a different architecture?"
        )
    vocab_hint = _vocab_hint(root, adapter)
    bad = [f"{k}: file {tuple(found[k].shape)}, model needs {shape}"
           for k, shape in expected.items() if tuple(found[k].shape) != shape]
    if bad:
        raise AdapterFileError(f"{source}: shape mismatch: {preview(bad)}.{vocab_hint}")
    if check_fingerprint:
        if vocab_hint:
            raise FingerprintMismatchError(f"{source}:{vocab_hint} (check_fingerprint=False loads it anyway)")
        _check_fingerprints(modules, layers, adapter, targets)
    _check_base_copies(modules, adapter, base_copies, check_fingerprint)
    return Plan(targets, saved)


def _check_base_copies(
    modules: dict[str, nn.Module], adapter: AdapterFile, paths: list[str], check_fingerprint: bool
) -> None:
    """PEFT's copies of targeted embedding weights must be this model's own; they are then ignored.

    PEFT (``save_embedding_layers="auto"``) writes ``<path>.base_layer.weight`` for targeted
    layers named like embeddings (embed_tokens, lm_head) and overwrites the base with it on load.
    lorakit never replaces base weights, so a copy that differs from the model's is refused.
    """
    for path in paths:
        stored = adapter.tensors[PREFIX + path + BASE_COPY]
        if not check_fingerprint:
            log.warning("%s: ignoring its copy of %s's base weight (check_fingerprint=False)", adapter.source, path)
            continue
        weight = modules[path].weight.detach()
        low = stored.dtype if torch.finfo(stored.dtype).eps >= torch.finfo(weight.dtype).eps else weight.dtype
        if not torch.equal(stored.to(low), weight.to("cpu", low)):
            raise FingerprintMismatchError(
                f"{adapter.source} holds its own base weight for {path} (PEFT saves one when embedding layers "
                "are targeted, e.g. after resizing or training them) and it differs from this model's. lorakit "
                f"does not replace base weights: copy it into {path}.weight first, or pass check_fingerprint=False "
                "to ignore it."
            )


def _vocab_hint(root: nn.Module, adapter: AdapterFile) -> str:
    trained = (adapter.lorakit or {}).get("vocab_size")
    current = vocab_size(root)
    if trained is None or current is None or trained == current:
        return ""
    return (f" The adapter was trained with a vocabulary of {trained} tokens and this model has {current}: "
            f"call model.resize_token_embeddings({trained}) before loading.")


def _check_fingerprints(
    modules: dict[str, nn.Module], layers: dict[str, AdaptedLayer], adapter: AdapterFile, targets: list[str]
) -> None:
    recorded = (adapter.lorakit or {}).get("fingerprints")
    if not recorded:
        log.info("%s has no base fingerprint (not written by lorakit); skipping that check", adapter.source)
        return
    problems = []
    for path in targets:
        # a wrapped layer's fingerprint was taken when it was wrapped (before any merge)
        current = layers[path].fingerprint if path in layers else base_fingerprint(modules[path])
        why = fingerprint_mismatch(recorded.get(path), current)
        if why:
            problems.append(f"{path}: {why}")
    if problems:
        raise FingerprintMismatchError(
            f"{adapter.source} was trained on different base weights than this model "
            f"({len(problems)} of {len(targets)} modules differ; first: {problems[0]}). "
            "Load the base it was trained on, or pass check_fingerprint=False to load it anyway."
        )


def preview(items: list[str], n: int = 4) -> str:
    """The first few of a long list of names, for error messages that must stay readable."""
    return ", ".join(items[:n]) + (f" … ({len(items)} in all)" if len(items) > n else "")


def vocab_size(model: nn.Module) -> int | None:
    """Rows of the input embedding, recorded in files: a resized vocabulary is the likeliest reason
    an adapter does not fit a base, and saying so beats a bare shape mismatch."""
    get = getattr(model, "get_input_embeddings", None)
    try:
        emb = get() if callable(get) else None
    except (NotImplementedError, AttributeError):
        return None
    weight = getattr(emb, "weight", None)
    return int(weight.shape[0]) if weight is not None else None
