"""Where adapters go: target rules resolve to module paths once, before anything is wrapped."""

from __future__ import annotations

import difflib
import functools
import re
from collections import Counter
from collections.abc import Callable

from torch import nn

from lorakit.config import ALL_LINEAR, AdapterConfig
from lorakit.errors import TargetNotFoundError
from lorakit.kinds import KINDS, is_adaptable, is_linear

# Path components of output heads that "all-linear" leaves alone (they map to labels or the
# vocabulary; adapting them is rarely wanted and PEFT leaves the LM head out too).
# Output heads: kept out of "all-linear" (PEFT does the same), since they map to the task's outputs.
OUTPUT_HEADS = frozenset({"lm_head", "classifier", "score", "qa_outputs", "embed_out", "cls"})
# The classification heads `lorakit train` trains in full and saves with the adapter (modules_to_save).
CLASSIFIER_HEADS = ("classifier", "score")
# Container names whose next path component is a layer index, tried when layers_pattern is None.
COMMON_LAYER_CONTAINERS = ("layers", "layer", "h", "blocks", "block", "encoder_layers", "decoder_layers")


def matches_rules(name: str, rules: tuple[str, ...] | str) -> bool:
    """A string is a regex that must match the whole name; a tuple of names matches a module
    whose name equals one of them or ends with ``'.' + rule``. See :func:`rule_matcher`."""
    return rule_matcher(rules if isinstance(rules, str) else tuple(rules))(name)


@functools.lru_cache(maxsize=64)
def rule_matcher(rules: tuple[str, ...] | str) -> Callable[[str], bool]:
    """:func:`matches_rules` for fixed rules, to call on many names.

    A tuple is looked up as a set of the name's dotted suffixes, in time independent of the
    number of rules (a file's config lists every adapted path: 224 for a 7B model).
    """
    if isinstance(rules, str):
        pattern = re.compile(rules)
        return lambda name: pattern.fullmatch(name) is not None
    wanted = frozenset(rules)

    def match(name: str) -> bool:
        start = 0
        while True:  # name[start:] runs through the dotted suffixes, the whole name first
            if name[start:] in wanted:
                return True
            start = name.find(".", start) + 1
            if not start:
                return False

    return match


def layer_index(name: str, layers_pattern: str | None) -> int | None:
    """The transformer-block index in a module path (``model.layers.3.mlp`` gives 3)."""
    containers = (layers_pattern,) if layers_pattern else COMMON_LAYER_CONTAINERS
    for container in containers:
        match = re.search(rf"(?:^|\.){re.escape(container)}\.(\d+)(?:\.|$)", name)
        if match:
            return int(match.group(1))
    return None


def output_head_names(model: nn.Module) -> set[str]:
    """Names of modules that are output heads: the output embedding and known head names."""
    heads: set[str] = set()
    get_out = getattr(model, "get_output_embeddings", None)
    out_emb = get_out() if callable(get_out) else None
    for name, module in model.named_modules():
        if module is out_emb or any(part in OUTPUT_HEADS for part in name.split(".")):
            heads.add(name)
    return heads


def resolve_targets(model: nn.Module, config: AdapterConfig, modules: dict[str, nn.Module] | None = None, *,
                    every_name: bool = False) -> list[str]:
    """Module paths that get an adapter under ``config``, in model order (``modules``: the
    model's ``plain_modules``, when the caller has them).

    Raises TargetNotFoundError (listing near misses and the adaptable module kinds) when the
    rules match nothing, and when a named target exists but cannot be adapted. With
    ``every_name``, also when any one name of a list matches nothing: ``qproj,v_proj`` would
    otherwise adapt ``v_proj`` alone, silently (files written by other tools may list names their
    model lacked, so loading does not ask for this).
    """
    modules = plain_modules(model) if modules is None else modules
    targets = config.target_modules
    if every_name and not isinstance(targets, str):
        _require_every_name(modules, config)
    if targets == ALL_LINEAR:
        heads = output_head_names(model)
        chosen = [n for n, m in modules.items() if is_linear(m) and n not in heads]
    else:
        match = rule_matcher(targets)
        chosen = [n for n in modules if match(n)]
        not_adaptable = [n for n in chosen if not is_adaptable(modules[n])]
        # A rule that names a container (e.g. "attention") matches its children by suffix only
        # when they are named; containers themselves are skipped silently unless nothing is left.
        chosen = [n for n in chosen if is_adaptable(modules[n])]
        if not chosen and not_adaptable:
            kinds = sorted({type(modules[n]).__name__ for n in not_adaptable})
            raise TargetNotFoundError(
                f"target_modules {targets!r} matched only modules lorakit cannot adapt "
                f"({', '.join(kinds)}: {', '.join(not_adaptable[:5])}). "
                f"Adaptable kinds: {', '.join(k.name for k in KINDS)}."
            )
    if config.exclude_modules is not None:
        chosen = [n for n in chosen if not matches_rules(n, config.exclude_modules)]
    if config.layers_to_transform is not None:
        wanted = set(config.layers_to_transform)
        chosen = [n for n in chosen if layer_index(n, config.layers_pattern) in wanted]
    if not chosen:
        raise TargetNotFoundError(_explain_no_match(modules, config))
    return chosen


