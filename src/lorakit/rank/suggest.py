"""From gradient spectra to a rank per module under a parameter budget, and the YAML that trains it.

A step of size η along the gradient G lowers the loss by about η‖G‖F² = η Σσᵢ²; restricted to a
rank-k update it lowers it by η Σ_{i≤k} σᵢ² at best. So σ²_{k+1} is what the (k+1)-th unit of rank
on a module buys, in the same units for every module, and it costs in + out parameters. The
greedy allocation adds one unit at a time where σ²_{next} / (in + out) is largest, until the
budget is spent. The gains of each module decrease (σ is sorted), so greedy picks the most
energy the budget can buy, up to the last unit (a knapsack with one item size per module). A
module that gets nothing is left out of the targets.
"""

from __future__ import annotations

import heapq
import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lorakit.errors import ConfigError
from lorakit.rank.spectra import Spectrum
from lorakit.targets import COMMON_LAYER_CONTAINERS, rule_matcher

ALPHA_PER_RANK = 2.0  # alpha = 2·r on every module: lorakit's default scale (alpha 16 at rank 8)


def unit_cost(spectrum: Spectrum) -> int:
    """Parameters one unit of LoRA rank adds to this module: a row of A and a column of B."""
    return spectrum.in_features + spectrum.out_features


def allocate(spectra: Mapping[str, Spectrum], budget: int, max_rank: int) -> dict[str, int]:
    """Rank per module (0: none) spending at most ``budget`` parameters, greedily by σ²_{next} / (in + out).

    A module takes at most ``max_rank`` units and never more than its numerical rank (a
    direction the gradient does not have buys nothing).
    """
    if budget < 1:
        raise ConfigError(f"the parameter budget must be at least 1, got {budget}")
    if max_rank < 1:
        raise ConfigError(f"--max-rank must be at least 1, got {max_rank}")
    ranks = dict.fromkeys(spectra, 0)
    limits = {p: min(max_rank, s.numerical_rank, len(s.values)) for p, s in spectra.items()}
    heap = [(-s.values[0] ** 2 / unit_cost(s), p) for p, s in spectra.items() if limits[p] > 0]
    heapq.heapify(heap)
    spent = 0
    while heap:
        _, path = heapq.heappop(heap)
        cost = unit_cost(spectra[path])
        if spent + cost > budget:
            continue  # its later units cost the same: this module is done; a cheaper one may still fit
        spent += cost
        ranks[path] += 1
        k = ranks[path]
        if k < limits[path]:
            heapq.heappush(heap, (-spectra[path].values[k] ** 2 / cost, path))
    return ranks


def captured_share(spectra: Mapping[str, Spectrum], ranks: Mapping[str, int]) -> float:
    """The share of the total gradient energy the allocation's directions hold."""
    total = sum(s.energy for s in spectra.values())
    kept = sum(sum(v * v for v in spectra[p].values[:k]) for p, k in ranks.items())
    return kept / total if total > 0 else 0.0


def split_path(path: str) -> tuple[int | None, str]:
    """(layer index, module type) of a module path: ``bert.encoder.layer.3.attention.self.query``
    gives (3, ``attention.self.query``); a module outside the numbered blocks is its own type."""
    for container in COMMON_LAYER_CONTAINERS:
        match = re.search(rf"(?:^|\.){re.escape(container)}\.(\d+)\.(.+)$", path)
        if match:
            return int(match.group(1)), match.group(2)
    return None, path


def target_spec(chosen: list[str], module_names: list[str]) -> list[str]:
    """The chosen module paths as a short target list: a module type's suffix where it matches
    exactly the chosen modules of that type among all of the model's modules, else the paths."""
    by_type: dict[str, list[str]] = {}
    for path in chosen:
        by_type.setdefault(split_path(path)[1], []).append(path)
    spec: list[str] = []
    for kind, paths in by_type.items():
        matched = [n for n in module_names if rule_matcher((kind,))(n)]
        spec += [kind] if sorted(matched) == sorted(paths) else paths
    return spec


def pattern_key(path: str, targets: list[str]) -> str:
    """A rank/alpha pattern key that PEFT's rule, and lorakit's, match to ``path`` alone among ``targets``."""
    if any(other != path and re.match(rf"(.*\.)?({path})$", other) for other in targets):
        return "^" + re.escape(path)
    return path


def suggested_settings(ranks: Mapping[str, int], module_names: list[str], base: Mapping[str, Any]) -> dict[str, Any]:
    """`lorakit train` settings for the allocation: ``base`` (model, data, task, ...) plus targets,
    rank (the most common), alpha, and rank_pattern / alpha_pattern for the modules that differ."""
    chosen = [p for p, r in ranks.items() if r > 0]
    if not chosen:
        raise ConfigError("the budget buys no rank on any module (each unit of rank costs in + out parameters "
                          "of its module); raise --budget-params or --budget-ratio")
    common = Counter(ranks[p] for p in chosen).most_common(1)[0][0]
    others = {pattern_key(p, chosen): ranks[p] for p in chosen if ranks[p] != common}
    settings = dict(base)
    settings.update({
        "targets": ",".join(target_spec(chosen, module_names)),
        "rank": common,
        "alpha": ALPHA_PER_RANK * common,
        "rank_pattern": others,
        "alpha_pattern": {key: ALPHA_PER_RANK * r for key, r in others.items()},
    })
    return settings


def write_yaml(settings: Mapping[str, Any], path: Path, header: str) -> None:
    import yaml

    from lorakit.io.atomic import write_text_atomically

    text = "".join(f"# {line}\n" for line in header.splitlines())
    text += yaml.safe_dump(dict(settings), sort_keys=False, default_flow_style=False)
    write_text_atomically(path, text)
