"""Combining adapters into one new adapter that ships as a plain LoRA in PEFT's layout.

Every input is first written as its exact update per module, ΔWᵢ = sᵢ·Bᵢ Aᵢ, from its method's
``exported_factors()`` (VeRA as (b⊙B)(d⊙A)); a method that is not ``combinable`` (its update is
not such a product) is refused before anything is built. Then, with weights wᵢ:

- ``linear``: Σ wᵢ ΔWᵢ exactly, by concatenating factors (rank Σ rᵢ, no out×in matrix).
- ``svd``: the same sum truncated to rank k by an SVD.
- ``magnitude_prune``: keep the ``density`` share of largest-magnitude entries of each wᵢΔWᵢ, sum.
- ``ties`` (Yadav et al. 2023): magnitude-prune each wᵢΔWᵢ, elect each entry's sign as the sign of
  the pruned sum, and average the entries that agree with it (disjoint merge).
- ``dare_linear`` (Yu et al. 2024): drop entries of each wᵢΔWᵢ at random with probability
  1 − density, rescale the survivors by 1/density, sum.
- ``dare_ties``: DARE's random drop and rescale, then TIES's sign election and disjoint merge.

The pruned combinations are computed on the full update of each module and truncated back to
rank k by an SVD (PEFT's ``*_svd`` variants); pruning factors separately has no meaning for the
product. A method that is not ``additive`` (DoRA) combines only with adapters of its own method
and only with ``linear``; the result is of that method, and its ``take_combination`` keeps what
the factors do not say (DoRA: the magnitude vectors average with the weights; one DoRA adapter
at weight 1 comes back exactly). Additive inputs give a plain LoRA.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lorakit.config import AdapterConfig, alpha_for, exact_pattern
from lorakit.errors import ConfigError
from lorakit.methods import method_class, require_combinable
from lorakit.methods.base import AdapterMethod
from lorakit.model import AdaptedModel

COMBINATIONS = ("linear", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune")


@dataclass(frozen=True)
class Combination:
    kind: str = "linear"
    density: float = 0.5  # share of entries kept by the pruning combinations
    rank: int | None = None  # target rank of the SVD-based combinations (default: the largest input rank)
    seed: int = 0  # DARE's random drops

    def __post_init__(self) -> None:
        if self.kind not in COMBINATIONS:
            raise ConfigError(f"unknown combination {self.kind!r}; choose one of {', '.join(COMBINATIONS)}")
        if not 0.0 < self.density <= 1.0:
            raise ConfigError(f"density must be in (0, 1], got {self.density}")


def combine_adapters(
    model: AdaptedModel, names: list[str], weights: list[float], new_name: str,
    combination: Combination | None = None,
) -> None:
    """Add adapter ``new_name`` to ``model``: the combination of ``names`` with ``weights``."""
    combination = combination or Combination()
    if len(names) != len(weights) or not names:
        raise ConfigError(f"give one weight per adapter: {len(names)} adapters, {len(weights)} weights")
    for name in names:
        model._require(name)
    if new_name in model.configs:
        raise ConfigError(f"an adapter named {new_name!r} already exists")
    configs = [model.configs[n] for n in names]
    output_method = _output_method(names, configs, combination)
    paths = sorted(set().union(*(model.layers_of(n) for n in names)))
    per_path = {p: [(model.adapter_modules(n).get(p), w) for n, w in zip(names, weights, strict=True)]
                for p in paths}
    factors = {p: _combine_module(items, combination) for p, items in per_path.items()}
    ranks = {p: a.shape[0] for p, (a, _) in factors.items()}
    first = configs[0]
    scale = _common_scaling(model, names)
    config = AdapterConfig(
        method=output_method, r=max(ranks.values()),
        alpha=alpha_for(scale, max(ranks.values()), first.use_rslora), use_rslora=first.use_rslora,
        target_modules=tuple(paths),
        rank_pattern={exact_pattern(p): r for p, r in ranks.items() if r != max(ranks.values())},
        alpha_pattern={exact_pattern(p): alpha_for(scale, r, first.use_rslora) for p, r in ranks.items()
                       if r != max(ranks.values())},
    )
    model.add_adapter(new_name, config, activate=False)
    for path, method in model.adapter_modules(new_name).items():
        A, B_scaled = factors[path]
        method.take_combination(A, B_scaled, [(m, w) for m, w in per_path[path] if m is not None])


def _output_method(names: list[str], configs: list[AdapterConfig], combination: Combination) -> str:
    """The method of the combination ("lora", or the inputs' own non-additive method), after
    refusing inputs that cannot be combined: all checked before anything is built."""
    for name, config in zip(names, configs, strict=True):
        require_combinable(name, config.method)
    classes = [method_class(c.method) for c in configs]
    special = {cls for cls in classes if not cls.additive}
    if not special:
        return "lora"
    if len(set(classes)) > 1 or combination.kind != "linear":
        method = next(iter(special))
        raise ConfigError(f"{method.title or method.method_name} adapters combine only with each other and only with "
                          "'linear' (their update is not a sum of weight changes)")
    if classes[0].take_combination is AdapterMethod.take_combination:
        raise ConfigError(f"method {classes[0].method_name!r} cannot hold a combination (no take_combination)")
    return classes[0].method_name


def _combine_module(items: list[tuple[AdapterMethod | None, float]], c: Combination
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, s·B) of the combined update of one module."""
    present = [(m, w) for m, w in items if m is not None]
    if c.kind == "linear":
        parts = [m.exported_factors() for m, _ in present]
        A = torch.cat([a for a, _ in parts])
        B = torch.cat([w * b for (_, b), (_, w) in zip(parts, present, strict=True)], dim=1)
        return A.detach(), B.detach()
    deltas = torch.stack([w * _delta(m) for m, w in present])
    rank = c.rank or max(m.rank for m, _ in present)
    generator = torch.Generator().manual_seed(c.seed)
    if c.kind == "svd":
        merged = deltas.sum(0)
    elif c.kind == "magnitude_prune":
        merged = torch.stack([magnitude_prune(d, c.density) for d in deltas]).sum(0)
    elif c.kind == "ties":
        merged = disjoint_merge(torch.stack([magnitude_prune(d, c.density) for d in deltas]))
    elif c.kind == "dare_linear":
        merged = torch.stack([random_prune(d, c.density, generator) for d in deltas]).sum(0)
    else:  # dare_ties
        merged = disjoint_merge(torch.stack([random_prune(d, c.density, generator) for d in deltas]))
    return low_rank(merged, rank)


def _delta(method: AdapterMethod) -> torch.Tensor:
    """ΔW = (s·B) A exactly (for LoRA the PiSSA offset and Delta-LoRA shift included)."""
    A, B = method.exported_factors()
    return B.float() @ A.float()


def magnitude_prune(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``density`` share of entries with the largest magnitude (ties at the threshold kept)."""
    keep = max(1, round(density * delta.numel()))
    threshold = delta.abs().flatten().kthvalue(delta.numel() - keep + 1).values
    return delta * (delta.abs() >= threshold)


def random_prune(delta: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: keep each entry with probability ``density`` and rescale survivors by 1/density."""
    mask = torch.rand(delta.shape, generator=generator) < density
    return delta * mask / density


def disjoint_merge(deltas: torch.Tensor) -> torch.Tensor:
    """TIES: elect each entry's sign from the sum, then average the entries that agree with it."""
    sign = torch.sign(deltas.sum(0))
    agree = (torch.sign(deltas) == sign) & (deltas != 0)
    count = agree.sum(0).clamp_min(1)
    return (deltas * agree).sum(0) / count


def low_rank(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with B A the best rank-``rank`` approximation of ``delta`` (Eckart–Young)."""
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    k = min(rank, S.shape[0])
    root = S[:k].sqrt()
    return root.unsqueeze(1) * Vh[:k], U[:, :k] * root


def _common_scaling(model: AdaptedModel, names: list[str]) -> float:
    """The scaling the new adapter keeps: the first input's (so one adapter at weight 1 is itself)."""
    first = next(iter(model.adapter_modules(names[0]).values()))
    return first.scaling