def plain_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The model's modules by path as the user defined them, seeing through lorakit's wrappers.

    A wrapped layer appears under its original path as its base layer; the wrapper's insides
    (adapter tensors, trainable copies) are not listed.
    """
    from lorakit.layer import AdaptedLayer
    from lorakit.saved_modules import SavedModule

    modules: dict[str, nn.Module] = {}
    seen = {id(model)}  # as named_modules: a module shared under two paths is listed at the first

    def walk(parent: nn.Module, prefix: str) -> None:  # never descends into a wrapper
        for leaf, module in parent._modules.items():
            if module is None or id(module) in seen:
                continue
            seen.add(id(module))
            name = prefix + leaf
            if isinstance(module, AdaptedLayer):
                modules[name] = module.base_layer
                seen.add(id(module.base_layer))
            elif isinstance(module, SavedModule):
                modules[name] = module.original
                seen.add(id(module.original))
            else:
                modules[name] = module
                walk(module, name + ".")

    walk(model, "")
    return modules


def _require_every_name(modules: dict[str, nn.Module], config: AdapterConfig) -> None:
    names = list(config.target_modules)
    unmatched = [rule for rule in names if not any(rule_matcher((rule,))(n) for n in modules)]
    if not unmatched or len(unmatched) == len(names):  # nothing matched at all: the general message says more
        return
    adaptable = [n for n, m in modules.items() if is_adaptable(m)]
    suffixes = sorted({n.split(".")[-1] for n in adaptable})
    hints = []
    for rule in unmatched:
        near = difflib.get_close_matches(rule, suffixes, n=3, cutoff=0.5)
        hints.append(f"{rule!r}" + (f" (closest: {', '.join(near)})" if near else ""))
    raise TargetNotFoundError(
        f"target_modules names {', '.join(hints)} matched no module, while "
        f"{', '.join(repr(r) for r in names if r not in unmatched)} did; fix or drop "
        f"{'it' if len(unmatched) == 1 else 'them'}. Adaptable module names here: {', '.join(suffixes[:30])}"
        + ("…" if len(suffixes) > 30 else ""))


def _explain_no_match(modules: dict[str, nn.Module], config: AdapterConfig) -> str:
    adaptable = [n for n, m in modules.items() if is_adaptable(m)]
    suffixes = sorted({n.split(".")[-1] for n in adaptable})
    kinds = Counter(type(modules[n]).__name__ for n in adaptable)
    rules = config.target_modules
    wanted = [rules] if isinstance(rules, str) else list(rules)
    near: list[str] = []
    for rule in wanted:
        near += difflib.get_close_matches(rule, suffixes, n=3, cutoff=0.5)
        near += difflib.get_close_matches(rule, adaptable, n=2, cutoff=0.6)
    near = list(dict.fromkeys(near))
    parts = [f"target_modules {rules!r} matched no adaptable module"]
    if config.layers_to_transform is not None:
        parts.append(f"(after layers_to_transform={list(config.layers_to_transform)})")
    if config.exclude_modules is not None:
        parts.append(f"(after exclude_modules={config.exclude_modules!r})")
    msg = " ".join(parts) + "."
    if near:
        msg += f" Closest names: {', '.join(near)}."
    msg += f" Adaptable module names here: {', '.join(suffixes[:30])}"
    msg += "…" if len(suffixes) > 30 else ""
    msg += ". Kinds present: " + ", ".join(f"{k} ×{c}" for k, c in kinds.most_common())
    msg += f". lorakit adapts {', '.join(k.name for k in KINDS)}; 'all-linear' picks every linear layer."
    return msg
